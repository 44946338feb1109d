//! The SPIFFE Workload API on the Workload API socket, through the real SPIFFE client
//! (py-spiffe, `pip install spiffe`) configured only by `SPIFFE_ENDPOINT_SOCKET`: JWT-SVIDs that
//! SPIFFE libraries validate, bundles, validation, and the kernel grant behind each SVID.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{Agent, Servers, TestCgroup, privileged, real_python};

const TRUST_DOMAIN: &str = "spiffe.tessera.dev";

fn policy(cgroup_rel: &str, port: u16) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {{ name: spiffe }}
spec:
  trustDomain: {TRUST_DOMAIN}
  workloads:
    - name: app
      spiffeId: spiffe://{TRUST_DOMAIN}/app
      match: {{ cgroup: {cgroup_rel}/app }}
    - name: other
      match: {{ cgroup: {cgroup_rel}/other }}
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32"]
      ports: [{port}]
      audiences: [vault.example.org]
  rules:
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault]
      credential: {{ required: true, maxTtl: 5m, bind: process }}
"#
    )
}

/// py-spiffe is importable, installing it if needed; `Err` says why it cannot be.
fn py_spiffe() -> Result<(), String> {
    support::python_package("import spiffe, grpc", "spiffe")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/spiffe_client.py")
}

/// Runs the client in `cgroup` with nothing in its environment but `SPIFFE_ENDPOINT_SOCKET`.
fn client(agent: &Agent, cgroup: &Path, mode: &str, audience: &str, port: u16) -> Value {
    let out = Command::new(real_python())
        .env_clear()
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", agent.api.display()),
        )
        .arg(script())
        .arg(cgroup)
        .args([mode, audience, TRUST_DOMAIN, &port.to_string()])
        .output()
        .expect("run the py-spiffe client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe client ({mode}) failed: {}\n{stdout}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.agent_log()
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client said {stdout:?}: {e}"))
}

fn claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("JWS payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims JSON")
}

#[test]
fn py_spiffe_fetches_validates_and_the_grant_is_written() {
    if !privileged() {
        return;
    }
    if let Err(why) = py_spiffe() {
        tessera_agent::testkit::skip(&why);
        return;
    }
    let servers = Servers::start();
    let port = servers.tcp_port;
    let cg = TestCgroup::new("spiffe");
    let (app, _) = cg.child("app");
    let (other, _) = cg.child("other");
    let agent = Agent::start(&policy(&cg.rel, port), &cg.path, &[]);

    // The whole JWT-SVID profile, by name and by a declared audience.
    for audience in ["vault", "vault.example.org"] {
        let got = client(&agent, &app, "full", audience, port);
        assert_eq!(got["env"], serde_json::json!(["SPIFFE_ENDPOINT_SOCKET"]));
        let id = format!("spiffe://{TRUST_DOMAIN}/app");
        assert_eq!(got["spiffe_id"], id.as_str(), "{got}");
        assert_eq!(got["parsed"], id.as_str());
        assert_eq!(got["validated"], id.as_str());
        assert_eq!(got["source_spiffe_id"], id.as_str());
        assert_eq!(got["source_validated"], true);
        let token = got["token"].as_str().expect("token");
        let c = claims(token);
        assert_eq!(c["aud"], audience);
        assert_eq!(c["sub"], id.as_str());
        for claim in ["jti", "task", "iat", "nbf", "exp", "iss"] {
            assert!(c.get(claim).is_some(), "claim {claim} missing: {c}");
        }
        assert_eq!(got["validated_audience"], serde_json::json!([audience]));
        assert!(
            got["validated_claims"]
                .as_array()
                .expect("claims")
                .contains(&Value::from("jti")),
            "{got}"
        );
        let wrong = got["wrong_audience"].as_str().expect("refused");
        assert!(wrong.contains("INVALID_ARGUMENT"), "{wrong}");
        assert_eq!(
            got["bundle_keys"].as_array().map(Vec::len),
            Some(1),
            "{got}"
        );
        // The grant was written before the answer: the client's connect goes through, on the
        // grant of the last SVID it was issued (JwtSource's; a newer one replaces the older
        // for the same endpoint).
        assert_eq!(got["connect"], "ok", "{got}\n{}", agent.agent_log());
        let last = claims(got["source_token"].as_str().expect("JwtSource token"));
        assert_ne!(last["jti"], c["jti"]);
        let issued = agent.wait_decision("the SVID's grant allows the connect", |d| {
            d["verdict"] == "allow"
                && d["reason"] == "credential_valid"
                && d["process"]["pid"] == got["pid"]
                && d["credential"]["jti"] == last["jti"]
        });
        assert_eq!(issued["workload"]["spiffe_id"], id.as_str());
    }

    // The JSON API keeps working on the same socket.
    let jwks = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&agent.api)
        .arg("http://localhost/v1/jwks")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Ok(jwks) = jwks {
        let jwks: Value = serde_json::from_str(&jwks).expect("JWKS JSON");
        assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
        assert_eq!(jwks["keys"][0]["alg"], "ES256");
    }

    // Refusals: none leaves a grant behind (the connect after each is denied).
    let no_rule = client(&agent, &other, "refused", "vault", port);
    let error = no_rule["error"].as_str().expect("refused");
    assert!(error.contains("PERMISSION_DENIED"), "{error}");
    assert!(error.contains("workload_not_allowed"), "{error}");
    assert_eq!(no_rule["connect"], "errno:1", "{no_rule}");

    let unknown = client(&agent, &app, "refused", "nowhere", port);
    let error = unknown["error"].as_str().expect("refused");
    assert!(error.contains("PERMISSION_DENIED"), "{error}");
    assert!(error.contains("unknown_audience"), "{error}");
    assert_eq!(unknown["connect"], "errno:1", "{unknown}");

    let bare = client(&agent, &app, "no-header", "vault", port);
    assert_eq!(bare["code"], "INVALID_ARGUMENT", "{bare}");
    assert!(
        bare["details"]
            .as_str()
            .is_some_and(|d| d.contains("security header")),
        "{bare}"
    );
    assert_eq!(bare["x509"], "UNIMPLEMENTED", "{bare}");
    assert_eq!(bare["connect"], "errno:1", "{bare}");
}

#[test]
fn a_grpc_caller_that_exits_before_its_answer_leaves_no_grant() {
    if !privileged() {
        return;
    }
    if let Err(why) = py_spiffe() {
        tessera_agent::testkit::skip(&why);
        return;
    }
    let servers = Servers::start();
    let port = servers.tcp_port;
    let cg = TestCgroup::new("spiffe-exit");
    let (app, _) = cg.child("app");
    let _ = cg.child("other");
    let agent = Agent::start(&policy(&cg.rel, port), &cg.path, &[]);
    let out = Command::new(real_python())
        .env_clear()
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", agent.api.display()),
        )
        .arg(script())
        .arg(&app)
        .args(["exit-race", "vault", TRUST_DOMAIN, &port.to_string(), "40"])
        .output()
        .expect("run the py-spiffe client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit race failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_str(stdout.trim()).expect("client JSON");
    eprintln!("exit race: {got}");
    // Some callers were answered before they exited, some not: either way, once every caller
    // is gone so is every grant (the agent withdrew the grant of a caller that exited, or the
    // kernel's exit hook deleted it). A grant written for a dead caller would stay for the
    // rule's maxTtl (5 minutes).
    let issued = agent.agent_log().matches("credential issued").count();
    assert!(issued > 0, "no caller was ever answered: {got}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = agent.status_json();
        if status["grants"]["active"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "grants left for callers that exited: {status}\n{got}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The parent never asked: its connect is denied.
    assert_eq!(got["connect"], "errno:1", "{got}");
}
