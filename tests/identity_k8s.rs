//! Kubernetes selectors against the real kernel (issue 3): `tessera run` builds its pod cache
//! from a loopback server that replays the recorded API-server responses of the k8s unit tests
//! (agent/src/identity/k8s/fixtures: a pod list, then a watch that adds, modifies and deletes
//! pods), reached through KUBECONFIG; processes sit in kubepods cgroups made by the test for
//! those pods' UIDs. Outside a cluster, the selectors never match and the agent says so once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Agent, Servers, TestCgroup, Workload, extra_tcp_server, identity_policy, privileged,
};
use tessera_agent::testkit::apiserver;

const LIST: &str = include_str!("../agent/src/identity/k8s/fixtures/pod-list.json");
const WATCH: &str = include_str!("../agent/src/identity/k8s/fixtures/pod-watch.jsonl");
/// payments/api-7d9f4c8b6-x2k9q, service account `api`; its `proxy` container gets its ID
/// from the watch (MODIFIED).
const API_UID: &str = "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d";
const SERVER_ID: &str = "3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const PROXY_ID: &str = "4444444444444444444444444444444444444444444444444444444444444444";
/// jobs/batch-29144: listed, then DELETED by the watch.
const JOB_UID: &str = "c0ffee00-1111-4222-8333-444455556666";
const JOB_ID: &str = "2222222222222222222222222222222222222222222222222222222222222222";
/// shop/web-0: ADDED by the watch.
const WEB_UID: &str = "5a5a5a5a-0000-4000-8000-000000000001";
const WEB_ID: &str = "7777777777777777777777777777777777777777777777777777777777777777";
const NODE: &str = "node-a";

/// The shared loopback API server (`testkit::apiserver`): GET /api/v1/pods answers the recorded
/// list; the first watch gets the recorded events, later watches stay open with nothing to say.
struct FakeApiServer {
    server: apiserver::FakeApiServer,
    /// Runs the server (dropped after it).
    _runtime: tokio::runtime::Runtime,
}

impl FakeApiServer {
    fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let server = runtime.block_on(apiserver::FakeApiServer::start());
        server.replay("/api/v1/pods", LIST, WATCH);
        Self {
            server,
            _runtime: runtime,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.server.requests()
    }

    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.server.kubeconfig(dir)
    }
}

/// The cgroup of a pod's container, kubelet systemd driver with containerd.
fn pod_container(cg: &TestCgroup, qos: &str, pod_uid: &str, id: &str) -> PathBuf {
    let uid = pod_uid.replace('-', "_");
    let path = match qos {
        "" => format!("kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{id}.scope"),
        q => format!(
            "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice/cri-containerd-{id}.scope"
        ),
    };
    cg.child(&path).0
}

fn policy(port: u16) -> String {
    identity_policy(
        "    - name: payments-api\n      match: { k8s: { namespace: payments, serviceAccount: api } }\n\
         \x20   - name: payments-proxy\n      match: { k8s: { namespace: payments, containerName: proxy } }\n\
         \x20   - name: shop-web\n      match: { k8s: { namespace: shop, podLabels: { app: web } } }\n\
         \x20   - name: jobs\n      match: { k8s: { namespace: jobs } }",
        "    - name: api-to-vault\n      workloads: [payments-api]\n      endpoints: [vault]\n      credential: { required: true, maxTtl: 10m, bind: process }\n\
         \x20   - name: open-to-vault\n      workloads: [shop-web, jobs]\n      endpoints: [vault]",
        port,
        extra_tcp_server(),
    )
}

/// Asks for a credential (which attests the caller again) until `done` says the answer shows
/// the pod cache has caught up; returns that answer.
fn token_until(w: &mut Workload, what: &str, done: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = w.token("vault", Some(60));
        if done(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the pod cache never caught up; last answer {status} {body}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kubernetes_selectors_match_pods_from_the_api_server() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("k8s");
    let server = FakeApiServer::start();
    let servers = Servers::start();
    let port = servers.tcp_port;
    let kdir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.kubeconfig(kdir.path());
    let api_ctr = pod_container(&cg, "burstable", API_UID, SERVER_ID);
    let proxy_ctr = pod_container(&cg, "burstable", API_UID, PROXY_ID);
    let web_ctr = pod_container(&cg, "", WEB_UID, WEB_ID);
    // The deleted job's pod, kubelet cgroupfs layout.
    let (job_ctr, _) = cg.child(&format!("kubepods/besteffort/pod{JOB_UID}/{JOB_ID}"));
    let mut agent = Agent::start_env(
        &policy(port),
        &cg.path,
        &[],
        &[
            ("KUBECONFIG", Some(kubeconfig.to_str().expect("utf-8"))),
            ("NODE_NAME", Some(NODE)),
            ("KUBERNETES_SERVICE_HOST", None),
        ],
    );
    let mut web = Workload::spawn_in(&web_ctr, &agent.api, &["python3"]);
    let mut job = Workload::spawn_in(&job_ctr, &agent.api, &["python3"]);
    let mut api = Workload::spawn_in(&api_ctr, &agent.api, &["python3"]);
    let mut proxy = Workload::spawn_in(&proxy_ctr, &agent.api, &["python3"]);

    // web-0 comes from the watch (ADDED, after the list); batch is DELETED last, so once it
    // is gone every recorded event has been applied.
    token_until(&mut web, "web-0 added", |s, b| {
        s == 403 && b["reason"] == "credential_not_required"
    });
    token_until(&mut job, "batch deleted", |s, b| {
        s == 403 && b["reason"] == "unknown_workload"
    });

    let (status, body) = api.token("vault", Some(60));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["spiffe_id"], "spiffe://test.tessera.dev/payments-api",
        "{body}"
    );
    let (r, d, _) = agent.settled(api.pid, || api.connect4(port));
    assert_eq!(
        (
            r.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("ok", Some("credential_valid"), Some("payments-api")),
        "{d}"
    );
    // The evidence: the pod as the API server describes it.
    let pod = &d["process"]["pod"];
    assert_eq!(pod["uid"], API_UID, "{d}");
    assert_eq!(pod["namespace"], "payments", "{d}");
    assert_eq!(pod["name"], "api-7d9f4c8b6-x2k9q", "{d}");
    assert_eq!(pod["service_account"], "api", "{d}");
    let ctr = &d["process"]["container"];
    assert_eq!(
        ctr.as_str().or_else(|| ctr["id"].as_str()),
        Some(SERVER_ID),
        "{d}"
    );

    // The proxy container's ID came with the watch: containerName is more specific.
    let (status, body) = proxy.token("vault", Some(60));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("workload_not_allowed")),
        "{body}"
    );
    let (r, d, _) = agent.settled(proxy.pid, || proxy.connect4(port));
    assert_eq!(
        (
            r.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        (
            "EPERM",
            Some("workload_not_allowed"),
            Some("payments-proxy")
        ),
        "{d}"
    );

    let (r, d, _) = agent.settled(web.pid, || web.connect4(port));
    assert_eq!(
        (
            r.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("ok", Some("allowlisted"), Some("shop-web")),
        "{d}"
    );
    let (r, d, _) = agent.settled(job.pid, || job.connect4(port));
    assert_eq!(
        (r.as_str(), d["reason"].as_str()),
        ("EPERM", Some("unknown_workload")),
        "{d}"
    );

    // Only this node's pods were asked for.
    let requests = server.requests();
    let pods: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods"))
        .collect();
    assert!(pods.len() >= 2, "a list and a watch: {requests:?}");
    for r in pods {
        assert!(
            r.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "not limited to this node: {r}"
        );
    }
    assert!(
        agent.stop(),
        "tessera run did not exit cleanly on SIGTERM while watching pods"
    );
}

#[test]
fn outside_a_cluster_kubernetes_selectors_never_match_and_the_agent_says_so_once() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("k8s-none");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let api_ctr = pod_container(&cg, "burstable", API_UID, SERVER_ID);
    let agent = Agent::start_env(
        &policy(port),
        &cg.path,
        &[],
        &[
            ("KUBECONFIG", None),
            ("KUBERNETES_SERVICE_HOST", None),
            ("NODE_NAME", Some(NODE)),
        ],
    );
    let mut api = Workload::spawn_in(&api_ctr, &agent.api, &["python3"]);
    for _ in 0..3 {
        let (status, body) = api.token("vault", Some(60));
        assert_eq!(
            (status, body["reason"].as_str()),
            (403, Some("unknown_workload")),
            "{body}"
        );
    }
    let (r, d, _) = agent.settled(api.pid, || api.connect4(port));
    assert_eq!(
        (r.as_str(), d["reason"].as_str()),
        ("EPERM", Some("unknown_workload")),
        "{d}"
    );
    assert_eq!(d["process"]["pod"]["uid"], API_UID, "{d}");
    assert!(
        d["process"]["pod"]["namespace"].is_null(),
        "no API server, no namespace: {d}"
    );

    let log = agent.agent_log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.to_ascii_lowercase()
                .contains("kubernetes selectors will never match")
        })
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:#?}\n{log}");
}

#[test]
fn whoami_reads_pod_metadata_through_a_kubeconfig() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("k8s-whoami");
    let server = FakeApiServer::start();
    let kdir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.kubeconfig(kdir.path());
    let policy_path = kdir.path().join("policy.yaml");
    std::fs::write(&policy_path, policy(1)).expect("write policy");
    let api_ctr = pod_container(&cg, "burstable", API_UID, SERVER_ID);
    let w = Workload::spawn_in(&api_ctr, Path::new("/nonexistent"), &["python3"]);
    let mut child = std::process::Command::new(support::TESSERA)
        .args([
            "whoami",
            "-o",
            "json",
            "--pid",
            &w.pid.to_string(),
            "--policy",
        ])
        .arg(&policy_path)
        .env("KUBECONFIG", &kubeconfig)
        .env("NODE_NAME", NODE)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tessera whoami");
    // A guard against a hang only (whoami waits at most 10 s for the pod list).
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "tessera whoami did not exit within 60 s (it had printed: {})",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&stdout).expect("whoami JSON");
    assert_eq!(r["workload"]["name"], "payments-api", "{r:#}");
    let ev = &r["evidence"];
    assert_eq!(ev["pod"]["uid"], API_UID, "{r:#}");
    assert_eq!(ev["kubernetes"]["namespace"], "payments", "{r:#}");
    assert_eq!(ev["kubernetes"]["service_account"], "api", "{r:#}");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{:?}",
        server.requests()
    );
    w.exit();
}

#[test]
fn an_unreachable_api_server_matches_nothing_and_does_not_hold_up_shutdown() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("k8s-down");
    let servers = Servers::start();
    let port = servers.tcp_port;
    // A kubeconfig pointing at a loopback port nobody listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let kdir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = apiserver::kubeconfig(kdir.path(), &format!("http://127.0.0.1:{closed}"));
    let api_ctr = pod_container(&cg, "burstable", API_UID, SERVER_ID);
    let mut agent = Agent::start_env(
        &policy(port),
        &cg.path,
        &[],
        &[
            ("KUBECONFIG", Some(kubeconfig.to_str().expect("utf-8"))),
            ("NODE_NAME", Some(NODE)),
            ("KUBERNETES_SERVICE_HOST", None),
        ],
    );
    let mut api = Workload::spawn_in(&api_ctr, &agent.api, &["python3"]);
    let (status, body) = api.token("vault", Some(60));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("unknown_workload")),
        "{body}"
    );
    let (r, d, _) = agent.settled(api.pid, || api.connect4(port));
    assert_eq!(
        (r.as_str(), d["reason"].as_str()),
        ("EPERM", Some("unknown_workload")),
        "{d}"
    );
    let stopped = agent.stop();
    let failures = agent
        .agent_log()
        .lines()
        .filter(|l| l.contains("pod watch failed"))
        .count();
    eprintln!("{failures} 'pod watch failed' lines in the agent's log");
    assert!(
        stopped,
        "tessera run did not exit cleanly on SIGTERM with the API server unreachable \
         ({failures} 'pod watch failed' lines in its log)"
    );
}
