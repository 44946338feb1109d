//! Writes each resource's `status` after a reload: condition `Accepted` (True, or False with
//! the errors), the generation the conditions are about, and the generation and policy
//! revision that enforce. Only a status that differs from the API server's is patched.

use std::time::Duration;

use kube::api::{DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use super::{PolicyResources, Report};
use crate::policy::resources::{PolicyResource, ResourceKey, Verdict};

/// A failed patch is tried again after this long (or at the next reload).
const RETRY: Duration = Duration::from_secs(5);

pub(super) async fn run(client: kube::Client, resources: PolicyResources) {
    let mut reports = resources.reports.subscribe();
    let mut failed = false;
    // What this agent wrote last, by resource: the watch may not have brought it back yet.
    let mut written: std::collections::BTreeMap<ResourceKey, Value> = Default::default();
    loop {
        tokio::select! {
            changed = reports.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY), if failed => {}
        }
        let Some(report) = reports.borrow_and_update().clone() else {
            continue;
        };
        failed = false;
        let due = due(&resources);
        // A deleted resource (and one made again under its name) starts over.
        written.retain(|key, _| due.iter().any(|(k, ..)| k == key));
        for (key, resource, current, enforcing) in due {
            let shown = written.get(&key).or(current.as_ref());
            let Some(status) = desired(&report, &resource, enforcing.as_ref(), shown) else {
                continue;
            };
            if same_status(current.as_ref(), &status) || same_status(written.get(&key), &status) {
                continue;
            }
            match patch(&client, &key, &status).await {
                Ok(()) => {
                    tracing::debug!(resource = %key, "status written");
                    written.insert(key, status);
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(resource = %key, error = %e, "cannot write the resource's status; trying again");
                }
            }
        }
    }
}

type Due = (
    ResourceKey,
    PolicyResource,
    Option<Value>,
    Option<PolicyResource>,
);

/// Each resource, its status as the API server shows it, and its spec that enforces.
fn due(resources: &PolicyResources) -> Vec<Due> {
    let store = resources.lock();
    store
        .latest
        .iter()
        .map(|(key, resource)| {
            (
                key.clone(),
                resource.clone(),
                store.statuses.get(key).cloned().filter(|s| !s.is_null()),
                store.accepted.get(key).cloned(),
            )
        })
        .collect()
}

/// The status `resource` should show after `report`; `None`: leave it as it is (the resource
/// came after the reload, or a refused reload changed nothing for it).
fn desired(
    report: &Report,
    resource: &PolicyResource,
    enforcing: Option<&PolicyResource>,
    current: Option<&Value>,
) -> Option<Value> {
    let generation = resource.generation;
    let (accepted, reason, message, enforcing_generation) = match &report.verdicts {
        Some(verdicts) => match verdicts.get(&resource.key())? {
            Verdict::Accepted { generation: g } if *g == generation => (
                true,
                "Accepted",
                format!("enforcing in policy revision {}", report.revision),
                Some(generation),
            ),
            Verdict::Accepted { .. } => return None,
            Verdict::Refused {
                generation: g,
                errors,
                enforcing,
            } if *g == generation => {
                let mut message: Vec<String> = errors.iter().map(ToString::to_string).collect();
                message.push(match enforcing {
                    Some(a) => format!("generation {a} of this resource stays in force"),
                    None => "nothing of this resource is enforced".to_owned(),
                });
                (false, "Invalid", message.join("\n"), *enforcing)
            }
            Verdict::Refused { .. } => return None,
        },
        None => {
            // What enforces is unchanged: only a resource whose latest spec is not in force
            // hears why.
            let enforcing_generation = enforcing.map(|e| e.generation);
            if enforcing_generation == Some(generation) {
                return None;
            }
            let why = report
                .refused
                .as_deref()
                .unwrap_or("the reload was refused");
            (
                false,
                "NotApplied",
                format!("this agent refused the new policy, so no change is applied: {why}"),
                enforcing_generation,
            )
        }
    };
    let status = if accepted { "True" } else { "False" };
    let current_condition = current
        .and_then(|c| c.get("conditions"))
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"));
    // The transition is when the status last changed, not when it was last written.
    let since = current_condition
        .filter(|c| c["status"] == status)
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| {
            json!(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string())
        });
    Some(json!({
        "observedGeneration": generation,
        "acceptedGeneration": enforcing_generation,
        "acceptedRevision": enforcing_generation.map(|_| report.revision.clone()),
        "conditions": [{
            "type": "Accepted",
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }],
    }))
}

/// Whether `current` already says `desired` (whose nulls are fields to remove).
fn same_status(current: Option<&Value>, desired: &Value) -> bool {
    let Some(Value::Object(current)) = current else {
        return false;
    };
    let Value::Object(desired) = desired else {
        return false;
    };
    desired
        .iter()
        .all(|(k, v)| current.get(k).unwrap_or(&Value::Null) == v)
        && current.keys().all(|k| desired.contains_key(k))
}

async fn patch(
    client: &kube::Client,
    key: &ResourceKey,
    status: &Value,
) -> Result<(), kube::Error> {
    let resource = key.kind.api_resource();
    let api: kube::Api<DynamicObject> = match &key.namespace {
        Some(ns) => kube::Api::namespaced_with(client.clone(), ns, &resource),
        None => kube::Api::all_with(client.clone(), &resource),
    };
    let body = json!({ "status": status });
    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(|_| ())
}
