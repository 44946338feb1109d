//! The kernel side of the agent: loads and attaches Tessera's eBPF programs, writes the
//! policy and grant maps, and reads decision events.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::os::fd::AsRawFd as _;

use aya::{
    Ebpf, EbpfError,
    maps::{
        Array, CgroupArray, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap,
        RingBuf,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        TracePoint, cgroup_skb::CgroupSkbLinkId, cgroup_sock::CgroupSockLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId,
    },
};
use tessera_common::{
    Config, EndpointCidrKey, EndpointKey, EndpointValue, LostDenies, LostDenyKey,
    MODE_OVERRIDE_AUDIT, MODE_OVERRIDE_ENFORCE, MODE_OVERRIDE_NONE, RuleKey, RuleValue,
    WorkloadKey, WorkloadValue, map_names, program_names,
};
use tracing::{debug, info};

use crate::policy::PolicySet;

mod compile;
mod connections;
mod dynamic;
mod events;
mod grants;
mod identity;
pub mod ids;
mod local;
mod pin;
mod pinfs;
mod scope;
mod stats;
mod sync;
mod system;
mod tracefs;

pub use compile::{CompiledPolicy, SyncWarning, compile, workload_flags};
pub use connections::{
    ConnectionMaps, EndMechanism, EndedSocket, Lapse, LapsedConnection, SocketEnder, Survey,
    probe_mechanism,
};
pub use dynamic::{CONTESTED_ENDPOINT_ID, EndpointEntries, HeldEntry, kernel_endpoint_id};
pub use events::{EventReader, RingReader, decode as decode_decision_event};
pub use grants::GrantMaps;
pub use identity::{Identities, decode_process_event};
pub use ids::{IdsError, KernelIds};
pub use local::addresses::{AddressWatch, current as host_addresses};
pub use local::{HostAddresses, LocalEntries};
pub use pin::{Adoption, RuntimeEntries};
pub use pinfs::{PIN_ROOT, pin_dir, uninstall};
pub use stats::{BpfStatsGuard, ProgramStats, enable_bpf_stats};
pub use sync::SyncReport;
pub use system::{boot_time_ns, cgroup_id, cgroup2_root};
pub use tracefs::tracing_ancestors;

/// The kernel programs, built by agent/build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tessera"));

const SOCK_PROGRAMS: [&str; 2] = [program_names::SOCK_CREATE, program_names::SOCK_RELEASE];
/// The packet-drop fallback of connection ending, attached only where it is in use.
const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    (
        program_names::CONNECTION_EGRESS,
        CgroupSkbAttachType::Egress,
    ),
    (
        program_names::CONNECTION_INGRESS,
        CgroupSkbAttachType::Ingress,
    ),
];
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("parsing or creating the maps of the eBPF object failed")]
    Object(#[source] EbpfError),
    /// The source's Display carries the verifier log when the kernel refused the program.
    #[error("eBPF program {program} could not be loaded or attached")]
    Program {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no program {0}: rebuild the agent")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}: rebuild the agent")]
    MissingMap(&'static str),
    #[error(
        "tessera run needs Linux {}.{} or later, and this is {}.{}: its fork, exec and exit hooks \
         must keep enforcing while no agent runs, and this kernel cannot pin a tracepoint's link \
         (BPF_LINK_CREATE for perf events came in 5.15). Nothing was loaded or changed",
        floor.0, floor.1, found.0, found.1
    )]
    KernelTooOld {
        found: (u32, u32),
        floor: (u32, u32),
    },
    #[error(
        "the maps pinned in {} were made by another version of Tessera ({map} has {}-byte keys \
         and {}-byte values; this version uses {} and {}). Those pinned programs still enforce. \
         To change versions run `tessera uninstall --cgroup <the attach point>` (which ends \
         enforcement there until this agent is ready) and start this agent again; processes then \
         ask for their credentials again",
        dir.display(), found.0, found.1, want.0, want.1
    )]
    IncompatiblePins {
        dir: PathBuf,
        map: &'static str,
        found: (u32, u32),
        want: (u32, u32),
    },
    #[error("map {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mounting {fs} at {} failed: run as root or mount it yourself", path.display())]
    Mount {
        fs: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading {} failed", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo): mount cgroup2 first")]
    NoCgroup2,
    #[error("the policy needs {needed} entries in {map}, which holds at most {capacity}")]
    PolicyTooLarge {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("mode override {0} is not one of MODE_OVERRIDE_NONE, _ENFORCE, _AUDIT")]
    InvalidModeOverride(u32),
    #[error("process {tgid} holds too many credentials ({slots} at once): end one first")]
    TooManyGrants { tgid: u32, slots: usize },
    #[error("the decision event ring buffer was already taken")]
    EventsTaken,
    #[error("enabling BPF run-time statistics failed")]
    Stats(#[source] aya::sys::SyscallError),
    #[error("a kernel map lock was poisoned by a panic elsewhere")]
    Poisoned,
    #[error("pinning {} failed", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the link of eBPF program {program} cannot be pinned")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("the programs are not attached to a cgroup: attach them first")]
    NotAttached,
    #[error("the programs are not pinned: a policy swap needs `Enforcer::open_pinned`")]
    NotPinned,
}

/// The policy maps, written together by `sync_policy`.
struct PolicyMaps {
    exact: HashMap<MapData, EndpointKey, EndpointValue>,
    cidr: LpmTrie<MapData, EndpointCidrKey, EndpointValue>,
    workloads: HashMap<MapData, WorkloadKey, WorkloadValue>,
    rules: HashMap<MapData, RuleKey, RuleValue>,
    config: Array<MapData, Config>,
    /// The attach point, for tracing programs (`ATTACHED_CGROUP`).
    attached: CgroupArray<MapData>,
    /// The workload cgroups, deepest first, and their ids (`WORKLOAD_CGROUPS`, `_IDS`).
    cgroups: CgroupArray<MapData>,
    cgroup_ids: Array<MapData, u64>,
    /// Resolved host addresses in `exact`, kept across policy syncs.
    dynamic: dynamic::DynamicEntries,
    /// The policy as compiled, before the local-endpoint entries (`local::expand`) are added.
    static_policy: CompiledPolicy,
    /// The host's interface addresses those entries cover, kept across policy syncs.
    host: HostAddresses,
}

impl PolicyMaps {
    /// Takes `compiled` as the static policy and returns what the maps should hold: it with
    /// its local-endpoint entries (for the host addresses held) and the resolved hosts' claims.
    fn expand_and_merge(&mut self, compiled: &CompiledPolicy) -> CompiledPolicy {
        self.static_policy = compiled.clone();
        let expanded = local::expand(compiled, &self.host);
        self.dynamic.merge(&expanded)
    }
}

/// One attachment to a cgroup, kept so that `detach` can undo it.
enum Attachment {
    Sock(&'static str, CgroupSockLinkId),
    SockAddr(&'static str, CgroupSockAddrLinkId),
    Skb(&'static str, CgroupSkbLinkId),
}

/// Tessera's loaded programs and maps. Dropping it detaches and unloads everything.
pub struct Enforcer {
    ebpf: Ebpf,
    policy: Arc<Mutex<PolicyMaps>>,
    drops: PerCpuArray<MapData, u64>,
    deny_losses: PerCpuHashMap<MapData, LostDenyKey, LostDenies>,
    grants: GrantMaps,
    connections: ConnectionMaps,
    identities: Identities,
    events: Option<RingBuf<MapData>>,
    process_events: Option<RingBuf<MapData>>,
    attachments: Vec<Attachment>,
    cgroup: Option<PathBuf>,
    /// Set when the programs are pinned in bpffs (`open_pinned`): they outlive the agent.
    pins: Option<pin::PinState>,
}

impl Enforcer {
    /// Loads every program (the verifier runs here) and attaches the process-exit tracepoint,
    /// mounting bpffs and tracefs first when they are absent. Attaches nothing to cgroups.
    pub fn load() -> Result<Enforcer, KernelError> {
        system::ensure_mounted()?;
        let offsets = tracefs::globals();
        let mut ebpf = tracefs::loader(&offsets)
            .load(PROGRAMS)
            .map_err(KernelError::Object)?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSock = program(&mut ebpf, name)?;
            prog.load().map_err(program_error(name))?;
        }
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(program_error(name))?;
        }
        for (name, _) in SKB_PROGRAMS {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load().map_err(program_error(name))?;
        }
        for (name, category, event) in pin::TRACEPOINTS {
            let tp: &mut TracePoint = program(&mut ebpf, name)?;
            tp.load().map_err(program_error(name))?;
            tp.attach(category, event).map_err(program_error(name))?;
        }

        let mut policy = PolicyMaps {
            exact: take_map(&mut ebpf, map_names::ENDPOINTS_EXACT)?,
            cidr: take_map(&mut ebpf, map_names::ENDPOINTS_CIDR)?,
            workloads: take_map(&mut ebpf, map_names::WORKLOADS)?,
            rules: take_map(&mut ebpf, map_names::RULES)?,
            config: take_map(&mut ebpf, map_names::CONFIG)?,
            attached: take_map(&mut ebpf, map_names::ATTACHED_CGROUP)?,
            cgroups: take_map(&mut ebpf, map_names::WORKLOAD_CGROUPS)?,
            cgroup_ids: take_map(&mut ebpf, map_names::WORKLOAD_CGROUP_IDS)?,
            dynamic: dynamic::DynamicEntries::default(),
            static_policy: CompiledPolicy::default(),
            host: HostAddresses::default(),
        };
        policy
            .config
            .set(0, Config::default(), 0)
            .map_err(map_error(map_names::CONFIG))?;
        let grants = GrantMaps::new(
            take_map(&mut ebpf, map_names::PROCESS_GRANTS)?,
            take_map(&mut ebpf, map_names::WORKLOAD_GRANTS)?,
        );
        let connections = ConnectionMaps::new(take_map(&mut ebpf, map_names::CONNECTIONS)?);
        let drops = take_map(&mut ebpf, map_names::EVENT_DROPS)?;
        let deny_losses = take_map(&mut ebpf, map_names::DENY_LOSSES)?;
        let events = Some(take_map(&mut ebpf, map_names::EVENTS)?);
        let process_events = Some(take_map(&mut ebpf, map_names::PROCESS_EVENTS)?);
        let identities = Identities::new(
            take_map(&mut ebpf, map_names::PROCESS_IDENTITY)?,
            take_map(&mut ebpf, map_names::PROCESS_INSTANCE)?,
        );
        info!("eBPF programs loaded");
        Ok(Enforcer {
            ebpf,
            policy: Arc::new(Mutex::new(policy)),
            drops,
            deny_losses,
            grants,
            connections,
            identities,
            events,
            process_events,
            attachments: Vec::new(),
            cgroup: None,
            pins: None,
        })
    }

    /// Attaches the socket and sock_addr programs to `cgroup` (and so to its subtree), next to
    /// any programs already there. Attaching again first detaches from the previous cgroup.
    ///
    /// aya attaches through BPF links (kernel 5.7+), which the kernel always runs alongside the
    /// cgroup's other programs and which refuse attach flags: hence `Single`, which sends none.
    /// (On older kernels aya falls back to BPF_PROG_ATTACH, where `Single` is exclusive.)
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        self.detach()?;
        let dir = std::fs::File::open(cgroup).map_err(|source| KernelError::Io {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let attached_id = cgroup_id(cgroup)?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
            let link = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            self.attachments.push(Attachment::Sock(name, link));
        }
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let link = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            self.attachments.push(Attachment::SockAddr(name, link));
        }
        self.set_attached_cgroup(attached_id)?;
        {
            let mut maps = self.policy.lock().map_err(|_| KernelError::Poisoned)?;
            maps.attached
                .set(0, dir.as_raw_fd(), 0)
                .map_err(map_error(map_names::ATTACHED_CGROUP))?;
        }
        info!(cgroup = %cgroup.display(), "eBPF programs attached");
        self.cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// Attaches the packet-drop programs (cgroup_skb egress and ingress) to the cgroup the
    /// others are attached to; detached with them.
    pub fn attach_packet_drop(&mut self) -> Result<(), KernelError> {
        let Some(cgroup) = self.cgroup.clone() else {
            return Err(KernelError::NotAttached);
        };
        let dir = std::fs::File::open(&cgroup).map_err(|source| KernelError::Io {
            path: cgroup.clone(),
            source,
        })?;
        for (name, attach_type) in SKB_PROGRAMS {
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            let link = prog
                .attach(&dir, attach_type, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            self.attachments.push(Attachment::Skb(name, link));
        }
        Ok(())
    }

    /// `Config::attached_cgroup_id`: where the socket-syscall tracepoint acts (0: nowhere).
    fn set_attached_cgroup(&self, id: u64) -> Result<(), KernelError> {
        let mut maps = self.policy.lock().map_err(|_| KernelError::Poisoned)?;
        let config = &mut maps.config;
        let mut value = config.get(&0, 0).map_err(map_error(map_names::CONFIG))?;
        value.attached_cgroup_id = id;
        config
            .set(0, value, 0)
            .map_err(map_error(map_names::CONFIG))
    }

    /// Detaches from the cgroup (a no-op when not attached). The tracepoint stays.
    pub fn detach(&mut self) -> Result<(), KernelError> {
        while let Some(attachment) = self.attachments.pop() {
            match attachment {
                Attachment::Sock(name, link) => {
                    let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
                    prog.detach(link).map_err(program_error(name))?;
                }
                Attachment::SockAddr(name, link) => {
                    let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
                    prog.detach(link).map_err(program_error(name))?;
                }
                Attachment::Skb(name, link) => {
                    let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
                    prog.detach(link).map_err(program_error(name))?;
                }
            }
        }
        if let Some(cgroup) = self.cgroup.take() {
            self.set_attached_cgroup(0)?;
            let mut maps = self.policy.lock().map_err(|_| KernelError::Poisoned)?;
            ignore_missing(maps.attached.unset(0))
                .map_err(map_error(map_names::ATTACHED_CGROUP))?;
            drop(maps);
            info!(cgroup = %cgroup.display(), "eBPF programs detached");
        }
        Ok(())
    }

    /// The cgroup the programs are attached to.
    pub fn attached_cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// Compiles `policy` (workload cgroups resolved under `cgroup_root`) and writes it.
    pub fn sync_policy(
        &self,
        policy: &PolicySet,
        cgroup_root: &Path,
    ) -> Result<SyncReport, KernelError> {
        let mut compiled = compile(policy, |path| {
            let relative = path.trim_start_matches('/');
            cgroup_id(&cgroup_root.join(relative))
        });
        compiled.open_cgroups(cgroup_root);
        self.sync_compiled(&compiled)
    }

    /// Writes compiled map entries: new and changed keys first, then stale keys are removed,
    /// then the policy generation is bumped.
    pub fn sync_compiled(&self, compiled: &CompiledPolicy) -> Result<SyncReport, KernelError> {
        let mut maps = self.policy.lock().map_err(|_| KernelError::Poisoned)?;
        // Local-endpoint entries and resolved host addresses stay, re-derived from the new
        // static entries.
        let merged = maps.expand_and_merge(compiled);
        let report = sync::write(&mut maps, &merged)?;
        maps.dynamic.committed();
        debug!(generation = report.generation, "policy maps written");
        Ok(report)
    }

    /// `MODE_OVERRIDE_NONE`, `MODE_OVERRIDE_ENFORCE` or `MODE_OVERRIDE_AUDIT`.
    pub fn set_mode_override(&self, mode: u32) -> Result<(), KernelError> {
        if ![
            MODE_OVERRIDE_NONE,
            MODE_OVERRIDE_ENFORCE,
            MODE_OVERRIDE_AUDIT,
        ]
        .contains(&mode)
        {
            return Err(KernelError::InvalidModeOverride(mode));
        }
        let mut maps = self.policy.lock().map_err(|_| KernelError::Poisoned)?;
        let config = &mut maps.config;
        let mut value = config.get(&0, 0).map_err(map_error(map_names::CONFIG))?;
        value.mode_override = mode;
        config
            .set(0, value, 0)
            .map_err(map_error(map_names::CONFIG))
    }

    /// The run-time endpoint entries (resolved `hosts`), next to the synced policy.
    pub fn endpoint_entries(&self) -> EndpointEntries {
        EndpointEntries::new(self.policy.clone())
    }

    /// The host addresses that local endpoints are protected on, next to the synced policy.
    pub fn local_entries(&self) -> LocalEntries {
        LocalEntries::new(self.policy.clone())
    }

    /// The kernel's record of the sockets connected under a credential.
    pub fn connections(&self) -> ConnectionMaps {
        self.connections.clone()
    }

    pub fn grants(&self) -> GrantMaps {
        self.grants.clone()
    }

    /// The decision events; can be taken once.
    pub fn events(&mut self) -> Result<EventReader, KernelError> {
        self.events
            .take()
            .map(|ring| RingReader::new(ring, events::decode))
            .ok_or(KernelError::EventsTaken)
    }

    /// The exec notifications of processes to attest; can be taken once.
    pub fn process_events(
        &mut self,
    ) -> Result<RingReader<tessera_common::ProcessEvent>, KernelError> {
        self.process_events
            .take()
            .map(|ring| RingReader::new(ring, decode_process_event))
            .ok_or(KernelError::EventsTaken)
    }

    /// The attested identities the kernel decides with.
    pub fn identities(&self) -> Identities {
        self.identities.clone()
    }

    /// Events lost because the ring buffer was full, summed over CPUs.
    pub fn dropped_events(&self) -> Result<u64, KernelError> {
        let values = self
            .drops
            .get(&0, 0)
            .map_err(map_error(map_names::EVENT_DROPS))?;
        Ok(values.iter().sum())
    }

    /// Denies the ring buffer could not take, counted per key since the key was first counted
    /// (`DENY_LOSSES`, summed over CPUs; a count only grows while its entry lives).
    pub fn lost_denies(&self) -> Vec<(LostDenyKey, LostDenies)> {
        // An entry evicted or deleted mid-walk is skipped: the next walk sees what is left.
        self.deny_losses
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, sum_cpus(per_cpu.iter())))
            .collect()
    }

    /// Deletes the entries whose count is still the one given (all of them reported), so that
    /// the next agent does not report them again; an entry counted since is kept.
    pub fn forget_lost_denies(&mut self, reported: &[(LostDenyKey, u64)]) {
        for (key, count) in reported {
            let current = self
                .deny_losses
                .get(key, 0)
                .map(|v| sum_cpus(v.iter()).count);
            if current.is_ok_and(|c| c == *count) {
                let _ = self.deny_losses.remove(key);
            }
        }
    }

    /// Run counts and times of every program (zero unless BPF stats are enabled, see
    /// [`enable_bpf_stats`]).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, KernelError> {
        stats::collect(&self.ebpf)
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        if let Err(error) = self.detach() {
            tracing::warn!(error = %error, "detaching the eBPF programs failed");
        }
    }
}

/// One CPU-summed count: the earliest first, the latest last and its credential.
fn sum_cpus<'a>(values: impl Iterator<Item = &'a LostDenies>) -> LostDenies {
    let mut total = LostDenies {
        count: 0,
        first_ns: 0,
        last_ns: 0,
        credential_id: 0,
    };
    for v in values.filter(|v| v.count > 0) {
        total.count += v.count;
        if total.first_ns == 0 || v.first_ns < total.first_ns {
            total.first_ns = v.first_ns;
        }
        if v.last_ns >= total.last_ns {
            total.last_ns = v.last_ns;
            total.credential_id = v.credential_id;
        }
    }
    total
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, KernelError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    M::try_from(map).map_err(map_error(name))
}

fn program_error(program: &'static str) -> impl Fn(ProgramError) -> KernelError {
    move |source| KernelError::Program {
        program: program.to_owned(),
        source,
    }
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::Map { map, source }
}

/// Deleting a key that is already gone (a process exited, a concurrent removal) is success.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    /// The daemon shares these across tokio tasks.
    #[test]
    fn handles_cross_threads() {
        send::<Enforcer>();
        send::<EventReader>();
        send_sync::<GrantMaps>();
        send_sync::<Identities>();
        send_sync::<KernelError>();
    }
}
