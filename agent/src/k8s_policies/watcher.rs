//! The list+watch of one kind into the [`PolicyResources`] store.

use kube::api::DynamicObject;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;

use super::{PolicyResources, resource_of, specs};
use crate::identity::k8s::follow;
use crate::policy::crd::PolicyKind;

/// Follows `kind` until the runtime stops (see [`follow`]: re-watch, relist, backoff).
pub(super) async fn run(client: kube::Client, kind: PolicyKind, resources: PolicyResources) {
    let api: kube::Api<DynamicObject> = kube::Api::all_with(client, &kind.api_resource());
    tracing::info!(kind = kind.kind(), "watching policy resources");
    let watched = match kind {
        PolicyKind::Cluster => "policy resource (TesseraPolicy)",
        PolicyKind::Namespaced => "policy resource (TesseraNamespacedPolicy)",
    };
    follow(api, watcher::Config::default(), watched, |event| {
        apply(&resources, kind, event);
    })
    .await;
}

fn apply(resources: &PolicyResources, kind: PolicyKind, event: Event<DynamicObject>) {
    let mut store = resources.lock();
    let before = specs(&store);
    match event {
        Event::Init => {
            store.listing.insert(kind, Vec::new());
        }
        Event::InitApply(object) => store.listing.entry(kind).or_default().push(object),
        Event::InitDone => {
            let listed = store.listing.remove(&kind).unwrap_or_default();
            store.latest.retain(|k, _| k.kind != kind);
            store.statuses.retain(|k, _| k.kind != kind);
            for object in &listed {
                upsert(&mut store, kind, object);
            }
            tracing::debug!(
                kind = kind.kind(),
                resources = listed.len(),
                "policy resources listed"
            );
            store.synced.insert(kind);
            // Synced is news even when nothing changed: the first reload waits for it.
            resources.changes.send_modify(|v| *v += 1);
        }
        Event::Apply(object) => upsert(&mut store, kind, &object),
        Event::Delete(object) => {
            if let Some(resource) = resource_of(kind, &object) {
                let key = resource.key();
                store.latest.remove(&key);
                store.statuses.remove(&key);
            }
        }
    }
    resources.changed(&store, &before);
}

fn upsert(store: &mut super::Store, kind: PolicyKind, object: &DynamicObject) {
    let Some(resource) = resource_of(kind, object) else {
        return;
    };
    let key = resource.key();
    let status = object.data.get("status").cloned().unwrap_or(Value::Null);
    store.statuses.insert(key.clone(), status);
    store.latest.insert(key, resource);
}
