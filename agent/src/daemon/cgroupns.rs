//! The cgroup namespace `tessera run` works in.
//!
//! Attestation reads `/proc/PID/cgroup`, whose paths are relative to the *reader's* cgroup
//! namespace, while policy `cgroup:` paths and `--cgroup` are relative to the host's cgroup v2
//! root. In a container (a Kubernetes DaemonSet) the agent has a cgroup namespace of its own, so
//! the two disagree. `--cgroup-namespace host` enters the host's namespace (PID 1's, which the
//! agent sees with hostPID) before any thread exists: a cgroup namespace is a per-thread
//! attribute, and threads inherit it from the thread that creates them.
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};
use tracing::{info, warn};

/// `--cgroup-namespace`: which cgroup namespace the agent reads cgroup paths in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupNamespace {
    /// Enter the host's cgroup namespace (PID 1's) at start; fail if that is not possible.
    Host,
    /// Stay in the namespace the agent was started in (warns when it is not the host's).
    #[default]
    Inherit,
    /// Enter the namespace of this nsfs file (`/proc/PID/ns/cgroup`, or a bind mount of one):
    /// for hosts where PID 1's is not readable, or not the reference.
    File(PathBuf),
}

impl CgroupNamespace {
    /// As the flag and the configuration file write it.
    pub fn describe(&self) -> String {
        match self {
            CgroupNamespace::Host => "host".to_owned(),
            CgroupNamespace::Inherit => "inherit".to_owned(),
            CgroupNamespace::File(path) => path.display().to_string(),
        }
    }

    /// `host`, `inherit`, or the absolute path of a namespace file.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "host" => Some(CgroupNamespace::Host),
            "inherit" => Some(CgroupNamespace::Inherit),
            p if p.starts_with('/') => Some(CgroupNamespace::File(PathBuf::from(p))),
            _ => None,
        }
    }
}

/// The value parser of `--cgroup-namespace` / `TESSERA_CGROUP_NAMESPACE`.
pub fn parse_arg(s: &str) -> Result<CgroupNamespace, String> {
    CgroupNamespace::parse(s).ok_or_else(|| {
        format!("`{s}`: write host, inherit, or the absolute path of a cgroup namespace file")
    })
}

/// What `enter` found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The agent already shares the host's cgroup namespace: paths match the policy's.
    AlreadyHost { namespace: u64 },
    /// `host` (or a file): the agent left `from` for the host's namespace.
    Entered { from: u64, host: u64 },
    /// `inherit` in a namespace that is not the host's: paths will not match the policy's.
    Differs { own: u64, host: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupNsError {
    #[error(
        "--cgroup-namespace: cannot read the cgroup namespace {}: {source}; for `host` the agent \
         needs to see the host's PID 1 (hostPID: true) and CAP_SYS_PTRACE, or name a namespace \
         file it can read (--cgroup-namespace /proc/PID/ns/cgroup)",
        path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--cgroup-namespace: cannot enter the host's cgroup namespace (setns CLONE_NEWCGROUP on \
         {}): {source}; the agent needs CAP_SYS_ADMIN (or run it with --cgroup-namespace inherit \
         in the host's namespace)",
        path.display()
    )]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "--cgroup-namespace: after setns the agent is in cgroup namespace {now}, not the \
         host's {host}"
    )]
    NotEntered { now: u64, host: u64 },
    #[error(
        "--cgroup-namespace host must be applied before the async runtime starts (it is per \
         thread); call cli::run::before_runtime first"
    )]
    TooLate,
}

const HOST_NS: &str = "/proc/1/ns/cgroup";
const OWN_NS: &str = "/proc/thread-self/ns/cgroup";
/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, fixed since Linux 4.6):
/// the reference for `inherit` when PID 1's namespace cannot be read.
const INITIAL_NS_INODE: u64 = 0xEFFF_FFFB;

/// The outcome of the `enter` done before the runtime started, for `report`.
static ENTERED: OnceLock<Outcome> = OnceLock::new();

fn inode(path: &Path) -> Result<u64, CgroupNsError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupNsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Applies `mode`. Call it on the main thread before any other thread is started (before the
/// tokio runtime is built); the outcome is kept for `report`.
pub fn enter(mode: &CgroupNamespace) -> Result<Outcome, CgroupNsError> {
    let host_ns = match mode {
        CgroupNamespace::File(path) => path.as_path(),
        _ => Path::new(HOST_NS),
    };
    let outcome = enter_at(mode, host_ns, Path::new(OWN_NS))?;
    let _ = ENTERED.set(outcome.clone());
    Ok(outcome)
}

fn enter_at(
    mode: &CgroupNamespace,
    host_ns: &Path,
    own_ns: &Path,
) -> Result<Outcome, CgroupNsError> {
    let own = inode(own_ns)?;
    let host = match inode(host_ns) {
        Ok(host) => host,
        // PID 1 hidden (no hostPID, no ptrace access): compare with the initial namespace.
        Err(_) if *mode == CgroupNamespace::Inherit => INITIAL_NS_INODE,
        Err(e) => return Err(e),
    };
    if own == host {
        return Ok(Outcome::AlreadyHost { namespace: own });
    }
    if *mode == CgroupNamespace::Inherit {
        return Ok(Outcome::Differs { own, host });
    }
    let file = File::open(host_ns).map_err(|source| CgroupNsError::Read {
        path: host_ns.to_path_buf(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWCGROUP).map_err(|source| CgroupNsError::Setns {
        path: host_ns.to_path_buf(),
        source,
    })?;
    let now = inode(own_ns)?;
    if now != host {
        return Err(CgroupNsError::NotEntered { now, host });
    }
    Ok(Outcome::Entered { from: own, host })
}

/// Logs what `enter` did (once telemetry is up). Without an earlier `enter` (the daemon run
/// in-process, e.g. by a test), `inherit` is checked now and the others are refused.
pub fn report(mode: &CgroupNamespace) -> Result<Outcome, CgroupNsError> {
    let outcome = match ENTERED.get() {
        Some(outcome) => outcome.clone(),
        None if *mode != CgroupNamespace::Inherit => return Err(CgroupNsError::TooLate),
        None => enter(mode)?,
    };
    let mode = mode.describe();
    match &outcome {
        Outcome::AlreadyHost { namespace } => info!(
            %mode,
            namespace, "cgroup namespace: the host's (cgroup paths are the host's)"
        ),
        Outcome::Entered { from, host } => info!(
            %mode,
            from, host, "cgroup namespace: entered the host's (cgroup paths are the host's)"
        ),
        Outcome::Differs { own, host } => warn!(
            %mode,
            own,
            host,
            "cgroup namespace: the agent runs in a cgroup namespace of its own, so the cgroup \
             paths it reads in /proc will not match the policy's `cgroup:` paths (relative to \
             the host's cgroup v2 root); set --cgroup-namespace host (cgroupNamespace: host, \
             TESSERA_CGROUP_NAMESPACE=host)"
        ),
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        for text in ["host", "inherit", "/proc/123/ns/cgroup"] {
            let mode = parse_arg(text).expect("valid");
            assert_eq!(mode.describe(), text);
        }
        assert!(parse_arg("private").unwrap_err().contains("write host"));
        assert!(parse_arg("proc/1/ns/cgroup").is_err());
        assert_eq!(CgroupNamespace::default(), CgroupNamespace::Inherit);
    }

    #[test]
    fn the_same_namespace_is_the_host_s() {
        let own = Path::new("/proc/self/ns/cgroup");
        let outcome = enter_at(&CgroupNamespace::Host, own, own).expect("same namespace");
        assert!(
            matches!(outcome, Outcome::AlreadyHost { .. }),
            "{outcome:?}"
        );
    }

    #[test]
    fn an_unreadable_host_namespace_is_an_error_for_host_only() {
        let own = Path::new("/proc/self/ns/cgroup");
        let missing = Path::new("/nonexistent/ns/cgroup");
        // inherit compares with the initial namespace instead.
        let outcome = enter_at(&CgroupNamespace::Inherit, missing, own).expect("inherit");
        let own_inode = inode(own).expect("own namespace");
        if own_inode == INITIAL_NS_INODE {
            assert!(
                matches!(outcome, Outcome::AlreadyHost { .. }),
                "{outcome:?}"
            );
        } else {
            assert!(matches!(outcome, Outcome::Differs { .. }), "{outcome:?}");
        }
        let err = enter_at(&CgroupNamespace::Host, missing, own).unwrap_err();
        assert!(err.to_string().contains("hostPID"), "{err}");
    }

    #[test]
    fn a_different_namespace_is_reported_with_inherit() {
        // Two different nsfs inodes: the network and the cgroup namespace of this process.
        let own = Path::new("/proc/self/ns/cgroup");
        let other = Path::new("/proc/self/ns/net");
        let outcome = enter_at(&CgroupNamespace::Inherit, other, own).expect("inherit");
        assert!(matches!(outcome, Outcome::Differs { .. }), "{outcome:?}");
    }
}
