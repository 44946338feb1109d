//! Tests of loading, lookups and workload matching.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const VALID: &str = "\
apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {name: payments}
spec:
  trustDomain: example.org
  mode: audit
  workloads:
    - name: payments-agent
      spiffeId: spiffe://example.org/agents/payments
      match: {cgroup: /tessera-demo/payments, uid: 1001}
    - name: batch
      match: {cgroup: /batch}
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ['127.0.0.1/32', '::1', 10.0.0.0/8]
      ports: [8200]
    - name: dns
      addresses: [10.0.0.53]
      protocol: any
  rules:
    - name: payments-to-vault
      workloads: [payments-agent]
      endpoints: [vault]
      credential: {required: true, maxTtl: 10m}
      mode: enforce
    - name: everyone-to-dns
      workloads: [payments-agent, batch]
      endpoints: [dns]
      credential: {required: false}
    - name: batch-to-vault
      workloads: [batch]
      endpoints: [vault]
      credential: {required: true, maxTtl: 1h30m, bind: workload}
";

fn parse(yaml: &str) -> PolicySet {
    PolicySet::from_str(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

#[test]
fn valid_policy_round_trip() {
    let set = parse(VALID);
    let expected = PolicySet {
        revision: set.revision.clone(),
        workloads: vec![
            Workload {
                name: "payments-agent".into(),
                spiffe_id: "spiffe://example.org/agents/payments".parse().unwrap(),
                selectors: Selectors {
                    cgroup: Some("/tessera-demo/payments".into()),
                    uid: Some(1001),
                    ..Selectors::default()
                },
                egress: Egress::Open,
                mode: Mode::Audit,
            },
            Workload {
                name: "batch".into(),
                spiffe_id: "spiffe://example.org/batch".parse().unwrap(),
                selectors: Selectors {
                    cgroup: Some("/batch".into()),
                    ..Selectors::default()
                },
                egress: Egress::Open,
                mode: Mode::Audit,
            },
        ],
        endpoints: vec![
            Endpoint {
                name: "vault".into(),
                kind: EndpointKind::SecretStore,
                addresses: vec![net("127.0.0.1/32"), net("::1/128"), net("10.0.0.0/8")],
                ports: vec![8200],
                hosts: vec![],
                audiences: vec![],
                protocol: Protocol::Tcp,
                mode: Mode::Audit,
                labels: Default::default(),
            },
            Endpoint {
                name: "dns".into(),
                kind: EndpointKind::Other,
                addresses: vec![net("10.0.0.53/32")],
                ports: vec![],
                hosts: vec![],
                audiences: vec![],
                protocol: Protocol::Any,
                mode: Mode::Audit,
                labels: Default::default(),
            },
        ],
        rules: vec![
            Rule {
                name: "payments-to-vault".into(),
                workloads: vec![WorkloadId(0)],
                endpoints: vec![EndpointId(0)],
                credential: Some(CredentialPolicy {
                    max_ttl: Duration::from_secs(600),
                    bind: Bind::Process,
                    keep_on_exec: false,
                    connections: Default::default(),
                }),
                mode: Mode::Enforce,
                scopes: Vec::new(),
                issuance: None,
                token_match: None,
            },
            Rule {
                name: "everyone-to-dns".into(),
                workloads: vec![WorkloadId(0), WorkloadId(1)],
                endpoints: vec![EndpointId(1)],
                credential: None,
                mode: Mode::Audit,
                scopes: Vec::new(),
                issuance: None,
                token_match: None,
            },
            Rule {
                name: "batch-to-vault".into(),
                workloads: vec![WorkloadId(1)],
                endpoints: vec![EndpointId(0)],
                credential: Some(CredentialPolicy {
                    max_ttl: Duration::from_secs(5400),
                    bind: Bind::Workload,
                    keep_on_exec: false,
                    connections: Default::default(),
                }),
                mode: Mode::Audit,
                scopes: Vec::new(),
                issuance: None,
                token_match: None,
            },
        ],
        issuance: Vec::new(),
        trusted_issuers: Vec::new(),
        sources: vec![PathBuf::from("t.yaml")],
    };
    assert_eq!(set, expected);
    assert!(set.revision.starts_with("sha256:"));
    assert_eq!(set.revision.len(), "sha256:".len() + 64);
    // Same bytes, same revision; other bytes, another.
    assert_eq!(parse(VALID).revision, set.revision);
    assert_ne!(parse(&format!("{VALID}# changed\n")).revision, set.revision);
}

#[test]
fn lookups() {
    let set = parse(VALID);
    let (vault, e) = set.endpoint_by_name("vault").unwrap();
    assert_eq!((vault, e.name.as_str()), (EndpointId(0), "vault"));
    assert!(set.endpoint_by_name("nope").is_none());
    let id = "spiffe://example.org/batch".parse().unwrap();
    let (batch, w) = set.workload_by_spiffe_id(&id).unwrap();
    assert_eq!((batch, w.name.as_str()), (WorkloadId(1), "batch"));
    assert_eq!(set.workload_by_name("batch").map(|(i, _)| i), Some(batch));
    assert_eq!(set.workload(batch).name, "batch");
    assert_eq!(set.endpoint(vault).name, "vault");
    let (rule, r) = set.rule_for(batch, vault).unwrap();
    assert_eq!((rule, r.name.as_str()), (RuleId(2), "batch-to-vault"));
    assert_eq!(set.rule(rule).name, "batch-to-vault");
    assert_eq!(
        set.rule_for(WorkloadId(0), EndpointId(1)).unwrap().0,
        RuleId(1)
    );
    assert_eq!(set.rule_for(WorkloadId(0), vault).unwrap().0, RuleId(0));
}

#[test]
fn multiple_documents_merge_in_order() {
    let yaml = format!(
        "{VALID}---\n# an empty document is skipped\n---\n\
         apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: other.org\n  \
         workloads: [{{name: w, match: {{uid: 7}}}}]\n  \
         endpoints: [{{name: e, addresses: [192.0.2.1]}}]\n  \
         rules: [{{name: r, workloads: [w], endpoints: [e]}}]\n"
    );
    let set = parse(&yaml);
    assert_eq!(set.workloads.len(), 3);
    assert_eq!(set.workloads[2].spiffe_id.as_str(), "spiffe://other.org/w");
    assert_eq!(set.endpoints[2].mode, Mode::Enforce);
    assert_eq!(set.rules[3].workloads, vec![WorkloadId(2)]);
    assert_eq!(set.rules[3].endpoints, vec![EndpointId(2)]);
    assert_eq!(set.rules[3].credential, None);
    assert_eq!(set.rules[3].mode, Mode::Enforce);
}

/// Workloads with the given (cgroup, uid) selectors, named w0, w1, ...
fn workloads(selectors: &[(Option<&str>, Option<u32>)]) -> PolicySet {
    let mut yaml = String::from(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: t.org\n  workloads:\n",
    );
    for (i, (cgroup, uid)) in selectors.iter().enumerate() {
        yaml.push_str(&format!("    - name: w{i}\n      match:\n"));
        if let Some(c) = cgroup {
            yaml.push_str(&format!("        cgroup: {c}\n"));
        }
        if let Some(u) = uid {
            yaml.push_str(&format!("        uid: {u}\n"));
        }
    }
    parse(&yaml)
}

#[test]
fn match_workload_precedence() {
    let set = workloads(&[
        (Some("/a"), None),         // w0
        (Some("/a/b"), None),       // w1
        (Some("/a/b"), Some(1000)), // w2
        (None, Some(1000)),         // w3
        (None, Some(2000)),         // w4
        (Some("/"), Some(3000)),    // w5
        (Some("/c"), Some(1000)),   // w6
    ]);
    let m = |cgroup: &str, uid: u32| set.match_workload(cgroup, uid).map(|w| w.0);
    // The deepest cgroup wins.
    assert_eq!(m("/a/b/c", 0), Some(1));
    assert_eq!(m("/a/b", 0), Some(1));
    assert_eq!(m("/a", 0), Some(0));
    assert_eq!(m("/a/x", 1000), Some(0));
    // At equal depth, one with a uid beats one without.
    assert_eq!(m("/a/b/c", 1000), Some(2));
    // "/a/b" must not match "/a/bc".
    assert_eq!(m("/a/bc", 0), Some(0));
    assert_eq!(m("/a/bc", 1000), Some(0));
    // A workload without cgroup ranks below every one with a cgroup...
    assert_eq!(m("/c/d", 1000), Some(6));
    // ...the root cgroup included, which matches everything.
    assert_eq!(m("/z", 3000), Some(5));
    // ...but is chosen when nothing with a cgroup matches.
    assert_eq!(m("/z", 1000), Some(3));
    assert_eq!(m("/", 2000), Some(4));
    assert_eq!(m("/z", 4000), None);
    assert_eq!(m("/ab", 0), None);
    // A trailing slash on the process's path does not matter.
    assert_eq!(m("/a/b/", 0), Some(1));
}

#[test]
fn loads_files_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let doc = |td: &str, w: &str, uid: u32| {
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: {td}\n  \
             workloads: [{{name: {w}, match: {{uid: {uid}}}}}]\n"
        )
    };
    std::fs::write(dir.path().join("b.yml"), doc("b.org", "wb", 2)).unwrap();
    std::fs::write(dir.path().join("a.yaml"), doc("a.org", "wa", 1)).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    let set = PolicySet::load(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(
        set.sources,
        vec![dir.path().join("a.yaml"), dir.path().join("b.yml")]
    );
    let names: Vec<&str> = set.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["wa", "wb"]);

    // A file named directly, and again through its directory, is loaded once.
    let again = PolicySet::load(&[dir.path().join("a.yaml"), dir.path().to_path_buf()]).unwrap();
    assert_eq!(again.workloads.len(), 2);
    assert_eq!(again.sources[0], dir.path().join("a.yaml"));

    // The revision covers the files' bytes in load order.
    use sha2::Digest;
    let mut all = doc("a.org", "wa", 1).into_bytes();
    all.extend(doc("b.org", "wb", 2).into_bytes());
    let digest: String = sha2::Sha256::digest(&all)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(set.revision, format!("sha256:{digest}"));
}

#[test]
fn load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = PolicySet::load(&[dir.path().to_path_buf()]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1:1: no policy files found — pass a .yaml/.yml file, or a directory that holds some",
            dir.path().display()
        )
    );
    let missing = dir.path().join("missing.yaml");
    let err = PolicySet::load(std::slice::from_ref(&missing)).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        err.to_string()
            .starts_with(&format!("{}:1:1: cannot read: ", missing.display())),
        "{err}"
    );
    // Errors of several files are all reported, in load order, one per line.
    std::fs::write(dir.path().join("a.yaml"), "kind: Policy\n").unwrap();
    std::fs::write(dir.path().join("b.yaml"), "kind: [\n").unwrap();
    let err = PolicySet::load(&[dir.path().to_path_buf()]).unwrap_err();
    let lines: Vec<String> = err.to_string().lines().map(String::from).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains("a.yaml:1:1: the document has no apiVersion"));
    assert!(lines[1].contains("a.yaml:1:1: the document has no spec"));
    assert!(lines[2].contains("b.yaml:"));
}

#[test]
fn every_shipped_policy_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    // Rego issuance modules and trusted issuers' JWKS files sit beside the policies that
    // name them.
    let (modules, files): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| f.extension().is_some_and(|e| e == "rego"));
    let (jwks, files): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| f.to_string_lossy().ends_with(".jwks.json"));
    for file in &files {
        let ext = file.extension().and_then(|e| e.to_str());
        assert!(
            matches!(ext, Some("yaml" | "yml")),
            "{} in policies/ is not a policy file",
            file.display()
        );
        if let Err(e) = PolicySet::load(std::slice::from_ref(file)) {
            panic!("{} does not load:\n{e}", file.display());
        }
    }
    // Together too, as `tessera check policies/` loads them.
    let all = PolicySet::load(&[dir]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.sources.len(), files.len());
    let named: Vec<&Path> = all.issuance.iter().map(|m| m.path.as_path()).collect();
    for module in &modules {
        assert!(
            named
                .iter()
                .any(|n| n.ends_with(module.file_name().unwrap())),
            "{} in policies/ is named by no policy",
            module.display()
        );
    }
    for file in &jwks {
        assert!(
            all.trusted_issuers
                .iter()
                .any(|t| t.jwks.ends_with(file.file_name().unwrap())),
            "{} in policies/ is the JWKS of no trusted issuer",
            file.display()
        );
    }
}

#[test]
fn demo_policy_is_what_the_demo_expects() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo.yaml");
    let set = PolicySet::load(&[file]).unwrap_or_else(|e| panic!("{e}"));
    let (agent, a) = set.workload_by_name("agent").unwrap();
    assert_eq!(a.spiffe_id.as_str(), "spiffe://demo.tessera.dev/agent");
    assert_eq!(a.selectors.cgroup.as_deref(), Some("/tessera-demo/agent"));
    let (intruder, i) = set.workload_by_name("intruder").unwrap();
    assert_eq!(
        i.selectors.cgroup.as_deref(),
        Some("/tessera-demo/intruder")
    );
    let (vault, v) = set.endpoint_by_name("vault").unwrap();
    assert_eq!(v.kind, EndpointKind::SecretStore);
    assert_eq!(v.addresses, vec![net("127.0.0.1/32"), net("::1/128")]);
    assert_eq!(
        (v.ports.as_slice(), v.protocol),
        (&[18200][..], Protocol::Tcp)
    );
    let (_, rule) = set.rule_for(agent, vault).unwrap();
    assert_eq!(rule.name, "agent-to-vault");
    assert_eq!(rule.mode, Mode::Enforce);
    assert_eq!(
        rule.credential,
        Some(CredentialPolicy {
            max_ttl: Duration::from_secs(300),
            bind: Bind::Process,
            keep_on_exec: false,
            connections: Default::default(),
        })
    );
    assert!(set.rule_for(intruder, vault).is_none());
}

#[test]
fn display_strings() {
    assert_eq!(Mode::Enforce.to_string(), "enforce");
    assert_eq!(Mode::Audit.to_string(), "audit");
    assert_eq!(Bind::Process.to_string(), "process");
    assert_eq!(Bind::ProcessTree.to_string(), "process-tree");
    assert_eq!(Bind::Workload.to_string(), "workload");
    assert_eq!(Protocol::Any.to_string(), "any");
    assert_eq!(EndpointKind::SecretStore.to_string(), "secret-store");
    assert_eq!(
        serde_json::to_string(&EndpointKind::SecretStore).unwrap(),
        "\"secret-store\""
    );
    let e = PolicyError {
        file: "policies/bad.yaml".into(),
        line: 14,
        column: 9,
        message: "unknown field `uuid` in workload match".into(),
        hint: "allowed: cgroup, uid".into(),
    };
    assert_eq!(
        e.to_string(),
        "policies/bad.yaml:14:9: unknown field `uuid` in workload match — allowed: cgroup, uid"
    );
    assert_eq!(
        PolicyErrors(vec![e.clone(), e]).to_string().lines().count(),
        2
    );
}
