//! `tessera rotate-key`: a new signing key now, through the agent's admin socket. The old
//! public key stays published until every token it signed has expired.
use std::{path::PathBuf, process::ExitCode};

use crate::credential;

#[derive(clap::Args, Debug)]
pub struct RotateKeyArgs {
    /// The agent's admin socket.
    #[arg(long, default_value = super::DEFAULT_ADMIN_SOCKET, env = "TESSERA_ADMIN_SOCKET")]
    pub admin_socket: PathBuf,
}

pub async fn run(args: &RotateKeyArgs) -> ExitCode {
    match credential::admin_rotate_key(&args.admin_socket).await {
        Ok(rotation) => {
            let until = rotation["retired_until"].as_u64().unwrap_or(0);
            let until = std::time::UNIX_EPOCH + std::time::Duration::from_secs(until);
            println!(
                "signing key {} (key {} stays published until {})",
                rotation["kid"].as_str().unwrap_or("?"),
                rotation["retired"].as_str().unwrap_or("?"),
                humantime::format_rfc3339_seconds(until)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera rotate-key: {e}");
            ExitCode::FAILURE
        }
    }
}
