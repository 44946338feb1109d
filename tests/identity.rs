//! Workload selectors against the real kernel (issue 3): systemd units, container runtimes,
//! executables (path and hash), uid and gid, and cgroups that appear after the agent started.
//!
//! Each test makes cgroups of the real shape below its own test cgroup, attaches a real
//! `tessera run` to that cgroup only and drives tests/workload.py processes in them against
//! loopback servers. A process the agent has not attested yet may be denied once with
//! `identity_pending` (`Agent::settled` retries then); a credential request attests at once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use serde_json::Value;
use support::{
    Agent, Servers, TestCgroup, Workload, extra_tcp_server, identity_policy, privileged,
    python_copy,
};

/// A process's `connect` to `vault`, settled past `identity_pending`: (result, record).
fn connect(agent: &Agent, w: &mut Workload, port: u16) -> (String, Value) {
    let pid = w.pid;
    let (result, d, _) = agent.settled(pid, || w.connect4(port));
    (result, d)
}

/// The container ID in a record's `process.container` (a string, or an object with `id`).
fn container_id(d: &Value) -> Option<&str> {
    let c = &d["process"]["container"];
    c.as_str().or_else(|| c["id"].as_str())
}

/// The unit in a record's `process.systemd_unit` (a string, or an object with `name`).
fn unit_name(d: &Value) -> Option<&str> {
    let u = &d["process"]["systemd_unit"];
    u.as_str().or_else(|| u["name"].as_str())
}

#[test]
fn systemd_units_select_services_template_instances_and_scopes() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("units");
    let (payments, _) = cg.child("system.slice/payments.service");
    let (worker, _) = cg.child("system.slice/worker@3.service");
    let (other, _) = cg.child("system.slice/other.service");
    let (scope, _) = cg.child("user.slice/user-1000.slice/session-7.scope");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let policy = identity_policy(
        "    - name: payments\n      match: { systemdUnit: payments.service }\n\
         \x20   - name: workers\n      match: { systemdUnit: worker@.service }\n\
         \x20   - name: session\n      match: { systemdUnit: session-7.scope }",
        "    - name: payments-to-vault\n      workloads: [payments]\n      endpoints: [vault]\n      credential: { required: true, maxTtl: 10m, bind: process }\n\
         \x20   - name: workers-to-vault\n      workloads: [workers]\n      endpoints: [vault]",
        port,
        extra_tcp_server(),
    );
    let agent = Agent::start(&policy, &cg.path, &[]);

    // A service started in its cgroup (exec'd there, as systemd does).
    let mut svc = Workload::spawn_in(&payments, &agent.api, &["python3"]);
    let (result, d) = connect(&agent, &mut svc, port);
    assert_eq!(result, "EPERM", "no credential yet: {d}");
    assert_eq!(d["reason"], "no_credential", "{d}");
    assert_eq!(d["workload"]["name"], "payments", "{d}");
    let jti = svc.must_token("vault", Some(60));
    let (result, d) = agent.probe(svc.pid, || svc.connect4(port));
    assert_eq!(result, "ok", "{d}");
    assert_eq!(d["reason"], "credential_valid");
    assert_eq!(d["credential"]["jti"], jti.as_str());
    // The evidence the policy used is in the record.
    assert_eq!(unit_name(&d), Some("payments.service"), "{d}");
    assert!(d["process"]["exe"].is_string(), "{d}");

    // A template matches its instance.
    let mut inst = Workload::spawn(&worker, &agent.api);
    let (result, d) = connect(&agent, &mut inst, port);
    assert_eq!(result, "ok", "{d}");
    assert_eq!(d["reason"], "allowlisted");
    assert_eq!(d["workload"]["name"], "workers");
    assert_eq!(unit_name(&d), Some("worker@3.service"), "{d}");

    // A scope is a unit too; this one has no rule.
    let mut sess = Workload::spawn(&scope, &agent.api);
    let (status, body) = sess.token("vault", Some(60));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("workload_not_allowed")),
        "{body}"
    );
    let (result, d) = connect(&agent, &mut sess, port);
    assert_eq!(
        (result.as_str(), d["reason"].as_str()),
        ("EPERM", Some("workload_not_allowed")),
        "{d}"
    );
    assert_eq!(d["workload"]["name"], "session");

    // Another unit is no workload at all.
    let mut stranger = Workload::spawn(&other, &agent.api);
    let (status, body) = stranger.token("vault", Some(60));
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("unknown_workload")),
        "{body}"
    );
    let (result, d) = connect(&agent, &mut stranger, port);
    assert_eq!(
        (result.as_str(), d["reason"].as_str()),
        ("EPERM", Some("unknown_workload")),
        "{d}"
    );
    assert!(d["workload"].is_null(), "{d}");
    assert_eq!(unit_name(&d), Some("other.service"), "{d}");
}

#[test]
fn container_ids_from_every_runtime_layout_select_their_process() {
    if !privileged() {
        return;
    }
    let id = |hex: &str| hex.repeat(32);
    let (containerd, kubelet, docker, podman, crio) =
        (id("c1"), id("c2"), id("d3"), id("a4"), id("e5"));
    // The containerd ID but for its last digit.
    let decoy = format!("{}0", &containerd[..63]);
    let pod_a = "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d";
    let pod_b = "c0ffee00-1111-4222-8333-444455556666";
    let pod_c = "5a5a5a5a-0000-4000-8000-000000000001";
    let cg = TestCgroup::new("containers");
    // (workload, cgroup below the test cgroup, container ID, pod UID)
    let cases = [
        (
            "ctr-containerd",
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{containerd}.scope",
                pod_a.replace('-', "_")
            ),
            &containerd,
            Some(pod_a),
        ),
        (
            "ctr-kubelet-cgroupfs",
            format!("kubepods/burstable/pod{pod_b}/{kubelet}"),
            &kubelet,
            Some(pod_b),
        ),
        (
            "ctr-docker",
            format!("system.slice/docker-{docker}.scope"),
            &docker,
            None,
        ),
        (
            "ctr-podman",
            format!("machine.slice/libpod-{podman}.scope"),
            &podman,
            None,
        ),
        (
            "ctr-crio",
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{crio}.scope",
                pod_c.replace('-', "_")
            ),
            &crio,
            Some(pod_c),
        ),
    ];
    let servers = Servers::start();
    let port = servers.tcp_port;
    // Full IDs for some, 12-digit prefixes for the others.
    let workloads = format!(
        "    - name: ctr-containerd\n      match: {{ container: {containerd} }}\n\
         \x20   - name: ctr-kubelet-cgroupfs\n      match: {{ container: \"{}\" }}\n\
         \x20   - name: ctr-docker\n      match: {{ container: \"{}\" }}\n\
         \x20   - name: ctr-podman\n      match: {{ container: {podman} }}\n\
         \x20   - name: ctr-crio\n      match: {{ container: \"{}\" }}",
        &kubelet[..12],
        &docker[..12],
        &crio[..12]
    );
    let rules = "    - name: containers-to-vault\n      workloads: [ctr-containerd, ctr-kubelet-cgroupfs, ctr-docker, ctr-podman, ctr-crio]\n      endpoints: [vault]";
    let agent = Agent::start(
        &identity_policy(&workloads, rules, port, extra_tcp_server()),
        &cg.path,
        &[],
    );

    for (name, path, cid, pod) in &cases {
        let (dir, _) = cg.child(path);
        let mut w = Workload::spawn_in(&dir, &agent.api, &["python3"]);
        let (result, d) = connect(&agent, &mut w, port);
        assert_eq!(result, "ok", "{name}: {d}");
        assert_eq!(d["reason"], "allowlisted", "{name}: {d}");
        assert_eq!(d["workload"]["name"], *name, "{d}");
        assert_eq!(container_id(&d), Some(cid.as_str()), "{name}: {d}");
        if let Some(uid) = pod {
            assert_eq!(d["process"]["pod"]["uid"], *uid, "{name}: {d}");
        }
    }

    let (dir, _) = cg.child(&format!("system.slice/docker-{decoy}.scope"));
    let mut w = Workload::spawn(&dir, &agent.api);
    let (result, d) = connect(&agent, &mut w, port);
    assert_eq!(
        (result.as_str(), d["reason"].as_str()),
        ("EPERM", Some("unknown_workload")),
        "{d}"
    );
    assert_eq!(container_id(&d), Some(decoy.as_str()), "{d}");
}

#[test]
fn exe_path_and_hash_tell_processes_of_one_cgroup_apart() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("exe");
    let (app, app_rel) = cg.child("app");
    let bin = tempfile::tempdir().expect("tempdir");
    let (a, b, c, d_) = (
        bin.path().join("py-a"),
        bin.path().join("py-b"),
        bin.path().join("py-c"),
        bin.path().join("py-d"),
    );
    let sha_a = python_copy(&a, b"");
    let sha_b = python_copy(&b, b"\0tessera-b");
    assert_eq!(
        python_copy(&c, b""),
        sha_a,
        "py-c: py-a's content elsewhere"
    );
    assert_eq!(
        python_copy(&d_, b"\0tessera-b"),
        sha_b,
        "py-d: py-b's content elsewhere"
    );
    let servers = Servers::start();
    let port = servers.tcp_port;
    let workloads = format!(
        "    - name: by-path\n      match: {{ cgroup: {app_rel}, exe: {} }}\n\
         \x20   - name: by-hash\n      match: {{ cgroup: {app_rel}, exeSha256: \"{sha_b}\" }}\n\
         \x20   - name: plain\n      match: {{ cgroup: {app_rel} }}",
        a.display()
    );
    let rules = "    - name: path-to-vault\n      workloads: [by-path]\n      endpoints: [vault]\n\
                 \x20   - name: hash-to-vault\n      workloads: [by-hash]\n      endpoints: [vault]\n      credential: { required: true, maxTtl: 10m, bind: process }";
    let agent = Agent::start(
        &identity_policy(&workloads, rules, port, extra_tcp_server()),
        &cg.path,
        &[],
    );
    let run = |exe: &std::path::Path| {
        Workload::spawn_in(&app, &agent.api, &[exe.to_str().expect("utf-8")])
    };

    // Same cgroup, same uid: the executable decides, at connect time.
    let mut pa = run(&a);
    let (result, d) = connect(&agent, &mut pa, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("ok", Some("allowlisted"), Some("by-path")),
        "{d}"
    );
    assert_eq!(d["process"]["exe"], a.to_str().expect("utf-8"), "{d}");
    assert_eq!(d["process"]["exe_sha256"], sha_a.as_str(), "{d}");

    let mut pb = run(&b);
    let (result, d) = connect(&agent, &mut pb, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("EPERM", Some("no_credential"), Some("by-hash")),
        "{d}"
    );
    assert_eq!(d["process"]["exe_sha256"], sha_b.as_str(), "{d}");
    pb.must_token("vault", Some(60));
    let (result, d) = agent.probe(pb.pid, || pb.connect4(port));
    assert_eq!(
        (result.as_str(), d["reason"].as_str()),
        ("ok", Some("credential_valid")),
        "{d}"
    );

    // py-a's content under another path is not `exe: py-a`.
    let mut pc = run(&c);
    let (result, d) = connect(&agent, &mut pc, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("EPERM", Some("workload_not_allowed"), Some("plain")),
        "{d}"
    );
    // py-b's content under another path is still `exeSha256`.
    let mut pd = run(&d_);
    let (result, d) = connect(&agent, &mut pd, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("EPERM", Some("no_credential"), Some("by-hash")),
        "{d}"
    );
    // And py-b's path with other content is not.
    python_copy(&b, b"");
    let mut pe = run(&b);
    let (result, d) = connect(&agent, &mut pe, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("EPERM", Some("workload_not_allowed"), Some("plain")),
        "{d}"
    );
    assert_eq!(d["process"]["exe_sha256"], sha_a.as_str(), "{d}");
}

#[test]
fn uid_and_gid_tell_processes_of_one_cgroup_apart() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ids");
    let (app, app_rel) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let workloads = format!(
        "    - name: u1000\n      match: {{ cgroup: {app_rel}, uid: 1000 }}\n\
         \x20   - name: g2000\n      match: {{ cgroup: {app_rel}, gid: 2000 }}\n\
         \x20   - name: base\n      match: {{ cgroup: {app_rel} }}"
    );
    let rules = "    - name: u1000-to-vault\n      workloads: [u1000]\n      endpoints: [vault]\n\
                 \x20   - name: g2000-to-vault\n      workloads: [g2000]\n      endpoints: [vault]\n      credential: { required: true, maxTtl: 10m, bind: process }";
    let agent = Agent::start(
        &identity_policy(&workloads, rules, port, extra_tcp_server()),
        &cg.path,
        &[],
    );
    agent.open_api_dir();
    let as_ids = |uid: u32, gid: u32| {
        let mut w = Workload::spawn(&app, &agent.api);
        assert_eq!(w.setuid(uid, gid), "ok");
        w
    };

    let mut p1 = as_ids(1000, 1000);
    let (result, d) = connect(&agent, &mut p1, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("ok", Some("allowlisted"), Some("u1000")),
        "{d}"
    );
    assert_eq!(
        (d["process"]["uid"].as_u64(), d["process"]["gid"].as_u64()),
        (Some(1000), Some(1000))
    );

    let mut p2 = as_ids(1001, 2000);
    let (result, d) = connect(&agent, &mut p2, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("EPERM", Some("no_credential"), Some("g2000")),
        "{d}"
    );
    p2.must_token("vault", Some(60));
    let (result, d) = agent.probe(p2.pid, || p2.connect4(port));
    assert_eq!(
        (result.as_str(), d["reason"].as_str()),
        ("ok", Some("credential_valid")),
        "{d}"
    );

    let mut p3 = Workload::spawn(&app, &agent.api);
    let (result, d) = connect(&agent, &mut p3, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("EPERM", Some("workload_not_allowed"), Some("base")),
        "{d}"
    );

    // Both uid and gid match: uid is the more specific.
    let mut p4 = as_ids(1000, 2000);
    let (result, d) = connect(&agent, &mut p4, port);
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("ok", Some("allowlisted"), Some("u1000")),
        "{d}"
    );
}

#[test]
fn cgroups_made_after_the_agent_started_are_recognised_on_their_first_connect() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("newcg");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let late_rel = format!("{}/late", cg.rel);
    let workloads = format!(
        "    - name: late-cgroup\n      match: {{ cgroup: {late_rel} }}\n\
         \x20   - name: late-unit\n      match: {{ cgroup: {}, systemdUnit: late.service }}",
        cg.rel
    );
    let rules = "    - name: late-to-vault\n      workloads: [late-cgroup, late-unit]\n      endpoints: [vault]";
    let agent = Agent::start(
        &identity_policy(&workloads, rules, port, extra_tcp_server()),
        &cg.path,
        &[],
    );
    // Both cgroups appear now, with a process exec'd into each (as a unit or pod starts).
    for (name, path) in [
        ("late-cgroup", "late"),
        ("late-unit", "system.slice/late.service"),
    ] {
        let (dir, _) = cg.child(path);
        let mut w = Workload::spawn_in(&dir, &agent.api, &["python3"]);
        let (first, d1) = agent.probe(w.pid, || w.connect4(port));
        let pending = d1["reason"] == "identity_pending";
        let d = if pending {
            let (second, d2) = agent.probe(w.pid, || w.connect4(port));
            assert_eq!(
                second, "ok",
                "{name}: still refused after one identity_pending: {d2}"
            );
            d2
        } else {
            assert_eq!(first, "ok", "{name}: first connect refused: {d1}");
            d1
        };
        eprintln!(
            "{name}: a new cgroup's first connect was {}",
            if pending {
                "identity_pending, then allowed"
            } else {
                "allowed"
            }
        );
        assert_eq!(d["workload"]["name"], name, "{d}");
        assert_eq!(d["reason"], "allowlisted", "{d}");
    }
}

#[test]
fn processes_running_before_the_agent_starts_are_attested_at_start() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("prestart");
    let (app, app_rel) = cg.child("app");
    let bin = tempfile::tempdir().expect("tempdir");
    let py = bin.path().join("py-early");
    python_copy(&py, b"");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let workloads = format!(
        "    - name: early\n      match: {{ cgroup: {app_rel}, exe: {} }}",
        py.display()
    );
    let rules = "    - name: early-to-vault\n      workloads: [early]\n      endpoints: [vault]";
    let policy = identity_policy(&workloads, rules, port, extra_tcp_server());
    // The Workload API socket does not exist yet; the process does not need it.
    let api = std::env::temp_dir().join("tessera-no-agent-yet.sock");
    let mut w = Workload::spawn_in(&app, &api, &[py.to_str().expect("utf-8")]);
    let agent = Agent::start(&policy, &cg.path, &[]);
    let (first, d1) = agent.probe(w.pid, || w.connect4(port));
    let (result, d) = if d1["reason"] == "identity_pending" {
        eprintln!("a process older than the agent: identity_pending on its first connect");
        agent.probe(w.pid, || w.connect4(port))
    } else {
        eprintln!("a process older than the agent: attested at start");
        (first, d1)
    };
    assert_eq!(
        (
            result.as_str(),
            d["reason"].as_str(),
            d["workload"]["name"].as_str()
        ),
        ("ok", Some("allowlisted"), Some("early")),
        "{d}"
    );
    assert_eq!(d["process"]["exe"], py.to_str().expect("utf-8"), "{d}");
}
