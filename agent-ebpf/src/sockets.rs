//! Sockets that would bypass the connect/sendmsg decision: raw IP sockets (refused at
//! cgroup/sock_create) and packet sockets (which never reach cgroup/sock_create: the
//! syscalls/sys_enter_socket tracepoint kills the caller with SIGKILL).
//! Both apply only to restricted workloads (`WORKLOAD_RESTRICTED`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_send_signal,
    },
    programs::{SockContext, TracePointContext},
};
use tessera_common::{
    CONFIG_RESTRICTED, HOOK_SOCK_CREATE, HOOK_SOCKET_SYSCALL, NONE_ID, PROTO_RAW,
    REASON_PACKET_SOCKET_REFUSED, REASON_RAW_SOCKET_REFUSED, VERDICT_DENY, WORKLOAD_RESTRICTED,
    WorkloadValue,
};

use crate::{
    decision::{Destination, Verdict, emit, is_audit, workload_mode},
    identity::{below, find_workload, find_workload_tracing},
    maps::CONFIG,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_PACKET: u64 = 17;
const AF_XDP: u64 = 44;
const SOCK_RAW: u32 = 3;
/// `socket(AF_INET, SOCK_PACKET, …)` is the obsolete way to open a packet socket: the kernel
/// turns it into AF_PACKET before any family code runs.
const SOCK_PACKET: u64 = 10;
/// `type` also carries SOCK_NONBLOCK and SOCK_CLOEXEC; these bits are the type itself.
const SOCK_TYPE_MASK: u64 = 0xf;
const SIGKILL: u32 = 9;

/// Offsets of the syscalls/sys_enter_socket arguments (see its tracefs `format`).
const ARG_FAMILY: usize = 16;
const ARG_TYPE: usize = 24;

/// The restricted workload of the caller, if it is one.
#[inline(always)]
fn restricted_workload<const TRACING: bool>() -> Option<(WorkloadValue, u64)> {
    match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_RESTRICTED != 0 => {}
        _ => return None,
    }
    let uid_gid = bpf_get_current_uid_gid();
    // A caller still awaiting attestation is judged by its cgroup and uid.
    let workload = if TRACING {
        find_workload_tracing(uid_gid).workload
    } else {
        find_workload(uid_gid).workload
    };
    if workload.flags & WORKLOAD_RESTRICTED == 0 {
        return None;
    }
    Some((workload, uid_gid))
}

#[inline(always)]
fn refusal(workload: &WorkloadValue, reason: u8) -> Verdict {
    Verdict {
        verdict: VERDICT_DENY,
        reason,
        mode: workload_mode(workload),
        workload_id: workload.workload_id,
        rule_id: NONE_ID,
        credential_id: 0,
    }
}

/// No destination: the unspecified address of the family, port 0.
#[inline(always)]
fn nowhere(family: u8) -> Destination {
    let mut addr = [0u8; 16];
    if family == 4 {
        addr[10] = 0xff;
        addr[11] = 0xff;
    }
    Destination {
        addr,
        port: 0,
        protocol: PROTO_RAW,
        family,
    }
}

/// cgroup/sock_create: whether to refuse the socket (a raw IP socket of a restricted
/// workload, in enforce mode). Logs every refusal, audit included.
#[inline(always)]
pub fn refuse_raw(ctx: &SockContext) -> bool {
    let sk = ctx.sock;
    let (family, sock_type) = unsafe { ((*sk).family, (*sk).type_) };
    if sock_type != SOCK_RAW || (family != AF_INET && family != AF_INET6) {
        return false;
    }
    let Some((workload, uid_gid)) = restricted_workload::<false>() else {
        return false;
    };
    let v = refusal(&workload, REASON_RAW_SOCKET_REFUSED);
    let enforced = !is_audit(v.mode);
    let pid_tgid = bpf_get_current_pid_tgid();
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dest = nowhere(if family == AF_INET { 4 } else { 6 });
    emit(
        HOOK_SOCK_CREATE,
        &dest,
        NONE_ID,
        &v,
        socket_cookie,
        (pid_tgid >> 32) as u32,
        pid_tgid,
        uid_gid,
        enforced,
    );
    enforced
}

/// syscalls/sys_enter_socket: a restricted workload below the attached cgroup that asks for
/// a packet socket is killed (SIGKILL, delivered before the syscall returns to user space),
/// or only logged in audit mode.
#[inline(always)]
pub fn socket_syscall(ctx: &TracePointContext) {
    let (Ok(family), Ok(sock_type)) = (unsafe { ctx.read_at::<u64>(ARG_FAMILY) }, unsafe {
        ctx.read_at::<u64>(ARG_TYPE)
    }) else {
        return;
    };
    let family = family & 0xffff_ffff;
    let packet = family == AF_PACKET
        || family == AF_XDP
        || (family == u64::from(AF_INET) && sock_type & SOCK_TYPE_MASK == SOCK_PACKET);
    let attached = CONFIG.get(0).map_or(0, |c| c.attached_cgroup_id);
    if !packet || !below(attached) {
        return;
    }
    let Some((workload, uid_gid)) = restricted_workload::<true>() else {
        return;
    };
    let v = refusal(&workload, REASON_PACKET_SOCKET_REFUSED);
    let enforced = !is_audit(v.mode);
    if enforced {
        // The whole thread group; the socket syscall still runs, but the process dies on
        // its way back to user space, before it can use the descriptor.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    emit(
        HOOK_SOCKET_SYSCALL,
        &nowhere(6),
        NONE_ID,
        &v,
        0,
        (pid_tgid >> 32) as u32,
        pid_tgid,
        uid_gid,
        enforced,
    );
}
