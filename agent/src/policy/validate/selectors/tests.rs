//! Selector values: what is accepted (and how it is normalised), and each error's position,
//! message and hint.

use std::collections::BTreeMap;
use std::path::Path;

use crate::identity::selectors::{K8sSelectors, Selectors};
use crate::policy::PolicySet;
use crate::policy::validate::tests::{assert_errors, with_head};

/// One workload per `match:` flow mapping, named w0, w1, … (workload i is on line 7 + i).
fn workloads(matches: &[&str]) -> String {
    let mut yaml = String::from("  workloads:\n");
    for (i, m) in matches.iter().enumerate() {
        yaml.push_str(&format!("    - {{name: w{i}, match: {m}}}\n"));
    }
    with_head(&yaml)
}

fn selectors(matches: &[&str]) -> Vec<Selectors> {
    let set = PolicySet::from_str(Path::new("p.yaml"), &workloads(matches))
        .unwrap_or_else(|e| panic!("{e}"));
    set.workloads.into_iter().map(|w| w.selectors).collect()
}

#[test]
fn every_selector_is_accepted_and_normalised() {
    let sha = "9F2C".repeat(16);
    let cid = "3F1C9E0B5A7D4E2F";
    let got = selectors(&[&format!(
        "{{cgroup: /a, uid: 0, gid: 4294967294, systemdUnit: worker@.service, exe: /usr/bin/python3.12, exeSha256: {sha}, container: {cid}, k8s: {{namespace: payments, serviceAccount: api, podName: api-7d9f.x, containerName: server, podLabels: {{app.kubernetes.io/name: api, tier: ''}}}}}}"
    )]);
    let want = Selectors {
        cgroup: Some("/a".into()),
        uid: Some(0),
        gid: Some(4_294_967_294),
        systemd_unit: Some("worker@.service".into()),
        exe: Some("/usr/bin/python3.12".into()),
        exe_sha256: Some(sha.to_ascii_lowercase()),
        container: Some(cid.to_ascii_lowercase()),
        k8s: Some(K8sSelectors {
            namespace: Some("payments".into()),
            service_account: Some("api".into()),
            pod_name: Some("api-7d9f.x".into()),
            pod_labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "api".into()),
                ("tier".into(), String::new()),
            ]),
            container_name: Some("server".into()),
        }),
    };
    assert_eq!(got, vec![want]);
}

#[test]
fn systemd_unit_forms_that_are_accepted() {
    let units = [
        "payments.service",
        "getty@tty1.service",
        "getty@.service",
        "session-3.scope",
        "system.slice",
        "system-getty.slice",
        "-.slice",
        "dbus.socket",
        "home.mount",
        "dev-sda2.swap",
        r"system-serial\x2dgetty.slice",
    ];
    let matches: Vec<String> = units
        .iter()
        .map(|u| format!("{{systemdUnit: '{u}'}}"))
        .collect();
    let refs: Vec<&str> = matches.iter().map(String::as_str).collect();
    let got: Vec<Option<String>> = selectors(&refs)
        .into_iter()
        .map(|s| s.systemd_unit)
        .collect();
    let want: Vec<Option<String>> = units.iter().map(|u| Some((*u).to_owned())).collect();
    assert_eq!(got, want);
}

#[test]
fn systemd_unit_errors() {
    assert_errors(
        &workloads(&[
            "{systemdUnit: payments}",
            "{systemdUnit: multi-user.target}",
            "{systemdUnit: a.bogus}",
            "{systemdUnit: .service}",
            "{systemdUnit: '@x.service'}",
            "{systemdUnit: 'a@b@c.service'}",
            "{systemdUnit: 'a b.service'}",
            "{systemdUnit: 'user@.slice'}",
            "{systemdUnit: a--b.slice}",
            "{systemdUnit: ''}",
        ]),
        &[
            "p.yaml:7:39: systemdUnit `payments` has no unit type — write the full unit name, like payments.service (or .scope, .slice, .socket, .mount, .swap)",
            "p.yaml:8:39: systemdUnit `multi-user.target`: a .target unit has no processes of its own — name the unit whose processes should match, like the .service it starts",
            "p.yaml:9:39: systemdUnit `a.bogus` has the unknown unit type `.bogus` — use a .service, .scope, .slice, .socket, .mount or .swap unit",
            "p.yaml:10:39: systemdUnit `.service` has no name before `.service` — write the unit's name, like payments.service",
            "p.yaml:11:39: systemdUnit `@x.service` has no name before `.service` — write the unit's name, like payments.service",
            "p.yaml:12:39: systemdUnit `a@b@c.service` has more than one `@` — write a template (name@.service) or one instance of it (name@instance.service)",
            "p.yaml:13:39: systemdUnit `a b.service` has the character ' ' — unit names have letters, digits and `:_.-\\@`; escape other characters as systemd-escape does",
            "p.yaml:14:39: systemdUnit `user@.slice`: a slice has no templates or instances — remove the `@`, or name the service or scope",
            "p.yaml:15:39: systemdUnit `a--b.slice` is not a valid slice name — a slice's name is its parents' names and its own joined by `-`, like system-getty.slice; the root slice is -.slice",
            "p.yaml:16:39: systemdUnit is empty — write a unit name, like payments.service",
        ],
    );
}

#[test]
fn id_exe_hash_and_container_errors() {
    assert_errors(
        &workloads(&[
            "{gid: -1}",
            "{gid: 4294967295}",
            "{exe: python3}",
            "{exe: /usr/bin/}",
            "{exe: /usr//bin/python3}",
            "{exe: /usr/./bin/python3}",
            "{exe: /usr/../bin/python3}",
            "{exe: \"/usr/bin/py\\0\"}",
            "{exeSha256: abc}",
            "{exeSha256: sha256:0000000000000000000000000000000000000000000000000000000000000000}",
            "{exeSha256: 000000000000000000000000000000000000000000000000000000000000000g}",
            "{container: 3f1c9e0b5a7}",
            "{container: containerd://3f1c9e0b5a7d}",
            "{container: not-hex-at-all}",
            "{container: 3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f0}",
        ]),
        &[
            "p.yaml:7:31: gid -1 is out of range — use a gid from 0 to 4294967294",
            "p.yaml:8:31: gid 4294967295 is out of range — use a gid from 0 to 4294967294",
            "p.yaml:9:31: exe `python3` is not absolute — write the executable's full path, like /usr/bin/python3",
            "p.yaml:10:31: exe `/usr/bin/` ends with `/` — name the executable file, not a directory",
            "p.yaml:11:31: exe `/usr//bin/python3` has an empty segment (`//`) — write it normalised: /usr/bin/python3",
            "p.yaml:12:31: exe `/usr/./bin/python3` has a `.` segment — write it normalised: /usr/bin/python3",
            "p.yaml:13:31: exe `/usr/../bin/python3` has a `..` segment — write the path without `..`, as /proc/PID/exe shows it",
            "p.yaml:14:31: exe \"/usr/bin/py\\0\" has a NUL character — remove it",
            "p.yaml:15:37: exeSha256 `abc` is not 64 hex digits — write the executable's SHA-256 as `sha256sum /path/to/exe` prints it",
            "p.yaml:16:37: exeSha256 `sha256:0000000000000000000000000000000000000000000000000000000000000000` starts with `sha256:` — write the hex digits alone: 0000000000000000000000000000000000000000000000000000000000000000",
            "p.yaml:17:38: exeSha256 `000000000000000000000000000000000000000000000000000000000000000g` is not 64 hex digits — write the executable's SHA-256 as `sha256sum /path/to/exe` prints it",
            "p.yaml:18:38: container `3f1c9e0b5a7` is shorter than 12 hex digits — a prefix this short could name several containers; write at least 12 digits of the ID",
            "p.yaml:19:38: container `containerd://3f1c9e0b5a7d` starts with the runtime `containerd://` — write the ID alone: 3f1c9e0b5a7d",
            "p.yaml:20:38: container `not-hex-at-all` is not a container ID (hex digits) — write the ID as `docker ps --no-trunc`, `podman ps --no-trunc` or `crictl ps` shows it, or a prefix of at least 12 digits",
            "p.yaml:21:38: container `3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f0` is longer than 64 hex digits — a container ID has 64 hex digits; check the value",
        ],
    );
}

#[test]
fn kubernetes_selector_errors() {
    assert_errors(
        &workloads(&[
            "{k8s: {}}",
            "{k8s: {podLabels: {}}}",
            "{k8s: {namespace: Payments}}",
            "{k8s: {serviceAccount: 'api..x', podName: -pod}}",
            "{k8s: {containerName: server.main}}",
            "{k8s: {podLabels: {'Example.com/app': x, 'app': 'not ok', 'a/b/c': y}}}",
        ]),
        &[
            "p.yaml:7:31: k8s has no selector — add at least one of namespace, serviceAccount, podName, podLabels, containerName, or remove k8s",
            "p.yaml:8:43: k8s.podLabels is empty — add labels the pod must have (app: payments), or remove podLabels",
            "p.yaml:9:43: k8s.namespace `Payments` is not valid: it has the character 'P' — a namespace is a DNS-1123 label: at most 63 lower-case letters, digits and `-`, starting and ending with a letter or digit",
            "p.yaml:10:48: k8s.serviceAccount `api..x` is not valid: it is empty, or has an empty `.`-separated part — a serviceAccount is a DNS-1123 subdomain: at most 253 characters, lower-case letters, digits, `-` and `.`, each `.`-separated part starting and ending with a letter or digit",
            "p.yaml:10:67: k8s.podName `-pod` is not valid: it starts or ends with `-` — a podName is a DNS-1123 subdomain: at most 253 characters, lower-case letters, digits, `-` and `.`, each `.`-separated part starting and ending with a letter or digit",
            "p.yaml:11:47: k8s.containerName `server.main` is not valid: it has the character '.' — a containerName is a DNS-1123 label: at most 63 lower-case letters, digits and `-`, starting and ending with a letter or digit",
            "p.yaml:12:63: k8s.podLabels key `Example.com/app` is not valid: its prefix `Example.com`: it has the character 'E' — a label key is a name of at most 63 letters, digits, `-`, `_` and `.` (starting and ending with a letter or digit), optionally after a DNS subdomain prefix and `/`, like app.kubernetes.io/name",
            "p.yaml:12:73: k8s.podLabels.app value `not ok` is not valid: it has the character ' ' — a label value has at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
            "p.yaml:12:92: k8s.podLabels key `a/b/c` is not valid: it has more than one `/` — a label key is a name of at most 63 letters, digits, `-`, `_` and `.` (starting and ending with a letter or digit), optionally after a DNS subdomain prefix and `/`, like app.kubernetes.io/name",
        ],
    );
    // An unknown key makes the whole document unreadable, so it is alone here.
    assert_errors(
        &workloads(&["{k8s: {pod: x}}"]),
        &[
            "p.yaml:7:32: unknown field `pod` in k8s selector — allowed: namespace, serviceAccount, podName, podLabels, containerName",
        ],
    );
}

#[test]
fn an_empty_match_is_an_error() {
    assert_errors(
        &workloads(&["{}"]),
        &[
            "p.yaml:7:25: match has no selector — add at least one of cgroup, uid, gid, systemdUnit, exe, exeSha256, container, k8s",
        ],
    );
}
