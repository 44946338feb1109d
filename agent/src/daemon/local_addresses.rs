//! Follows the host's interface addresses (rtnetlink, the agent's network namespace) into the
//! kernel's endpoint maps: a local endpoint is protected on an address added within a second,
//! and no more on one removed (see `kernel::local`).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::kernel::{AddressWatch, HostAddresses, LocalEntries, host_addresses};

/// How long a failed read of the addresses waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The host's addresses now, read after `watch` subscribed (so that no change falls between
/// them). `None` when rtnetlink cannot be read: local endpoints are then protected on loopback
/// only, with a warning.
pub fn start() -> (Option<AddressWatch>, HostAddresses) {
    let watch = AddressWatch::open()
        .inspect_err(|e| {
            warn!(error = %e, "cannot follow the host's addresses: local endpoints are protected on loopback and the addresses found at start only")
        })
        .ok();
    let host = host_addresses()
        .inspect_err(|e| {
            warn!(error = %e, "cannot read the host's addresses: local endpoints are protected on loopback only until they can be read")
        })
        .unwrap_or_default();
    info!(addresses = %list(&host), "host addresses: local endpoints are protected on them");
    (watch, host)
}

/// Writes each change of the host's addresses into `entries` until `stop`.
pub fn spawn(
    watch: Option<AddressWatch>,
    entries: LocalEntries,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut watch) = watch else {
            return;
        };
        let mut warned: BTreeSet<String> = BTreeSet::new();
        // A change not written yet (the last write failed): tried again after `RETRY`.
        let mut pending = false;
        loop {
            if pending {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            } else {
                tokio::select! {
                    changed = watch.changed() => {
                        if let Err(e) = changed {
                            warn!(error = %e, "reading the host's address changes failed; reading them again");
                        }
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            let entries = entries.clone();
            // The policy maps' lock is held for a whole reload: not on the event loop.
            let applied = tokio::task::spawn_blocking(move || {
                let host = host_addresses()?;
                let warnings = entries.set_host_addresses(host.clone())?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((host, warnings))
            })
            .await;
            pending = false;
            match applied {
                Ok(Ok((host, Some(warnings)))) => {
                    info!(addresses = %list(&host), "host addresses changed: local endpoints follow");
                    for warning in warnings {
                        let text = warning.to_string();
                        if warned.insert(text.clone()) {
                            warn!(warning = %text, "policy sync");
                        }
                    }
                }
                Ok(Ok((_, None))) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "updating local endpoints to the host's addresses failed; trying again");
                    pending = true;
                }
                Err(e) => {
                    warn!(error = %e, "the host address task failed; trying again");
                    pending = true;
                }
            }
        }
    })
}

fn list(host: &HostAddresses) -> String {
    host.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}
