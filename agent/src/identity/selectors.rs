//! Workload selectors matched against [`Evidence`], with a report of every comparison (for
//! `tessera whoami`) and an order of specificity for "the most specific workload wins".
//!
//! Specificity, most specific first (compared in this order; the first difference decides):
//! 1. `exeSha256`: one exact binary;
//! 2. `exe`: one path;
//! 3. `container` or `k8s.containerName`: one container;
//! 4. `k8s.podName`, then `k8s.serviceAccount`, then more `k8s.podLabels`, then `k8s.namespace`;
//! 5. `systemdUnit`;
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
    /// The real (primary) gid.
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity([usize; 11]);

impl Selectors {
    /// The selectors the current policy supports (cgroup and uid).
    pub fn of_workload(w: &Workload) -> Selectors {
        Selectors {
            cgroup: w.cgroup.clone(),
            uid: w.uid,
            ..Selectors::default()
        }
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
        let report = self.match_report(ev);
        !report.is_empty() && report.iter().all(|r| r.matched)
    }

    /// Each selector set, compared with the evidence, in a fixed order.
    pub fn match_report(&self, ev: &Evidence) -> Vec<SelectorResult> {
        let mut out = Vec::new();
        let mut push = |selector: &str, expected: &str, actual: Option<String>, matched: bool| {
            out.push(SelectorResult {
                selector: selector.to_owned(),
                expected: expected.to_owned(),
                actual,
                matched,
            });
        };
        if let Some(c) = &self.cgroup {
            push(
                "cgroup",
                c,
                Some(ev.cgroup.clone()),
                cgroup_contains(c, &ev.cgroup),
            );
        }
        if let Some(uid) = self.uid {
            push(
                "uid",
                &uid.to_string(),
                Some(ev.uid.real.to_string()),
                ev.uid.real == uid,
            );
        }
        if let Some(gid) = self.gid {
            push(
                "gid",
                &gid.to_string(),
                Some(ev.gid.real.to_string()),
                ev.gid.real == gid,
            );
        }
        if let Some(unit) = &self.systemd_unit {
            let actual = ev.systemd_unit().map(|u| u.name.clone());
            push("systemdUnit", unit, actual, unit_matches(unit, ev));
        }
        if let Some(exe) = &self.exe {
            let actual = ev.exe.as_ref().map(|e| e.path.clone());
            let matched = actual.as_deref() == Some(exe.as_str());
            push("exe", exe, actual, matched);
        }
        if let Some(sha) = &self.exe_sha256 {
            let actual = ev
                .exe
                .as_ref()
                .and_then(|e| e.hash.sha256())
                .map(str::to_owned);
            let matched = actual
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case(sha));
            push("exeSha256", sha, actual, matched);
        }
        if let Some(want) = &self.container {
            let actual = ev.container.as_ref().map(|c| c.id.clone());
            let matched = actual
                .as_deref()
                .is_some_and(|id| container_matches(want, id));
            push("container", want, actual, matched);
        }
        if let Some(k) = &self.k8s {
            let meta = ev.kubernetes.as_ref();
            let mut field = |name: &str, want: &Option<String>, actual: Option<&str>| {
                if let Some(want) = want {
                    push(
                        name,
                        want,
                        actual.map(str::to_owned),
                        actual == Some(want.as_str()),
                    );
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
                let actual = meta.and_then(|m| m.labels.get(key)).cloned();
                let matched = actual.as_deref() == Some(want.as_str());
                push(&format!("k8s.podLabels.{key}"), want, actual, matched);
            }
        }
        out
    }

    /// How specific these selectors are; the greater wins.
    pub fn specificity(&self) -> Specificity {
        let k = self.k8s.clone().unwrap_or_default();
        let set = |b: bool| usize::from(b);
        Specificity([
            set(self.exe_sha256.is_some()),
            set(self.exe.is_some()),
            set(self.container.is_some() || k.container_name.is_some()),
            set(k.pod_name.is_some()),
            set(k.service_account.is_some()),
            k.pod_labels.len(),
            set(k.namespace.is_some()),
            set(self.systemd_unit.is_some()),
            // Any cgroup (even the root, depth 0) beats none.
            self.cgroup.as_deref().map_or(0, |c| cgroup_depth(c) + 1),
            set(self.uid.is_some()),
            set(self.gid.is_some()),
        ])
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

#[cfg(test)]
mod tests;
