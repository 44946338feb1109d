//! The attempts and what each must observe: the syscall's result and the decision record.
//! docs/bypass-catalog.md explains each one; keep the two in step.

use serde::{Deserialize, Serialize};

mod expected;

/// One way of reaching a protected endpoint. The name (snake_case) is the attempt's id in the
/// table, the JSON report and `tessera selftest --only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Attempt {
    TcpConnect4,
    TcpConnect6,
    TcpConnectV4Mapped,
    TcpConnectNonblocking,
    TcpFastopenSendto,
    TcpFastopenSendmsg,
    TcpFastopenConnect,
    UdpConnect4,
    UdpConnect6,
    UdpSendto4,
    UdpSendto6,
    UdpSendmsg4,
    UdpSendmsg6,
    UdpSendmmsg4,
    UdpSendmmsg6,
    UringConnect4,
    UringConnect6,
    UringSendmsg4,
    UringSendmsg6,
    ScmRightsToStranger,
    ScmRightsFromStranger,
    ScmRightsConnectedSocket,
    ForkBindProcess,
    ForkBindWorkload,
    ExecAfterGrant,
    SetuidAfterGrant,
    CgroupMoveOtherWorkload,
    CgroupMoveNoWorkload,
    CgroupMoveOutside,
    NetnsVeth,
    RevokeOpenConnection,
    RevokeConnectedUdp,
    RawSocket4,
    RawSocket6,
    PacketSocket,
    TcpConnectV4Compat,
    EgressUnlistedTcp,
    EgressUnlistedUdp,
    RawUdpUnrestricted,
    HostnameEndpoint,
    TcpConnectUnspecified4,
    TcpConnectUnspecified6,
    TcpConnectUnspecifiedMapped,
    TcpConnectLoopbackAlias,
    TcpConnectHostAddress,
}

/// Where the actor starts: which child of the scratch cgroup (see `policy.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// Workload `app`: `bind: process` rules to `vault` (tcp) and `dns` (udp).
    App,
    /// Workload `team`: a `bind: workload` rule to `vault`.
    Team,
    /// Workload `root-app` (uid 0) with a rule; `uid-any` (any other uid) without one.
    Uid,
    /// Workload `locked`: `egress: allowlist`, a `bind: process` rule to `vault` only.
    Locked,
    /// No workload.
    Nobody,
}

/// What the syscall returned: `ok`, or the errno's name (serialized that way too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Refused with this errno (by name, e.g. `EPERM`).
    Refused(&'static str),
    /// The call went through.
    Allowed,
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_observed())
    }
}

impl Outcome {
    /// The actor's spelling of this outcome (`ok` or the errno name).
    pub fn as_observed(&self) -> &'static str {
        match self {
            Self::Refused(errno) => errno,
            Self::Allowed => "ok",
        }
    }
}

/// The decision record the attempt must leave (for the process that made the decided call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExpectedRecord {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub hook: &'static str,
}

/// What an attempt must observe, and why.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Expected {
    pub result: Outcome,
    /// None: no record is expected (the call never reached a hook).
    pub record: Option<ExpectedRecord>,
    /// What stops it (hook and map), or why it is allowed.
    pub stopped_by: &'static str,
    /// Set when the expected result is a known way through that Tessera does not stop today
    /// (documented in docs/bypass-catalog.md): the table says so instead of hiding it.
    pub gap: Option<&'static str>,
}

impl Attempt {
    pub const ALL: [Attempt; 45] = [
        Self::TcpConnect4,
        Self::TcpConnect6,
        Self::TcpConnectV4Mapped,
        Self::TcpConnectNonblocking,
        Self::TcpFastopenSendto,
        Self::TcpFastopenSendmsg,
        Self::TcpFastopenConnect,
        Self::UdpConnect4,
        Self::UdpConnect6,
        Self::UdpSendto4,
        Self::UdpSendto6,
        Self::UdpSendmsg4,
        Self::UdpSendmsg6,
        Self::UdpSendmmsg4,
        Self::UdpSendmmsg6,
        Self::UringConnect4,
        Self::UringConnect6,
        Self::UringSendmsg4,
        Self::UringSendmsg6,
        Self::ScmRightsToStranger,
        Self::ScmRightsFromStranger,
        Self::ScmRightsConnectedSocket,
        Self::ForkBindProcess,
        Self::ForkBindWorkload,
        Self::ExecAfterGrant,
        Self::SetuidAfterGrant,
        Self::CgroupMoveOtherWorkload,
        Self::CgroupMoveNoWorkload,
        Self::CgroupMoveOutside,
        Self::NetnsVeth,
        Self::RevokeOpenConnection,
        Self::RevokeConnectedUdp,
        Self::RawSocket4,
        Self::RawSocket6,
        Self::PacketSocket,
        Self::TcpConnectV4Compat,
        Self::EgressUnlistedTcp,
        Self::EgressUnlistedUdp,
        Self::RawUdpUnrestricted,
        Self::HostnameEndpoint,
        Self::TcpConnectUnspecified4,
        Self::TcpConnectUnspecified6,
        Self::TcpConnectUnspecifiedMapped,
        Self::TcpConnectLoopbackAlias,
        Self::TcpConnectHostAddress,
    ];

    /// The attempt's id (snake_case).
    pub fn name(self) -> &'static str {
        use Attempt::*;
        match self {
            TcpConnect4 => "tcp_connect4",
            TcpConnect6 => "tcp_connect6",
            TcpConnectV4Mapped => "tcp_connect_v4_mapped",
            TcpConnectNonblocking => "tcp_connect_nonblocking",
            TcpFastopenSendto => "tcp_fastopen_sendto",
            TcpFastopenSendmsg => "tcp_fastopen_sendmsg",
            TcpFastopenConnect => "tcp_fastopen_connect",
            UdpConnect4 => "udp_connect4",
            UdpConnect6 => "udp_connect6",
            UdpSendto4 => "udp_sendto4",
            UdpSendto6 => "udp_sendto6",
            UdpSendmsg4 => "udp_sendmsg4",
            UdpSendmsg6 => "udp_sendmsg6",
            UdpSendmmsg4 => "udp_sendmmsg4",
            UdpSendmmsg6 => "udp_sendmmsg6",
            UringConnect4 => "uring_connect4",
            UringConnect6 => "uring_connect6",
            UringSendmsg4 => "uring_sendmsg4",
            UringSendmsg6 => "uring_sendmsg6",
            ScmRightsToStranger => "scm_rights_to_stranger",
            ScmRightsFromStranger => "scm_rights_from_stranger",
            ScmRightsConnectedSocket => "scm_rights_connected_socket",
            ForkBindProcess => "fork_bind_process",
            ForkBindWorkload => "fork_bind_workload",
            ExecAfterGrant => "exec_after_grant",
            SetuidAfterGrant => "setuid_after_grant",
            CgroupMoveOtherWorkload => "cgroup_move_other_workload",
            CgroupMoveNoWorkload => "cgroup_move_no_workload",
            CgroupMoveOutside => "cgroup_move_outside",
            NetnsVeth => "netns_veth",
            RevokeOpenConnection => "revoke_open_connection",
            RevokeConnectedUdp => "revoke_connected_udp",
            RawSocket4 => "raw_socket4",
            RawSocket6 => "raw_socket6",
            PacketSocket => "packet_socket",
            TcpConnectV4Compat => "tcp_connect_v4_compat",
            EgressUnlistedTcp => "egress_unlisted_tcp",
            EgressUnlistedUdp => "egress_unlisted_udp",
            RawUdpUnrestricted => "raw_udp_unrestricted",
            HostnameEndpoint => "hostname_endpoint",
            TcpConnectUnspecified4 => "tcp_connect_unspecified4",
            TcpConnectUnspecified6 => "tcp_connect_unspecified6",
            TcpConnectUnspecifiedMapped => "tcp_connect_unspecified_mapped",
            TcpConnectLoopbackAlias => "tcp_connect_loopback_alias",
            TcpConnectHostAddress => "tcp_connect_host_address",
        }
    }

    /// One line: what the actor does.
    pub fn describe(self) -> &'static str {
        use Attempt::*;
        match self {
            TcpConnect4 => "TCP connect to 127.0.0.1 without a credential",
            TcpConnect6 => "TCP connect to ::1 without a credential",
            TcpConnectV4Mapped => "TCP connect to ::ffff:127.0.0.1 (AF_INET6 socket)",
            TcpConnectNonblocking => "non-blocking TCP connect (must be EPERM, not EINPROGRESS)",
            TcpFastopenSendto => "TCP Fast Open: sendto(MSG_FASTOPEN) on an unconnected socket",
            TcpFastopenSendmsg => "TCP Fast Open: sendmsg(MSG_FASTOPEN) on an unconnected socket",
            TcpFastopenConnect => "TCP_FASTOPEN_CONNECT socket option, then connect and write",
            UdpConnect4 => "UDP connect to 127.0.0.1, then send",
            UdpConnect6 => "UDP connect to ::1, then send",
            UdpSendto4 => "UDP sendto 127.0.0.1 without connect",
            UdpSendto6 => "UDP sendto ::1 without connect",
            UdpSendmsg4 => "UDP sendmsg with a 127.0.0.1 address",
            UdpSendmsg6 => "UDP sendmsg with a ::1 address",
            UdpSendmmsg4 => "UDP sendmmsg, two messages to 127.0.0.1",
            UdpSendmmsg6 => "UDP sendmmsg, two messages to ::1",
            UringConnect4 => "io_uring IORING_OP_CONNECT to 127.0.0.1",
            UringConnect6 => "io_uring IORING_OP_CONNECT to ::1",
            UringSendmsg4 => "io_uring IORING_OP_SENDMSG (UDP) to 127.0.0.1",
            UringSendmsg6 => "io_uring IORING_OP_SENDMSG (UDP) to ::1",
            ScmRightsToStranger => {
                "holder creates a TCP socket, passes it (SCM_RIGHTS) to a process without a credential, which connects"
            }
            ScmRightsFromStranger => {
                "a process without a credential creates a TCP socket and passes it to the holder, which connects"
            }
            ScmRightsConnectedSocket => {
                "holder connects, then passes the open connection to a process without a credential, which writes"
            }
            ForkBindProcess => "holder of a bind: process credential forks; the child connects",
            ForkBindWorkload => "holder of a bind: workload credential forks; the child connects",
            ExecAfterGrant => {
                "holder of a bind: process credential execs a new program image, which connects"
            }
            SetuidAfterGrant => {
                "root holder (workload selected by uid 0) calls setuid(65534), then connects"
            }
            CgroupMoveOtherWorkload => {
                "holder moves itself into a cgroup of another workload, then connects"
            }
            CgroupMoveNoWorkload => {
                "holder moves itself into a cgroup of no workload, then connects"
            }
            CgroupMoveOutside => {
                "process without a credential moves itself out of the enforced cgroup subtree, then connects"
            }
            NetnsVeth => {
                "unshare(CLONE_NEWNET), then connect through a veth pair to a protected address in the host namespace"
            }
            RevokeOpenConnection => {
                "holder connects, its credential is revoked, it writes on the open connection, then connects again"
            }
            RevokeConnectedUdp => {
                "holder connects a UDP socket, its credential is revoked, it sends on the connected socket"
            }
            RawSocket4 => "socket(AF_INET, SOCK_RAW, IPPROTO_UDP) in a workload with rules",
            RawSocket6 => "socket(AF_INET6, SOCK_RAW, IPPROTO_UDP) in a workload with rules",
            PacketSocket => {
                "socket(AF_PACKET, SOCK_RAW) in a workload with rules (in a forked child)"
            }
            TcpConnectV4Compat => "TCP connect to the IPv4-compatible ::127.0.0.1",
            EgressUnlistedTcp => {
                "workload with egress: allowlist connects to a loopback port no endpoint covers"
            }
            EgressUnlistedUdp => {
                "workload with egress: allowlist sends UDP to a loopback port no endpoint covers"
            }
            RawUdpUnrestricted => {
                "process of no workload sends a hand-made UDP datagram to the protected UDP endpoint over a raw socket"
            }
            HostnameEndpoint => {
                "TCP connect to the address the agent resolved for an endpoint's hosts: name"
            }
            TcpConnectUnspecified4 => "TCP connect to the unspecified 0.0.0.0 (reaches loopback)",
            TcpConnectUnspecified6 => "TCP connect to the unspecified :: (reaches loopback)",
            TcpConnectUnspecifiedMapped => {
                "TCP connect to ::ffff:0.0.0.0 on an AF_INET6 socket (reaches loopback)"
            }
            TcpConnectLoopbackAlias => {
                "TCP connect to 127.0.0.2, a loopback address the endpoint does not name"
            }
            TcpConnectHostAddress => {
                "TCP connect to an address of this host's own interfaces that no endpoint names"
            }
        }
    }

    /// Where the actor starts.
    pub fn place(self) -> Place {
        match self {
            Self::ForkBindWorkload => Place::Team,
            Self::SetuidAfterGrant => Place::Uid,
            Self::EgressUnlistedTcp | Self::EgressUnlistedUdp => Place::Locked,
            Self::RawUdpUnrestricted => Place::Nobody,
            _ => Place::App,
        }
    }

    /// Whether the decision record names no destination port (socket creation) or the port no
    /// endpoint covers (egress), rather than the protected port.
    pub fn record_port(self, protected: u16, unlisted: u16) -> u16 {
        match self {
            Self::RawSocket4 | Self::RawSocket6 | Self::PacketSocket => 0,
            Self::EgressUnlistedTcp | Self::EgressUnlistedUdp => unlisted,
            _ => protected,
        }
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for a in Attempt::ALL {
            let json = serde_json::to_value(a).expect("serialize");
            assert_eq!(json, serde_json::json!(a.name()), "{a:?}");
            assert!(seen.insert(a.name()), "duplicate {}", a.name());
        }
    }

    #[test]
    fn every_gap_is_explained_and_every_refusal_has_a_record() {
        for a in Attempt::ALL {
            let e = a.expected();
            if let Outcome::Refused(_) = e.result {
                assert!(e.record.is_some(), "{a} is refused without a record");
            }
            if e.result == Outcome::Allowed && e.gap.is_none() {
                assert_eq!(e.record.map(|r| r.verdict), Some("allow"), "{a}");
            }
        }
    }
}
