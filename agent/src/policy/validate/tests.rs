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
            "p.yaml:10:9: unknown field `uuid` in workload match — allowed: cgroup, uid (gid, systemdUnit, exe, exeSha256, container, k8s are not supported yet)",
        ],
    );
    assert_errors(
        &with_head("  workload: []\n"),
        &[
            "p.yaml:6:3: unknown field `workload` in spec — allowed: trustDomain, mode, workloads, endpoints, rules",
        ],
    );
    assert_errors(
        &with_head("  endpoints:\n    - name: e\n      addresses: [10.0.0.1]\n      port: [80]\n"),
        &[
            "p.yaml:9:7: unknown field `port` in endpoint — allowed: name, kind, addresses, hosts, ports, protocol",
        ],
    );
    assert_errors(
        &with_head("  rules:\n    - name: r\n      credential: {required: true, ttl: 5m}\n"),
        &["p.yaml:8:36: unknown field `ttl` in rule credential — allowed: required, maxTtl, bind"],
    );
}

#[test]
fn unsupported_selectors_are_refused() {
    let yaml = with_head(
        "  workloads:
    - name: a
      match:
        cgroup: /a
        gid: 10
        systemdUnit: a.service
        exe: /bin/a
        exeSha256: abc
        container: c
        k8s: {namespace: n}
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:10:14: selector `gid` is not supported yet — select the workload by cgroup and/or uid, and remove gid",
            "p.yaml:11:22: selector `systemdUnit` is not supported yet — select the workload by cgroup and/or uid, and remove systemdUnit",
            "p.yaml:12:14: selector `exe` is not supported yet — select the workload by cgroup and/or uid, and remove exe",
            "p.yaml:13:20: selector `exeSha256` is not supported yet — select the workload by cgroup and/or uid, and remove exeSha256",
            "p.yaml:14:20: selector `container` is not supported yet — select the workload by cgroup and/or uid, and remove container",
            "p.yaml:15:14: selector `k8s` is not supported yet — select the workload by cgroup and/or uid, and remove k8s",
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
            "p.yaml:11:7: workload `nomatch` has no match — add match: with a cgroup (e.g. cgroup: /my-service) and/or a uid",
            "p.yaml:13:14: match has no selector — add cgroup: /path/of/the/cgroup and/or uid: N",
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
",
    );
    assert_errors(
        &yaml,
        &[
            "p.yaml:9:7: workload `c` is ambiguous: workload `a` (p.yaml:7:7) has the same selectors — a process must map to one workload; change the cgroup or uid of one of them",
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
