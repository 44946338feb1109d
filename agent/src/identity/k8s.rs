//! Kubernetes pod metadata for workload identity: namespace, service account, pod name, labels
//! and container names, from a list+watch of this node's pods (`spec.nodeName=<node>`), keyed
//! by pod UID (which the cgroup path gives, see [`evidence::cgroup`](super::evidence::cgroup)).
//!
//! Outside a cluster (no `KUBERNETES_SERVICE_HOST`, or no in-cluster config) the cache stays
//! disabled: Kubernetes selectors never match, and the agent says so once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::watch;

mod pod;
mod watcher;

pub use watcher::spawn_watch;

/// One container of a pod, from its status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodContainer {
    pub name: String,
    /// The runtime's ID without its `containerd://` / `cri-o://` / `docker://` prefix; absent
    /// until the container has started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// What the API server says about a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodMetadata {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Init, ephemeral and regular containers.
    pub containers: Vec<PodContainer>,
}

impl PodMetadata {
    /// The name of the container whose runtime ID is `id`.
    pub fn container_name(&self, id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|c| c.id.as_deref() == Some(id))
            .map(|c| c.name.as_str())
    }
}

/// Where the cache stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheState {
    /// Not in a cluster, or no watch configured: Kubernetes selectors never match.
    Disabled,
    /// Watching, the first list not complete yet.
    Syncing,
    /// The list is in and the watch follows.
    Synced,
}

/// This node's pods by UID; clones share one cache.
#[derive(Clone, Debug)]
pub struct PodCache {
    pods: Arc<RwLock<HashMap<String, PodMetadata>>>,
    /// Bumped after every change, so that a reader can wait for one.
    version: watch::Sender<(CacheState, u64)>,
}

impl PodCache {
    /// A cache that never matches (outside a cluster).
    pub fn disabled() -> Self {
        PodCache::with_state(CacheState::Disabled)
    }

    fn with_state(state: CacheState) -> Self {
        PodCache {
            pods: Arc::default(),
            version: watch::Sender::new((state, 0)),
        }
    }

    pub fn state(&self) -> CacheState {
        self.version.borrow().0
    }

    /// The pod with this UID, if this node runs it and the watch has seen it.
    pub fn get(&self, pod_uid: &str) -> Option<PodMetadata> {
        self.pods.read().ok()?.get(pod_uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.pods.read().map_or(0, |p| p.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `pred` holds for the cache (checked after each change).
    pub async fn wait_until(&self, pred: impl Fn(&PodCache) -> bool) {
        let mut rx = self.version.subscribe();
        loop {
            if pred(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn changed(&self, state: Option<CacheState>) {
        self.version.send_modify(|(s, v)| {
            if let Some(state) = state {
                *s = state;
            }
            *v += 1;
        });
    }

    fn upsert(&self, pod: PodMetadata) {
        if let Ok(mut pods) = self.pods.write() {
            pods.insert(pod.uid.clone(), pod);
        }
        self.changed(None);
    }

    fn remove(&self, uid: &str) {
        if let Ok(mut pods) = self.pods.write() {
            pods.remove(uid);
        }
        self.changed(None);
    }

    fn replace_all(&self, all: HashMap<String, PodMetadata>) {
        if let Ok(mut pods) = self.pods.write() {
            *pods = all;
        }
        self.changed(Some(CacheState::Synced));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("not running in a Kubernetes cluster (KUBERNETES_SERVICE_HOST is not set)")]
    NotInCluster,
    #[error("cannot read the in-cluster Kubernetes configuration")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a Kubernetes API client")]
    Client(#[source] kube::Error),
    #[error(
        "the node name is unknown: set NODE_NAME (the downward API's spec.nodeName) so that only this node's pods are watched"
    )]
    NoNodeName,
}

/// The cache for this host: watching this node's pods when in a cluster, else disabled (said
/// once, at info level: outside Kubernetes that is normal). Needs a tokio runtime.
pub fn from_environment(node_name: Option<&str>) -> PodCache {
    match in_cluster_client() {
        Ok(client) => {
            let node = node_name
                .map(str::to_owned)
                .or_else(|| std::env::var("NODE_NAME").ok())
                .filter(|n| !n.is_empty());
            match node {
                Some(node) => spawn_watch(client, &node),
                None => {
                    tracing::warn!(error = %K8sError::NoNodeName, "kubernetes selectors will never match");
                    PodCache::disabled()
                }
            }
        }
        Err(K8sError::NotInCluster) => {
            tracing::info!("not in a Kubernetes cluster: kubernetes selectors will never match");
            PodCache::disabled()
        }
        Err(e) => {
            tracing::warn!(error = %e, "kubernetes selectors will never match");
            PodCache::disabled()
        }
    }
}

fn in_cluster_client() -> Result<kube::Client, K8sError> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return Err(K8sError::NotInCluster);
    }
    let config = kube::Config::incluster().map_err(K8sError::InCluster)?;
    kube::Client::try_from(config).map_err(K8sError::Client)
}

#[cfg(test)]
mod tests;
