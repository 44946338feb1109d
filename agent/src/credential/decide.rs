//! Request-time issuance decisions: the scopes a request may get from its rule, and the
//! rule's issuance module (Rego) asked with the request's whole context. Its input and result
//! are the contract documented in the README and `docs/issuance-input.schema.json`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use tracing::{info, warn};

use super::api::TokenRequest;
use super::external::Verified;
use super::registry::CredentialInfo;
use super::service::Refusal;
use crate::identity::evidence::Evidence;
use crate::policy::issuance::EvalFailure;
use crate::policy::{CredentialPolicy, Endpoint, IssuanceModule, Rule, Workload};

/// One credential request that a rule with an issuance module matched.
pub(crate) struct Asked<'a> {
    pub workload: &'a Workload,
    pub evidence: &'a Evidence,
    pub endpoint: &'a Endpoint,
    pub rule: &'a Rule,
    pub credential: CredentialPolicy,
    pub request: &'a TokenRequest,
    pub task: Option<&'a str>,
    /// The TTL and scopes it gets unless the module narrows them.
    pub ttl_seconds: u64,
    pub scopes: &'a [String],
    pub now: SystemTime,
    pub history: History,
    /// The verified `subject_token`: the person the workload acts for.
    pub on_behalf_of: Option<&'a Verified>,
    /// The verified `evidence_tokens`.
    pub evidence_tokens: &'a [Verified],
}

/// What the module was given (`input`).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Input<'a> {
    pub workload: WorkloadInput<'a>,
    pub endpoint: EndpointInput<'a>,
    pub rule: RuleInput<'a>,
    pub request: RequestInput<'a>,
    pub time: TimeInput,
    pub history: History,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct WorkloadInput<'a> {
    pub name: &'a str,
    pub spiffe_id: String,
    pub evidence: EvidenceInput<'a>,
}

/// The attestation's evidence, flattened for policies: null where the process has none.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct EvidenceInput<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    pub cgroup: &'a str,
    pub exe: Option<&'a str>,
    pub sha256: Option<&'a str>,
    /// The innermost systemd unit.
    pub unit: Option<&'a str>,
    /// The innermost container's id.
    pub container: Option<&'a str>,
    pub pod: Option<PodInput<'a>>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct PodInput<'a> {
    pub uid: &'a str,
    /// Known when the agent watches the API server; null otherwise.
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct EndpointInput<'a> {
    pub name: &'a str,
    pub kind: &'static str,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct RuleInput<'a> {
    pub name: &'a str,
    pub max_ttl_seconds: u64,
    pub bind: &'static str,
    pub scopes: &'a [String],
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct RequestInput<'a> {
    /// The token audience asked for (the endpoint's name or one of its `audiences:`).
    pub audience: &'a str,
    pub task: Option<&'a str>,
    /// What the token will live if the module does not shorten it (the request's, or the
    /// rule's maxTtl).
    pub ttl_seconds: u64,
    /// What the token will carry if the module does not narrow them (the request's, or all
    /// of the rule's).
    pub scopes: &'a [String],
    /// Whether the caller named its scopes (false: `scopes` are the rule's default).
    pub scopes_requested: bool,
    /// On whose behalf (delegation): the verified `subject_token` (issuer, iss, sub, exp,
    /// claims); null when the workload acts for itself.
    pub on_behalf_of: Option<&'a Verified>,
    /// The verified `evidence_tokens`, in the request's order.
    pub evidence_tokens: &'a [Verified],
    /// The parent credential (agent-to-agent chains): not supported yet, always null.
    pub parent: Option<()>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct TimeInput {
    pub unix: u64,
    pub rfc3339: String,
}

/// What the agent remembers of the workload's credentials.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct History {
    /// Neither expired nor revoked, oldest first.
    pub active: Vec<HeldCredential>,
    /// Issued in the 60 s before this request (expired and revoked ones included).
    pub issued_last_minute: usize,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct HeldCredential {
    pub jti: String,
    pub audience: String,
    pub task: String,
    pub bind: &'static str,
    pub pid: u32,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// The module's answer. Unknown keys are an error, so a misspelt `ttl_second` cannot pass
/// silently.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModuleResult {
    pub allow: bool,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// What the request gets once the module has said yes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub ttl_seconds: u64,
    pub scopes: Vec<String>,
    pub reasons: Vec<String>,
}

/// Why the module's answer is a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `allow: false`, with its reasons.
    Denied(Vec<String>),
    /// No usable answer: the metric label and what went wrong.
    Failed(&'static str, String),
}

/// The scopes a request gets from `rule` before any module: the ones it asked for (each one
/// the rule lists), or all of the rule's. `Err`: the scopes the rule does not offer.
pub(crate) fn requested_scopes(
    rule: &Rule,
    asked: Option<&[String]>,
) -> Result<Vec<String>, Vec<String>> {
    let Some(asked) = asked else {
        return Ok(rule.scopes.clone());
    };
    let unknown: Vec<String> = asked
        .iter()
        .filter(|s| !rule.scopes.contains(s))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(unknown);
    }
    let mut scopes: Vec<String> = Vec::new();
    for s in asked {
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    Ok(scopes)
}

impl History {
    /// From the registry's credentials of one workload (`mine`: every record it still keeps).
    pub(crate) fn of(mine: &[CredentialInfo], now: SystemTime) -> History {
        let minute_ago = now
            .checked_sub(std::time::Duration::from_secs(60))
            .unwrap_or(UNIX_EPOCH);
        let mut active: Vec<HeldCredential> = mine
            .iter()
            .filter(|c| !c.revoked && c.expires_at > now)
            .map(|c| HeldCredential {
                jti: c.jti.clone(),
                audience: c.audience.clone(),
                task: c.task.clone(),
                bind: c.bind.as_str(),
                pid: c.pid,
                issued_at: unix(c.issued_at),
                expires_at: unix(c.expires_at),
            })
            .collect();
        active.sort_by(|a, b| (a.issued_at, &a.jti).cmp(&(b.issued_at, &b.jti)));
        History {
            active,
            issued_last_minute: mine.iter().filter(|c| c.issued_at >= minute_ago).count(),
        }
    }
}

impl<'a> EvidenceInput<'a> {
    pub(crate) fn of(ev: &'a Evidence) -> Self {
        let k8s = ev.kubernetes.as_ref();
        EvidenceInput {
            pid: ev.pid,
            comm: &ev.comm,
            uid: ev.uid.real,
            gid: ev.gid.real,
            groups: &ev.groups,
            cgroup: &ev.cgroup,
            exe: ev.exe.as_ref().map(|e| e.path.as_str()),
            sha256: ev.exe.as_ref().and_then(|e| e.hash.sha256()),
            unit: ev.systemd_unit().map(|u| u.name.as_str()),
            container: ev.container.as_ref().map(|c| c.id.as_str()),
            pod: ev.pod.as_ref().map(|p| PodInput {
                uid: &p.uid,
                namespace: k8s.map(|m| m.namespace.as_str()),
                name: k8s.map(|m| m.name.as_str()),
                service_account: k8s.map(|m| m.service_account.as_str()),
                labels: k8s.map(|m| &m.labels),
            }),
        }
    }
}

impl TimeInput {
    pub(crate) fn of(now: SystemTime) -> Self {
        TimeInput {
            unix: unix(now),
            rfc3339: humantime::format_rfc3339_seconds(now).to_string(),
        }
    }
}

impl Asked<'_> {
    fn input(&self) -> Input<'_> {
        Input {
            workload: WorkloadInput {
                name: &self.workload.name,
                spiffe_id: self.workload.spiffe_id.to_string(),
                evidence: EvidenceInput::of(self.evidence),
            },
            endpoint: EndpointInput {
                name: &self.endpoint.name,
                kind: self.endpoint.kind.as_str(),
                labels: &self.endpoint.labels,
            },
            rule: RuleInput {
                name: &self.rule.name,
                max_ttl_seconds: self.credential.max_ttl.as_secs().max(1),
                bind: self.credential.bind.as_str(),
                scopes: &self.rule.scopes,
            },
            request: RequestInput {
                audience: &self.request.audience,
                task: self.task,
                ttl_seconds: self.ttl_seconds,
                scopes: self.scopes,
                scopes_requested: self.request.scopes.is_some(),
                on_behalf_of: self.on_behalf_of,
                evidence_tokens: self.evidence_tokens,
                parent: None,
            },
            time: TimeInput::of(self.now),
            history: self.history.clone(),
        }
    }
}

/// Asks `module` about `asked`: the metric label of its answer (`allow`, `deny`, `error`,
/// `timeout`, `undefined`, `invalid_result`), and the grant or the refusal (logged).
pub(crate) fn decide(
    module: &IssuanceModule,
    asked: &Asked<'_>,
) -> (&'static str, Result<Grant, Refusal>) {
    let (workload, endpoint) = (&asked.workload.spiffe_id, &asked.endpoint.name);
    match ask(module, &asked.input()) {
        Ok(grant) => ("allow", Ok(grant)),
        Err(Verdict::Denied(reasons)) => {
            info!(%workload, endpoint, rule = %asked.rule.name, ?reasons, "issuance module denied a credential");
            let error = format!(
                "the issuance module {} denied the request: {}",
                module.path.display(),
                reasons.join("; ")
            );
            ("deny", Err(Refusal::PolicyDenied { error, reasons }))
        }
        Err(Verdict::Failed(kind, why)) => {
            warn!(%workload, endpoint, module = %module.path.display(), kind, error = %why, "issuance module gave no answer: denied");
            let refusal = Refusal::PolicyDenied {
                error: format!("{why}; without an answer the request is denied"),
                reasons: vec![format!("module_{kind}: {why}")],
            };
            (kind, Err(refusal))
        }
    }
}

/// Asks `module` about `input`; the answer may only narrow what the request would get.
pub(crate) fn ask(module: &IssuanceModule, input: &Input<'_>) -> Result<Grant, Verdict> {
    let json = serde_json::to_value(input)
        .map_err(|e| Verdict::Failed("error", format!("cannot build the module's input: {e}")))?;
    let value = match module.evaluate(&json) {
        Ok(Some(value)) => value,
        Ok(None) => {
            return Err(Verdict::Failed(
                "undefined",
                format!("{} is undefined for this request", module.query),
            ));
        }
        Err(e @ EvalFailure::Timeout(_)) => return Err(Verdict::Failed("timeout", e.to_string())),
        Err(e @ EvalFailure::Error(_)) => return Err(Verdict::Failed("error", e.to_string())),
    };
    let result: ModuleResult = serde_json::from_value(value).map_err(|e| {
        Verdict::Failed(
            "invalid_result",
            format!(
                "{} is not {{allow: bool, reasons: [string], ttl_seconds?: int, scopes?: [string]}}: {e}",
                module.query
            ),
        )
    })?;
    if !result.allow {
        let reasons = if result.reasons.is_empty() {
            vec!["denied by the issuance module (it gave no reason)".to_owned()]
        } else {
            result.reasons
        };
        return Err(Verdict::Denied(reasons));
    }
    let ttl = input.request.ttl_seconds;
    let ttl_seconds = match result.ttl_seconds {
        None => ttl,
        Some(t) if (1..=ttl).contains(&t) => t,
        Some(t) => {
            return Err(Verdict::Failed(
                "invalid_result",
                format!(
                    "the module's ttl_seconds {t} is not from 1 to the request's {ttl}: it may only shorten"
                ),
            ));
        }
    };
    let scopes = match result.scopes {
        None => input.request.scopes.to_vec(),
        Some(narrowed) => {
            if let Some(extra) = narrowed.iter().find(|s| !input.request.scopes.contains(s)) {
                return Err(Verdict::Failed(
                    "invalid_result",
                    format!(
                        "the module's scopes add `{extra}`, which the request would not get: it may only remove scopes"
                    ),
                ));
            }
            // In the request's order, each once.
            input
                .request
                .scopes
                .iter()
                .filter(|s| narrowed.contains(s))
                .cloned()
                .collect()
        }
    };
    Ok(Grant {
        ttl_seconds,
        scopes,
        reasons: result.reasons,
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests;
