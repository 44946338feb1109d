//! The list+watch of this node's pods that fills a [`PodCache`].

use std::collections::HashMap;
use std::path::PathBuf;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use super::{CacheState, K8sError, PodCache, PodMetadata};

/// Starts watching the pods of node `node` through `client`; the cache follows from now on
/// (lists again after a lost watch, as the kube watcher does). Needs a tokio runtime.
pub fn spawn_watch(client: kube::Client, node: &str) -> PodCache {
    spawn_with(async move { Ok(client) }, node)
}

/// [`spawn_watch`] with a client built from `kubeconfig` (read from `path`), in the task: the
/// cache is `Syncing` meanwhile, and `Disabled` (said once) if the kubeconfig is unusable.
pub fn spawn_watch_kubeconfig(path: PathBuf, kubeconfig: Kubeconfig, node: &str) -> PodCache {
    spawn_with(
        async move {
            let fail = |source| K8sError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(fail)?;
            kube::Client::try_from(config).map_err(K8sError::Client)
        },
        node,
    )
}

fn spawn_with(
    client: impl Future<Output = Result<kube::Client, K8sError>> + Send + 'static,
    node: &str,
) -> PodCache {
    let cache = PodCache::with_state(CacheState::Syncing);
    let filled = cache.clone();
    let node = node.to_owned();
    tokio::spawn(async move {
        let client = match client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(node, error = %e, source = ?std::error::Error::source(&e), "kubernetes selectors will never match");
                filled.changed(Some(CacheState::Disabled));
                return;
            }
        };
        let pods: kube::Api<Pod> = kube::Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        tracing::info!(node, "watching this node's pods for kubernetes selectors");
        let mut listing: Option<HashMap<String, PodMetadata>> = None;
        follow(pods, config, "pod", |event| {
            apply(&filled, &mut listing, event);
        })
        .await;
    });
    cache
}

/// Lists and watches `api` (as `config` selects) until the runtime stops, handing each event
/// to `apply`. kube's watcher re-watches from the last resource version when a watch ends,
/// lists again when that version is gone (410 Gone), and backs off exponentially after a
/// failure instead of retrying at once; each failure is logged as `<watched> watch failed`.
pub(crate) async fn follow<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    watched: &'static str,
    mut apply: impl FnMut(Event<K>),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher::watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => apply(event),
            // The message names what is watched, as operators grep for it ("pod watch failed").
            Err(e) => tracing::warn!(error = %e, "{watched} watch failed; retrying"),
        }
    }
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
