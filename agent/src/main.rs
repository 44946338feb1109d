//! `tessera`: parse the command line, set up telemetry, dispatch.
use std::process::ExitCode;

use clap::Parser as _;
use tessera_agent::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: `--cgroup-namespace host` is a per-thread setns.
    if let Command::Run(args) = &cli.command
        && let Err(code) = tessera_agent::cli::run::before_runtime(args)
    {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tessera: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => tessera_agent::cli::run::run(*args).await,
            Command::Check(args) => tessera_agent::cli::check::run(&args),
            Command::Test(args) => tessera_agent::cli::test::run(&args),
            Command::Crds(args) => tessera_agent::cli::crds::run(&args),
            Command::Token(args) => tessera_agent::cli::token::run(&args).await,
            Command::Exec(args) => tessera_agent::cli::exec::run(&args).await,
            Command::Revoke(args) => tessera_agent::cli::revoke::run(&args).await,
            Command::RotateKey(args) => tessera_agent::cli::rotate_key::run(&args).await,
            Command::Bundle(args) => tessera_agent::cli::bundle::run(&args).await,
            Command::Logs(args) => tessera_agent::cli::logs::run(&args).await,
            Command::Status(args) => tessera_agent::cli::status::run(&args).await,
            Command::Whoami(args) => tessera_agent::cli::whoami::run(&args).await,
            Command::Selftest(args) => tessera_agent::cli::selftest::run(&args).await,
            Command::Uninstall(args) => tessera_agent::cli::uninstall::run(&args),
            Command::SelftestActor(args) => tessera_agent::cli::selftest::actor(&args).await,
        }
    });
    // Background tasks (a pod watch retrying, a blocking DNS lookup) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
