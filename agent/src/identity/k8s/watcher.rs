//! The list+watch of this node's pods that fills a [`PodCache`].

use std::collections::HashMap;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};

use super::{CacheState, PodCache, PodMetadata};

/// Starts watching the pods of node `node` through `client`; the cache follows from now on
/// (lists again after a lost watch, as the kube watcher does). Needs a tokio runtime.
pub fn spawn_watch(client: kube::Client, node: &str) -> PodCache {
    let cache = PodCache::with_state(CacheState::Syncing);
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(pods, config);
    let filled = cache.clone();
    let node = node.to_owned();
    tokio::spawn(async move {
        tracing::info!(node, "watching this node's pods for kubernetes selectors");
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<HashMap<String, PodMetadata>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => apply(&filled, &mut listing, event),
                // The watcher retries by itself; each failure is worth a line.
                Err(e) => tracing::warn!(node, error = %e, "pod watch failed; retrying"),
            }
        }
    });
    cache
}

fn apply(cache: &PodCache, listing: &mut Option<HashMap<String, PodMetadata>>, event: Event<Pod>) {
    match event {
        Event::Init => *listing = Some(HashMap::new()),
        Event::InitApply(pod) => {
            if let (Some(list), Some(meta)) = (listing.as_mut(), PodMetadata::from_pod(&pod)) {
                list.insert(meta.uid.clone(), meta);
            }
        }
        Event::InitDone => {
            let all = listing.take().unwrap_or_default();
            tracing::debug!(pods = all.len(), "pod list complete");
            cache.replace_all(all);
        }
        Event::Apply(pod) => {
            if let Some(meta) = PodMetadata::from_pod(&pod) {
                cache.upsert(meta);
            }
        }
        Event::Delete(pod) => {
            if let Some(uid) = pod.metadata.uid.as_deref() {
                cache.remove(uid);
            }
        }
    }
}
