//! Kubernetes pod metadata for workload identity: namespace, service account, pod name, labels
//! and container names, from a list+watch of this node's pods (`spec.nodeName=<node>`), keyed
//! by pod UID (which the cgroup path gives, see [`evidence::cgroup`](super::evidence::cgroup)).
//!
//! In a pod the client comes from the in-cluster config (`KUBERNETES_SERVICE_HOST` and the
//! service account files); elsewhere from the kubeconfig file `KUBECONFIG` names (one path), for
//! an agent run as a host service next to a kubelet. With neither the cache stays disabled:
//! Kubernetes selectors never match, and the agent says so once.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::watch;

mod pod;
mod watcher;

pub(crate) use watcher::follow;
pub use watcher::{spawn_watch, spawn_watch_kubeconfig};

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
    #[error(
        "not running in a Kubernetes cluster (KUBERNETES_SERVICE_HOST is not set) and KUBECONFIG is not set"
    )]
    NotInCluster,
    #[error("cannot read the in-cluster Kubernetes configuration")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a Kubernetes API client")]
    Client(#[source] kube::Error),
    #[error(
        "KUBECONFIG={0:?} lists several files; point it at the one kubeconfig the agent should use"
    )]
    SeveralKubeconfigs(OsString),
    #[error("cannot read the kubeconfig {}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot use the kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "the node name is unknown: set NODE_NAME (the downward API's spec.nodeName) so that only this node's pods are watched"
    )]
    NoNodeName,
}

/// What the environment says about reaching the API server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct K8sEnvironment {
    /// `KUBERNETES_SERVICE_HOST` is set: running in a pod.
    pub in_cluster: bool,
    /// `KUBECONFIG` (used only outside a pod).
    pub kubeconfig: Option<OsString>,
    /// `NODE_NAME` (the downward API's `spec.nodeName`).
    pub node_name: Option<String>,
}

impl K8sEnvironment {
    /// From this process's environment.
    pub fn from_env() -> Self {
        K8sEnvironment {
            in_cluster: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            kubeconfig: std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()),
            node_name: std::env::var("NODE_NAME").ok(),
        }
    }
}

/// How the client is built.
enum ClientSource {
    InCluster(kube::Client),
    Kubeconfig {
        path: PathBuf,
        kubeconfig: kube::config::Kubeconfig,
    },
}

/// The cache for this host: watching this node's pods when in a cluster or given a kubeconfig,
/// else disabled (said once, at info level: outside Kubernetes that is normal). `node_name`
/// overrides `NODE_NAME`. Needs a tokio runtime.
pub fn from_environment(node_name: Option<&str>) -> PodCache {
    let mut env = K8sEnvironment::from_env();
    if let Some(node) = node_name {
        env.node_name = Some(node.to_owned());
    }
    cache_for(&env)
}

/// [`from_environment`] with the environment given.
pub fn cache_for(env: &K8sEnvironment) -> PodCache {
    let source = match client_source(env) {
        Ok(source) => source,
        Err(K8sError::NotInCluster) => {
            tracing::info!(
                "not in a Kubernetes cluster and no KUBECONFIG: kubernetes selectors will never match"
            );
            return PodCache::disabled();
        }
        Err(e) => {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "kubernetes selectors will never match");
            return PodCache::disabled();
        }
    };
    let Some(node) = env.node_name.as_deref().filter(|n| !n.is_empty()) else {
        tracing::warn!(error = %K8sError::NoNodeName, "kubernetes selectors will never match");
        return PodCache::disabled();
    };
    match source {
        ClientSource::InCluster(client) => spawn_watch(client, node),
        ClientSource::Kubeconfig { path, kubeconfig } => {
            tracing::info!(kubeconfig = %path.display(), "reaching the API server through a kubeconfig");
            spawn_watch_kubeconfig(path, kubeconfig, node)
        }
    }
}

/// A client of the API server the environment names (in a pod: the in-cluster config; else
/// the one kubeconfig `KUBECONFIG` names), as the pod cache builds it.
pub async fn client_for(env: &K8sEnvironment) -> Result<kube::Client, K8sError> {
    match client_source(env)? {
        ClientSource::InCluster(client) => Ok(client),
        ClientSource::Kubeconfig { path, kubeconfig } => {
            let options = kube::config::KubeConfigOptions::default();
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|source| K8sError::Kubeconfig { path, source })?;
            kube::Client::try_from(config).map_err(K8sError::Client)
        }
    }
}

fn client_source(env: &K8sEnvironment) -> Result<ClientSource, K8sError> {
    if env.in_cluster {
        let config = kube::Config::incluster().map_err(K8sError::InCluster)?;
        let client = kube::Client::try_from(config).map_err(K8sError::Client)?;
        return Ok(ClientSource::InCluster(client));
    }
    let Some(value) = env.kubeconfig.as_ref() else {
        return Err(K8sError::NotInCluster);
    };
    let paths: Vec<PathBuf> = std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    let [path] =
        <[PathBuf; 1]>::try_from(paths).map_err(|_| K8sError::SeveralKubeconfigs(value.clone()))?;
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).map_err(|source| K8sError::ReadKubeconfig {
            path: path.clone(),
            source,
        })?;
    Ok(ClientSource::Kubeconfig { path, kubeconfig })
}

#[cfg(test)]
mod tests;
