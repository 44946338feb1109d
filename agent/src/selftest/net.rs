//! The socket calls the attempts make, through nix's safe wrappers. Each returns the errno the
//! kernel gave (the hooks refuse with EPERM), never panics.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockFlag,
    SockProtocol, SockType, SockaddrStorage, connect, recvmsg, send, sendmmsg, sendmsg, sendto,
    setsockopt, socket, sockopt,
};

const PAYLOAD: &[u8] = b"tessera-selftest\n";

/// The name an actor reports for a result: `ok` or the errno's name (`EPERM`).
pub fn observed(result: &Result<(), Errno>) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("{e:?}"),
    }
}

fn family(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub fn new_socket(addr: &SocketAddr, udp: bool, flags: SockFlag) -> Result<OwnedFd, Errno> {
    let ty = if udp {
        SockType::Datagram
    } else {
        SockType::Stream
    };
    socket(family(addr), ty, flags, None)
}

pub fn connect_fd(fd: RawFd, addr: &SocketAddr) -> Result<(), Errno> {
    connect(fd, &SockaddrStorage::from(*addr))
}

/// A TCP (or UDP) connect; returns the connected socket.
pub fn connect_new(addr: &SocketAddr, udp: bool, flags: SockFlag) -> Result<OwnedFd, Errno> {
    let fd = new_socket(addr, udp, flags)?;
    connect_fd(fd.as_raw_fd(), addr)?;
    Ok(fd)
}

pub fn write_fd(fd: RawFd) -> Result<(), Errno> {
    send(fd, PAYLOAD, MsgFlags::MSG_NOSIGNAL).map(drop)
}

/// A raw IP socket that could write UDP packets of its own making.
pub fn raw_socket(v6: bool) -> Result<(), Errno> {
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    socket(
        family,
        SockType::Raw,
        SockFlag::empty(),
        Some(SockProtocol::Udp),
    )
    .map(drop)
}

/// Sends one hand-made UDP datagram to `addr` (IPv4) over a raw IPPROTO_UDP socket: the
/// kernel adds the IP header, no UDP socket is involved.
pub fn raw_udp_send(addr: std::net::SocketAddrV4) -> Result<(), Errno> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        Some(SockProtocol::Udp),
    )?;
    let len = (8 + PAYLOAD.len()) as u16;
    let mut datagram = Vec::with_capacity(usize::from(len));
    datagram.extend_from_slice(&40000u16.to_be_bytes()); // source port
    datagram.extend_from_slice(&addr.port().to_be_bytes());
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
    datagram.extend_from_slice(PAYLOAD);
    let to = SockaddrStorage::from(SocketAddr::V4(std::net::SocketAddrV4::new(*addr.ip(), 0)));
    sendto(fd.as_raw_fd(), &datagram, &to, MsgFlags::empty()).map(drop)
}

/// A packet socket (link-layer frames, below every IP hook).
pub fn packet_socket() -> Result<(), Errno> {
    socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::empty(),
        None,
    )
    .map(drop)
}

/// TCP Fast Open on an unconnected socket: sendto (or sendmsg) with MSG_FASTOPEN.
pub fn fastopen_send(addr: &SocketAddr, use_sendmsg: bool) -> Result<(), Errno> {
    let fd = new_socket(addr, false, SockFlag::empty())?;
    let flags = MsgFlags::from_bits_retain(libc::MSG_FASTOPEN) | MsgFlags::MSG_NOSIGNAL;
    let to = SockaddrStorage::from(*addr);
    if use_sendmsg {
        let iov = [IoSlice::new(PAYLOAD)];
        sendmsg(fd.as_raw_fd(), &iov, &[], flags, Some(&to)).map(drop)
    } else {
        sendto(fd.as_raw_fd(), PAYLOAD, &to, flags).map(drop)
    }
}

/// TCP_FASTOPEN_CONNECT, then connect (the SYN waits for the first write), then write.
pub fn fastopen_connect(addr: &SocketAddr) -> Result<(), Errno> {
    let fd = new_socket(addr, false, SockFlag::empty())?;
    setsockopt(&fd, sockopt::TcpFastOpenConnect, &true)?;
    connect_fd(fd.as_raw_fd(), addr)?;
    write_fd(fd.as_raw_fd())
}

/// UDP connect, then send on the connected socket.
pub fn udp_connect_send(addr: &SocketAddr) -> Result<(), Errno> {
    let fd = connect_new(addr, true, SockFlag::empty())?;
    write_fd(fd.as_raw_fd())
}

/// How an unconnected UDP socket names its destination.
#[derive(Clone, Copy, Debug)]
pub enum UdpSend {
    Sendto,
    Sendmsg,
    Sendmmsg,
}

pub fn udp_send(addr: &SocketAddr, how: UdpSend) -> Result<(), Errno> {
    let fd = new_socket(addr, true, SockFlag::empty())?;
    let to = SockaddrStorage::from(*addr);
    let raw = fd.as_raw_fd();
    match how {
        UdpSend::Sendto => sendto(raw, PAYLOAD, &to, MsgFlags::empty()).map(drop),
        UdpSend::Sendmsg => {
            let iov = [IoSlice::new(PAYLOAD)];
            sendmsg(raw, &iov, &[], MsgFlags::empty(), Some(&to)).map(drop)
        }
        UdpSend::Sendmmsg => {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(2, None);
            let iovs = [[IoSlice::new(PAYLOAD)], [IoSlice::new(PAYLOAD)]];
            let addrs = [Some(to), Some(to)];
            let cmsgs: [ControlMessage<'_>; 0] = [];
            let sent = sendmmsg(raw, &mut headers, &iovs, addrs, cmsgs, MsgFlags::empty())?;
            // sendmmsg reports an error only when the first message fails; a refused second
            // message shows as a short count.
            if sent.count() < 2 {
                return Err(Errno::EPERM);
            }
            Ok(())
        }
    }
}

/// Sends `fd` over the unix socket `channel` (SCM_RIGHTS).
pub fn send_fd(channel: RawFd, fd: RawFd) -> Result<(), Errno> {
    let fds = [fd];
    let iov = [IoSlice::new(b"f")];
    sendmsg::<()>(
        channel,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map(drop)
}

/// Receives one descriptor sent by [`send_fd`] on `channel`. The descriptor stays open until
/// the process exits (the actor is short-lived).
pub fn recv_fd(channel: RawFd) -> Result<RawFd, Errno> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(channel, &mut iov, Some(&mut space), MsgFlags::empty())?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(fd) = fds.first()
        {
            return Ok(*fd);
        }
    }
    Err(Errno::EBADMSG)
}
