//! The self-test's only unsafe code: io_uring submissions (the io-uring crate's submission API
//! is unsafe because the kernel reads the buffers after the call) and a bare fork (nix's fork
//! is unsafe in a multi-threaded process). Nothing else in the agent crate may use `unsafe`
//! (the crate is `#![deny(unsafe_code)]`; this module alone allows it).
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;

use io_uring::{IoUring, opcode, types};
use nix::errno::Errno;
use nix::sys::socket::{SockFlag, SockaddrLike as _, SockaddrStorage};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use super::net;

/// Why an io_uring attempt could not be made at all (as opposed to the kernel refusing it).
#[derive(Debug, thiserror::Error)]
pub enum UringUnavailable {
    #[error("io_uring_setup failed: {0}")]
    Setup(#[source] std::io::Error),
    #[error("cannot create the socket: {0}")]
    Socket(Errno),
    #[error("io_uring submission failed: {0}")]
    Submit(String),
}

/// The result of one submission and its completion.
fn submit_one(entry: &io_uring::squeue::Entry) -> Result<Result<(), Errno>, UringUnavailable> {
    let mut ring = IoUring::new(4).map_err(UringUnavailable::Setup)?;
    // SAFETY: every pointer the entry carries (address, msghdr, iovec, payload) lives in the
    // caller's frame, which outlives this function; we wait for the completion below before
    // returning, so the kernel never reads them after they are gone.
    unsafe {
        ring.submission()
            .push(entry)
            .map_err(|e| UringUnavailable::Submit(e.to_string()))?;
    }
    ring.submit_and_wait(1)
        .map_err(|e| UringUnavailable::Submit(e.to_string()))?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| UringUnavailable::Submit("no completion".to_owned()))?;
    let res = cqe.result();
    Ok(if res < 0 {
        Err(Errno::from_raw(-res))
    } else {
        Ok(())
    })
}

/// IORING_OP_CONNECT of a new TCP socket to `addr`.
pub fn uring_connect(addr: &SocketAddr) -> Result<Result<(), Errno>, UringUnavailable> {
    let fd = net::new_socket(addr, false, SockFlag::empty()).map_err(UringUnavailable::Socket)?;
    let to = SockaddrStorage::from(*addr);
    let entry = opcode::Connect::new(types::Fd(fd.as_raw_fd()), to.as_ptr(), to.len()).build();
    submit_one(&entry)
}

/// IORING_OP_SENDMSG of one datagram on a new, unconnected UDP socket to `addr`.
pub fn uring_sendmsg(addr: &SocketAddr) -> Result<Result<(), Errno>, UringUnavailable> {
    let fd = net::new_socket(addr, true, SockFlag::empty()).map_err(UringUnavailable::Socket)?;
    let mut to = SockaddrStorage::from(*addr);
    let mut payload = *b"tessera-selftest\n";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value (no name, no
    // iovec, no control data); the fields that matter are set right after.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut to).cast();
    msg.msg_namelen = to.len();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    let entry = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), &raw const msg).build();
    submit_one(&entry)
}

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChildEnd {
    /// It ran to the end: the result of what it did.
    Exited(Result<(), Errno>),
    /// A signal ended it (the packet-socket refusal is a SIGKILL).
    Killed(nix::sys::signal::Signal),
}

/// Forks; the child runs `what` and reports its result as its exit status. Returns the
/// child's pid (its tgid, the process the decision is about) and how it ended.
fn fork_and(what: impl FnOnce() -> Result<(), Errno>) -> Result<(Pid, ChildEnd), Errno> {
    // SAFETY: the child only calls async-signal-safe functions (socket, connect, close through
    // nix, which allocate nothing) and leaves with _exit, so the other threads' locks held at
    // fork time are never touched.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            let code = match what() {
                Ok(()) => 0,
                Err(e) => (e as i32).clamp(1, 255),
            };
            // SAFETY: _exit ends the child at once, without running the parent's atexit
            // handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let end = match waitpid(child, None)? {
                WaitStatus::Exited(_, 0) => ChildEnd::Exited(Ok(())),
                WaitStatus::Exited(_, code) => ChildEnd::Exited(Err(Errno::from_raw(code))),
                WaitStatus::Signaled(_, signal, _) => ChildEnd::Killed(signal),
                _ => ChildEnd::Exited(Err(Errno::ECHILD)),
            };
            Ok((child, end))
        }
    }
}

/// Forks; the child makes a new TCP connection to `addr`.
pub fn fork_and_connect(addr: &SocketAddr) -> Result<(Pid, ChildEnd), Errno> {
    fork_and(|| net::connect_new(addr, false, SockFlag::empty()).map(drop))
}

/// Forks; the child asks for a packet socket (`AF_PACKET`, `SOCK_RAW`).
pub fn fork_and_packet_socket() -> Result<(Pid, ChildEnd), Errno> {
    fork_and(net::packet_socket)
}
