//! The bypass self-test (`tessera selftest`): every known way around the connect/sendmsg hooks,
//! tried for real against a private agent in a scratch cgroup, each checked against what the
//! kernel returned and what the decision log recorded.
//!
//! The same code runs the CLI and `tests/bypass.rs`, so the two cannot drift: [`Harness`] sets
//! up the scratch cgroup, loopback servers, policy and agent; [`actor`] performs one attempt in a
//! child process (`tessera selftest-actor`); [`catalog`] says what each attempt must observe.

pub mod actor;
pub mod catalog;
pub mod harness;
mod net;
mod policy;
pub mod report;
mod syscalls;
mod veth;

pub use catalog::{Attempt, Expected, ExpectedRecord, Outcome};
pub use harness::{Harness, HarnessConfig};
pub use report::{AttemptResult, Report, Status};

use std::path::PathBuf;

/// Errors that stop the self-test before or between attempts (an attempt that misbehaves is a
/// failed result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("the self-test needs root (it loads eBPF programs and creates cgroups)")]
    NotRoot,
    #[error("cannot find the cgroup v2 hierarchy: {0}")]
    Cgroup2(#[source] crate::kernel::KernelError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the loopback servers: {0}")]
    Servers(#[source] std::io::Error),
    #[error("cannot start the agent ({path}): {source}")]
    AgentSpawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent exited before it was ready ({0}); its log:\n{1}")]
    AgentExited(std::process::ExitStatus, String),
    #[error("the agent was not ready within 120 s; its log:\n{0}")]
    AgentTimeout(String),
    #[error("cannot run the actor for {attempt}: {source}")]
    Actor {
        attempt: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

impl SelftestError {
    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
