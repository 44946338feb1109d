//! One workload: its name, SPIFFE ID and selectors.

use serde_saphyr::Spanned;

use super::selectors::check_match;
use super::{Ctx, check_name};
use crate::identity::spiffe::{SpiffeId, TrustDomain};
use crate::policy::raw::{RawWorkload, S};
use crate::policy::{Egress, Mode, Workload};

/// The workload, or `None` if something could not be checked (errors are in `ctx`).
/// Set-wide checks (unique names, IDs and selectors) are the caller's. `mode` is the
/// document's `spec.mode`.
pub(super) fn check(
    ctx: &mut Ctx<'_, '_>,
    raw: &Spanned<RawWorkload>,
    trust_domain: Option<&TrustDomain>,
    mode: Mode,
) -> Option<Workload> {
    let loc = raw.referenced;
    let raw = &raw.value;
    let name = check_name(ctx, raw.name.as_ref(), "workload", loc);
    let spiffe_id = match (&raw.spiffe_id, trust_domain, &name) {
        (Some(id), td, _) => check_spiffe_id(ctx, id, td),
        // Derived from the name; a bad name is already reported.
        (None, Some(td), Some(name)) => td.id_with_path(&format!("/{name}")).ok(),
        (None, _, _) => None,
    };
    let Some(selectors) = &raw.selectors else {
        ctx.error(
            loc,
            format!("workload `{}` has no match", name.as_deref().unwrap_or("?")),
            "add match: with at least one selector, like cgroup: /my-service, uid: 1001 or systemdUnit: my.service",
        );
        return None;
    };
    let egress = check_egress(ctx, raw.egress.as_ref());
    let selectors = check_match(ctx, selectors)?;
    Some(Workload {
        name: name?,
        spiffe_id: spiffe_id?,
        selectors,
        egress: egress?,
        mode,
    })
}

/// `egress: open | allowlist`; absent is `open`.
fn check_egress(ctx: &mut Ctx<'_, '_>, raw: Option<&S<String>>) -> Option<Egress> {
    let Some(raw) = raw else {
        return Some(Egress::Open);
    };
    match raw.value.as_str() {
        "open" => Some(Egress::Open),
        "allowlist" => Some(Egress::Allowlist),
        other => {
            ctx.error(
                raw.referenced,
                format!("egress `{other}` is not one of open, allowlist"),
                "write egress: allowlist (only the endpoints of its rules) or egress: open",
            );
            None
        }
    }
}

fn check_spiffe_id(
    ctx: &mut Ctx<'_, '_>,
    raw: &S<String>,
    trust_domain: Option<&TrustDomain>,
) -> Option<SpiffeId> {
    let id = match raw.value.parse::<SpiffeId>() {
        Ok(id) => id,
        Err(e) => {
            ctx.error(
                raw.referenced,
                format!("invalid spiffeId `{}`: {e}", raw.value),
                "write spiffe://<trust domain>/<path>, like spiffe://example.org/agents/payments",
            );
            return None;
        }
    };
    if id.path().is_empty() {
        ctx.error(
            raw.referenced,
            format!("spiffeId `{id}` names the trust domain, not a workload"),
            format!("add a path, like {id}/my-workload"),
        );
        return None;
    }
    // Without a valid trust domain there is nothing to compare with (already reported).
    let td = trust_domain?;
    if id.trust_domain() != td.as_str() {
        ctx.error(
            raw.referenced,
            format!(
                "spiffeId `{id}` is in trust domain `{}`, not the document's `{td}`",
                id.trust_domain()
            ),
            format!(
                "use spiffe://{td}{}, or put the workload in a document with trustDomain: {}",
                id.path(),
                id.trust_domain()
            ),
        );
        return None;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::policy::{Egress, Mode, PolicySet};

    fn doc(egress: &str) -> String {
        format!(
            "apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {{name: t}}
spec:
  trustDomain: example.org
  mode: audit
  workloads:
    - name: a
      match: {{cgroup: /a}}
{egress}
    - name: b
      match: {{cgroup: /b}}
"
        )
    }

    #[test]
    fn egress_defaults_to_open_and_takes_the_document_mode() {
        let set = PolicySet::from_str(Path::new("t.yaml"), &doc("")).unwrap();
        assert_eq!(set.workloads[0].egress, Egress::Open);
        assert_eq!(set.workloads[0].mode, Mode::Audit);
    }

    #[test]
    fn egress_allowlist_and_open() {
        let set =
            PolicySet::from_str(Path::new("t.yaml"), &doc("      egress: allowlist")).unwrap();
        assert_eq!(set.workloads[0].egress, Egress::Allowlist);
        assert_eq!(set.workloads[1].egress, Egress::Open);
        let set = PolicySet::from_str(Path::new("t.yaml"), &doc("      egress: open")).unwrap();
        assert_eq!(set.workloads[0].egress, Egress::Open);
    }

    #[test]
    fn other_egress_values_are_refused_with_a_hint() {
        let err = PolicySet::from_str(Path::new("t.yaml"), &doc("      egress: closed"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("egress `closed` is not one of open, allowlist"),
            "{err}"
        );
        assert!(err.contains("t.yaml:10:"), "{err}");
    }
}
