//! A document's `spec.issuance`: the Rego module's file, its query and its time budget.

use serde_saphyr::Spanned;

use super::Ctx;
use crate::policy::issuance::Places;
use crate::policy::issuance::{DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::policy::raw::RawIssuance;
use crate::policy::{IssuanceModule, PolicyError};

/// The compiled module, or `None` after reporting what is wrong (in the policy file, or in the
/// module with its own `FILE:LINE:COL`).
pub(super) fn check(ctx: &mut Ctx<'_, '_>, raw: &Spanned<RawIssuance>) -> Option<IssuanceModule> {
    let loc = raw.referenced;
    let raw = &raw.value;
    let Some(rego) = &raw.rego else {
        ctx.error(
            loc,
            "spec.issuance has no rego".into(),
            "add rego: issuance.rego (a path relative to this policy file)",
        );
        return None;
    };
    if rego.value.trim().is_empty() {
        ctx.error(
            rego.referenced,
            "spec.issuance.rego is empty".into(),
            "give the module's path, relative to this policy file",
        );
        return None;
    }
    let query = match &raw.query {
        Some(q) if !q.value.starts_with("data.") || q.value.contains(char::is_whitespace) => {
            ctx.error(
                q.referenced,
                format!("query `{}` is not a rule path", q.value),
                "write data.<package>.<rule>, e.g. data.tessera.issuance.decision",
            );
            return None;
        }
        q => q,
    };
    let timeout = match &raw.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => match humantime::parse_duration(&t.value) {
            Ok(d) if !d.is_zero() && d <= MAX_TIMEOUT => d,
            _ => {
                ctx.error(
                    t.referenced,
                    format!("timeout `{}` is not a duration from 1ms to 5s", t.value),
                    format!(
                        "write e.g. 100ms (the default is {} ms)",
                        DEFAULT_TIMEOUT.as_millis()
                    ),
                );
                return None;
            }
        },
    };
    let file = ctx.file;
    let path = file
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(&rego.value);
    let at_rego = rego.referenced;
    let at_query = query.as_ref().map_or(loc, |q| q.referenced);
    let compiled = IssuanceModule::compile(
        &path,
        query.as_ref().map(|q| q.value.as_str()),
        timeout,
        Places {
            rego: &|message, hint| PolicyError::at(file, at_rego, message, hint),
            query: &|message, hint| PolicyError::at(file, at_query, message, hint),
        },
    );
    match compiled {
        Ok(m) => Some(m),
        Err(e) => {
            ctx.push(e);
            None
        }
    }
}
