//! Tessera's kernel programs: socket tagging (cgroup/sock_create, sock_release), the
//! connect/sendmsg decision (cgroup sock_addr hooks), grant cleanup on process exit, and the
//! refusal of raw IP and packet sockets to restricted workloads.
#![no_std]
#![no_main]

mod decision;
mod identity;
mod maps;
mod sockets;

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock, cgroup_sock_addr, tracepoint},
    programs::{SockAddrContext, SockContext, TracePointContext},
};
use tessera_common::{
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, PROTO_TCP, PROTO_UDP, SocketTag,
};

use crate::{
    decision::{ALLOW, Destination, decide},
    maps::{CONNECTIONS, SOCKET_TAGS},
};

#[cgroup_sock(sock_create)]
pub fn tessera_sock_create(ctx: SockContext) -> i32 {
    // A raw IP socket of a restricted workload: EPERM (never tagged; sock_release will not
    // run for it). Every other socket is tagged and allowed.
    if sockets::refuse_raw(&ctx) {
        return 0;
    }
    try_sock_create(&ctx);
    1
}

#[cgroup_sock(sock_release)]
pub fn tessera_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Absent when the socket was created before the agent attached.
    let _ = SOCKET_TAGS.remove(&cookie);
    let _ = CONNECTIONS.remove(&cookie);
    1
}

#[cgroup_sock_addr(connect4)]
pub fn tessera_connect4(ctx: SockAddrContext) -> i32 {
    try_sock_addr4(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn tessera_connect6(ctx: SockAddrContext) -> i32 {
    try_sock_addr6(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tessera_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sock_addr4(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tessera_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sock_addr6(&ctx, HOOK_SENDMSG6)
}

#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn tessera_socket_syscall(ctx: TracePointContext) -> u32 {
    sockets::socket_syscall(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn tessera_process_exec(ctx: TracePointContext) -> u32 {
    identity::process_exec(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn tessera_process_fork(ctx: TracePointContext) -> u32 {
    identity::process_fork(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn tessera_process_exit(_ctx: TracePointContext) -> u32 {
    identity::process_exit();
    0
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let tag = SocketTag {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad: 0,
    };
    // A full LRU map evicts the oldest tag; the event then lacks creator_tgid.
    let _ = SOCKET_TAGS.insert(&cookie, &tag, 0);
}

/// Reads a u32 field of the context with one 32-bit load, as the verifier requires for
/// `bpf_sock_addr` (the compiler must not merge or split these loads).
#[inline(always)]
fn read_ctx(field: *const u32) -> u32 {
    // SAFETY: `field` points into the program's context, valid for the whole run.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn protocol(sa: *const bpf_sock_addr) -> Option<u8> {
    let protocol = read_ctx(unsafe { &raw const (*sa).protocol });
    match protocol {
        p if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        p if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port(sa: *const bpf_sock_addr) -> u16 {
    u16::from_be(read_ctx(unsafe { &raw const (*sa).user_port }) as u16)
}

#[inline(always)]
fn try_sock_addr4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let sa = ctx.sock_addr.cast_const();
    let Some(protocol) = protocol(sa) else {
        return ALLOW;
    };
    let mut ip4 = read_ctx(unsafe { &raw const (*sa).user_ip4 }).to_ne_bytes();
    // Linux delivers a connect/sendto to the unspecified 0.0.0.0 to this host's loopback:
    // it is decided as 127.0.0.1 (issue 11).
    if u32::from_ne_bytes(ip4) == 0 {
        ip4 = [127, 0, 0, 1];
    }
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&ip4);
    let dest = Destination {
        addr,
        port: port(sa),
        protocol,
        family: 4,
    };
    decide(ctx, hook, &dest)
}

#[inline(always)]
fn try_sock_addr6(ctx: &SockAddrContext, hook: u8) -> i32 {
    let sa = ctx.sock_addr.cast_const();
    let Some(protocol) = protocol(sa) else {
        return ALLOW;
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = read_ctx(unsafe { &raw const (*sa).user_ip6[i] }).to_ne_bytes();
        addr[i * 4..i * 4 + 4].copy_from_slice(&word);
        i += 1;
    }
    let zero_prefix = addr[..10].iter().all(|b| *b == 0);
    let mapped = zero_prefix && addr[10] == 0xff && addr[11] == 0xff;
    // IPv4-compatible `::a.b.c.d` (deprecated, but routable through sit): decided as a.b.c.d.
    // `::` and `::1` are IPv6's own unspecified and loopback addresses.
    let compatible = zero_prefix
        && addr[10] == 0
        && addr[11] == 0
        && (addr[12] | addr[13] | addr[14] != 0 || addr[15] > 1);
    if compatible {
        addr[10] = 0xff;
        addr[11] = 0xff;
    }
    // The unspecified addresses reach this host's loopback: `::` (= `::0.0.0.0`) is decided
    // as `::1`, `::ffff:0.0.0.0` as 127.0.0.1 (issue 11).
    let low_zero = addr[12] | addr[13] | addr[14] | addr[15] == 0;
    if zero_prefix && addr[10] == 0 && addr[11] == 0 && low_zero {
        addr[15] = 1;
    } else if mapped && low_zero {
        addr[12] = 127;
        addr[15] = 1;
    }
    let dest = Destination {
        addr,
        port: port(sa),
        protocol,
        family: if mapped || compatible { 4 } else { 6 },
    };
    decide(ctx, hook, &dest)
}

/// `a == b`, usable in constants.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The agent finds the programs by these names: keep them equal to the functions above.
const _: () = {
    use tessera_common::program_names as p;
    assert!(same(p::SOCK_CREATE, "tessera_sock_create"));
    assert!(same(p::SOCK_RELEASE, "tessera_sock_release"));
    assert!(same(p::CONNECT4, "tessera_connect4"));
    assert!(same(p::CONNECT6, "tessera_connect6"));
    assert!(same(p::SENDMSG4, "tessera_sendmsg4"));
    assert!(same(p::SENDMSG6, "tessera_sendmsg6"));
    assert!(same(p::PROCESS_EXIT, "tessera_process_exit"));
    assert!(same(p::SOCKET_SYSCALL, "tessera_socket_syscall"));
    assert!(same(p::PROCESS_EXEC, "tessera_process_exec"));
    assert!(same(p::PROCESS_FORK, "tessera_process_fork"));
};

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
