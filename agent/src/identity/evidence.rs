//! Evidence: everything about a process that workload selectors can use, read from procfs
//! while its pidfd is held, and trusted only once the pidfd is seen alive after the reads (as
//! [`attest`](super::attest) does): a recycled pid cannot slip in between.
//!
//! ids and groups from `/proc/PID/status`; the cgroup v2 path and what its layout says
//! (systemd units, container, Kubernetes pod: [`cgroup`]); the executable's path and SHA-256
//! ([`exe`]). Kubernetes metadata from the API server ([`super::k8s`]) is added by the caller.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::attest::{AttestError, field, pid_of, pidfd_alive, read};
use super::k8s::PodMetadata;
use super::spiffe::template::{Placeholder, RenderError, SpiffeIdTemplate};
use super::spiffe::{SpiffeId, TrustDomain};

pub mod cgroup;
pub mod exe;

pub use cgroup::{ContainerRef, ContainerRuntime, PodRef, QosClass, SystemdUnit, UnitKind};
pub use exe::{DEFAULT_MAX_HASH_BYTES, ExeHash, ExeHashCache};

/// A real and an effective id (uid or gid).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ids {
    pub real: u32,
    pub effective: u32,
}

/// The executable a process runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exe {
    /// As the process's mount namespace names it.
    pub path: String,
    /// The file was deleted (or replaced) after the process executed it.
    pub deleted: bool,
    pub hash: ExeHash,
}

/// Everything known about one process, read while its pidfd was alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// In the agent's pid namespace.
    pub pid: u32,
    pub comm: String,
    pub uid: Ids,
    pub gid: Ids,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// cgroup v2 path relative to the hierarchy root (`/` is the root).
    pub cgroup: String,
    /// The systemd units on the cgroup path, outermost first; the last is the process's unit.
    pub systemd_units: Vec<SystemdUnit>,
    /// `None` for a kernel thread, or when the agent may not read it.
    pub exe: Option<Exe>,
    /// The innermost container on the cgroup path.
    pub container: Option<ContainerRef>,
    /// The Kubernetes pod on the cgroup path (kubelet layout).
    pub pod: Option<PodRef>,
    /// The pod's metadata from the API server, when the agent watches it.
    pub kubernetes: Option<PodMetadata>,
}

impl Evidence {
    /// The innermost systemd unit: the one `systemctl status PID` names.
    pub fn systemd_unit(&self) -> Option<&SystemdUnit> {
        self.systemd_units.last()
    }

    /// The container's name in its pod (from the API server's container statuses).
    pub fn k8s_container_name(&self) -> Option<&str> {
        let id = &self.container.as_ref()?.id;
        self.kubernetes.as_ref()?.container_name(id)
    }

    /// The value a SPIFFE ID template's placeholder takes for this process.
    pub fn template_value(&self, p: &Placeholder) -> Option<String> {
        let k8s = self.kubernetes.as_ref();
        match p {
            // The caller's trust domain fills it.
            Placeholder::TrustDomain => None,
            Placeholder::Uid => Some(self.uid.real.to_string()),
            Placeholder::Gid => Some(self.gid.real.to_string()),
            Placeholder::SystemdUnit => self.systemd_unit().map(|u| u.name.clone()),
            Placeholder::Container => self.container.as_ref().map(|c| c.id.clone()),
            Placeholder::PodUid => self.pod.as_ref().map(|p| p.uid.clone()),
            Placeholder::Namespace => k8s.map(|m| m.namespace.clone()),
            Placeholder::ServiceAccount => k8s.map(|m| m.service_account.clone()),
            Placeholder::PodName => k8s.map(|m| m.name.clone()),
            Placeholder::ContainerName => self.k8s_container_name().map(str::to_owned),
            Placeholder::PodLabel(key) => k8s.and_then(|m| m.labels.get(key).cloned()),
        }
    }

    /// The SPIFFE ID `template` gives this process.
    pub fn spiffe_id(
        &self,
        template: &SpiffeIdTemplate,
        trust_domain: &TrustDomain,
    ) -> Result<SpiffeId, RenderError> {
        template.render(trust_domain, |p| self.template_value(p))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error(transparent)]
    Attest(#[from] AttestError),
    #[error("no process {pid}")]
    NoSuchProcess { pid: u32 },
    #[error("cannot open a pidfd for process {pid}")]
    PidfdOpen {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot read or make the kernel's instance marker of process {pid}: {message}")]
    Instance { pid: u32, message: String },
}

impl EvidenceError {
    /// The process went away during attestation: nothing to answer.
    pub fn is_exited(&self) -> bool {
        match self {
            EvidenceError::Attest(e) => e.is_exited(),
            EvidenceError::NoSuchProcess { .. } => true,
            EvidenceError::PidfdOpen { .. } | EvidenceError::Instance { .. } => false,
        }
    }
}

/// Reads evidence; holds the executable hash cache, so keep one per agent.
#[derive(Debug, Default)]
pub struct EvidenceReader {
    exe_hashes: ExeHashCache,
}

impl EvidenceReader {
    /// `max_exe_hash_bytes`: larger executables are not hashed ([`ExeHash::TooLarge`]).
    pub fn new(max_exe_hash_bytes: u64) -> Self {
        EvidenceReader {
            exe_hashes: ExeHashCache::new(max_exe_hash_bytes),
        }
    }

    pub fn exe_hashes(&self) -> &ExeHashCache {
        &self.exe_hashes
    }

    /// The evidence of the process `pidfd` refers to.
    pub fn read(&self, pidfd: &OwnedFd) -> Result<Evidence, EvidenceError> {
        self.read_with(pidfd, true)
    }

    /// As [`EvidenceReader::read`]; without `hash_exe` the executable is not hashed
    /// ([`ExeHash::NotComputed`]): the agent hashes only for a policy that selects by hash.
    pub fn read_with(&self, pidfd: &OwnedFd, hash_exe: bool) -> Result<Evidence, EvidenceError> {
        let pid = pid_of(pidfd)?;
        let evidence = self.read_proc(pid, hash_exe);
        // Whatever the reads found, they count only if the process is still the one we hold.
        if !pidfd_alive(pidfd) {
            return Err(AttestError::Exited.into());
        }
        match evidence {
            // Alive, yet no /proc entry: this /proc belongs to another pid namespace.
            Err(AttestError::Exited) => Err(AttestError::PidNotVisible.into()),
            other => Ok(other?),
        }
    }

    /// The evidence of process `pid` (in the agent's pid namespace), held by a pidfd meanwhile.
    pub fn read_pid(&self, pid: u32) -> Result<Evidence, EvidenceError> {
        let pidfd = open_pidfd(pid)?;
        self.read(&pidfd)
    }

    fn read_proc(&self, pid: u32, hash_exe: bool) -> Result<Evidence, AttestError> {
        let status_path = PathBuf::from(format!("/proc/{pid}/status"));
        let status = read(&status_path)?;
        let parse_err = |field| AttestError::Parse {
            path: status_path.clone(),
            field,
        };
        let uid = ids(&status, "Uid:").ok_or_else(|| parse_err("Uid:"))?;
        let gid = ids(&status, "Gid:").ok_or_else(|| parse_err("Gid:"))?;
        let groups = groups(&status).ok_or_else(|| parse_err("Groups:"))?;

        let cgroup_file = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let cgroup = read(&cgroup_file)?
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
            .ok_or(AttestError::NoCgroupV2 { pid })?;
        let facts = cgroup::parse(&cgroup);

        let comm = read(Path::new(&format!("/proc/{pid}/comm")))?
            .trim_end_matches('\n')
            .to_owned();
        let exe = exe::exe_path(pid).map(|(path, deleted)| Exe {
            path,
            deleted,
            hash: if hash_exe {
                self.exe_hashes.hash_of(pid)
            } else {
                ExeHash::NotComputed
            },
        });
        Ok(Evidence {
            pid,
            comm,
            uid,
            gid,
            groups,
            cgroup,
            systemd_units: facts.units,
            exe,
            container: facts.container,
            pod: facts.pod,
            kubernetes: None,
        })
    }
}

/// A pidfd for `pid`.
pub fn open_pidfd(pid: u32) -> Result<OwnedFd, EvidenceError> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or(EvidenceError::NoSuchProcess { pid })?;
    rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).map_err(|e| {
        if e == rustix::io::Errno::SRCH {
            EvidenceError::NoSuchProcess { pid }
        } else {
            EvidenceError::PidfdOpen {
                pid,
                source: e.into(),
            }
        }
    })
}

/// A `Uid:`/`Gid:` line: "real effective saved fs".
fn ids(status: &str, name: &str) -> Option<Ids> {
    let mut it = field(status, name)?.split_whitespace();
    Some(Ids {
        real: it.next()?.parse().ok()?,
        effective: it.next()?.parse().ok()?,
    })
}

/// The `Groups:` line: supplementary gids, possibly none.
fn groups(status: &str) -> Option<Vec<u32>> {
    field(status, "Groups:")?
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests;
