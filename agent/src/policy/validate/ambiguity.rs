//! Ambiguous workloads: two that one process could match, neither more specific than the other
//! ([`Selectors::may_overlap`] at equal [`Specificity`]).
//!
//! Finding them without comparing every pair: at equal specificity the same selectors are set,
//! except `container` and `k8s.containerName` (which rank together) and `k8s.podLabels` (which
//! rank by count); the others overlap only when equal (but two `gid`s always may). So workloads are bucketed by their
//! specificity and the values of those others; in a bucket, grouped by which of the rest they
//! set ("keys": label keys, and pseudo-keys for the container selectors); and two groups
//! are compared through an index of each group's values on the keys both have. A container
//! is indexed by its first [`MIN_CONTAINER_PREFIX`] digits (prefixes of one ID share them),
//! then every candidate is checked with [`Selectors::may_overlap`]. 10k workloads that differ
//! by a label value cost one lookup each.

use std::collections::HashMap;

use crate::identity::selectors::{MIN_CONTAINER_PREFIX, Selectors, Specificity};

/// Pseudo label keys (a label key has no NUL) for the container selectors.
const CONTAINER_KEY: &str = "\0container";
const CONTAINER_NAME_KEY: &str = "\0containerName";

/// The workloads seen so far, by index (the caller's numbering).
#[derive(Default)]
pub(super) struct AmbiguityIndex {
    buckets: HashMap<(Specificity, ExactKey), Bucket>,
    /// Index = the workload's.
    added: Vec<Selectors>,
}

/// The selectors that, at equal specificity, are set in both or in neither, and so overlap
/// only when equal.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ExactKey {
    cgroup: Option<String>,
    uid: Option<u32>,
    /// Whether `gid` is set: two gids overlap (a process's primary and supplementary groups).
    gid: bool,
    systemd_unit: Option<String>,
    exe: Option<String>,
    exe_sha256: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
    pod_name: Option<String>,
}

/// Members of one bucket, by the (sorted) keys they set.
#[derive(Default)]
struct Bucket {
    groups: HashMap<Vec<String>, Group>,
}

/// Members setting the same keys.
#[derive(Default)]
struct Group {
    /// Each member's values (in key order) and index.
    members: Vec<(Vec<String>, usize)>,
    /// For some key positions: the members (in order) by their values there.
    projections: HashMap<Vec<usize>, HashMap<Vec<String>, Vec<usize>>>,
}

impl AmbiguityIndex {
    /// The first workload already added that one process could match as well as `s`, with
    /// neither more specific.
    pub fn find(&mut self, s: &Selectors) -> Option<usize> {
        let bucket = self.buckets.get_mut(&(s.specificity(), ExactKey::of(s)))?;
        let (keys, values) = loose_values(s);
        let added = &self.added;
        bucket
            .groups
            .iter_mut()
            .filter_map(|(group_keys, group)| {
                group
                    .candidates(group_keys, &keys, &values)
                    .find(|&i| added[i].may_overlap(s))
            })
            .min()
    }

    /// Adds workload `index`, the next in the caller's numbering.
    pub fn insert(&mut self, s: &Selectors, index: usize) {
        debug_assert_eq!(index, self.added.len());
        let (keys, values) = loose_values(s);
        let group = self
            .buckets
            .entry((s.specificity(), ExactKey::of(s)))
            .or_default()
            .groups
            .entry(keys)
            .or_default();
        for (positions, projection) in &mut group.projections {
            projection
                .entry(project(&values, positions))
                .or_default()
                .push(index);
        }
        group.members.push((values, index));
        self.added.push(s.clone());
    }
}

impl Group {
    /// Members that agree with (`keys`, `values`) on every key both have, in order (a
    /// container only on its first digits).
    fn candidates<'g>(
        &'g mut self,
        group_keys: &[String],
        keys: &[String],
        values: &[String],
    ) -> Box<dyn Iterator<Item = usize> + 'g> {
        // Positions (in the group's keys, and in ours) of the keys both have.
        let (positions, ours): (Vec<usize>, Vec<usize>) = group_keys
            .iter()
            .enumerate()
            .filter_map(|(gi, k)| keys.iter().position(|x| x == k).map(|oi| (gi, oi)))
            .unzip();
        if positions.is_empty() {
            return Box::new(self.members.iter().map(|(_, i)| *i));
        }
        let members = &self.members;
        let projection = self
            .projections
            .entry(positions.clone())
            .or_insert_with(|| {
                let mut index: HashMap<Vec<String>, Vec<usize>> = HashMap::new();
                for (member_values, i) in members {
                    index
                        .entry(project(member_values, &positions))
                        .or_default()
                        .push(*i);
                }
                index
            });
        match projection.get(&project(values, &ours)) {
            Some(found) => Box::new(found.iter().copied()),
            None => Box::new(std::iter::empty()),
        }
    }
}

impl ExactKey {
    fn of(s: &Selectors) -> ExactKey {
        let k = s.k8s.clone().unwrap_or_default();
        ExactKey {
            cgroup: s.cgroup.clone(),
            uid: s.uid,
            gid: s.gid.is_some(),
            systemd_unit: s.systemd_unit.clone(),
            exe: s.exe.clone(),
            exe_sha256: s.exe_sha256.clone(),
            namespace: k.namespace,
            service_account: k.service_account,
            pod_name: k.pod_name,
        }
    }
}

/// The keys set among pod labels and the container selectors, sorted, and their values (a
/// container's first digits).
fn loose_values(s: &Selectors) -> (Vec<String>, Vec<String>) {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(c) = &s.container {
        let prefix = c.chars().take(MIN_CONTAINER_PREFIX).collect();
        pairs.push((CONTAINER_KEY.to_owned(), prefix));
    }
    if let Some(k) = &s.k8s {
        if let Some(name) = &k.container_name {
            pairs.push((CONTAINER_NAME_KEY.to_owned(), name.clone()));
        }
        pairs.extend(k.pod_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    pairs.sort();
    pairs.into_iter().unzip()
}

fn project(values: &[String], positions: &[usize]) -> Vec<String> {
    positions.iter().map(|&p| values[p].clone()).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::identity::selectors::K8sSelectors;

    fn with_labels(pairs: &[(&str, &str)]) -> Selectors {
        Selectors {
            k8s: Some(K8sSelectors {
                namespace: Some("prod".into()),
                pod_labels: pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
                ..K8sSelectors::default()
            }),
            ..Selectors::default()
        }
    }

    /// The index agrees with comparing every pair.
    #[test]
    fn agrees_with_pairwise_comparison() {
        let cid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let container = |c: &str, uid: Option<u32>| Selectors {
            container: Some(c.into()),
            uid,
            ..Selectors::default()
        };
        let cases: Vec<Selectors> = vec![
            with_labels(&[("app", "a")]),
            with_labels(&[("app", "b")]),
            with_labels(&[("tier", "web")]),
            with_labels(&[("app", "a"), ("tier", "web")]),
            with_labels(&[("app", "b"), ("tier", "db")]),
            with_labels(&[("app", "c"), ("zone", "x")]),
            with_labels(&[("tier", "db"), ("zone", "x")]),
            with_labels(&[("app", "b"), ("tier", "db")]),
            container(cid, None),
            container(&cid[..12], None),
            container(&cid[..20], Some(1)),
            container("0123456789abffff", None),
            container(&cid[..30], Some(2)),
            Selectors {
                k8s: Some(K8sSelectors {
                    container_name: Some("server".into()),
                    ..K8sSelectors::default()
                }),
                ..Selectors::default()
            },
            Selectors {
                container: Some("fedcba9876543210".into()),
                k8s: Some(K8sSelectors {
                    container_name: Some("server".into()),
                    ..K8sSelectors::default()
                }),
                ..Selectors::default()
            },
            Selectors {
                container: Some(cid.into()),
                k8s: Some(K8sSelectors {
                    container_name: Some("db".into()),
                    ..K8sSelectors::default()
                }),
                ..Selectors::default()
            },
            Selectors {
                cgroup: Some("/a".into()),
                ..Selectors::default()
            },
            Selectors {
                cgroup: Some("/b".into()),
                ..Selectors::default()
            },
            Selectors {
                cgroup: Some("/a".into()),
                ..Selectors::default()
            },
        ];
        let mut index = AmbiguityIndex::default();
        let mut added: Vec<&Selectors> = Vec::new();
        for (i, s) in cases.iter().enumerate() {
            let pairwise = added
                .iter()
                .position(|o| o.specificity() == s.specificity() && o.may_overlap(s));
            let found = index.find(s);
            assert_eq!(found, pairwise, "case {i}: {s:?}");
            index.insert(s, i);
            added.push(s);
        }
    }

    #[test]
    fn ten_thousand_label_workloads_are_fast_enough() {
        let mut index = AmbiguityIndex::default();
        for i in 0..10_000 {
            let s = with_labels(&[("app", &format!("a{i}"))]);
            assert_eq!(index.find(&s), None);
            index.insert(&s, i);
        }
        assert_eq!(index.find(&with_labels(&[("app", "a77")])), Some(77));
        assert_eq!(index.find(&with_labels(&[("tier", "web")])), Some(0));
    }
}
