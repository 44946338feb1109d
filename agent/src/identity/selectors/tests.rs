use super::*;
use crate::identity::evidence::{ContainerRef, ContainerRuntime, Exe, ExeHash, Ids, cgroup};
use crate::identity::k8s::{PodContainer, PodMetadata};

const CID: &str = "3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const SHA: &str = "9f2c0000000000000000000000000000000000000000000000000000000000aa";

fn evidence(cgroup_path: &str) -> Evidence {
    let facts = cgroup::parse(cgroup_path);
    Evidence {
        pid: 42,
        comm: "python3".into(),
        uid: Ids {
            real: 1001,
            effective: 0,
        },
        gid: Ids {
            real: 1002,
            effective: 1002,
        },
        groups: vec![4],
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

fn pod_evidence() -> Evidence {
    let mut ev = evidence(&format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8b2e6c1a_3d4f_4a5b_9c8d_7e6f5a4b3c2d.slice/cri-containerd-{CID}.scope"
    ));
    ev.kubernetes = Some(PodMetadata {
        uid: "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d".into(),
        namespace: "payments".into(),
        name: "api-7d9f".into(),
        service_account: "api".into(),
        labels: [("app".to_owned(), "api".to_owned())].into(),
        containers: vec![PodContainer {
            name: "server".into(),
            id: Some(CID.into()),
        }],
    });
    ev
}

fn report(s: &Selectors, ev: &Evidence) -> Vec<(String, Option<String>, bool)> {
    s.match_report(ev)
        .into_iter()
        .map(|r| (r.selector, r.actual, r.matched))
        .collect()
}

#[test]
fn each_selector_reports_expected_actual_and_match() {
    let ev = evidence("/system.slice/system-worker.slice/worker@3.service");
    let s = Selectors {
        cgroup: Some("/system.slice".into()),
        uid: Some(1001),
        gid: Some(7),
        systemd_unit: Some("worker@.service".into()),
        exe: Some("/usr/bin/python3".into()),
        exe_sha256: Some(SHA.to_uppercase()),
        container: Some("3f1c9e0b5a7d".into()),
        k8s: None,
    };
    let got = report(&s, &ev);
    let want: Vec<(String, Option<String>, bool)> = vec![
        (
            "cgroup".into(),
            Some("/system.slice/system-worker.slice/worker@3.service".into()),
            true,
        ),
        ("uid".into(), Some("1001".into()), true),
        ("gid".into(), Some("1002 (groups 4)".into()), false),
        ("systemdUnit".into(), Some("worker@3.service".into()), true),
        ("exe".into(), Some("/usr/bin/python3".into()), true),
        ("exeSha256".into(), Some(SHA.into()), true),
        ("container".into(), None, false),
    ];
    assert_eq!(got, want);
    assert!(!s.matches(&ev));
    assert_eq!(s.match_report(&ev)[2].expected, "7");
}

#[test]
fn cgroup_matches_the_subtree_only() {
    let ev = evidence("/tessera-demo/payments/worker");
    let cases = [
        ("/", true),
        ("/tessera-demo", true),
        ("/tessera-demo/payments", true),
        ("/tessera-demo/payments/worker", true),
        ("/tessera-demo/pay", false),
        ("/tessera-demo/payments/worker/x", false),
        ("/other", false),
    ];
    for (cgroup, want) in cases {
        let s = Selectors {
            cgroup: Some(cgroup.into()),
            ..Selectors::default()
        };
        assert_eq!(s.matches(&ev), want, "{cgroup}");
    }
}

#[test]
fn systemd_unit_forms() {
    let ev = evidence("/system.slice/system-getty.slice/getty@tty1.service");
    let cases = [
        ("getty@tty1.service", true),
        ("getty@.service", true),
        ("getty@tty2.service", false),
        ("system-getty.slice", true),
        ("system.slice", true),
        ("user.slice", false),
        ("getty.service", false),
    ];
    for (unit, want) in cases {
        let s = Selectors {
            systemd_unit: Some(unit.into()),
            ..Selectors::default()
        };
        assert_eq!(s.matches(&ev), want, "{unit}");
    }
    let none = evidence("/tessera-demo");
    let s = Selectors {
        systemd_unit: Some("a.service".into()),
        ..Selectors::default()
    };
    assert_eq!(report(&s, &none), vec![("systemdUnit".into(), None, false)]);
}

#[test]
fn container_ids_and_prefixes() {
    let ev = pod_evidence();
    assert_eq!(
        ev.container,
        Some(ContainerRef {
            id: CID.into(),
            runtime: ContainerRuntime::Containerd
        })
    );
    for (want, ok) in [
        (CID, true),
        (&CID[..12], true),
        (&CID[..11], false),
        ("ffff", false),
    ] {
        let s = Selectors {
            container: Some(want.into()),
            ..Selectors::default()
        };
        assert_eq!(s.matches(&ev), ok, "{want}");
    }
}

#[test]
fn kubernetes_selectors() {
    let ev = pod_evidence();
    let k8s = |f: fn(&mut K8sSelectors)| {
        let mut k = K8sSelectors::default();
        f(&mut k);
        Selectors {
            k8s: Some(k),
            ..Selectors::default()
        }
    };
    let all = k8s(|k| {
        k.namespace = Some("payments".into());
        k.service_account = Some("api".into());
        k.pod_name = Some("api-7d9f".into());
        k.container_name = Some("server".into());
        k.pod_labels.insert("app".into(), "api".into());
    });
    assert!(all.matches(&ev), "{:?}", all.match_report(&ev));
    let names: Vec<String> = all
        .match_report(&ev)
        .into_iter()
        .map(|r| r.selector)
        .collect();
    assert_eq!(
        names,
        [
            "k8s.namespace",
            "k8s.serviceAccount",
            "k8s.podName",
            "k8s.containerName",
            "k8s.podLabels.app"
        ]
    );
    let wrong_label = k8s(|k| {
        k.pod_labels.insert("tier".into(), "web".into());
    });
    assert_eq!(
        report(&wrong_label, &ev),
        vec![("k8s.podLabels.tier".into(), None, false)]
    );
    let wrong_ns = k8s(|k| k.namespace = Some("default".into()));
    assert!(!wrong_ns.matches(&ev));
    // Without metadata from the API server, nothing Kubernetes matches.
    let mut bare = ev.clone();
    bare.kubernetes = None;
    let ns = k8s(|k| k.namespace = Some("payments".into()));
    assert_eq!(
        report(&ns, &bare),
        vec![("k8s.namespace".into(), None, false)]
    );
}

#[test]
fn empty_selectors_match_nothing() {
    let s = Selectors::default();
    assert!(s.is_empty());
    assert!(!s.matches(&evidence("/")));
    let empty_k8s = Selectors {
        k8s: Some(K8sSelectors::default()),
        ..Selectors::default()
    };
    assert!(empty_k8s.is_empty());
}

#[test]
fn specificity_order() {
    let ev = pod_evidence();
    let by = |s: Selectors| s;
    let ladder = [
        by(Selectors {
            exe_sha256: Some(SHA.into()),
            ..Default::default()
        }),
        by(Selectors {
            exe: Some("/usr/bin/python3".into()),
            ..Default::default()
        }),
        by(Selectors {
            container: Some(CID.into()),
            ..Default::default()
        }),
        by(Selectors {
            k8s: Some(K8sSelectors {
                pod_name: Some("api-7d9f".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        by(Selectors {
            k8s: Some(K8sSelectors {
                service_account: Some("api".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        by(Selectors {
            k8s: Some(K8sSelectors {
                namespace: Some("payments".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        by(Selectors {
            systemd_unit: Some(format!("cri-containerd-{CID}.scope")),
            ..Default::default()
        }),
        by(Selectors {
            cgroup: Some("/kubepods.slice/kubepods-burstable.slice".into()),
            ..Default::default()
        }),
        by(Selectors {
            cgroup: Some("/kubepods.slice".into()),
            uid: Some(1001),
            ..Default::default()
        }),
        by(Selectors {
            cgroup: Some("/kubepods.slice".into()),
            ..Default::default()
        }),
        by(Selectors {
            uid: Some(1001),
            ..Default::default()
        }),
        by(Selectors {
            gid: Some(1002),
            ..Default::default()
        }),
    ];
    for (i, pair) in ladder.windows(2).enumerate() {
        assert!(pair[0].matches(&ev), "rung {i} must match");
        assert!(
            pair[0].specificity() > pair[1].specificity(),
            "rung {i} {:?} must beat {:?}",
            pair[0],
            pair[1]
        );
    }
    // In any order, the most specific matching one wins.
    let mut shuffled: Vec<Selectors> = ladder.iter().rev().cloned().collect();
    shuffled.push(Selectors {
        exe: Some("/bin/other".into()),
        exe_sha256: Some(SHA.into()),
        ..Default::default()
    });
    let best = most_specific(&shuffled, &ev).expect("a match");
    assert_eq!(shuffled[best], ladder[0]);
    // Ties go to the first listed.
    let twins = [ladder[10].clone(), ladder[10].clone()];
    assert_eq!(most_specific(&twins, &ev), Some(0));
    assert_eq!(most_specific(&[Selectors::default()], &ev), None);
}

#[test]
fn agrees_with_the_policy_for_cgroup_and_uid() {
    let yaml = "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: example.org\n  workloads:\n    - name: any-uid\n      match: { cgroup: /a }\n    - name: deep\n      match: { cgroup: /a/b }\n    - name: deep-uid\n      match: { cgroup: /a/b, uid: 1001 }\n    - name: uid-only\n      match: { uid: 1001 }\n";
    let set =
        crate::policy::PolicySet::from_str(std::path::Path::new("t.yaml"), yaml).expect("policy");
    let selectors: Vec<Selectors> = set.workloads.iter().map(Selectors::of_workload).collect();
    for (path, uid) in [
        ("/a/b/c", 1001),
        ("/a/b", 7),
        ("/a", 1001),
        ("/z", 1001),
        ("/z", 7),
    ] {
        let mut ev = evidence(path);
        ev.uid.real = uid;
        let ours = most_specific(&selectors, &ev).map(|i| set.workloads[i].name.clone());
        let policy = set
            .match_workload(path, uid)
            .map(|id| set.workload(id).name.clone());
        assert_eq!(ours, policy, "{path} uid {uid}");
    }
}

#[test]
fn systemd_unit_specificity_unit_then_template_then_deeper_slice() {
    let ev = evidence("/system.slice/system-worker.slice/worker@3.service");
    let unit = |u: &str| Selectors {
        systemd_unit: Some(u.into()),
        ..Selectors::default()
    };
    let ladder = [
        unit("worker@3.service"),
        unit("worker@.service"),
        unit("system-worker.slice"),
        unit("system.slice"),
    ];
    for (i, pair) in ladder.windows(2).enumerate() {
        assert!(pair[0].matches(&ev) && pair[1].matches(&ev), "rung {i}");
        assert!(pair[0].specificity() > pair[1].specificity(), "rung {i}");
    }
    // Any unit beats a cgroup alone, however deep.
    let deep_cgroup = Selectors {
        cgroup: Some("/system.slice/system-worker.slice/worker@3.service".into()),
        ..Selectors::default()
    };
    assert!(unit("system.slice").specificity() > deep_cgroup.specificity());
}

#[test]
fn overlap_needs_every_shared_selector_to_agree() {
    let s = |f: fn(&mut Selectors)| {
        let mut s = Selectors::default();
        f(&mut s);
        s
    };
    let labels = |pairs: &[(&str, &str)]| Selectors {
        k8s: Some(K8sSelectors {
            pod_labels: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..K8sSelectors::default()
        }),
        ..Selectors::default()
    };
    let container = |c: &str| Selectors {
        container: Some(c.into()),
        ..Selectors::default()
    };
    let name = s(|s| {
        s.k8s = Some(K8sSelectors {
            container_name: Some("server".into()),
            ..K8sSelectors::default()
        })
    });
    let cases = [
        (s(|s| s.uid = Some(1)), s(|s| s.uid = Some(1)), true),
        (s(|s| s.uid = Some(1)), s(|s| s.uid = Some(2)), false),
        (s(|s| s.uid = Some(1)), s(|s| s.gid = Some(2)), true),
        (s(|s| s.gid = Some(1)), s(|s| s.gid = Some(2)), true),
        (container(CID), container(&CID[..12]), true),
        (container(&CID[..13]), container("3f1c9e0b5a7dffff"), false),
        (container(CID), name.clone(), true),
        (labels(&[("app", "a")]), labels(&[("tier", "b")]), true),
        (labels(&[("app", "a")]), labels(&[("app", "b")]), false),
        (
            labels(&[("app", "a"), ("tier", "b")]),
            labels(&[("app", "a"), ("zone", "c")]),
            true,
        ),
    ];
    for (i, (a, b, want)) in cases.iter().enumerate() {
        assert_eq!(a.may_overlap(b), *want, "case {i}");
        assert_eq!(b.may_overlap(a), *want, "case {i}, swapped");
    }
}

#[test]
fn exe_dependence_and_attestation_needs() {
    let ev = evidence("/tessera-demo/payments");
    let s = Selectors {
        cgroup: Some("/tessera-demo".into()),
        exe: Some("/usr/bin/other".into()),
        ..Selectors::default()
    };
    assert!(!s.matches(&ev));
    assert!(s.matches_but_exe(&ev));
    assert!(s.uses_exe() && s.needs_attestation());
    let kernel_only = Selectors {
        cgroup: Some("/tessera-demo".into()),
        uid: Some(1001),
        ..Selectors::default()
    };
    assert!(!kernel_only.uses_exe() && !kernel_only.needs_attestation());
    assert!(!Selectors::default().matches_but_exe(&ev));
    // The same answer as the report, for every selector.
    let all = Selectors {
        cgroup: Some("/".into()),
        uid: Some(1001),
        gid: Some(1002),
        exe: Some("/usr/bin/python3".into()),
        exe_sha256: Some(SHA.into()),
        ..Selectors::default()
    };
    assert!(all.matches(&ev));
    assert!(all.match_report(&ev).iter().all(|r| r.matched));
}

#[test]
fn gid_matches_the_primary_or_a_supplementary_group() {
    let mut ev = evidence("/app");
    ev.groups = vec![27, 100];
    let gid = |g| Selectors {
        gid: Some(g),
        ..Selectors::default()
    };
    assert!(gid(ev.gid.real).matches(&ev));
    assert!(gid(100).matches(&ev));
    assert!(!gid(5).matches(&ev));
    assert_eq!(
        gid(100).match_report(&ev)[0].actual.as_deref(),
        Some("1002 (groups 27,100)")
    );
}
