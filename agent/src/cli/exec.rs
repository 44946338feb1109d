//! `tessera exec`: take a credential for this process from the Workload API, then become CMD
//! (same pid), so that a `bind: process-tree` grant covers CMD and the children it forks.
use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitCode};

use tracing::debug;

use super::token::{self, TokenArgs};
use crate::credential::{self, TokenResponse};

/// The variable CMD finds the JWT in.
pub const TOKEN_ENV: &str = "TESSERA_TOKEN";
/// The variable CMD finds the credential's jti in (to end it early, or to find it in the log).
pub const JTI_ENV: &str = "TESSERA_CREDENTIAL_JTI";

/// Exit codes, as env(1) uses them.
const EXIT_REFUSED: u8 = 1;
const EXIT_CANNOT_RUN: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub credential: TokenArgs,
    /// The command to run holding the credential, and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Why CMD is not run; each has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("no credential from the Workload API")]
    Credential(#[source] credential::ClientError),
    #[error(
        "the credential is bound to this process only (rule bind: {bind}), and would not survive \
         the exec of the command: set `bind: process-tree` on the rule that lets this workload \
         reach {audience}"
    )]
    BindEndsAtExec { bind: String, audience: String },
    #[error(
        "the agent did not say how the credential is bound (is it older than this tessera?): \
         not running the command"
    )]
    BindUnknown,
    #[error("cannot run {}", .program.to_string_lossy())]
    Run {
        program: OsString,
        #[source]
        source: io::Error,
    },
}

impl ExecError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Run { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                EXIT_NOT_FOUND
            }
            ExecError::Run { .. } => EXIT_CANNOT_RUN,
            _ => EXIT_REFUSED,
        }
    }
}

/// Asks for the credential and execs CMD with it; returns only if that failed.
pub async fn run(args: &ExecArgs) -> ExitCode {
    let err = match prepare(args).await {
        Ok(Prepared { mut command, jti }) => {
            let source = command.exec();
            // The grant dies with this process anyway; end it now, so that it does not stay
            // listed until it expires.
            end(args, &jti).await;
            ExecError::Run {
                program: command.get_program().to_owned(),
                source,
            }
        }
        Err(e) => e,
    };
    eprintln!("tessera exec: {}", chain(&err));
    ExitCode::from(err.exit_code())
}

/// CMD, ready to exec with the credential in its environment.
pub struct Prepared {
    pub command: Command,
    pub jti: String,
}

/// Takes the credential and checks its bind. A credential whose grant would not outlive the
/// exec is ended again, and refused.
pub async fn prepare(args: &ExecArgs) -> Result<Prepared, ExecError> {
    let response = token::request(&args.credential)
        .await
        .map_err(ExecError::Credential)?;
    if let Err(e) = check_bind(&response) {
        end(args, &response.jti).await;
        return Err(e);
    }
    let (program, rest) = args.command.split_first().ok_or(ExecError::Run {
        program: OsString::new(),
        source: io::Error::new(io::ErrorKind::NotFound, "no command given"),
    })?;
    let mut command = Command::new(program);
    command
        .args(rest)
        .env(TOKEN_ENV, &response.token)
        .env(JTI_ENV, &response.jti);
    Ok(Prepared {
        command,
        jti: response.jti,
    })
}

/// `process-tree` and `workload` grants cover CMD after the exec; a `process` grant does not.
fn check_bind(response: &TokenResponse) -> Result<(), ExecError> {
    match response.bind.as_str() {
        "process-tree" | "workload" => Ok(()),
        "" => Err(ExecError::BindUnknown),
        other => Err(ExecError::BindEndsAtExec {
            bind: other.to_owned(),
            audience: response.audience.clone(),
        }),
    }
}

async fn end(args: &ExecArgs, jti: &str) {
    if let Err(e) = credential::end_credential(&args.credential.socket, jti).await {
        debug!(jti, error = %e, "cannot end the unused credential; it expires by itself");
    }
}

/// The error and its sources, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
