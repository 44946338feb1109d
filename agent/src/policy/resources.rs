//! Policy documents from Kubernetes resources (`TesseraPolicy`, `TesseraNamespacedPolicy`),
//! merged with the file sources into one policy set.
//!
//! Each resource is rendered as a policy document (YAML, one field a line) and validated with
//! the files by the same code, so its errors are the files' errors; they point at the field
//! path (`spec.rules[0].credential.maxTtl`) of the resource, whose source is named
//! `TesseraPolicy/NAME` or `TesseraNamespacedPolicy/NAMESPACE/NAME`.
//!
//! A refused resource is left out, not the whole set: the files and every other resource
//! still make a generation. A resource whose update is refused keeps enforcing its last
//! accepted spec (if that still fits with the rest). Only errors in the files refuse the set
//! (the previous generation keeps enforcing, as for a bad file without resources). Conflicts
//! between sources (the same workload name twice, overlapping rules) are reported against the
//! later source: files come first, then cluster-scoped resources by name, then namespaced ones
//! by namespace and name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::crd::{GROUP, PolicyKind, VERSION};
use super::{PolicyErrors, PolicySet};

/// One resource as the API server has it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyResource {
    pub kind: PolicyKind,
    /// Set for `TesseraNamespacedPolicy` only.
    pub namespace: Option<String>,
    pub name: String,
    /// `metadata.generation`: bumped by the API server on every spec change.
    pub generation: i64,
    pub spec: Value,
}

/// Which resource: kind, namespace, name (the merge order).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{ns}/{}", self.kind.kind(), self.name),
            None => write!(f, "{}/{}", self.kind.kind(), self.name),
        }
    }
}

impl PolicyResource {
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// One error in a resource: `SOURCE field.path: what is wrong — how to fix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceError {
    pub source: ResourceKey,
    /// Like `spec.workloads[0].match.k8s.namespace`.
    pub path: String,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} — {}",
            self.source, self.path, self.message, self.hint
        )
    }
}

/// What became of one resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Its spec (this generation) enforces.
    Accepted { generation: i64 },
    /// Its spec of `generation` is refused; `enforcing` is the generation of its spec that
    /// enforces instead (the last accepted one), or `None`: none of it does.
    Refused {
        generation: i64,
        errors: Vec<ResourceError>,
        enforcing: Option<i64>,
    },
}

/// A resource to merge: its latest spec, and the one accepted before (if any, and older).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub latest: PolicyResource,
    pub accepted: Option<PolicyResource>,
}

/// The set the files and the resources make.
#[derive(Debug)]
pub struct Merged {
    pub policy: PolicySet,
    pub verdicts: BTreeMap<ResourceKey, Verdict>,
    /// The spec of each resource that enforces (the latest, or the last accepted).
    pub enforcing: BTreeMap<ResourceKey, PolicyResource>,
    /// The renderings that went into `policy`, by source name (for the state directory's
    /// copy of the generation).
    pub rendered: Vec<(PathBuf, Vec<u8>)>,
}

/// Merges `files` (read already, in load order) with `resources` (any order). `Err`: the files
/// themselves are refused.
pub fn merge(
    files: &[(PathBuf, Vec<u8>)],
    resources: &[Candidate],
) -> Result<Merged, PolicyErrors> {
    #[derive(Clone, Copy, PartialEq)]
    enum Try {
        Latest,
        Accepted,
        Out,
    }
    let mut order: Vec<&Candidate> = resources.iter().collect();
    order.sort_by_key(|c| c.latest.key());
    let mut tries = vec![Try::Latest; order.len()];
    let mut errors: Vec<Vec<ResourceError>> = vec![Vec::new(); order.len()];
    loop {
        let mut texts = files.to_vec();
        let mut included: Vec<(usize, Rendering)> = Vec::new();
        for (i, candidate) in order.iter().enumerate() {
            let resource = match tries[i] {
                Try::Latest => &candidate.latest,
                Try::Accepted => match &candidate.accepted {
                    Some(accepted) => accepted,
                    None => continue,
                },
                Try::Out => continue,
            };
            match render(resource) {
                Ok(rendering) => {
                    texts.push((source_path(&resource.key()), rendering.text.clone().into()));
                    included.push((i, rendering));
                }
                Err(found) => {
                    if tries[i] == Try::Latest {
                        errors[i] = found;
                    }
                    tries[i] = next_try(candidate, tries[i]);
                }
            }
        }
        let failed = match PolicySet::from_sources(&texts) {
            Ok(policy) => {
                return Ok(finish(policy, &order, &tries, errors, texts, files.len()));
            }
            Err(failed) => failed,
        };
        let mut by_source: BTreeMap<usize, Vec<ResourceError>> = BTreeMap::new();
        let mut in_files = Vec::new();
        for error in failed.0 {
            let place = included
                .iter()
                .find(|(i, _)| source_path(&order[*i].latest.key()) == error.file);
            match place {
                Some((i, rendering)) => by_source.entry(*i).or_default().push(ResourceError {
                    source: order[*i].latest.key(),
                    path: rendering.path_at(error.line),
                    message: error.message,
                    hint: error.hint,
                }),
                None => in_files.push(error),
            }
        }
        if !in_files.is_empty() {
            return Err(PolicyErrors(in_files));
        }
        for (i, found) in by_source {
            if tries[i] == Try::Latest {
                errors[i] = found;
            }
            tries[i] = next_try(order[i], tries[i]);
        }
    }

    fn next_try(candidate: &Candidate, now: Try) -> Try {
        let older = candidate
            .accepted
            .as_ref()
            .is_some_and(|a| a.generation != candidate.latest.generation);
        match now {
            Try::Latest if older => Try::Accepted,
            _ => Try::Out,
        }
    }

    fn finish(
        policy: PolicySet,
        order: &[&Candidate],
        tries: &[Try],
        errors: Vec<Vec<ResourceError>>,
        texts: Vec<(PathBuf, Vec<u8>)>,
        files: usize,
    ) -> Merged {
        let mut verdicts = BTreeMap::new();
        let mut enforcing = BTreeMap::new();
        for ((candidate, state), errors) in order.iter().zip(tries).zip(errors) {
            let key = candidate.latest.key();
            let generation = candidate.latest.generation;
            let verdict = match state {
                Try::Latest => {
                    enforcing.insert(key.clone(), candidate.latest.clone());
                    Verdict::Accepted { generation }
                }
                Try::Accepted => {
                    let accepted = candidate.accepted.clone();
                    let enforcing_generation = accepted.as_ref().map(|a| a.generation);
                    if let Some(accepted) = accepted {
                        enforcing.insert(key.clone(), accepted);
                    }
                    Verdict::Refused {
                        generation,
                        errors,
                        enforcing: enforcing_generation,
                    }
                }
                Try::Out => Verdict::Refused {
                    generation,
                    errors,
                    enforcing: None,
                },
            };
            verdicts.insert(key, verdict);
        }
        Merged {
            policy,
            verdicts,
            enforcing,
            rendered: texts.into_iter().skip(files).collect(),
        }
    }
}

/// The source name of a resource's rendering, as errors and `tessera status` show it.
pub fn source_path(key: &ResourceKey) -> PathBuf {
    PathBuf::from(key.to_string())
}

/// A resource as a policy document, with the field path of each of its lines.
#[derive(Debug)]
struct Rendering {
    text: String,
    /// Index: line - 1.
    paths: Vec<String>,
}

impl Rendering {
    fn path_at(&self, line: usize) -> String {
        self.paths
            .get(line.saturating_sub(1))
            .cloned()
            .unwrap_or_else(|| "spec".to_owned())
    }

    fn line(&mut self, text: String, path: String) {
        self.text.push_str(&text);
        self.text.push('\n');
        self.paths.push(path);
    }
}

/// Renders `resource` as a policy document, after the namespace rules of a namespaced one;
/// `Err`: what those rules refuse.
fn render(resource: &PolicyResource) -> Result<Rendering, Vec<ResourceError>> {
    let mut spec = resource.spec.clone();
    if spec.get("issuance").is_some() {
        // A module is a file next to its policy file; a resource has no directory to find
        // it in, and the agent reads nothing a resource names from the node's disk.
        return Err(vec![ResourceError {
            source: resource.key(),
            path: "spec.issuance".into(),
            message: "an issuance module cannot come from a custom resource".into(),
            hint: "put the document that names the module in a policy file (--policy) and \
                   keep this resource's rules without spec.issuance"
                .into(),
        }]);
    }
    if spec.get("trustedIssuers").is_some() {
        // Its JWKS is a file on the node, and the agent reads nothing a resource names from
        // the node's disk.
        return Err(vec![ResourceError {
            source: resource.key(),
            path: "spec.trustedIssuers".into(),
            message: "trusted issuers cannot come from a custom resource".into(),
            hint: "put the document with spec.trustedIssuers (and the rules that match its \
                   tokens) in a policy file (--policy)"
                .into(),
        }]);
    }
    if let Some(namespace) = &resource.namespace {
        confine_to_namespace(&resource.key(), namespace, &mut spec)?;
    }
    let mut out = Rendering {
        text: String::new(),
        paths: Vec::new(),
    };
    out.line(
        format!("apiVersion: {GROUP}/{VERSION}"),
        "apiVersion".into(),
    );
    out.line("kind: Policy".into(), "kind".into());
    out.line("metadata:".into(), "metadata".into());
    out.line(
        format!("  name: {}", scalar(&Value::String(resource.name.clone()))),
        "metadata.name".into(),
    );
    match &spec {
        Value::Object(map) if !map.is_empty() => {
            out.line("spec:".into(), "spec".into());
            mapping(&mut out, map, 1, "spec");
        }
        other => out.line(format!("spec: {}", scalar(other)), "spec".into()),
    }
    Ok(out)
}

fn mapping(out: &mut Rendering, map: &Map<String, Value>, depth: usize, path: &str) {
    let indent = "  ".repeat(depth);
    for (key, value) in map {
        let child = format!("{path}.{key}");
        let key = if key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !key.is_empty()
        {
            key.clone()
        } else {
            scalar(&Value::String(key.clone()))
        };
        match value {
            Value::Object(m) if !m.is_empty() => {
                out.line(format!("{indent}{key}:"), child.clone());
                mapping(out, m, depth + 1, &child);
            }
            Value::Array(a) if !a.is_empty() => {
                out.line(format!("{indent}{key}:"), child.clone());
                sequence(out, a, depth + 1, &child);
            }
            other => out.line(format!("{indent}{key}: {}", scalar(other)), child),
        }
    }
}

fn sequence(out: &mut Rendering, items: &[Value], depth: usize, path: &str) {
    let indent = "  ".repeat(depth);
    for (i, value) in items.iter().enumerate() {
        let child = format!("{path}[{i}]");
        match value {
            Value::Object(m) if !m.is_empty() => {
                out.line(format!("{indent}-"), child.clone());
                mapping(out, m, depth + 1, &child);
            }
            Value::Array(a) if !a.is_empty() => {
                out.line(format!("{indent}-"), child.clone());
                sequence(out, a, depth + 1, &child);
            }
            other => out.line(format!("{indent}- {}", scalar(other)), child),
        }
    }
}

/// A JSON scalar (or empty container) is a YAML flow scalar as it is: YAML 1.2 is a superset
/// of JSON, and a quoted string stays a string whatever it says.
fn scalar(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// A `TesseraNamespacedPolicy`'s workloads select pods of its namespace only: each one's
/// `match.k8s.namespace` is set to it (or must already say it), and its SPIFFE ID is under
/// `/ns/<namespace>/` (derived as `spiffe://<trustDomain>/ns/<namespace>/<name>` when absent).
fn confine_to_namespace(
    key: &ResourceKey,
    namespace: &str,
    spec: &mut Value,
) -> Result<(), Vec<ResourceError>> {
    let mut errors = Vec::new();
    let trust_domain = spec
        .get("trustDomain")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(workloads) = spec.get_mut("workloads").and_then(Value::as_array_mut) else {
        return Ok(());
    };
    let error = |path: String, message: String, hint: String| ResourceError {
        source: key.clone(),
        path,
        message,
        hint,
    };
    for (i, workload) in workloads.iter_mut().enumerate() {
        let path = format!("spec.workloads[{i}]");
        let Some(workload) = workload.as_object_mut() else {
            continue;
        };
        let selectors = workload
            .entry("match")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(selectors) = selectors.as_object_mut() {
            let k8s = selectors
                .entry("k8s")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(k8s) = k8s.as_object_mut() {
                match k8s.get("namespace") {
                    None => {
                        k8s.insert("namespace".into(), Value::String(namespace.to_owned()));
                    }
                    Some(Value::String(ns)) if ns == namespace => {}
                    Some(other) => errors.push(error(
                        format!("{path}.match.k8s.namespace"),
                        format!(
                            "namespace {} is not this resource's namespace `{namespace}`",
                            scalar(other)
                        ),
                        format!(
                            "a TesseraNamespacedPolicy selects only pods of its own namespace: \
                             remove the field or write {namespace} (a TesseraPolicy may select \
                             any namespace)"
                        ),
                    )),
                }
            }
        }
        let prefix = |td: &str| format!("spiffe://{td}/ns/{namespace}/");
        match (workload.get("spiffeId"), &trust_domain) {
            (Some(Value::String(id)), _) => {
                let under = id
                    .strip_prefix("spiffe://")
                    .and_then(|rest| rest.split_once('/'))
                    .is_some_and(|(_, p)| p.starts_with(&format!("ns/{namespace}/")));
                if !under {
                    errors.push(error(
                        format!("{path}.spiffeId"),
                        format!("spiffeId `{id}` is not under /ns/{namespace}/"),
                        format!(
                            "a TesseraNamespacedPolicy names its workloads \
                             spiffe://<trust domain>/ns/{namespace}/...: write such an ID, or \
                             remove spiffeId to get {}<name>",
                            prefix(trust_domain.as_deref().unwrap_or("<trust domain>"))
                        ),
                    ));
                }
            }
            (None, Some(td)) => {
                if let Some(name) = workload.get("name").and_then(Value::as_str) {
                    let id = format!("{}{name}", prefix(td));
                    workload.insert("spiffeId".into(), Value::String(id));
                }
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests;
