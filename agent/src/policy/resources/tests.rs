//! Merging resources with files: what is accepted, what is refused and why, what enforces.

use serde_json::json;

use super::*;

const FILE: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: { name: base }
spec:
  trustDomain: example.org
  workloads:
    - name: batch
      match: { uid: 1500 }
  endpoints:
    - name: db
      addresses: [\"10.0.0.20/32\"]
      ports: [5432]
  rules:
    - name: batch-to-db
      workloads: [batch]
      endpoints: [db]
";

fn files() -> Vec<(PathBuf, Vec<u8>)> {
    vec![(
        PathBuf::from("/etc/tessera/policies/base.yaml"),
        FILE.into(),
    )]
}

fn vault_spec(workload: &str, max_ttl: &str) -> Value {
    json!({
        "trustDomain": "example.org",
        "workloads": [{ "name": workload, "match": { "uid": 1001, "systemdUnit": format!("{workload}.service") } }],
        // Each its own address: two endpoints on one address and port are refused.
        "endpoints": [{ "name": format!("{workload}-vault"), "addresses": [address(workload)], "ports": [8200] }],
        "rules": [{
            "name": format!("{workload}-to-vault"),
            "workloads": [workload],
            "endpoints": [format!("{workload}-vault")],
            "credential": { "required": true, "maxTtl": max_ttl, "bind": "process" },
        }],
    })
}

fn address(name: &str) -> String {
    let n = name.bytes().map(u32::from).sum::<u32>() % 250;
    format!("10.0.{n}.10")
}

fn cluster(name: &str, generation: i64, spec: Value) -> PolicyResource {
    PolicyResource {
        kind: PolicyKind::Cluster,
        namespace: None,
        name: name.to_owned(),
        generation,
        spec,
    }
}

fn namespaced(ns: &str, name: &str, spec: Value) -> PolicyResource {
    PolicyResource {
        kind: PolicyKind::Namespaced,
        namespace: Some(ns.to_owned()),
        name: name.to_owned(),
        generation: 1,
        spec,
    }
}

fn new(latest: PolicyResource) -> Candidate {
    Candidate {
        latest,
        accepted: None,
    }
}

fn refused_errors(merged: &Merged, key: &ResourceKey) -> Vec<String> {
    match merged.verdicts.get(key) {
        Some(Verdict::Refused { errors, .. }) => errors.iter().map(ToString::to_string).collect(),
        other => panic!("{key} is not refused: {other:?}"),
    }
}

#[test]
fn a_resource_merges_with_the_files_into_one_set() {
    let payments = cluster("payments", 1, vault_spec("payments", "10m"));
    let merged = merge(&files(), &[new(payments.clone())]).expect("merged");
    let names: Vec<&str> = merged
        .policy
        .workloads
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["batch", "payments"]);
    let (w, _) = merged
        .policy
        .workload_by_name("payments")
        .expect("workload");
    let (e, _) = merged
        .policy
        .endpoint_by_name("payments-vault")
        .expect("endpoint");
    assert!(merged.policy.rule_for(w, e).is_some());
    assert_eq!(
        merged.verdicts.get(&payments.key()),
        Some(&Verdict::Accepted { generation: 1 })
    );
    assert_eq!(merged.enforcing.get(&payments.key()), Some(&payments));
    assert_eq!(
        merged.policy.sources,
        [
            PathBuf::from("/etc/tessera/policies/base.yaml"),
            PathBuf::from("TesseraPolicy/payments")
        ]
    );
    assert_eq!(merged.rendered.len(), 1);
    // The revision covers the resource: another spec, another revision.
    let other = merge(
        &files(),
        &[new(cluster("payments", 2, vault_spec("payments", "5m")))],
    )
    .expect("merged");
    assert_ne!(other.policy.revision, merged.policy.revision);
}

#[test]
fn a_bad_resource_is_refused_alone_with_the_field_path() {
    let bad = cluster("broken", 3, vault_spec("broken", "ten minutes"));
    let good = cluster("payments", 1, vault_spec("payments", "10m"));
    let merged = merge(&files(), &[new(bad.clone()), new(good.clone())]).expect("merged");
    assert!(merged.policy.workload_by_name("payments").is_some());
    assert!(merged.policy.workload_by_name("broken").is_none());
    let errors = refused_errors(&merged, &bad.key());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("TesseraPolicy/broken spec.rules[0].credential.maxTtl: "),
        "{errors:?}"
    );
    assert!(errors[0].contains("ten minutes"), "{errors:?}");
    assert!(matches!(
        merged.verdicts.get(&bad.key()),
        Some(Verdict::Refused {
            generation: 3,
            enforcing: None,
            ..
        })
    ));
}

#[test]
fn a_resource_naming_an_issuance_module_is_refused() {
    let mut spec = vault_spec("modular", "10m");
    spec["issuance"] = json!({"rego": "issuance.rego"});
    let bad = cluster("modular", 1, spec);
    let merged = merge(&files(), &[new(bad.clone())]).expect("merged");
    assert!(merged.policy.workload_by_name("modular").is_none());
    let errors = refused_errors(&merged, &bad.key());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("TesseraPolicy/modular spec.issuance: "),
        "{errors:?}"
    );
}

#[test]
fn a_resource_naming_trusted_issuers_is_refused() {
    let mut spec = vault_spec("delegating", "10m");
    spec["trustedIssuers"] = json!([{"name": "people", "issuer": "https://login.example.org",
        "audiences": ["tessera"], "jwks": {"file": "/etc/shadow"}}]);
    let bad = cluster("delegating", 1, spec);
    let merged = merge(&files(), &[new(bad.clone())]).expect("merged");
    assert!(merged.policy.workload_by_name("delegating").is_none());
    assert!(merged.policy.trusted_issuers.is_empty());
    let errors = refused_errors(&merged, &bad.key());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("TesseraPolicy/delegating spec.trustedIssuers: "),
        "{errors:?}"
    );
}

#[test]
fn a_refused_update_keeps_the_accepted_spec_enforcing() {
    let accepted = cluster("payments", 1, vault_spec("payments", "10m"));
    let update = cluster("payments", 2, vault_spec("payments", "48h"));
    let merged = merge(
        &files(),
        &[Candidate {
            latest: update.clone(),
            accepted: Some(accepted.clone()),
        }],
    )
    .expect("merged");
    let rule = merged
        .policy
        .rules
        .iter()
        .find(|r| r.name == "payments-to-vault")
        .expect("the accepted rule");
    assert_eq!(
        rule.credential.map(|c| c.max_ttl),
        Some(std::time::Duration::from_secs(600))
    );
    assert!(matches!(
        merged.verdicts.get(&update.key()),
        Some(Verdict::Refused {
            generation: 2,
            enforcing: Some(1),
            ..
        })
    ));
    assert_eq!(merged.enforcing.get(&update.key()), Some(&accepted));
}

#[test]
fn a_conflict_with_the_files_refuses_the_resource_not_the_files() {
    // `batch` is the file's workload name.
    let clash = cluster("clash", 1, vault_spec("batch", "10m"));
    let merged = merge(&files(), &[new(clash.clone())]).expect("merged");
    let errors = refused_errors(&merged, &clash.key());
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.workloads[0]") && e.contains("batch")),
        "{errors:?}"
    );
    assert_eq!(merged.policy.workloads.len(), 1);
}

#[test]
fn errors_in_the_files_refuse_the_set() {
    let bad_file = vec![(PathBuf::from("bad.yaml"), b"apiVersion: nope\n".to_vec())];
    let good = cluster("payments", 1, vault_spec("payments", "10m"));
    let errors = merge(&bad_file, &[new(good)]).expect_err("the file is bad");
    assert!(
        errors
            .0
            .iter()
            .all(|e| e.file == std::path::Path::new("bad.yaml")),
        "{errors}"
    );
}

#[test]
fn a_namespaced_policy_selects_pods_of_its_namespace_only() {
    let shop = namespaced("shop", "web", vault_spec("web", "10m"));
    let merged = merge(&[], &[new(shop.clone())]).expect("merged");
    let (_, web) = merged.policy.workload_by_name("web").expect("web");
    let k8s = web
        .selectors
        .k8s
        .as_ref()
        .expect("a k8s selector was added");
    assert_eq!(k8s.namespace.as_deref(), Some("shop"));
    assert_eq!(web.selectors.uid, Some(1001), "the written selectors stay");
    assert_eq!(
        web.spiffe_id.to_string(),
        "spiffe://example.org/ns/shop/web"
    );
    assert_eq!(
        merged.policy.sources,
        [PathBuf::from("TesseraNamespacedPolicy/shop/web")]
    );

    let mut other = vault_spec("api", "10m");
    other["workloads"][0]["match"] = json!({ "k8s": { "namespace": "kube-system" } });
    other["workloads"][0]["spiffeId"] = json!("spiffe://example.org/ns/kube-system/sa/admin");
    let escape = namespaced("shop", "api", other);
    let merged = merge(&[], &[new(escape.clone())]).expect("merged");
    let errors = refused_errors(&merged, &escape.key());
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "TesseraNamespacedPolicy/shop/api spec.workloads[0].match.k8s.namespace: namespace \"kube-system\" is not this resource's namespace `shop`"
        ),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("spec.workloads[0].spiffeId"),
        "{errors:?}"
    );
    assert!(merged.policy.workloads.is_empty());
}

#[test]
fn renderings_quote_what_yaml_would_reinterpret() {
    let mut spec = vault_spec("payments", "10m");
    // "yes" and "1e3" are strings in JSON; rendered unquoted YAML could read other types.
    spec["endpoints"][0]["hosts"] = json!(["yes.example.org"]);
    spec["workloads"][0]["match"]["k8s"] =
        json!({ "podLabels": { "app.kubernetes.io/name": "1e3" } });
    let rendering = render(&cluster("p", 1, spec)).expect("rendered");
    assert!(
        rendering
            .text
            .contains("\"app.kubernetes.io/name\": \"1e3\""),
        "{}",
        rendering.text
    );
    let merged = merge(&[], &[new(cluster("p", 1, vault_spec("p", "10m")))]).expect("merged");
    assert_eq!(merged.policy.workloads.len(), 1);
    for (line, path) in rendering.text.lines().zip(&rendering.paths) {
        if line.trim_start().starts_with("maxTtl") {
            assert_eq!(path, "spec.rules[0].credential.maxTtl");
        }
    }
}
