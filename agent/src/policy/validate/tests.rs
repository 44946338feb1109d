//! Tests of validation errors, each with its position and message (endpoint and rule errors
//! are tested in their modules), and the helpers those tests share.

use std::path::Path;

use crate::policy::PolicySet;

/// The errors for `yaml` loaded as `p.yaml`, one string each, as `tessera check` prints them.
pub(super) fn errors(yaml: &str) -> Vec<String> {
    match PolicySet::from_str(Path::new("p.yaml"), yaml) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// The document header every test starts with (5 lines; `spec:` is line 4).
const HEAD: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {name: t}
spec:
  trustDomain: example.org
";

pub(super) fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[track_caller]
pub(super) fn assert_errors(yaml: &str, want: &[&str]) {
    assert_eq!(errors(yaml), want, "yaml:\n{yaml}");
}

#[test]
fn yaml_syntax_error_has_its_position() {
    assert_errors(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  workloads: [\n    {name: a\n",
        &[
            "p.yaml:5:5: unclosed bracket '{' — fix the YAML here (check indentation, quotes and brackets)",
        ],
    );
}

#[test]
fn header_errors() {
    assert_errors(
        "apiVersion: tessera.dev/v1\nkind: Polizy\nspec:\n  trustDomain: example.org\n",
        &[
            "p.yaml:1:13: apiVersion is `tessera.dev/v1` — this version reads apiVersion: tessera.dev/v1alpha1",
            "p.yaml:2:7: kind is `Polizy` — this version reads kind: Policy",
        ],
    );
    assert_errors(
        "kind: Policy\nmetadata: {name: ''}\n",
        &[
            "p.yaml:1:1: the document has no apiVersion — add apiVersion: tessera.dev/v1alpha1",
            "p.yaml:1:1: the document has no spec — add spec: with trustDomain, workloads, endpoints and rules",
            "p.yaml:2:18: metadata.name is empty — give the document a name or remove metadata.name",
        ],
    );
}

#[test]
fn unknown_fields_name_the_key_and_the_allowed_ones() {
    let yaml = with_head(
        "  workloads:
    - name: a
      match:
        cgroup: /a
        uuid: 3
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:10:9: unknown field `uuid` in workload match — allowed: cgroup, uid, gid, systemdUnit, exe, exeSha256, container, k8s",
        ],
    );
    assert_errors(
        &with_head("  workload: []\n"),
        &[
            "p.yaml:6:3: unknown field `workload` in spec — allowed: trustDomain, mode, workloads, endpoints, rules, issuance, trustedIssuers",
        ],
    );
    assert_errors(
        &with_head("  endpoints:\n    - name: e\n      addresses: [10.0.0.1]\n      port: [80]\n"),
        &[
            "p.yaml:9:7: unknown field `port` in endpoint — allowed: name, kind, addresses, hosts, audiences, ports, protocol, labels",
        ],
    );
    assert_errors(
        &with_head("  rules:\n    - name: r\n      credential: {required: true, ttl: 5m}\n"),
        &[
            "p.yaml:8:36: unknown field `ttl` in rule credential — allowed: required, maxTtl, bind, keepOnExec",
        ],
    );
}

#[test]
fn trust_domain_and_spiffe_id_errors() {
    assert_errors(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: Example.org\n",
        &[
            "p.yaml:4:16: invalid trustDomain `Example.org`: trust domain has the character 'E'; only lower-case letters, digits, `.`, `-` and `_` are allowed — write a lower-case DNS-like name such as example.org",
        ],
    );
    assert_errors(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  workloads: []\n",
        &[
            "p.yaml:4:3: spec has no trustDomain — add trustDomain: example.org (the trust domain of the workloads' SPIFFE IDs)",
        ],
    );
    let yaml = with_head(
        "  workloads:
    - name: a
      spiffeId: spiffe://other.org/a
      match: {uid: 1}
    - name: b
      spiffeId: spiffe://example.org/b/
      match: {uid: 2}
    - name: c
      spiffeId: spiffe://example.org
      match: {uid: 3}
    - name: d
      spiffeId: spiffe://example.org/same
      match: {uid: 4}
    - name: e
      spiffeId: spiffe://example.org/same
      match: {uid: 5}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:8:17: spiffeId `spiffe://other.org/a` is in trust domain `other.org`, not the document's `example.org` — use spiffe://example.org/a, or put the workload in a document with trustDomain: other.org",
            "p.yaml:11:17: invalid spiffeId `spiffe://example.org/b/`: path has an empty segment (`//` or a trailing `/`) — write spiffe://<trust domain>/<path>, like spiffe://example.org/agents/payments",
            "p.yaml:14:17: spiffeId `spiffe://example.org` names the trust domain, not a workload — add a path, like spiffe://example.org/my-workload",
            "p.yaml:19:7: workload `e` has the SPIFFE ID spiffe://example.org/same of workload `d` (p.yaml:16:7) — give each workload its own spiffeId",
        ],
    );
}

#[test]
fn workload_errors() {
    let yaml = with_head(
        "  workloads:
    - spiffeId: spiffe://example.org/x
      match: {uid: 1}
    - name: 'bad name'
      match: {uid: 2}
    - name: nomatch
    - name: empty-match
      match: {}
    - name: uid-range
      match: {uid: -1}
    - name: uid-any
      match: {uid: 4294967295}
    - name: dup
      match: {uid: 7}
    - name: dup
      match: {uid: 8}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:7:7: workload has no name — add name: my-workload",
            "p.yaml:9:13: invalid workload name `bad name` — use letters, digits, `.`, `-` and `_`, starting with a letter or digit, at most 128 characters",
            "p.yaml:11:7: workload `nomatch` has no match — add match: with at least one selector, like cgroup: /my-service, uid: 1001 or systemdUnit: my.service",
            "p.yaml:13:14: match has no selector — add at least one of cgroup, uid, gid, systemdUnit, exe, exeSha256, container, k8s",
            "p.yaml:15:20: uid -1 is out of range — use a uid from 0 to 4294967294",
            "p.yaml:17:20: uid 4294967295 is out of range — use a uid from 0 to 4294967294",
            "p.yaml:20:7: workload name `dup` is already used at p.yaml:18:7 — workload names must be unique across all policy files; rename one",
        ],
    );
}

#[test]
fn cgroup_errors() {
    let yaml = with_head(
        "  workloads:
    - {name: a, match: {cgroup: relative/path}}
    - {name: b, match: {cgroup: /a//b}}
    - {name: c, match: {cgroup: /a/b/}}
    - {name: d, match: {cgroup: /a/../b}}
    - {name: e, match: {cgroup: /a/./b}}
    - {name: f, match: {cgroup: /}}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:7:33: cgroup `relative/path` is not absolute — write it from the cgroup v2 root: /relative/path",
            "p.yaml:8:33: cgroup `/a//b` has an empty segment (`//`) — write it normalised: /a/b",
            "p.yaml:9:33: cgroup `/a/b/` ends with `/` — write it normalised: /a/b",
            "p.yaml:10:33: cgroup `/a/../b` has a `..` segment — write the path without `..`",
            "p.yaml:11:33: cgroup `/a/./b` has a `.` segment — write it normalised: /a/b",
        ],
    );
}

#[test]
fn ambiguous_workloads() {
    let yaml = with_head(
        "  workloads:
    - {name: a, match: {cgroup: /x, uid: 1}}
    - {name: b, match: {cgroup: /x}}
    - {name: c, match: {cgroup: /x, uid: 1}}
    - {name: d, match: {cgroup: /y, uid: 1}}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:9:24: workload `c` is ambiguous: workload `a` (p.yaml:7:24) has the same selectors — a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
        ],
    );
}

/// Equal specificity and no selector both set with values that exclude each other: one
/// process could match both (two gids can: one primary, one supplementary). Different values,
/// or different specificity, are fine (e1 has a
/// uid, which ranks above e2's gid; an instance ranks above its template, a unit above a
/// slice, a deeper slice above a shallower one).
#[test]
fn overlapping_selectors_of_equal_specificity_are_ambiguous() {
    let cid = "3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
    let yaml = with_head(&format!(
        "  workloads:
    - {{name: c1, match: {{container: {cid}}}}}
    - {{name: c2, match: {{container: 3f1c9e0b5a7d}}}}
    - {{name: c3, match: {{container: 3f1c9e0b5a7e}}}}
    - {{name: k1, match: {{k8s: {{containerName: server}}}}}}
    - {{name: l1, match: {{k8s: {{podLabels: {{app: api}}}}}}}}
    - {{name: l2, match: {{k8s: {{podLabels: {{tier: web}}}}}}}}
    - {{name: l3, match: {{k8s: {{podLabels: {{app: web}}}}}}}}
    - {{name: l4, match: {{k8s: {{podLabels: {{app: api, tier: db}}}}}}}}
    - {{name: l5, match: {{k8s: {{podLabels: {{app: web, tier: web}}}}}}}}
    - {{name: u1, match: {{systemdUnit: getty@.service}}}}
    - {{name: u2, match: {{systemdUnit: getty@tty1.service}}}}
    - {{name: u3, match: {{systemdUnit: system.slice}}}}
    - {{name: u4, match: {{systemdUnit: system-getty.slice}}}}
    - {{name: g1, match: {{uid: 5, gid: 5}}}}
    - {{name: g2, match: {{uid: 5, gid: 6}}}}
    - {{name: e1, match: {{exe: /bin/a, uid: 5}}}}
    - {{name: e2, match: {{exe: /bin/a, gid: 6}}}}
    - {{name: l6, match: {{k8s: {{podLabels: {{app: api, zone: x}}}}}}}}
"
    ));
    assert_errors(
        &yaml,
        &[
            "p.yaml:8:25: workload `c2` is ambiguous: workload `c1` (p.yaml:7:25) can match the same processes, and neither is more specific — a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
            "p.yaml:10:25: workload `k1` is ambiguous: workload `c1` (p.yaml:7:25) can match the same processes, and neither is more specific — a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
            "p.yaml:12:25: workload `l2` is ambiguous: workload `l1` (p.yaml:11:25) can match the same processes, and neither is more specific — a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
            "p.yaml:21:25: workload `g2` is ambiguous: workload `g1` (p.yaml:20:25) can match the same processes, and neither is more specific — a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
            "p.yaml:24:25: workload `l6` is ambiguous: workload `l4` (p.yaml:14:25) can match the same processes, and neither is more specific — a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
        ],
    );
}

#[test]
fn type_errors_and_duplicate_keys_are_reported_per_document() {
    let yaml = with_head(
        "  workloads:
    - {name: a, match: {uid: abc}}
---
apiVersion: tessera.dev/v1alpha1
apiVersion: tessera.dev/v1alpha1
---
apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads: {name: a}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:7:30: expected a whole number — write a whole number here",
            "p.yaml:10:1: duplicate key `apiVersion` — keep only one of them",
            "p.yaml:16:14: expected a list — write a list here",
        ],
    );
}

#[test]
fn empty_file_is_an_error() {
    assert_errors(
        "# nothing here\n",
        &[
            "p.yaml:1:1: the file holds no policy document — add a document with apiVersion: tessera.dev/v1alpha1 and kind: Policy, or remove the file",
        ],
    );
}
