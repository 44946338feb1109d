//! The agent in a cgroup namespace of its own (as in a Kubernetes pod), privileged: the real
//! `tessera run` is started inside a new cgroup namespace rooted at a nested test cgroup
//! (`unshare --cgroup`). With `--cgroup-namespace host` it enters the host's namespace and
//! decides, issues and records exactly as an agent outside any namespace, naming host cgroup
//! paths; with `inherit` it warns that its paths will not match the policy's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Agent, Servers, TESSERA, TestCgroup, Workload, extra_tcp_server, privileged, standard_policy,
};

/// The value for "the host's cgroup namespace": `host` (PID 1's) where PID 1's namespace is
/// readable; else (a sandbox hiding PID 1) the namespace of this test process, which is not the
/// agent's and is the one the policy paths are written in.
fn host_namespace() -> String {
    if std::fs::metadata("/proc/1/ns/cgroup").is_ok() {
        "host".to_owned()
    } else {
        let own = format!("/proc/{}/ns/cgroup", std::process::id());
        eprintln!("note: /proc/1/ns/cgroup is not readable here: the agent enters {own}");
        own
    }
}

/// Creates the cgroups of the scenario before the agent compiles the policy.
fn scenario_cgroups(cg: &TestCgroup) {
    for name in ["app", "other", "stranger"] {
        cg.child(name);
    }
}

fn have_unshare() -> bool {
    let ok = Command::new("unshare")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        tessera_agent::testkit::skip(
            "needs unshare(1) (util-linux) to start the agent in a cgroup namespace",
        );
    }
    ok
}

/// `tessera run` started inside a new cgroup namespace whose root is `ns_cgroup`.
struct NsAgent {
    child: Child,
    dir: tempfile::TempDir,
    api: PathBuf,
    admin: PathBuf,
    log: PathBuf,
    agent_log: PathBuf,
    attach: PathBuf,
}

impl NsAgent {
    fn start(policy_yaml: &str, attach: &Path, ns_cgroup: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, policy_yaml).expect("write policy");
        let api = dir.path().join("workload.sock");
        let admin = dir.path().join("admin.sock");
        let log = dir.path().join("decisions.jsonl");
        let agent_log = dir.path().join("agent.log");
        let stderr = std::fs::File::create(&agent_log).expect("agent log");
        // The shell moves itself into `ns_cgroup`, then unshare makes that cgroup the root of
        // a new cgroup namespace and execs the agent (same pid throughout).
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0" && exec unshare --cgroup -- "$@""#)
            .arg(ns_cgroup.join("cgroup.procs"))
            .arg(TESSERA)
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .arg("--cgroup")
            .arg(attach)
            .arg("--api-socket")
            .arg(&api)
            .arg("--admin-socket")
            .arg(&admin)
            .arg("--decision-log")
            .arg(&log)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--metrics-addr")
            .arg("off")
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("TESSERA_CGROUP_NAMESPACE")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn sh/unshare/tessera run");
        let mut agent = Self {
            child,
            dir,
            api,
            admin,
            log,
            agent_log,
            attach: attach.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(agent.api.exists()
            && agent.admin.exists()
            && agent.agent_log().contains(support::READY_LINE))
        {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!(
                    "tessera run exited before it was ready: {st}\n{}",
                    agent.agent_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not ready within 30 s:\n{}",
                agent.agent_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    fn decisions(&self) -> Vec<Value> {
        support::read_decisions(&self.log)
    }

    fn wait_decision(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(d) = self.decisions().into_iter().find(|d| pred(d)) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "no decision for {what}: {:#?}",
                self.decisions()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's own cgroup namespace and the test's (the host's), as nsfs inode links.
    fn namespaces(&self) -> (String, String) {
        let link = |p: String| {
            std::fs::read_link(&p)
                .unwrap_or_else(|e| panic!("{p}: {e}"))
                .display()
                .to_string()
        };
        (
            link(format!("/proc/{}/ns/cgroup", self.child.id())),
            link("/proc/self/ns/cgroup".to_owned()),
        )
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let out = Command::new(TESSERA)
            .arg("uninstall")
            .arg("--cgroup")
            .arg(&self.attach)
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "tessera uninstall: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent_log());
        }
        let _ = &self.dir;
    }
}

/// Waits for the decision record (by a description) that matches a predicate.
type WaitDecision<'a> = dyn Fn(&str, &dyn Fn(&Value) -> bool) -> Value + 'a;

/// What one attempt came to: the API's answer, the connect's result, and the decision record's
/// verdict, reason, workload and cgroup (relative to the test cgroup).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    who: &'static str,
    api: String,
    connect: String,
    verdict: String,
    reason: String,
    workload: String,
    cgroup: String,
}

/// The same attempts against either agent: `app` with a credential (allowed) and without one
/// (no_credential), `other` (a workload without a rule), a stranger in a cgroup of no workload.
fn scenario(
    cg: &TestCgroup,
    api: &Path,
    port: u16,
    other_port: u16,
    wait: &WaitDecision,
) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut record = |who: &'static str, api: String, connect: String, pid: u32, reason: &str| {
        let d = wait(who, &|d: &Value| {
            d["process"]["tgid"] == pid && d["reason"] == reason
        });
        let cgroup = d["process"]["cgroup"].as_str().unwrap_or("<none>");
        out.push(Seen {
            who,
            api,
            connect,
            verdict: d["verdict"].as_str().unwrap_or("").to_owned(),
            reason: reason.to_owned(),
            workload: d["workload"]["name"].as_str().unwrap_or("").to_owned(),
            // The host path, relative to the test cgroup: the same for both agents.
            cgroup: cgroup
                .strip_prefix(&cg.rel)
                .map_or_else(|| format!("NOT A HOST PATH: {cgroup}"), str::to_owned),
        });
    };

    let (app_cg, _) = cg.child("app");
    let mut app = Workload::spawn(&app_cg, api);
    let (status, body) = app.token("vault", Some(60));
    assert_eq!(status, 200, "{body}");
    let connect = app.connect4(port);
    record(
        "app",
        status.to_string(),
        connect,
        app.pid,
        "credential_valid",
    );
    let connect = app.connect4(other_port);
    record("app", "-".into(), connect, app.pid, "no_credential");

    let (other_cg, _) = cg.child("other");
    let mut other = Workload::spawn(&other_cg, api);
    let (status, body) = other.token("vault", Some(60));
    assert_eq!(body["reason"], "workload_not_allowed", "{body}");
    let connect = other.connect4(port);
    record(
        "other",
        status.to_string(),
        connect,
        other.pid,
        "workload_not_allowed",
    );

    let (stranger_cg, stranger_rel) = cg.child("stranger");
    let mut stranger = Workload::spawn(&stranger_cg, api);
    let (status, body) = stranger.token("vault", Some(60));
    assert_eq!(body["reason"], "unknown_workload", "{body}");
    // Attestation names the caller's cgroup by its host path.
    assert!(
        body.to_string().contains(&stranger_rel),
        "the refusal does not name {stranger_rel}: {body}"
    );
    let connect = stranger.connect4(port);
    record(
        "stranger",
        status.to_string(),
        connect,
        stranger.pid,
        "unknown_workload",
    );
    out
}

#[test]
fn with_host_the_agent_in_a_cgroup_namespace_decides_as_one_outside() {
    if !privileged() || !have_unshare() {
        return;
    }
    let servers = Servers::start();
    let other_port = extra_tcp_server();

    // Outside any namespace: the reference.
    let reference = {
        let cg = TestCgroup::new("cgns-ref");
        scenario_cgroups(&cg);
        let policy = standard_policy(&cg.rel, servers.tcp_port, other_port, "enforce");
        let agent = Agent::start(&policy, &cg.path, &[]);
        scenario(&cg, &agent.api, servers.tcp_port, other_port, &|w, p| {
            agent.wait_decision(w, p)
        })
    };

    let cg = TestCgroup::new("cgns-host");
    let (ns_cgroup, _) = cg.child("ns");
    scenario_cgroups(&cg);
    let policy = standard_policy(&cg.rel, servers.tcp_port, other_port, "enforce");
    let host = host_namespace();
    let agent = NsAgent::start(
        &policy,
        &cg.path,
        &ns_cgroup,
        &["--cgroup-namespace", &host],
    );
    let log = agent.agent_log();
    assert!(
        log.contains("entered the host's"),
        "no cgroup namespace line:\n{log}"
    );
    // It was started in a namespace of its own, and now shares the host's.
    let (own, host) = agent.namespaces();
    assert_eq!(own, host, "the agent did not enter the host's namespace");
    assert!(
        !log.contains("cgroup namespace of its own"),
        "no warning expected:\n{log}"
    );
    let in_ns = scenario(&cg, &agent.api, servers.tcp_port, other_port, &|w, p| {
        agent.wait_decision(w, p)
    });

    assert_eq!(in_ns, reference);
    // And the reference is what enforcement means.
    let expect = [
        ("app", "ok", "allow", "credential_valid", "app", "/app"),
        ("app", "EPERM", "deny", "no_credential", "app", "/app"),
        (
            "other",
            "EPERM",
            "deny",
            "workload_not_allowed",
            "other",
            "/other",
        ),
        (
            "stranger",
            "EPERM",
            "deny",
            "unknown_workload",
            "",
            "/stranger",
        ),
    ];
    assert_eq!(in_ns.len(), expect.len());
    for (seen, (who, connect, verdict, reason, workload, cgroup)) in in_ns.iter().zip(expect) {
        assert_eq!(
            (
                seen.who,
                seen.connect.as_str(),
                seen.verdict.as_str(),
                seen.reason.as_str(),
                seen.workload.as_str(),
                seen.cgroup.as_str()
            ),
            (who, connect, verdict, reason, workload, cgroup)
        );
    }
}

#[test]
fn with_inherit_the_agent_warns_and_its_paths_do_not_match() {
    if !privileged() || !have_unshare() {
        return;
    }
    let servers = Servers::start();
    let cg = TestCgroup::new("cgns-inherit");
    let (ns_cgroup, _) = cg.child("ns");
    let (app_cg, _) = cg.child("app");
    let policy = standard_policy(&cg.rel, servers.tcp_port, servers.tcp_port, "enforce");
    let agent = NsAgent::start(&policy, &cg.path, &ns_cgroup, &[]);
    let log = agent.agent_log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cgroup namespace of its own"))
        .collect();
    assert_eq!(warnings.len(), 1, "expected one warning:\n{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("--cgroup-namespace host"),
        "the warning does not say what to set: {}",
        warnings[0]
    );
    let (own, host) = agent.namespaces();
    assert_ne!(own, host);

    // What the warning is about: the agent reads `app`'s cgroup relative to its own namespace
    // root (`/../app`), which no policy path names.
    let mut app = Workload::spawn(&app_cg, &agent.api);
    let (status, body) = app.token("vault", Some(60));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "unknown_workload", "{body}");
    assert!(body.to_string().contains("/../app"), "{body}");
}

#[test]
fn host_fails_clearly_when_the_host_namespace_cannot_be_entered() {
    if !privileged() || !have_unshare() {
        return;
    }
    // Without CAP_SYS_ADMIN setns is refused: the agent must stop with a clear error, before
    // loading anything. capsh is not everywhere; setpriv (util-linux) drops the capability.
    let has_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_setpriv {
        tessera_agent::testkit::skip("needs setpriv(1) to drop CAP_SYS_ADMIN");
        return;
    }
    let cg = TestCgroup::new("cgns-fail");
    let (ns_cgroup, _) = cg.child("ns");
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, standard_policy(&cg.rel, 1, 2, "enforce")).expect("policy");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec unshare --cgroup -- "$@""#)
        .arg(ns_cgroup.join("cgroup.procs"))
        .args([
            "setpriv",
            "--inh-caps=-sys_admin",
            "--bounding-set=-sys_admin",
            "--",
        ])
        .arg(TESSERA)
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--metrics-addr",
            "off",
            "--cgroup-namespace",
            &host_namespace(),
        ])
        .env_remove("TESSERA_CGROUP_NAMESPACE")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it ran: {err}");
    assert!(
        err.contains("cannot enter the host's cgroup namespace") && err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
    assert!(!err.contains("programs attached"), "{err}");
}
