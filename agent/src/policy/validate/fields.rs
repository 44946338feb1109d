//! Checks of single fields shared by documents, workloads, endpoints and rules.

use serde_saphyr::Location;

use super::Ctx;
use crate::policy::Mode;
use crate::policy::raw::S;

pub(super) const API_VERSION: &str = "tessera.dev/v1alpha1";
pub(super) const KIND: &str = "Policy";
const MAX_NAME_LEN: usize = 128;

pub(super) fn expect_literal(
    ctx: &mut Ctx<'_, '_>,
    value: Option<&S<String>>,
    doc_loc: Location,
    key: &str,
    want: &str,
) {
    match value {
        None => ctx.error(
            doc_loc,
            format!("the document has no {key}"),
            format!("add {key}: {want}"),
        ),
        Some(v) if v.value != want => ctx.error(
            v.referenced,
            format!("{key} is `{}`", v.value),
            format!("this version reads {key}: {want}"),
        ),
        Some(_) => {}
    }
}

/// `enforce` or `audit`; `None` (after reporting) for anything else, or when absent.
pub(super) fn parse_mode(ctx: &mut Ctx<'_, '_>, raw: Option<&S<String>>) -> Option<Mode> {
    let raw = raw?;
    match raw.value.as_str() {
        "enforce" => Some(Mode::Enforce),
        "audit" => Some(Mode::Audit),
        other => {
            ctx.error(
                raw.referenced,
                format!("unknown mode `{other}`"),
                "use enforce or audit",
            );
            None
        }
    }
}

/// A workload, endpoint or rule name: present, and safe in SPIFFE IDs, audiences and logs.
pub(super) fn check_name(
    ctx: &mut Ctx<'_, '_>,
    raw: Option<&S<String>>,
    what: &str,
    item_loc: Location,
) -> Option<String> {
    let Some(raw) = raw else {
        ctx.error(
            item_loc,
            format!("{what} has no name"),
            format!("add name: my-{what}"),
        );
        return None;
    };
    let name = &raw.value;
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars || !starts_well {
        ctx.error(
            raw.referenced,
            format!("invalid {what} name `{name}`"),
            format!(
                "use letters, digits, `.`, `-` and `_`, starting with a letter or digit, at most {MAX_NAME_LEN} characters"
            ),
        );
        return None;
    }
    Some(name.clone())
}
