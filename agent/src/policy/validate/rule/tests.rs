//! Rule errors: references, credential terms and overlaps.

use crate::policy::Bind;
use crate::policy::validate::tests::{assert_errors, with_head};

#[test]
fn rule_reference_errors() {
    let yaml = "apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads:
    - {name: w1, match: {uid: 1}}
    - {name: broken, match: {uid: -5}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
---
apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads:
    - {name: w2, match: {uid: 2}}
  rules:
    - name: r1
      workloads: [w2, w1, nobody, w2]
      endpoints: [e1]
    - name: r2
      workloads: []
    - {name: r3, workloads: [w2]}
---
apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads:
    - {name: w3, match: {uid: 3}}
  endpoints:
    - {name: e3, addresses: [10.0.0.3]}
  rules:
    - {name: r4, workloads: [broken], endpoints: [e3]}
";
    assert_errors(
        yaml,
        &[
            "p.yaml:7:35: uid -5 is out of range — use a uid from 0 to 4294967294",
            "p.yaml:19:23: workload `w1` is defined in another document (p.yaml:6:7) — a rule may only name workloads of its own document; move the rule there",
            "p.yaml:19:27: unknown workload `nobody` — workloads of this document: w2",
            "p.yaml:19:35: workload `w2` is listed twice — list each name once",
            "p.yaml:20:19: endpoint `e1` is defined in another document (p.yaml:9:7) — a rule may only name endpoints of its own document; move the rule there",
            "p.yaml:21:7: rule has no endpoints — add endpoints: [name, ...] naming endpoints of this document",
            "p.yaml:22:18: workloads is empty — name at least one workload of this document",
            "p.yaml:23:7: rule has no endpoints — add endpoints: [name, ...] naming endpoints of this document",
            "p.yaml:34:30: unknown workload `broken` — workloads of this document: w3",
        ],
    );
}

#[test]
fn credential_errors() {
    let yaml = with_head(
        "  workloads:
    - {name: w, match: {uid: 1}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
    - {name: e2, addresses: [10.0.0.2]}
    - {name: e3, addresses: [10.0.0.3]}
    - {name: e4, addresses: [10.0.0.4]}
    - {name: e5, addresses: [10.0.0.5]}
    - {name: e6, addresses: [10.0.0.6]}
    - {name: e7, addresses: [10.0.0.7]}
  rules:
    - {name: r1, workloads: [w], endpoints: [e1], credential: {maxTtl: 5m}}
    - {name: r2, workloads: [w], endpoints: [e2], credential: {required: true}}
    - {name: r3, workloads: [w], endpoints: [e3], credential: {required: true, maxTtl: 0s}}
    - {name: r4, workloads: [w], endpoints: [e4], credential: {required: true, maxTtl: 25h}}
    - {name: r5, workloads: [w], endpoints: [e5], credential: {required: true, maxTtl: 300}}
    - {name: r6, workloads: [w], endpoints: [e6], credential: {required: true, maxTtl: 5m, bind: process-tree}}
    - {name: r7, workloads: [w], endpoints: [e7], credential: {required: false, bind: workload}, mode: dryrun}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:17:63: credential has no `required` — add required: true (with maxTtl) or required: false (allowlisted, no credential)",
            "p.yaml:18:63: credential with required: true has no maxTtl — add maxTtl: 10m (the longest lifetime of a credential, at most 24h)",
            "p.yaml:19:88: maxTtl is zero — use a positive duration, like 10m",
            "p.yaml:20:88: maxTtl `25h` is longer than 24h — use at most 24h; credentials are meant to be short-lived",
            "p.yaml:21:88: maxTtl `300` is not a duration (time unit needed, for example 300sec or 300ms) — write a duration with a unit, like 90s, 10m or 1h",
            "p.yaml:23:87: `bind` has no effect when required is false — remove bind, or set required: true",
            "p.yaml:23:104: unknown mode `dryrun` — use enforce or audit",
        ],
    );
}

#[test]
fn process_tree_and_keep_on_exec() {
    let yaml = with_head(
            "  workloads:
    - {name: w, match: {uid: 1}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
    - {name: e2, addresses: [10.0.0.2]}
    - {name: e3, addresses: [10.0.0.3]}
    - {name: e4, addresses: [10.0.0.4]}
  rules:
    - {name: r1, workloads: [w], endpoints: [e1], credential: {required: true, maxTtl: 5m, bind: process-tree}}
    - {name: r2, workloads: [w], endpoints: [e2], credential: {required: true, maxTtl: 5m, keepOnExec: true}}
    - {name: r3, workloads: [w], endpoints: [e3], credential: {required: true, maxTtl: 5m, bind: workload, keepOnExec: false}}
    - {name: r4, workloads: [w], endpoints: [e4], credential: {required: true, maxTtl: 5m, bind: process, keepOnExec: true}}
",
        );
    let set = crate::policy::PolicySet::from_str(std::path::Path::new("p.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}"));
    let terms: Vec<(Bind, bool)> = set
        .rules
        .iter()
        .map(|r| {
            let c = r.credential.expect("a credential");
            (c.bind, c.keep_on_exec)
        })
        .collect();
    assert_eq!(
        terms,
        [
            (Bind::ProcessTree, false),
            (Bind::Process, true),
            (Bind::Workload, false),
            (Bind::Process, true)
        ]
    );
    let yaml = with_head(
            "  workloads:
    - {name: w, match: {uid: 1}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
    - {name: e2, addresses: [10.0.0.2]}
    - {name: e3, addresses: [10.0.0.3]}
  rules:
    - {name: r1, workloads: [w], endpoints: [e1], credential: {required: true, maxTtl: 5m, bind: process-tree, keepOnExec: true}}
    - {name: r2, workloads: [w], endpoints: [e2], credential: {required: true, maxTtl: 5m, bind: workload, keepOnExec: true}}
    - {name: r3, workloads: [w], endpoints: [e3], credential: {required: false, keepOnExec: true}}
",
        );
    assert_errors(
        &yaml,
        &[
            "p.yaml:13:124: keepOnExec applies to bind: process, not bind: process-tree — remove keepOnExec, or use bind: process",
            "p.yaml:14:120: keepOnExec applies to bind: process, not bind: workload — remove keepOnExec, or use bind: process",
            "p.yaml:15:93: `keepOnExec` has no effect when required is false — remove keepOnExec, or set required: true",
        ],
    );
}

#[test]
fn overlapping_rules_and_duplicate_rule_names() {
    let yaml = with_head(
        "  workloads:
    - {name: w1, match: {uid: 1}}
    - {name: w2, match: {uid: 2}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
    - {name: e2, addresses: [10.0.0.2]}
  rules:
    - {name: first, workloads: [w1, w2], endpoints: [e1]}
    - {name: second, workloads: [w2], endpoints: [e2, e1]}
    - {name: first, workloads: [w1], endpoints: [e2]}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:14:7: rules `first` (p.yaml:13:7) and `second` both cover workload `w2` -> endpoint `e1` — one rule per (workload, endpoint) pair; remove the pair from one of them",
            "p.yaml:15:7: rule name `first` is already used at p.yaml:13:7 — rule names must be unique across all policy files; rename one",
        ],
    );
}

#[test]
fn connections_default_outlive_and_errors() {
    use crate::policy::{ConnectionLifetime, PolicySet};
    let yaml = with_head(
        "  workloads: [{name: w, match: {uid: 1}}]
  endpoints: [{name: e, addresses: [10.0.0.1]}, {name: f, addresses: [10.0.0.2]}]
  rules:
    - {name: r1, workloads: [w], endpoints: [e], credential: {required: true, maxTtl: 1m}}
    - name: r2
      workloads: [w]
      endpoints: [f]
      credential: {required: true, maxTtl: 1m}
      connections: outlive
",
    );
    let set = PolicySet::from_str(std::path::Path::new("p.yaml"), &yaml).expect("valid");
    let lifetimes: Vec<_> = set
        .rules
        .iter()
        .map(|r| r.credential.expect("credential").connections)
        .collect();
    assert_eq!(
        lifetimes,
        [
            ConnectionLifetime::EndWithCredential,
            ConnectionLifetime::Outlive
        ]
    );
    assert_errors(
        &with_head(
            "  workloads: [{name: w, match: {uid: 1}}]
  endpoints: [{name: e, addresses: [10.0.0.1]}, {name: f, addresses: [10.0.0.2]}]
  rules:
    - {name: r1, workloads: [w], endpoints: [e], credential: {required: true, maxTtl: 1m}, connections: forever}
    - {name: r2, workloads: [w], endpoints: [f], connections: outlive}
",
        ),
        &[
            "p.yaml:9:105: unknown connections `forever` — use end-with-credential (the default: a connection ends with its credential) or outlive",
            "p.yaml:10:63: `connections` has no effect on a rule that requires no credential — remove connections, or set credential: {required: true, maxTtl: ...}",
        ],
    );
}
