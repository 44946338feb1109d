//! `tessera revoke`: end credentials now, through the agent's admin socket.
use std::{path::PathBuf, process::ExitCode};

use crate::{
    credential::{self, RevokeTarget},
    identity::spiffe::SpiffeId,
};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["jti", "workload", "pid"])))]
pub struct RevokeArgs {
    /// Revoke the credential with this `jti`.
    #[arg(long)]
    pub jti: Option<String>,
    /// Revoke every credential of this workload (its SPIFFE ID).
    #[arg(long)]
    pub workload: Option<SpiffeId>,
    /// Revoke every credential held by this process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// The agent's admin socket.
    #[arg(long, default_value = super::DEFAULT_ADMIN_SOCKET, env = "TESSERA_ADMIN_SOCKET")]
    pub admin_socket: PathBuf,
}

pub async fn run(args: &RevokeArgs) -> ExitCode {
    let target = match (&args.jti, &args.workload, args.pid) {
        (Some(jti), _, _) => RevokeTarget::Jti(jti.clone()),
        (_, Some(id), _) => RevokeTarget::Workload(id.clone()),
        (_, _, Some(pid)) => RevokeTarget::Pid(pid),
        // clap's group makes one of them required.
        _ => return ExitCode::from(2),
    };
    match credential::admin_revoke(&args.admin_socket, &target).await {
        Ok(revoked) if revoked.is_empty() => {
            eprintln!("tessera revoke: no active credential matched");
            ExitCode::FAILURE
        }
        Ok(revoked) => {
            for jti in revoked {
                println!("revoked {jti}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera revoke: {e}");
            ExitCode::FAILURE
        }
    }
}
