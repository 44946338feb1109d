use std::path::PathBuf;

use super::*;
use crate::policy::PolicySet;

fn module(rego: &str) -> (tempfile::TempDir, PolicySet) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.rego"), rego).unwrap();
    let policy: PathBuf = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: example.org\n  \
         issuance: { rego: m.rego }\n  workloads:\n    - name: a\n      match: { uid: 4242 }\n  \
         endpoints:\n    - name: vault\n      addresses: [127.0.0.1]\n  rules:\n    - name: r\n      \
         workloads: [a]\n      endpoints: [vault]\n      credential: { required: true, maxTtl: 5m }\n      \
         scopes: [read, write]\n",
    )
    .unwrap();
    let set = PolicySet::load(&[policy]).unwrap();
    (dir, set)
}

fn input<'a>(set: &'a PolicySet, scopes: &'a [String], ev: &'a Evidence) -> Input<'a> {
    let workload = &set.workloads[0];
    let endpoint = &set.endpoints[0];
    let rule = &set.rules[0];
    Input {
        workload: WorkloadInput {
            name: &workload.name,
            spiffe_id: workload.spiffe_id.to_string(),
            evidence: EvidenceInput::of(ev),
        },
        endpoint: EndpointInput {
            name: &endpoint.name,
            kind: endpoint.kind.as_str(),
            labels: &endpoint.labels,
        },
        rule: RuleInput {
            name: &rule.name,
            max_ttl_seconds: 300,
            bind: "process",
            scopes: &rule.scopes,
        },
        request: RequestInput {
            audience: "vault",
            task: Some("job-1"),
            ttl_seconds: 300,
            scopes,
            scopes_requested: false,
            on_behalf_of: None,
            evidence_tokens: &[],
            parent: None,
        },
        time: TimeInput::of(UNIX_EPOCH + std::time::Duration::from_secs(1_796_378_400)),
        history: History::default(),
    }
}

fn evidence() -> Evidence {
    crate::identity::evidence::EvidenceReader::default()
        .read_pid(std::process::id())
        .expect("own evidence")
}

#[test]
fn scopes_default_to_the_rules_and_unknown_ones_are_named() {
    let (_dir, set) = module("package t\ndecision := {\"allow\": true}\n");
    let rule = &set.rules[0];
    assert_eq!(requested_scopes(rule, None).unwrap(), ["read", "write"]);
    let asked = ["write".to_owned(), "write".to_owned()];
    assert_eq!(requested_scopes(rule, Some(&asked)).unwrap(), ["write"]);
    let asked = ["read".to_owned(), "admin".to_owned()];
    assert_eq!(requested_scopes(rule, Some(&asked)).unwrap_err(), ["admin"]);
}

#[test]
fn the_module_narrows_and_may_not_widen() {
    let ev = evidence();
    let scopes = ["read".to_owned(), "write".to_owned()];
    let (_dir, set) = module(
        "package t\ndecision := {\"allow\": true, \"ttl_seconds\": 60, \"scopes\": [\"read\"], \
         \"reasons\": [input.endpoint.name]}\n",
    );
    let grant = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap();
    assert_eq!(
        grant,
        Grant {
            ttl_seconds: 60,
            scopes: vec!["read".to_owned()],
            reasons: vec!["vault".to_owned()],
        }
    );

    let (_dir, set) = module("package t\ndecision := {\"allow\": true, \"ttl_seconds\": 301}\n");
    let verdict = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap_err();
    assert!(
        matches!(verdict, Verdict::Failed("invalid_result", _)),
        "{verdict:?}"
    );

    let (_dir, set) = module("package t\ndecision := {\"allow\": true, \"scopes\": [\"admin\"]}\n");
    let verdict = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap_err();
    assert!(
        matches!(verdict, Verdict::Failed("invalid_result", _)),
        "{verdict:?}"
    );

    let (_dir, set) = module("package t\ndecision := {\"allow\": true, \"ttl\": 5}\n");
    let verdict = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap_err();
    assert!(
        matches!(verdict, Verdict::Failed("invalid_result", _)),
        "{verdict:?}"
    );
}

#[test]
fn deny_undefined_and_errors_are_refusals() {
    let ev = evidence();
    let scopes = ["read".to_owned()];
    let (_dir, set) = module(
        "package t\ndecision := {\"allow\": false, \"reasons\": [sprintf(\"uid %d\", [input.workload.evidence.uid])]}\n",
    );
    let verdict = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap_err();
    assert_eq!(
        verdict,
        Verdict::Denied(vec![format!("uid {}", ev.uid.real)])
    );

    let (_dir, set) = module("package t\ndecision := {\"allow\": true} if input.nothing\n");
    let verdict = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap_err();
    assert!(
        matches!(verdict, Verdict::Failed("undefined", _)),
        "{verdict:?}"
    );

    // Two values for one rule: an evaluation error.
    let (_dir, set) = module(
        "package t\ndecision := {\"allow\": true} if true\ndecision := {\"allow\": false} if true\n",
    );
    let verdict = ask(&set.issuance[0], &input(&set, &scopes, &ev)).unwrap_err();
    assert!(
        matches!(verdict, Verdict::Failed("error", _)),
        "{verdict:?}"
    );
}

#[test]
fn history_counts_the_last_minute_and_lists_the_active() {
    let now = SystemTime::now();
    let info = |jti: &str, age: u64, ttl: u64, revoked: bool| CredentialInfo {
        credential_id: 1,
        jti: jti.to_owned(),
        spiffe_id: "spiffe://example.org/a".parse().unwrap(),
        workload: crate::policy::WorkloadId(0),
        audience: "vault".to_owned(),
        endpoint: crate::policy::EndpointId(0),
        task: "t".to_owned(),
        pid: 1,
        issued_at: now - std::time::Duration::from_secs(age),
        expires_at: now - std::time::Duration::from_secs(age) + std::time::Duration::from_secs(ttl),
        bind: crate::policy::Bind::Process,
        revoked,
    };
    let history = History::of(
        &[
            info("old-expired", 120, 30, false),
            info("recent-revoked", 10, 300, true),
            info("recent-active", 5, 300, false),
            info("old-active", 90, 300, false),
        ],
        now,
    );
    assert_eq!(history.issued_last_minute, 2);
    let active: Vec<&str> = history.active.iter().map(|c| c.jti.as_str()).collect();
    assert_eq!(active, ["old-active", "recent-active"]);
}
