//! The attempts with more than one step or process: a socket handed to a second actor, exec,
//! a new network namespace, revocation with a connection open.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::socket::SockFlag;

use super::super::net::{self, observed};
use super::{Actor, ActorReport, ActorRequest, NETNS_READY, Role, move_to, setup};
use crate::credential::{self, RevokeTarget};

impl Actor {
    pub(super) fn receive_connect(&mut self) -> ActorReport {
        let r = net::recv_fd(0).and_then(|fd| {
            self.steps.push(format!("received socket as fd {fd}"));
            net::connect_fd(fd, &self.v4())
        });
        self.done(r)
    }

    /// Starts a second actor (same cgroup, no credential unless its role asks for one) with a
    /// unix socket as its stdin, sends it `fd`, and returns its report.
    pub(super) fn hand_over(&mut self, fd: OwnedFd, role: Role) -> Result<ActorReport, String> {
        let (mine, theirs) = UnixStream::pair().map_err(setup)?;
        let req = ActorRequest {
            role,
            cgroup: None,
            move_to: None,
            veth: None,
            ..self.req.clone()
        };
        let child = Command::new(std::env::current_exe().map_err(setup)?)
            .arg(super::super::harness::ACTOR_SUBCOMMAND)
            .arg(serde_json::to_string(&req).map_err(setup)?)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(setup)?;
        self.steps.push(format!("started stranger {}", child.id()));
        let sent = net::send_fd(mine.as_raw_fd(), fd.as_raw_fd());
        self.step("sent the socket (SCM_RIGHTS)", &sent);
        let out = child.wait_with_output().map_err(setup)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut report: ActorReport = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| format!("the stranger said {text:?}"))?;
        let mut steps = std::mem::take(&mut self.steps);
        steps.extend(report.steps.iter().map(|s| format!("stranger: {s}")));
        report.steps = steps;
        Ok(report)
    }

    pub(super) async fn exec_after_grant(&mut self) -> Result<ActorReport, String> {
        self.token("vault").await?;
        self.must_connect("holder connects")?;
        self.steps.push("exec".to_owned());
        let req = ActorRequest {
            role: Role::ConnectAfterExec,
            cgroup: None,
            carried_steps: std::mem::take(&mut self.steps),
            ..self.req.clone()
        };
        let err = Command::new(std::env::current_exe().map_err(setup)?)
            .arg(super::super::harness::ACTOR_SUBCOMMAND)
            .arg(serde_json::to_string(&req).map_err(setup)?)
            .exec();
        Err(format!("exec failed: {err}"))
    }

    pub(super) fn move_away(&mut self) -> Result<(), String> {
        let to = self
            .req
            .move_to
            .clone()
            .ok_or_else(|| "no move_to in the request".to_owned())?;
        move_to(&to).map_err(|e| format!("cannot move into {}: {e}", to.display()))?;
        self.steps.push(format!("moved into {}", to.display()));
        Ok(())
    }

    pub(super) fn netns_veth(&mut self) -> Result<ActorReport, String> {
        let plan = self
            .req
            .veth
            .clone()
            .ok_or_else(|| "no veth plan in the request".to_owned())?;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(setup)?;
        self.steps.push("unshare(CLONE_NEWNET)".to_owned());
        println!("{}", serde_json::json!({ NETNS_READY: std::process::id() }));
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        BufReader::new(std::io::stdin())
            .read_line(&mut line)
            .map_err(setup)?;
        if line.trim() != "go" {
            return Err(format!("the harness did not move the veth peer: {line:?}"));
        }
        let ns_addr = format!("{}/30", plan.ns_addr);
        for args in [
            vec!["addr", "add", ns_addr.as_str(), "dev", plan.peer.as_str()],
            vec!["link", "set", plan.peer.as_str(), "up"],
        ] {
            let st = Command::new("ip").args(&args).status().map_err(setup)?;
            if !st.success() {
                return Err(format!("ip {} failed: {st}", args.join(" ")));
            }
        }
        self.steps
            .push(format!("{} on {} in the new namespace", ns_addr, plan.peer));
        let host = IpAddr::V4(plan.host_addr);
        let control = net::connect_new(
            &SocketAddr::new(host, plan.control_port),
            false,
            SockFlag::empty(),
        )
        .map(drop);
        self.step(
            "control: connect to an unprotected port across the veth",
            &control,
        );
        let r = net::connect_new(
            &SocketAddr::new(host, self.req.port),
            false,
            SockFlag::empty(),
        )
        .map(drop);
        Ok(self.done(r))
    }

    async fn revoke(&mut self, jti: &str) -> Result<(), String> {
        credential::admin_revoke(&self.req.admin, &RevokeTarget::Jti(jti.to_owned()))
            .await
            .map_err(|e| format!("revocation failed: {e}"))?;
        self.steps.push(format!("revoked {jti}"));
        Ok(())
    }

    pub(super) async fn revoke_open_connection(&mut self) -> Result<ActorReport, String> {
        let jti = self.token("vault").await?;
        let fd = self.must_connect("holder connects")?;
        self.revoke(&jti).await?;
        let write = write_until_refused(fd.as_raw_fd()).await;
        self.step("write on the open connection after revocation", &write);
        let again = net::connect_new(&self.v4(), false, SockFlag::empty()).map(drop);
        self.step("new connect after revocation", &again);
        // The result is the open connection's; a new connect that is not refused is a failure
        // of its own.
        if again != Err(Errno::EPERM) {
            return Ok(ActorReport {
                result: format!("new connect after revocation: {}", observed(&again)),
                tgid: std::process::id(),
                steps: std::mem::take(&mut self.steps),
                skipped: None,
            });
        }
        Ok(self.done(write))
    }

    pub(super) async fn revoke_connected_udp(&mut self) -> Result<ActorReport, String> {
        let jti = self.token("dns").await?;
        let v4 = self.v4();
        let fd = net::connect_new(&v4, true, SockFlag::empty());
        let shown = fd.as_ref().map(drop).map_err(|e| *e);
        self.step("holder connects a UDP socket", &shown);
        let fd = fd.map_err(|e| format!("UDP connect with a credential failed: {e:?}"))?;
        self.revoke(&jti).await?;
        let r = write_until_refused(fd.as_raw_fd()).await;
        Ok(self.done(r))
    }
}

/// Writes on a connection every few milliseconds until a write fails or `REFUSAL_WITHIN`
/// passes: the agent ends the connection just after the revocation, not within its response.
async fn write_until_refused(fd: std::os::fd::RawFd) -> Result<(), Errno> {
    const REFUSAL_WITHIN: std::time::Duration = std::time::Duration::from_millis(500);
    let deadline = tokio::time::Instant::now() + REFUSAL_WITHIN;
    loop {
        let r = net::write_fd(fd);
        if r.is_err() || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
