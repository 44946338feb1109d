//! Running it for real (privileged): the metrics and health endpoints of a real `tessera run`,
//! the configuration file driving it, and `tessera logs -f` following the decision log across
//! rotation. Each test attaches to a cgroup of its own.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::{Agent, Servers, TESSERA, TestCgroup, Workload, privileged, standard_policy};

/// A sample's value from the Prometheus text, by its full name and labels as printed.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_health_and_readiness_of_a_running_agent() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ops-metrics");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
        &cg.path,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    assert!(agent.metrics_addr().ip().is_loopback());
    assert_eq!(agent.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(agent.http_get("/readyz").0, 200);

    let mut w = Workload::spawn(&app, &agent.api);
    assert_eq!(w.connect4(servers.tcp_port), "EPERM");
    agent.wait_decision("the deny", |d| d["reason"] == "no_credential");
    w.must_token("vault", None);
    let (status, _) = w.token("nowhere", None);
    assert_eq!(status, 403);
    assert_eq!(w.connect4(servers.tcp_port), "ok");
    agent.wait_decision("the allow", |d| d["reason"] == "credential_valid");

    let (status, text) = agent.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    };
    expect(
        r#"tessera_decisions_total{verdict="deny",reason="no_credential",enforced="true"}"#,
        1.0,
    );
    let allows: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with(r#"tessera_decisions_total{verdict="allow",reason="credential_valid","#)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(allows, 1.0, "{text}");
    expect("tessera_credentials_issued_total", 1.0);
    expect(
        r#"tessera_credentials_refused_total{reason="unknown_audience"}"#,
        1.0,
    );
    expect("tessera_credential_issuance_seconds_count", 2.0);
    expect("tessera_active_grants", 1.0);
    expect("tessera_ringbuf_dropped_events_total", 0.0);
    expect("tessera_policy_reload_failures_total", 0.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("tessera_policy_info{revision=\"sha256:") && l.ends_with(" 1")),
        "{text}"
    );

    // `tessera status` shows when the policy was loaded and the programs' run counts.
    let admin = agent.admin.to_str().unwrap().to_string();
    let (code, out, err) = agent.cli(&["status", "--admin-socket", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy loaded:"), "{out}");
    assert!(out.contains("metrics:"), "{out}");
    let (_, json, _) = agent.cli(&["status", "--json", "--admin-socket", &admin]);
    let status: Value = serde_json::from_str(&json).unwrap();
    assert!(
        status["policy"]["loaded_at"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{status}"
    );
    w.exit();

    // A refused reload is counted; the policy in force (and its revision) stays.
    let revision = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("tessera_policy_info{"))
            .map(str::to_string)
    };
    let before = revision(&text);
    std::fs::write(
        &agent.policy,
        "apiVersion: tessera.dev/v1alpha1\nkind: Nonsense\n",
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (_, text) = agent.http_get("/metrics");
        if sample(&text, "tessera_policy_reload_failures_total") >= Some(1.0) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refused reload was not counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(revision(&text), before);
}

#[test]
fn a_configuration_file_drives_the_agent_and_flags_win() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ops-config");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    // The file asks for audit mode, allows aggregated per hour and metrics on a port the
    // flag then overrides.
    std::fs::write(
        &config,
        "mode: audit\ndecisionLog:\n  aggregateAllows: 1h\nmetrics:\n  listen: 127.0.0.1:1\n",
    )
    .unwrap();
    let config_arg = config.to_str().unwrap().to_string();
    let mut agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
        &cg.path,
        &["--config", &config_arg, "--metrics-addr", "127.0.0.1:0"],
    );
    assert_ne!(agent.metrics_addr().port(), 1);
    let mut w = Workload::spawn(&app, &agent.api);
    // Audit from the file: the call goes through, logged as a deny not enforced.
    assert_eq!(w.connect4(servers.tcp_port), "ok");
    let d = agent.wait_decision("the audited deny", |d| d["verdict"] == "deny");
    assert_eq!(d["enforced"], false);
    assert!(
        d.get("aggregate").is_none(),
        "denies are never aggregated: {d}"
    );
    // Allows are held for the hour, then written once with their count at shutdown.
    w.must_token("vault", None);
    for _ in 0..3 {
        assert_eq!(w.connect4(servers.tcp_port), "ok");
    }
    w.exit();
    assert!(agent.stop(), "clean stop");
    let allows: Vec<Value> = agent
        .decisions()
        .into_iter()
        .filter(|d| d["verdict"] == "allow")
        .collect();
    assert_eq!(allows.len(), 1, "{allows:#?}");
    assert_eq!(allows[0]["aggregate"]["count"], 3, "{allows:#?}");
    assert_eq!(allows[0]["aggregate"]["interval_seconds"], 3600);
}

#[test]
fn logs_follow_keeps_up_across_rotation() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ops-rotate");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    // About two records a file: many rotations while `tessera logs -f` follows.
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
        &cg.path,
        &[
            "--decision-log-max-size",
            "2KiB",
            "--decision-log-keep",
            "2",
        ],
    );
    let mut follower = Command::new(TESSERA)
        .args(["logs", "-f"])
        .arg(&agent.log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("tessera logs -f");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut w = Workload::spawn(&app, &agent.api);
    const CALLS: usize = 12;
    let mut written = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for i in 0..CALLS {
        assert_eq!(w.connect4(servers.tcp_port), "EPERM");
        let d = agent.wait_decision("a deny", |d| {
            d["reason"] == "no_credential"
                && !written.contains(d["decision_id"].as_str().unwrap_or(""))
        });
        written.insert(d["decision_id"].as_str().unwrap().to_string());
        // Wait for the follower to print it before the next call can rotate the file again.
        while seen.len() <= i {
            let line = rx
                .recv_timeout(Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("follower stalled after {seen:?}: {e}"));
            let r: Value = serde_json::from_str(&line).unwrap();
            seen.insert(r["decision_id"].as_str().unwrap().to_string());
        }
    }
    w.exit();
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(seen, written);
    let rotated = agent.dir.path().join("decisions.jsonl.1");
    assert!(rotated.exists(), "the log never rotated");
    assert!(!agent.dir.path().join("decisions.jsonl.3").exists());
}

/// Under systemd (`Type=notify`): READY=1 once the Workload API socket exists, watchdog pings
/// from the event loop, STOPPING=1 on SIGTERM; the notify socket is the test's own.
#[test]
fn tells_systemd_ready_watchdog_and_stopping() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ops-notify");
    let servers = Servers::start();
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
    )
    .unwrap();
    let api = dir.path().join("workload.sock");
    let mut child = Command::new(TESSERA)
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--api-socket")
        .arg(&api)
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .arg("--decision-log")
        .arg(dir.path().join("decisions.jsonl"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--metrics-addr", "off", "--fail-open"])
        .env("NOTIFY_SOCKET", &notify)
        // A 2 s watchdog: pings every second.
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = socket
            .recv(&mut buf)
            .expect("a notification from the agent");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(api.exists(), "READY=1 before the Workload API listened");
    let mut pings = 0;
    while pings < 2 {
        let m = recv();
        if m.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = loop {
        let m = recv();
        if !m.lines().any(|l| l == "WATCHDOG=1") {
            break m;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait().unwrap().success());
    let _ = Command::new(TESSERA)
        .args(["uninstall", "--cgroup"])
        .arg(&cg.path)
        .output();
}

#[test]
fn the_state_directory_is_private_from_the_first_write_and_after_a_restart() {
    if !privileged() {
        return;
    }
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
    let cg = TestCgroup::new("ops-statedir");
    let servers = Servers::start();
    let mut agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
        &cg.path,
        &[],
    );
    let state = agent.dir.path().join("state");
    // The kernel-id table and the policy copies are written before the signing key: the
    // directory must be 0700 from its creation, and so must the copies' directory.
    assert_eq!(mode(&state), 0o700, "{}", state.display());
    assert_eq!(mode(&state.join("generations")), 0o700);

    // Widened by hand (or by an old release): the next start tightens it and says so.
    agent.kill();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    agent.restart();
    assert_eq!(mode(&state), 0o700);
    agent.wait_log("the state directory was readable by others");
}

/// Issue 15 #10: with the agent stopped (SIGSTOP) the ring buffer fills and the kernel drops
/// events; no refused attempt may go missing from the decision log for that. Every deny whose
/// event was dropped is counted in the kernel under who was refused what, and written as a record
/// with a `lost` count once the agent runs again: the records add up to the attempts.
#[test]
fn denies_the_ring_buffer_could_not_take_are_counted_in_the_log() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ops-lost");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
        &cg.path,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    let mut w = Workload::spawn(&app, &agent.api);
    // Attested first, so that every later deny is the same (no_credential).
    let (result, record, _) =
        agent.settled(w.pid, || w.net("sendto", 4, "127.0.0.1", servers.udp_port));
    assert_eq!(result, "EPERM");
    assert_eq!(record["reason"], "no_credential", "{record}");
    let before = agent.decisions_of(w.pid).len() as u64;

    // The ring holds about 35,000 events (4 MiB): three times that, with nobody reading.
    let attempts: u64 = 120_000;
    let signal = |sig: &str| {
        let status = Command::new("kill")
            .args([sig, &agent.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let out = w.send(serde_json::json!({
        "op": "flood", "family": 4, "host": "127.0.0.1", "port": servers.udp_port,
        "count": attempts,
    }));
    signal("-CONT");
    assert_eq!(
        out["results"],
        serde_json::json!({"EPERM": attempts}),
        "{out}"
    );

    // Each record of the process stands for one deny, or for `lost.count` of them.
    let counted = |records: &[Value]| -> (u64, u64) {
        let mut total = 0;
        let mut lost = 0;
        for r in records {
            assert_eq!(r["verdict"], "deny", "{r}");
            match r.get("lost") {
                Some(l) => {
                    let n = l["count"].as_u64().unwrap();
                    assert!(n > 0, "{r}");
                    assert_eq!(r["reason"], "no_credential", "{r}");
                    assert_eq!(r["destination"]["endpoint"], "dns", "{r}");
                    assert_eq!(r["destination"]["port"], servers.udp_port, "{r}");
                    assert_eq!(r["hook"], "sendmsg4", "{r}");
                    assert!(l["first_ts"].as_str().unwrap() <= l["last_ts"].as_str().unwrap());
                    total += n;
                    lost += n;
                }
                None => total += 1,
            }
        }
        (total, lost)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (total, lost) = loop {
        let (total, lost) = counted(&agent.decisions_of(w.pid));
        if total >= before + attempts || std::time::Instant::now() > deadline {
            break (total, lost);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(total, before + attempts, "{lost} of them as lost records");
    // The ring did overflow: the lost path was taken, and said so.
    assert!(
        lost > 0,
        "no event was dropped: the test did not fill the ring"
    );

    let (status, text) = agent.http_get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "tessera_lost_denies_total"),
        Some(lost as f64),
        "{text}"
    );
    let status = agent.status_json();
    assert_eq!(status["counters"]["lost_denies"], lost, "{status}");
    assert!(
        status["counters"]["dropped_events"].as_u64().unwrap() >= lost,
        "{status}"
    );
    let log = std::fs::read_to_string(&agent.agent_log).unwrap();
    assert!(
        log.contains("denies were written as counted `lost` records"),
        "{log}"
    );
    w.exit();
}

/// SIGTERM while a process of the attached cgroup keeps connecting: the agent stops accepting,
/// writes the decisions made before the stop, and exits within its stop deadline (systemd waits
/// 90 s by default, Kubernetes 30 s; the agent promises 5 s), instead of draining forever.
#[test]
fn a_stop_under_load_ends_within_the_deadline_and_writes_what_came_before() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ops-stop-load");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let mut agent = Agent::start(
        &standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port + 1, "enforce"),
        &cg.path,
        &[],
    );
    // A process with no credential connecting to `vault` without pause: every connect is a
    // deny event, about a thousand a second, for as long as it runs.
    let script = format!(
        "import socket\nwhile True:\n    s = socket.socket()\n    try:\n        \
         s.connect(('127.0.0.1', {}))\n    except OSError:\n        pass\n    s.close()\n",
        servers.tcp_port
    );
    let mut loader = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec python3 -c "$1""#)
        .arg(&app)
        .arg(&script)
        .spawn()
        .unwrap();
    let loader_pid = loader.id();
    let first = agent.wait_decision("the loader's first deny", |d| {
        d["process"]["pid"] == loader_pid && d["verdict"] == "deny"
    });
    assert_eq!(first["reason"], "no_credential", "{first}");
    std::thread::sleep(Duration::from_millis(500));

    let started = std::time::Instant::now();
    let clean = agent.stop();
    let took = started.elapsed();
    let _ = loader.kill();
    let _ = loader.wait();
    assert!(clean, "the agent did not exit cleanly within 15 s");
    // The deadline is 5 s; the margin is for a loaded CI machine, not for draining forever.
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
    let log = agent.agent_log();
    let drained = log
        .lines()
        .find(|l| l.contains("decision events written at stop"))
        .unwrap_or_else(|| panic!("no drain line in the agent log:\n{log}"));
    assert!(log.contains("stopped"), "{log}");
    eprintln!("stopped in {took:?}: {drained}");
    // Every decision the log holds for the loader came before the stop, and there were many.
    let denies = agent.decisions_of(loader_pid).len();
    assert!(denies > 100, "{denies} denies logged: {drained}");
}
