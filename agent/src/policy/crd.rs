//! The Kubernetes custom resources that carry policy documents: a cluster-scoped
//! `TesseraPolicy` and a namespaced `TesseraNamespacedPolicy` (group `tessera.dev`, version
//! `v1alpha1`), and their CustomResourceDefinitions (`tessera crds`).
//!
//! A resource's `spec` is a policy document's `spec`: the CRD's OpenAPI schema is generated
//! from the same raw types the YAML files are parsed into (schemars, made structural by
//! kube-core's rewriter), so `kubectl explain tesserapolicy.spec.rules.credential` shows the
//! fields the agent reads, and the API server keeps only those.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::raw::RawSpec;

pub const GROUP: &str = "tessera.dev";
pub const VERSION: &str = "v1alpha1";

/// Which of the two resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// `TesseraPolicy`: cluster-scoped; its workloads may select any pod (or host process).
    Cluster,
    /// `TesseraNamespacedPolicy`: its workloads select only pods of its own namespace.
    Namespaced,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 2] = [PolicyKind::Cluster, PolicyKind::Namespaced];

    pub fn kind(self) -> &'static str {
        match self {
            PolicyKind::Cluster => "TesseraPolicy",
            PolicyKind::Namespaced => "TesseraNamespacedPolicy",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            PolicyKind::Cluster => "tesserapolicies",
            PolicyKind::Namespaced => "tesseranamespacedpolicies",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            PolicyKind::Cluster => "tesserapolicy",
            PolicyKind::Namespaced => "tesseranamespacedpolicy",
        }
    }

    fn short_name(self) -> &'static str {
        match self {
            PolicyKind::Cluster => "tpol",
            PolicyKind::Namespaced => "tnpol",
        }
    }

    pub fn namespaced(self) -> bool {
        self == PolicyKind::Namespaced
    }

    /// For kube's dynamic API.
    pub fn api_resource(self) -> kube::discovery::ApiResource {
        kube::discovery::ApiResource {
            group: GROUP.to_owned(),
            version: VERSION.to_owned(),
            api_version: format!("{GROUP}/{VERSION}"),
            kind: self.kind().to_owned(),
            plural: self.plural().to_owned(),
        }
    }

    /// The CRD of this kind.
    pub fn definition(self) -> CustomResourceDefinition {
        let scope = if self.namespaced() {
            "Namespaced"
        } else {
            "Cluster"
        };
        let what = match self {
            PolicyKind::Cluster => {
                "A Tessera policy document for every node's agent: workloads, protected endpoints \
                 and the rules between them (the same spec as a policy file's)."
            }
            PolicyKind::Namespaced => {
                "A Tessera policy document whose workloads select only pods of the resource's \
                 own namespace (match.k8s.namespace is set to it, or must equal it) and whose \
                 SPIFFE IDs are under /ns/<namespace>/."
            }
        };
        let accepted = r#".status.conditions[?(@.type=="Accepted")]"#;
        let value = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": format!("{}.{GROUP}", self.plural()),
                "labels": { "app.kubernetes.io/name": "tessera" },
            },
            "spec": {
                "group": GROUP,
                "scope": scope,
                "names": {
                    "kind": self.kind(),
                    "listKind": format!("{}List", self.kind()),
                    "plural": self.plural(),
                    "singular": self.singular(),
                    "shortNames": [self.short_name()],
                    "categories": ["tessera"],
                },
                "versions": [{
                    "name": VERSION,
                    "served": true,
                    "storage": true,
                    "subresources": { "status": {} },
                    "additionalPrinterColumns": [
                        { "name": "Accepted", "type": "string", "jsonPath": format!("{accepted}.status") },
                        { "name": "Reason", "type": "string", "jsonPath": format!("{accepted}.reason") },
                        { "name": "Revision", "type": "string", "priority": 1, "jsonPath": ".status.acceptedRevision" },
                        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
                    ],
                    "schema": { "openAPIV3Schema": {
                        "description": what,
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "apiVersion": { "type": "string" },
                            "kind": { "type": "string" },
                            "metadata": { "type": "object" },
                            "spec": spec_schema(),
                            "status": status_schema(),
                        },
                    }},
                }],
            },
        });
        // The shape is k8s-openapi's: a field this builds wrong fails the CRD tests.
        serde_json::from_value(value).unwrap_or_default()
    }
}

/// Both CRDs as one multi-document YAML file, as committed under deploy/.
pub fn definitions_yaml() -> String {
    let mut out = String::from(
        "# Generated by `tessera crds` (cargo xtask crds) from the policy types: do not edit.\n",
    );
    for kind in PolicyKind::ALL {
        let value = serde_json::to_value(kind.definition()).unwrap_or_default();
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&value).unwrap_or_default());
    }
    out
}

/// The schema of `spec`, from [`RawSpec`]: subschemas inlined (structural schemas have no
/// `$ref`), descriptions from [`DESCRIPTIONS`] (the raw types' comments are for developers).
fn spec_schema() -> Value {
    let settings = schemars::generate::SchemaSettings::openapi3().with(|s| {
        s.inline_subschemas = true;
        s.meta_schema = None;
    });
    let generator = settings
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<RawSpec>().to_value();
    if let Some(object) = schema.as_object_mut() {
        for key in ["$schema", "title", "definitions", "$defs", "components"] {
            object.remove(key);
        }
    }
    describe(&mut schema, "spec");
    schema
}

/// Removes what a structural schema may not say and the developer comments, then sets the
/// description of each field [`DESCRIPTIONS`] names (`path` like `spec.workloads.match`).
fn describe(schema: &mut Value, path: &str) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    object.remove("title");
    object.remove("description");
    // `Option<T>`: absent is the null; Kubernetes prunes nulls unless nullable, which is fine.
    object.remove("nullable");
    if let Some(text) = DESCRIPTIONS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, d)| d)
    {
        object.insert("description".into(), Value::String((*text).to_owned()));
    }
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        for (name, child) in properties.iter_mut() {
            describe(child, &format!("{path}.{name}"));
        }
    }
    // A list's items have its fields' paths, not its description.
    if let Some(items) = object.get_mut("items") {
        describe(items, path);
        if let Some(item) = items.as_object_mut() {
            item.remove("description");
        }
    }
    if let Some(values @ Value::Object(_)) = object.get_mut("additionalProperties") {
        describe(values, &format!("{path}.*"));
    }
}

fn status_schema() -> Value {
    json!({
        "description": "What the agents made of this resource.",
        "type": "object",
        "properties": {
            "observedGeneration": {
                "description": "The metadata.generation the conditions are about.",
                "type": "integer", "format": "int64",
            },
            "acceptedGeneration": {
                "description": "The metadata.generation that enforces now (after a refused update, the last accepted one).",
                "type": "integer", "format": "int64",
            },
            "acceptedRevision": {
                "description": "The policy revision (sha256 over every merged source) that enforces with this resource's accepted spec.",
                "type": "string",
            },
            "conditions": {
                "description": "Accepted: True when the spec enforces; False with the errors (each `SOURCE field.path: what is wrong — how to fix`) when it is refused.",
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": { "type": "string" },
                        "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                        "reason": { "type": "string" },
                        "message": { "type": "string" },
                        "observedGeneration": { "type": "integer", "format": "int64" },
                        "lastTransitionTime": { "type": "string", "format": "date-time" },
                    },
                },
            },
        },
    })
}

/// `kubectl explain` texts, by field path (`.*` for a map's values). The policy file format's
/// reference is DESIGN 4.2 and the README.
const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "spec",
        "A policy document's spec: workloads (who), endpoints (protected destinations) and rules (who may reach what, on what terms).",
    ),
    (
        "spec.trustDomain",
        "The trust domain of the workloads' SPIFFE IDs, like example.org. Required.",
    ),
    (
        "spec.mode",
        "enforce (default) or audit: the default of the rules; audit allows but logs what would be denied.",
    ),
    (
        "spec.workloads",
        "Sets of processes that share an identity, chosen by selectors.",
    ),
    (
        "spec.workloads.name",
        "Unique across every policy source; rules name workloads by it.",
    ),
    (
        "spec.workloads.spiffeId",
        "spiffe://<trustDomain>/<path>; derived from the name when absent.",
    ),
    (
        "spec.workloads.match",
        "Selectors; every one written must hold (at least one).",
    ),
    (
        "spec.workloads.match.cgroup",
        "A cgroup path relative to the cgroup v2 root; matches its subtree.",
    ),
    ("spec.workloads.match.uid", "The process's user id."),
    ("spec.workloads.match.gid", "The process's group id."),
    (
        "spec.workloads.match.systemdUnit",
        "A systemd unit, like payments.service.",
    ),
    (
        "spec.workloads.match.exe",
        "The executable's absolute path.",
    ),
    (
        "spec.workloads.match.exeSha256",
        "The executable's SHA-256, 64 hex digits.",
    ),
    (
        "spec.workloads.match.container",
        "A container runtime ID (64 hex digits).",
    ),
    (
        "spec.workloads.match.k8s",
        "Kubernetes pod selectors (from the API server's view of this node's pods).",
    ),
    (
        "spec.workloads.match.k8s.namespace",
        "The pod's namespace. In a TesseraNamespacedPolicy it is the resource's namespace (set when absent; any other is refused).",
    ),
    (
        "spec.workloads.match.k8s.serviceAccount",
        "The pod's service account.",
    ),
    ("spec.workloads.match.k8s.podName", "The pod's name."),
    (
        "spec.workloads.match.k8s.podLabels",
        "Labels the pod must carry, with these values.",
    ),
    (
        "spec.workloads.match.k8s.containerName",
        "The container's name in the pod.",
    ),
    (
        "spec.workloads.egress",
        "open (default): any unprotected destination; allowlist: only its rules' endpoints.",
    ),
    ("spec.endpoints", "Protected destinations."),
    (
        "spec.endpoints.name",
        "Unique across every policy source; the audience of its credentials.",
    ),
    ("spec.endpoints.kind", "secret-store, api or other."),
    (
        "spec.endpoints.addresses",
        "IP addresses or CIDRs, like 10.0.0.10 or 10.0.0.0/24.",
    ),
    (
        "spec.endpoints.hosts",
        "DNS names the agent resolves and protects.",
    ),
    (
        "spec.endpoints.audiences",
        "Other audiences a token for this endpoint may carry.",
    ),
    ("spec.endpoints.ports", "Ports; none: every port."),
    ("spec.endpoints.protocol", "tcp, udp or any."),
    (
        "spec.endpoints.labels",
        "Free labels (like sensitivity: high) that issuance modules see in their input.",
    ),
    ("spec.rules", "Which workloads may reach which endpoints."),
    ("spec.rules.name", "Unique across every policy source."),
    (
        "spec.rules.workloads",
        "Names of workloads of this document.",
    ),
    (
        "spec.rules.endpoints",
        "Names of endpoints of this document.",
    ),
    (
        "spec.rules.credential",
        "Whether a credential is required, its longest TTL and what its grant binds to.",
    ),
    (
        "spec.rules.credential.required",
        "false: allowlisted, no credential needed.",
    ),
    (
        "spec.rules.credential.maxTtl",
        "The longest credential lifetime, like 10m (at most 24h).",
    ),
    (
        "spec.rules.credential.bind",
        "process, process-tree or workload.",
    ),
    (
        "spec.rules.credential.keepOnExec",
        "bind: process only: the grant survives an exec of another executable.",
    ),
    (
        "spec.rules.mode",
        "enforce or audit; default: the document's mode.",
    ),
    (
        "spec.rules.connections",
        "end-with-credential (default) or outlive: what becomes of a connection when its credential ends.",
    ),
    (
        "spec.rules.scopes",
        "The scopes this rule's credentials may carry (the token's scope claim); a request asks for a subset.",
    ),
    (
        "spec.rules.match",
        "What a credential request under this rule must carry besides its workload's identity.",
    ),
    (
        "spec.rules.match.token",
        "An evidence token (evidence_tokens) from a trusted issuer with this subject and these claims.",
    ),
    (
        "spec.rules.match.token.issuer",
        "The name of a trusted issuer of this document.",
    ),
    (
        "spec.rules.match.token.subject",
        "The token's sub, exactly; any when absent.",
    ),
    (
        "spec.rules.match.token.claims",
        "Claims the token must carry with these values (strings; numbers and booleans as written).",
    ),
    (
        "spec.trustedIssuers",
        "Outside issuers whose JWTs a credential request may carry: a person's (subject_token) or the workload's own (evidence_tokens). Read from policy files only (a resource that names one is refused).",
    ),
    (
        "spec.trustedIssuers.name",
        "Unique across every policy source; rules' match.token.issuer names it.",
    ),
    (
        "spec.trustedIssuers.issuer",
        "The tokens' iss, exactly; unique across every policy source.",
    ),
    (
        "spec.trustedIssuers.audiences",
        "A token's aud must hold one of these.",
    ),
    ("spec.trustedIssuers.jwks", "The issuer's public keys."),
    (
        "spec.trustedIssuers.jwks.file",
        "A JWKS file relative to the policy file; re-read when a token names an unknown key (at most every 10 s) and every minute.",
    ),
    (
        "spec.trustedIssuers.jwks.url",
        "An https URL: not supported yet (refused).",
    ),
    (
        "spec.issuance",
        "A Rego issuance module; read from policy files only (a resource that names one is refused).",
    ),
    (
        "spec.issuance.rego",
        "The module's file, relative to the policy file.",
    ),
    (
        "spec.issuance.query",
        "The rule that decides, like data.tessera.issuance.decision.",
    ),
    (
        "spec.issuance.timeout",
        "The evaluation budget, like 100ms; past it the request is denied.",
    ),
];
