//! The core loop against the real kernel: credentials open a protected endpoint, nothing else
//! does, and every decision is logged with its reason.
//!
//! Each test creates its own cgroup, attaches a real `tessera run` to it only, and drives
//! workloads (tests/workload.py) inside it against loopback servers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::{thread, time::Duration};

use serde_json::Value;
use support::{
    Agent, Servers, TestCgroup, Workload, extra_tcp_server, privileged, standard_policy,
};

struct Setup {
    agent: Agent,
    cg: TestCgroup,
    app: std::path::PathBuf,
    other: std::path::PathBuf,
    port: u16,
    api_port: u16,
}

fn setup(name: &str, mode: &str, extra: &[&str]) -> Setup {
    let cg = TestCgroup::new(name);
    let (app, _) = cg.child("app");
    let (other, _) = cg.child("other");
    let servers = Servers::start();
    let api_port = extra_tcp_server();
    let policy = standard_policy(&cg.rel, servers.tcp_port, api_port, mode);
    let agent = Agent::start(&policy, &cg.path, extra);
    Setup {
        agent,
        cg,
        app,
        other,
        port: servers.tcp_port,
        api_port,
    }
}

fn by(pid: u32, reason: &str) -> impl Fn(&Value) -> bool + '_ {
    move |d| d["process"]["tgid"] == pid && d["reason"] == reason
}

#[test]
fn credential_opens_the_endpoint_and_nothing_else_does() {
    if !privileged() {
        return;
    }
    let s = setup("allow", "enforce", &[]);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);

    assert_eq!(
        bare.connect4(s.port),
        "EPERM",
        "no credential must mean EPERM"
    );
    let jti = holder.must_token("vault", Some(60));
    assert_eq!(holder.connect4(s.port), "ok");
    assert_eq!(
        bare.connect4(s.port),
        "EPERM",
        "a credential is the holder's alone"
    );

    let allow = s
        .agent
        .wait_decision("allow", by(holder.pid, "credential_valid"));
    assert_eq!(allow["verdict"], "allow");
    assert_eq!(allow["schema"], "tessera.decision/v1");
    assert_eq!(allow["hook"], "connect4");
    assert_eq!(allow["protocol"], "tcp");
    assert_eq!(allow["destination"]["ip"], "127.0.0.1");
    assert_eq!(allow["destination"]["port"], s.port);
    assert_eq!(allow["destination"]["endpoint"], "vault");
    assert_eq!(allow["workload"]["name"], "app");
    assert_eq!(
        allow["workload"]["spiffe_id"],
        "spiffe://test.tessera.dev/app"
    );
    assert_eq!(allow["credential"]["jti"], jti.as_str());
    assert_eq!(allow["policy"]["rule"], "app-to-vault");
    let deny = s.agent.wait_decision("deny", by(bare.pid, "no_credential"));
    assert_eq!(deny["verdict"], "deny");
    assert_eq!(deny["enforced"], true);
    assert_eq!(deny["mode"], "enforce");
    assert!(deny["credential"].is_null());

    // No token ever reaches the decision log.
    let log = std::fs::read_to_string(&s.agent.log).expect("log");
    assert!(!log.contains("eyJ"), "a JWT leaked into the decision log");
}

#[test]
fn a_credential_for_one_endpoint_does_not_open_another() {
    if !privileged() {
        return;
    }
    let s = setup("audience", "enforce", &[]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    w.must_token("vault", Some(60));
    assert_eq!(w.connect4(s.port), "ok");
    assert_eq!(w.connect4(s.api_port), "EPERM");
    let d = s
        .agent
        .wait_decision("api deny", by(w.pid, "no_credential"));
    assert_eq!(d["destination"]["endpoint"], "api");
    w.must_token("api", Some(60));
    assert_eq!(w.connect4(s.api_port), "ok");
}

#[test]
fn expiry_takes_effect_on_the_next_connect() {
    if !privileged() {
        return;
    }
    let s = setup("expiry", "enforce", &[]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    w.must_token("vault", Some(1));
    assert_eq!(w.connect4(s.port), "ok");
    thread::sleep(Duration::from_millis(1300));
    assert_eq!(w.connect4(s.port), "EPERM");
    s.agent
        .wait_decision("expired", by(w.pid, "credential_expired"));
}

#[test]
fn delete_and_revoke_take_effect_on_the_next_connect() {
    if !privileged() {
        return;
    }
    let s = setup("revoke", "enforce", &[]);
    // The holder ends its own task early.
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    let jti = w.must_token("vault", Some(60));
    assert_eq!(w.connect4(s.port), "ok");
    // Another process of the same workload that knows the jti cannot end it (bind: process).
    let mut peer = Workload::spawn(&s.app, &s.agent.api);
    let (status, body) = peer.raw("DELETE", &format!("/v1/credentials/{jti}"), None);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "not_the_holder", "{body}");
    assert_eq!(w.connect4(s.port), "ok", "the holder keeps its credential");
    let (status, body) = w.raw("DELETE", &format!("/v1/credentials/{jti}"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.connect4(s.port), "EPERM");
    s.agent
        .wait_decision("deleted", by(w.pid, "credential_revoked"));

    // The operator revokes with `tessera revoke --jti`.
    let mut v = Workload::spawn(&s.app, &s.agent.api);
    let jti = v.must_token("vault", Some(60));
    assert_eq!(v.connect4(s.port), "ok");
    let admin = s.agent.admin.to_str().expect("utf-8");
    let (code, out, err) = s
        .agent
        .cli(&["revoke", "--jti", &jti, "--admin-socket", admin]);
    assert_eq!(code, 0, "tessera revoke failed: {out} {err}");
    assert!(out.contains(&jti), "{out}");
    assert_eq!(v.connect4(s.port), "EPERM");
    s.agent
        .wait_decision("revoked", by(v.pid, "credential_revoked"));

    // And by pid.
    let mut p = Workload::spawn(&s.app, &s.agent.api);
    p.must_token("vault", Some(60));
    let pid = p.pid.to_string();
    let (code, out, err) = s
        .agent
        .cli(&["revoke", "--pid", &pid, "--admin-socket", admin]);
    assert_eq!(code, 0, "tessera revoke --pid failed: {out} {err}");
    assert_eq!(p.connect4(s.port), "EPERM");

    // Revoking what does not exist says so.
    let (code, _, err) = s
        .agent
        .cli(&["revoke", "--jti", "no-such-jti", "--admin-socket", admin]);
    assert_ne!(code, 0);
    assert!(!err.is_empty());
}

#[test]
fn audit_mode_allows_and_logs_the_would_be_deny() {
    if !privileged() {
        return;
    }
    let s = setup("audit", "audit", &[]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(w.connect4(s.port), "ok", "audit mode must not block");
    let d = s
        .agent
        .wait_decision("audit deny", by(w.pid, "no_credential"));
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["enforced"], false);
    assert_eq!(d["mode"], "audit");
}

#[test]
fn mode_flag_forces_audit() {
    if !privileged() {
        return;
    }
    let s = setup("auditflag", "enforce", &["--mode", "audit"]);
    let mut w = Workload::spawn(&s.other, &s.agent.api);
    assert_eq!(w.connect4(s.port), "ok");
    let d = s
        .agent
        .wait_decision("audit", by(w.pid, "workload_not_allowed"));
    assert_eq!(d["enforced"], false);
}

#[test]
fn ipv6_mapped_and_udp_paths_are_decided() {
    if !privileged() {
        return;
    }
    let s = setup("paths", "enforce", &[]);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(bare.net("connect", 6, "::1", s.port), "EPERM");
    s.agent.wait_decision("connect6", |d| {
        d["process"]["tgid"] == bare.pid
            && d["hook"] == "connect6"
            && d["destination"]["ip"] == "::1"
    });
    assert_eq!(bare.net("connect", 6, "::ffff:127.0.0.1", s.port), "EPERM");
    s.agent.wait_decision("mapped", |d| {
        d["process"]["tgid"] == bare.pid
            && d["hook"] == "connect6"
            && d["destination"]["ip"] == "127.0.0.1"
    });
    assert_eq!(bare.net("sendto", 4, "127.0.0.1", s.port), "EPERM");
    s.agent.wait_decision("sendmsg4", |d| {
        d["process"]["tgid"] == bare.pid && d["hook"] == "sendmsg4" && d["protocol"] == "udp"
    });
    assert_eq!(bare.net("sendto", 6, "::1", s.port), "EPERM");
    s.agent.wait_decision("sendmsg6", |d| {
        d["process"]["tgid"] == bare.pid && d["hook"] == "sendmsg6"
    });
    assert_eq!(bare.net("udp_connect", 4, "127.0.0.1", s.port), "EPERM");

    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    holder.must_token("vault", Some(60));
    holder.must_token("dns", Some(60));
    assert_eq!(holder.net("connect", 6, "::1", s.port), "ok");
    assert_eq!(holder.net("connect", 6, "::ffff:127.0.0.1", s.port), "ok");
    assert_eq!(holder.net("sendto", 4, "127.0.0.1", s.port), "ok");
    assert_eq!(holder.net("sendto", 6, "::1", s.port), "ok");
    assert_eq!(holder.net("udp_connect", 6, "::1", s.port), "ok");
}

#[test]
fn unprotected_destinations_and_outside_processes_are_untouched() {
    if !privileged() {
        return;
    }
    let s = setup("untouched", "enforce", &[]);
    let free_port = extra_tcp_server();
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(w.connect4(free_port), "ok");

    // A process in a cgroup of ours that is not under the attach point.
    let outside = TestCgroup::new("outside");
    let mut o = Workload::spawn(&outside.path, &s.agent.api);
    assert_eq!(o.connect4(s.port), "ok");

    // Something logged after both proves the log is current, then neither appears in it.
    assert_eq!(w.connect4(s.port), "EPERM");
    s.agent.wait_decision("marker", by(w.pid, "no_credential"));
    for d in s.agent.decisions() {
        assert_ne!(
            d["destination"]["port"], free_port,
            "unprotected call logged: {d}"
        );
        assert_ne!(d["process"]["tgid"], o.pid, "outside process logged: {d}");
    }
    drop(s);
}

#[test]
fn workloads_without_a_rule_and_unknown_processes_are_denied() {
    if !privileged() {
        return;
    }
    let s = setup("norule", "enforce", &[]);
    let mut other = Workload::spawn(&s.other, &s.agent.api);
    let (status, body) = other.token("vault", Some(60));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "workload_not_allowed");
    assert_eq!(other.connect4(s.port), "EPERM");
    s.agent
        .wait_decision("no rule", by(other.pid, "workload_not_allowed"));

    let (stranger_cg, _) = s.cg.child("stranger");
    let mut stranger = Workload::spawn(&stranger_cg, &s.agent.api);
    let (status, body) = stranger.token("vault", Some(60));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "unknown_workload");
    assert_eq!(stranger.connect4(s.port), "EPERM");
    let d = s
        .agent
        .wait_decision("unknown", by(stranger.pid, "unknown_workload"));
    assert!(d["workload"].is_null());
}

#[test]
fn bad_requests_are_refused_and_write_no_grant() {
    if !privileged() {
        return;
    }
    let s = setup("badreq", "enforce", &[]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    let cases: [(&str, &str, Option<&str>, u16); 6] = [
        ("garbage json", "POST", Some("{not json"), 400),
        (
            "unknown field",
            "POST",
            Some(r#"{"audience":"vault","admin":true}"#),
            400,
        ),
        (
            "ttl zero",
            "POST",
            Some(r#"{"audience":"vault","ttl_seconds":0}"#),
            400,
        ),
        (
            "missing audience",
            "POST",
            Some(r#"{"ttl_seconds":5}"#),
            400,
        ),
        (
            "unknown audience",
            "POST",
            Some(r#"{"audience":"nope","ttl_seconds":5}"#),
            403,
        ),
        (
            "ttl over the cap",
            "POST",
            Some(r#"{"audience":"vault","ttl_seconds":3600}"#),
            403,
        ),
    ];
    for (what, method, body, want) in cases {
        let (status, answer) = w.raw(method, "/v1/credentials", body);
        assert_eq!(status, want, "{what}: {answer}");
        assert!(
            answer["error"].is_string(),
            "{what}: no error text: {answer}"
        );
        if want == 403 {
            assert!(answer["reason"].is_string(), "{what}: no reason: {answer}");
        }
    }
    let (_, answer) = w.raw(
        "POST",
        "/v1/credentials",
        Some(r#"{"audience":"vault","ttl_seconds":3600}"#),
    );
    assert_eq!(answer["reason"], "ttl_exceeds_max");
    // None of them left a grant behind.
    assert_eq!(w.connect4(s.port), "EPERM");
    s.agent
        .wait_decision("still denied", by(w.pid, "no_credential"));
    let (status, _) = w.raw("GET", "/v1/jwks", None);
    assert_eq!(status, 200);
}

/// Sends `request` on a new connection to `socket` (ignoring a write the agent cut short) and
/// returns the status, the headers (lowercased) and the body of the answer.
fn raw_http(socket: &std::path::Path, request: &[u8]) -> (u16, String, String) {
    use std::io::{Read as _, Write as _};
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let request = request.to_vec();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Malformed HTTP gets the same JSON error as every other refusal (issue 15 #5), and the
/// connection is closed; the API keeps serving.
#[test]
fn malformed_http_gets_a_json_error() {
    if !privileged() {
        return;
    }
    let s = setup("badhttp", "enforce", &[]);
    let api = &s.agent.api;
    let post = |extra: &str, body: &str| {
        format!("POST /v1/credentials HTTP/1.1\r\nHost: x\r\n{extra}\r\n{body}").into_bytes()
    };
    let many_headers = format!(
        "GET /v1/jwks HTTP/1.1\r\n{}\r\n",
        "X-Filler: 1\r\n".repeat(5000)
    );
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "non-numeric Content-Length",
            post("Content-Length: ten\r\n", "{}"),
            400,
        ),
        (
            "Content-Length twice, disagreeing",
            post("Content-Length: 2\r\nContent-Length: 3\r\n", "{}"),
            400,
        ),
        ("a 100 KB request line", long_line.into_bytes(), 414),
        ("5,000 header fields", many_headers.into_bytes(), 431),
        (
            "a NUL in a header",
            b"GET /v1/jwks HTTP/1.1\r\nHost: x\0y\r\n\r\n".to_vec(),
            400,
        ),
        (
            "garbage bytes",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (what, request, want) in cases {
        let (status, head, body) = raw_http(api, &request);
        assert_eq!(status, want, "{what}: {head}\n{body}");
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {body:?}"));
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: no error text: {answer}"
        );
    }
    // Still serving, one request a connection.
    let (status, head, body) = raw_http(
        api,
        b"GET /v1/jwks HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/jwks HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(
        body.matches("HTTP/1.1").count(),
        0,
        "a second answer: {body}"
    );
    let jwks: Value = serde_json::from_str(&body).unwrap();
    assert!(jwks["keys"].is_array(), "{jwks}");
}

/// One local process cannot starve the Workload API (issue 15 #3): a process of another uid
/// that holds 500 idle connections gets every one past its 64th refused at once with a JSON
/// 503 `too_many_connections` and a `Retry-After`, a workload still gets its credential while
/// they are held, and the agent's open files grow by the budget, not by the flood.
#[test]
fn idle_connections_from_one_uid_cannot_starve_the_api() {
    use std::io::{BufRead as _, Write as _};
    if !privileged() {
        return;
    }
    let s = setup("connflood", "enforce", &[]);
    s.agent.open_api_dir();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", s.agent.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let script = "import json, os, socket, sys, time\n\
        os.setgroups([]); os.setgid(4242); os.setuid(4242)\n\
        conns = []\n\
        for _ in range(500):\n    c = socket.socket(socket.AF_UNIX)\n    c.connect(sys.argv[1])\n    conns.append(c)\n\
        time.sleep(1)\n\
        answered, first = 0, None\n\
        for c in conns:\n    c.setblocking(False)\n    try:\n        data = c.recv(65536)\n    except BlockingIOError:\n        continue\n    if data:\n        answered += 1\n        first = first or data.decode()\n\
        print(json.dumps({'answered': answered, 'first': first}), flush=True)\n\
        sys.stdin.readline()\n";
    let mut flooder = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&s.agent.api)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(flooder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(out["answered"], 500 - 64, "{out}");
    let first = out["first"].as_str().unwrap().to_ascii_lowercase();
    assert!(first.starts_with("http/1.1 503"), "{first}");
    assert!(first.contains("retry-after: 1"), "{first}");
    let body: Value = serde_json::from_str(first.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["reason"], "too_many_connections", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("uid 4242"),
        "{body}"
    );
    // Held meanwhile: 64 of them are open in the agent (each with the caller's pidfd), the rest
    // were closed.
    let during = fds();
    assert!(
        during <= before + 2 * 64 + 8,
        "{before} open files before, {during} during"
    );
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    w.must_token("vault", None);
    assert_eq!(w.connect4(s.port), "ok");
    let mut stdin = flooder.stdin.take().unwrap();
    let _ = writeln!(stdin);
    let _ = flooder.wait();
}

/// One workload asking as fast as it can gets 429 with `Retry-After` past its limit; another
/// workload is served meanwhile; the metrics count the refusals (issue 15 #3, rate).
#[test]
fn a_flooding_workload_is_rate_limited_and_another_is_not() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ratelimit");
    let (app, _) = cg.child("app");
    let (other, _) = cg.child("other");
    let servers = Servers::start();
    let policy = standard_policy(&cg.rel, servers.tcp_port, extra_tcp_server(), "enforce").replace(
        "workloads: [app]\n      endpoints: [vault, dns]",
        "workloads: [app, other]\n      endpoints: [vault, dns]",
    );
    assert!(policy.contains("[app, other]"), "{policy}");
    let agent = Agent::start(
        &policy,
        &cg.path,
        &[
            "--rate-limit",
            "10/s",
            "--rate-limit-burst",
            "20",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let mut flooder = Workload::spawn(&app, &agent.api);
    let started = std::time::Instant::now();
    let out =
        flooder.send(serde_json::json!({"op": "ask_burst", "audience": "vault", "count": 200}));
    let took = started.elapsed().as_secs_f64();
    let ok = out["statuses"]["200"].as_u64().unwrap_or(0);
    let limited = out["statuses"]["429"].as_u64().unwrap_or(0);
    assert_eq!(ok + limited, 200, "only 200s and 429s: {out}");
    // The burst, then 10 a second while it asked.
    let most = 20.0 + 10.0 * took + 1.0;
    assert!(
        ok >= 20 && (ok as f64) <= most,
        "{ok} issued in {took:.2} s: {out}"
    );
    assert!(limited >= 100, "{out}");
    assert_eq!(out["retry_after"], "1", "{out}");
    assert_eq!(out["refusal"]["reason"], "rate_limited", "{out}");
    let error = out["refusal"]["error"].as_str().unwrap();
    assert!(
        error.contains("spiffe://test.tessera.dev/app") && error.contains("10/s (burst 20)"),
        "{error}"
    );
    // Another workload is not affected, while the flooder still is.
    let mut calm = Workload::spawn(&other, &agent.api);
    for _ in 0..15 {
        let (status, body) = calm.token("vault", Some(60));
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(calm.connect4(servers.tcp_port), "ok");
    // Its bucket refilled meanwhile, but never past the burst of 20.
    let again =
        flooder.send(serde_json::json!({"op": "ask_burst", "audience": "vault", "count": 40}));
    assert!(
        again["statuses"]["429"].as_u64().unwrap_or(0) >= 15,
        "{again}"
    );
    let limited = limited + again["statuses"]["429"].as_u64().unwrap_or(0);
    // Each refusal is counted.
    let (code, metrics) = agent.http_get("/metrics");
    assert_eq!(code, 200);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tessera_credentials_refused_total") && l.contains("rate_limited"))
        .unwrap_or_else(|| panic!("no rate_limited refusals in the metrics:\n{metrics}"));
    let counted: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(counted, limited, "{line}");
    flooder.exit();
    calm.exit();
}

#[test]
fn a_recycled_pid_never_inherits_a_grant() {
    if !privileged() {
        return;
    }
    let s = setup("pidreuse", "enforce", &[]);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    holder.must_token("vault", Some(600));
    assert_eq!(holder.connect4(s.port), "ok");
    let pid = holder.pid;
    holder.exit();

    // Make the kernel hand the same pid to a new process in the same workload.
    let Some(mut successor) = support::spawn_on_pid(pid, &s.app, &s.agent.api) else {
        return;
    };
    assert_eq!(
        successor.connect4(s.port),
        "EPERM",
        "pid {pid} inherited its predecessor's grant"
    );
    s.agent.wait_decision("successor", by(pid, "no_credential"));
}

#[test]
fn the_agent_detaches_on_sigterm() {
    if !privileged() {
        return;
    }
    let mut s = setup("detach", "enforce", &["--fail-open"]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(w.connect4(s.port), "EPERM");
    assert!(
        s.agent.stop(),
        "tessera run did not exit cleanly on SIGTERM"
    );
    assert_eq!(
        w.connect4(s.port),
        "ok",
        "enforcement must be gone after a clean stop"
    );
    assert!(
        !s.agent.api.exists(),
        "the Workload API socket was left behind"
    );
}

#[test]
fn enforcement_outlives_the_agent_by_default() {
    if !privileged() {
        return;
    }
    let mut s = setup("keep", "enforce", &[]);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);
    holder.must_token("vault", Some(600));
    assert_eq!(holder.connect4(s.port), "ok");
    assert!(
        s.agent.stop(),
        "tessera run did not exit cleanly on SIGTERM"
    );
    assert_eq!(
        bare.connect4(s.port),
        "EPERM",
        "the pinned programs must keep enforcing after SIGTERM"
    );
    assert_eq!(
        holder.connect4(s.port),
        "ok",
        "grants must stay valid while the agent is stopped"
    );
    let (code, out, err) = s.agent.uninstall();
    assert_eq!(code, 0, "tessera uninstall failed: {out} {err}");
    // The kernel frees an unpinned link from a work queue, just after the unpin.
    let mut result = bare.connect4(s.port);
    for _ in 0..100 {
        if result == "ok" {
            break;
        }
        thread::sleep(Duration::from_millis(20));
        result = bare.connect4(s.port);
    }
    assert_eq!(result, "ok", "uninstall ends enforcement");
}

#[test]
fn unspecified_destinations_are_decided_as_the_loopback_they_reach() {
    if !privileged() {
        return;
    }
    // Linux delivers a connect to 0.0.0.0 / :: / ::ffff:0.0.0.0 to this host's loopback, where
    // the protected server (bound to 127.0.0.1 and ::1 only) listens.
    let s = setup("unspecified", "enforce", &[]);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);
    let targets = [(4u8, "0.0.0.0"), (6, "::"), (6, "::ffff:0.0.0.0")];
    for (family, host) in targets {
        assert_eq!(
            bare.net("connect", family, host, s.port),
            "EPERM",
            "{host} without a credential"
        );
        let d = s.agent.wait_decision(host, |d| {
            d["process"]["tgid"] == bare.pid
                && d["reason"] == "no_credential"
                && d["destination"]["endpoint"] == "vault"
                && d["destination"]["port"] == s.port
                && d["destination"]["ip"] == if host == "::" { "::1" } else { "127.0.0.1" }
        });
        assert_eq!(d["verdict"], "deny", "{d}");
    }
    holder.must_token("vault", Some(60));
    for (family, host) in targets {
        assert_eq!(
            holder.net("connect", family, host, s.port),
            "ok",
            "{host} with a credential"
        );
    }
}
