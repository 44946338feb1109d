//! `Enricher`: a kernel `DecisionEvent` plus the policy, the credential registry, the agent's
//! attested evidence and /proc become a `DecisionRecord`.
//!
//! Records are written on the event loop: nothing here reads or hashes an executable. The
//! executable's hash and the pod's metadata come only from an [`EvidenceSource`] (what the agent
//! attested), and only when that evidence is about the process and cgroup the kernel saw (and,
//! for the hash, the executable `/proc/PID/exe` still names, while the process lives).
use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};
use tessera_common::{
    DecisionEvent, HOOK_CONNECT6, HOOK_SENDMSG6, ORIGINAL_UNSPECIFIED, ORIGINAL_V4_COMPATIBLE,
};
use tracing::warn;

use super::record::{
    CredentialRecord, DecisionMode, DecisionRecord, Destination, Hook, OriginalDestination,
    PodRecord, PolicyRecord, ProcessRecord, Protocol, Reason, SCHEMA, Verdict, WorkloadRecord,
};
use crate::identity::evidence::{Evidence, Exe, cgroup};
use crate::kernel::{CONTESTED_ENDPOINT_ID, KernelIds};
use crate::policy::{Mode, PolicySet};

/// What the decision log may say about an issued credential. Never the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRef {
    pub jti: String,
    pub expires_at: SystemTime,
    /// "process" or "workload".
    pub bind: &'static str,
}

/// The credential registry, as the enricher sees it.
pub trait CredentialLookup: Send + Sync {
    /// The credential with this kernel id (never 0), if the registry still knows it.
    fn lookup(&self, credential_id: u64) -> Option<CredentialRef>;
}

impl<F> CredentialLookup for F
where
    F: Fn(u64) -> Option<CredentialRef> + Send + Sync,
{
    fn lookup(&self, credential_id: u64) -> Option<CredentialRef> {
        self(credential_id)
    }
}

/// A registry that knows no credential (tests, tools without a credential service).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCredentials;

impl CredentialLookup for NoCredentials {
    fn lookup(&self, _credential_id: u64) -> Option<CredentialRef> {
        None
    }
}

/// What the agent attested about live processes, as the enricher sees it.
pub trait EvidenceSource: Send + Sync {
    /// The evidence last attested for process `tgid` (in the agent's pid namespace), if any.
    /// Called on the event loop for every record: answer from memory, never read a file.
    /// The enricher uses it only if its `pid` is `tgid` and its `cgroup` is the one the kernel
    /// saw; the source should still forget processes that exited (pid reuse) or exec'd.
    fn evidence(&self, tgid: u32) -> Option<Arc<Evidence>>;
}

impl<F> EvidenceSource for F
where
    F: Fn(u32) -> Option<Arc<Evidence>> + Send + Sync,
{
    fn evidence(&self, tgid: u32) -> Option<Arc<Evidence>> {
        self(tgid)
    }
}

/// A new decision id: a UUIDv7 (time-ordered to the millisecond) whose random bits come from
/// the thread's user-space CSPRNG. `Uuid::now_v7` asks the kernel (`getrandom(2)`) for them on
/// every call, a system call per record on the hot path; a decision id is a log key, not a
/// secret, so the thread generator is enough (a credential's `jti` still uses `now_v7`).
fn decision_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(ms, &random)
        .into_uuid()
        .to_string()
}

/// The endpoints whose resolved addresses claim a destination (`kernel::EndpointEntries`).
pub trait ClaimSource: Send + Sync {
    /// Names of the endpoints claiming `ip`:`port` for `protocol` (a `PROTO_*` code).
    fn claimants(&self, ip: IpAddr, port: u16, protocol: u8) -> Vec<String>;
}

impl ClaimSource for crate::kernel::EndpointEntries {
    fn claimants(&self, ip: IpAddr, port: u16, protocol: u8) -> Vec<String> {
        crate::kernel::EndpointEntries::claimants(self, ip, port, protocol)
    }
}

/// Turns kernel events into decision records.
pub struct Enricher {
    policy: Arc<PolicySet>,
    /// The kernel ids of `policy`'s workloads, endpoints and rules.
    ids: KernelIds,
    credentials: Arc<dyn CredentialLookup>,
    cgroup_root: PathBuf,
    /// Wall clock minus boot clock, in ns, measured once: the boot clock does not jump, so
    /// every event converts the same way (a later wall-clock step is not followed).
    boot_to_wall_ns: i128,
    mode_override: Option<Mode>,
    /// Attested evidence (exe hash, pod metadata); without it, records carry what /proc and the
    /// cgroup path tell.
    evidence: Option<Arc<dyn EvidenceSource>>,
    /// Who claims a contested destination (see [`with_claims`](Self::with_claims)).
    claims: Option<Arc<dyn ClaimSource>>,
    /// cgroup id → its path and what the path tells, learnt once per cgroup: a cgroup v2
    /// directory cannot be renamed and its id (the inode number) is never reused, so the entry
    /// stays true for as long as the id is seen, and no event reads /proc or stats a directory
    /// for a cgroup already known.
    cgroup_paths: Mutex<HashMap<u64, Arc<KnownCgroup>>>,
}

/// A cgroup whose path was checked against its id, and the facts its path tells.
#[derive(Debug)]
struct KnownCgroup {
    path: String,
    systemd_unit: Option<String>,
    container: Option<String>,
    pod_uid: Option<String>,
}

impl KnownCgroup {
    fn new(path: String) -> Self {
        let facts = cgroup::parse(&path);
        KnownCgroup {
            systemd_unit: facts.innermost_unit().map(|u| u.name.clone()),
            container: facts.container.map(|c| c.id),
            pod_uid: facts.pod.map(|p| p.uid),
            path,
        }
    }
}

/// Bound on the cgroup path cache; it is cleared when full (cgroups are few on a host).
const CGROUP_CACHE_MAX: usize = 4096;

impl Enricher {
    /// `cgroup_root` is where the cgroup v2 hierarchy is mounted (cgroup ids are the inode
    /// numbers of its directories).
    pub fn new(
        policy: Arc<PolicySet>,
        credentials: Arc<dyn CredentialLookup>,
        cgroup_root: PathBuf,
    ) -> Self {
        Self {
            ids: KernelIds::of(&policy),
            policy,
            credentials,
            cgroup_root,
            boot_to_wall_ns: measure_boot_to_wall_ns(),
            mode_override: None,
            evidence: None,
            claims: None,
            cgroup_paths: Mutex::new(HashMap::new()),
        }
    }

    /// The mode `tessera run --mode` forces on every rule (None: each rule's own).
    pub fn with_mode_override(mut self, mode: Option<Mode>) -> Self {
        self.mode_override = mode;
        self
    }

    /// Where to find the agent's attested evidence of a process (kept by
    /// [`with_policy`](Self::with_policy)).
    pub fn with_evidence(mut self, source: Arc<dyn EvidenceSource>) -> Self {
        self.evidence = Some(source);
        self
    }

    /// Where to find which endpoints contest a destination denied as contested (kept by
    /// [`with_policy`](Self::with_policy)).
    pub fn with_claims(mut self, source: Arc<dyn ClaimSource>) -> Self {
        self.claims = Some(source);
        self
    }

    /// The same enricher (clock offset, credentials, evidence, cache) for a newly loaded policy.
    pub fn with_policy(&self, policy: Arc<PolicySet>) -> Self {
        let cache = self
            .cgroup_paths
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        Self {
            ids: KernelIds::of(&policy),
            policy,
            credentials: Arc::clone(&self.credentials),
            cgroup_root: self.cgroup_root.clone(),
            boot_to_wall_ns: self.boot_to_wall_ns,
            mode_override: self.mode_override,
            evidence: self.evidence.clone(),
            claims: self.claims.clone(),
            cgroup_paths: Mutex::new(cache),
        }
    }

    /// The wall-clock time of a kernel boot-clock timestamp.
    pub fn wall_time(&self, boot_ns: u64) -> SystemTime {
        let wall_ns = i128::from(boot_ns) + self.boot_to_wall_ns;
        u64::try_from(wall_ns)
            .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns))
            .unwrap_or(UNIX_EPOCH)
    }

    pub fn enrich(&self, ev: &DecisionEvent) -> DecisionRecord {
        let policy = &*self.policy;
        let verdict = Verdict::from_code(ev.verdict);
        let reason = Reason::from_code(ev.reason);
        let hook = Hook::from_code(ev.hook);
        let protocol = Protocol::from_code(ev.protocol);
        if reason == Reason::Unknown || hook == Hook::Unknown || protocol == Protocol::Unknown {
            warn!(
                reason = ev.reason,
                hook = ev.hook,
                protocol = ev.protocol,
                "decision event with a code this agent does not know; is the kernel program newer?"
            );
        }

        let workload = self
            .ids
            .workload_id(ev.workload_id)
            .map(|w| policy.workload(w));
        let endpoint = self
            .ids
            .endpoint_id(ev.endpoint_id)
            .map(|e| policy.endpoint(e));
        let rule = self.ids.rule_id(ev.rule_id).map(|r| policy.rule(r));
        let enforced = ev.enforced != 0;
        let mode = match (verdict, enforced) {
            (Verdict::Deny, false) => DecisionMode::Audit,
            (Verdict::Deny, true) => DecisionMode::Enforce,
            (Verdict::Allow, _) => self
                .mode_override
                .or(rule.map(|r| r.mode))
                .or(endpoint.map(|e| e.mode))
                .map_or(DecisionMode::Enforce, DecisionMode::from),
        };
        let credential = (ev.credential_id != 0)
            .then(|| self.credentials.lookup(ev.credential_id))
            .flatten()
            .map(|c| CredentialRecord {
                jti: c.jti,
                expires_at: c.expires_at,
                bind: c.bind.to_owned(),
            });
        let workload_cgroup = workload.and_then(|w| w.selectors.cgroup.as_deref());

        DecisionRecord {
            schema: SCHEMA.to_owned(),
            ts: self.wall_time(ev.timestamp_ns),
            decision_id: decision_id(),
            verdict,
            enforced,
            mode,
            reason,
            hook,
            protocol,
            destination: Destination {
                ip: destination_ip(ev),
                port: ev.port,
                endpoint: endpoint.map(|e| e.name.clone()),
                contested: match &self.claims {
                    Some(claims) if ev.endpoint_id == CONTESTED_ENDPOINT_ID => {
                        claims.claimants(destination_ip(ev), ev.port, ev.protocol)
                    }
                    _ => Vec::new(),
                },
                original: original_destination(ev),
            },
            process: self.process(ev, workload_cgroup),
            workload: workload.map(|w| WorkloadRecord {
                name: w.name.clone(),
                spiffe_id: w.spiffe_id.clone(),
            }),
            credential,
            policy: PolicyRecord {
                revision: policy.revision.clone(),
                rule: rule.map(|r| r.name.clone()),
            },
            connection: None,
        }
    }

    fn process(&self, ev: &DecisionEvent, workload_cgroup: Option<&str>) -> ProcessRecord {
        let known = self.cgroup(ev.tgid, ev.cgroup_id, workload_cgroup);
        let cgroup = known.as_deref().map(|k| k.path.as_str());
        let attested = self.attested(ev.tgid, cgroup);
        // A readlink, not a read: the one /proc look-up records make (the executable changes
        // on exec, which the event does not tell).
        let live_exe = fs::read_link(ProcPath::new(ev.tgid, "exe").as_path())
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        // Evidence from before an exec the source has not caught up with names another file.
        let attested_exe = attested
            .as_deref()
            .and_then(|e| e.exe.as_ref())
            .filter(|e| {
                live_exe
                    .as_deref()
                    .is_none_or(|live| same_file_name(live, e))
            });
        let pod = known
            .as_deref()
            .and_then(|k| k.pod_uid.as_ref())
            .map(|uid| {
                // Metadata only for the pod the cgroup path names.
                let meta = attested
                    .as_deref()
                    .and_then(|e| e.kubernetes.as_ref())
                    .filter(|m| &m.uid == uid);
                PodRecord {
                    namespace: meta.map(|m| m.namespace.clone()),
                    name: meta.map(|m| m.name.clone()),
                    service_account: meta.map(|m| m.service_account.clone()),
                    uid: uid.clone(),
                }
            });
        ProcessRecord {
            pid: ev.pid,
            tgid: ev.tgid,
            uid: ev.uid,
            gid: ev.gid,
            comm: comm_string(&ev.comm),
            exe: live_exe.or_else(|| attested_exe.map(exe_text)),
            exe_sha256: attested_exe.and_then(|e| e.hash.sha256().map(str::to_owned)),
            systemd_unit: known.as_deref().and_then(|k| k.systemd_unit.clone()),
            container: known.as_deref().and_then(|k| k.container.clone()),
            pod,
            cgroup: cgroup.map(str::to_owned),
        }
    }

    /// The source's evidence of `tgid`, if it is about that process in the cgroup the kernel
    /// saw (`cgroup`: the path of the event's cgroup id, checked against its inode).
    fn attested(&self, tgid: u32, cgroup: Option<&str>) -> Option<Arc<Evidence>> {
        let cgroup = cgroup?;
        self.evidence
            .as_ref()?
            .evidence(tgid)
            .filter(|e| e.pid == tgid && e.cgroup == cgroup)
    }

    /// The cgroup (relative to the root) whose id the kernel saw: known already, or learnt
    /// now from /proc/PID/cgroup (or the workload's cgroup) and trusted only when the
    /// directory's inode is that id: the process may have moved or exited, its pid reused.
    fn cgroup(
        &self,
        tgid: u32,
        cgroup_id: u64,
        workload_cgroup: Option<&str>,
    ) -> Option<Arc<KnownCgroup>> {
        if cgroup_id == 0 {
            return None;
        }
        if let Some(known) = self.cgroup_paths.lock().ok()?.get(&cgroup_id) {
            return Some(Arc::clone(known));
        }
        let found = fs::read_to_string(ProcPath::new(tgid, "cgroup").as_path())
            .ok()
            .and_then(|text| unified_cgroup(&text).map(str::to_owned))
            .filter(|p| self.cgroup_inode(p) == Some(cgroup_id))
            .or_else(|| {
                workload_cgroup
                    .filter(|p| self.cgroup_inode(p) == Some(cgroup_id))
                    .map(str::to_owned)
            })?;
        let known = Arc::new(KnownCgroup::new(found));
        let mut cache = self.cgroup_paths.lock().ok()?;
        if cache.len() >= CGROUP_CACHE_MAX {
            cache.clear();
        }
        cache.insert(cgroup_id, Arc::clone(&known));
        Some(known)
    }

    fn cgroup_inode(&self, relative: &str) -> Option<u64> {
        let dir = self.cgroup_root.join(relative.trim_start_matches('/'));
        fs::metadata(Path::new(&dir)).ok().map(|m| m.ino())
    }
}

/// `/proc/<tgid>/<name>` built on the stack (no allocation per record).
struct ProcPath {
    buf: [u8; 32],
    len: usize,
}

impl ProcPath {
    fn new(tgid: u32, name: &str) -> Self {
        use std::io::Write as _;
        let mut buf = [0u8; 32];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        // 6 + 10 digits + 1 + the name (at most "cgroup") always fit in 32 bytes.
        let _ = write!(cursor, "/proc/{tgid}/{name}");
        let len = usize::try_from(cursor.position()).unwrap_or(0);
        ProcPath { buf, len }
    }

    fn as_path(&self) -> &Path {
        use std::os::unix::ffi::OsStrExt as _;
        Path::new(std::ffi::OsStr::from_bytes(&self.buf[..self.len]))
    }
}

/// The cgroup v2 path from the text of /proc/PID/cgroup (its "0::" line).
fn unified_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether `readlink /proc/PID/exe` names the attested executable (deleted since, or not).
fn same_file_name(live: &str, exe: &Exe) -> bool {
    live.strip_suffix(" (deleted)").unwrap_or(live) == exe.path
}

/// The executable as `readlink /proc/PID/exe` shows it.
fn exe_text(exe: &Exe) -> String {
    if exe.deleted {
        format!("{} (deleted)", exe.path)
    } else {
        exe.path.clone()
    }
}

fn destination_ip(ev: &DecisionEvent) -> IpAddr {
    if ev.family == 4 {
        let [.., a, b, c, d] = ev.addr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(ev.addr))
    }
}

/// The address the caller gave, when the kernel says it decided another
/// (`DecisionEvent::original`).
fn original_destination(ev: &DecisionEvent) -> Option<OriginalDestination> {
    let ipv6_hook = matches!(ev.hook, HOOK_CONNECT6 | HOOK_SENDMSG6);
    let v4 = Ipv4Addr::new(ev.addr[12], ev.addr[13], ev.addr[14], ev.addr[15]);
    let ip = match (ev.original, ipv6_hook, ev.family) {
        (ORIGINAL_UNSPECIFIED, false, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (ORIGINAL_UNSPECIFIED, true, 4) => IpAddr::V6(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()),
        (ORIGINAL_UNSPECIFIED, true, _) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (ORIGINAL_V4_COMPATIBLE, _, _) => IpAddr::V6(v4.to_ipv6_compatible()),
        _ => return None,
    };
    Some(OriginalDestination { ip, port: ev.port })
}

fn comm_string(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// Wall clock minus boot clock, from the closest of a few (real, boot, real) samples.
fn measure_boot_to_wall_ns() -> i128 {
    let read = |clock| {
        clock_gettime(clock)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
    };
    let mut best: Option<(i128, i128)> = None; // (spread, offset)
    for _ in 0..5 {
        let (Ok(real1), Ok(boot), Ok(real2)) = (
            read(ClockId::CLOCK_REALTIME),
            read(ClockId::CLOCK_BOOTTIME),
            read(ClockId::CLOCK_REALTIME),
        ) else {
            continue;
        };
        let spread = real2 - real1;
        let offset = real1 + spread / 2 - boot;
        if best.is_none_or(|(s, _)| spread < s) {
            best = Some((spread, offset));
        }
    }
    match best {
        Some((_, offset)) => offset,
        None => {
            warn!("could not read CLOCK_REALTIME/CLOCK_BOOTTIME; decision timestamps will be off");
            0
        }
    }
}

#[cfg(test)]
mod tests;
