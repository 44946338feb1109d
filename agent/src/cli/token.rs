//! `tessera token`: ask the Workload API for a credential for the calling process.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use crate::credential::{self, ClientError, TokenRequest, TokenResponse};

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
    /// A scope the credential should carry (repeat for more; each one the rule's `scopes:`
    /// lists); default: all of the rule's.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// The Workload API socket.
    #[arg(long, default_value = super::DEFAULT_API_SOCKET, env = "TESSERA_API_SOCKET")]
    pub socket: PathBuf,
}

impl TokenArgs {
    /// The `POST /v1/credentials` body these arguments ask for.
    pub fn request(&self) -> TokenRequest {
        TokenRequest {
            audience: self.audience.clone(),
            task: self.task.clone(),
            ttl_seconds: self.ttl.map(|d| d.as_secs()),
            scopes: (!self.scopes.is_empty()).then(|| self.scopes.clone()),
            subject_token: None,
            evidence_tokens: Vec::new(),
        }
    }
}

/// Asks the Workload API at `args.socket` for a credential for the calling process (shared by
/// `tessera token` and `tessera exec`).
pub async fn request(args: &TokenArgs) -> Result<TokenResponse, ClientError> {
    credential::request_token(&args.socket, &args.request()).await
}

/// Prints the JWT on stdout. The credential is attested to *this* process, which exits at once:
/// so only `bind: workload` rules give a credential that outlives it (see the README).
pub async fn run(args: &TokenArgs) -> ExitCode {
    match request(args).await {
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
