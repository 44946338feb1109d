//! Policies as Kubernetes custom resources (`tessera run --k8s-policies`): a list+watch of
//! `TesseraPolicy` and `TesseraNamespacedPolicy` objects, merged with the policy files at
//! every reload ([`resources::merge`]), and each resource's `status` (condition `Accepted`,
//! the accepted generation and policy revision) written back through the status subresource.
//!
//! Every node's agent watches and merges the same resources, so every one computes the same
//! status; a status is patched only when it differs from what the API server shows, so the
//! agents of a cluster do not fight over it (unless their policy files differ).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::api::DynamicObject;
use serde_json::Value;
use tokio::sync::watch;

use crate::policy::crd::PolicyKind;
use crate::policy::resources::{self, Candidate, Merged, PolicyResource, ResourceKey, Verdict};
use crate::policy::{PolicyErrors, PolicySet};

mod status;
mod watcher;

/// The resources as watched, and what the last reload made of them; clones share them.
#[derive(Clone)]
pub struct PolicyResources {
    store: Arc<Mutex<Store>>,
    /// Bumped when a resource's spec (or the set of resources) changes.
    changes: watch::Sender<u64>,
    /// What the last reload made of them, for the status writer.
    reports: watch::Sender<Option<Arc<Report>>>,
}

#[derive(Default)]
struct Store {
    /// The kinds whose first list is in.
    synced: BTreeSet<PolicyKind>,
    /// A list in progress, by kind (replaces that kind's resources when complete).
    listing: BTreeMap<PolicyKind, Vec<DynamicObject>>,
    latest: BTreeMap<ResourceKey, PolicyResource>,
    /// The spec of each resource that enforces in the generation applied last.
    accepted: BTreeMap<ResourceKey, PolicyResource>,
    /// `status` as the API server last showed it.
    statuses: BTreeMap<ResourceKey, Value>,
}

/// What one reload made of the resources.
#[derive(Debug)]
pub(crate) struct Report {
    /// `None`: the reload was refused before or after the merge (`refused` says why).
    verdicts: Option<BTreeMap<ResourceKey, Verdict>>,
    /// The revision that enforces now.
    revision: String,
    refused: Option<String>,
}

impl PolicyResources {
    /// Watches both kinds through `client` and writes their statuses, from now on (tasks on
    /// the current tokio runtime).
    pub fn spawn(client: kube::Client) -> PolicyResources {
        let resources = PolicyResources {
            store: Arc::default(),
            changes: watch::Sender::new(0),
            reports: watch::Sender::new(None),
        };
        for kind in PolicyKind::ALL {
            tokio::spawn(watcher::run(client.clone(), kind, resources.clone()));
        }
        tokio::spawn(status::run(client, resources.clone()));
        resources
    }

    /// Whether both kinds have been listed.
    pub fn synced(&self) -> bool {
        self.lock().synced.len() == PolicyKind::ALL.len()
    }

    /// Waits for both lists (the first merge should see every resource).
    pub async fn wait_synced(&self) {
        let mut rx = self.changes.subscribe();
        while !self.synced() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Changes to the resources' specs: each is worth a reload.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The resources to merge: each one's latest spec, and the one enforcing now.
    pub fn candidates(&self) -> Vec<Candidate> {
        let store = self.lock();
        store
            .latest
            .iter()
            .map(|(key, latest)| Candidate {
                latest: latest.clone(),
                accepted: store.accepted.get(key).cloned(),
            })
            .collect()
    }

    /// Reads the files `paths` name and merges them with the resources.
    pub fn load(&self, paths: &[PathBuf]) -> Result<Merged, PolicyErrors> {
        let files = PolicySet::read_files(paths)?;
        resources::merge(&files, &self.candidates())
    }

    /// The merge now enforces (as `revision`): its specs are the accepted ones from now on.
    pub fn applied(&self, merged: &Merged, revision: &str) {
        self.lock().accepted = merged.enforcing.clone();
        self.report(Report {
            verdicts: Some(merged.verdicts.clone()),
            revision: revision.to_owned(),
            refused: None,
        });
    }

    /// The reload was refused; the generation of `revision` keeps enforcing.
    pub fn not_applied(&self, reason: &str, revision: &str) {
        self.report(Report {
            verdicts: None,
            revision: revision.to_owned(),
            refused: Some(reason.to_owned()),
        });
    }

    fn report(&self, report: Report) {
        self.reports.send_replace(Some(Arc::new(report)));
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the resources of `kind` after a list, or one resource after a watch event;
    /// tells the reloader when a spec changed.
    fn changed(&self, store: &MutexGuard<'_, Store>, before: &BTreeMap<ResourceKey, (i64, Value)>) {
        if specs(store) != *before {
            self.changes.send_modify(|v| *v += 1);
        }
    }
}

fn specs(store: &Store) -> BTreeMap<ResourceKey, (i64, Value)> {
    store
        .latest
        .iter()
        .map(|(k, r)| (k.clone(), (r.generation, r.spec.clone())))
        .collect()
}

/// A watched object as a policy resource; `None` without a name (the API server always
/// sets one).
fn resource_of(kind: PolicyKind, object: &DynamicObject) -> Option<PolicyResource> {
    Some(PolicyResource {
        kind,
        namespace: if kind.namespaced() {
            Some(object.metadata.namespace.clone().unwrap_or_default())
        } else {
            None
        },
        name: object.metadata.name.clone()?,
        generation: object.metadata.generation.unwrap_or(0),
        spec: object.data.get("spec").cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests;
