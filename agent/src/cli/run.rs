//! `tessera run`: the daemon in the foreground.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use crate::{
    daemon::{self, DaemonConfig},
    telemetry::{self, LogFormat},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Configuration file (not read by this release: flags only).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Policy file or directory (its *.yaml files); repeatable.
    #[arg(long = "policy", default_value = super::DEFAULT_POLICY_DIR)]
    pub policies: Vec<PathBuf>,
    /// The cgroup to enforce on (it and everything below it): a path under the cgroup v2 mount,
    /// or relative to it (`/tessera-demo`). Default: the cgroup v2 root, i.e. the whole host.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Force every rule into this mode; by default each rule's own mode applies.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Where decisions are written (JSON lines); `-` for stdout.
    #[arg(long, default_value = super::DEFAULT_DECISION_LOG)]
    pub decision_log: String,
    /// The Workload API socket (mode 0666: every local process may ask).
    #[arg(long, default_value = super::DEFAULT_API_SOCKET)]
    pub api_socket: PathBuf,
    /// The admin socket for `tessera revoke` and `tessera status` (mode 0600: root only).
    #[arg(long, default_value = super::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Where the signing key lives (created 0700; the key 0600).
    #[arg(long, default_value = super::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// DNS server for endpoint `hosts:` (accepted for the v1 contract; `hosts:` is not supported
    /// by this release yet).
    #[arg(long)]
    pub dns_server: Option<SocketAddr>,
    /// Operational log format on stderr.
    #[arg(long, value_enum, default_value = "plain")]
    pub log_format: LogFormatArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Enforce,
    Audit,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormatArg {
    Plain,
    Json,
}

pub async fn run(args: RunArgs) -> ExitCode {
    telemetry::init(match args.log_format {
        LogFormatArg::Plain => LogFormat::Plain,
        LogFormatArg::Json => LogFormat::Json,
    });
    if args.config.is_some() {
        eprintln!(
            "tessera run: --config is not supported by this release yet; pass the settings as flags"
        );
        return ExitCode::from(2);
    }
    let config = DaemonConfig {
        policies: args.policies,
        cgroup: args.cgroup,
        mode: args.mode,
        decision_log: args.decision_log,
        api_socket: args.api_socket,
        admin_socket: args.admin_socket,
        state_dir: args.state_dir,
    };
    match daemon::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera run: {e}");
            ExitCode::FAILURE
        }
    }
}
