//! The task that follows one host: looks it up when due, protects new addresses, retires
//! expired ones, and publishes what it has.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::{HostAddresses, HostResolver, HostSnapshot, ResolvedHosts};
use crate::kernel::EndpointEntries;
use crate::policy::{EndpointId, HostName, PolicySet};

/// One host of one policy, and where its addresses go.
pub(super) struct Host {
    pub name: HostName,
    /// A predecessor's addresses (address, TTL left): the last good answer to start from.
    pub restored: Vec<(std::net::IpAddr, std::time::Duration)>,
    /// The endpoints that list it.
    pub endpoints: Vec<EndpointId>,
    pub policy: Arc<PolicySet>,
    pub entries: EndpointEntries,
}

/// Follows `host` until either `stop` receiver turns true.
pub(super) async fn follow(
    host: Host,
    resolver: Arc<HostResolver>,
    status: ResolvedHosts,
    first_lookup: oneshot::Sender<()>,
    stop: [watch::Receiver<bool>; 2],
) {
    let [mut stop, mut retire] = stop;
    let mut first_lookup = Some(first_lookup);
    let Host {
        name: host,
        restored,
        endpoints,
        policy,
        entries,
    } = host;
    let mut state = HostAddresses::new(Instant::now());
    // Already protected (`saved_claims`, before the programs went in): the refresher owns them
    // from here, and lets them go as it would its own answers'.
    state.restore(Instant::now(), &restored);
    let mut lookups = 0;
    let mut last_error = None;
    loop {
        if state.lookup_due(Instant::now()) {
            lookups += 1;
            match resolver.lookup(&host).await {
                Ok(answer) => {
                    last_error = None;
                    let added: HashSet<_> = state
                        .answered(Instant::now(), &answer)
                        .into_iter()
                        .collect();
                    if !added.is_empty() {
                        let ips: Vec<String> = added.iter().map(|ip| ip.to_string()).collect();
                        info!(host = %host, added = ?ips, "host resolved to new addresses");
                    }
                    // Every current address, not only new ones: a write that failed before is
                    // retried (adding what is there is a no-op).
                    let current: Vec<_> = state.current().collect();
                    for ip in current {
                        protect(
                            &policy,
                            &entries,
                            &host,
                            &endpoints,
                            ip,
                            added.contains(&ip),
                        );
                    }
                }
                Err(error) => {
                    state.failed(Instant::now());
                    let chain = error_chain(&error);
                    warn!(
                        host = %host,
                        error = %chain,
                        kept = state.current().count(),
                        "DNS lookup failed; keeping the last resolved addresses"
                    );
                    last_error = Some(chain);
                }
            }
        }
        for ip in state.expire(Instant::now()) {
            info!(host = %host, ip = %ip, "address left the answers and its TTL ran out: no longer protected");
            for &id in &endpoints {
                if let Err(error) = entries.remove_host_address(id, ip) {
                    warn!(host = %host, ip = %ip, error = %error, "removing a resolved address from the kernel failed");
                }
            }
        }
        let now = Instant::now();
        status.publish(
            &host,
            HostSnapshot {
                at: now,
                addresses: state.view(now),
                lookups,
                last_error: last_error.clone(),
            },
        );
        if let Some(tx) = first_lookup.take() {
            let _ = tx.send(());
        }
        let wake = tokio::time::Instant::from_std(state.next_wake());
        debug!(host = %host, in_s = wake.saturating_duration_since(tokio::time::Instant::now()).as_secs(), "next host refresh");
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = stop.wait_for(|stop| *stop) => return,
            _ = retire.wait_for(|retire| *retire) => return,
        }
    }
}

/// Writes `ip` for every endpoint that lists `host`; says so when another endpoint's entry
/// keeps deciding that destination (only for a new address, not on every refresh).
fn protect(
    policy: &PolicySet,
    entries: &EndpointEntries,
    host: &HostName,
    endpoints: &[EndpointId],
    ip: std::net::IpAddr,
    new: bool,
) {
    for &id in endpoints {
        let endpoint = policy.endpoint(id);
        match entries.add_host_address(id, endpoint, ip) {
            Ok(held) if new => {
                for h in held.iter().filter(|h| h.contested) {
                    warn!(
                        host = %host,
                        endpoint = %endpoint.name,
                        ip = %ip,
                        port = h.port,
                        protocol = h.protocol,
                        also_claimed_by = %super::endpoint_name(policy, h.holder),
                        "resolved address is another endpoint's resolved address too: every connect there is denied while both names resolve to it"
                    );
                }
                for h in held.iter().filter(|h| !h.contested) {
                    warn!(
                        host = %host,
                        endpoint = %endpoint.name,
                        ip = %ip,
                        port = h.port,
                        protocol = h.protocol,
                        decided_by = %super::endpoint_name(policy, h.holder),
                        static_entry = h.holder_is_static,
                        "resolved address already belongs to another endpoint: its rule stays in force there"
                    );
                }
            }
            Ok(_) => {}
            Err(error) => warn!(
                host = %host,
                endpoint = %endpoint.name,
                ip = %ip,
                error = %error,
                "writing a resolved address to the kernel failed; retried at the next refresh"
            ),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
