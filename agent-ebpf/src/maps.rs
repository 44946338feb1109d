//! The maps shared with the agent: names from `tessera_common::map_names` (the static's
//! identifier is the map name), sizes from `tessera_common::capacity`.

use aya_ebpf::{
    macros::map,
    maps::{
        Array, CgroupArray, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf,
    },
};
use tessera_common::{
    Config, ConnectionRecord, EndpointCidrKey, EndpointKey, EndpointValue, GrantSlot, LostDenies,
    LostDenyKey, ProcessGrants, ProcessIdentity, RuleKey, RuleValue, SocketTag, WorkloadGrantKey,
    WorkloadKey, WorkloadValue, capacity, map_names,
};

#[map]
pub static ENDPOINTS_EXACT: HashMap<EndpointKey, EndpointValue> =
    HashMap::with_max_entries(capacity::ENDPOINTS_EXACT, 0);

#[map]
pub static ENDPOINTS_CIDR: LpmTrie<EndpointCidrKey, EndpointValue> =
    LpmTrie::with_max_entries(capacity::ENDPOINTS_CIDR, 0);

#[map]
pub static WORKLOADS: HashMap<WorkloadKey, WorkloadValue> =
    HashMap::with_max_entries(capacity::WORKLOADS, 0);

#[map]
pub static RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(capacity::RULES, 0);

/// Keyed by tgid.
#[map]
pub static PROCESS_GRANTS: HashMap<u32, ProcessGrants> =
    HashMap::with_max_entries(capacity::PROCESS_GRANTS, 0);

#[map]
pub static WORKLOAD_GRANTS: HashMap<WorkloadGrantKey, GrantSlot> =
    HashMap::with_max_entries(capacity::WORKLOAD_GRANTS, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Index 0: events lost because the ring buffer was full.
#[map]
pub static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Denies whose event the full ring buffer could not take, counted per who/what; the agent
/// writes them to the decision log as `lost` records. Per CPU, so counting needs no atomics (the
/// agent sums the CPUs); LRU, so an agent that never reads them cannot stop the counting of new
/// ones (each loss is also in `EVENT_DROPS`).
#[map]
pub static DENY_LOSSES: LruPerCpuHashMap<LostDenyKey, LostDenies> =
    LruPerCpuHashMap::with_max_entries(capacity::DENY_LOSSES, 0);

/// Keyed by socket cookie. LRU, because a socket whose release we miss must not pin an entry.
#[map]
pub static SOCKET_TAGS: LruHashMap<u64, SocketTag> =
    LruHashMap::with_max_entries(capacity::SOCKET_TAGS, 0);

/// Keyed by socket cookie: the sockets connected under a credential, and the holder each counts
/// on (the agent ends them when that holder's credential is revoked or expires). LRU, like
/// `SOCKET_TAGS`: a release we miss must not pin an entry.
#[map]
pub static CONNECTIONS: LruHashMap<u64, ConnectionRecord> =
    LruHashMap::with_max_entries(capacity::CONNECTIONS, 0);

/// Keyed by tgid (and briefly by a new thread's id: see `identity::process_fork`).
#[map]
pub static PROCESS_IDENTITY: HashMap<u32, ProcessIdentity> =
    HashMap::with_max_entries(capacity::PROCESS_IDENTITY, 0);

/// Keyed by pid (tgid, or a thread's id): a marker of one task, never reused for another. The
/// fork hook sets a new task's (boot clock at fork) or deletes what an earlier holder of the pid
/// left; the exit hook deletes it; the agent inserts one (never replaces) for a process it
/// attests that has none. `ProcessGrants::owner` holds the marker the grants were written for.
#[map]
pub static PROCESS_INSTANCE: HashMap<u32, u64> =
    HashMap::with_max_entries(capacity::PROCESS_INSTANCE, 0);

/// Index 0: the attach point's cgroup, for `bpf_current_task_under_cgroup` (tracing programs
/// ask it whether the caller is below the attach point: it exists for them on every kernel).
#[map]
pub static ATTACHED_CGROUP: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// The cgroups of the policy's workloads (and of the ancestors marked for attestation),
/// deepest first, with their ids in `WORKLOAD_CGROUP_IDS` at the same index (0 ends the list):
/// how a tracing program finds the caller's workload where it cannot read ancestor ids.
#[map]
pub static WORKLOAD_CGROUPS: CgroupArray =
    CgroupArray::with_max_entries(capacity::WORKLOAD_CGROUPS, 0);

#[map]
pub static WORKLOAD_CGROUP_IDS: Array<u64> = Array::with_max_entries(capacity::WORKLOAD_CGROUPS, 0);

/// `ProcessEvent`s: execs the agent must attest.
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(capacity::PROCESS_EVENTS_BYTES, 0);

// The map names are the statics' identifiers: keep them equal to the names the agent looks up.
const _: () = {
    use crate::same;
    assert!(same(map_names::ENDPOINTS_EXACT, "ENDPOINTS_EXACT"));
    assert!(same(map_names::ENDPOINTS_CIDR, "ENDPOINTS_CIDR"));
    assert!(same(map_names::WORKLOADS, "WORKLOADS"));
    assert!(same(map_names::RULES, "RULES"));
    assert!(same(map_names::PROCESS_GRANTS, "PROCESS_GRANTS"));
    assert!(same(map_names::WORKLOAD_GRANTS, "WORKLOAD_GRANTS"));
    assert!(same(map_names::CONFIG, "CONFIG"));
    assert!(same(map_names::EVENTS, "EVENTS"));
    assert!(same(map_names::EVENT_DROPS, "EVENT_DROPS"));
    assert!(same(map_names::SOCKET_TAGS, "SOCKET_TAGS"));
    assert!(same(map_names::PROCESS_IDENTITY, "PROCESS_IDENTITY"));
    assert!(same(map_names::PROCESS_INSTANCE, "PROCESS_INSTANCE"));
    assert!(same(map_names::ATTACHED_CGROUP, "ATTACHED_CGROUP"));
    assert!(same(map_names::WORKLOAD_CGROUPS, "WORKLOAD_CGROUPS"));
    assert!(same(map_names::WORKLOAD_CGROUP_IDS, "WORKLOAD_CGROUP_IDS"));
    assert!(same(map_names::PROCESS_EVENTS, "PROCESS_EVENTS"));
    assert!(same(map_names::DENY_LOSSES, "DENY_LOSSES"));
    assert!(same(map_names::CONNECTIONS, "CONNECTIONS"));
};
