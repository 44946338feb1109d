use super::*;

const ID: &str = "3f1c9e0b5a7d4e2f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const UID: &str = "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d";
const UID_: &str = "8b2e6c1a_3d4f_4a5b_9c8d_7e6f5a4b3c2d";

fn container(runtime: ContainerRuntime) -> Option<ContainerRef> {
    Some(ContainerRef {
        id: ID.into(),
        runtime,
    })
}

/// (layout, path, container, pod (uid, qos, has container)) for each runtime and driver.
#[test]
fn containers_and_pods_by_layout() {
    use ContainerRuntime::*;
    use QosClass::*;
    type Case = (
        &'static str,
        String,
        Option<ContainerRef>,
        Option<(&'static str, QosClass)>,
    );
    let cases: Vec<Case> = vec![
        (
            "docker cgroupfs",
            format!("/docker/{ID}"),
            container(Docker),
            None,
        ),
        (
            "docker systemd",
            format!("/system.slice/docker-{ID}.scope"),
            container(Docker),
            None,
        ),
        (
            "containerd cgroupfs",
            format!("/default/{ID}"),
            container(Containerd),
            None,
        ),
        (
            "containerd k8s.io ns",
            format!("/k8s.io/{ID}"),
            container(Containerd),
            None,
        ),
        (
            "nerdctl systemd",
            format!("/system.slice/nerdctl-{ID}.scope"),
            container(Containerd),
            None,
        ),
        (
            "podman systemd",
            format!("/machine.slice/libpod-{ID}.scope"),
            container(Podman),
            None,
        ),
        (
            "podman systemd crun subgroup",
            format!("/machine.slice/libpod-{ID}.scope/container"),
            container(Podman),
            None,
        ),
        (
            "podman rootless",
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            container(Podman),
            None,
        ),
        (
            "podman cgroupfs",
            format!("/libpod_parent/libpod-{ID}"),
            container(Podman),
            None,
        ),
        (
            "podman conmon",
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            None,
            None,
        ),
        (
            "k8s containerd systemd burstable",
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            container(Containerd),
            Some((UID, Burstable)),
        ),
        (
            "k8s containerd systemd besteffort",
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            container(Containerd),
            Some((UID, BestEffort)),
        ),
        (
            "k8s containerd systemd guaranteed",
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            container(Containerd),
            Some((UID, Guaranteed)),
        ),
        (
            "k8s cri-o systemd",
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
            ),
            container(CriO),
            Some((UID, Burstable)),
        ),
        (
            "k8s cri-o systemd crun subgroup",
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope/container"
            ),
            container(CriO),
            Some((UID, BestEffort)),
        ),
        (
            "k8s cri-o conmon",
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
            ),
            None,
            Some((UID, Burstable)),
        ),
        (
            "k8s cri-dockerd systemd",
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{ID}.scope"
            ),
            container(Docker),
            Some((UID, Burstable)),
        ),
        (
            "k8s cgroupfs burstable",
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            container(Unknown),
            Some((UID, Burstable)),
        ),
        (
            "k8s cgroupfs besteffort",
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            container(Unknown),
            Some((UID, BestEffort)),
        ),
        (
            "k8s cgroupfs guaranteed",
            format!("/kubepods/pod{UID}/{ID}"),
            container(Unknown),
            Some((UID, Guaranteed)),
        ),
        (
            "k8s cgroupfs cri-o",
            format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
            container(CriO),
            Some((UID, Burstable)),
        ),
        (
            "k8s pod cgroup itself",
            format!("/kubepods/burstable/pod{UID}"),
            None,
            Some((UID, Burstable)),
        ),
        (
            "kind node (kubelet under a container)",
            format!(
                "/docker/{ID}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{}.scope",
                "a".repeat(64)
            ),
            Some(ContainerRef {
                id: "a".repeat(64),
                runtime: Containerd,
            }),
            Some((UID, Burstable)),
        ),
        (
            "static pod uid",
            format!(
                "/kubepods/burstable/pod{}/{ID}",
                "0123456789abcdef0123456789abcdef"
            ),
            container(Unknown),
            Some(("0123456789abcdef0123456789abcdef", Burstable)),
        ),
        (
            "plain service",
            "/system.slice/nginx.service".into(),
            None,
            None,
        ),
        (
            "a pod-like name outside kubepods",
            format!("/tessera/pod{UID}"),
            None,
            None,
        ),
        ("short id", "/docker/3f1c9e0b5a7d".into(), None, None),
        (
            "upper-case id",
            format!("/docker/{}", ID.to_uppercase()),
            None,
            None,
        ),
        ("root", "/".into(), None, None),
    ];
    for (layout, path, want_container, want_pod) in cases {
        let facts = parse(&path);
        assert_eq!(facts.container, want_container, "{layout}: {path}");
        let got_pod = facts.pod.as_ref().map(|p| (p.uid.as_str(), p.qos));
        assert_eq!(got_pod, want_pod, "{layout}: {path}");
        if let Some(pod) = &facts.pod {
            assert_eq!(pod.container, facts.container, "{layout}: pod container");
        }
    }
}

#[test]
fn container_above_the_pod_is_not_the_pods() {
    // A kind node: the node is a Docker container; the pod cgroup has no container yet.
    let path = format!("/docker/{ID}/kubepods/burstable/pod{UID}");
    let facts = parse(&path);
    assert_eq!(facts.container, container(ContainerRuntime::Docker));
    let pod = facts.pod.expect("pod");
    assert_eq!(pod.container, None);
}

#[test]
fn systemd_units_outermost_first() {
    type Case = (
        &'static str,
        &'static [&'static str],
        Option<(&'static str, &'static str)>,
    );
    let cases: &[Case] = &[
        (
            "/system.slice/nginx.service",
            &["system.slice", "nginx.service"],
            None,
        ),
        (
            "/system.slice/system-getty.slice/getty@tty1.service",
            &["system.slice", "system-getty.slice", "getty@tty1.service"],
            Some(("getty@.service", "tty1")),
        ),
        (
            "/user.slice/user-1000.slice/session-3.scope",
            &["user.slice", "user-1000.slice", "session-3.scope"],
            None,
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1a2b.scope",
            &[
                "user.slice",
                "user-1000.slice",
                "user@1000.service",
                "app.slice",
                "app-org.gnome.Terminal.slice",
                "vte-spawn-1a2b.scope",
            ],
            None,
        ),
        // A service's own sub-cgroups (delegation) are not units: the service stays innermost.
        (
            "/system.slice/payments.service/worker",
            &["system.slice", "payments.service"],
            None,
        ),
        (
            "/system.slice/system-openvpn\\x2dclient.slice/openvpn-client@office.service",
            &[
                "system.slice",
                "system-openvpn\\x2dclient.slice",
                "openvpn-client@office.service",
            ],
            Some(("openvpn-client@.service", "office")),
        ),
        ("/system.slice/-.mount", &["system.slice", "-.mount"], None),
        ("/tessera-demo/payments", &[], None),
        ("/a/getty@.service", &[], None),
        ("/a/@x.service", &[], None),
        ("/a/.service", &[], None),
        ("/a/nginx.timer", &[], None),
        ("/a/has space.service", &[], None),
    ];
    for (path, names, template) in cases {
        let facts = parse(path);
        let got: Vec<&str> = facts.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(&got, names, "{path}");
        let inner = facts.innermost_unit();
        assert_eq!(
            inner.map(|u| u.name.as_str()),
            names.last().copied(),
            "{path}"
        );
        let got_template =
            inner.and_then(|u| Some((u.template.as_deref()?, u.instance.as_deref()?)));
        assert_eq!(got_template, *template, "{path}");
    }
    let unit = systemd_unit("session-3.scope").expect("scope");
    assert_eq!(unit.kind, UnitKind::Scope);
    assert_eq!(
        systemd_unit("user.slice").map(|u| u.kind),
        Some(UnitKind::Slice)
    );
}
