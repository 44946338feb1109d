//! Issuance modules (privileged): a Rego module decides real credential requests to the real
//! daemon by endpoint label, time and history; its narrowing (TTL, scopes) is in the issued
//! token; its errors and timeouts deny and are counted; a broken module is refused on reload
//! while the old one keeps deciding. And `tessera check` / `tessera test` on modules.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::{Agent, Servers, TESSERA, TestCgroup, Workload, privileged};

/// `app` may reach `vault` (labelled sensitivity: high, scopes read and write), `public`
/// (labelled sensitivity: restricted), `timed` (labelled hours: closed) and `echo`, all
/// through the module at `module` (an absolute path).
fn policy(rel: &str, port: u16, module: &Path) -> String {
    // One loopback address each: a destination belongs to one endpoint.
    let endpoint = |name: &str, host: u8, labels: &str| {
        format!(
            "    - name: {name}\n      addresses: [\"127.0.0.{host}/32\"]\n      ports: [{port}]\n      \
             labels: {{ {labels} }}\n      audiences: [{name}.test]\n"
        )
    };
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: issuance\nspec:\n  \
         trustDomain: test.tessera.dev\n  issuance: {{ rego: {}, timeout: 100ms }}\n  \
         workloads:\n    - name: app\n      match:\n        cgroup: {rel}/app\n  endpoints:\n{}{}{}{}  \
         rules:\n    - name: app-to-vault\n      workloads: [app]\n      endpoints: [vault]\n      \
         credential: {{ required: true, maxTtl: 10m, bind: process }}\n      scopes: [read, write]\n    \
         - name: app-to-others\n      workloads: [app]\n      endpoints: [public, timed, echo]\n      \
         credential: {{ required: true, maxTtl: 10m, bind: process }}\n",
        module.display(),
        endpoint("vault", 1, "sensitivity: high"),
        endpoint("public", 2, "sensitivity: restricted"),
        endpoint("timed", 3, "hours: closed"),
        endpoint("echo", 4, "echo: \"yes\""),
    )
}

/// Denies by label, by the hour (closed this hour and the next, UTC) and by history (two
/// credentials held); caps high sensitivity at 60 s; `write` only for task `deploy`; echoes its
/// whole input as the reason for `echo`; fails on task `boom` (conflicting values) and spins
/// past its timeout on task `spin`.
fn module() -> String {
    let hour = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 86400
        / 3600;
    format!(
        r#"package test.issuance

decision := {{"allow": count(deny) == 0, "reasons": sort(deny), "ttl_seconds": ttl, "scopes": scopes}} if {{
	input.request.task != "boom"
	input.request.task != "spin"
}}

decision := {{"allow": true}} if input.request.task == "boom"
decision := {{"allow": false}} if input.request.task == "boom"

decision := {{"allow": true}} if {{
	input.request.task == "spin"
	some x in numbers.range(1, 100000)
	some y in numbers.range(1, 100000)
	x == y + 1000000
}}

deny contains "restricted endpoint" if input.endpoint.labels.sensitivity == "restricted"

deny contains "closed at this hour" if {{
	input.endpoint.labels.hours == "closed"
	hour := floor((input.time.unix % 86400) / 3600)
	hour in {{{hour}, {next}}}
}}

deny contains sprintf("already holds %d credentials", [count(input.history.active)]) if {{
	input.endpoint.name == "vault"
	count(input.history.active) >= 2
}}

deny contains json.marshal(input) if input.endpoint.name == "echo"

ttl := min([input.request.ttl_seconds, 60]) if input.endpoint.labels.sensitivity == "high"
else := input.request.ttl_seconds

scopes := [s | some s in input.request.scopes; s != "write"] if input.request.task != "deploy"
else := input.request.scopes
"#,
        next = (hour + 1) % 24
    )
}

/// `POST /v1/credentials` from `w` with `body`: (HTTP status, answer).
fn ask(w: &mut Workload, body: Value) -> (u16, Value) {
    w.raw("POST", "/v1/credentials", Some(&body.to_string()))
}

/// `tessera_issuance_module_decisions_total{result="…"}` now (0 when absent).
fn module_count(agent: &Agent, result: &str) -> u64 {
    agent.metric(&format!(
        "tessera_issuance_module_decisions_total{{result=\"{result}\"}}"
    ))
}

/// Replaces `path` atomically (the agent never reads half a file).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn wait_log_count(agent: &Agent, what: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.agent_log().matches(what).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {count}× {what:?} in the agent's log:\n{}",
            agent.agent_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_module_decides_by_label_time_and_history_and_narrows_the_token() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("issuance");
    let (app_cg, _) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let modules = tempfile::tempdir().unwrap();
    let module_path = modules.path().join("issuance.rego");
    std::fs::write(&module_path, module()).unwrap();
    let agent = Agent::start(
        &policy(&cg.rel, port, &module_path),
        &cg.path,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let mut w = Workload::spawn(&app_cg, &agent.api);
    assert_eq!(w.connect4(port), "EPERM", "no credential yet");

    // Narrowed: 600 s asked, 60 s given (high sensitivity); `write` dropped (not deploy).
    let (status, body) = ask(
        &mut w,
        json!({"audience": "vault", "task": "report", "ttl_seconds": 600, "scopes": ["read", "write"]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scopes"], json!(["read"]), "{body}");
    let c = support::jwt_claims(body["token"].as_str().unwrap());
    assert_eq!(c["scope"], "read", "{c}");
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        60,
        "{c}"
    );
    // The kernel grant is real.
    assert_eq!(w.connect4(port), "ok");

    // Task deploy, no scopes named: all of the rule's.
    let (status, body) = ask(&mut w, json!({"audience": "vault.test", "task": "deploy"}));
    assert_eq!(status, 200, "{body}");
    let c = support::jwt_claims(body["token"].as_str().unwrap());
    assert_eq!(c["scope"], "read write", "{c}");
    assert_eq!(c["aud"], "vault.test", "{c}");

    // A scope the rule does not offer: refused before the module.
    let (status, body) = ask(&mut w, json!({"audience": "vault", "scopes": ["admin"]}));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("scope_not_allowed")),
        "{body}"
    );
    assert!(body["error"].as_str().unwrap().contains("admin"), "{body}");

    // By label.
    let (status, body) = ask(&mut w, json!({"audience": "public", "task": "t"}));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("policy_denied")),
        "{body}"
    );
    assert_eq!(body["reasons"], json!(["restricted endpoint"]), "{body}");

    // By the time of day.
    let (status, body) = ask(&mut w, json!({"audience": "timed", "task": "t"}));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reasons"], json!(["closed at this hour"]), "{body}");

    // By history: the two vault credentials above are held.
    let (status, body) = ask(&mut w, json!({"audience": "vault", "task": "report"}));
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["reasons"],
        json!(["already holds 2 credentials"]),
        "{body}"
    );

    // The input the module saw, against the published schema.
    let (status, body) = ask(&mut w, json!({"audience": "echo", "task": "schema"}));
    assert_eq!(status, 403, "{body}");
    let input: Value = serde_json::from_str(body["reasons"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        input["workload"]["evidence"]["pid"],
        json!(w.pid),
        "{input}"
    );
    assert_eq!(
        input["history"]["active"].as_array().unwrap().len(),
        2,
        "{input}"
    );
    assert_eq!(input["history"]["issued_last_minute"], 2, "{input}");
    assert_eq!(
        input["endpoint"]["labels"],
        json!({"echo": "yes"}),
        "{input}"
    );
    support::check_issuance_input_schema(&input);

    assert_eq!(module_count(&agent, "allow"), 2);
    assert_eq!(module_count(&agent, "deny"), 4);
    w.exit();
}

#[test]
fn errors_and_timeouts_deny_and_a_broken_module_is_refused_on_reload() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("issuance-errors");
    let (app_cg, _) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let modules = tempfile::tempdir().unwrap();
    let module_path = modules.path().join("issuance.rego");
    std::fs::write(&module_path, module()).unwrap();
    let agent = Agent::start(
        &policy(&cg.rel, port, &module_path),
        &cg.path,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let mut w = Workload::spawn(&app_cg, &agent.api);

    let (status, body) = ask(&mut w, json!({"audience": "public", "task": "boom"}));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("policy_denied")),
        "{body}"
    );
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("module_error: "),
        "{body}"
    );
    assert_eq!(module_count(&agent, "error"), 1);

    let (status, body) = ask(&mut w, json!({"audience": "public", "task": "spin"}));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("policy_denied")),
        "{body}"
    );
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("module_timeout: "),
        "{body}"
    );
    assert_eq!(module_count(&agent, "timeout"), 1);

    // The agent goes on deciding.
    let (status, body) = ask(&mut w, json!({"audience": "vault", "task": "report"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.connect4(port), "ok");

    // A module that does not parse: the reload is refused with its place, the old module
    // keeps deciding (vault allowed, public denied as before).
    replace(
        &module_path,
        "package test.issuance\n\ndecision := {\"allow\": true\n",
    );
    wait_log_count(&agent, "reload refused", 1);
    let log = agent.agent_log();
    let refused = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        refused.contains(&format!("{}:", module_path.display())) && refused.contains("Rego:"),
        "{refused}"
    );
    let (status, body) = ask(&mut w, json!({"audience": "vault", "task": "report"}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = ask(&mut w, json!({"audience": "public", "task": "t"}));
    assert_eq!(
        body["reasons"],
        json!(["restricted endpoint"]),
        "{status} {body}"
    );

    // A valid new module: applied, and it decides from now on.
    replace(
        &module_path,
        "package test.issuance\n\ndecision := {\"allow\": false, \"reasons\": [\"version 2\"]}\n",
    );
    wait_log_count(&agent, "reload: new policy enforcing", 1);
    let (status, body) = ask(&mut w, json!({"audience": "vault", "task": "report"}));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reasons"], json!(["version 2"]), "{body}");
    w.exit();
}

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(TESSERA)
        .args(args)
        .output()
        .expect("run tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tessera_check_compiles_and_tessera_test_runs_the_modules_tests() {
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let shipped = policies.join("issuance.yaml");
    let shipped = shipped.to_str().unwrap();
    let (code, out, err) = tessera(&["test", shipped]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("PASS data.tessera.issuance.test_denied_at_night"),
        "{out}"
    );
    assert!(out.contains("4 passed, 0 failed (1 modules)"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: example.org\n  \
         issuance: { rego: m.rego }\n  workloads:\n    - name: a\n      match: { uid: 4242 }\n  \
         endpoints:\n    - name: e\n      addresses: [127.0.0.1]\n  rules:\n    - name: r\n      \
         workloads: [a]\n      endpoints: [e]\n      credential: { required: true, maxTtl: 5m }\n",
    )
    .unwrap();
    let module = dir.path().join("m.rego");
    std::fs::write(
        &module,
        "package m\n\ndecision := {\"allow\": input.ok == true}\n\n\
         test_allows if decision.allow with input as {\"ok\": true}\n\n\
         test_wrongly_expects_allow if decision.allow with input as {\"ok\": false}\n",
    )
    .unwrap();
    let policy = policy.to_str().unwrap();
    let (code, out, err) = tessera(&["test", policy]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("PASS data.m.test_allows"), "{out}");
    assert!(
        out.contains("FAIL data.m.test_wrongly_expects_allow"),
        "{out}"
    );
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    let (code, out, err) = tessera(&["check", policy]);
    assert_eq!(code, 0, "{out}{err}");

    // A broken module: both refuse it, with its place.
    std::fs::write(&module, "package m\n\ndecision := {\"allow\": true\n").unwrap();
    for cmd in ["check", "test"] {
        let (code, out, err) = tessera(&[cmd, policy]);
        assert_eq!(code, 1, "{cmd}: {out}{err}");
        assert!(
            err.starts_with(&format!("{}:", module.display())) && err.contains("Rego:"),
            "{cmd}: {err}"
        );
    }
}
