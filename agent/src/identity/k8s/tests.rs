//! The pod cache against a loopback server that replays recorded API-server responses.

use std::time::Duration;

use super::*;
use crate::testkit::apiserver::FakeApiServer;

const LIST: &str = include_str!("fixtures/pod-list.json");
const WATCH: &str = include_str!("fixtures/pod-watch.jsonl");
const API_UID: &str = "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d";
const JOB_UID: &str = "c0ffee00-1111-4222-8333-444455556666";
const WEB_UID: &str = "5a5a5a5a-0000-4000-8000-000000000001";

/// Serves GET /api/v1/pods: the list, then the recorded watch once, then a watch that stays
/// open with nothing to say. Records each request's path and query.
async fn fake_api_server() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.replay("/api/v1/pods", LIST, WATCH);
    server
}

/// Guards against a hang only; no assertion depends on time.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

#[test]
fn pod_metadata_from_a_listed_pod() {
    let list: k8s_openapi::List<k8s_openapi::api::core::v1::Pod> =
        serde_json::from_str(LIST).expect("list");
    let api = PodMetadata::from_pod(&list.items[0]).expect("metadata");
    assert_eq!(api.uid, API_UID);
    assert_eq!(api.namespace, "payments");
    assert_eq!(api.name, "api-7d9f4c8b6-x2k9q");
    assert_eq!(api.service_account, "api");
    assert_eq!(api.labels.get("app").map(String::as_str), Some("api"));
    let server = "3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
    assert_eq!(api.container_name(server), Some("server"));
    assert_eq!(api.container_name(&"1".repeat(64)), Some("migrate"));
    let names: Vec<&str> = api.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["migrate", "server", "proxy"]);
    assert_eq!(api.containers[2].id, None, "not started yet");
    let job = PodMetadata::from_pod(&list.items[1]).expect("metadata");
    assert_eq!(job.service_account, "default");
    assert_eq!(job.container_name(&"2".repeat(64)), Some("job"));
}

#[tokio::test]
async fn cache_fills_from_the_list_and_follows_the_watch() {
    let server = fake_api_server().await;
    let cache = spawn_watch(server.client(), "node-a");
    assert_ne!(cache.state(), CacheState::Disabled);
    // The list, then ADDED web-0, MODIFIED api (a label), DELETED batch.
    within(
        "the watch events",
        cache.wait_until(|c| {
            c.state() == CacheState::Synced
                && c.get(WEB_UID).is_some()
                && c.get(JOB_UID).is_none()
                && c.get(API_UID)
                    .is_some_and(|p| p.labels.contains_key("canary"))
        }),
    )
    .await;
    assert_eq!(cache.len(), 2);
    let web = cache.get(WEB_UID).expect("web");
    assert_eq!(
        (web.namespace.as_str(), web.name.as_str()),
        ("shop", "web-0")
    );
    assert_eq!(web.service_account, "web");
    let api = cache.get(API_UID).expect("api");
    assert_eq!(api.container_name(&"4".repeat(64)), Some("proxy"));

    let requests = server.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    for r in &requests {
        assert!(
            r.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "every request is limited to this node's pods: {r}"
        );
    }
    assert!(
        !requests[0].contains("watch=true"),
        "lists first: {requests:?}"
    );
    assert!(
        requests[1].contains("watch=true"),
        "then watches: {requests:?}"
    );
}

#[tokio::test]
async fn list_alone_fills_the_cache() {
    let server = fake_api_server().await;
    let cache = spawn_watch(server.client(), "node-a");
    within("the list", cache.wait_until(|c| c.get(API_UID).is_some())).await;
    // The list's pods are there at once (the watch may have run too).
    assert!(cache.get(API_UID).is_some());
}

#[tokio::test]
async fn a_kubeconfig_outside_a_cluster_fills_the_cache() {
    let server = fake_api_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = K8sEnvironment {
        in_cluster: false,
        kubeconfig: Some(server.kubeconfig(dir.path()).into_os_string()),
        node_name: Some("node-a".to_owned()),
    };
    let cache = cache_for(&env);
    assert_ne!(cache.state(), CacheState::Disabled);
    within(
        "the list through the kubeconfig's server",
        cache.wait_until(|c| c.state() == CacheState::Synced && c.get(API_UID).is_some()),
    )
    .await;
    let api = cache.get(API_UID).expect("api");
    assert_eq!(api.namespace, "payments");
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn a_kubeconfig_needs_the_node_name() {
    let server = fake_api_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = K8sEnvironment {
        in_cluster: false,
        kubeconfig: Some(server.kubeconfig(dir.path()).into_os_string()),
        node_name: None,
    };
    assert_eq!(cache_for(&env).state(), CacheState::Disabled);
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn an_unusable_kubeconfig_disables_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Some("node-a".to_owned());
    // Missing: refused at once.
    let missing = K8sEnvironment {
        kubeconfig: Some(dir.path().join("absent").into_os_string()),
        node_name: node.clone(),
        ..Default::default()
    };
    assert_eq!(cache_for(&missing).state(), CacheState::Disabled);
    // Several files: the agent uses exactly one.
    let several = K8sEnvironment {
        kubeconfig: Some("/a/config:/b/config".into()),
        node_name: node.clone(),
        ..Default::default()
    };
    assert_eq!(cache_for(&several).state(), CacheState::Disabled);
    // Readable, but its context names no cluster: found out in the task.
    let path = dir.path().join("no-cluster");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncontexts:\n  - name: c\n    context: { cluster: nowhere }\ncurrent-context: c\n",
    )
    .expect("write");
    let broken = K8sEnvironment {
        kubeconfig: Some(path.into_os_string()),
        node_name: node,
        ..Default::default()
    };
    let cache = cache_for(&broken);
    within(
        "the kubeconfig to be refused",
        cache.wait_until(|c| c.state() == CacheState::Disabled),
    )
    .await;
}

#[test]
fn neither_in_a_cluster_nor_a_kubeconfig_never_matches() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let env = K8sEnvironment {
        node_name: Some("node-a".to_owned()),
        ..Default::default()
    };
    let cache = rt.block_on(async { cache_for(&env) });
    assert_eq!(cache.state(), CacheState::Disabled);
    assert!(cache.is_empty());
}

#[test]
fn outside_a_cluster_it_never_matches() {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some()
    {
        crate::testkit::skip("running inside a Kubernetes cluster, or KUBECONFIG is set");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let cache = rt.block_on(async { from_environment(Some("node-a")) });
    assert_eq!(cache.state(), CacheState::Disabled);
    assert!(cache.get(API_UID).is_none());
    assert!(cache.is_empty());
}
