//! Raw policy documents exactly as written in YAML (DESIGN 4.2), before validation.
//!
//! Every node that validation may complain about is `Spanned`, so its error can point at it.
//! Required fields are `Option` here so that validation can report all of them at once
//! instead of serde stopping at the first. Unknown keys are refused (`deny_unknown_fields`),
//! never silently ignored.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

pub(super) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawDocument {
    #[schemars(with = "Option<String>")]
    pub api_version: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub kind: Option<S<String>>,
    #[schemars(with = "Option<RawMetadata>")]
    pub metadata: Option<S<RawMetadata>>,
    #[schemars(with = "Option<RawSpec>")]
    pub spec: Option<S<RawSpec>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMetadata {
    #[schemars(with = "Option<String>")]
    pub name: Option<S<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSpec {
    #[schemars(with = "Option<String>")]
    pub trust_domain: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub mode: Option<S<String>>,
    #[serde(default)]
    #[schemars(with = "Vec<RawWorkload>")]
    pub workloads: Vec<S<RawWorkload>>,
    #[serde(default)]
    #[schemars(with = "Vec<RawEndpoint>")]
    pub endpoints: Vec<S<RawEndpoint>>,
    #[serde(default)]
    #[schemars(with = "Vec<RawRule>")]
    pub rules: Vec<S<RawRule>>,
    /// The Rego module that decides this document's credential requests.
    #[schemars(with = "Option<RawIssuance>")]
    pub issuance: Option<S<RawIssuance>>,
    /// Issuers whose tokens a credential request may carry (a person's, a workload's).
    #[serde(default)]
    #[schemars(with = "Vec<RawTrustedIssuer>")]
    pub trusted_issuers: Vec<S<RawTrustedIssuer>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTrustedIssuer {
    #[schemars(with = "Option<String>")]
    pub name: Option<S<String>>,
    /// The tokens' `iss`, exactly.
    #[schemars(with = "Option<String>")]
    pub issuer: Option<S<String>>,
    /// What the tokens' `aud` must hold (one of these).
    #[schemars(with = "Option<Vec<String>>")]
    pub audiences: Option<S<Vec<S<String>>>>,
    #[schemars(with = "Option<RawJwks>")]
    pub jwks: Option<S<RawJwks>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawJwks {
    /// A JWKS file, relative to the policy file.
    #[schemars(with = "Option<String>")]
    pub file: Option<S<String>>,
    /// An `https://` URL (not supported yet: refused with a hint).
    #[schemars(with = "Option<String>")]
    pub url: Option<S<String>>,
}

/// A rule's `match:`: what a credential request must carry besides its workload's identity.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRuleMatch {
    #[schemars(with = "Option<RawTokenMatch>")]
    pub token: Option<S<RawTokenMatch>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTokenMatch {
    /// A trusted issuer's name.
    #[schemars(with = "Option<String>")]
    pub issuer: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub subject: Option<S<String>>,
    #[schemars(with = "Option<BTreeMap<String, String>>")]
    pub claims: Option<S<BTreeMap<String, S<String>>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawIssuance {
    /// The module's file, relative to the policy file.
    #[schemars(with = "Option<String>")]
    pub rego: Option<S<String>>,
    /// A rule path such as `data.tessera.issuance.decision`.
    #[schemars(with = "Option<String>")]
    pub query: Option<S<String>>,
    /// The evaluation budget, a duration such as `100ms`.
    #[schemars(with = "Option<String>")]
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawWorkload {
    #[schemars(with = "Option<String>")]
    pub name: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub spiffe_id: Option<S<String>>,
    #[serde(rename = "match")]
    #[schemars(with = "Option<RawMatch>")]
    pub selectors: Option<S<RawMatch>>,
    /// `open` (default) or `allowlist`.
    #[schemars(with = "Option<String>")]
    pub egress: Option<S<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMatch {
    #[schemars(with = "Option<String>")]
    pub cgroup: Option<S<String>>,
    /// Signed so that a negative uid gets our message, not serde's.
    #[schemars(with = "Option<i64>")]
    pub uid: Option<S<i64>>,
    #[schemars(with = "Option<i64>")]
    pub gid: Option<S<i64>>,
    #[schemars(with = "Option<String>")]
    pub systemd_unit: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub exe: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub exe_sha256: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub container: Option<S<String>>,
    #[schemars(with = "Option<RawK8s>")]
    pub k8s: Option<S<RawK8s>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawK8s {
    #[schemars(with = "Option<String>")]
    pub namespace: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub service_account: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub pod_name: Option<S<String>>,
    #[schemars(with = "Option<BTreeMap<String, String>>")]
    pub pod_labels: Option<S<BTreeMap<String, S<String>>>>,
    #[schemars(with = "Option<String>")]
    pub container_name: Option<S<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawEndpoint {
    #[schemars(with = "Option<String>")]
    pub name: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub kind: Option<S<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub addresses: Option<S<Vec<S<String>>>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub hosts: Option<S<Vec<S<String>>>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub audiences: Option<S<Vec<S<String>>>>,
    /// Signed and wide so that 0, -1 and 70000 get our message, not serde's.
    #[schemars(with = "Option<Vec<i64>>")]
    pub ports: Option<S<Vec<S<i64>>>>,
    #[schemars(with = "Option<String>")]
    pub protocol: Option<S<String>>,
    #[schemars(with = "Option<BTreeMap<String, String>>")]
    pub labels: Option<S<BTreeMap<String, S<String>>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRule {
    #[schemars(with = "Option<String>")]
    pub name: Option<S<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub workloads: Option<S<Vec<S<String>>>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub endpoints: Option<S<Vec<S<String>>>>,
    #[schemars(with = "Option<RawCredential>")]
    pub credential: Option<S<RawCredential>>,
    #[schemars(with = "Option<String>")]
    pub mode: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub connections: Option<S<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub scopes: Option<S<Vec<S<String>>>>,
    #[serde(rename = "match")]
    #[schemars(with = "Option<RawRuleMatch>")]
    pub selectors: Option<S<RawRuleMatch>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCredential {
    #[schemars(with = "Option<bool>")]
    pub required: Option<S<bool>>,
    #[schemars(with = "Option<String>")]
    pub max_ttl: Option<S<String>>,
    #[schemars(with = "Option<String>")]
    pub bind: Option<S<String>>,
    #[schemars(with = "Option<bool>")]
    pub keep_on_exec: Option<S<bool>>,
}

/// Where an unknown key was found, for error messages: the mapping's name, its supported keys
/// and the keys it recognises but does not support yet. `fields` lists them all, in the order
/// serde reports them (declaration order), so a serde "unknown field" error can be traced back.
pub(super) struct FieldSet {
    pub context: &'static str,
    pub fields: &'static [&'static str],
    pub unsupported: &'static [&'static str],
}

pub(super) const FIELD_SETS: &[FieldSet] = &[
    FieldSet {
        context: "policy document",
        fields: &["apiVersion", "kind", "metadata", "spec"],
        unsupported: &[],
    },
    FieldSet {
        context: "metadata",
        fields: &["name"],
        unsupported: &[],
    },
    FieldSet {
        context: "spec",
        fields: &[
            "trustDomain",
            "mode",
            "workloads",
            "endpoints",
            "rules",
            "issuance",
            "trustedIssuers",
        ],
        unsupported: &[],
    },
    FieldSet {
        context: "workload",
        fields: &["name", "spiffeId", "match", "egress"],
        unsupported: &[],
    },
    FieldSet {
        context: "workload match",
        fields: &[
            "cgroup",
            "uid",
            "gid",
            "systemdUnit",
            "exe",
            "exeSha256",
            "container",
            "k8s",
        ],
        unsupported: &[],
    },
    FieldSet {
        context: "k8s selector",
        fields: &[
            "namespace",
            "serviceAccount",
            "podName",
            "podLabels",
            "containerName",
        ],
        unsupported: &[],
    },
    FieldSet {
        context: "endpoint",
        fields: &[
            "name",
            "kind",
            "addresses",
            "hosts",
            "audiences",
            "ports",
            "protocol",
            "labels",
        ],
        unsupported: &[],
    },
    FieldSet {
        context: "rule",
        fields: &[
            "name",
            "workloads",
            "endpoints",
            "credential",
            "mode",
            "connections",
            "scopes",
            "match",
        ],
        unsupported: &[],
    },
    FieldSet {
        context: "trusted issuer",
        fields: &["name", "issuer", "audiences", "jwks"],
        unsupported: &[],
    },
    FieldSet {
        context: "trusted issuer jwks",
        fields: &["file", "url"],
        unsupported: &[],
    },
    FieldSet {
        context: "rule match",
        fields: &["token"],
        unsupported: &[],
    },
    FieldSet {
        context: "rule match token",
        fields: &["issuer", "subject", "claims"],
        unsupported: &[],
    },
    FieldSet {
        context: "spec.issuance",
        fields: &["rego", "query", "timeout"],
        unsupported: &[],
    },
    FieldSet {
        context: "rule credential",
        fields: &["required", "maxTtl", "bind", "keepOnExec"],
        unsupported: &[],
    },
];
