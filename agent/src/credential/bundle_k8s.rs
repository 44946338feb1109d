//! `--trust-bundle-k8s [NAMESPACE]`: a trust domain's keys gathered through the Kubernetes API
//! server. Each node's agent writes its own JWKS to a ConfigMap of its own,
//! `tessera-bundle-<node>` in NAMESPACE, labelled `tessera.dev/trust-bundle=<trust domain>`
//! (server-side apply, field manager `tessera-agent`: it touches no other object), and lists and
//! watches every ConfigMap of that label there; the union is what it publishes and verifies with.
//! A key whose object goes keeps verifying until the last token it could have signed expires
//! ([`KeyRing::set_foreign`](super::keyring::KeyRing::set_foreign)).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::identity::k8s::follow;

/// The label that marks a trust bundle object; its value is the trust domain.
pub const LABEL: &str = "tessera.dev/trust-bundle";
/// The ConfigMap key that holds the JWKS (JSON).
pub const DATA_KEY: &str = "jwks.json";
/// The server-side apply field manager of this agent's object.
pub const FIELD_MANAGER: &str = "tessera-agent";
/// Says which node's agent writes the object.
const NODE_ANNOTATION: &str = "tessera.dev/node";
const NAME_PREFIX: &str = "tessera-bundle-";
/// The first retry of a failed write; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BundleK8sError {
    #[error(
        "--trust-bundle-k8s: the trust domain {0:?} cannot be a label value (at most 63 \
         characters of letters, digits, '-', '_' and '.', starting and ending with a letter or \
         digit); use --trust-bundle-dir for this trust domain"
    )]
    TrustDomainLabel(String),
    #[error(
        "--trust-bundle-k8s {0:?}: not a namespace name (at most 63 lowercase letters, digits \
         and '-', starting and ending with a letter or digit)"
    )]
    Namespace(String),
    #[error(
        "--trust-bundle-k8s: the node name is unknown: set NODE_NAME (the downward API's \
         spec.nodeName); each node's agent publishes its keys under its node's name"
    )]
    NoNodeName,
}

/// Where this agent's object is, and which objects it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundlePlace {
    pub namespace: String,
    /// This agent's object (`tessera-bundle-<node>`).
    pub name: String,
    pub node: String,
    pub trust_domain: String,
}

impl BundlePlace {
    /// Checks the names: the namespace a DNS label, the trust domain a label value.
    pub fn new(namespace: &str, node: &str, trust_domain: &str) -> Result<Self, BundleK8sError> {
        if node.is_empty() {
            return Err(BundleK8sError::NoNodeName);
        }
        if !is_dns_label(namespace) {
            return Err(BundleK8sError::Namespace(namespace.to_owned()));
        }
        if !is_label_value(trust_domain) || trust_domain.is_empty() {
            return Err(BundleK8sError::TrustDomainLabel(trust_domain.to_owned()));
        }
        Ok(BundlePlace {
            namespace: namespace.to_owned(),
            name: object_name(node),
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The label selector of the trust domain's objects.
    pub fn selector(&self) -> String {
        format!("{LABEL}={}", self.trust_domain)
    }

    /// This agent's object holding `jwks`, as it is applied.
    pub fn object(&self, jwks: &Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {
                    LABEL: self.trust_domain,
                    "app.kubernetes.io/managed-by": "tessera",
                },
                "annotations": { NODE_ANNOTATION: self.node },
            },
            "data": { DATA_KEY: jwks.to_string() },
        })
    }
}

/// This agent's object and the trust domain's others, as watched; clones share them.
#[derive(Clone)]
pub struct K8sBundle {
    shared: Arc<Shared>,
}

struct Shared {
    place: BundlePlace,
    store: Mutex<Store>,
    /// This agent's JWKS as its object should hold it (`None`: not known yet).
    desired: watch::Sender<Option<Value>>,
    /// Bumped when another object's keys changed, and when the first list is in.
    changes: watch::Sender<u64>,
    /// Bumped when this agent's object is found missing (deleted, absent from a list, or
    /// unreadable): it is written again.
    own_missing: watch::Sender<u64>,
}

#[derive(Default)]
struct Store {
    /// The keys of each valid object of the trust domain (this agent's included), by name.
    objects: BTreeMap<String, Vec<Value>>,
    /// A list in progress.
    listing: Option<BTreeMap<String, Vec<Value>>>,
    synced: bool,
}

/// Why an object's keys are not used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unused {
    /// Labelled for another trust domain (or not at all).
    OtherDomain,
    /// Not a JWKS of named keys: says what is wrong.
    Malformed(String),
}

impl K8sBundle {
    /// Writes this agent's object and watches the trust domain's, through `client`, from now on
    /// (tasks on the current tokio runtime).
    pub fn spawn(client: kube::Client, place: BundlePlace) -> K8sBundle {
        let bundle = K8sBundle {
            shared: Arc::new(Shared {
                place,
                store: Mutex::default(),
                desired: watch::Sender::new(None),
                changes: watch::Sender::new(0),
                own_missing: watch::Sender::new(0),
            }),
        };
        let api: kube::Api<ConfigMap> =
            kube::Api::namespaced(client, &bundle.shared.place.namespace);
        tokio::spawn(watch_objects(api.clone(), bundle.clone()));
        tokio::spawn(write_own(api, bundle.clone()));
        bundle
    }

    pub fn place(&self) -> &BundlePlace {
        &self.shared.place
    }

    /// This agent's keys as they should be published (written now unless already so).
    pub fn publish(&self, jwks: &Value) {
        self.shared.desired.send_if_modified(|d| {
            if d.as_ref() == Some(jwks) {
                return false;
            }
            *d = Some(jwks.clone());
            true
        });
    }

    /// The keys of every other agent's object (valid objects of the trust domain only).
    pub fn others(&self) -> Vec<Value> {
        let own = &self.shared.place.name;
        self.lock()
            .objects
            .iter()
            .filter(|(name, _)| *name != own)
            .flat_map(|(_, keys)| keys.iter().cloned())
            .collect()
    }

    /// Whether the first list is in.
    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// Waits for the first list.
    pub async fn wait_synced(&self) {
        let mut rx = self.shared.changes.subscribe();
        while !self.synced() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Changes to the other agents' keys: each is worth a refresh of the served bundle.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one watch event.
    fn apply(&self, event: Event<ConfigMap>) {
        let place = &self.shared.place;
        let mut store = self.lock();
        let before = self.others_of(&store);
        let mut own_missing = false;
        match event {
            Event::Init => store.listing = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let Some((name, keys)) = read(place, &object) {
                    store.listing.get_or_insert_default().insert(name, keys);
                }
            }
            Event::InitDone => {
                store.objects = store.listing.take().unwrap_or_default();
                own_missing = !store.objects.contains_key(&place.name);
                debug!(objects = store.objects.len(), "trust bundle objects listed");
                if !store.synced {
                    store.synced = true;
                    // Synced is news even when nothing changed: the start waits for it.
                    self.shared.changes.send_modify(|v| *v += 1);
                }
            }
            Event::Apply(object) => {
                let name = object.metadata.name.clone().unwrap_or_default();
                match read(place, &object) {
                    Some((name, keys)) => {
                        store.objects.insert(name, keys);
                    }
                    None => {
                        own_missing = name == place.name;
                        store.objects.remove(&name);
                    }
                }
            }
            Event::Delete(object) => {
                let name = object.metadata.name.clone().unwrap_or_default();
                own_missing = name == place.name;
                store.objects.remove(&name);
            }
        }
        if self.others_of(&store) != before {
            self.shared.changes.send_modify(|v| *v += 1);
        }
        drop(store);
        if own_missing {
            self.shared.own_missing.send_modify(|v| *v += 1);
        }
    }

    fn others_of(&self, store: &Store) -> BTreeMap<String, Vec<Value>> {
        let mut others = store.objects.clone();
        others.remove(&self.shared.place.name);
        others
    }
}

/// An object's name and keys, or `None` (said why: a warning for a malformed object of the
/// trust domain, a debug line for another trust domain's).
fn read(place: &BundlePlace, object: &ConfigMap) -> Option<(String, Vec<Value>)> {
    let name = object.metadata.name.clone()?;
    match keys_of(object, &place.trust_domain) {
        Ok(keys) => Some((name, keys)),
        Err(Unused::OtherDomain) => {
            debug!(
                name,
                "a trust bundle object of another trust domain is ignored"
            );
            None
        }
        Err(Unused::Malformed(why)) => {
            warn!(
                namespace = %place.namespace,
                name,
                error = %why,
                "a malformed trust bundle object is ignored"
            );
            None
        }
    }
}

/// The keys of a trust bundle object of `trust_domain`: its `jwks.json` must be a JWKS whose
/// every key names its `kid` and `alg`.
pub(crate) fn keys_of(object: &ConfigMap, trust_domain: &str) -> Result<Vec<Value>, Unused> {
    let labelled = object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL))
        .map(String::as_str);
    if labelled != Some(trust_domain) {
        return Err(Unused::OtherDomain);
    }
    let text = object
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .ok_or_else(|| Unused::Malformed(format!("no data key {DATA_KEY}")))?;
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| Unused::Malformed(format!("{DATA_KEY} is not JSON: {e}")))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| Unused::Malformed(format!("{DATA_KEY} has no \"keys\" list")))?;
    for (i, key) in keys.iter().enumerate() {
        let named = ["kid", "alg", "kty"]
            .iter()
            .all(|field| key.get(field).is_some_and(Value::is_string));
        if !named {
            return Err(Unused::Malformed(format!(
                "{DATA_KEY} keys[{i}] lacks a \"kid\", \"alg\" or \"kty\" string"
            )));
        }
    }
    Ok(keys.clone())
}

/// Follows the trust domain's objects (re-watch, relist on 410 Gone, backoff: see
/// [`follow`]).
async fn watch_objects(api: kube::Api<ConfigMap>, bundle: K8sBundle) {
    let config = watcher::Config::default().labels(&bundle.place().selector());
    info!(
        namespace = %bundle.place().namespace,
        selector = %bundle.place().selector(),
        "watching the trust bundle objects"
    );
    follow(api, config, "trust bundle", |event| {
        bundle.apply(event);
    })
    .await;
}

/// Writes this agent's object whenever its keys change or it goes missing; a failed write is
/// retried with a growing backoff.
async fn write_own(api: kube::Api<ConfigMap>, bundle: K8sBundle) {
    let mut desired = bundle.shared.desired.subscribe();
    let mut missing = bundle.shared.own_missing.subscribe();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let place = bundle.place().clone();
    let mut backoff = FIRST_BACKOFF;
    loop {
        missing.borrow_and_update();
        let jwks = desired.borrow_and_update().clone();
        if let Some(jwks) = jwks {
            let object = place.object(&jwks);
            match api
                .patch(&place.name, &params, &Patch::Apply(&object))
                .await
            {
                Ok(_) => {
                    backoff = FIRST_BACKOFF;
                    info!(namespace = %place.namespace, name = %place.name, "this agent's keys are published in its trust bundle object");
                }
                Err(e) => {
                    warn!(namespace = %place.namespace, name = %place.name, error = %e, retry_in = ?backoff, "cannot write this agent's trust bundle object; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            changed = missing.changed() => if changed.is_err() { return },
        }
    }
}

/// `tessera-bundle-<node>`; a node name too long for that is replaced by its digest.
fn object_name(node: &str) -> String {
    let name = format!("{NAME_PREFIX}{node}");
    if name.len() <= 253 {
        return name;
    }
    let digest = Sha256::digest(node.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{NAME_PREFIX}{hex}")
}

/// RFC 1123 label: what a namespace name must be.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes label value (empty allowed).
fn is_label_value(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    s.len() <= 63
        && s.bytes()
            .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_none_or(alnum)
        && s.bytes().last().is_none_or(alnum)
}

#[cfg(test)]
mod tests;
