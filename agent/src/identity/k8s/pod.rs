//! A `Pod` from the API server to the [`PodMetadata`] selectors use.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::{PodContainer, PodMetadata};

impl PodMetadata {
    /// `None` for a pod without a UID, namespace or name (the API server always sets them).
    pub fn from_pod(pod: &Pod) -> Option<PodMetadata> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let statuses = status.into_iter().flat_map(|s| {
            [
                s.init_container_statuses.as_deref(),
                s.container_statuses.as_deref(),
                s.ephemeral_container_statuses.as_deref(),
            ]
            .into_iter()
            .flatten()
            .flatten()
        });
        let mut containers: Vec<PodContainer> = statuses.map(container).collect();
        // Containers that have no status yet are still named, without an ID.
        for name in spec.into_iter().flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
                .map(|c| c.name.clone())
        }) {
            if !containers.iter().any(|c| c.name == name) {
                containers.push(PodContainer { name, id: None });
            }
        }
        Some(PodMetadata {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            // The API server defaults it; an old object without one ran as `default`.
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            labels: meta.labels.clone().unwrap_or_default(),
            containers,
        })
    }
}

fn container(status: &ContainerStatus) -> PodContainer {
    PodContainer {
        name: status.name.clone(),
        // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`: the cgroup path has the bare ID.
        id: status
            .container_id
            .as_deref()
            .map(|id| id.split_once("://").map_or(id, |(_, bare)| bare).to_owned())
            .filter(|id| !id.is_empty()),
    }
}
