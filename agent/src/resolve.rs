//! Endpoint `hosts`: the agent resolves every name (A and AAAA), protects each address as an
//! exact endpoint entry in the kernel, and follows the answers as their TTLs run out.
//!
//! Refresh: when the shortest TTL of the last answer runs out, clamped to
//! [`MIN_LOOKUP`, `MAX_REFRESH`] (1 s, 1 h). An address that leaves the answers stays
//! protected until its own TTL (at least 5 s) runs out; a failed lookup keeps the last good
//! addresses (with a warning) and is retried after 5 s. At most `MAX_ADDRESSES` (256) per host.
//! Until its first answer a host protects nothing: `spawn` waits up to 5 s for the first
//! answers, so the daemon is ready with its hosts resolved unless DNS is slow or down.
//! Resolved addresses never override the policy's static entries or an older claim of another
//! endpoint (see `kernel::EndpointEntries`). They are saved in the state directory as they
//! change (`saved`); a restarted agent protects the saved ones before its programs go in, and
//! takes them as each host's last good answer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::kernel::{EndpointEntries, kernel_endpoint_id};
use crate::policy::{EndpointId, HostName, PolicySet};

mod addresses;
mod lookup;
mod refresher;
pub mod saved;

pub use addresses::{
    AddressView, HostAddresses, MAX_ADDRESSES, MAX_REFRESH, MIN_LOOKUP, MIN_REFRESH,
};
pub use lookup::{HostResolver, LookupError};
pub use saved::{Saved, SavedAddress};

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
    /// Where the addresses are saved as they change (none in tests without a state directory).
    state_dir: Option<PathBuf>,
    /// A predecessor's addresses, each host's taken by its first refresher.
    restored: Arc<Mutex<Saved>>,
    last_saved: Arc<Mutex<Saved>>,
}

/// The endpoint entries a predecessor's saved addresses make under `policy`: every saved
/// address of a host, for each endpoint that lists the host.
pub fn saved_claims<'a>(
    policy: &'a PolicySet,
    saved: &Saved,
) -> Vec<(EndpointId, &'a crate::policy::Endpoint, IpAddr)> {
    let now = SystemTime::now();
    let mut claims = Vec::new();
    for (host, endpoints) in hosts_of(policy) {
        for (ip, _) in saved
            .addresses(host.as_str(), now)
            .into_iter()
            .take(MAX_ADDRESSES)
        {
            for &id in &endpoints {
                claims.push((id, policy.endpoint(id), ip.to_canonical()));
            }
        }
    }
    claims
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
            state_dir: None,
            restored: Arc::default(),
            last_saved: Arc::default(),
        }
    }

    /// Saves the addresses in `state_dir` as they change, and starts each host from what a
    /// predecessor saved (`restored`, already protected: see `saved_claims`).
    pub fn with_state(mut self, state_dir: &Path, restored: Saved) -> Self {
        self.state_dir = Some(state_dir.to_path_buf());
        self.last_saved = Arc::new(Mutex::new(restored.clone()));
        self.restored = Arc::new(Mutex::new(restored));
        self
    }

    /// What a predecessor saved for `host` (once: later calls get nothing).
    fn take_restored(&self, host: &HostName) -> Vec<(IpAddr, std::time::Duration)> {
        let Ok(mut restored) = self.restored.lock() else {
            return Vec::new();
        };
        let addresses = restored.addresses(host.as_str(), SystemTime::now());
        restored.hosts.remove(host.as_str());
        addresses
    }

    /// Saves every host's addresses when they differ from what was saved last.
    fn save(&self) {
        let Some(state_dir) = &self.state_dir else {
            return;
        };
        let now = Instant::now();
        let wall = SystemTime::now();
        let snapshots = self.hosts.lock().map(|h| h.clone()).unwrap_or_default();
        let mut saved = Saved::default();
        for (host, snapshot) in snapshots {
            let elapsed = now.saturating_duration_since(snapshot.at);
            let list: Vec<SavedAddress> = snapshot
                .addresses
                .iter()
                .map(|a| SavedAddress {
                    ip: a.ip,
                    expires_unix_ms: saved::unix_ms(wall + a.ttl_left.saturating_sub(elapsed)),
                })
                .collect();
            if !list.is_empty() {
                saved.hosts.insert(host.as_str().to_owned(), list);
            }
        }
        let Ok(mut last) = self.last_saved.lock() else {
            return;
        };
        if *last != saved {
            saved.store(state_dir);
            *last = saved;
        }
    }

    fn current(&self) -> Option<Current> {
        self.current.lock().ok().map(|c| c.clone())
    }

    fn publish(&self, host: &HostName, snapshot: HostSnapshot) {
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.insert(host.clone(), snapshot);
        }
        self.save();
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
                                    "{} ({} port {}{})",
                                    endpoint_name(&policy, h.holder),
                                    h.protocol,
                                    h.port,
                                    if h.contested { ", contested: denied to all" } else { "" }
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
            let restored = self.status.take_restored(&host);
            tokio::spawn(refresher::follow(
                refresher::Host {
                    restored,
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
