//! Attestation: what the kernel says about the process behind a pidfd (pid, real uid/gid, cgroup).
//!
//! Evidence is read from `/proc/<pid>` and only trusted once the pidfd is seen alive *after* the
//! reads: a live pidfd means the pid still names the same process, so a recycled pid cannot
//! slip in between.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// What the agent knows about a caller, read while its pidfd was alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessEvidence {
    /// Process id (the thread-group id) in the agent's pid namespace.
    pub pid: u32,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// cgroup v2 path relative to the hierarchy root, from the `0::` line of `/proc/PID/cgroup`.
    pub cgroup_path: String,
    pub comm: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("the calling process has exited")]
    Exited,
    #[error(
        "the caller's pid is not visible in the agent's pid namespace; run the agent in the host pid namespace"
    )]
    PidNotVisible,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no {field} line the agent understands")]
    Parse { path: PathBuf, field: &'static str },
    #[error(
        "process {pid} is in no cgroup v2 hierarchy (no `0::` line in /proc/{pid}/cgroup); Tessera needs cgroup v2"
    )]
    NoCgroupV2 { pid: u32 },
}

impl AttestError {
    /// The caller went away during attestation: nothing to answer.
    pub fn is_exited(&self) -> bool {
        matches!(self, AttestError::Exited)
    }
}

/// Reads the evidence of the process a pidfd refers to.
pub fn attest_pidfd(pidfd: &OwnedFd) -> Result<ProcessEvidence, AttestError> {
    let pid = pid_of(pidfd)?;

    let evidence = read_proc(pid);
    // Whatever the reads found, they count only if the process is still the one we hold.
    if !pidfd_alive(pidfd) {
        return Err(AttestError::Exited);
    }
    match evidence {
        // Alive, yet no /proc entry: this /proc belongs to another pid namespace.
        Err(AttestError::Exited) => Err(AttestError::PidNotVisible),
        other => other,
    }
}

/// True while the process behind `pidfd` runs: a pidfd turns readable when its process exits.
pub fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => false,
        Err(_) => false,
    }
}

/// True while the process behind `pidfd` (process `pid` in the agent's pid namespace) runs and
/// has not begun to exit: the check after writing a grant or an identity for it.
///
/// A pidfd turns readable only at the end of an exit, after the kernel's exit hook has removed
/// the process's grants and identity, so a write between the two would outlive the process and
/// pass to whoever gets its pid next. An exit sets `PF_EXITING` on the task before that hook
/// runs. Read after the write: either the flag is not set yet, and the hook runs after the write
/// and removes it; or it is, and the writer takes its write back. The flag is read first: a live
/// pidfd afterwards proves that `/proc/<pid>` was this process.
pub fn still_running(pidfd: &OwnedFd, pid: u32) -> bool {
    !exiting(pid) && pidfd_alive(pidfd)
}

/// `PF_EXITING` in the task flags (field 9 of `/proc/<pid>/stat`); an unreadable or unparsable
/// entry counts as exiting.
fn exiting(pid: u32) -> bool {
    const PF_EXITING: u32 = 0x4;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // `pid (comm) state ppid pgrp session tty_nr tpgid flags …`; comm may hold spaces and `)`.
    let flags = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_ascii_whitespace().nth(6))
        .and_then(|f| f.parse::<u32>().ok());
    flags.is_none_or(|f| f & PF_EXITING != 0)
}

fn read_proc(pid: u32) -> Result<ProcessEvidence, AttestError> {
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = read(&status_path)?;
    let uid = first_id(&status, "Uid:").ok_or_else(|| AttestError::Parse {
        path: status_path.clone(),
        field: "Uid:",
    })?;
    let gid = first_id(&status, "Gid:").ok_or_else(|| AttestError::Parse {
        path: status_path.clone(),
        field: "Gid:",
    })?;

    let cgroup_file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let cgroups = read(&cgroup_file)?;
    let cgroup_path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or(AttestError::NoCgroupV2 { pid })?;

    let comm_path = PathBuf::from(format!("/proc/{pid}/comm"));
    let comm = read(&comm_path)?.trim_end_matches('\n').to_owned();

    Ok(ProcessEvidence {
        pid,
        uid,
        gid,
        cgroup_path,
        comm,
    })
}

pub(super) fn read(path: &std::path::Path) -> Result<String, AttestError> {
    fs::read_to_string(path).map_err(|source| {
        // A vanished /proc entry means the process exited; the liveness check decides.
        if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
            AttestError::Exited
        } else {
            AttestError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

pub(super) fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// The pid a pidfd refers to, in the agent's pid namespace (its fdinfo's `Pid:`).
pub(super) fn pid_of(pidfd: &OwnedFd) -> Result<u32, AttestError> {
    let fdinfo = PathBuf::from(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()));
    let text = read(&fdinfo)?;
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok());
    match pid {
        Some(-1) => Err(AttestError::Exited),
        Some(0) => Err(AttestError::PidNotVisible),
        Some(p) => u32::try_from(p).map_err(|_| AttestError::Parse {
            path: fdinfo,
            field: "Pid:",
        }),
        None => Err(AttestError::Parse {
            path: fdinfo,
            field: "Pid:",
        }),
    }
}

/// The first (real) id of a `Uid:`/`Gid:` line: "real effective saved fs".
fn first_id(status: &str, name: &str) -> Option<u32> {
    field(status, name)?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{getgid, getpid, getuid};
    use std::process::{Command, Stdio};

    fn own_pidfd() -> OwnedFd {
        // pidfd_open, not SO_PEERPIDFD: the test runs on kernels before 6.5 too.
        crate::identity::evidence::open_pidfd(getpid().as_raw() as u32).expect("pidfd_open")
    }

    #[test]
    fn attests_this_process() {
        let pidfd = own_pidfd();
        assert!(pidfd_alive(&pidfd));
        let ev = attest_pidfd(&pidfd).expect("attest self");
        assert!(still_running(&pidfd, ev.pid));
        assert_eq!(ev.pid, getpid().as_raw() as u32);
        assert_eq!(ev.uid, getuid().as_raw());
        assert_eq!(ev.gid, getgid().as_raw());
        assert!(ev.cgroup_path.starts_with('/'), "{}", ev.cgroup_path);
        let own = fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        assert!(own.lines().any(|l| l == format!("0::{}", ev.cgroup_path)));
        assert!(!ev.comm.is_empty());
    }

    #[test]
    fn exited_process_is_refused() {
        // Another process's pidfd, from the peer of a unix socket that `curl` connects to.
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let child = Command::new("curl")
            .args(["-s", "--max-time", "30", "--unix-socket"])
            .arg(&sock)
            .arg("http://localhost/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            crate::testkit::skip("curl is not installed");
            return;
        };
        let (conn, _) = listener.accept().expect("accept");
        let pidfd = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerPidfd)
            .expect("SO_PEERPIDFD");
        assert!(pidfd_alive(&pidfd));
        let ev = attest_pidfd(&pidfd).expect("attest child");
        assert_eq!(ev.pid, child.id());
        assert_eq!(ev.comm, "curl");
        assert!(still_running(&pidfd, ev.pid));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(!pidfd_alive(&pidfd));
        assert!(!still_running(&pidfd, ev.pid));
        let err = attest_pidfd(&pidfd).expect_err("exited");
        assert!(err.is_exited(), "{err}");
    }

    #[test]
    fn a_pidfd_from_pidfd_open_attests_and_sees_the_exit() {
        // The fallback for kernels without SO_PEERPIDFD holds callers with pidfd_open.
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pidfd = crate::identity::evidence::open_pidfd(child.id()).expect("pidfd_open");
        let ev = attest_pidfd(&pidfd).expect("attest child");
        // (Not its comm: spawn may return before the child's exec.)
        assert_eq!(ev.pid, child.id());
        assert!(still_running(&pidfd, ev.pid));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(!pidfd_alive(&pidfd));
        assert!(!still_running(&pidfd, ev.pid));
        assert!(attest_pidfd(&pidfd).expect_err("exited").is_exited());
    }
}
