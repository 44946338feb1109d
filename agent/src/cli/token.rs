//! `tessera token`: ask the Workload API for a credential for the calling process.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use crate::credential::{self, TokenRequest};

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The endpoint the credential is for (its name in the policy).
    #[arg(long)]
    pub audience: String,
    /// The task the credential is for (recorded in the token and the decision log).
    #[arg(long)]
    pub task: Option<String>,
    /// How long the credential lives (e.g. 30s, 5m); default: the rule's maxTtl.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// The Workload API socket.
    #[arg(long, default_value = super::DEFAULT_API_SOCKET, env = "TESSERA_API_SOCKET")]
    pub socket: PathBuf,
}

/// Prints the JWT on stdout. The credential is attested to *this* process, which exits at once:
/// so only `bind: workload` rules give a credential that outlives it (see the README).
pub async fn run(args: &TokenArgs) -> ExitCode {
    let request = TokenRequest {
        audience: args.audience.clone(),
        task: args.task.clone(),
        ttl_seconds: args.ttl.map(|d| d.as_secs()),
    };
    match credential::request_token(&args.socket, &request).await {
        Ok(response) => {
            println!("{}", response.token);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera token: {e}");
            ExitCode::FAILURE
        }
    }
}
