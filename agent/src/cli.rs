//! The `tessera` command line: one file per subcommand, each with its clap `Args` and a `run`.
use clap::{Parser, Subcommand};

pub mod bundle;
pub mod check;
pub mod crds;
pub mod exec;
pub mod logs;
pub mod revoke;
pub mod rotate_key;
pub mod run;
pub mod selftest;
pub mod status;
pub mod test;
pub mod token;
pub mod uninstall;
pub mod whoami;

pub const DEFAULT_POLICY_DIR: &str = "/etc/tessera/policies";
pub const DEFAULT_API_SOCKET: &str = "/run/tessera/workload.sock";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tessera/admin.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera";
pub const DEFAULT_DECISION_LOG: &str = "/var/log/tessera/decisions.jsonl";

#[derive(Parser, Debug)]
#[command(
    name = "tessera",
    version,
    about = "Enforces workload identity on outbound calls: eBPF decides every connect to a \
             protected endpoint; the agent issues short-lived credentials and logs each decision."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground: load and attach the programs, serve the Workload API,
    /// write the decision log.
    Run(Box<run::RunArgs>),
    /// Validate policy files (and compile the Rego issuance modules they name).
    Check(check::CheckArgs),
    /// Run the unit tests (`test_*` rules) of the policies' Rego issuance modules.
    Test(test::TestArgs),
    /// Print the CustomResourceDefinitions of TesseraPolicy and TesseraNamespacedPolicy.
    Crds(crds::CrdsArgs),
    /// Ask the Workload API for a credential for this process; print the JWT.
    Token(token::TokenArgs),
    /// Take a credential for this process, then exec CMD holding it (`bind: process-tree`).
    Exec(exec::ExecArgs),
    /// Revoke credentials now.
    Revoke(revoke::RevokeArgs),
    /// Sign with a new key from now on; the old one verifies until its tokens expire.
    RotateKey(rotate_key::RotateKeyArgs),
    /// Export the OIDC discovery document and the trust domain's JWKS for a static host.
    Bundle(bundle::BundleArgs),
    /// Read or follow the decision log.
    Logs(logs::LogsArgs),
    /// Show what the running agent enforces, and its counters.
    Status(status::StatusArgs),
    /// Show which workload a process maps to, its SPIFFE ID, and the evidence behind it.
    Whoami(whoami::WhoamiArgs),
    /// Try every known bypass against a private agent in a scratch cgroup (root); print the table.
    Selftest(selftest::SelftestArgs),
    /// Remove the pinned programs (they keep enforcing while the agent is stopped).
    Uninstall(uninstall::UninstallArgs),
    #[command(name = "selftest-actor", hide = true)]
    SelftestActor(selftest::ActorArgs),
}
