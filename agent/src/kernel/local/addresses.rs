//! The host's interface addresses, from rtnetlink: a dump (`RTM_GETADDR`) and a subscription
//! to their changes (`RTM_NEWADDR`/`RTM_DELADDR` on the IPv4 and IPv6 address groups), in the
//! agent's own network namespace.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_ROUTE};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::TimeVal;
use tokio::io::unix::AsyncFd;

use super::HostAddresses;

/// The kernel answers a dump at once; this only bounds one that never does.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Every address of the agent's network namespace's interfaces (the local address of a
/// point-to-point link, not its peer).
pub fn current() -> io::Result<HostAddresses> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    setsockopt(
        &socket,
        ReceiveTimeout,
        &TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0),
    )?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut found = Vec::new();
    loop {
        let (answer, _) = socket.recv_from_full()?;
        let mut rest = answer.as_slice();
        while !rest.is_empty() {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink answer: {e}"))
                })?;
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                    found.extend(local_address(&address));
                }
                NetlinkPayload::Done(_) => return Ok(HostAddresses::new(found)),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
            let length = message.header.length as usize;
            if length == 0 || length > rest.len() {
                break;
            }
            rest = &rest[length..];
        }
    }
}

/// `IFA_LOCAL` when the message has it (on a point-to-point link `IFA_ADDRESS` is the peer),
/// else `IFA_ADDRESS`.
fn local_address(message: &AddressMessage) -> Option<IpAddr> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// A subscription to the address changes of the agent's network namespace.
pub struct AddressWatch {
    socket: AsyncFd<Socket>,
}

impl AddressWatch {
    /// Subscribes; open it before reading [`current`] so that no change falls in between.
    pub fn open() -> io::Result<AddressWatch> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        socket.bind(&NetlinkAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        Ok(AddressWatch {
            socket: register(socket)?,
        })
    }

    /// Waits for the next change and takes every notification queued: the caller reads
    /// [`current`] again (a notification lost to a full buffer, `ENOBUFS`, is a change too).
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut ready = self.socket.readable().await?;
            let mut took = false;
            loop {
                match ready.get_inner().recv(&mut &mut buf[..], 0) {
                    Ok(_) => took = true,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => took = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if took {
                return Ok(());
            }
        }
    }
}

/// Registers the socket with tokio's reactor.
#[expect(
    deprecated,
    reason = "AsyncFd::register is unsafe and the agent forbids unsafe; the netlink Socket owns \
              its fd for as long as the AsyncFd holds it, which is what register requires"
)]
fn register(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    AsyncFd::new(socket)
}
