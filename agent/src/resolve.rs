//! Endpoint `hosts`: the agent resolves every name (A and AAAA), protects each address as an
//! exact endpoint entry in the kernel, and follows the answers as their TTLs run out.
//!
//! Refresh: when the shortest TTL of the last answer runs out, clamped to
//! [`MIN_REFRESH`, `MAX_REFRESH`] (5 s, 1 h). An address that leaves the answers stays
//! protected until its own TTL (at least 5 s) runs out; a failed lookup keeps the last good
//! addresses (with a warning) and is retried after 5 s. At most `MAX_ADDRESSES` (256) per host.
//! Until its first answer a host protects nothing: `spawn` waits up to 5 s for the first
//! answers, so the daemon is ready with its hosts resolved unless DNS is slow or down.
//! Resolved addresses never override the policy's static entries or an older claim of another
//! endpoint (see `kernel::EndpointEntries`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::kernel::{EndpointEntries, kernel_endpoint_id};
use crate::policy::{EndpointId, HostName, PolicySet};

mod addresses;
mod lookup;
mod refresher;

pub use addresses::{AddressView, HostAddresses, MAX_ADDRESSES, MAX_REFRESH, MIN_REFRESH};
pub use lookup::{HostResolver, LookupError};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "reading the system's DNS configuration (/etc/resolv.conf) failed: fix it, or pass \
         --dns-server ADDR:PORT"
    )]
    SystemConfig(#[source] hickory_resolver::net::NetError),
    #[error("setting up the DNS resolver failed")]
    Build(#[source] hickory_resolver::net::NetError),
}

/// What each host resolves to now, for `tessera status`; clones share it.
#[derive(Clone)]
pub struct ResolvedHosts {
    current: Arc<Mutex<Current>>,
    hosts: Arc<Mutex<BTreeMap<HostName, HostSnapshot>>>,
}

/// The policy the hosts come from, and the entries handle of its epoch.
#[derive(Clone)]
struct Current {
    policy: Arc<PolicySet>,
    entries: EndpointEntries,
}

/// The running host tasks; `policy_changed` replaces them after a reload.
pub struct HostRefresher {
    dns_server: Option<SocketAddr>,
    resolver: Option<Arc<HostResolver>>,
    status: ResolvedHosts,
    stop: watch::Receiver<bool>,
    /// Turned true to end the tasks of the current policy.
    retire: watch::Sender<bool>,
}

#[derive(Clone, Debug)]
struct HostSnapshot {
    at: Instant,
    addresses: Vec<AddressView>,
    lookups: u64,
    last_error: Option<String>,
}

impl ResolvedHosts {
    pub fn new(policy: Arc<PolicySet>, entries: EndpointEntries) -> Self {
        ResolvedHosts {
            current: Arc::new(Mutex::new(Current { policy, entries })),
            hosts: Arc::default(),
        }
    }

    fn current(&self) -> Option<Current> {
        self.current.lock().ok().map(|c| c.clone())
    }

    fn publish(&self, host: &HostName, snapshot: HostSnapshot) {
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.insert(host.clone(), snapshot);
        }
    }

    /// One object per host: its endpoints, its addresses (`in_answer`: in the last successful
    /// answer; `ttl_left_s`; `held_by`: endpoints whose entries decide that address instead),
    /// lookups made and the last lookup's error.
    pub fn to_json(&self) -> Value {
        let Some(Current { policy, entries }) = self.current() else {
            return Value::Null;
        };
        let held = entries.held().unwrap_or_default();
        let now = Instant::now();
        let snapshots = self.hosts.lock().map(|h| h.clone()).unwrap_or_default();
        let hosts: Vec<Value> = hosts_of(&policy)
            .into_iter()
            .map(|(host, endpoints)| {
                let snapshot = snapshots.get(&host);
                let addresses: Vec<Value> = snapshot
                    .map(|s| s.addresses.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|a| {
                        let elapsed = now.saturating_duration_since(snapshot.map_or(now, |s| s.at));
                        let held_by: Vec<String> = held
                            .iter()
                            .filter(|h| h.ip == a.ip && endpoints.contains(&h.endpoint))
                            .map(|h| {
                                format!(
                                    "{} ({} port {})",
                                    endpoint_name(&policy, h.holder),
                                    h.protocol,
                                    h.port
                                )
                            })
                            .collect();
                        json!({
                            "ip": a.ip.to_string(),
                            "in_answer": a.in_answer,
                            "ttl_left_s": a.ttl_left.saturating_sub(elapsed).as_secs(),
                            "held_by": held_by,
                        })
                    })
                    .collect();
                json!({
                    "host": host.as_str(),
                    "endpoints": endpoints.iter().map(|&id| policy.endpoint(id).name.clone()).collect::<Vec<_>>(),
                    "addresses": addresses,
                    "lookups": snapshot.map_or(0, |s| s.lookups),
                    "last_error": snapshot.and_then(|s| s.last_error.clone()),
                })
            })
            .collect();
        Value::Array(hosts)
    }
}

/// The name of the endpoint with kernel id `kernel_id`, or `#kernel_id`.
fn endpoint_name(policy: &PolicySet, kernel_id: u32) -> String {
    (0u32..)
        .zip(&policy.endpoints)
        .find(|&(i, e)| kernel_endpoint_id(e, EndpointId(i)) == kernel_id)
        .map_or_else(|| format!("#{kernel_id}"), |(_, e)| e.name.clone())
}

/// Every host of the policy, with the endpoints that list it.
fn hosts_of(policy: &PolicySet) -> BTreeMap<HostName, Vec<EndpointId>> {
    let mut hosts: BTreeMap<HostName, Vec<EndpointId>> = BTreeMap::new();
    for (id, endpoint) in (0u32..).zip(&policy.endpoints) {
        for host in &endpoint.hosts {
            hosts.entry(host.clone()).or_default().push(EndpointId(id));
        }
    }
    hosts
}

/// How long `spawn` waits for the first answers, so that the agent is ready with its hosts
/// protected unless DNS is slow or down.
pub const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts one task per host of `status`'s policy (none when it has no hosts), which resolves
/// it, writes its addresses through `status`'s endpoint entries and publishes them to `status`,
/// until `stop` turns true. Returns once every host has had its first lookup, or after
/// `FIRST_ANSWER_WAIT`.
pub async fn spawn(
    dns_server: Option<SocketAddr>,
    status: &ResolvedHosts,
    stop: watch::Receiver<bool>,
) -> Result<HostRefresher, ResolveError> {
    let mut refresher = HostRefresher {
        dns_server,
        resolver: None,
        status: status.clone(),
        stop,
        retire: watch::channel(false).0,
    };
    let first_lookups = refresher.start()?;
    let all = async {
        for rx in first_lookups {
            let _ = rx.await;
        }
    };
    if tokio::time::timeout(FIRST_ANSWER_WAIT, all).await.is_err() {
        tracing::warn!(
            waited_s = FIRST_ANSWER_WAIT.as_secs(),
            "some endpoint hosts are not resolved yet: they are protected from their first answer on"
        );
    }
    Ok(refresher)
}

impl HostRefresher {
    /// Follows the hosts of a reloaded policy. Endpoint ids are positions, which a new policy
    /// may give to other endpoints: every resolved address of the old policy is dropped first
    /// (those destinations are unprotected until the new tasks' first answers, normally a few
    /// milliseconds), and the old tasks can write nothing more.
    pub fn policy_changed(&mut self, policy: Arc<PolicySet>) {
        let _ = self.retire.send(true);
        self.retire = watch::channel(false).0;
        let Some(current) = self.status.current() else {
            return;
        };
        let entries = match current.entries.renew() {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "dropping the resolved addresses of the old policy failed");
                current.entries
            }
        };
        if let Ok(mut c) = self.status.current.lock() {
            *c = Current { policy, entries };
        }
        if let Ok(mut hosts) = self.status.hosts.lock() {
            hosts.clear();
        }
        if let Err(error) = self.start() {
            tracing::warn!(%error, "endpoint hosts of the new policy are not resolved");
        }
    }

    /// Spawns the tasks of the current policy; returns their first-lookup signals.
    fn start(&mut self) -> Result<Vec<oneshot::Receiver<()>>, ResolveError> {
        let Some(Current { policy, entries }) = self.status.current() else {
            return Ok(Vec::new());
        };
        let hosts = hosts_of(&policy);
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let resolver = match &self.resolver {
            Some(resolver) => resolver.clone(),
            None => {
                let resolver = Arc::new(HostResolver::new(self.dns_server)?);
                self.resolver = Some(resolver.clone());
                resolver
            }
        };
        tracing::info!(
            hosts = hosts.len(),
            dns_server = %self.dns_server.map_or("system configuration".to_owned(), |s| s.to_string()),
            "resolving endpoint hosts"
        );
        let mut first_lookups = Vec::new();
        for (host, endpoints) in hosts {
            let (first_tx, first_rx) = oneshot::channel();
            first_lookups.push(first_rx);
            tokio::spawn(refresher::follow(
                refresher::Host {
                    name: host,
                    endpoints,
                    policy: policy.clone(),
                    entries: entries.clone(),
                },
                resolver.clone(),
                self.status.clone(),
                first_tx,
                [self.stop.clone(), self.retire.subscribe()],
            ));
        }
        Ok(first_lookups)
    }
}
