//! The policy resources against a loopback API server: accepted, refused (the status says
//! why, the old spec keeps enforcing), updated, deleted, a watch that reconnects, and the
//! namespace rule of `TesseraNamespacedPolicy`.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::testkit::apiserver::FakeApiServer;

const CLUSTER: &str = "/apis/tessera.dev/v1alpha1/tesserapolicies";
const NAMESPACED: &str = "/apis/tessera.dev/v1alpha1/tesseranamespacedpolicies";

fn spec(workload: &str, max_ttl: &str) -> Value {
    json!({
        "trustDomain": "example.org",
        "workloads": [{ "name": workload, "match": { "uid": 1001, "systemdUnit": format!("{workload}.service") } }],
        // Each its own address: two endpoints on one address and port are refused.
        "endpoints": [{ "name": format!("{workload}-vault"), "addresses": [address(workload)], "ports": [8200] }],
        "rules": [{
            "name": format!("{workload}-to-vault"),
            "workloads": [workload],
            "endpoints": [format!("{workload}-vault")],
            "credential": { "required": true, "maxTtl": max_ttl, "bind": "process" },
        }],
    })
}

fn address(name: &str) -> String {
    let n = name.bytes().map(u32::from).sum::<u32>() % 250;
    format!("10.0.{n}.10")
}

fn cluster_policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "TesseraPolicy",
        "metadata": { "name": name },
        "spec": spec,
    })
}

fn namespaced_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "TesseraNamespacedPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })
}

/// Guards against a hang only; no assertion depends on time.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

/// What the daemon's reload does with the resources (no files here).
fn reload(resources: &PolicyResources) -> Merged {
    let merged = resources.load(&[]).expect("no files, nothing to refuse");
    resources.applied(&merged, &merged.policy.revision);
    merged
}

async fn started(server: &FakeApiServer) -> PolicyResources {
    let resources = PolicyResources::spawn(server.client());
    within("the first lists", resources.wait_synced()).await;
    resources
}

/// The `Accepted` condition of an object, once it is about `generation`.
fn accepted(object: &Value, generation: i64) -> Option<Value> {
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    (condition["observedGeneration"] == generation).then_some(condition)
}

async fn condition(
    server: &FakeApiServer,
    collection: &str,
    ns: &str,
    name: &str,
    generation: i64,
) -> Value {
    within(
        &format!("the status of {name} for generation {generation}"),
        server.wait_until(|s| {
            s.get(collection, ns, name)
                .is_some_and(|o| accepted(&o, generation).is_some())
        }),
    )
    .await;
    let object = server.get(collection, ns, name).expect("object");
    accepted(&object, generation).expect("condition")
}

async fn next_change(rx: &mut watch::Receiver<u64>) {
    within("a change of the resources", rx.changed())
        .await
        .expect("the store lives");
}

#[tokio::test]
async fn an_accepted_resource_enforces_and_says_so() {
    let server = FakeApiServer::start().await;
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "10m")));
    let resources = started(&server).await;
    let merged = reload(&resources);
    assert!(merged.policy.workload_by_name("payments").is_some());
    let payments = condition(&server, CLUSTER, "", "payments", 1).await;
    assert_eq!(payments["status"], "True");
    assert_eq!(payments["reason"], "Accepted");
    let object = server.get(CLUSTER, "", "payments").expect("object");
    assert_eq!(
        object["status"]["acceptedRevision"],
        json!(merged.policy.revision)
    );
    assert_eq!(object["status"]["acceptedGeneration"], 1);
    assert_eq!(object["status"]["observedGeneration"], 1);
    let patches = server.patches();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].0, format!("{CLUSTER}/payments/status"));

    // Another reload of the same revision (as on another node, or after a change that is
    // refused): no second write. `zeta` (refused, so the revision stays) is written after
    // `payments` is looked at.
    let mut changes = resources.changes();
    server.put(CLUSTER, cluster_policy("zeta", spec("zeta", "forever")));
    next_change(&mut changes).await;
    assert_eq!(reload(&resources).policy.revision, merged.policy.revision);
    condition(&server, CLUSTER, "", "zeta", 1).await;
    let written: Vec<String> = server.patches().into_iter().map(|(path, _)| path).collect();
    assert_eq!(
        written,
        [
            format!("{CLUSTER}/payments/status"),
            format!("{CLUSTER}/zeta/status")
        ],
        "an unchanged status is not written again"
    );
}

#[tokio::test]
async fn a_refused_resource_says_why_and_the_accepted_spec_keeps_enforcing() {
    let server = FakeApiServer::start().await;
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "10m")));
    server.put(
        CLUSTER,
        cluster_policy("broken", spec("broken", "ten minutes")),
    );
    let resources = started(&server).await;
    let merged = reload(&resources);
    assert!(merged.policy.workload_by_name("payments").is_some());
    assert!(merged.policy.workload_by_name("broken").is_none());
    let refused = condition(&server, CLUSTER, "", "broken", 1).await;
    assert_eq!(refused["status"], "False");
    assert_eq!(refused["reason"], "Invalid");
    let message = refused["message"].as_str().expect("message");
    assert!(
        message.starts_with("TesseraPolicy/broken spec.rules[0].credential.maxTtl: "),
        "{message}"
    );
    assert!(
        message.contains("nothing of this resource is enforced"),
        "{message}"
    );
    let broken = server.get(CLUSTER, "", "broken").expect("object");
    assert_eq!(broken["status"]["acceptedRevision"], Value::Null);
    assert_eq!(
        condition(&server, CLUSTER, "", "payments", 1).await["status"],
        "True"
    );

    // An update that is refused: generation 1 stays in force.
    let mut changes = resources.changes();
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "48h")));
    next_change(&mut changes).await;
    let merged = reload(&resources);
    let rule = merged
        .policy
        .rules
        .iter()
        .find(|r| r.name == "payments-to-vault")
        .expect("the accepted rule still enforces");
    assert_eq!(
        rule.credential.map(|c| c.max_ttl),
        Some(Duration::from_secs(600))
    );
    let refused = condition(&server, CLUSTER, "", "payments", 2).await;
    assert_eq!(refused["status"], "False");
    let message = refused["message"].as_str().expect("message");
    assert!(
        message.contains("spec.rules[0].credential.maxTtl"),
        "{message}"
    );
    assert!(
        message.contains("generation 1 of this resource stays in force"),
        "{message}"
    );
    let payments = server.get(CLUSTER, "", "payments").expect("object");
    assert_eq!(payments["status"]["acceptedGeneration"], 1);
    assert_eq!(payments["status"]["observedGeneration"], 2);

    // Fixed: generation 3 enforces.
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "5m")));
    next_change(&mut changes).await;
    let merged = reload(&resources);
    let rule = merged
        .policy
        .rules
        .iter()
        .find(|r| r.name == "payments-to-vault")
        .expect("rule");
    assert_eq!(
        rule.credential.map(|c| c.max_ttl),
        Some(Duration::from_secs(300))
    );
    assert_eq!(
        condition(&server, CLUSTER, "", "payments", 3).await["status"],
        "True"
    );
}

#[tokio::test]
async fn a_deleted_resource_leaves_the_policy() {
    let server = FakeApiServer::start().await;
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "10m")));
    server.put(CLUSTER, cluster_policy("batch", spec("batch", "10m")));
    let resources = started(&server).await;
    assert_eq!(reload(&resources).policy.workloads.len(), 2);
    let mut changes = resources.changes();
    server.delete(CLUSTER, "", "batch");
    next_change(&mut changes).await;
    let merged = reload(&resources);
    let names: Vec<&str> = merged
        .policy
        .workloads
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["payments"]);
}

#[tokio::test]
async fn a_watch_that_ends_is_resumed_without_losing_a_change() {
    let server = FakeApiServer::start().await;
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "10m")));
    let resources = started(&server).await;
    let watches = |s: &FakeApiServer| {
        s.requests()
            .iter()
            .filter(|r| r.starts_with(CLUSTER) && r.contains("watch=true"))
            .count()
    };
    within("the first watch", server.wait_until(|s| watches(s) >= 1)).await;
    server.end_watches();
    // Made while no watch is open: the next watch (from the last resource version) has it.
    server.put(CLUSTER, cluster_policy("batch", spec("batch", "10m")));
    within("the change after the reconnect", async {
        let mut changes = resources.changes();
        while !resources
            .candidates()
            .iter()
            .any(|c| c.latest.name == "batch")
        {
            changes.changed().await.expect("store");
        }
    })
    .await;
    assert!(watches(&server) >= 2, "{:?}", server.requests());
    let merged = reload(&resources);
    assert!(merged.policy.workload_by_name("batch").is_some());
    assert_eq!(
        condition(&server, CLUSTER, "", "batch", 1).await["status"],
        "True"
    );
}

#[tokio::test]
async fn a_namespaced_policy_selects_only_its_own_namespace() {
    let server = FakeApiServer::start().await;
    server.put(
        NAMESPACED,
        namespaced_policy("shop", "web", spec("web", "10m")),
    );
    let mut escape = spec("api", "10m");
    escape["workloads"][0]["match"] = json!({ "k8s": { "namespace": "kube-system" } });
    server.put(NAMESPACED, namespaced_policy("shop", "api", escape));
    let resources = started(&server).await;
    let merged = reload(&resources);
    let (_, web) = merged.policy.workload_by_name("web").expect("web");
    assert_eq!(
        web.selectors
            .k8s
            .as_ref()
            .and_then(|k| k.namespace.as_deref()),
        Some("shop")
    );
    assert!(merged.policy.workload_by_name("api").is_none());
    assert_eq!(
        condition(&server, NAMESPACED, "shop", "web", 1).await["status"],
        "True"
    );
    let refused = condition(&server, NAMESPACED, "shop", "api", 1).await;
    assert_eq!(refused["status"], "False");
    let message = refused["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "TesseraNamespacedPolicy/shop/api spec.workloads[0].match.k8s.namespace: namespace \"kube-system\" is not this resource's namespace `shop`"
        ),
        "{message}"
    );
    assert!(
        server.patches().iter().any(|(path, _)| path
            == "/apis/tessera.dev/v1alpha1/namespaces/shop/tesseranamespacedpolicies/api/status"),
        "{:?}",
        server.patches()
    );
}

#[tokio::test]
async fn a_refused_reload_tells_the_resources_that_changed() {
    let server = FakeApiServer::start().await;
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "10m")));
    let resources = started(&server).await;
    let merged = reload(&resources);
    condition(&server, CLUSTER, "", "payments", 1).await;
    let mut changes = resources.changes();
    server.put(CLUSTER, cluster_policy("payments", spec("payments", "5m")));
    next_change(&mut changes).await;
    resources.not_applied(
        "bad.yaml:1:1: expected a mapping — fix it",
        &merged.policy.revision,
    );
    let payments = condition(&server, CLUSTER, "", "payments", 2).await;
    assert_eq!(payments["reason"], "NotApplied");
    assert!(
        payments["message"]
            .as_str()
            .is_some_and(|m| m.contains("bad.yaml:1:1")),
        "{payments}"
    );
    let object = server.get(CLUSTER, "", "payments").expect("object");
    assert_eq!(object["status"]["acceptedGeneration"], 1);
}
