//! A document's `spec.trustedIssuers` (name, `issuer`, `audiences`, `jwks`), and a rule's
//! `match.token`, which names one of them.

use std::collections::BTreeMap;

use serde_saphyr::{Location, Spanned};

use super::{Ctx, LocalNames, check_name};
use crate::policy::raw::{RawRuleMatch, RawTrustedIssuer, S};
use crate::policy::{CredentialPolicy, TokenMatch, TrustedIssuer};

/// The issuer with its keys read, or `None` after reporting what is wrong.
pub(super) fn check(
    ctx: &mut Ctx<'_, '_>,
    raw: &Spanned<RawTrustedIssuer>,
) -> Option<TrustedIssuer> {
    let loc = raw.referenced;
    let raw = &raw.value;
    let name = check_name(ctx, raw.name.as_ref(), "trusted issuer", loc);
    let issuer = match &raw.issuer {
        None => {
            ctx.error(
                loc,
                "trusted issuer has no issuer".into(),
                "add issuer: https://login.example.org (the tokens' `iss`, exactly)",
            );
            None
        }
        Some(i) if i.value.is_empty() || i.value.chars().any(char::is_whitespace) => {
            ctx.error(
                i.referenced,
                format!("issuer `{}` is empty or has white space", i.value),
                "write the tokens' `iss` exactly, e.g. https://token.actions.githubusercontent.com",
            );
            None
        }
        Some(i) => Some(i.value.clone()),
    };
    let audiences = match &raw.audiences {
        None => {
            ctx.error(
                loc,
                "trusted issuer has no audiences".into(),
                "add audiences: [tessera] (a token's `aud` must hold one of them)",
            );
            None
        }
        Some(list) if list.value.is_empty() => {
            ctx.error(
                list.referenced,
                "audiences is empty".into(),
                "list at least one audience the tokens are issued for",
            );
            None
        }
        Some(list) => {
            let mut out: Vec<String> = Vec::new();
            let mut ok = true;
            for a in &list.value {
                if a.value.is_empty() || out.contains(&a.value) {
                    ctx.error(
                        a.referenced,
                        format!("audience `{}` is empty or listed twice", a.value),
                        "list each audience once",
                    );
                    ok = false;
                } else {
                    out.push(a.value.clone());
                }
            }
            ok.then_some(out)
        }
    };
    let jwks = jwks_path(ctx, raw, loc);
    let (name, issuer, audiences, (jwks, jwks_loc)) = (name?, issuer?, audiences?, jwks?);
    match TrustedIssuer::load(name, issuer, audiences, jwks) {
        Ok(t) => Some(t),
        Err(e) => {
            ctx.error(
                jwks_loc,
                e,
                "give a JWKS file ({\"keys\": [...]}) of the issuer's public signing keys",
            );
            None
        }
    }
}

/// The JWKS file joined to the policy file's directory, and where `file:` is.
fn jwks_path(
    ctx: &mut Ctx<'_, '_>,
    raw: &RawTrustedIssuer,
    loc: Location,
) -> Option<(std::path::PathBuf, Location)> {
    let Some(jwks) = &raw.jwks else {
        ctx.error(
            loc,
            "trusted issuer has no jwks".into(),
            "add jwks: {file: issuer.jwks.json} (relative to this policy file)",
        );
        return None;
    };
    if let Some(url) = &jwks.value.url {
        ctx.error(
            url.referenced,
            "jwks.url is not supported yet".into(),
            "download the issuer's JWKS to a file and write jwks: {file: PATH} (re-read when a token names a new key)",
        );
        return None;
    }
    let Some(file) = jwks
        .value
        .file
        .as_ref()
        .filter(|f| !f.value.trim().is_empty())
    else {
        ctx.error(
            jwks.referenced,
            "jwks has no file".into(),
            "write jwks: {file: PATH}, relative to this policy file",
        );
        return None;
    };
    let dir = ctx.file.parent().unwrap_or(std::path::Path::new("."));
    Some((dir.join(&file.value), file.referenced))
}

/// A rule's `match:`: `Some(None)` when there is none; `None` after reporting what is wrong.
pub(super) fn check_token_match(
    ctx: &mut Ctx<'_, '_>,
    raw: Option<&S<RawRuleMatch>>,
    credential: &Option<Option<CredentialPolicy>>,
    issuers: &LocalNames<()>,
) -> Option<Option<TokenMatch>> {
    let Some(raw) = raw else {
        return Some(None);
    };
    let Some(token) = &raw.value.token else {
        ctx.error(
            raw.referenced,
            "rule match: has no selector".into(),
            "write match: {token: {issuer: NAME, claims: {...}}}, or remove match:",
        );
        return None;
    };
    if matches!(credential, Some(None)) {
        ctx.error(
            raw.referenced,
            "match: on a rule that requires no credential".into(),
            "match.token is checked when a credential is asked for: add credential: {required: true, ...}",
        );
        return None;
    }
    let t = &token.value;
    let Some(issuer) = &t.issuer else {
        ctx.error(
            token.referenced,
            "match.token has no issuer".into(),
            "add issuer: NAME, a trusted issuer of this document",
        );
        return None;
    };
    let name = issuer.value.as_str();
    if !issuers.valid.contains_key(name) {
        if !issuers.invalid.contains(name) {
            let mut known: Vec<&str> = issuers.valid.keys().map(String::as_str).collect();
            known.sort_unstable();
            let hint = if known.is_empty() {
                "this document defines no trusted issuers; add one under spec.trustedIssuers"
                    .to_owned()
            } else {
                format!("trusted issuers of this document: {}", known.join(", "))
            };
            ctx.error(
                issuer.referenced,
                format!("unknown trusted issuer `{name}`"),
                hint,
            );
        }
        return None;
    }
    let claims: BTreeMap<String, String> = t
        .claims
        .as_ref()
        .map(|c| {
            c.value
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect()
        })
        .unwrap_or_default();
    Some(Some(TokenMatch {
        issuer: name.to_owned(),
        subject: t.subject.as_ref().map(|s| s.value.clone()),
        claims,
    }))
}
