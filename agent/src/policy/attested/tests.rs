//! `match_evidence` against `match_workload`, specificity across selectors, and exec
//! dependence.

use std::path::Path;

use crate::identity::evidence::{Evidence, Exe, ExeHash, Ids, cgroup};
use crate::policy::PolicySet;

const SHA: &str = "9f2c0000000000000000000000000000000000000000000000000000000000aa";

fn evidence(cgroup_path: &str, uid: u32) -> Evidence {
    let facts = cgroup::parse(cgroup_path);
    Evidence {
        pid: 42,
        comm: "python3".into(),
        uid: Ids {
            real: uid,
            effective: uid,
        },
        gid: Ids {
            real: 100,
            effective: 100,
        },
        groups: vec![],
        cgroup: cgroup_path.into(),
        systemd_units: facts.units,
        exe: Some(Exe {
            path: "/usr/bin/python3".into(),
            deleted: false,
            hash: ExeHash::Sha256 { sha256: SHA.into() },
        }),
        container: facts.container,
        pod: facts.pod,
        kubernetes: None,
    }
}

fn policy(workloads: &[&str]) -> PolicySet {
    let mut yaml = String::from(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: t.org\n  workloads:\n",
    );
    for (i, m) in workloads.iter().enumerate() {
        yaml.push_str(&format!("    - {{name: w{i}, match: {m}}}\n"));
    }
    PolicySet::from_str(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn name(set: &PolicySet, ev: &Evidence) -> Option<String> {
    set.match_evidence(ev)
        .map(|id| set.workload(id).name.clone())
}

#[test]
fn agrees_with_match_workload_for_cgroup_and_uid() {
    let set = policy(&[
        "{cgroup: /a}",
        "{cgroup: /a/b}",
        "{cgroup: /a/b, uid: 1000}",
        "{uid: 1000}",
        "{uid: 2000}",
        "{cgroup: /, uid: 3000}",
        "{cgroup: /c, uid: 1000}",
    ]);
    for path in [
        "/a/b/c", "/a/b", "/a", "/a/x", "/a/bc", "/c/d", "/z", "/", "/ab",
    ] {
        for uid in [0, 1000, 2000, 3000, 4000] {
            let ev = evidence(path, uid);
            assert_eq!(
                set.match_evidence(&ev),
                set.match_workload(path, uid),
                "{path} uid {uid}"
            );
        }
    }
}

#[test]
fn the_most_specific_matching_workload_wins() {
    let set = policy(&[
        "{cgroup: /system.slice}",
        "{systemdUnit: system.slice}",
        "{systemdUnit: worker@.service}",
        "{systemdUnit: worker@3.service, uid: 7}",
        "{exe: /usr/bin/python3, uid: 9}",
        &format!("{{exeSha256: {SHA}, uid: 9}}"),
        "{gid: 100}",
    ]);
    let unit = "/system.slice/system-worker.slice/worker@3.service";
    assert_eq!(name(&set, &evidence(unit, 0)).as_deref(), Some("w2"));
    assert_eq!(name(&set, &evidence(unit, 7)).as_deref(), Some("w3"));
    assert_eq!(name(&set, &evidence(unit, 9)).as_deref(), Some("w5"));
    assert_eq!(
        name(&set, &evidence("/system.slice/cron.service", 0)).as_deref(),
        Some("w1")
    );
    assert_eq!(name(&set, &evidence("/other", 0)).as_deref(), Some("w6"));
    let mut stranger = evidence("/other", 0);
    stranger.gid.real = 5;
    assert_eq!(name(&set, &stranger), None);
}

#[test]
fn attestation_and_exec_dependence() {
    let set = policy(&[
        "{cgroup: /a, uid: 1}",
        "{cgroup: /a, gid: 100}",
        "{cgroup: /b, exe: /usr/bin/env}",
        &format!("{{uid: 5, exeSha256: {SHA}}}"),
    ]);
    let flags: Vec<(bool, bool)> = set
        .workloads
        .iter()
        .map(|w| (w.needs_attestation(), w.uses_exe()))
        .collect();
    assert_eq!(
        flags,
        [(false, false), (true, false), (true, true), (true, true)]
    );
    // /b: w2's other selector (cgroup) holds, so an exec of /usr/bin/env would change the answer.
    assert!(set.depends_on_exe(&evidence("/b/x", 0)));
    assert!(set.depends_on_exe(&evidence("/z", 5)));
    assert!(!set.depends_on_exe(&evidence("/a", 1)));
    assert!(!set.depends_on_exe(&evidence("/z", 6)));
}
