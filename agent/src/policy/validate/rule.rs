//! One rule: the workloads and endpoints it names (in its own document), its credential
//! terms and its mode.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::{Ctx, LocalNames, Origin, check_name, parse_mode};
use crate::policy::raw::{RawCredential, RawRule, S};
use crate::policy::{Bind, CredentialPolicy, EndpointId, Mode, Rule, WorkloadId};

/// The longest credential lifetime a rule may allow.
const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// What a rule's names can refer to: the valid and invalid items of its own document, and
/// those of the documents before it (to say where a name lives when it is not here).
pub(super) struct Resolver<'r, 'a> {
    pub workloads: &'r LocalNames<WorkloadId>,
    pub endpoints: &'r LocalNames<EndpointId>,
    pub other_workloads: &'r HashMap<String, Origin<'a>>,
    pub other_endpoints: &'r HashMap<String, Origin<'a>>,
}

/// The rule, or `None` if something was wrong or it names an invalid item (errors are in
/// `ctx`). `mode` is its document's. Set-wide checks (unique names, overlaps) are the caller's.
pub(super) fn check(
    ctx: &mut Ctx<'_, '_>,
    raw: &Spanned<RawRule>,
    document_mode: Mode,
    names: &Resolver<'_, '_>,
) -> Option<Rule> {
    let loc = raw.referenced;
    let raw = &raw.value;
    let name = check_name(ctx, raw.name.as_ref(), "rule", loc);
    let workloads = resolve(
        ctx,
        raw.workloads.as_ref(),
        "workload",
        "workloads",
        loc,
        names.workloads,
        names.other_workloads,
    );
    let endpoints = resolve(
        ctx,
        raw.endpoints.as_ref(),
        "endpoint",
        "endpoints",
        loc,
        names.endpoints,
        names.other_endpoints,
    );
    let credential = match &raw.credential {
        None => Some(None),
        Some(c) => check_credential(ctx, c),
    };
    let mode = match &raw.mode {
        None => Some(document_mode),
        Some(m) => parse_mode(ctx, Some(m)),
    };
    Some(Rule {
        name: name?,
        workloads: workloads?,
        endpoints: endpoints?,
        credential: credential?,
        mode: mode?,
    })
}

/// Ids for a rule's list of names; `None` if the list is missing, empty or has a bad name.
fn resolve<Id: Copy + Eq + Hash>(
    ctx: &mut Ctx<'_, '_>,
    list: Option<&S<Vec<S<String>>>>,
    what: &str,
    key: &str,
    rule_loc: Location,
    local: &LocalNames<Id>,
    elsewhere: &HashMap<String, Origin<'_>>,
) -> Option<Vec<Id>> {
    let list = match list {
        Some(list) if !list.value.is_empty() => list,
        Some(list) => {
            ctx.error(
                list.referenced,
                format!("{key} is empty"),
                format!("name at least one {what} of this document"),
            );
            return None;
        }
        None => {
            ctx.error(
                rule_loc,
                format!("rule has no {key}"),
                format!("add {key}: [name, ...] naming {what}s of this document"),
            );
            return None;
        }
    };
    let mut ok = true;
    let mut ids = Vec::with_capacity(list.value.len());
    for name in &list.value {
        let n = name.value.as_str();
        if let Some(&id) = local.valid.get(n) {
            if ids.contains(&id) {
                ctx.error(
                    name.referenced,
                    format!("{what} `{n}` is listed twice"),
                    "list each name once",
                );
                ok = false;
            } else {
                ids.push(id);
            }
        } else if local.invalid.contains(n) {
            // Its own error is reported already; the rule cannot be built without it.
            ok = false;
        } else if let Some(origin) = elsewhere.get(n) {
            ctx.error(
                name.referenced,
                format!("{what} `{n}` is defined in another document ({origin})"),
                format!("a rule may only name {what}s of its own document; move the rule there"),
            );
            ok = false;
        } else {
            let mut known: Vec<&str> = local.valid.keys().map(String::as_str).collect();
            known.sort_unstable();
            let hint = if known.is_empty() {
                format!("this document defines no {what}s; add one under spec.{key}")
            } else {
                format!("{what}s of this document: {}", known.join(", "))
            };
            ctx.error(name.referenced, format!("unknown {what} `{n}`"), hint);
            ok = false;
        }
    }
    ok.then_some(ids)
}

/// `Some(None)` for `required: false`; `None` if something was wrong.
fn check_credential(
    ctx: &mut Ctx<'_, '_>,
    raw: &Spanned<RawCredential>,
) -> Option<Option<CredentialPolicy>> {
    let loc = raw.referenced;
    let c = &raw.value;
    let Some(required) = &c.required else {
        ctx.error(
            loc,
            "credential has no `required`".into(),
            "add required: true (with maxTtl) or required: false (allowlisted, no credential)",
        );
        return None;
    };
    if !required.value {
        let extra = [
            ("maxTtl", c.max_ttl.as_ref().map(|s| s.referenced)),
            ("bind", c.bind.as_ref().map(|s| s.referenced)),
        ];
        let mut ok = true;
        for (key, at) in extra {
            if let Some(at) = at {
                ctx.error(
                    at,
                    format!("`{key}` has no effect when required is false"),
                    format!("remove {key}, or set required: true"),
                );
                ok = false;
            }
        }
        return ok.then_some(None);
    }
    let max_ttl = match &c.max_ttl {
        None => {
            ctx.error(
                loc,
                "credential with required: true has no maxTtl".into(),
                "add maxTtl: 10m (the longest lifetime of a credential, at most 24h)",
            );
            None
        }
        Some(ttl) => check_ttl(ctx, ttl),
    };
    let bind = match &c.bind {
        None => Some(Bind::Process),
        Some(b) => match b.value.as_str() {
            "process" => Some(Bind::Process),
            "workload" => Some(Bind::Workload),
            "process-tree" => {
                ctx.error(
                    b.referenced,
                    "bind `process-tree` is not supported yet".into(),
                    "use bind: process (the asking process) or bind: workload (all its processes)",
                );
                None
            }
            other => {
                ctx.error(
                    b.referenced,
                    format!("unknown bind `{other}`"),
                    "use process or workload",
                );
                None
            }
        },
    };
    Some(Some(CredentialPolicy {
        max_ttl: max_ttl?,
        bind: bind?,
    }))
}

fn check_ttl(ctx: &mut Ctx<'_, '_>, raw: &S<String>) -> Option<Duration> {
    let text = raw.value.trim();
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            ctx.error(
                raw.referenced,
                "maxTtl is zero".into(),
                "use a positive duration, like 10m",
            );
            None
        }
        Ok(d) if d > MAX_TTL => {
            ctx.error(
                raw.referenced,
                format!("maxTtl `{text}` is longer than 24h"),
                "use at most 24h; credentials are meant to be short-lived",
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            ctx.error(
                raw.referenced,
                format!("maxTtl `{text}` is not a duration ({e})"),
                "write a duration with a unit, like 90s, 10m or 1h",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::validate::tests::{assert_errors, with_head};

    #[test]
    fn rule_reference_errors() {
        let yaml = "apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads:
    - {name: w1, match: {uid: 1}}
    - {name: broken, match: {uid: -5}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
---
apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads:
    - {name: w2, match: {uid: 2}}
  rules:
    - name: r1
      workloads: [w2, w1, nobody, w2]
      endpoints: [e1]
    - name: r2
      workloads: []
    - {name: r3, workloads: [w2]}
---
apiVersion: tessera.dev/v1alpha1
kind: Policy
spec:
  trustDomain: example.org
  workloads:
    - {name: w3, match: {uid: 3}}
  endpoints:
    - {name: e3, addresses: [10.0.0.3]}
  rules:
    - {name: r4, workloads: [broken], endpoints: [e3]}
";
        assert_errors(
            yaml,
            &[
                "p.yaml:7:35: uid -5 is out of range — use a uid from 0 to 4294967294",
                "p.yaml:19:23: workload `w1` is defined in another document (p.yaml:6:7) — a rule may only name workloads of its own document; move the rule there",
                "p.yaml:19:27: unknown workload `nobody` — workloads of this document: w2",
                "p.yaml:19:35: workload `w2` is listed twice — list each name once",
                "p.yaml:20:19: endpoint `e1` is defined in another document (p.yaml:9:7) — a rule may only name endpoints of its own document; move the rule there",
                "p.yaml:21:7: rule has no endpoints — add endpoints: [name, ...] naming endpoints of this document",
                "p.yaml:22:18: workloads is empty — name at least one workload of this document",
                "p.yaml:23:7: rule has no endpoints — add endpoints: [name, ...] naming endpoints of this document",
                "p.yaml:34:30: unknown workload `broken` — workloads of this document: w3",
            ],
        );
    }

    #[test]
    fn credential_errors() {
        let yaml = with_head(
        "  workloads:
    - {name: w, match: {uid: 1}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
    - {name: e2, addresses: [10.0.0.2]}
    - {name: e3, addresses: [10.0.0.3]}
    - {name: e4, addresses: [10.0.0.4]}
    - {name: e5, addresses: [10.0.0.5]}
    - {name: e6, addresses: [10.0.0.6]}
    - {name: e7, addresses: [10.0.0.7]}
  rules:
    - {name: r1, workloads: [w], endpoints: [e1], credential: {maxTtl: 5m}}
    - {name: r2, workloads: [w], endpoints: [e2], credential: {required: true}}
    - {name: r3, workloads: [w], endpoints: [e3], credential: {required: true, maxTtl: 0s}}
    - {name: r4, workloads: [w], endpoints: [e4], credential: {required: true, maxTtl: 25h}}
    - {name: r5, workloads: [w], endpoints: [e5], credential: {required: true, maxTtl: 300}}
    - {name: r6, workloads: [w], endpoints: [e6], credential: {required: true, maxTtl: 5m, bind: process-tree}}
    - {name: r7, workloads: [w], endpoints: [e7], credential: {required: false, bind: workload}, mode: dryrun}
",
    );
        assert_errors(
            &yaml,
            &[
                "p.yaml:17:63: credential has no `required` — add required: true (with maxTtl) or required: false (allowlisted, no credential)",
                "p.yaml:18:63: credential with required: true has no maxTtl — add maxTtl: 10m (the longest lifetime of a credential, at most 24h)",
                "p.yaml:19:88: maxTtl is zero — use a positive duration, like 10m",
                "p.yaml:20:88: maxTtl `25h` is longer than 24h — use at most 24h; credentials are meant to be short-lived",
                "p.yaml:21:88: maxTtl `300` is not a duration (time unit needed, for example 300sec or 300ms) — write a duration with a unit, like 90s, 10m or 1h",
                "p.yaml:22:98: bind `process-tree` is not supported yet — use bind: process (the asking process) or bind: workload (all its processes)",
                "p.yaml:23:87: `bind` has no effect when required is false — remove bind, or set required: true",
                "p.yaml:23:104: unknown mode `dryrun` — use enforce or audit",
            ],
        );
    }

    #[test]
    fn overlapping_rules_and_duplicate_rule_names() {
        let yaml = with_head(
            "  workloads:
    - {name: w1, match: {uid: 1}}
    - {name: w2, match: {uid: 2}}
  endpoints:
    - {name: e1, addresses: [10.0.0.1]}
    - {name: e2, addresses: [10.0.0.2]}
  rules:
    - {name: first, workloads: [w1, w2], endpoints: [e1]}
    - {name: second, workloads: [w2], endpoints: [e2, e1]}
    - {name: first, workloads: [w1], endpoints: [e2]}
",
        );
        assert_errors(
            &yaml,
            &[
                "p.yaml:14:7: rules `first` (p.yaml:13:7) and `second` both cover workload `w2` -> endpoint `e1` — one rule per (workload, endpoint) pair; remove the pair from one of them",
                "p.yaml:15:7: rule name `first` is already used at p.yaml:13:7 — rule names must be unique across all policy files; rename one",
            ],
        );
    }
}
