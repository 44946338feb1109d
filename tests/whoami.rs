//! `tessera whoami` against real processes: one in a plain test cgroup, one in a cgroup shaped
//! like a systemd service and one shaped like a containerd container in a Kubernetes pod, all
//! below a cgroup this test creates (root only).
#![allow(clippy::expect_used, reason = "a test panics with context")]

mod support;

use std::process::{Child, Command, Stdio};

use serde_json::Value;
use support::{TESSERA, TestCgroup, privileged};

const CID: &str = "3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const POD_UID: &str = "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d";

/// `sleep` moved into a cgroup; killed on drop (before the cgroup is removed).
struct Sleeper(Child);

impl Sleeper {
    fn in_cgroup(cgroup: &std::path::Path) -> Sleeper {
        let child = Command::new("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
            .unwrap_or_else(|e| panic!("move into {}: {e}", cgroup.display()));
        // exec renames the task a little after spawn returns.
        let comm = format!("/proc/{}/comm", child.id());
        for _ in 0..10_000 {
            if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim_end() == "sleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Sleeper(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn policy(dir: &std::path::Path, base: &str) -> std::path::PathBuf {
    let yaml = format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: example.org\n  workloads:\n\
         \x20   - name: everything\n      match: {{ cgroup: {base} }}\n\
         \x20   - name: payments\n      match: {{ cgroup: {base}/payments, uid: 0 }}\n\
         \x20   - name: payments-svc\n      spiffeId: spiffe://example.org/svc/payments\n      match: {{ cgroup: {base}/system.slice/payments.service }}\n\
         \x20   - name: nobody\n      match: {{ cgroup: {base}/payments, uid: 65534 }}\n\
         \x20   - name: elsewhere\n      match: {{ cgroup: /tessera-test-nowhere }}\n"
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, yaml).expect("write policy");
    path
}

fn whoami(policy: &std::path::Path, pid: u32, json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(TESSERA);
    cmd.arg("whoami")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--policy")
        .arg(policy);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run tessera whoami");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn whoami_json(policy: &std::path::Path, pid: u32) -> Value {
    let (code, stdout, stderr) = whoami(policy, pid, true);
    assert_eq!(code, 0, "whoami failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn workload<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no workload {name} in {report}"))
}

#[test]
fn whoami_explains_a_process_in_a_plain_cgroup() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("whoami");
    let (payments, payments_rel) = cg.child("payments");
    let proc_ = Sleeper::in_cgroup(&payments);
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = policy(dir.path(), &cg.rel);

    let r = whoami_json(&policy, proc_.pid());
    assert_eq!(r["schema"], "tessera.whoami/v1");
    assert_eq!(r["pid"], proc_.pid());
    assert_eq!(r["workload"]["name"], "payments", "{r:#}");
    assert_eq!(r["workload"]["spiffe_id"], "spiffe://example.org/payments");
    let ev = &r["evidence"];
    assert_eq!(ev["cgroup"], payments_rel.as_str());
    assert_eq!(ev["comm"], "sleep");
    assert_eq!(ev["uid"]["real"], 0);
    let sleep_path = std::fs::read_link(format!("/proc/{}/exe", proc_.pid())).expect("readlink");
    assert_eq!(ev["exe"]["path"], sleep_path.to_str().expect("utf-8"));
    assert_eq!(ev["exe"]["hash"]["status"], "sha256");
    assert_eq!(ev["exe"]["hash"]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(ev["container"], Value::Null);
    assert_eq!(r["kubernetes_metadata"], "disabled");

    // Every workload, with each selector compared.
    let chosen = workload(&r, "payments");
    assert_eq!(
        (chosen["matched"].as_bool(), chosen["selected"].as_bool()),
        (Some(true), Some(true))
    );
    let everything = workload(&r, "everything");
    assert_eq!(everything["matched"], true);
    assert_eq!(everything["selected"], false, "less specific than payments");
    let nobody = workload(&r, "nobody");
    assert_eq!(nobody["matched"], false);
    let uid = &nobody["selectors"][1];
    assert_eq!(
        (
            uid["selector"].as_str(),
            uid["expected"].as_str(),
            uid["actual"].as_str(),
            uid["matched"].as_bool()
        ),
        (Some("uid"), Some("65534"), Some("0"), Some(false))
    );
    assert_eq!(workload(&r, "elsewhere")["selectors"][0]["matched"], false);

    let (code, text, stderr) = whoami(&policy, proc_.pid(), false);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("workload   payments\n"), "{text}");
    assert!(
        text.contains("spiffe id  spiffe://example.org/payments\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("cgroup         {payments_rel}\n")),
        "{text}"
    );
    assert!(
        text.contains("payments (spiffe://example.org/payments): SELECTED"),
        "{text}"
    );
    assert!(
        text.contains("NO  uid          want 65534  have 0"),
        "{text}"
    );
}

#[test]
fn whoami_reads_systemd_and_container_layouts() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("whoami-layouts");
    let (svc, _) = cg.child("system.slice/payments.service");
    let pod_slice = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
        POD_UID.replace('-', "_")
    );
    let (ctr, _) = cg.child(&pod_slice);
    let in_svc = Sleeper::in_cgroup(&svc);
    let in_ctr = Sleeper::in_cgroup(&ctr);
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = policy(dir.path(), &cg.rel);

    let r = whoami_json(&policy, in_svc.pid());
    assert_eq!(r["workload"]["name"], "payments-svc", "{r:#}");
    assert_eq!(
        r["workload"]["spiffe_id"],
        "spiffe://example.org/svc/payments"
    );
    let units: Vec<&str> = r["evidence"]["systemd_units"]
        .as_array()
        .expect("units")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(units, ["system.slice", "payments.service"]);
    assert_eq!(r["evidence"]["systemd_units"][1]["kind"], "service");

    let r = whoami_json(&policy, in_ctr.pid());
    // Only `everything` covers the pod's cgroup.
    assert_eq!(r["workload"]["name"], "everything", "{r:#}");
    let ev = &r["evidence"];
    assert_eq!(ev["container"]["id"], CID);
    assert_eq!(ev["container"]["runtime"], "containerd");
    assert_eq!(ev["pod"]["uid"], POD_UID);
    assert_eq!(ev["pod"]["qos"], "Burstable");
    assert_eq!(ev["pod"]["container"]["id"], CID);
    let inner = ev["systemd_units"]
        .as_array()
        .and_then(|u| u.last())
        .expect("units");
    assert_eq!(inner["name"], format!("cri-containerd-{CID}.scope"));

    let (code, text, stderr) = whoami(&policy, in_ctr.pid(), false);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        text.contains(&format!("container      {CID} (containerd)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("k8s pod        uid {POD_UID} qos Burstable")),
        "{text}"
    );
    assert!(
        text.contains("not watched (not in a Kubernetes cluster)"),
        "{text}"
    );
}

#[test]
fn whoami_says_when_nothing_matches() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("whoami-none");
    let lonely = Sleeper::in_cgroup(&cg.path);
    let dir = tempfile::tempdir().expect("tempdir");
    // A policy whose only workload is somewhere else.
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: example.org\n  workloads:\n    - name: elsewhere\n      match: { cgroup: /tessera-test-nowhere }\n",
    )
    .expect("write");
    let r = whoami_json(&path, lonely.pid());
    assert_eq!(r["workload"], Value::Null);
    let (code, text, _) = whoami(&path, lonely.pid(), false);
    assert_eq!(code, 0);
    assert!(text.contains("unknown_workload"), "{text}");

    // A process that is gone: an error, not a guess.
    let mut gone = Command::new("true").spawn().expect("spawn");
    let pid = gone.id();
    gone.wait().expect("wait");
    let (code, _, stderr) = whoami(&path, pid, false);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot attest process {pid}")),
        "{stderr}"
    );
}

#[test]
fn whoami_chooses_by_every_selector() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("whoami-selectors");
    let (svc, _) = cg.child("system.slice/payments.service");
    let pod_slice = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/docker-{CID}.scope",
        POD_UID.replace('-', "_")
    );
    let (ctr, _) = cg.child(&pod_slice);
    let in_svc = Sleeper::in_cgroup(&svc);
    let in_ctr = Sleeper::in_cgroup(&ctr);
    let exe = std::fs::read_link(format!("/proc/{}/exe", in_svc.pid())).expect("read exe");
    let exe = exe.display();
    let base = &cg.rel;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: example.org\n  workloads:\n\
             \x20   - name: everything\n      match: {{ cgroup: {base} }}\n\
             \x20   - name: unit\n      match: {{ systemdUnit: payments.service }}\n\
             \x20   - name: unit-exe\n      match: {{ systemdUnit: payments.service, exe: {exe} }}\n\
             \x20   - name: unit-other-exe\n      match: {{ systemdUnit: payments.service, exe: /nonexistent/bin }}\n\
             \x20   - name: container\n      match: {{ container: {} }}\n",
            &CID[..12]
        ),
    )
    .expect("write policy");

    let r = whoami_json(&path, in_svc.pid());
    assert_eq!(r["workload"]["name"], "unit-exe", "{r:#}");
    for name in ["everything", "unit", "unit-exe"] {
        assert_eq!(workload(&r, name)["matched"], true, "{name}: {r:#}");
    }
    let other = workload(&r, "unit-other-exe");
    assert_eq!(other["matched"], false);
    let exe_row = other["selectors"]
        .as_array()
        .expect("selectors")
        .iter()
        .find(|s| s["selector"] == "exe")
        .expect("an exe row");
    assert_eq!(exe_row["actual"], exe.to_string(), "{other:#}");
    assert_eq!(exe_row["matched"], false);

    let r = whoami_json(&path, in_ctr.pid());
    assert_eq!(r["workload"]["name"], "container", "{r:#}");
    assert_eq!(r["evidence"]["container"]["runtime"], "docker", "{r:#}");
}
