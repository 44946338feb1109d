//! Policies as custom resources, end to end (privileged): `tessera run --k8s-policies` with a
//! kubeconfig pointing at a loopback API server. A `TesseraPolicy`'s rule enforces in the
//! kernel beside the file's; its status says Accepted; a refused update keeps the accepted
//! rule enforcing and says why; a deleted resource's endpoint is no longer protected.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Agent, Servers, TestCgroup, Workload, privileged};
use tessera_agent::testkit::apiserver::FakeApiServer;

const CLUSTER: &str = "/apis/tessera.dev/v1alpha1/tesserapolicies";

/// The file: `other` may reach `api` (no credential).
fn file_policy(rel: &str, api_port: u16) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: base\nspec:\n  \
         trustDomain: test.tessera.dev\n  workloads:\n    - name: other\n      match:\n        \
         cgroup: {rel}/other\n  endpoints:\n    - name: api\n      addresses: [\"127.0.0.1/32\"]\n      \
         ports: [{api_port}]\n  rules:\n    - name: other-to-api\n      workloads: [other]\n      \
         endpoints: [api]\n"
    )
}

/// The resource: `app` may reach `vault` with a credential of at most `max_ttl`.
fn resource(rel: &str, port: u16, max_ttl: &str) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "TesseraPolicy",
        "metadata": { "name": "vault" },
        "spec": {
            "trustDomain": "test.tessera.dev",
            "workloads": [{ "name": "app", "match": { "cgroup": format!("{rel}/app") } }],
            "endpoints": [{ "name": "vault", "addresses": ["127.0.0.1/32"], "ports": [port], "protocol": "tcp" }],
            "rules": [{
                "name": "app-to-vault",
                "workloads": ["app"],
                "endpoints": ["vault"],
                "credential": { "required": true, "maxTtl": max_ttl, "bind": "process" },
            }],
        },
    })
}

/// The `Accepted` condition once it is about `generation`.
fn condition(rt: &tokio::runtime::Runtime, server: &FakeApiServer, generation: i64) -> Value {
    let about = |s: &FakeApiServer| {
        let object = s.get(CLUSTER, "", "vault")?;
        let condition = object["status"]["conditions"].as_array()?.first()?.clone();
        (condition["observedGeneration"] == generation).then_some(condition)
    };
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            server.wait_until(|s| about(s).is_some()),
        )
        .await
    })
    .unwrap_or_else(|_| {
        panic!(
            "no status for generation {generation}: {:?}",
            server.get(CLUSTER, "", "vault")
        )
    });
    about(server).expect("condition")
}

#[test]
fn a_resource_rule_enforces_in_the_kernel_and_its_status_follows() {
    if !privileged() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(FakeApiServer::start());
    let cg = TestCgroup::new("crd");
    let (app_cg, _) = cg.child("app");
    let (other_cg, _) = cg.child("other");
    let servers = Servers::start();
    let (port, api_port) = (servers.tcp_port, support::extra_tcp_server());
    server.put(CLUSTER, resource(&cg.rel, port, "10m"));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.kubeconfig(dir.path());
    let agent = Agent::start_env(
        &file_policy(&cg.rel, api_port),
        &cg.path,
        &["--k8s-policies"],
        &[
            ("KUBECONFIG", Some(kubeconfig.to_str().expect("path"))),
            ("KUBERNETES_SERVICE_HOST", None),
        ],
    );

    // The resource's rule and the file's, in one generation.
    let accepted = condition(&rt, &server, 1);
    assert_eq!(accepted["status"], "True", "{accepted}");
    let mut app = Workload::spawn(&app_cg, &agent.api);
    let mut other = Workload::spawn(&other_cg, &agent.api);
    assert_eq!(app.connect4(port), "EPERM", "vault needs a credential");
    app.must_token("vault", Some(60));
    assert_eq!(app.connect4(port), "ok");
    assert_eq!(other.connect4(api_port), "ok", "the file's rule");
    assert_eq!(other.connect4(port), "EPERM", "other has no rule for vault");
    let status = agent.status_json();
    let revision = status["policy"]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let object = server.get(CLUSTER, "", "vault").expect("object");
    assert_eq!(object["status"]["acceptedRevision"], json!(revision));

    // A refused update: generation 1's rule keeps enforcing (a 60 s token is still allowed,
    // and the bare connect still denied); the status says why.
    server.put(CLUSTER, resource(&cg.rel, port, "48h"));
    let refused = condition(&rt, &server, 2);
    assert_eq!(refused["status"], "False", "{refused}");
    let message = refused["message"].as_str().expect("message");
    assert!(
        message.contains("TesseraPolicy/vault spec.rules[0].credential.maxTtl"),
        "{message}"
    );
    let mut fresh = Workload::spawn(&app_cg, &agent.api);
    assert_eq!(fresh.connect4(port), "EPERM");
    fresh.must_token("vault", Some(60));
    assert_eq!(fresh.connect4(port), "ok");

    // Deleted: vault is no longer a protected endpoint.
    server.delete(CLUSTER, "", "vault");
    agent.wait_log("kubernetes policy resources changed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut bare = Workload::spawn(&app_cg, &agent.api);
    while bare.connect4(port) != "ok" {
        assert!(
            std::time::Instant::now() < deadline,
            "vault is still protected:\n{}",
            agent.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = bare.token("vault", Some(60));
    assert_eq!(code, 403, "no rule for vault any more");
    drop(rt);
}
