//! The actor: `tessera selftest-actor REQUEST_JSON` performs one attempt from inside the scratch
//! cgroup and prints one JSON [`ActorReport`] line. Some attempts start a second actor (a
//! stranger that receives a socket) or exec a new one; those print their own report, which the
//! first actor passes on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::SockFlag;
use serde::{Deserialize, Serialize};

use super::catalog::Attempt;
use super::net::{self, UdpSend, observed};
use super::syscalls;
use crate::credential::{self, TokenRequest};

mod staged;

/// What one actor process does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Perform this attempt.
    Attempt(Attempt),
    /// Receive a socket on stdin (SCM_RIGHTS), connect it to `vault`.
    ReceiveConnect,
    /// Ask for a credential, then receive a socket on stdin and connect it.
    TokenReceiveConnect,
    /// Receive a connected socket on stdin and write on it.
    ReceiveWrite,
    /// After exec: connect to `vault` (a grant from before the exec may still apply).
    ConnectAfterExec,
}

/// The veth pair of the network-namespace attempt: the harness moves `peer` into the actor's
/// new namespace; the actor addresses it and connects to `host` across it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethPlan {
    pub peer: String,
    pub ns_addr: Ipv4Addr,
    pub host_addr: Ipv4Addr,
    /// An unprotected listener on `host_addr`: proves the path works when no endpoint matches.
    pub control_port: u16,
}

/// The actor's command line (one JSON argument).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorRequest {
    pub role: Role,
    /// Moves itself here first (absent: stays where it was started).
    pub cgroup: Option<PathBuf>,
    pub api: PathBuf,
    pub admin: PathBuf,
    /// The protected port (TCP `vault` and UDP `dns`).
    pub port: u16,
    /// A loopback port (TCP and UDP) that no endpoint covers, for the egress attempts.
    #[serde(default)]
    pub unlisted_port: u16,
    /// For the cgroup-move attempts.
    pub move_to: Option<PathBuf>,
    pub veth: Option<VethPlan>,
    /// Steps taken before an exec, carried into the new program image's report.
    #[serde(default)]
    pub carried_steps: Vec<String>,
}

/// What the actor observed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorReport {
    /// `ok`, an errno name (`EPERM`), or `setup: …` when the attempt could not be made.
    pub result: String,
    /// The process whose call was decided (its decision record carries this tgid).
    pub tgid: u32,
    /// What happened on the way, in order.
    pub steps: Vec<String>,
    /// Set when this kernel cannot make the attempt at all (the attempt is skipped).
    pub skipped: Option<String>,
}

/// The line the network-namespace actor prints once it is in its new namespace; the harness
/// answers with one line on stdin when the veth peer is there.
pub const NETNS_READY: &str = "netns_ready";

struct Actor {
    req: ActorRequest,
    steps: Vec<String>,
}

/// Performs the request and returns the report to print.
pub async fn run(req: ActorRequest) -> ActorReport {
    if let Some(cgroup) = &req.cgroup
        && let Err(e) = move_to(cgroup)
    {
        return setup_failed(format!("cannot enter {}: {e}", cgroup.display()));
    }
    let mut actor = Actor {
        steps: req.carried_steps.clone(),
        req,
    };
    match actor.perform().await {
        Ok(report) => report,
        Err(why) => ActorReport {
            result: format!("setup: {why}"),
            tgid: std::process::id(),
            steps: actor.steps,
            skipped: None,
        },
    }
}

fn setup_failed(why: String) -> ActorReport {
    ActorReport {
        result: format!("setup: {why}"),
        tgid: std::process::id(),
        ..ActorReport::default()
    }
}

/// Writes this process into `cgroup` (all its threads move with it).
pub fn move_to(cgroup: &Path) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
}

impl Actor {
    fn v4(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.req.port)
    }

    fn v6(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.req.port)
    }

    fn mapped(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            self.req.port,
        )
    }

    fn unlisted(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.req.unlisted_port)
    }

    /// `ip` on the protected port.
    fn at(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.req.port)
    }

    /// The report of a forked child: its result, or the signal that ended it.
    fn forked(&mut self, (child, end): (nix::unistd::Pid, syscalls::ChildEnd)) -> ActorReport {
        self.steps.push(format!("forked child {child}"));
        let tgid = child.as_raw() as u32;
        match end {
            syscalls::ChildEnd::Exited(r) => self.done_as(tgid, r),
            syscalls::ChildEnd::Killed(signal) => {
                let mut report = self.done_as(tgid, Ok(()));
                report.result = signal.as_str().to_owned();
                report
            }
        }
    }

    fn done(&mut self, result: Result<(), Errno>) -> ActorReport {
        self.done_as(std::process::id(), result)
    }

    fn done_as(&mut self, tgid: u32, result: Result<(), Errno>) -> ActorReport {
        ActorReport {
            result: observed(&result),
            tgid,
            steps: std::mem::take(&mut self.steps),
            skipped: None,
        }
    }

    fn step(&mut self, what: &str, result: &Result<(), Errno>) {
        self.steps.push(format!("{what}: {}", observed(result)));
    }

    /// Asks the Workload API for a credential for this process; returns its jti.
    async fn token(&mut self, audience: &str) -> Result<String, String> {
        let req = TokenRequest {
            audience: audience.to_owned(),
            task: Some("tessera-selftest".to_owned()),
            ttl_seconds: Some(120),
            scopes: None,
            subject_token: None,
            evidence_tokens: Vec::new(),
        };
        match credential::request_token(&self.req.api, &req).await {
            Ok(resp) => {
                self.steps
                    .push(format!("credential for {audience}: jti {}", resp.jti));
                Ok(resp.jti)
            }
            Err(e) => Err(format!("credential for {audience} refused: {e}")),
        }
    }

    /// A connect that must succeed before the attempt proper (it proves the grant works).
    fn must_connect(&mut self, what: &str) -> Result<OwnedFd, String> {
        let r = net::connect_new(&self.v4(), false, SockFlag::empty());
        let shown = r.as_ref().map(drop).map_err(|e| *e);
        self.step(what, &shown);
        r.map_err(|e| format!("{what} failed ({e:?}): the grant did not work"))
    }

    async fn perform(&mut self) -> Result<ActorReport, String> {
        use Attempt::*;
        let role = self.req.role.clone();
        let attempt = match role {
            Role::Attempt(a) => a,
            Role::ReceiveConnect => return Ok(self.receive_connect()),
            Role::TokenReceiveConnect => {
                self.token("vault").await?;
                return Ok(self.receive_connect());
            }
            Role::ReceiveWrite => {
                let r = net::recv_fd(0).and_then(net::write_fd);
                return Ok(self.done(r));
            }
            Role::ConnectAfterExec => {
                let r = net::connect_new(&self.v4(), false, SockFlag::empty()).map(drop);
                return Ok(self.done(r));
            }
        };
        let (v4, v6, mapped) = (self.v4(), self.v6(), self.mapped());
        let tcp = |a: &SocketAddr, flags| net::connect_new(a, false, flags).map(drop);
        let r = match attempt {
            TcpConnect4 => tcp(&v4, SockFlag::empty()),
            TcpConnect6 => tcp(&v6, SockFlag::empty()),
            TcpConnectV4Mapped => tcp(&mapped, SockFlag::empty()),
            TcpConnectNonblocking => tcp(&v4, SockFlag::SOCK_NONBLOCK),
            TcpFastopenSendto => net::fastopen_send(&v4, false),
            TcpFastopenSendmsg => net::fastopen_send(&v4, true),
            TcpFastopenConnect => net::fastopen_connect(&v4),
            UdpConnect4 => net::udp_connect_send(&v4),
            UdpConnect6 => net::udp_connect_send(&v6),
            UdpSendto4 => net::udp_send(&v4, UdpSend::Sendto),
            UdpSendto6 => net::udp_send(&v6, UdpSend::Sendto),
            UdpSendmsg4 => net::udp_send(&v4, UdpSend::Sendmsg),
            UdpSendmsg6 => net::udp_send(&v6, UdpSend::Sendmsg),
            UdpSendmmsg4 => net::udp_send(&v4, UdpSend::Sendmmsg),
            UdpSendmmsg6 => net::udp_send(&v6, UdpSend::Sendmmsg),
            UringConnect4 => return Ok(self.uring(syscalls::uring_connect(&v4))),
            UringConnect6 => return Ok(self.uring(syscalls::uring_connect(&v6))),
            UringSendmsg4 => return Ok(self.uring(syscalls::uring_sendmsg(&v4))),
            UringSendmsg6 => return Ok(self.uring(syscalls::uring_sendmsg(&v6))),
            ScmRightsToStranger => {
                self.token("vault").await?;
                let fd = net::new_socket(&v4, false, SockFlag::empty()).map_err(setup)?;
                self.steps.push("created a TCP socket".to_owned());
                return self.hand_over(fd, Role::ReceiveConnect);
            }
            ScmRightsFromStranger => {
                let fd = net::new_socket(&v4, false, SockFlag::empty()).map_err(setup)?;
                self.steps
                    .push("created a TCP socket (no credential)".to_owned());
                return self.hand_over(fd, Role::TokenReceiveConnect);
            }
            ScmRightsConnectedSocket => {
                self.token("vault").await?;
                let fd = self.must_connect("holder connects")?;
                let mut report = self.hand_over(fd, Role::ReceiveWrite)?;
                // The decision on record is the holder's connect.
                report.tgid = std::process::id();
                return Ok(report);
            }
            ForkBindProcess | ForkBindWorkload => {
                self.token("vault").await?;
                self.must_connect("holder connects")?;
                let forked = syscalls::fork_and_connect(&v4).map_err(setup)?;
                return Ok(self.forked(forked));
            }
            RawSocket4 => net::raw_socket(false),
            RawSocket6 => net::raw_socket(true),
            PacketSocket => {
                let forked = syscalls::fork_and_packet_socket().map_err(setup)?;
                return Ok(self.forked(forked));
            }
            TcpConnectV4Compat => {
                let compat = Ipv4Addr::LOCALHOST.to_ipv6_compatible();
                tcp(
                    &SocketAddr::new(IpAddr::V6(compat), self.req.port),
                    SockFlag::empty(),
                )
            }
            EgressUnlistedTcp => tcp(&self.unlisted(), SockFlag::empty()),
            TcpConnectUnspecified4 => {
                tcp(&self.at(Ipv4Addr::UNSPECIFIED.into()), SockFlag::empty())
            }
            TcpConnectUnspecified6 => {
                tcp(&self.at(Ipv6Addr::UNSPECIFIED.into()), SockFlag::empty())
            }
            TcpConnectUnspecifiedMapped => tcp(
                &self.at(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().into()),
                SockFlag::empty(),
            ),
            TcpConnectLoopbackAlias => tcp(
                &self.at(Ipv4Addr::new(127, 0, 0, 2).into()),
                SockFlag::empty(),
            ),
            TcpConnectHostAddress => {
                let plan = self
                    .req
                    .veth
                    .as_ref()
                    .ok_or_else(|| "no host address was made".to_owned())?;
                let addr = self.at(plan.host_addr.into());
                tcp(&addr, SockFlag::empty())
            }
            HostnameEndpoint => {
                let addr =
                    SocketAddr::new(IpAddr::V4(super::harness::HOSTNAME_ADDR), self.req.port);
                tcp(&addr, SockFlag::empty())
            }
            EgressUnlistedUdp => net::udp_send(&self.unlisted(), UdpSend::Sendto),
            RawUdpUnrestricted => net::raw_udp_send(std::net::SocketAddrV4::new(
                Ipv4Addr::LOCALHOST,
                self.req.port,
            )),
            ExecAfterGrant => return self.exec_after_grant().await,
            SetuidAfterGrant => {
                self.token("vault").await?;
                self.must_connect("connect as uid 0")?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).map_err(setup)?;
                self.steps.push("setuid(65534)".to_owned());
                tcp(&v4, SockFlag::empty())
            }
            CgroupMoveOtherWorkload | CgroupMoveNoWorkload => {
                self.token("vault").await?;
                self.must_connect("connect before the move")?;
                self.move_away()?;
                tcp(&v4, SockFlag::empty())
            }
            CgroupMoveOutside => {
                let before = tcp(&v4, SockFlag::empty());
                self.step("connect before the move", &before);
                self.move_away()?;
                tcp(&v4, SockFlag::empty())
            }
            NetnsVeth => return self.netns_veth(),
            RevokeOpenConnection => return self.revoke_open_connection().await,
            RevokeConnectedUdp => return self.revoke_connected_udp().await,
        };
        Ok(self.done(r))
    }

    fn uring(&mut self, r: Result<Result<(), Errno>, syscalls::UringUnavailable>) -> ActorReport {
        match r {
            Ok(r) => self.done(r),
            Err(e) => ActorReport {
                result: "skipped".to_owned(),
                tgid: std::process::id(),
                steps: std::mem::take(&mut self.steps),
                skipped: Some(format!("io_uring unavailable here: {e}")),
            },
        }
    }
}

fn setup(e: impl std::fmt::Display) -> String {
    e.to_string()
}
