//! The agent's attestation service: reads a process's evidence, maps it to a workload with
//! every selector, and writes the answer to the kernel (`PROCESS_IDENTITY`) so that connect
//! decides with it. Runs for Workload API callers, at every exec below the attach point (when
//! the policy has workloads the kernel cannot tell apart by itself), for processes already
//! running when the agent starts, and for callers the kernel reported `identity_pending`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tessera_common::{IDENTITY_EXE_DEPENDENT, NONE_ID, ProcessIdentity};
use tracing::{debug, info, warn};

use super::attest::still_running;
use super::evidence::{Evidence, EvidenceError, EvidenceReader, open_pidfd};
use super::k8s::PodCache;
use crate::kernel::KernelIds;
use crate::kernel::{self, Identities};
use crate::policy::{PolicySet, WorkloadId};

/// How many processes' evidence the agent remembers for the decision log.
const RECENT_MAX: usize = 8192;

/// A process's evidence and the workload it maps to under `policy`.
#[derive(Clone, Debug)]
pub struct Attested {
    pub evidence: Arc<Evidence>,
    /// The policy that matched (use its ids with it).
    pub policy: Arc<PolicySet>,
    pub workload: Option<WorkloadId>,
    /// The process's `PROCESS_INSTANCE` marker, read before the evidence was confirmed alive
    /// (so it is this process's); 0 without a kernel side.
    pub instance: u64,
}

/// Where identities go in the kernel.
struct KernelSide {
    identities: Identities,
    /// The cgroup v2 mount: a cgroup's id is the inode of its directory.
    cgroup_root: PathBuf,
}

pub struct Attestor {
    reader: EvidenceReader,
    pods: PodCache,
    policy: RwLock<Arc<PolicySet>>,
    kernel: Option<KernelSide>,
    recent: Mutex<HashMap<u32, Arc<Evidence>>>,
}

impl Attestor {
    /// An attestor that only answers (tests, `tessera whoami`): nothing goes to the kernel.
    pub fn new(reader: EvidenceReader, pods: PodCache, policy: Arc<PolicySet>) -> Self {
        Attestor {
            reader,
            pods,
            policy: RwLock::new(policy),
            kernel: None,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Writes every attestation to the kernel's identities.
    pub fn with_kernel(mut self, identities: Identities, cgroup_root: PathBuf) -> Self {
        self.kernel = Some(KernelSide {
            identities,
            cgroup_root,
        });
        self
    }

    pub fn policy(&self) -> Arc<PolicySet> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The policy for attestations from now on; [`Attestor::reattest_all`] brings the
    /// identities already in the kernel up to date.
    pub fn set_policy(&self, policy: Arc<PolicySet>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// Attests the process behind `pidfd` and writes its identity to the kernel. An exec
    /// while attesting (the executable changed between the first read and the write) makes it
    /// start over, so that an identity of the old program never outlives it.
    pub fn attest_pidfd(&self, pidfd: &OwnedFd) -> Result<Attested, EvidenceError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let before = exe_file(pidfd);
            let attested = self.attest_once(pidfd)?;
            if exe_file(pidfd) == before || tries == 3 {
                return Ok(attested);
            }
            if let Some(kernel) = &self.kernel {
                let _ = kernel.identities.remove(attested.evidence.pid);
            }
        }
    }

    fn attest_once(&self, pidfd: &OwnedFd) -> Result<Attested, EvidenceError> {
        let policy = self.policy();
        let hash_exe = policy
            .workloads
            .iter()
            .any(|w| w.selectors.exe_sha256.is_some());
        // The marker first: the evidence read confirms, after it, that the pid was the caller's.
        let instance = match &self.kernel {
            Some(kernel) => {
                let pid = super::attest::pid_of(pidfd)?;
                kernel
                    .identities
                    .instance(pid)
                    .map_err(|e| EvidenceError::Instance {
                        pid,
                        message: e.to_string(),
                    })?
            }
            None => 0,
        };
        let mut evidence = self.reader.read_with(pidfd, hash_exe)?;
        if let Some(pod) = &evidence.pod {
            evidence.kubernetes = self.pods.get(&pod.uid);
        }
        let workload = policy.match_evidence(&evidence);
        let attested = Attested {
            evidence: Arc::new(evidence),
            policy,
            workload,
            instance,
        };
        self.write(&attested, pidfd);
        Ok(attested)
    }

    /// Attests process `pid` (in the agent's pid namespace).
    pub fn attest_pid(&self, pid: u32) -> Result<Attested, EvidenceError> {
        let pidfd = open_pidfd(pid)?;
        self.attest_pidfd(&pidfd)
    }

    /// Attests `pid` for a kernel event (an exec, a pending caller); failures are expected
    /// (the process may be gone) and only logged at debug level.
    pub fn refresh(&self, pid: u32, why: &'static str) {
        match self.attest_pid(pid) {
            Ok(a) => debug!(
                pid,
                why,
                workload = a.workload.map(|w| a.policy.workload(w).name.as_str()),
                "process attested"
            ),
            Err(e) => debug!(pid, why, error = %e, "process not attested"),
        }
    }

    /// The evidence last read for process `tgid`, if it is still that process's.
    pub fn evidence(&self, tgid: u32) -> Option<Arc<Evidence>> {
        self.recent.lock().ok()?.get(&tgid).cloned()
    }

    /// Attests every process in `cgroup` (relative to the cgroup v2 root, `/` for all) or
    /// below it; returns how many were attested.
    pub fn scan(&self, cgroup: &str) -> usize {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let mut count = 0;
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(path) = process_cgroup(pid) else {
                continue;
            };
            if !below(cgroup, &path) {
                continue;
            }
            if self.attest_pid(pid).is_ok() {
                count += 1;
            }
        }
        count
    }

    /// Attests again every process the kernel holds an identity for (after a policy reload),
    /// and drops the identities of processes that are gone.
    pub fn reattest_all(&self) {
        let Some(kernel) = &self.kernel else {
            return;
        };
        let keys = match kernel.identities.keys() {
            Ok(keys) => keys,
            Err(e) => {
                warn!(error = %e, "cannot list the attested identities");
                return;
            }
        };
        let (mut kept, mut dropped) = (0, 0);
        for tgid in keys {
            if is_process(tgid) && self.attest_pid(tgid).is_ok() {
                kept += 1;
            } else {
                let _ = kernel.identities.remove(tgid);
                self.forget(tgid);
                dropped += 1;
            }
        }
        info!(kept, dropped, "identities attested again");
    }

    /// Drops the identities (and remembered evidence) of processes that are gone: the kernel
    /// removes them at exit, but not those of threads whose creation copied one and that
    /// exec'd, nor what the agent wrote for a process that exited meanwhile.
    pub fn collect_garbage(&self) {
        if let Some(kernel) = &self.kernel {
            for tgid in kernel.identities.keys().unwrap_or_default() {
                if !is_process(tgid) {
                    let _ = kernel.identities.remove(tgid);
                }
            }
        }
        if let Ok(mut recent) = self.recent.lock() {
            recent.retain(|pid, _| is_process(*pid));
        }
    }

    fn forget(&self, tgid: u32) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.remove(&tgid);
        }
    }

    /// Remembers the evidence and writes the identity to the kernel; takes it back out if the
    /// process exited meanwhile (its pid could be reused).
    fn write(&self, a: &Attested, pidfd: &OwnedFd) {
        let ev = &a.evidence;
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() >= RECENT_MAX {
                recent.retain(|pid, _| is_process(*pid));
                if recent.len() >= RECENT_MAX {
                    recent.clear();
                }
            }
            recent.insert(ev.pid, a.evidence.clone());
        }
        let Some(kernel) = &self.kernel else {
            return;
        };
        let dir = kernel.cgroup_root.join(ev.cgroup.trim_start_matches('/'));
        let cgroup_id = match kernel::cgroup_id(&dir) {
            Ok(id) => id,
            Err(e) => {
                debug!(pid = ev.pid, error = %e, "the process's cgroup is gone");
                return;
            }
        };
        let identity = identity_of(a, cgroup_id);
        if let Err(e) = kernel.identities.put(ev.pid, identity) {
            warn!(pid = ev.pid, error = %e, "cannot write a process identity");
            return;
        }
        // Written for a process that is exiting: the exit hook may have run already.
        if !still_running(pidfd, ev.pid) {
            let _ = kernel.identities.remove(ev.pid);
            self.forget(ev.pid);
        }
    }
}

/// The kernel's view of an attestation.
fn identity_of(a: &Attested, cgroup_id: u64) -> ProcessIdentity {
    let ev = &a.evidence;
    let mut flags = 0;
    let mut workload_id = NONE_ID;
    if let Some(w) = a.workload {
        let in_rules = a.policy.rules.iter().any(|r| r.workloads.contains(&w));
        flags = kernel::workload_flags(a.policy.workload(w), in_rules);
        workload_id = KernelIds::of(&a.policy).workload(w);
    }
    if a.policy.depends_on_exe(ev) {
        flags |= IDENTITY_EXE_DEPENDENT;
    }
    ProcessIdentity {
        cgroup_id,
        workload_id,
        flags,
        uid: ev.uid.real,
        gid: ev.gid.real,
    }
}

/// The (device, inode) of the executable of the process behind `pidfd`, if readable.
fn exe_file(pidfd: &OwnedFd) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let pid = super::attest::pid_of(pidfd).ok()?;
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The cgroup v2 path of `pid` (`/proc/PID/cgroup`'s `0::` line).
fn process_cgroup(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Whether `tgid` is a live process (not a thread of another, not gone).
fn is_process(tgid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{tgid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .is_some_and(|t| t.trim() == tgid.to_string())
    })
}

/// Whether cgroup `path` is `ancestor` or below it (both relative to the root).
fn below(ancestor: &str, path: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    Path::new(path).starts_with(if ancestor.is_empty() { "/" } else { ancestor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_compares_whole_components() {
        assert!(below("/", "/a/b"));
        assert!(below("/a", "/a"));
        assert!(below("/a", "/a/b"));
        assert!(!below("/a", "/ab"));
        assert!(!below("/a/b", "/a"));
    }

    #[test]
    fn this_process_is_a_process_and_its_threads_are_not() {
        let me = std::process::id();
        assert!(is_process(me));
        let tid = std::thread::spawn(|| nix::unistd::gettid().as_raw() as u32)
            .join()
            .expect("thread");
        // The thread has exited by now: gone either way, never a process.
        assert!(!is_process(tid));
        assert!(process_cgroup(me).is_some_and(|c| c.starts_with('/')));
    }
}
