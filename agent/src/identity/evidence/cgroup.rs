//! What a cgroup v2 path says about a process: its systemd units, its container and its
//! Kubernetes pod, from the layouts systemd, the container runtimes and the kubelet create.
//!
//! Only the path is read, so a process can claim no more than where it was put: moving into
//! another cgroup needs write access to that cgroup's `cgroup.procs`.

use serde::Serialize;

/// Which kind of systemd unit a cgroup belongs to (only these kinds own cgroups).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnitKind {
    Service,
    Scope,
    Slice,
    Socket,
    Mount,
    Swap,
}

/// A systemd unit named by a cgroup path segment, like `getty@tty1.service`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SystemdUnit {
    /// The full unit name, as `systemctl` shows it.
    pub name: String,
    pub kind: UnitKind,
    /// For a template instance, its template (`getty@.service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// For a template instance, the instance string (`tty1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// The runtime whose cgroup layout named a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerRuntime {
    Docker,
    Containerd,
    CriO,
    Podman,
    /// A bare ID below a kubelet pod cgroup (cgroupfs driver): containerd or Docker
    /// (cri-dockerd) lay it out the same way.
    Unknown,
}

/// A container, from its cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    /// The 64 lower-case hex digits runtimes use as container IDs.
    pub id: String,
    pub runtime: ContainerRuntime,
}

/// The kubelet's Quality of Service class of a pod, from its cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A Kubernetes pod, from the kubelet's cgroup layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// The pod's `metadata.uid`, with dashes (the systemd driver writes `_`).
    pub uid: String,
    pub qos: QosClass,
    /// The container below the pod cgroup, if the process is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
}

/// Everything a cgroup path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// Every unit on the path, outermost first.
    pub units: Vec<SystemdUnit>,
    /// The innermost container on the path.
    pub container: Option<ContainerRef>,
    pub pod: Option<PodRef>,
}

/// Reads a cgroup v2 path (relative to the hierarchy root, like `/system.slice/a.service`).
pub fn parse(path: &str) -> CgroupFacts {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let units = segments.iter().filter_map(|s| systemd_unit(s)).collect();
    let mut container = None;
    for (i, segment) in segments.iter().enumerate().rev() {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        if let Some(c) = container_segment(segment, parent) {
            container = Some((i, c));
            break;
        }
    }
    let pod = segments.iter().enumerate().rev().find_map(|(i, s)| {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        let (uid, qos) = pod_segment(s, parent, &segments[..i])?;
        // The container must be below the pod: a pod never nests in a container.
        let in_pod = container
            .as_ref()
            .filter(|(ci, _)| *ci > i)
            .map(|(_, c)| c.clone());
        Some(PodRef {
            uid,
            qos,
            container: in_pod,
        })
    });
    CgroupFacts {
        units,
        container: container.map(|(_, c)| c),
        pod,
    }
}

impl CgroupFacts {
    /// The innermost unit: the one systemd reports for the process (`systemctl status PID`).
    pub fn innermost_unit(&self) -> Option<&SystemdUnit> {
        self.units.last()
    }
}

/// Characters systemd allows in unit names (after its `\xNN` escaping).
fn unit_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '\\' | '@')
}

/// `segment` as a systemd unit name, if it is one.
pub fn systemd_unit(segment: &str) -> Option<SystemdUnit> {
    if segment.len() > 255 || !segment.chars().all(unit_char) {
        return None;
    }
    let (stem, suffix) = segment.rsplit_once('.')?;
    let kind = match suffix {
        "service" => UnitKind::Service,
        "scope" => UnitKind::Scope,
        "slice" => UnitKind::Slice,
        "socket" => UnitKind::Socket,
        "mount" => UnitKind::Mount,
        "swap" => UnitKind::Swap,
        _ => return None,
    };
    if stem.is_empty() {
        return None;
    }
    let (template, instance) = match stem.split_once('@') {
        None => (None, None),
        // `name@.service` is a template itself, never a running unit's cgroup.
        Some((prefix, inst)) if !prefix.is_empty() && !inst.is_empty() && !inst.contains('@') => {
            (Some(format!("{prefix}@.{suffix}")), Some(inst.to_owned()))
        }
        Some(_) => return None,
    };
    Some(SystemdUnit {
        name: segment.to_owned(),
        kind,
        template,
        instance,
    })
}

fn hex64(s: &str) -> Option<&str> {
    (s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(s)
}

/// A container ID segment. systemd driver: `<prefix>-<id>.scope`; cgroupfs: `<prefix>-<id>` or
/// a bare `<id>`. Conmon's `crio-conmon-<id>` / `libpod-conmon-<id>` are not containers (and do
/// not match: `conmon-<id>` is not an ID).
fn container_segment(segment: &str, parent: Option<&str>) -> Option<ContainerRef> {
    const PREFIXES: [(&str, ContainerRuntime); 5] = [
        ("docker-", ContainerRuntime::Docker),
        ("cri-containerd-", ContainerRuntime::Containerd),
        ("nerdctl-", ContainerRuntime::Containerd),
        ("crio-", ContainerRuntime::CriO),
        ("libpod-", ContainerRuntime::Podman),
    ];
    let unscoped = segment.strip_suffix(".scope").unwrap_or(segment);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = unscoped.strip_prefix(prefix).and_then(hex64) {
            return Some(ContainerRef {
                id: id.to_owned(),
                runtime,
            });
        }
    }
    let id = hex64(segment)?;
    let runtime = match parent {
        // Docker, cgroupfs driver: /docker/<id>.
        Some("docker") => ContainerRuntime::Docker,
        // The kubelet's cgroupfs layout: /kubepods/<qos>/pod<uid>/<id>.
        Some(p) if p.starts_with("pod") => ContainerRuntime::Unknown,
        // containerd, cgroupfs driver: /<namespace>/<id> (`default`, `k8s.io`, `moby`…).
        _ => ContainerRuntime::Containerd,
    };
    Some(ContainerRef {
        id: id.to_owned(),
        runtime,
    })
}

/// A pod UID: 36 characters with dashes (or `_` under the systemd driver), or a static pod's
/// 32 hex digits.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let ok = matches!(uid.len(), 32 | 36)
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && (uid.len() == 32) != uid.contains('-');
    ok.then(|| uid.to_ascii_lowercase())
}

/// A pod cgroup segment. systemd driver: `kubepods[-<qos>]-pod<uid>.slice` (the slice name
/// repeats its ancestors); cgroupfs: `pod<uid>` below `kubepods[/<qos>]`.
fn pod_segment(segment: &str, parent: Option<&str>, above: &[&str]) -> Option<(String, QosClass)> {
    if let Some(stem) = segment.strip_suffix(".slice") {
        let (before, uid) = stem.rsplit_once("-pod")?;
        let qos = if before.ends_with("kubepods-burstable") {
            QosClass::Burstable
        } else if before.ends_with("kubepods-besteffort") {
            QosClass::BestEffort
        } else if before.ends_with("kubepods") {
            QosClass::Guaranteed
        } else {
            return None;
        };
        return Some((pod_uid(uid)?, qos));
    }
    let uid = pod_uid(segment.strip_prefix("pod")?)?;
    let kubepods = |s: &&str| *s == "kubepods" || s.ends_with("kubepods");
    let qos = match parent {
        Some("burstable") if above.len() >= 2 && kubepods(&above[above.len() - 2]) => {
            QosClass::Burstable
        }
        Some("besteffort") if above.len() >= 2 && kubepods(&above[above.len() - 2]) => {
            QosClass::BestEffort
        }
        Some(p) if kubepods(&p) => QosClass::Guaranteed,
        _ => return None,
    };
    Some((uid, qos))
}

#[cfg(test)]
mod tests;
