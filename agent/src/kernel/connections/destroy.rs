//! Ending sockets from outside their process: `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`
//! (kernels built with `CONFIG_INET_DIAG_DESTROY`). A TCP socket is aborted (the kernel sends a
//! reset, so the peer sees it too, and the holder's next call fails with `ECONNABORTED`); a
//! connected UDP socket is disconnected (every `send` without an address then fails with
//! `EDESTADDRREQ`, a pending receive with `ECONNABORTED`, and a `sendto` is decided again by
//! the sendmsg hooks). The sockets are
//! found by their cookies in a `sock_diag` dump of the agent's network namespace.
//!
//! Where the kernel cannot (`CONFIG_INET_DIAG_DESTROY` off, or `sock_diag` refused), the
//! packet-drop programs refuse the socket's packets instead (see `agent-ebpf/src/flows.rs`);
//! the sockets are then only described, from the same dump when it answers.
//!
//! `bpf_sock_destroy` (6.5+) is not used: it ends sockets with the same kernel functions as
//! `SOCK_DESTROY`, so it would only help a 6.5+ kernel built without `CONFIG_INET_DIAG_DESTROY`
//! (packet drop covers those), and it is callable only from `iter/tcp` and `iter/udp`
//! programs, which aya-ebpf 0.2.1 cannot declare (README, "How connections end").

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::TimeVal;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
/// The kernel answers at once; this only bounds a kernel that never does.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How this kernel lets the agent end a connection, strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndMechanism {
    /// `SOCK_DESTROY` over `sock_diag` (`CONFIG_INET_DIAG_DESTROY`).
    SockDiagDestroy,
    /// The packet-drop programs (cgroup_skb egress and ingress) refuse the socket's packets
    /// while its holder holds no valid credential; the socket stays open.
    PacketDrop,
    /// None: connections outlive their credentials (the kernel lacks
    /// `CONFIG_INET_DIAG_DESTROY`, or the agent lacks `CAP_NET_ADMIN`).
    Unavailable,
}

impl EndMechanism {
    /// The name `tessera status` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            EndMechanism::SockDiagDestroy => "sock_diag_destroy",
            EndMechanism::PacketDrop => "packet_drop",
            EndMechanism::Unavailable => "unavailable",
        }
    }
}

/// A socket that was ended: its protocol (`IPPROTO_*`) and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedSocket {
    pub cookie: u64,
    pub protocol: u8,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Lists the TCP and UDP sockets (the `tcp_diag` and `udp_diag` handlers answer: without them,
/// as without `CONFIG_INET_DIAG`, every request gets `ENOENT`), then asks the kernel to destroy
/// a socket that cannot exist: a kernel with `SOCK_DESTROY` answers `ENOENT`, one without
/// `EOPNOTSUPP`.
pub fn probe_mechanism() -> EndMechanism {
    for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
        if let Err(e) = dump(AF_INET, protocol) {
            tracing::warn!(error = %e, protocol, "inet sock_diag does not answer (tcp_diag/udp_diag missing?)");
            return EndMechanism::Unavailable;
        }
    }
    let mut id = SocketId::new_v4();
    id.cookie = [0xff; 8];
    match destroy(AF_INET, IPPROTO_TCP, id) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => EndMechanism::SockDiagDestroy,
        Ok(()) => EndMechanism::SockDiagDestroy,
        Err(_) => EndMechanism::Unavailable,
    }
}

/// Ends the sockets of `cookies` found in the agent's network namespace (TCP and UDP, IPv4
/// and IPv6). Returns those it ended; a cookie not found is a socket already gone (or in
/// another network namespace).
pub fn end_sockets(cookies: &HashSet<u64>) -> io::Result<Vec<EndedSocket>> {
    visit(cookies, true)
}

/// The sockets of `cookies` found in the agent's network namespace, left as they are.
pub fn describe_sockets(cookies: &HashSet<u64>) -> io::Result<Vec<EndedSocket>> {
    visit(cookies, false)
}

fn visit(cookies: &HashSet<u64>, end: bool) -> io::Result<Vec<EndedSocket>> {
    let mut ended = Vec::new();
    if cookies.is_empty() {
        return Ok(ended);
    }
    for family in [AF_INET, AF_INET6] {
        for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
            for id in dump(family, protocol)? {
                let cookie = u64::from_ne_bytes(id.cookie);
                if !cookies.contains(&cookie) {
                    continue;
                }
                let socket = EndedSocket {
                    cookie,
                    protocol,
                    source: SocketAddr::new(id.source_address, id.source_port),
                    destination: SocketAddr::new(id.destination_address, id.destination_port),
                };
                if !end {
                    ended.push(socket);
                    continue;
                }
                match destroy(family, protocol, id) {
                    Ok(()) => ended.push(socket),
                    // Closed between the dump and now.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(ended)
}

/// A handle that ends sockets; `Unavailable` ends none.
#[derive(Clone, Copy, Debug)]
pub struct SocketEnder {
    pub mechanism: EndMechanism,
}

impl SocketEnder {
    /// Ends the sockets (`PacketDrop`: the kernel already refuses their packets; they are
    /// described where `sock_diag` answers, else not at all).
    pub fn end(&self, cookies: &HashSet<u64>) -> io::Result<Vec<EndedSocket>> {
        match self.mechanism {
            EndMechanism::SockDiagDestroy => end_sockets(cookies),
            EndMechanism::PacketDrop => Ok(describe_sockets(cookies).unwrap_or_default()),
            EndMechanism::Unavailable => Ok(Vec::new()),
        }
    }
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    setsockopt(
        &socket.as_fd(),
        ReceiveTimeout,
        &TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0),
    )?;
    Ok(socket)
}

fn request(family: u8, protocol: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

fn send<T: NetlinkSerializable>(socket: &Socket, flags: u16, payload: T) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

fn decode_error(message: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sock_diag answer: {message}"),
    )
}

/// Every socket of `family`/`protocol` in the agent's network namespace.
fn dump(family: u8, protocol: u8) -> io::Result<Vec<SocketId>> {
    let socket = open()?;
    let mut id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    id.cookie = [0xff; 8];
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        request(family, protocol, id),
    )?;
    let mut ids = Vec::new();
    loop {
        let (answer, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < answer.len() {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[offset..])
                .map_err(decode_error)?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    ids.push(r.header.socket_id.clone());
                }
                NetlinkPayload::Done(_) => return Ok(ids),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn destroy(family: u8, protocol: u8, id: SocketId) -> io::Result<()> {
    let socket = open()?;
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(request(family, protocol, id)),
    )?;
    let (answer, _) = socket.recv_from_full()?;
    let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&answer).map_err(decode_error)?;
    match msg.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream, UdpSocket};

    /// The cookie of the socket bound to `local`, from a sock_diag dump.
    fn cookie(protocol: u8, local: SocketAddr) -> u64 {
        let id = dump(AF_INET, protocol)
            .expect("dump")
            .into_iter()
            .find(|id| SocketAddr::new(id.source_address, id.source_port) == local)
            .expect("the socket is in the dump");
        u64::from_ne_bytes(id.cookie)
    }

    fn available() -> bool {
        let m = probe_mechanism();
        if m == EndMechanism::Unavailable {
            crate::testkit::skip("SOCK_DESTROY is unavailable (kernel or CAP_NET_ADMIN)");
        }
        m == EndMechanism::SockDiagDestroy
    }

    #[test]
    fn a_destroyed_tcp_connection_fails_on_both_ends() {
        if !available() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"x").expect("write");
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).expect("read");

        let ended = end_sockets(&HashSet::from([cookie(
            IPPROTO_TCP,
            client.local_addr().unwrap(),
        )]))
        .expect("end");
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0].destination, listener.local_addr().unwrap());
        let err = client
            .write_all(b"y")
            .expect_err("the client's socket is ended");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        // The reset reached the server: its read fails or sees the end.
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        match server.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
            other => panic!("the server still reads: {other:?}"),
        }
    }

    #[test]
    fn a_destroyed_connected_udp_socket_refuses_to_send() {
        if !available() {
            return;
        }
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .connect(server.local_addr().unwrap())
            .expect("connect");
        client.send(b"x").expect("send");
        let ended = end_sockets(&HashSet::from([cookie(
            IPPROTO_UDP,
            client.local_addr().unwrap(),
        )]))
        .expect("end");
        assert_eq!(ended.len(), 1, "{ended:?}");
        // Disconnected: a send has no destination any more (the abort's ECONNABORTED waits
        // for a receive), and every later one too.
        for _ in 0..2 {
            let err = client.send(b"y").expect_err("no longer connected");
            assert_eq!(err.raw_os_error(), Some(libc::EDESTADDRREQ), "{err}");
        }
        let err = client.recv(&mut [0u8; 8]).expect_err("aborted");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    }

    #[test]
    fn an_unknown_cookie_ends_nothing() {
        if !available() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
        let ended = end_sockets(&HashSet::from([cookie(
            IPPROTO_TCP,
            client.local_addr().unwrap(),
        ) ^ 0xdead_0000]))
        .expect("end");
        assert!(ended.is_empty(), "{ended:?}");
    }
}
