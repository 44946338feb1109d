//! Workload selectors matched against [`Evidence`], with a report of every comparison (for
//! `tessera whoami`) and an order of specificity for "the most specific workload wins".
//!
//! Specificity, most specific first (compared in this order; the first difference decides):
//! 1. `exeSha256`: one exact binary;
//! 2. `exe`: one path;
//! 3. `container` or `k8s.containerName`: one container;
//! 4. `k8s.podName`, then `k8s.serviceAccount`, then more `k8s.podLabels`, then `k8s.namespace`;
//! 5. `systemdUnit`: a unit (service, scope, a template's instance…) beats a template
//!    (`name@.service`), which beats a slice; a deeper slice beats a shallower one;
//! 6. a deeper `cgroup` (any `cgroup` beats none);
//! 7. `uid`, then `gid`.
//!
//! For selectors of cgroup and uid only, this is the kernel's order today
//! ([`PolicySet::match_workload`](crate::policy::PolicySet::match_workload)).

use std::collections::BTreeMap;

use serde::Serialize;

use super::evidence::{Evidence, UnitKind};
use crate::policy::Workload;

/// The shortest container ID prefix a `container` selector may use (`docker ps` shows 12).
pub const MIN_CONTAINER_PREFIX: usize = 12;

/// What a workload's `match:` requires; every selector set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selectors {
    /// Normalised, relative to the cgroup v2 root; matches the cgroup and its subtree.
    pub cgroup: Option<String>,
    /// The real uid, as the kernel sees it at connect time.
    pub uid: Option<u32>,
    /// A group: the real (primary) gid, or one of the supplementary groups.
    pub gid: Option<u32>,
    /// A unit name: the process's innermost unit; a template (`getty@.service`) matches its
    /// instances; a slice matches every process below it.
    pub systemd_unit: Option<String>,
    /// The executable's path in the process's mount namespace.
    pub exe: Option<String>,
    /// Lower-case hex SHA-256 of the executable.
    pub exe_sha256: Option<String>,
    /// A container ID, or a prefix of at least [`MIN_CONTAINER_PREFIX`] hex digits.
    pub container: Option<String>,
    pub k8s: Option<K8sSelectors>,
}

/// Kubernetes selectors (from the API server's view of the process's pod).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sSelectors {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_name: Option<String>,
    /// Every label listed must be on the pod with this value.
    pub pod_labels: BTreeMap<String, String>,
    pub container_name: Option<String>,
}

impl K8sSelectors {
    /// True when no Kubernetes selector is set.
    pub fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.service_account.is_none()
            && self.pod_name.is_none()
            && self.container_name.is_none()
            && self.pod_labels.is_empty()
    }
}

/// One comparison of a selector with the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SelectorResult {
    /// Its name in a policy's `match:`, like `k8s.podLabels.app`.
    pub selector: String,
    pub expected: String,
    /// `None` when the process has no such property (no container, no unit, no pod metadata).
    pub actual: Option<String>,
    pub matched: bool,
}

/// Comparable: the greater is the more specific (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Specificity([usize; 12]);

impl Selectors {
    /// A workload's whole `match:` (the same as `w.selectors.clone()`).
    pub fn of_workload(w: &Workload) -> Selectors {
        w.selectors.clone()
    }

    /// True when no selector is set (such selectors match nothing).
    pub fn is_empty(&self) -> bool {
        self.match_report_len() == 0
    }

    fn match_report_len(&self) -> usize {
        let k8s = self.k8s.as_ref().map_or(0, |k| {
            [
                &k.namespace,
                &k.service_account,
                &k.pod_name,
                &k.container_name,
            ]
            .iter()
            .filter(|v| v.is_some())
            .count()
                + k.pod_labels.len()
        });
        [
            self.cgroup.is_some(),
            self.uid.is_some(),
            self.gid.is_some(),
            self.systemd_unit.is_some(),
            self.exe.is_some(),
            self.exe_sha256.is_some(),
            self.container.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count()
            + k8s
    }

    /// Whether every selector holds (and there is at least one).
    pub fn matches(&self, ev: &Evidence) -> bool {
        !self.is_empty() && self.holds(ev, false)
    }

    /// Whether every selector other than `exe` and `exeSha256` holds (and there is at least
    /// one selector): an exec could make these selectors match, or stop them matching.
    pub fn matches_but_exe(&self, ev: &Evidence) -> bool {
        !self.is_empty() && self.holds(ev, true)
    }

    /// Whether `exe` or `exeSha256` is set.
    pub fn uses_exe(&self) -> bool {
        self.exe.is_some() || self.exe_sha256.is_some()
    }

    /// Whether a selector other than `cgroup` and `uid` (those the kernel checks itself) is set.
    pub fn needs_attestation(&self) -> bool {
        self.gid.is_some()
            || self.systemd_unit.is_some()
            || self.uses_exe()
            || self.container.is_some()
            || self.k8s.is_some()
    }

    /// Every selector set holds; `skip_exe` leaves out `exe` and `exeSha256`. Does not
    /// allocate: the agent runs it for every workload on every attestation.
    fn holds(&self, ev: &Evidence, skip_exe: bool) -> bool {
        self.cgroup
            .as_deref()
            .is_none_or(|c| cgroup_contains(c, &ev.cgroup))
            && self.uid.is_none_or(|u| ev.uid.real == u)
            && self.gid.is_none_or(|g| in_group(ev, g))
            && self
                .systemd_unit
                .as_deref()
                .is_none_or(|u| unit_matches(u, ev))
            && (skip_exe
                || (self.exe.as_deref().is_none_or(|e| exe_path(ev) == Some(e))
                    && self
                        .exe_sha256
                        .as_deref()
                        .is_none_or(|h| sha256_matches(h, exe_sha256(ev)))))
            && self
                .container
                .as_deref()
                .is_none_or(|c| container_id(ev).is_some_and(|id| container_matches(c, id)))
            && self.k8s.as_ref().is_none_or(|k| k8s_holds(k, ev))
    }

    /// Each selector set, compared with the evidence, in a fixed order.
    pub fn match_report(&self, ev: &Evidence) -> Vec<SelectorResult> {
        let mut out = Vec::new();
        let mut push = |selector: &str, expected: &str, actual: Option<&str>, matched: bool| {
            out.push(SelectorResult {
                selector: selector.to_owned(),
                expected: expected.to_owned(),
                actual: actual.map(str::to_owned),
                matched,
            });
        };
        if let Some(c) = &self.cgroup {
            push(
                "cgroup",
                c,
                Some(&ev.cgroup),
                cgroup_contains(c, &ev.cgroup),
            );
        }
        if let Some(uid) = self.uid {
            let actual = ev.uid.real.to_string();
            push("uid", &uid.to_string(), Some(&actual), ev.uid.real == uid);
        }
        if let Some(gid) = self.gid {
            let mut actual = ev.gid.real.to_string();
            if !ev.groups.is_empty() {
                let groups: Vec<String> = ev.groups.iter().map(u32::to_string).collect();
                actual.push_str(&format!(" (groups {})", groups.join(",")));
            }
            push("gid", &gid.to_string(), Some(&actual), in_group(ev, gid));
        }
        if let Some(unit) = &self.systemd_unit {
            let actual = ev.systemd_unit().map(|u| u.name.as_str());
            push("systemdUnit", unit, actual, unit_matches(unit, ev));
        }
        if let Some(exe) = &self.exe {
            let actual = exe_path(ev);
            push("exe", exe, actual, actual == Some(exe.as_str()));
        }
        if let Some(sha) = &self.exe_sha256 {
            let actual = exe_sha256(ev);
            push("exeSha256", sha, actual, sha256_matches(sha, actual));
        }
        if let Some(want) = &self.container {
            let actual = container_id(ev);
            let matched = actual.is_some_and(|id| container_matches(want, id));
            push("container", want, actual, matched);
        }
        if let Some(k) = &self.k8s {
            let meta = ev.kubernetes.as_ref();
            let mut field = |name: &str, want: &Option<String>, actual: Option<&str>| {
                if let Some(want) = want {
                    push(name, want, actual, actual == Some(want.as_str()));
                }
            };
            field(
                "k8s.namespace",
                &k.namespace,
                meta.map(|m| m.namespace.as_str()),
            );
            field(
                "k8s.serviceAccount",
                &k.service_account,
                meta.map(|m| m.service_account.as_str()),
            );
            field("k8s.podName", &k.pod_name, meta.map(|m| m.name.as_str()));
            field(
                "k8s.containerName",
                &k.container_name,
                ev.k8s_container_name(),
            );
            for (key, want) in &k.pod_labels {
                let actual = meta.and_then(|m| m.labels.get(key)).map(String::as_str);
                let matched = actual == Some(want.as_str());
                push(&format!("k8s.podLabels.{key}"), want, actual, matched);
            }
        }
        out
    }

    /// How specific these selectors are; the greater wins.
    pub fn specificity(&self) -> Specificity {
        let k = self.k8s.as_ref();
        let set = |b: bool| usize::from(b);
        let (unit_rank, slice_depth) = self.systemd_unit.as_deref().map_or((0, 0), unit_rank);
        Specificity([
            set(self.exe_sha256.is_some()),
            set(self.exe.is_some()),
            set(self.container.is_some() || k.is_some_and(|k| k.container_name.is_some())),
            set(k.is_some_and(|k| k.pod_name.is_some())),
            set(k.is_some_and(|k| k.service_account.is_some())),
            k.map_or(0, |k| k.pod_labels.len()),
            set(k.is_some_and(|k| k.namespace.is_some())),
            unit_rank,
            slice_depth,
            // Any cgroup (even the root, depth 0) beats none.
            self.cgroup.as_deref().map_or(0, |c| cgroup_depth(c) + 1),
            set(self.uid.is_some()),
            set(self.gid.is_some()),
        ])
    }

    /// Whether one process could match both `self` and `other`, judged on the selectors that
    /// both set (a selector set in one only could hold for that process too). Meant for two
    /// selector sets of equal [`Specificity`], where each `cgroup` has the same depth and each
    /// `systemdUnit` is the same kind of name: there, two different values cannot both hold.
    /// `container` values overlap when one is a prefix of the other; `k8s.podLabels` when no
    /// key they share has different values. `container` and `k8s.containerName` are
    /// different selectors.
    pub fn may_overlap(&self, other: &Selectors) -> bool {
        fn agree<T: PartialEq + ?Sized>(a: Option<&T>, b: Option<&T>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }
        let containers = match (&self.container, &other.container) {
            (Some(a), Some(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
            _ => true,
        };
        let k8s = match (&self.k8s, &other.k8s) {
            (Some(a), Some(b)) => {
                agree(a.namespace.as_deref(), b.namespace.as_deref())
                    && agree(a.service_account.as_deref(), b.service_account.as_deref())
                    && agree(a.pod_name.as_deref(), b.pod_name.as_deref())
                    && agree(a.container_name.as_deref(), b.container_name.as_deref())
                    && a.pod_labels
                        .iter()
                        .all(|(key, v)| b.pod_labels.get(key).is_none_or(|w| w == v))
            }
            _ => true,
        };
        containers
            && k8s
            && agree(self.cgroup.as_deref(), other.cgroup.as_deref())
            && agree(self.uid.as_ref(), other.uid.as_ref())
            // Two groups can both hold: one primary, the other supplementary (or both).
            && agree(self.systemd_unit.as_deref(), other.systemd_unit.as_deref())
            && agree(self.exe.as_deref(), other.exe.as_deref())
            && agree(self.exe_sha256.as_deref(), other.exe_sha256.as_deref())
    }
}

/// Of the selector sets that match `ev`, the index of the most specific; ties go to the first.
pub fn most_specific<'a>(
    candidates: impl IntoIterator<Item = &'a Selectors>,
    ev: &Evidence,
) -> Option<usize> {
    candidates
        .into_iter()
        .enumerate()
        .filter(|(_, s)| s.matches(ev))
        .map(|(i, s)| (s.specificity(), std::cmp::Reverse(i)))
        .max()
        .map(|(_, std::cmp::Reverse(i))| i)
}

/// Whether `gid` is the process's real gid or one of its supplementary groups.
fn in_group(ev: &Evidence, gid: u32) -> bool {
    ev.gid.real == gid || ev.groups.contains(&gid)
}

fn cgroup_contains(ancestor: &str, process: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    let process = process.trim_end_matches('/');
    match process.strip_prefix(ancestor) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn cgroup_depth(path: &str) -> usize {
    path.split('/').filter(|s| !s.is_empty()).count()
}

fn unit_matches(want: &str, ev: &Evidence) -> bool {
    if want.ends_with(".slice") {
        return ev
            .systemd_units
            .iter()
            .any(|u| u.kind == UnitKind::Slice && u.name == want);
    }
    ev.systemd_unit()
        .is_some_and(|u| u.name == want || u.template.as_deref() == Some(want))
}

fn container_matches(want: &str, id: &str) -> bool {
    want == id || (want.len() >= MIN_CONTAINER_PREFIX && id.starts_with(want))
}

/// How specific a `systemdUnit` is: (kind, slice depth). A unit (service, scope, socket,
/// mount, swap, or a template's instance) beats a template, which beats a slice; a deeper
/// slice (`a-b.slice`, inside `a.slice`) beats a shallower one. Two different names of the
/// same rank never both hold for one process.
fn unit_rank(unit: &str) -> (usize, usize) {
    match unit.strip_suffix(".slice") {
        Some("-") => (1, 0),
        Some(stem) => (1, stem.split('-').count()),
        None if unit.contains("@.") => (2, 0),
        None => (3, 0),
    }
}

fn exe_path(ev: &Evidence) -> Option<&str> {
    ev.exe.as_ref().map(|e| e.path.as_str())
}

fn exe_sha256(ev: &Evidence) -> Option<&str> {
    ev.exe.as_ref().and_then(|e| e.hash.sha256())
}

fn sha256_matches(want: &str, actual: Option<&str>) -> bool {
    actual.is_some_and(|a| a.eq_ignore_ascii_case(want))
}

fn container_id(ev: &Evidence) -> Option<&str> {
    ev.container.as_ref().map(|c| c.id.as_str())
}

fn k8s_holds(k: &K8sSelectors, ev: &Evidence) -> bool {
    if k.is_empty() {
        return true;
    }
    let Some(meta) = ev.kubernetes.as_ref() else {
        // Without the API server's view of the pod no Kubernetes selector holds.
        return false;
    };
    let field = |want: &Option<String>, actual: Option<&str>| {
        want.as_deref().is_none_or(|w| actual == Some(w))
    };
    field(&k.namespace, Some(&meta.namespace))
        && field(&k.service_account, Some(&meta.service_account))
        && field(&k.pod_name, Some(&meta.name))
        && field(&k.container_name, ev.k8s_container_name())
        && k.pod_labels
            .iter()
            .all(|(key, want)| meta.labels.get(key) == Some(want))
}

#[cfg(test)]
mod tests;
