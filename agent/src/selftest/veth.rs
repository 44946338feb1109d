//! The veth pair of the network-namespace attempt: a private /30 in 198.18.0.0/15 (reserved for
//! benchmarking, RFC 2544) chosen per harness, created with `ip` and deleted on drop.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::actor::VethPlan;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Names and addresses for one harness (nothing exists until [`Veth::create`]).
#[derive(Clone, Debug)]
pub struct VethNames {
    pub host: String,
    pub peer: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl VethNames {
    pub fn pick() -> Self {
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let block = pid.wrapping_mul(16).wrapping_add(n) % (1 << 15);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
        Self {
            host: format!("ts{pid:x}n{n}a"),
            peer: format!("ts{pid:x}n{n}b"),
            host_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
        }
    }
}

/// A created pair with listeners on the host end; deleted on drop.
pub struct Veth {
    names: VethNames,
    pub plan: VethPlan,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip ({e}): install iproute2"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Veth {
    /// Creates the pair, addresses the host end and listens on it (the protected `port` and an
    /// unprotected control port). Refuses when the /30 is already in use on this host.
    pub fn create(names: &VethNames, port: u16) -> Result<Self, String> {
        let existing = Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .map_err(|e| format!("cannot run ip ({e}): install iproute2"))?;
        let text = String::from_utf8_lossy(&existing.stdout);
        for addr in [names.host_addr, names.ns_addr] {
            if text.contains(&format!(" {addr}/")) {
                return Err(format!("{addr} is already in use on this host"));
            }
        }
        ip(&[
            "link",
            "add",
            &names.host,
            "type",
            "veth",
            "peer",
            "name",
            &names.peer,
        ])?;
        let veth = Self {
            names: names.clone(),
            plan: VethPlan {
                peer: names.peer.clone(),
                ns_addr: names.ns_addr,
                host_addr: names.host_addr,
                control_port: 0,
            },
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/30", names.host_addr),
            "dev",
            &names.host,
        ])?;
        ip(&["link", "set", &names.host, "up"])?;
        let mut veth = veth;
        let protected = TcpListener::bind((names.host_addr, port))
            .map_err(|e| format!("listen on {}:{port}: {e}", names.host_addr))?;
        let control = TcpListener::bind((names.host_addr, 0))
            .map_err(|e| format!("listen on {}: {e}", names.host_addr))?;
        veth.plan.control_port = control
            .local_addr()
            .map_err(|e| format!("control listener: {e}"))?
            .port();
        for l in [protected, control] {
            std::thread::spawn(move || for _c in l.incoming().flatten() {});
        }
        Ok(veth)
    }

    /// Moves the peer into the network namespace of `pid` (the actor after its unshare).
    pub fn give_peer_to(&self, pid: u32) -> Result<(), String> {
        ip(&["link", "set", &self.names.peer, "netns", &pid.to_string()])
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes both; the pair is already gone when the actor's namespace
        // died with the peer in it.
        let _ = ip(&["link", "del", &self.names.host]);
    }
}
