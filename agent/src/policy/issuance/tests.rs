use std::path::{Path, PathBuf};

use crate::policy::PolicySet;

const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  issuance: { rego: m.rego, timeout: 50ms }
  workloads:
    - name: a
      match: { uid: 4242 }
  endpoints:
    - name: vault
      addresses: [127.0.0.1]
      labels: { sensitivity: high }
  rules:
    - name: a-to-vault
      workloads: [a]
      endpoints: [vault]
      credential: { required: true, maxTtl: 5m }
      scopes: [read, write]
";

/// A policy file and its module `m.rego` in a fresh directory.
fn files(module: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.rego"), module).unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    (dir, policy)
}

fn load(policy: &Path) -> Result<PolicySet, String> {
    PolicySet::load(&[policy.to_path_buf()]).map_err(|e| e.to_string())
}

#[test]
fn the_shipped_module_compiles_and_its_tests_pass() {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/issuance.yaml");
    let set = load(&policy).unwrap();
    assert_eq!(set.issuance.len(), 1);
    let module = &set.issuance[0];
    assert_eq!(module.query, "data.tessera.issuance.decision");
    assert_eq!(module.tests.len(), 4, "{:?}", module.tests);
    for outcome in module.run_tests() {
        assert_eq!(outcome.failure, None, "{}", outcome.name);
    }
    let (_, vault) = set.endpoint_by_name("research-vault").unwrap();
    assert_eq!(vault.labels["sensitivity"], "high");
    let rule = &set.rules[0];
    assert_eq!(rule.scopes, ["secrets:read", "secrets:write"]);
    assert_eq!(rule.issuance, Some(crate::policy::IssuanceId(0)));
}

#[test]
fn a_syntax_error_points_into_the_module() {
    let (_dir, policy) = files("package t\n\ndecision := {\"allow\": true\n");
    let err = load(&policy).unwrap_err();
    let module = policy.with_file_name("m.rego");
    assert!(
        err.starts_with(&format!("{}:", module.display())),
        "not FILE:LINE:COL in the module: {err}"
    );
    let place: Vec<&str> = err[module.display().to_string().len() + 1..]
        .splitn(3, ':')
        .collect();
    assert!(place[0].parse::<usize>().unwrap() >= 3, "{err}");
    assert!(place[1].parse::<usize>().is_ok(), "{err}");
    assert!(err.contains("Rego:"), "{err}");
}

#[test]
fn a_missing_module_or_rule_points_into_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let err = load(&policy).unwrap_err();
    assert!(
        err.starts_with(&format!("{}:5:", policy.display()))
            && err.contains("cannot read the Rego module"),
        "{err}"
    );

    let (_dir, policy) = files("package t\n\nallow := true\n");
    let err = load(&policy).unwrap_err();
    assert!(
        err.starts_with(&format!("{}:5:", policy.display()))
            && err.contains("has no rule `decision`"),
        "{err}"
    );
}

#[test]
fn a_module_that_runs_too_long_times_out() {
    let (_dir, policy) = files(
        "package t\n\ndecision := {\"allow\": true} if {\n  some x in numbers.range(1, 100000)\n  \
         some y in numbers.range(1, 100000)\n  x == y + 1000000\n}\n",
    );
    let set = load(&policy).unwrap();
    let started = std::time::Instant::now();
    let failure = set.issuance[0]
        .evaluate(&serde_json::json!({}))
        .unwrap_err();
    assert_eq!(
        failure,
        super::EvalFailure::Timeout(std::time::Duration::from_millis(50))
    );
    // Not a timing assertion: 10^10 iterations would take minutes without the budget.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn a_failing_test_rule_is_reported() {
    let (_dir, policy) = files(
        "package t\n\ndecision := {\"allow\": input.ok}\n\ntest_ok if decision.allow with input as {\"ok\": true}\n\n\
         test_broken if decision.allow with input as {\"ok\": false}\n",
    );
    let set = load(&policy).unwrap();
    let outcomes = set.issuance[0].run_tests();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0].name, "data.t.test_ok");
    assert_eq!(outcomes[0].failure, None);
    assert_eq!(outcomes[1].name, "data.t.test_broken");
    assert!(outcomes[1].failure.is_some());
}

#[test]
fn editing_the_module_changes_the_revision() {
    let (_dir, policy) = files("package t\n\ndecision := {\"allow\": true}\n");
    let before = load(&policy).unwrap().revision;
    std::fs::write(
        policy.with_file_name("m.rego"),
        "package t\n\ndecision := {\"allow\": false}\n",
    )
    .unwrap();
    let after = load(&policy).unwrap();
    assert_ne!(before, after.revision);
    assert_eq!(
        after.issuance[0].evaluate(&serde_json::json!({})).unwrap(),
        Some(serde_json::json!({"allow": false}))
    );
}

#[test]
fn bad_labels_scopes_and_issuance_fields_say_where_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  issuance: { rego: m.rego, timeout: 10s }
  workloads:
    - name: a
      match: { uid: 4242 }
  endpoints:
    - name: vault
      addresses: [127.0.0.1]
      labels: { \"bad key\": x }
  rules:
    - name: r
      workloads: [a]
      endpoints: [vault]
      credential: { required: false }
      scopes: [read]
    - name: s
      workloads: [a]
      endpoints: [vault]
      credential: { required: true, maxTtl: 5m }
      scopes: [read, read, \"has space\"]
",
    )
    .unwrap();
    let err = load(&policy).unwrap_err();
    let file = policy.display();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 5, "{err}");
    assert!(
        lines[0].starts_with(&format!("{file}:5:")) && lines[0].contains("timeout `10s`"),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:12:"))
            && lines[1].contains("invalid label key `bad key`"),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:18:"))
            && lines[2].contains("scopes on a rule that requires no credential"),
        "{err}"
    );
    assert!(
        lines[3].starts_with(&format!("{file}:23:"))
            && lines[3].contains("scope `read` is listed twice"),
        "{err}"
    );
    assert!(
        lines[4].starts_with(&format!("{file}:23:"))
            && lines[4].contains("invalid scope `has space`"),
        "{err}"
    );
}
