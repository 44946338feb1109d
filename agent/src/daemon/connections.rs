//! Connections live only while their holder holds a valid credential: after every revocation,
//! and at each expiry of a grant a recorded connection counts on, the kernel's `CONNECTIONS`
//! record is checked against the grants, and the sockets whose holder holds none any more are
//! ended (rules with `connections: outlive` excepted). Each ended socket becomes a decision
//! record (hook `connection`) in the event loop.
//!
//! With the packet-drop fallback the kernel itself refuses a lapsed socket's packets, at every
//! packet, from the instant its grant lapses: its record must stay (the programs go by it), so
//! the reaper only reports each lapse once, and again if the holder gets a valid credential
//! back (its packets then pass again) and loses it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_common::{
    DecisionEvent, HOOK_CONNECTION, PROTO_TCP, PROTO_UDP, REASON_CREDENTIAL_EXPIRED,
    REASON_CREDENTIAL_REVOKED, VERDICT_DENY,
};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use crate::decision::{ConnectionRef, DecisionRecord};
use crate::kernel::{
    self, ConnectionMaps, EndedSocket, GrantMaps, KernelIds, Lapse, LapsedConnection, SocketEnder,
};
use crate::policy::{ConnectionLifetime, PolicySet, Protocol};

/// The longest wait between two looks: a holder that exited, or a grant a reload removed, ends
/// its connections within this, and so does an expiry this agent could not foresee.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Looks at an expiry this much after it: the kernel compares with `>`, and the clocks agree.
const EXPIRY_MARGIN: Duration = Duration::from_millis(5);

/// One connection the agent ended.
#[derive(Clone, Debug)]
pub struct EndedConnection {
    pub lapsed: LapsedConnection,
    pub socket: EndedSocket,
}

/// What the connection reaper needs.
pub struct Reaper {
    pub connections: ConnectionMaps,
    pub grants: GrantMaps,
    pub ender: SocketEnder,
    pub policy: Arc<Mutex<Arc<PolicySet>>>,
    /// Notified after every revocation.
    pub revocations: Arc<Notify>,
    /// Packet drop: the lapsed sockets already reported (their records stay).
    pub reported: Mutex<HashSet<u64>>,
}

impl Reaper {
    /// Runs until `stop`; the connections it ends are sent to `ended`.
    pub async fn run(
        self,
        ended: mpsc::UnboundedSender<Vec<EndedConnection>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        loop {
            let sweep = {
                let this = this.clone();
                tokio::task::spawn_blocking(move || this.sweep()).await
            };
            let wait = match sweep {
                Ok((done, wait)) => {
                    if !done.is_empty() && ended.send(done).is_err() {
                        return;
                    }
                    wait
                }
                Err(e) => {
                    warn!(error = %e, "connection sweep");
                    MAX_WAIT
                }
            };
            tokio::select! {
                () = this.revocations.notified() => {}
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Ends what lapsed; returns it and how long to wait before the next look.
    fn sweep(&self) -> (Vec<EndedConnection>, Duration) {
        let policy = self
            .policy
            .lock()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        let ids = KernelIds::of(&policy);
        let outlives = |rule_id: u32| {
            ids.rule_id(rule_id)
                .and_then(|r| policy.rule(r).credential)
                .is_some_and(|c| c.connections == ConnectionLifetime::Outlive)
        };
        let now = kernel::boot_time_ns();
        let survey = match self.connections.survey(&self.grants, now, outlives) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot read the connection records");
                return (Vec::new(), MAX_WAIT);
            }
        };
        let wait = survey.next_expiry_ns.map_or(MAX_WAIT, |at| {
            (Duration::from_nanos(at.saturating_sub(now)) + EXPIRY_MARGIN).min(MAX_WAIT)
        });
        if survey.lapsed.is_empty() {
            return (Vec::new(), wait);
        }
        let packet_drop = self.ender.mechanism == kernel::EndMechanism::PacketDrop;
        let mut cookies: HashSet<u64> = survey.lapsed.iter().map(|l| l.cookie).collect();
        if packet_drop {
            let Ok(mut reported) = self.reported.lock() else {
                return (Vec::new(), wait);
            };
            // A socket whose holder holds a credential again (or that is gone) is forgotten.
            reported.retain(|c| cookies.contains(c));
            cookies.retain(|c| !reported.contains(c));
            reported.extend(cookies.iter().copied());
        }
        if cookies.is_empty() {
            return (Vec::new(), wait);
        }
        let mut sockets = match self.ender.end(&cookies) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, connections = cookies.len(), "cannot end connections; trying again");
                return (Vec::new(), MAX_WAIT);
            }
        };
        if packet_drop {
            // Refused by the kernel wherever the socket is; described where sock_diag saw it.
            for lapsed in survey.lapsed.iter().filter(|l| cookies.contains(&l.cookie)) {
                if !sockets.iter().any(|s| s.cookie == lapsed.cookie) {
                    sockets.push(undescribed(lapsed, &policy, &ids));
                }
            }
            return (self.report(&survey.lapsed, sockets), wait);
        }
        // Every lapsed record is done with: ended now, or its socket is gone (closed, or in a
        // network namespace the agent's sock_diag does not see).
        for cookie in &cookies {
            if let Err(e) = self.connections.forget(*cookie) {
                warn!(error = %e, cookie, "cannot forget a connection record");
            }
        }
        if sockets.len() < cookies.len() {
            // Closed sockets leave their record at sock_release: these are most likely in a
            // network namespace the agent's sock_diag does not see.
            warn!(
                connections = cookies.len() - sockets.len(),
                "connections whose credential ended were not found in the agent's network \
                 namespace: they stay open"
            );
        }
        (self.report(&survey.lapsed, sockets), wait)
    }

    /// The ended connections of `sockets`, logged.
    fn report(
        &self,
        lapsed: &[LapsedConnection],
        sockets: Vec<EndedSocket>,
    ) -> Vec<EndedConnection> {
        let mut done = Vec::with_capacity(sockets.len());
        for socket in sockets {
            if let Some(lapsed) = lapsed.iter().find(|l| l.cookie == socket.cookie) {
                info!(
                    tgid = lapsed.record.tgid,
                    destination = %socket.destination,
                    lapse = ?lapsed.lapse,
                    mechanism = self.ender.mechanism.as_str(),
                    "connection ended with its credential"
                );
                done.push(EndedConnection {
                    lapsed: *lapsed,
                    socket,
                });
            }
        }
        done
    }
}

/// A socket the kernel refuses that `sock_diag` did not describe (another network namespace,
/// or no inet `sock_diag`): its addresses are unknown (unspecified, port 0); its protocol is
/// its endpoint's (TCP for an endpoint of both).
fn undescribed(lapsed: &LapsedConnection, policy: &PolicySet, ids: &KernelIds) -> EndedSocket {
    let udp = ids
        .endpoint_id(lapsed.record.endpoint_id)
        .is_some_and(|e| policy.endpoint(e).protocol == Protocol::Udp);
    let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
    EndedSocket {
        cookie: lapsed.cookie,
        protocol: if udp {
            libc::IPPROTO_UDP as u8
        } else {
            libc::IPPROTO_TCP as u8
        },
        source: nowhere,
        destination: nowhere,
    }
}

/// The kernel-event form of an ended connection, for the enricher (who, where, which rule and
/// credential); the record then gets the connect's decision id.
pub fn ended_event(ended: &EndedConnection, policy_generation: u32) -> DecisionEvent {
    let record = &ended.lapsed.record;
    let tgid = record.tgid;
    let (uid, gid) = std::fs::metadata(format!("/proc/{tgid}"))
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0));
    let mut comm = [0u8; 16];
    if let Ok(name) = std::fs::read(format!("/proc/{tgid}/comm")) {
        let name = name.strip_suffix(b"\n").unwrap_or(&name);
        let n = name.len().min(15);
        comm[..n].copy_from_slice(&name[..n]);
    }
    let destination = ended.socket.destination;
    let (addr, family) = match destination.ip() {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (v4.to_ipv6_mapped().octets(), 4),
            None => (v6.octets(), 6),
        },
    };
    DecisionEvent {
        timestamp_ns: kernel::boot_time_ns(),
        cgroup_id: 0,
        credential_id: record.credential_id,
        socket_cookie: ended.socket.cookie,
        pid: tgid,
        tgid,
        uid,
        gid,
        creator_tgid: 0,
        endpoint_id: record.endpoint_id,
        workload_id: record.workload_id,
        rule_id: record.rule_id,
        policy_generation,
        port: destination.port(),
        hook: HOOK_CONNECTION,
        protocol: if ended.socket.protocol == libc::IPPROTO_UDP as u8 {
            PROTO_UDP
        } else {
            PROTO_TCP
        },
        verdict: VERDICT_DENY,
        reason: match ended.lapsed.lapse {
            Lapse::Revoked => REASON_CREDENTIAL_REVOKED,
            Lapse::Expired => REASON_CREDENTIAL_EXPIRED,
        },
        enforced: 1,
        family,
        addr,
        comm,
        original: tessera_common::ORIGINAL_AS_GIVEN,
        _pad: [0; 3],
    }
}

/// Completes an ended connection's record: the connect's decision id and the source address.
pub fn complete(record: &mut DecisionRecord, ended: &EndedConnection) {
    let id = ended.lapsed.record.decision_id;
    record.connection = Some(ConnectionRef {
        decision_id: (id != [0; 16]).then(|| uuid::Uuid::from_bytes(id).to_string()),
        source: normalised(ended.socket.source),
    });
}

fn normalised(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}
