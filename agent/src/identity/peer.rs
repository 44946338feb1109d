//! Who is on the other end of a Workload API connection: a pidfd of the process that holds the
//! client end, taken at accept and proven before any evidence is read.
//!
//! From Linux 6.5 the kernel hands out that pidfd itself (`SO_PEERPIDFD`). Before, the agent
//! builds the same guarantee: the pid that connected (`SO_PEERCRED`), a pidfd for it
//! (`pidfd_open`), then proof that this very process holds the client end: the peer of the
//! server-side socket from `sock_diag` ([`sock_diag::peer_inode`]) found among the process's
//! `/proc/PID/fd` entries, with the pidfd alive after that scan. A pid that was recycled before
//! the pidfd was opened names a process that does not hold the socket, so it never answers for
//! the caller that exited.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt,
    sockopt::{PeerCredentials, PeerPidfd},
};
use nix::sys::stat::fstat;

use super::attest::pidfd_alive;
use super::evidence::{EvidenceError, open_pidfd};

pub mod sock_diag;

pub use sock_diag::SockDiagError;

/// The environment variable that chooses how callers are proven (for tests; see the README).
pub const METHOD_ENV: &str = "TESSERA_CALLER_PROOF";

/// How the Workload API learns who its caller is; chosen once at start by [`Method::choose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `SO_PEERPIDFD` (Linux 6.5 and later).
    PeerPidfd,
    /// `SO_PEERCRED` + `pidfd_open`, proven with `sock_diag` and `/proc/PID/fd`.
    SockDiag,
}

/// No method works: the Workload API cannot attest anyone, and says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// The caller of one connection, as taken at accept.
pub enum Caller {
    /// From `SO_PEERPIDFD`: the kernel's own pidfd of the connecting process.
    Kernel(OwnedFd),
    /// From `SO_PEERCRED` + `pidfd_open`: counts only once [`Caller::proven`] confirms it.
    Claimed {
        pidfd: OwnedFd,
        pid: u32,
        /// The inode of the agent's (server) end of the connection.
        server_inode: u32,
    },
    /// The caller could not be taken.
    Failed(PeerError),
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the calling process exited")]
    Exited,
    #[error(
        "process {pid}, which connected, no longer holds its end of the connection (it exited \
         and the pid was reused, or it handed the socket to another process): ask from the \
         process that connects"
    )]
    NotHolder { pid: u32 },
    #[error(
        "the caller's pid is not visible in the agent's pid namespace; run the agent in the host \
         pid namespace"
    )]
    PidNotVisible,
    #[error("cannot read the caller's peer credentials ({option})")]
    PeerOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a pidfd for the caller")]
    Pidfd(#[source] EvidenceError),
    #[error("cannot list {path}")]
    ProcFd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the caller's end of the connection")]
    SockDiag(#[from] SockDiagError),
    #[error("the Workload API cannot attest callers: {0}")]
    Unavailable(String),
}

impl PeerError {
    /// The caller is gone (or its pid names another process now): nobody to answer.
    pub fn is_exited(&self) -> bool {
        matches!(self, PeerError::Exited | PeerError::NotHolder { .. })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::PeerPidfd => "SO_PEERPIDFD",
            Method::SockDiag => "SO_PEERCRED + pidfd_open + sock_diag",
        })
    }
}

impl Method {
    /// Probes what this kernel offers, `SO_PEERPIDFD` first. `forced` is the value of
    /// [`METHOD_ENV`]: `auto` (or unset), `peer-pidfd`, `sock-diag`, or `none` (nothing works,
    /// to test how the API refuses).
    /// [`Method::choose`] as `METHOD_ENV` in the environment asks, said in the log: once at
    /// start, for the Workload API and the status.
    pub fn from_environment() -> Result<Method, Unavailable> {
        let forced = std::env::var(METHOD_ENV).ok();
        let method = Method::choose(forced.as_deref());
        match &method {
            Ok(m) => tracing::info!(
                method = %m,
                forced = forced.as_deref(),
                "Workload API callers are attested with this method"
            ),
            Err(why) => tracing::error!(
                reason = %why.0,
                "the Workload API cannot attest callers: every credential request is refused with 503"
            ),
        }
        method
    }

    pub fn choose(forced: Option<&str>) -> Result<Method, Unavailable> {
        let probe = |m: Method| m.probe().map(|()| m);
        match forced.unwrap_or("auto") {
            "auto" | "" => probe(Method::PeerPidfd).or_else(|pidfd| {
                probe(Method::SockDiag).map_err(|diag| {
                    Unavailable(format!(
                        "neither SO_PEERPIDFD ({pidfd}) nor the sock_diag proof ({diag}) works \
                         on this kernel"
                    ))
                })
            }),
            "peer-pidfd" => probe(Method::PeerPidfd).map_err(|e| Unavailable(error_chain(&e))),
            "sock-diag" => probe(Method::SockDiag).map_err(|e| Unavailable(error_chain(&e))),
            "none" => Err(Unavailable(format!("{METHOD_ENV}=none"))),
            other => Err(Unavailable(format!(
                "{METHOD_ENV}={other:?} is not one of auto, peer-pidfd, sock-diag, none; \
                 unset it to let the agent choose"
            ))),
        }
    }

    /// Takes and proves this process as the caller of one end of a socket pair.
    fn probe(self) -> Result<(), PeerError> {
        let (ours, _theirs) = UnixStream::pair().map_err(|source| PeerError::PeerOption {
            option: "socketpair",
            source,
        })?;
        let caller = Caller::take(self, &ours);
        if let Caller::Failed(e) = caller {
            return Err(e);
        }
        let pidfd = caller.proven()?;
        match super::attest::pid_of(pidfd) {
            Ok(pid) if pid == std::process::id() => Ok(()),
            _ => Err(PeerError::PidNotVisible),
        }
    }
}

impl Caller {
    /// Takes the caller of `stream` (the agent's end of an accepted connection) at once: the
    /// pidfd pins the process, whatever happens to its pid later.
    pub fn take(method: Method, stream: &impl AsFd) -> Caller {
        match method {
            Method::PeerPidfd => match getsockopt(stream, PeerPidfd) {
                Ok(pidfd) => Caller::Kernel(pidfd),
                // The connecting process is gone (its pid has no task any more).
                Err(Errno::ESRCH | Errno::EINVAL) => Caller::Failed(PeerError::Exited),
                Err(e) => Caller::Failed(PeerError::PeerOption {
                    option: "SO_PEERPIDFD",
                    source: e.into(),
                }),
            },
            Method::SockDiag => Self::claim(stream).unwrap_or_else(Caller::Failed),
        }
    }

    fn claim(stream: &impl AsFd) -> Result<Caller, PeerError> {
        let cred = getsockopt(stream, PeerCredentials).map_err(|e| PeerError::PeerOption {
            option: "SO_PEERCRED",
            source: e.into(),
        })?;
        // 0: the connecting process is in no pid namespace the agent can see.
        let pid = u32::try_from(cred.pid())
            .ok()
            .filter(|&p| p != 0)
            .ok_or(PeerError::PidNotVisible)?;
        let server_inode = socket_inode(stream)?;
        let pidfd = open_pidfd(pid).map_err(|e| {
            if e.is_exited() {
                PeerError::Exited
            } else {
                PeerError::Pidfd(e)
            }
        })?;
        Ok(Caller::Claimed {
            pidfd,
            pid,
            server_inode,
        })
    }

    /// The caller's pidfd, once it is proven to be the process on the other end.
    pub fn proven(&self) -> Result<&OwnedFd, PeerError> {
        match self {
            Caller::Kernel(pidfd) => Ok(pidfd),
            Caller::Failed(e) => Err(match e {
                PeerError::Exited => PeerError::Exited,
                PeerError::PidNotVisible => PeerError::PidNotVisible,
                other => PeerError::Unavailable(error_chain(other)),
            }),
            Caller::Claimed {
                pidfd,
                pid,
                server_inode,
            } => {
                // The caller closed its end: it is gone, or will never read an answer.
                let Some(client) = sock_diag::peer_inode(*server_inode)? else {
                    return Err(PeerError::Exited);
                };
                let held = holds_socket(*pid, client);
                // Whatever /proc said counts only if it was the process the pidfd holds.
                if !pidfd_alive(pidfd) {
                    return Err(PeerError::Exited);
                }
                match held {
                    Ok(true) => Ok(pidfd),
                    Ok(false) => Err(PeerError::NotHolder { pid: *pid }),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

/// An error with its sources, `: `-separated: the whole cause in one answer or log field.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The inode of a socket: how `sock_diag` and `/proc/PID/fd` (`socket:[INODE]`) name it.
pub fn socket_inode(socket: &impl AsFd) -> Result<u32, PeerError> {
    let st = fstat(socket.as_fd()).map_err(|e| PeerError::PeerOption {
        option: "fstat",
        source: e.into(),
    })?;
    // Socket inodes come from the kernel's 32-bit `get_next_ino`, as unix_diag reports them.
    u32::try_from(st.st_ino).map_err(|_| PeerError::PeerOption {
        option: "fstat",
        source: io::Error::other(format!("socket inode {} does not fit unix_diag", st.st_ino)),
    })
}

/// Whether process `pid` has socket `inode` open: one of its `/proc/PID/fd` entries links to
/// `socket:[INODE]`. Entries that vanish during the scan (closed fds) are skipped.
pub fn holds_socket(pid: u32, inode: u32) -> Result<bool, PeerError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(PeerError::Exited);
        }
        Err(source) => return Err(PeerError::ProcFd { path: dir, source }),
    };
    let want = format!("socket:[{inode}]");
    for entry in entries.flatten() {
        if let Ok(target) = fs::read_link(entry.path())
            && target.as_os_str().as_bytes() == want.as_bytes()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests;
