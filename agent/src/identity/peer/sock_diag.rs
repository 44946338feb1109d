//! One `sock_diag` question to the kernel: which socket is the peer of this unix socket
//! (`NETLINK_SOCK_DIAG`, a `unix_diag_req` for one inode with `UDIAG_SHOW_PEER`, answered with
//! `UNIX_DIAG_PEER`).

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::TimeVal;

/// The kernel answers at once; this only bounds a kernel that never does.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// `INET_DIAG_NOCOOKIE` in both halves: look the socket up by inode alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot ask the kernel over NETLINK_SOCK_DIAG")]
    Socket(#[source] io::Error),
    #[error(
        "the kernel refused the unix sock_diag request for socket {inode} (without \
         CONFIG_UNIX_DIAG, or its module unix_diag not loaded, the kernel answers ENOENT: \
         `modprobe unix_diag`)"
    )]
    Refused {
        inode: u32,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's sock_diag answer for socket {inode} cannot be read: {message}")]
    Decode { inode: u32, message: String },
}

/// The inode of the peer of unix socket `inode` (in the agent's network namespace); `None`
/// when it has no peer any more (the other end was closed).
pub fn peer_inode(inode: u32) -> Result<Option<u32>, SockDiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)?;
    socket.bind_auto().map_err(SockDiagError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(SockDiagError::Socket)?;
    setsockopt(
        &socket.as_fd(),
        ReceiveTimeout,
        &TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0),
    )
    .map_err(|e| SockDiagError::Socket(e.into()))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::all(),
        inode,
        show_flags: ShowFlags::PEER,
        cookie: NO_COOKIE,
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).map_err(SockDiagError::Socket)?;

    loop {
        let (answer, _) = socket.recv_from_full().map_err(SockDiagError::Socket)?;
        let mut offset = 0;
        while offset < answer.len() {
            let msg =
                NetlinkMessage::<SockDiagMessage>::deserialize(&answer[offset..]).map_err(|e| {
                    SockDiagError::Decode {
                        inode,
                        message: e.to_string(),
                    }
                })?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r))
                    if r.header.inode == inode =>
                {
                    // A closed peer is reported as inode 0, or not at all.
                    return Ok(r.peer().filter(|&p| p != 0));
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(SockDiagError::Refused {
                        inode,
                        source: e.to_io(),
                    });
                }
                NetlinkPayload::Done(_) => {
                    return Err(SockDiagError::Decode {
                        inode,
                        message: "no answer for the socket".to_owned(),
                    });
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::peer::socket_inode;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn a_socketpair_ends_are_each_others_peer() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (ia, ib) = (socket_inode(&a).unwrap(), socket_inode(&b).unwrap());
        assert_ne!(ia, ib);
        assert_eq!(peer_inode(ia).expect("sock_diag"), Some(ib));
        assert_eq!(peer_inode(ib).expect("sock_diag"), Some(ia));
    }

    #[test]
    fn an_accepted_connection_names_the_client_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).expect("bind");
        let client = UnixStream::connect(&path).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let (is, ic) = (
            socket_inode(&server).unwrap(),
            socket_inode(&client).unwrap(),
        );
        assert_eq!(peer_inode(is).expect("sock_diag"), Some(ic));
        // The listener has no peer.
        let il = socket_inode(&listener).unwrap();
        assert_eq!(peer_inode(il).expect("sock_diag"), None);
        // Once the client end is closed, the server end names no peer.
        drop(client);
        assert_eq!(peer_inode(is).expect("sock_diag"), None);
    }

    #[test]
    fn an_unknown_socket_is_refused() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let ia = socket_inode(&a).unwrap();
        drop(a);
        let err = peer_inode(ia).expect_err("no such socket");
        assert!(matches!(err, SockDiagError::Refused { .. }), "{err}");
    }
}
