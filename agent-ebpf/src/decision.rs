//! The connect/sendmsg decision: destination → endpoint → workload → rule → grant → verdict,
//! and the decision event for every connection to a protected endpoint.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use tessera_common::{
    ANY_PORT, CIDR_KEY_HEADER_BITS, CONFIG_EGRESS_ALLOWLIST, ConnectionRecord, DecisionEvent,
    EndpointCidrKey, EndpointKey, EndpointValue, GRANT_ACTIVE, GRANT_REVOKED, GRANT_SLOTS,
    GrantSlot, HOOK_CONNECT4, HOOK_CONNECT6, LostDenies, LostDenyKey, MODE_AUDIT, MODE_ENFORCE,
    MODE_OVERRIDE_AUDIT, MODE_OVERRIDE_ENFORCE, NONE_ID, REASON_ALLOWLISTED,
    REASON_CREDENTIAL_EXPIRED, REASON_CREDENTIAL_REVOKED, REASON_CREDENTIAL_VALID,
    REASON_EGRESS_NOT_ALLOWLISTED, REASON_IDENTITY_PENDING, REASON_NO_CREDENTIAL,
    REASON_UNKNOWN_WORKLOAD, REASON_WORKLOAD_NOT_ALLOWED, RULE_CREDENTIAL_REQUIRED, RuleKey,
    VERDICT_ALLOW, VERDICT_DENY, WORKLOAD_EGRESS_ALLOWLIST, WORKLOAD_MODE_AUDIT, WorkloadGrantKey,
    WorkloadValue, capacity,
};

use crate::identity::{Caller, find_workload};
use crate::maps::{
    CONFIG, CONNECTIONS, DENY_LOSSES, ENDPOINTS_CIDR, ENDPOINTS_EXACT, EVENT_DROPS, EVENTS,
    PROCESS_GRANTS, PROCESS_INSTANCE, RULES, SOCKET_TAGS, WORKLOAD_GRANTS,
};

/// Return values of a cgroup sock_addr program.
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

/// A normalised destination: IPv4 (and IPv4-mapped IPv6) as IPv4-mapped, port in host order.
pub struct Destination {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

/// What the policy says about one connection, before the mode is applied.
pub struct Verdict {
    pub verdict: u8,
    pub reason: u8,
    /// The rule's mode, or the endpoint's (or the workload's) when no rule applies.
    pub mode: u32,
    pub workload_id: u32,
    pub rule_id: u32,
    pub credential_id: u64,
}

/// Decides one connect/sendmsg to `dest`; unprotected destinations return at once unless
/// some workload has an egress allow-list.
#[inline(always)]
pub fn decide(ctx: &SockAddrContext, hook: u8, dest: &Destination) -> i32 {
    let Some(endpoint) = find_endpoint(dest) else {
        return decide_unprotected(ctx, hook, dest);
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let tgid = (pid_tgid >> 32) as u32;

    let v = verdict(tgid, find_workload(uid_gid), &endpoint);

    let enforced = v.verdict == VERDICT_DENY && !is_audit(v.mode);
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Before `emit`, whose branches would each walk it again in the verifier.
    if (hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6) && v.reason == REASON_CREDENTIAL_VALID {
        record_connection(socket_cookie, tgid, endpoint.endpoint_id, &v);
    }
    emit(
        hook,
        dest,
        endpoint.endpoint_id,
        &v,
        socket_cookie,
        creator_of(socket_cookie),
        pid_tgid,
        uid_gid,
        enforced,
    );
    if enforced { DENY } else { ALLOW }
}

/// Remembers that the socket connects under `v`'s credential (a connected UDP socket too): the
/// agent ends it when the holder no longer holds a valid one.
#[inline(always)]
fn record_connection(socket_cookie: u64, tgid: u32, endpoint_id: u32, v: &Verdict) {
    let record = ConnectionRecord {
        connected_at_ns: unsafe { bpf_ktime_get_boot_ns() },
        credential_id: v.credential_id,
        tgid,
        workload_id: v.workload_id,
        endpoint_id,
        rule_id: v.rule_id,
        decision_id: [0; 16],
    };
    // A full map evicts the oldest record: that connection then outlives its credential.
    let _ = CONNECTIONS.insert(&socket_cookie, &record, 0);
}

/// A destination no endpoint covers: allowed, unless the caller's workload has an egress
/// allow-list. One array lookup when no workload has one.
#[inline(always)]
fn decide_unprotected(ctx: &SockAddrContext, hook: u8, dest: &Destination) -> i32 {
    match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_EGRESS_ALLOWLIST != 0 => {}
        _ => return ALLOW,
    }
    let uid_gid = bpf_get_current_uid_gid();
    // A caller still awaiting attestation is judged by its cgroup and uid here: egress
    // allow-lists of workloads the agent attests apply from its attestation on.
    let workload = find_workload(uid_gid).workload;
    if workload.flags & WORKLOAD_EGRESS_ALLOWLIST == 0 {
        return ALLOW;
    }
    let v = Verdict {
        verdict: VERDICT_DENY,
        reason: REASON_EGRESS_NOT_ALLOWLISTED,
        mode: workload_mode(&workload),
        workload_id: workload.workload_id,
        rule_id: NONE_ID,
        credential_id: 0,
    };
    let enforced = !is_audit(v.mode);
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    emit(
        hook,
        dest,
        NONE_ID,
        &v,
        socket_cookie,
        creator_of(socket_cookie),
        bpf_get_current_pid_tgid(),
        uid_gid,
        enforced,
    );
    if enforced { DENY } else { ALLOW }
}

/// Whether a deny under `mode` (`MODE_*`) is only logged, after `tessera run --mode`.
#[inline(always)]
pub fn is_audit(mode: u32) -> bool {
    match CONFIG.get(0).map(|c| c.mode_override) {
        Some(MODE_OVERRIDE_AUDIT) => true,
        Some(MODE_OVERRIDE_ENFORCE) => false,
        _ => mode == MODE_AUDIT,
    }
}

/// The mode of the workload's policy document (`MODE_*`).
#[inline(always)]
pub fn workload_mode(workload: &WorkloadValue) -> u32 {
    if workload.flags & WORKLOAD_MODE_AUDIT != 0 {
        MODE_AUDIT
    } else {
        MODE_ENFORCE
    }
}

#[inline(always)]
fn find_endpoint(dest: &Destination) -> Option<EndpointValue> {
    let mut key = EndpointKey {
        addr: dest.addr,
        port: dest.port,
        protocol: dest.protocol,
        _pad: 0,
    };
    if let Some(v) = ENDPOINTS_EXACT.get_ptr(&key) {
        return Some(unsafe { *v });
    }
    key.port = ANY_PORT;
    if let Some(v) = ENDPOINTS_EXACT.get_ptr(&key) {
        return Some(unsafe { *v });
    }
    let mut cidr = Key::new(
        CIDR_KEY_HEADER_BITS + 128,
        EndpointCidrKey {
            protocol: dest.protocol,
            _pad: 0,
            port_be: dest.port.to_be(),
            addr: dest.addr,
        },
    );
    if let Some(v) = ENDPOINTS_CIDR.get(&cidr) {
        return Some(*v);
    }
    cidr.data.port_be = ANY_PORT;
    ENDPOINTS_CIDR.get(&cidr).copied()
}

#[inline(always)]
fn verdict(tgid: u32, caller: Caller, endpoint: &EndpointValue) -> Verdict {
    let mut v = Verdict {
        verdict: VERDICT_DENY,
        reason: REASON_UNKNOWN_WORKLOAD,
        mode: endpoint.mode,
        workload_id: caller.workload.workload_id,
        rule_id: NONE_ID,
        credential_id: 0,
    };
    if caller.pending {
        // Fail closed until the agent has attested the caller (the event asks it to).
        v.reason = REASON_IDENTITY_PENDING;
        v.workload_id = NONE_ID;
        return v;
    }
    if v.workload_id == NONE_ID {
        return v;
    }
    let key = RuleKey {
        workload_id: v.workload_id,
        endpoint_id: endpoint.endpoint_id,
    };
    let Some(rule) = RULES.get_ptr(&key) else {
        v.reason = REASON_WORKLOAD_NOT_ALLOWED;
        return v;
    };
    let rule = unsafe { *rule };
    v.rule_id = rule.rule_id;
    v.mode = rule.mode;
    if rule.flags & RULE_CREDENTIAL_REQUIRED == 0 {
        v.verdict = VERDICT_ALLOW;
        v.reason = REASON_ALLOWLISTED;
        return v;
    }
    let mut check = GrantCheck::new(v.workload_id, endpoint.endpoint_id);
    check_grants(&mut check, tgid);
    v.reason = check.reason;
    v.credential_id = check.credential_id;
    if check.reason == REASON_CREDENTIAL_VALID {
        v.verdict = VERDICT_ALLOW;
    }
    v
}

/// Looks for a valid grant of process `tgid` (while it is the task its grants were written for),
/// then of the workload, for `check`'s (workload, endpoint).
#[inline(always)]
pub fn check_grants(check: &mut GrantCheck, tgid: u32) {
    if let Some(grants) = PROCESS_GRANTS.get_ptr(&tgid)
        && is_owner(tgid, unsafe { (*grants).owner })
    {
        let mut i = 0;
        while i < GRANT_SLOTS {
            // SAFETY: a map value pointer from a successful lookup; i < GRANT_SLOTS.
            let slot = unsafe { (*grants).slots[i] };
            if check.consider(&slot) {
                break;
            }
            i += 1;
        }
    }
    if check.reason != REASON_CREDENTIAL_VALID {
        let key = WorkloadGrantKey {
            workload_id: check.workload_id,
            endpoint_id: check.endpoint_id,
        };
        if let Some(slot) = WORKLOAD_GRANTS.get_ptr(&key) {
            check.consider(unsafe { &*slot });
        }
    }
}

/// Whether process `tgid` is the task its grants were written for (`owner`, its
/// `PROCESS_INSTANCE` marker): a process given the pid of an exited holder has another marker.
#[inline(always)]
fn is_owner(tgid: u32, owner: u64) -> bool {
    // SAFETY: a map value pointer from a successful lookup, read at once.
    owner != 0
        && PROCESS_INSTANCE
            .get_ptr(&tgid)
            .is_some_and(|m| unsafe { *m } == owner)
}

/// The most telling grant seen so far for one (workload, endpoint).
pub struct GrantCheck {
    now: u64,
    workload_id: u32,
    endpoint_id: u32,
    pub reason: u8,
    credential_id: u64,
}

impl GrantCheck {
    /// Nothing seen yet, at the boot clock's now.
    #[inline(always)]
    pub fn new(workload_id: u32, endpoint_id: u32) -> Self {
        GrantCheck {
            now: unsafe { bpf_ktime_get_boot_ns() },
            workload_id,
            endpoint_id,
            reason: REASON_NO_CREDENTIAL,
            credential_id: 0,
        }
    }

    /// Returns true once a valid grant is found.
    #[inline(always)]
    fn consider(&mut self, slot: &GrantSlot) -> bool {
        if slot.endpoint_id != self.endpoint_id || slot.workload_id != self.workload_id {
            return false;
        }
        if slot.state == GRANT_ACTIVE && slot.expires_at_ns > self.now {
            self.reason = REASON_CREDENTIAL_VALID;
            self.credential_id = slot.credential_id;
            return true;
        }
        if slot.state == GRANT_REVOKED {
            self.reason = REASON_CREDENTIAL_REVOKED;
            self.credential_id = slot.credential_id;
        } else if slot.state == GRANT_ACTIVE && self.reason == REASON_NO_CREDENTIAL {
            self.reason = REASON_CREDENTIAL_EXPIRED;
            self.credential_id = slot.credential_id;
        }
        false
    }
}

/// The tgid that created the socket (from `SOCKET_TAGS`), 0 when unknown.
#[inline(always)]
fn creator_of(socket_cookie: u64) -> u32 {
    match SOCKET_TAGS.get_ptr(&socket_cookie) {
        Some(tag) => unsafe { (*tag).tgid },
        None => 0,
    }
}

/// Sends one decision event; a full ring buffer counts a drop. `socket_cookie` is 0 when
/// there is no socket yet.
///
/// Denies come first: past `EVENTS_ALLOW_LIMIT_BYTES` of backlog an allow is dropped (and
/// counted) so the last eighth of the ring is left to denies, and a deny the ring cannot take
/// is counted in `DENY_LOSSES` under who was refused what, which the agent writes to the log.
/// So no refused attempt is missing from the decision log without a record that counts it.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "few call sites; inlined")]
pub fn emit(
    hook: u8,
    dest: &Destination,
    endpoint_id: u32,
    v: &Verdict,
    socket_cookie: u64,
    creator_tgid: u32,
    pid_tgid: u64,
    uid_gid: u64,
    enforced: bool,
) {
    let policy_generation = CONFIG.get(0).map_or(0, |c| c.policy_generation);
    let deny = v.verdict != VERDICT_ALLOW;
    if !deny && EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= capacity::EVENTS_ALLOW_LIMIT_BYTES {
        count_drop();
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DecisionEvent>(0) else {
        count_drop();
        if deny {
            count_lost_deny(
                &LostDenyKey {
                    cgroup_id: unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() },
                    tgid: (pid_tgid >> 32) as u32,
                    uid: uid_gid as u32,
                    gid: (uid_gid >> 32) as u32,
                    endpoint_id,
                    workload_id: v.workload_id,
                    rule_id: v.rule_id,
                    policy_generation,
                    port: dest.port,
                    hook,
                    protocol: dest.protocol,
                    reason: v.reason,
                    enforced: enforced as u8,
                    family: dest.family,
                    _pad: 0,
                    addr: dest.addr,
                    _pad2: 0,
                },
                v.credential_id,
            );
        }
        return;
    };
    entry.write(DecisionEvent {
        timestamp_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id: unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() },
        credential_id: v.credential_id,
        socket_cookie,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        creator_tgid,
        endpoint_id,
        workload_id: v.workload_id,
        rule_id: v.rule_id,
        policy_generation,
        port: dest.port,
        hook,
        protocol: dest.protocol,
        verdict: v.verdict,
        reason: v.reason,
        enforced: enforced as u8,
        family: dest.family,
        addr: dest.addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        // Not set yet: carrying the caller's form through `decide` stops the verifier from
        // pruning (6.1's connect6: 276k -> 753k instructions).
        original: tessera_common::ORIGINAL_AS_GIVEN,
        _pad: [0; 3],
    });
    let backlog = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    // One wakeup as the backlog crosses the threshold, not one per event above it.
    entry.submit(
        if backlog.wrapping_sub(capacity::EVENTS_WAKEUP_BYTES) < capacity::EVENTS_WAKEUP_WINDOW {
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        },
    );
}

#[inline(always)]
fn count_drop() {
    if let Some(drops) = EVENT_DROPS.get_ptr_mut(0) {
        // Per-CPU value: no other writer.
        unsafe { *drops += 1 };
    }
}

/// Counts one deny the ring buffer could not take under its key.
#[inline(always)]
fn count_lost_deny(key: &LostDenyKey, credential_id: u64) {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Two tries: another CPU may insert the key between our lookup and our insert (it then
    // holds a zero count for this CPU, which the second lookup finds).
    for _ in 0..2 {
        if let Some(lost) = DENY_LOSSES.get_ptr_mut(key) {
            // This CPU's value: no other writer.
            unsafe {
                (*lost).count += 1;
                if (*lost).first_ns == 0 {
                    (*lost).first_ns = now;
                }
                (*lost).last_ns = now;
                (*lost).credential_id = credential_id;
            }
            return;
        }
        let first = LostDenies {
            count: 1,
            first_ns: now,
            last_ns: now,
            credential_id,
        };
        if DENY_LOSSES
            .insert(key, &first, aya_ebpf::bindings::BPF_NOEXIST as u64)
            .is_ok()
        {
            return;
        }
    }
}
