//! One rule: the workloads and endpoints it names (in its own document), its credential
//! terms and its mode.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::{Ctx, LocalNames, Origin, check_name, parse_mode};
use crate::policy::raw::{RawCredential, RawRule, S};
use crate::policy::{
    Bind, ConnectionLifetime, CredentialPolicy, EndpointId, Mode, Rule, WorkloadId,
};

/// The longest credential lifetime a rule may allow.
const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// What a rule's names can refer to: the valid and invalid items of its own document, and
/// those of the documents before it (to say where a name lives when it is not here).
pub(super) struct Resolver<'r, 'a> {
    pub workloads: &'r LocalNames<WorkloadId>,
    pub endpoints: &'r LocalNames<EndpointId>,
    /// The document's trusted issuers (`match.token.issuer` names one).
    pub issuers: &'r LocalNames<()>,
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
    let connections = check_connections(ctx, raw.connections.as_ref(), &credential);
    let credential = match (credential, connections) {
        (Some(Some(c)), Some(connections)) => Some(Some(CredentialPolicy { connections, ..c })),
        (Some(None), Some(_)) => Some(None),
        _ => None,
    };
    let mode = match &raw.mode {
        None => Some(document_mode),
        Some(m) => parse_mode(ctx, Some(m)),
    };
    let scopes = check_scopes(ctx, raw.scopes.as_ref(), &credential);
    let token_match =
        super::issuers::check_token_match(ctx, raw.selectors.as_ref(), &credential, names.issuers);
    Some(Rule {
        name: name?,
        workloads: workloads?,
        endpoints: endpoints?,
        credential: credential?,
        mode: mode?,
        scopes: scopes?,
        issuance: None,
        token_match: token_match?,
    })
}

/// `scopes:`: unique OAuth scope tokens (printable ASCII without spaces, quotes or `\`,
/// RFC 6749 3.3), on a rule that issues credentials.
fn check_scopes(
    ctx: &mut Ctx<'_, '_>,
    raw: Option<&S<Vec<S<String>>>>,
    credential: &Option<Option<CredentialPolicy>>,
) -> Option<Vec<String>> {
    let Some(raw) = raw else {
        return Some(Vec::new());
    };
    if matches!(credential, Some(None)) {
        ctx.error(
            raw.referenced,
            "scopes on a rule that requires no credential".into(),
            "add credential: {required: true, ...}, or remove scopes: (no token carries them)",
        );
        return None;
    }
    let mut scopes: Vec<String> = Vec::new();
    let mut ok = true;
    for scope in &raw.value {
        let s = &scope.value;
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
        if !valid {
            ctx.error(
                scope.referenced,
                format!("invalid scope `{s}`"),
                "use 1 to 128 printable characters without spaces, `\"` or `\\`, e.g. secrets:read",
            );
            ok = false;
        } else if scopes.contains(s) {
            ctx.error(
                scope.referenced,
                format!("scope `{s}` is listed twice"),
                "list each scope once",
            );
            ok = false;
        } else {
            scopes.push(s.clone());
        }
    }
    ok.then_some(scopes)
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
            ("keepOnExec", c.keep_on_exec.as_ref().map(|s| s.referenced)),
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
            "process-tree" => Some(Bind::ProcessTree),
            other => {
                ctx.error(
                    b.referenced,
                    format!("unknown bind `{other}`"),
                    "use process, process-tree or workload",
                );
                None
            }
        },
    };
    let keep_on_exec = match (&c.keep_on_exec, bind) {
        (None, _) => Some(false),
        (Some(keep), Some(Bind::Process)) => Some(keep.value),
        (Some(keep), Some(other)) if keep.value => {
            ctx.error(
                keep.referenced,
                format!("keepOnExec applies to bind: process, not bind: {other}"),
                "remove keepOnExec, or use bind: process",
            );
            None
        }
        // `keepOnExec: false` is the default whatever the bind.
        (Some(_), Some(_)) => Some(false),
        // The bind is wrong, already reported.
        (Some(_), None) => None,
    };
    Some(Some(CredentialPolicy {
        max_ttl: max_ttl?,
        bind: bind?,
        keep_on_exec: keep_on_exec?,
        connections: ConnectionLifetime::default(),
    }))
}

/// The rule's `connections:` (default `end-with-credential`); only a rule that requires a
/// credential may name it. `credential` is what `check_credential` made of the rule's.
fn check_connections(
    ctx: &mut Ctx<'_, '_>,
    raw: Option<&S<String>>,
    credential: &Option<Option<CredentialPolicy>>,
) -> Option<ConnectionLifetime> {
    let Some(raw) = raw else {
        return Some(ConnectionLifetime::default());
    };
    let lifetime = match raw.value.as_str() {
        "end-with-credential" => ConnectionLifetime::EndWithCredential,
        "outlive" => ConnectionLifetime::Outlive,
        other => {
            ctx.error(
                raw.referenced,
                format!("unknown connections `{other}`"),
                "use end-with-credential (the default: a connection ends with its credential) \
                 or outlive",
            );
            return None;
        }
    };
    if matches!(credential, Some(None)) {
        ctx.error(
            raw.referenced,
            "`connections` has no effect on a rule that requires no credential".into(),
            "remove connections, or set credential: {required: true, maxTtl: ...}",
        );
        return None;
    }
    Some(lifetime)
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
mod tests;
