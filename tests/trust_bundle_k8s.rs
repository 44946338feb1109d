//! `--trust-bundle-k8s`: two agents on one machine (two cgroups, two state directories, two
//! node names) against one loopback API server. Each applies its own ConfigMap; a token one
//! issued validates through the other (its JWKS lists the key, `ValidateJWTSVID` answers the
//! SPIFFE ID); another trust domain's object and a malformed one change nothing; once the first
//! agent is gone and its object deleted, its tokens still validate through the second until the
//! last one it could have signed expires, and then its key is gone. Outside a cluster, or
//! without a node name, the start is refused with the reason, before anything is written.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    Agent, Servers, TestCgroup, Workload, kid, privileged, standard_policy, validate_through,
    wait_published,
};
use tessera_agent::testkit::apiserver::FakeApiServer;

const CONFIGMAPS: &str = "/api/v1/configmaps";
const NAMESPACE: &str = "tessera";
const DOMAIN: &str = "test.tessera.dev";
/// The policy's longest credential: how long a key stays after its object goes (plus 30 s).
const MAX_TTL: u64 = 30;

/// A P-256 public key that no agent holds.
fn foreign_key(kid: &str) -> Value {
    json!({ "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "jwt-svid",
            "x": "3C-_E-5LlKAVOXO-WCnAR7ryDtr7A9fokF4E-qLVkIQ",
            "y": "_lZkvq1Qv-Z5fg1-95tJcRM61oRIyxc-wD8OdI3X7tw" })
}

fn bundle_object(name: &str, domain: &str, jwks: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": { "tessera.dev/trust-bundle": domain },
        },
        "data": { "jwks.json": jwks },
    })
}

fn kids(jwks: &Value) -> Vec<String> {
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect();
    kids.sort();
    kids
}

/// Whether `token`'s signature verifies with the key of its `kid` in `jwks` (for `vault`).
fn verifies_with(jwks: &Value, token: &str) -> bool {
    let Some(jwk) = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid(token).as_str())
    else {
        return false;
    };
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).expect("a JWK");
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("a key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["vault"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).is_ok()
}

fn wait_for(
    rt: &tokio::runtime::Runtime,
    server: &FakeApiServer,
    what: &str,
    pred: impl Fn(&FakeApiServer) -> bool,
) {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), server.wait_until(pred)).await
    })
    .unwrap_or_else(|_| panic!("the API server never saw {what}: {:?}", server.requests()));
}

#[test]
fn agents_share_their_keys_through_the_api_server() {
    if !privileged() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(FakeApiServer::start());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.kubeconfig(dir.path());
    let kubeconfig = kubeconfig.to_str().expect("utf-8");
    let servers = Servers::start();
    let (cg_a, cg_b) = (
        TestCgroup::new("k8sbundle-a"),
        TestCgroup::new("k8sbundle-b"),
    );
    let mut agents = Vec::new();
    let mut apps = Vec::new();
    for (cg, node) in [(&cg_a, "node-a"), (&cg_b, "node-b")] {
        let (app, _) = cg.child("app");
        let _ = cg.child("other");
        let policy = standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce")
            .replace("maxTtl: 10m", &format!("maxTtl: {MAX_TTL}s"));
        agents.push(Agent::start_env(
            &policy,
            &cg.path,
            &["--trust-bundle-k8s", NAMESPACE],
            &[
                ("KUBECONFIG", Some(kubeconfig)),
                ("KUBERNETES_SERVICE_HOST", None),
                ("NODE_NAME", Some(node)),
            ],
        ));
        apps.push(app);
    }
    let mut on_a = Workload::spawn(&apps[0], &agents[0].api);
    let mut on_b = Workload::spawn(&apps[1], &agents[1].api);

    // Each agent applies its own object, and no other.
    let object = |node: &str| server.get(CONFIGMAPS, NAMESPACE, &format!("tessera-bundle-{node}"));
    wait_for(&rt, &server, "both objects", |_| {
        object("node-a").is_some() && object("node-b").is_some()
    });
    for patch in server.patches() {
        assert!(
            patch
                .0
                .starts_with("/api/v1/namespaces/tessera/configmaps/tessera-bundle-node-")
                && patch.0.contains("fieldManager=tessera-agent"),
            "{patch:?}"
        );
    }
    let (status, body) = on_a.token("vault", Some(MAX_TTL));
    assert_eq!(status, 200, "{body}");
    let from_a = body["token"].as_str().expect("token").to_owned();
    let a_object = object("node-a").expect("A's object");
    assert_eq!(
        a_object["metadata"]["labels"]["tessera.dev/trust-bundle"],
        DOMAIN
    );
    let a_jwks: Value =
        serde_json::from_str(a_object["data"]["jwks.json"].as_str().expect("jwks")).expect("JSON");
    assert_eq!(kids(&a_jwks), [kid(&from_a)], "A's object holds A's key");

    // A's token validates through B: B's JWKS lists A's key, and ValidateJWTSVID says who.
    let b_jwks = wait_published(&agents[1], &mut on_b, &kid(&from_a));
    assert!(verifies_with(&b_jwks, &from_a), "{b_jwks}");
    if let Some(v) = validate_through(&agents[1], &apps[1], &from_a) {
        assert_eq!(v["validated"], "spiffe://test.tessera.dev/app", "{v}");
    }
    // And B's through A.
    let (status, body) = on_b.token("vault", Some(MAX_TTL));
    assert_eq!(status, 200, "{body}");
    let from_b = body["token"].as_str().expect("token").to_owned();
    let a_serves = wait_published(&agents[0], &mut on_a, &kid(&from_b));
    assert!(verifies_with(&a_serves, &from_b), "{a_serves}");

    // Another trust domain's object, then a malformed one of this trust domain: B warns of the
    // second (so it has seen both) and serves what it served before.
    let (_, before) = on_b.raw("GET", "/v1/jwks", None);
    server.put(
        CONFIGMAPS,
        bundle_object(
            "tessera-bundle-elsewhere",
            "other.example",
            &json!({ "keys": [foreign_key("other-domain-key")] }).to_string(),
        ),
    );
    server.put(
        CONFIGMAPS,
        bundle_object("tessera-bundle-broken", DOMAIN, "{\"keys\": [{\"kty\": "),
    );
    agents[1].wait_log("a malformed trust bundle object is ignored");
    let (_, after) = on_b.raw("GET", "/v1/jwks", None);
    assert_eq!(kids(&after), kids(&before), "{after}");
    assert!(
        !kids(&after).contains(&"other-domain-key".to_owned()),
        "{after}"
    );

    // A is gone (killed: it cleans nothing up) and its object deleted: the token it issued
    // last still validates through B, and A's key stays in B's bundle.
    let (status, body) = on_a.token("vault", Some(MAX_TTL));
    assert_eq!(status, 200, "{body}");
    let last = body["token"].as_str().expect("token").to_owned();
    agents[0].kill();
    server.delete(CONFIGMAPS, NAMESPACE, "tessera-bundle-node-a");
    agents[1].wait_log("a trust bundle key left the source");
    let (_, jwks) = on_b.raw("GET", "/v1/jwks", None);
    assert!(kids(&jwks).contains(&kid(&last)), "{jwks}");
    assert!(verifies_with(&jwks, &last), "{jwks}");
    if let Some(v) = validate_through(&agents[1], &apps[1], &last) {
        assert_eq!(v["validated"], "spiffe://test.tessera.dev/app", "{v}");
    }

    // Once every token A could have signed has expired (the longest TTL and the clock-skew
    // grace), B drops A's key and no longer validates A's token.
    let deadline = Instant::now() + Duration::from_secs(MAX_TTL + 30 + 60);
    loop {
        let (_, jwks) = on_b.raw("GET", "/v1/jwks", None);
        if !kids(&jwks).contains(&kid(&last)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's key is still in B's bundle: {jwks}\n{}",
            agents[1].agent_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    if let Some(v) = validate_through(&agents[1], &apps[1], &last) {
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("INVALID_ARGUMENT")),
            "{v}"
        );
    }
    // B's own object is untouched by all this.
    let b_object = object("node-b").expect("B's object");
    let b_jwks: Value =
        serde_json::from_str(b_object["data"]["jwks.json"].as_str().expect("jwks")).expect("JSON");
    assert_eq!(kids(&b_jwks), [kid(&from_b)]);
    drop(agents);
    drop(rt);
}

/// `tessera run --trust-bundle-k8s` where it cannot work: the reason, exit 1, nothing written
/// (no state directory, no socket).
#[test]
fn outside_a_cluster_the_start_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        standard_policy("/tessera-test-none", 8200, 8201, "audit"),
    )
    .expect("policy");
    let run = |node: Option<&str>| {
        let mut cmd = std::process::Command::new(support::TESSERA);
        cmd.args([
            "run",
            "--config",
            "/dev/null",
            "--trust-bundle-k8s",
            "--policy",
        ])
        .arg(&policy)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--api-socket")
        .arg(dir.path().join("workload.sock"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .args(["--metrics-addr", "off", "--decision-log", "-"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NODE_NAME");
        if let Some(node) = node {
            cmd.env("NODE_NAME", node);
        }
        let out = cmd.output().expect("run tessera");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--trust-bundle-k8s: the node name is unknown: set NODE_NAME"),
        "{err}"
    );
    let (code, err) = run(Some("node-a"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "--trust-bundle-k8s: cannot reach the Kubernetes API server: not running in a Kubernetes cluster"
        ),
        "{err}"
    );
    assert_eq!(
        err.matches("not running in a Kubernetes cluster").count(),
        1,
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("policy.yaml")],
        "nothing written"
    );
}
