//! What each attempt must observe (`Attempt::expected`): the syscall's result, the decision
//! record, what stops it, and whether it is a documented gap.

use super::{Attempt, Expected, ExpectedRecord, Outcome};

const fn deny(reason: &'static str, hook: &'static str) -> Option<ExpectedRecord> {
    Some(ExpectedRecord {
        verdict: "deny",
        reason,
        hook,
    })
}

const fn allow(hook: &'static str) -> Option<ExpectedRecord> {
    Some(ExpectedRecord {
        verdict: "allow",
        reason: "credential_valid",
        hook,
    })
}

const EPERM: Outcome = Outcome::Refused("EPERM");
const CONNECT: &str =
    "cgroup/connect4|6 program; ENDPOINTS_EXACT, WORKLOADS, RULES, PROCESS_GRANTS";
const SENDMSG: &str =
    "cgroup/sendmsg4|6 program; ENDPOINTS_EXACT, WORKLOADS, RULES, PROCESS_GRANTS";

impl Attempt {
    /// What this attempt must observe.
    pub fn expected(self) -> Expected {
        use Attempt::*;
        let refused = |reason, hook, stopped_by| Expected {
            result: EPERM,
            record: deny(reason, hook),
            stopped_by,
            gap: None,
        };
        match self {
            TcpConnect4 | TcpConnectNonblocking => refused("no_credential", "connect4", CONNECT),
            TcpConnect6 => refused("no_credential", "connect6", CONNECT),
            TcpConnectV4Mapped => refused(
                "no_credential",
                "connect6",
                "cgroup/connect6 normalises ::ffff:a.b.c.d to the IPv4 endpoint; ENDPOINTS_EXACT",
            ),
            TcpFastopenSendto | TcpFastopenSendmsg => refused(
                "no_credential",
                "connect4",
                "the kernel runs the connect4 program (pre_connect) before a Fast Open SYN",
            ),
            TcpFastopenConnect => refused(
                "no_credential",
                "connect4",
                "connect() runs the connect4 program even when the SYN is deferred to the first write",
            ),
            UdpConnect4 => refused("no_credential", "connect4", CONNECT),
            UdpConnect6 => refused("no_credential", "connect6", CONNECT),
            UdpSendto4 | UdpSendmsg4 | UdpSendmmsg4 => {
                refused("no_credential", "sendmsg4", SENDMSG)
            }
            UdpSendto6 | UdpSendmsg6 | UdpSendmmsg6 => {
                refused("no_credential", "sendmsg6", SENDMSG)
            }
            UringConnect4 => refused(
                "no_credential",
                "connect4",
                "io_uring's connect runs the same socket connect path: cgroup/connect4",
            ),
            UringConnect6 => refused(
                "no_credential",
                "connect6",
                "io_uring's connect runs the same socket connect path: cgroup/connect6",
            ),
            UringSendmsg4 => refused(
                "no_credential",
                "sendmsg4",
                "io_uring's sendmsg runs udp_sendmsg: cgroup/sendmsg4",
            ),
            UringSendmsg6 => refused(
                "no_credential",
                "sendmsg6",
                "io_uring's sendmsg runs udpv6_sendmsg: cgroup/sendmsg6",
            ),
            ScmRightsToStranger => refused(
                "no_credential",
                "connect4",
                "the decision uses the caller's tgid (PROCESS_GRANTS), not the socket's creator",
            ),
            ScmRightsFromStranger => Expected {
                result: Outcome::Allowed,
                record: allow("connect4"),
                stopped_by: "allowed: the caller holds the credential (PROCESS_GRANTS by caller tgid)",
                gap: None,
            },
            ScmRightsConnectedSocket => Expected {
                result: Outcome::Allowed,
                record: allow("connect4"),
                stopped_by: "nothing: writes on an established connection reach no hook",
                gap: Some("a credential holder can hand an open connection to another process"),
            },
            ForkBindProcess => refused(
                "no_credential",
                "connect4",
                "PROCESS_GRANTS is keyed by tgid; the child has its own",
            ),
            ForkBindWorkload => Expected {
                result: Outcome::Allowed,
                record: allow("connect4"),
                stopped_by: "allowed: WORKLOAD_GRANTS covers every process of the workload",
                gap: None,
            },
            ExecAfterGrant => refused(
                "no_credential",
                "connect4",
                "the sched_process_exec tracepoint deletes the process's PROCESS_GRANTS",
            ),
            SetuidAfterGrant => refused(
                "workload_not_allowed",
                "connect4",
                "WORKLOADS is looked up by (cgroup, uid) at each connect; the grant names root-app",
            ),
            CgroupMoveOtherWorkload => refused(
                "workload_not_allowed",
                "connect4",
                "WORKLOADS is looked up by the caller's current cgroup ancestry at each connect",
            ),
            CgroupMoveNoWorkload => refused(
                "unknown_workload",
                "connect4",
                "WORKLOADS has no entry for the new cgroup",
            ),
            CgroupMoveOutside => Expected {
                result: Outcome::Allowed,
                record: None,
                stopped_by: "nothing: the programs run only for the attached cgroup's subtree",
                gap: Some(
                    "a process allowed to write cgroup.procs elsewhere leaves enforcement (attach at the cgroup v2 root in production)",
                ),
            },
            NetnsVeth => refused(
                "no_credential",
                "connect4",
                "cgroup programs run in every network namespace: cgroup/connect4",
            ),
            RawSocket4 | RawSocket6 => refused(
                "raw_socket_refused",
                "sock_create",
                "cgroup/sock_create refuses raw IP sockets to restricted workloads (WORKLOADS flags)",
            ),
            PacketSocket => Expected {
                result: Outcome::Refused("SIGKILL"),
                record: deny("packet_socket_refused", "socket_syscall"),
                stopped_by: "syscalls/sys_enter_socket kills a restricted workload asking for a packet socket (it never reaches sock_create)",
                gap: None,
            },
            TcpConnectV4Compat => refused(
                "no_credential",
                "connect6",
                "cgroup/connect6 decides ::a.b.c.d as a.b.c.d; ENDPOINTS_EXACT",
            ),
            EgressUnlistedTcp => refused(
                "egress_not_allowlisted",
                "connect4",
                "cgroup/connect4: a destination no endpoint covers is refused to a workload with egress: allowlist",
            ),
            EgressUnlistedUdp => refused(
                "egress_not_allowlisted",
                "sendmsg4",
                "cgroup/sendmsg4: same allow-list check for unconnected UDP",
            ),
            RawUdpUnrestricted => Expected {
                result: Outcome::Allowed,
                record: None,
                stopped_by: "nothing: raw sockets are refused only to restricted workloads, and a raw send reaches no sendmsg hook",
                gap: Some(
                    "a process of no workload (or of a workload without rules) with CAP_NET_RAW can send hand-made packets to a protected UDP endpoint",
                ),
            },
            TcpConnectUnspecified4 => refused(
                "no_credential",
                "connect4",
                "cgroup/connect4 decides 0.0.0.0 as the loopback the kernel delivers it to; ENDPOINTS_EXACT",
            ),
            TcpConnectUnspecified6 | TcpConnectUnspecifiedMapped => refused(
                "no_credential",
                "connect6",
                "cgroup/connect6 decides :: as ::1 and ::ffff:0.0.0.0 as 127.0.0.1; ENDPOINTS_EXACT",
            ),
            TcpConnectLoopbackAlias => refused(
                "no_credential",
                "connect4",
                "a local endpoint is protected on all of 127.0.0.0/8 (ENDPOINTS_CIDR entries the agent derives); cgroup/connect4",
            ),
            TcpConnectHostAddress => refused(
                "no_credential",
                "connect4",
                "a local endpoint is protected on each host address the agent follows through rtnetlink (ENDPOINTS_EXACT); cgroup/connect4",
            ),
            HostnameEndpoint => refused(
                "no_credential",
                "connect4",
                "the agent resolves hosts: and writes each address into ENDPOINTS_EXACT; cgroup/connect4",
            ),
            RevokeOpenConnection => Expected {
                result: Outcome::Refused("ECONNABORTED"),
                record: deny("credential_revoked", "connection"),
                stopped_by: "CONNECTIONS (recorded by cgroup/connect4) checked against the grants after the revocation; the agent destroys the socket (SOCK_DESTROY over sock_diag, a TCP reset); new connects: credential_revoked",
                gap: None,
            },
            RevokeConnectedUdp => Expected {
                result: Outcome::Refused("EDESTADDRREQ"),
                record: deny("credential_revoked", "connection"),
                stopped_by: "CONNECTIONS (recorded by cgroup/connect4) checked against the grants after the revocation; the agent destroys the socket (SOCK_DESTROY over sock_diag disconnects it)",
                gap: None,
            },
        }
    }
}
