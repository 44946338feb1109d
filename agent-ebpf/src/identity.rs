//! Who the caller is: the identity the agent attested (`PROCESS_IDENTITY`), else the workload
//! of its cgroups and uid (`WORKLOADS`); and how identities and grants follow a process
//! through fork, exec and exit.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_ktime_get_boot_ns,
    },
    programs::TracePointContext,
};
use tessera_common::{
    ANY_CGROUP, ANY_UID, CONFIG_ATTEST_EXEC, GRANT_EMPTY, GRANT_KEEP_ON_EXEC, GRANT_SLOTS,
    GRANT_TREE, IDENTITY_EXE_DEPENDENT, MAX_CGROUP_DEPTH, NONE_ID, PROCESS_EVENT_EXEC,
    ProcessEvent, ProcessGrants, WORKLOAD_DECISION_FLAGS, WORKLOAD_NEEDS_ATTEST, WorkloadKey,
    WorkloadValue, capacity,
};

use crate::maps::{
    ATTACHED_CGROUP, CONFIG, PROCESS_EVENTS, PROCESS_GRANTS, PROCESS_IDENTITY, PROCESS_INSTANCE,
    WORKLOAD_CGROUP_IDS, WORKLOAD_CGROUPS, WORKLOADS,
};

/// Offsets of tracepoint fields, which differ between kernels: the agent sets them from the
/// tracepoints' tracefs `format` files when it loads the programs (these are 6.x's values).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;
#[unsafe(no_mangle)]
static EXEC_OLD_PID_OFFSET: u32 = 16;
/// 1 where tracing programs may call `bpf_get_current_ancestor_cgroup_id` (5.14 and later);
/// the agent sets 0 elsewhere, and the verifier then never sees the call (a constant branch).
#[unsafe(no_mangle)]
static TRACING_ANCESTORS: u32 = 1;

/// The caller's workload (`workload_id` `NONE_ID` when none), and whether it still awaits
/// the agent's attestation.
pub struct Caller {
    pub workload: WorkloadValue,
    /// Some workload chosen by selectors only the agent checks may apply, and the caller has
    /// no current attested identity.
    pub pending: bool,
}

/// Finds the caller's workload. An attested identity applies (when some workload needs the
/// agent's attestation) while the caller is still in the cgroup and has the uid and gid it was
/// attested with. Otherwise the deepest ancestor
/// cgroup with a workload wins (one for this uid before one for any uid), else a workload of
/// any cgroup; and an entry marked `WORKLOAD_NEEDS_ATTEST` on the way makes the caller pending.
/// [`find_workload`] from a tracing program (a tracepoint): where the kernel does not give
/// tracing programs `bpf_get_current_ancestor_cgroup_id` (before 5.14: the agent then sets
/// `TRACING_ANCESTORS` to 0), the cgroups are tested with `bpf_current_task_under_cgroup`.
#[inline(always)]
pub fn find_workload_tracing(uid_gid: u64) -> Caller {
    // SAFETY: a global the agent sets at load; read once.
    if unsafe { core::ptr::read_volatile(&TRACING_ANCESTORS) } != 0 {
        find_workload_with::<false>(uid_gid)
    } else {
        find_workload_with::<true>(uid_gid)
    }
}

#[inline(always)]
pub fn find_workload(uid_gid: u64) -> Caller {
    find_workload_with::<false>(uid_gid)
}

#[inline(always)]
fn find_workload_with<const UNDER_CGROUP: bool>(uid_gid: u64) -> Caller {
    let uid = uid_gid as u32;
    let gid = (uid_gid >> 32) as u32;
    // Without a workload the kernel cannot tell apart by itself, an attested identity says what
    // `WORKLOADS` says: skip its lookup.
    let attest_config = CONFIG
        .get(0)
        .is_some_and(|c| c.flags & CONFIG_ATTEST_EXEC != 0);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let identity = if attest_config {
        PROCESS_IDENTITY.get_ptr(&tgid)
    } else {
        None
    };
    if let Some(id) = identity {
        // SAFETY: a map value pointer from a successful lookup.
        let id = unsafe { *id };
        if id.uid == uid && id.gid == gid && id.cgroup_id == unsafe { bpf_get_current_cgroup_id() }
        {
            return Caller {
                workload: WorkloadValue {
                    workload_id: id.workload_id,
                    flags: id.flags & WORKLOAD_DECISION_FLAGS,
                },
                pending: false,
            };
        }
    }
    let mut found = WorkloadValue {
        workload_id: NONE_ID,
        flags: 0,
    };
    let mut needs_attest = 0;
    if UNDER_CGROUP {
        // The workload cgroups the caller is under, deepest first: the first workload found is
        // the one the ancestor walk below would find last.
        let mut i = 0;
        while i < capacity::WORKLOAD_CGROUPS {
            let Some(&cgroup_id) = WORKLOAD_CGROUP_IDS.get(i) else {
                break;
            };
            if cgroup_id == 0 {
                break;
            }
            if WORKLOAD_CGROUPS.current_task_under_cgroup(i) == Ok(true)
                && let Some(v) = lookup(cgroup_id, uid)
            {
                if v.workload_id != NONE_ID && found.workload_id == NONE_ID {
                    found = v;
                }
                needs_attest |= v.flags & WORKLOAD_NEEDS_ATTEST;
            }
            i += 1;
        }
    } else {
        let mut level: i32 = 0;
        while level < MAX_CGROUP_DEPTH as i32 {
            let cgroup_id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if cgroup_id == 0 {
                break;
            }
            if let Some(v) = lookup(cgroup_id, uid) {
                if v.workload_id != NONE_ID {
                    found = v;
                }
                needs_attest |= v.flags & WORKLOAD_NEEDS_ATTEST;
            }
            level += 1;
        }
    }
    if found.workload_id == NONE_ID || attest_config {
        if let Some(v) = lookup(ANY_CGROUP, uid) {
            if found.workload_id == NONE_ID && v.workload_id != NONE_ID {
                found = v;
            }
            needs_attest |= v.flags & WORKLOAD_NEEDS_ATTEST;
        }
    }
    found.flags &= WORKLOAD_DECISION_FLAGS;
    Caller {
        workload: found,
        pending: needs_attest != 0,
    }
}

/// The `WORKLOADS` entry for (`cgroup_id`, `uid`), else for (`cgroup_id`, any uid). The agent
/// merges a level's any-uid entry into its uid entries, so one hit says all about the level.
#[inline(always)]
fn lookup(cgroup_id: u64, uid: u32) -> Option<WorkloadValue> {
    let mut key = WorkloadKey {
        cgroup_id,
        uid,
        _pad: 0,
    };
    if let Some(v) = WORKLOADS.get_ptr(&key) {
        return Some(unsafe { *v });
    }
    key.uid = ANY_UID;
    WORKLOADS.get_ptr(&key).map(|v| unsafe { *v })
}

/// sched_process_fork, in the parent's context, before the child first runs: the child gets a
/// new instance marker, and inherits the parent's attested identity and its
/// `bind: process-tree` grants (which become the child's own: its marker is their owner). What
/// an earlier holder of the child's pid left (an identity or grants the agent wrote as that
/// holder exited) is dropped, so a reused pid starts clean. For a new thread the copies are
/// keyed by its thread id, unused, and deleted when the thread exits.
#[inline(always)]
pub fn process_fork(ctx: &TracePointContext) {
    let offset = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    let Ok(child) = (unsafe { ctx.read_at::<i32>(offset) }) else {
        return;
    };
    let child = child as u32;
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if child == 0 || child == parent {
        return;
    }
    let identity = PROCESS_IDENTITY.get_ptr(&parent);
    let grants = PROCESS_GRANTS.get_ptr(&parent);
    // Only a child of an attested or granted parent can hold grants without the agent: the
    // rest get their marker from the agent when it attests them. (Each pointer is tested in
    // its own branch: the verifier refuses arithmetic on a possibly-null pointer.)
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let marker = match identity {
        Some(id) => {
            // SAFETY: a map value pointer from a successful lookup; the helper copies it.
            let _ = PROCESS_IDENTITY.insert(&child, unsafe { &*id }, 0);
            new_marker(child, now)
        }
        None => {
            let _ = PROCESS_IDENTITY.remove(&child);
            match grants {
                Some(_) => new_marker(child, now),
                None => {
                    let _ = PROCESS_INSTANCE.remove(&child);
                    0
                }
            }
        }
    };
    let Some(grants) = grants else {
        let _ = PROCESS_GRANTS.remove(&child);
        return;
    };
    if marker == 0 || !has_tree_slot(grants) {
        let _ = PROCESS_GRANTS.remove(&child);
        return;
    }
    // The kernel copies the parent's value; then every slot that is not the tree's is emptied.
    if PROCESS_GRANTS
        .insert(&child, unsafe { &*grants }, 0)
        .is_err()
    {
        return;
    }
    let Some(copy) = PROCESS_GRANTS.get_ptr_mut(&child) else {
        return;
    };
    // SAFETY: a map value pointer from a successful lookup.
    unsafe { (*copy).owner = marker };
    let mut i = 0;
    while i < GRANT_SLOTS {
        // SAFETY: as above, for the child's value.
        unsafe {
            if (*copy).slots[i].flags & GRANT_TREE == 0 {
                (*copy).slots[i].state = GRANT_EMPTY;
            }
        }
        i += 1;
    }
}

/// Sets `child`'s instance marker to `now`; 0 when the map is full (the child then has none, and
/// no grant applies to it).
#[inline(always)]
fn new_marker(child: u32, now: u64) -> u64 {
    if PROCESS_INSTANCE.insert(&child, &now, 0).is_ok() {
        now
    } else {
        let _ = PROCESS_INSTANCE.remove(&child);
        0
    }
}

/// Whether `grants` holds a `bind: process-tree` slot. Field reads only: a whole-struct copy
/// would be a byte loop the verifier walks one byte at a time.
#[inline(always)]
fn has_tree_slot(grants: *const ProcessGrants) -> bool {
    let mut tree = false;
    let mut i = 0;
    while i < GRANT_SLOTS {
        // SAFETY: a map value pointer from a successful lookup; i < GRANT_SLOTS.
        let (state, flags) = unsafe { ((*grants).slots[i].state, (*grants).slots[i].flags) };
        if state != GRANT_EMPTY && flags & GRANT_TREE != 0 {
            tree = true;
        }
        i += 1;
    }
    tree
}

/// sched_process_exec: the new program image keeps only the grants that say so
/// (`bind: process-tree`, `keepOnExec`), and loses an identity that depended on the
/// executable; the agent is told, to attest the process again.
#[inline(always)]
pub fn process_exec(ctx: &TracePointContext) {
    // After exec the calling thread is the thread-group leader: tgid is the process.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // An exec from another thread: that thread's id is free again, and so is its copy.
    let offset = unsafe { core::ptr::read_volatile(&EXEC_OLD_PID_OFFSET) } as usize;
    if let Ok(old_pid) = unsafe { ctx.read_at::<i32>(offset) } {
        let old_pid = old_pid as u32;
        if old_pid != tgid {
            let _ = PROCESS_GRANTS.remove(&old_pid);
            let _ = PROCESS_IDENTITY.remove(&old_pid);
            let _ = PROCESS_INSTANCE.remove(&old_pid);
        }
    }
    if let Some(grants) = PROCESS_GRANTS.get_ptr_mut(&tgid) {
        let mut kept = 0;
        let mut i = 0;
        while i < GRANT_SLOTS {
            // SAFETY: a map value pointer from a successful lookup; i < GRANT_SLOTS.
            let slot = unsafe { &mut (*grants).slots[i] };
            if slot.flags & (GRANT_TREE | GRANT_KEEP_ON_EXEC) == 0 {
                slot.state = GRANT_EMPTY;
            } else if slot.state != GRANT_EMPTY {
                kept += 1;
            }
            i += 1;
        }
        if kept == 0 {
            let _ = PROCESS_GRANTS.remove(&tgid);
        }
    }
    if let Some(id) = PROCESS_IDENTITY.get_ptr(&tgid) {
        if unsafe { (*id).flags } & IDENTITY_EXE_DEPENDENT != 0 {
            let _ = PROCESS_IDENTITY.remove(&tgid);
        }
    }
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if config.flags & CONFIG_ATTEST_EXEC == 0 || !below(config.attached_cgroup_id) {
        return;
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // A full ring buffer loses the event: the process then stays pending until its first
    // decision (identity_pending) asks the agent to attest it.
    let _ = PROCESS_EVENTS.output::<ProcessEvent>(
        &ProcessEvent {
            cgroup_id,
            tgid,
            kind: PROCESS_EVENT_EXEC,
        },
        BPF_RB_FORCE_WAKEUP as u64,
    );
}

/// sched_process_exit: the thread-group leader's exit ends the process's grants and identity
/// (so that a reused pid never inherits them); another thread's exit removes the copies its
/// creation made.
#[inline(always)]
pub fn process_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = pid_tgid as u32;
    let _ = PROCESS_GRANTS.remove(&pid);
    let _ = PROCESS_IDENTITY.remove(&pid);
    let _ = PROCESS_INSTANCE.remove(&pid);
}

/// Whether the caller is in the attach point's cgroup or below it (`attached`, its id: 0 is
/// nowhere), from a tracing program. `bpf_current_task_under_cgroup` on the one-slot
/// `ATTACHED_CGROUP` answers it on every kernel (tracing programs get the ancestor helper only
/// from 5.14).
#[inline(always)]
pub fn below(attached: u64) -> bool {
    attached != 0 && ATTACHED_CGROUP.current_task_under_cgroup(0) == Ok(true)
}
