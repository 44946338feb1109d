//! `tessera check` and `tessera run` against good and bad policy files: a bad policy gets
//! `FILE:LINE:COL: what — how to fix`, exit 1, and nothing is loaded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

use std::process::Command;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

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

const GOOD: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: good
spec:
  trustDomain: example.org
  workloads:
    - name: app
      match:
        cgroup: /svc/app
  endpoints:
    - name: vault
      addresses: ["127.0.0.1/32"]
      ports: [8200]
  rules:
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault]
      credential: { required: true, maxTtl: 5m, bind: process }
"#;

#[test]
fn shipped_policies_check_clean() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let (code, out, err) = tessera(&["check", dir]);
    assert_eq!(code, 0, "policies/ must validate: {out}{err}");
    assert!(out.contains("sha256:"), "{out}");
}

#[test]
fn an_unknown_key_is_an_error_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    // Line 10, column 9: `uuid` is not a selector.
    std::fs::write(
        &file,
        GOOD.replace(
            "        cgroup: /svc/app\n",
            "        cgroup: /svc/app\n        uuid: 7\n",
        ),
    )
    .expect("write");
    let path = file.to_str().expect("utf-8");
    let (code, _, err) = tessera(&["check", path]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{path}:11:")),
        "want the line of `uuid`: {err}"
    );
    assert!(err.contains("uuid"), "{err}");
    assert!(
        err.contains(" — "),
        "the error must say how to fix it: {err}"
    );
}

#[test]
fn a_dangling_reference_and_a_bad_address_are_both_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    let text = GOOD
        .replace("workloads: [app]", "workloads: [ap]")
        .replace("\"127.0.0.1/32\"", "\"127.0.0.1/33\"");
    std::fs::write(&file, text).expect("write");
    let path = file.to_str().expect("utf-8");
    let (code, _, err) = tessera(&["check", path]);
    assert_eq!(code, 1);
    assert!(err.contains("ap"), "{err}");
    assert!(err.contains("127.0.0.1/33"), "{err}");
    assert!(
        err.lines().filter(|l| l.starts_with(path)).count() >= 2,
        "{err}"
    );
}

#[test]
fn a_yaml_syntax_error_has_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, "apiVersion: tessera.dev/v1alpha1\nkind: [Policy\n").expect("write");
    let path = file.to_str().expect("utf-8");
    let (code, _, err) = tessera(&["check", path]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{path}:")), "{err}");
}

#[test]
fn run_refuses_a_bad_policy_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, GOOD.replace("maxTtl: 5m", "maxTtl: forever")).expect("write");
    let api = dir.path().join("api.sock");
    let (code, _, err) = tessera(&[
        "run",
        "--policy",
        file.to_str().expect("utf-8"),
        "--api-socket",
        api.to_str().expect("utf-8"),
        "--admin-socket",
        dir.path().join("admin.sock").to_str().expect("utf-8"),
        "--state-dir",
        dir.path().join("state").to_str().expect("utf-8"),
        "--decision-log",
        dir.path().join("d.jsonl").to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("forever"), "{err}");
    assert!(
        !api.exists(),
        "a refused policy must not start the Workload API"
    );
}

#[test]
fn check_reports_ambiguous_workloads_and_accepts_every_selector() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("selectors.yaml");
    let workloads = "    - name: app\n      match:\n        cgroup: /svc/app\n\
         \x20   - name: by-unit\n      match: { systemdUnit: app.service, gid: 10 }\n\
         \x20   - name: by-exe\n      match: { exe: /usr/bin/app, uid: 5 }\n\
         \x20   - name: by-pod\n      match: { k8s: { namespace: shop, podLabels: { app: web } } }\n\
         \x20   - name: by-container\n      match: { container: 3f1c9e0b5a7d }\n";
    std::fs::write(
        &file,
        GOOD.replace(
            "    - name: app\n      match:\n        cgroup: /svc/app\n",
            workloads,
        ),
    )
    .expect("write");
    let path = file.to_str().expect("utf-8");
    let (code, out, err) = tessera(&["check", path]);
    assert_eq!(code, 0, "{out}{err}");

    // Same specificity, and a pod with both labels would match both.
    let ambiguous = workloads.to_owned()
        + "    - name: by-other-label\n      match: { k8s: { namespace: shop, podLabels: { tier: db } } }\n";
    std::fs::write(
        &file,
        GOOD.replace(
            "    - name: app\n      match:\n        cgroup: /svc/app\n",
            &ambiguous,
        ),
    )
    .expect("write");
    let (code, _, err) = tessera(&["check", path]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{path}:20:14: workload `by-other-label` is ambiguous: workload `by-pod` ({path}:16:14)"
        )),
        "{err}"
    );
}
