//! Map keys, map values and ring-buffer events shared by the kernel programs and the agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, and has no implicit padding, so its bytes mean the same
//! on both sides. Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`),
//! which is also how the kernel normalises an IPv4-mapped IPv6 destination.
#![no_std]

/// Map names, as the kernel programs declare them and the agent looks them up.
pub mod map_names {
    pub const ENDPOINTS_EXACT: &str = "ENDPOINTS_EXACT";
    pub const ENDPOINTS_CIDR: &str = "ENDPOINTS_CIDR";
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const RULES: &str = "RULES";
    pub const PROCESS_GRANTS: &str = "PROCESS_GRANTS";
    pub const WORKLOAD_GRANTS: &str = "WORKLOAD_GRANTS";
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_DROPS: &str = "EVENT_DROPS";
    pub const SOCKET_TAGS: &str = "SOCKET_TAGS";
    pub const PROCESS_IDENTITY: &str = "PROCESS_IDENTITY";
    pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
    pub const DENY_LOSSES: &str = "DENY_LOSSES";
    pub const PROCESS_INSTANCE: &str = "PROCESS_INSTANCE";
    pub const ATTACHED_CGROUP: &str = "ATTACHED_CGROUP";
    pub const WORKLOAD_CGROUPS: &str = "WORKLOAD_CGROUPS";
    pub const WORKLOAD_CGROUP_IDS: &str = "WORKLOAD_CGROUP_IDS";
    pub const CONNECTIONS: &str = "CONNECTIONS";
}

/// Program names (the Rust function names in `tessera-ebpf`).
pub mod program_names {
    pub const SOCK_CREATE: &str = "tessera_sock_create";
    pub const SOCK_RELEASE: &str = "tessera_sock_release";
    pub const CONNECT4: &str = "tessera_connect4";
    pub const CONNECT6: &str = "tessera_connect6";
    pub const SENDMSG4: &str = "tessera_sendmsg4";
    pub const SENDMSG6: &str = "tessera_sendmsg6";
    pub const PROCESS_EXIT: &str = "tessera_process_exit";
    pub const SOCKET_SYSCALL: &str = "tessera_socket_syscall";
    pub const PROCESS_EXEC: &str = "tessera_process_exec";
    pub const PROCESS_FORK: &str = "tessera_process_fork";
    /// cgroup_skb egress and ingress: the packet-drop fallback of connection ending.
    pub const CONNECTION_EGRESS: &str = "tessera_connection_egress";
    pub const CONNECTION_INGRESS: &str = "tessera_connection_ingress";
}

/// Map capacities. The agent refuses a policy that needs more entries than these.
pub mod capacity {
    pub const ENDPOINTS_EXACT: u32 = 262_144;
    pub const ENDPOINTS_CIDR: u32 = 262_144;
    pub const WORKLOADS: u32 = 65_536;
    pub const RULES: u32 = 262_144;
    pub const PROCESS_GRANTS: u32 = 65_536;
    pub const WORKLOAD_GRANTS: u32 = 65_536;
    pub const SOCKET_TAGS: u32 = 131_072;
    /// Sockets connected under a credential (`CONNECTIONS`).
    pub const CONNECTIONS: u32 = 65_536;
    /// Attested processes (and, briefly, threads: see `ProcessIdentity`).
    pub const PROCESS_IDENTITY: u32 = 131_072;
    /// Instance markers: attested processes, their children, and threads (as identities).
    pub const PROCESS_INSTANCE: u32 = 131_072;
    /// Workload cgroups a tracing program can test the caller against on kernels whose tracing
    /// programs lack `bpf_get_current_ancestor_cgroup_id` (before 5.14), deepest first.
    pub const WORKLOAD_CGROUPS: u32 = 64;
    /// Ring buffer of `ProcessEvent`s (exec of a process the agent must attest).
    pub const PROCESS_EVENTS_BYTES: u32 = 1 << 18;
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 22;
    /// Backlog at which the kernel wakes the agent: only the event whose record crosses it
    /// forces a wakeup; every other is submitted without one (the agent polls every 50 ms and,
    /// once awake, reads until the ring is empty). So a consumer that falls behind never makes
    /// each event pay a wakeup (an IPI: microseconds on a VM), on the connect path.
    pub const EVENTS_WAKEUP_BYTES: u64 = 1 << 16;
    /// The span of backlog, from `EVENTS_WAKEUP_BYTES`, in which one event's record lands as it
    /// crosses: the record and its 8-byte ring-buffer header.
    pub const EVENTS_WAKEUP_WINDOW: u64 = (core::mem::size_of::<super::DecisionEvent>() + 8) as u64;
    /// Backlog past which allows are no longer queued (counted as drops), so the rest of the
    /// ring is kept for denies: the last eighth.
    pub const EVENTS_ALLOW_LIMIT_BYTES: u64 = EVENTS_BYTES as u64 - (EVENTS_BYTES as u64 >> 3);
    /// Distinct denies whose events could not be queued, counted until the agent reads them.
    pub const DENY_LOSSES: u32 = 16_384;
}

/// Ancestor levels the kernel walks to find the workload of a cgroup (the deepest match wins).
pub const MAX_CGROUP_DEPTH: u32 = 32;
/// Grant slots per process: one per endpoint the process holds a credential for.
pub const GRANT_SLOTS: usize = 8;

/// `WorkloadKey::uid` that matches every uid.
pub const ANY_UID: u32 = u32::MAX;
/// `WorkloadKey::cgroup_id` that matches every cgroup.
pub const ANY_CGROUP: u64 = 0;
/// `EndpointKey::port` that matches every port.
pub const ANY_PORT: u16 = 0;
/// Marks an absent workload, rule or endpoint id in an event.
pub const NONE_ID: u32 = u32::MAX;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// `DecisionEvent::protocol` of a refused raw IP or packet socket (`IPPROTO_RAW`).
pub const PROTO_RAW: u8 = 255;

pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// `Config::mode_override` values: the `--mode` flag of `tessera run`.
pub const MODE_OVERRIDE_NONE: u32 = 0;
pub const MODE_OVERRIDE_ENFORCE: u32 = 1;
pub const MODE_OVERRIDE_AUDIT: u32 = 2;

/// `RuleValue::flags`: the rule requires a credential.
pub const RULE_CREDENTIAL_REQUIRED: u32 = 1;
/// `RuleValue::flags`: `connections: outlive`, the rule's connections outlive their credential
/// (the packet-drop fallback lets their packets pass).
pub const RULE_CONNECTIONS_OUTLIVE: u32 = 2;

/// `WorkloadValue::flags`: the workload is restricted (it is in a rule or has an egress
/// allow-list): it may not create raw IP or packet sockets.
pub const WORKLOAD_RESTRICTED: u32 = 1;
/// `WorkloadValue::flags`: `egress: allowlist`, a destination no endpoint covers is denied.
pub const WORKLOAD_EGRESS_ALLOWLIST: u32 = 2;
/// `WorkloadValue::flags`: the workload's document is in audit mode; applies to the denies
/// that no rule or endpoint covers (raw/packet sockets, unlisted egress).
pub const WORKLOAD_MODE_AUDIT: u32 = 4;
/// `WorkloadValue::flags`: below this cgroup (for this uid), a workload chosen by selectors the
/// kernel cannot see (exe, exeSha256, gid, groups, systemd unit, container, Kubernetes) may
/// apply: a caller without a current `PROCESS_IDENTITY` entry is not yet attested, and a
/// protected endpoint denies it (`REASON_IDENTITY_PENDING`) until the agent has attested it.
/// An entry with only this flag has `workload_id` `NONE_ID`.
pub const WORKLOAD_NEEDS_ATTEST: u32 = 8;
/// The `WORKLOAD_*` flags a `ProcessIdentity` carries over to the decision.
pub const WORKLOAD_DECISION_FLAGS: u32 =
    WORKLOAD_RESTRICTED | WORKLOAD_EGRESS_ALLOWLIST | WORKLOAD_MODE_AUDIT;

/// `ProcessIdentity::flags`: the identity depends on the executable (some workload that could
/// match the process has an `exe` or `exeSha256` selector): an exec drops it.
pub const IDENTITY_EXE_DEPENDENT: u32 = 1 << 16;

/// `Config::flags`: some workload has an egress allow-list (else an unprotected destination
/// is allowed after the endpoint lookup alone).
pub const CONFIG_EGRESS_ALLOWLIST: u32 = 1;
/// `Config::flags`: some workload is restricted.
pub const CONFIG_RESTRICTED: u32 = 2;
/// `Config::flags`: some workload needs the agent's attestation: every exec below the attach
/// point is sent to the agent (`PROCESS_EVENTS`).
pub const CONFIG_ATTEST_EXEC: u32 = 4;

/// `GrantSlot::state` values.
pub const GRANT_EMPTY: u32 = 0;
pub const GRANT_ACTIVE: u32 = 1;
pub const GRANT_REVOKED: u32 = 2;

/// `GrantSlot::flags`: `bind: process-tree`: children forked after issuance inherit the slot
/// (in the kernel, at fork), and an exec keeps it.
pub const GRANT_TREE: u32 = 1;
/// `GrantSlot::flags`: `keepOnExec: true`: an exec keeps this `bind: process` slot.
pub const GRANT_KEEP_ON_EXEC: u32 = 2;

pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
/// cgroup/sock_create: a raw IP socket (the event has no destination: unspecified address
/// of the socket's family, port 0, `NONE_ID` endpoint).
pub const HOOK_SOCK_CREATE: u8 = 5;
/// The syscalls/sys_enter_socket tracepoint: a packet socket (no destination either).
pub const HOOK_SOCKET_SYSCALL: u8 = 6;
/// Not a kernel hook: the agent ended a connection whose credential was revoked or expired
/// (decision records only; no event has it).
pub const HOOK_CONNECTION: u8 = 7;

/// `DecisionEvent::original`: how the address the caller gave differs from the decided `addr`
/// (the rest follows from the hook and `family`). As given (or IPv4-mapped, for an IPv6 hook
/// with family 4).
pub const ORIGINAL_AS_GIVEN: u8 = 0;
/// The unspecified address of the hook's family: `0.0.0.0`, `::`, or `::ffff:0.0.0.0` (IPv6
/// hook, family 4); decided as the loopback it reaches.
pub const ORIGINAL_UNSPECIFIED: u8 = 1;
/// An IPv4-compatible `::a.b.c.d`, decided as `a.b.c.d`.
pub const ORIGINAL_V4_COMPATIBLE: u8 = 2;

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

pub const REASON_CREDENTIAL_VALID: u8 = 1;
pub const REASON_ALLOWLISTED: u8 = 2;
pub const REASON_NO_CREDENTIAL: u8 = 3;
pub const REASON_CREDENTIAL_EXPIRED: u8 = 4;
pub const REASON_CREDENTIAL_REVOKED: u8 = 5;
pub const REASON_WORKLOAD_NOT_ALLOWED: u8 = 6;
pub const REASON_UNKNOWN_WORKLOAD: u8 = 7;
/// The workload has an egress allow-list and no endpoint covers the destination.
pub const REASON_EGRESS_NOT_ALLOWLISTED: u8 = 8;
/// A restricted workload tried to create a raw IP socket.
pub const REASON_RAW_SOCKET_REFUSED: u8 = 9;
/// A restricted workload tried to create a packet (AF_PACKET, AF_XDP) socket.
pub const REASON_PACKET_SOCKET_REFUSED: u8 = 10;
/// The caller may belong to a workload chosen by selectors only the agent can check, and the
/// agent has not attested it yet (since its exec, setuid or cgroup move).
pub const REASON_IDENTITY_PENDING: u8 = 11;

/// Exact endpoint match: `ENDPOINTS_EXACT` key. `port` in host byte order; `ANY_PORT` for
/// an endpoint without ports. `protocol` is `PROTO_TCP` or `PROTO_UDP` (an endpoint with
/// `protocol: any` has one entry for each).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// CIDR endpoint match: the data of an `ENDPOINTS_CIDR` LPM-trie key. The prefix always
/// covers `protocol`, `_pad` and `port` (32 bits), then the address prefix: an IPv4 /n is
/// `32 + 96 + n` bits, an IPv6 /n is `32 + n`. `port` in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointCidrKey {
    pub protocol: u8,
    pub _pad: u8,
    pub port_be: u16,
    pub addr: [u8; 16],
}

/// Bits of `EndpointCidrKey` before the address.
pub const CIDR_KEY_HEADER_BITS: u32 = 32;

/// What an endpoint lookup finds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    pub endpoint_id: u32,
    /// Mode of the policy that declared the endpoint: used for denies that no rule covers
    /// (`unknown_workload`, `workload_not_allowed`).
    pub mode: u32,
}

/// `WORKLOADS` key: a workload is found by an ancestor cgroup id of the caller (or
/// `ANY_CGROUP`) and its uid (or `ANY_UID`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub cgroup_id: u64,
    pub uid: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadValue {
    pub workload_id: u32,
    /// `WORKLOAD_*` flags.
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub workload_id: u32,
    pub endpoint_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    pub rule_id: u32,
    /// `RULE_CREDENTIAL_REQUIRED`
    pub flags: u32,
    /// `MODE_ENFORCE` or `MODE_AUDIT`
    pub mode: u32,
    pub _pad: u32,
}

/// One credential's grant in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GrantSlot {
    /// Kernel boot clock (`bpf_ktime_get_boot_ns`); valid while later than now.
    pub expires_at_ns: u64,
    /// The agent's id for the credential (maps to its `jti`); never the token.
    pub credential_id: u64,
    pub endpoint_id: u32,
    /// The workload the holder was attested as: the grant applies only while the caller
    /// still maps to this workload.
    pub workload_id: u32,
    /// `GRANT_EMPTY`, `GRANT_ACTIVE` or `GRANT_REVOKED`
    pub state: u32,
    /// `GRANT_TREE`, `GRANT_KEEP_ON_EXEC`.
    pub flags: u32,
}

/// `PROCESS_GRANTS` value, keyed by tgid (`u32`). Deleted in the kernel when the process exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProcessGrants {
    /// The `PROCESS_INSTANCE` marker of the process the slots were written for: they apply only
    /// while the caller's marker is this one (never 0), so a process that is given the pid of
    /// an exited holder cannot use a grant written for the holder, however late it was written.
    pub owner: u64,
    pub slots: [GrantSlot; GRANT_SLOTS],
}

/// `WORKLOAD_GRANTS` key (value: `GrantSlot`), for `bind: workload` credentials.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadGrantKey {
    pub workload_id: u32,
    pub endpoint_id: u32,
}

/// `PROCESS_IDENTITY` value, keyed by tgid: the workload the agent attested the process as.
/// It applies only while the caller's cgroup, uid and gid are still those attested (a cgroup
/// move, setuid or setgid makes it stale: the kernel falls back to `WORKLOADS`). Deleted when
/// the process exits; an exec deletes it when `IDENTITY_EXE_DEPENDENT` is set. A fork copies
/// it to the child (keyed by the child's pid: a thread's copy is deleted when the thread exits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProcessIdentity {
    pub cgroup_id: u64,
    /// `NONE_ID`: attested, and no workload.
    pub workload_id: u32,
    /// The workload's `WORKLOAD_*` decision flags, and `IDENTITY_*` flags.
    pub flags: u32,
    pub uid: u32,
    pub gid: u32,
}

/// `ProcessEvent::kind`: the process executed a file (sent when `CONFIG_ATTEST_EXEC` is set).
pub const PROCESS_EVENT_EXEC: u32 = 1;

/// One entry of the `PROCESS_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProcessEvent {
    pub cgroup_id: u64,
    pub tgid: u32,
    /// `PROCESS_EVENT_*`
    pub kind: u32,
}

/// `CONFIG[0]`
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// `MODE_OVERRIDE_*`
    pub mode_override: u32,
    /// Bumped by the agent on every policy sync; copied into events.
    pub policy_generation: u32,
    /// `CONFIG_*` flags, written with the policy.
    pub flags: u32,
    pub _pad: u32,
    /// The cgroup the programs are attached to (0: none). The socket-syscall tracepoint runs
    /// for every process on the host and acts only below this cgroup.
    pub attached_cgroup_id: u64,
}

/// `SOCKET_TAGS` value, keyed by socket cookie (`u64`): who created the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketTag {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
}

/// `CONNECTIONS` value, keyed by socket cookie (`u64`): a socket that connect4/connect6 let
/// connect under a valid credential, and the holder it counts on. Written by the kernel at the
/// connect (`decision_id` zero), completed by the agent with the decision's id, deleted at
/// sock_release or when the agent ends the connection. The agent ends it once the holder
/// (process `tgid`, or workload `workload_id` for a `bind: workload` grant) no longer holds a
/// valid grant for `endpoint_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnectionRecord {
    /// Kernel boot clock of the connect.
    pub connected_at_ns: u64,
    /// The credential the connect was allowed under.
    pub credential_id: u64,
    pub tgid: u32,
    pub workload_id: u32,
    pub endpoint_id: u32,
    pub rule_id: u32,
    /// The connect's decision id (UUID bytes), written by the agent; zero until then.
    pub decision_id: [u8; 16],
}

/// One decision, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecisionEvent {
    /// Kernel boot clock.
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    /// 0 when no grant was involved.
    pub credential_id: u64,
    pub socket_cookie: u64,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// tgid of the socket's creator (from `SOCKET_TAGS`); 0 when unknown.
    pub creator_tgid: u32,
    pub endpoint_id: u32,
    /// `NONE_ID` when the caller maps to no workload.
    pub workload_id: u32,
    /// `NONE_ID` when no rule covers the pair.
    pub rule_id: u32,
    pub policy_generation: u32,
    /// Host byte order.
    pub port: u16,
    /// `HOOK_*`
    pub hook: u8,
    /// `PROTO_*`
    pub protocol: u8,
    /// `VERDICT_*`: the policy's verdict. In audit mode a deny is still `VERDICT_DENY`.
    pub verdict: u8,
    /// `REASON_*`
    pub reason: u8,
    /// 1 when the verdict was enforced (a deny returned EPERM), 0 in audit mode.
    pub enforced: u8,
    /// 4 or 6: the family of the normalised destination.
    pub family: u8,
    /// Normalised destination, IPv4 as IPv4-mapped.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
    /// `ORIGINAL_*`: the address the caller gave, when the kernel decided another.
    pub original: u8,
    pub _pad: [u8; 3],
}

/// A deny whose `DecisionEvent` the full ring buffer could not take: the fields of the event
/// that say who was refused what (`DENY_LOSSES` key). Every such deny is counted under it, so
/// the decision log still accounts for each refused attempt.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LostDenyKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub endpoint_id: u32,
    pub workload_id: u32,
    pub rule_id: u32,
    pub policy_generation: u32,
    /// Host byte order.
    pub port: u16,
    pub hook: u8,
    pub protocol: u8,
    pub reason: u8,
    pub enforced: u8,
    pub family: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
    pub _pad2: u32,
}

/// How many denies of one `LostDenyKey` were lost, and when (`DENY_LOSSES` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostDenies {
    pub count: u64,
    /// Kernel boot clock.
    pub first_ns: u64,
    pub last_ns: u64,
    /// The credential of the last one (0: none).
    pub credential_id: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and arrays of integers,
    // and has no implicit padding (checked by the size tests below).
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointCidrKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for WorkloadKey {}
    unsafe impl aya::Pod for WorkloadValue {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for GrantSlot {}
    unsafe impl aya::Pod for ProcessGrants {}
    unsafe impl aya::Pod for WorkloadGrantKey {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SocketTag {}
    unsafe impl aya::Pod for ProcessIdentity {}
    unsafe impl aya::Pod for ProcessEvent {}
    unsafe impl aya::Pod for DecisionEvent {}
    unsafe impl aya::Pod for LostDenyKey {}
    unsafe impl aya::Pod for LostDenies {}
    unsafe impl aya::Pod for ConnectionRecord {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    /// The sum of the field sizes equals the struct size: no implicit padding.
    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<EndpointKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<EndpointCidrKey>(), 1 + 1 + 2 + 16);
        assert_eq!(size_of::<EndpointValue>(), 8);
        assert_eq!(size_of::<WorkloadKey>(), 16);
        assert_eq!(size_of::<WorkloadValue>(), 8);
        assert_eq!(size_of::<RuleKey>(), 8);
        assert_eq!(size_of::<RuleValue>(), 16);
        assert_eq!(size_of::<GrantSlot>(), 8 + 8 + 4 * 4);
        assert_eq!(size_of::<ProcessGrants>(), 8 + 32 * GRANT_SLOTS);
        assert_eq!(size_of::<WorkloadGrantKey>(), 8);
        assert_eq!(size_of::<Config>(), 4 * 4 + 8);
        assert_eq!(size_of::<SocketTag>(), 8 + 4 * 4);
        assert_eq!(size_of::<ProcessIdentity>(), 8 + 4 * 4);
        assert_eq!(size_of::<ProcessEvent>(), 8 + 4 + 4);
        assert_eq!(
            size_of::<DecisionEvent>(),
            4 * 8 + 9 * 4 + 2 + 6 + 16 + 16 + 4
        );
        assert_eq!(size_of::<LostDenyKey>(), 8 + 7 * 4 + 2 + 6 + 16 + 4);
        assert_eq!(size_of::<LostDenies>(), 4 * 8);
        assert_eq!(size_of::<ConnectionRecord>(), 2 * 8 + 4 * 4 + 16);
    }
}
