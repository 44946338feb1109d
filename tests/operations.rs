//! The operator's and the workload's command line against a running agent: `tessera token` for a
//! `bind: workload` rule, `tessera status`, `tessera logs` with filters.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::{Agent, TESSERA, TestCgroup, Workload, extra_tcp_server, privileged};

fn policy(cgroup_rel: &str, port: u16) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {{ name: ops }}
spec:
  trustDomain: ops.tessera.dev
  workloads:
    - name: batch
      spiffeId: spiffe://ops.tessera.dev/jobs/batch
      match: {{ cgroup: {cgroup_rel}/batch }}
  endpoints:
    - name: payments
      kind: api
      addresses: ["127.0.0.1/32"]
      ports: [{port}]
  rules:
    - name: batch-to-payments
      workloads: [batch]
      endpoints: [payments]
      credential: {{ required: true, maxTtl: 2m, bind: workload }}
"#
    )
}

/// `tessera token` run inside the cgroup (so the agent attests it as the workload).
fn token_in(cgroup: &std::path::Path, agent: &Agent, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(cgroup)
        .arg(TESSERA)
        .args(["token", "--socket"])
        .arg(&agent.api)
        .args(extra)
        .output()
        .expect("run tessera token");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tessera_token_gives_the_workload_a_credential_that_every_member_can_use() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("token");
    let (batch, _) = cg.child("batch");
    let (stranger, _) = cg.child("stranger");
    let port = extra_tcp_server();
    let agent = Agent::start(&policy(&cg.rel, port), &cg.path, &[]);

    let mut member = Workload::spawn(&batch, &agent.api);
    assert_eq!(member.connect4(port), "EPERM");

    // Over the cap: refused with the reason, exit 1, nothing on stdout.
    let (code, out, err) = token_in(&batch, &agent, &["--audience", "payments", "--ttl", "1h"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty());
    assert!(err.contains("ttl_exceeds_max"), "{err}");

    let (code, token, err) = token_in(
        &batch,
        &agent,
        &[
            "--audience",
            "payments",
            "--task",
            "nightly",
            "--ttl",
            "90s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        token.split('.').count(),
        3,
        "not a JWS compact token: {token}"
    );
    // The token's claims say who and for what (the signature is checked by the unit tests and
    // against the JWKS below).
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], "spiffe://ops.tessera.dev/jobs/batch");
    assert_eq!(claims["aud"], "payments");
    assert_eq!(claims["task"], "nightly");
    let exp = claims["exp"].as_u64().expect("exp");
    let iat = claims["iat"].as_u64().expect("iat");
    assert_eq!(exp - iat, 90);
    let (status, jwks) = member.raw("GET", "/v1/jwks", None);
    assert_eq!(status, 200);
    let header = jwt_header(&token);
    assert_eq!(header["alg"], "ES256");
    assert!(
        jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["kid"] == header["kid"]),
        "the token's kid is not in the JWKS: {jwks}"
    );

    // The `tessera token` process has exited; the grant is the workload's.
    assert_eq!(member.connect4(port), "ok");
    let d = agent.wait_decision("workload grant", |d| {
        d["process"]["tgid"] == member.pid && d["reason"] == "credential_valid"
    });
    assert_eq!(d["credential"]["jti"], claims["jti"]);
    assert_eq!(d["credential"]["bind"], "workload");

    // Not for anyone outside the workload.
    let mut outsider = Workload::spawn(&stranger, &agent.api);
    assert_eq!(outsider.connect4(port), "EPERM");
    let (code, _, err) = token_in(&stranger, &agent, &["--audience", "payments"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_workload"), "{err}");

    // Revoking the workload ends it for every member.
    let admin = agent.admin.to_str().expect("utf-8");
    let (code, out, err) = agent.cli(&[
        "revoke",
        "--workload",
        "spiffe://ops.tessera.dev/jobs/batch",
        "--admin-socket",
        admin,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(member.connect4(port), "EPERM");
    agent.wait_decision("revoked", |d| {
        d["process"]["tgid"] == member.pid && d["reason"] == "credential_revoked"
    });
}

#[test]
fn status_and_logs_show_what_happened() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("status");
    let (batch, _) = cg.child("batch");
    let port = extra_tcp_server();
    let agent = Agent::start(&policy(&cg.rel, port), &cg.path, &[]);
    let mut w = Workload::spawn(&batch, &agent.api);
    assert_eq!(w.connect4(port), "EPERM");
    let (code, _, err) = token_in(&batch, &agent, &["--audience", "payments"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.connect4(port), "ok");
    agent.wait_decision("allow", |d| {
        d["process"]["tgid"] == w.pid && d["verdict"] == "allow"
    });

    let admin = agent.admin.to_str().expect("utf-8");
    let (code, out, err) = agent.cli(&["status", "--json", "--admin-socket", admin]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["attach_point"], cg.path.display().to_string());
    assert!(
        status["counters"]["decisions"].as_u64() >= Some(2),
        "{status}"
    );
    assert!(status["counters"]["deny"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["grants"]["active"], 1, "{status}");
    assert!(
        status["policy"]["revision"]
            .as_str()
            .expect("revision")
            .starts_with("sha256:")
    );
    let programs = status["programs"].as_array().expect("programs");
    assert!(
        programs.iter().any(|p| p["name"] == "tessera_connect4"),
        "{status}"
    );
    // The verifier's work per program (Linux 5.16+; this host's kernel is newer), well inside the
    // 1,000,000 limit (the kernel matrix checks 25 % of it on every kernel).
    for p in programs {
        let insns = p["verified_insns"].as_u64().expect("verified_insns");
        assert!(insns > 0 && insns <= 250_000, "{p}");
    }
    let (code, out, _) = agent.cli(&["status", "--admin-socket", admin]);
    assert_eq!(code, 0);
    assert!(out.contains("policy revision:  sha256:"), "{out}");
    // Root in another pid namespace (a container that reaches the socket) is not the admin:
    // its revocation is refused and changes nothing.
    let out = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            TESSERA,
            "revoke",
            "--admin-socket",
            admin,
        ])
        .args(["--workload", "spiffe://ops.tessera.dev/jobs/batch"])
        .output()
        .expect("unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pid namespace"), "{err}");
    assert_eq!(agent.status_json()["grants"]["active"], 1);
    assert_eq!(w.connect4(port), "ok");

    let log = agent.log.to_str().expect("utf-8");
    let (code, out, _) = agent.cli(&["logs", "--verdict", "deny", "-o", "json", log]);
    assert_eq!(code, 0);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|d| d["verdict"] == "deny"), "{out}");
    let (code, out, _) = agent.cli(&[
        "logs",
        "--reason",
        "credential_valid",
        "--endpoint",
        "payments",
        "-o",
        "compact",
        log,
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ALLOW") && out.contains("payments") && !out.contains("DENY"),
        "{out}"
    );
    let (code, out, _) = agent.cli(&["logs", "--workload", "spiffe://ops.tessera.dev/nobody", log]);
    assert_eq!(code, 0);
    assert!(out.is_empty(), "{out}");
}

fn jwt_part(token: &str, i: usize) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(i).expect("jwt part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("jwt json")
}

fn jwt_header(token: &str) -> Value {
    jwt_part(token, 0)
}

fn jwt_claims(token: &str) -> Value {
    jwt_part(token, 1)
}
