//! `match.k8s`: namespace, service account, pod name, pod labels and container name, checked
//! with the rules the Kubernetes API server applies to them (`k8s.io/apimachinery`'s
//! `IsDNS1123Label`, `IsDNS1123Subdomain`, `IsQualifiedName` and `IsValidLabelValue`), so that a
//! value that could never name a real object is refused here.

use std::collections::BTreeMap;

use serde_saphyr::Spanned;

use crate::identity::selectors::K8sSelectors;
use crate::policy::raw::{RawK8s, S};
use crate::policy::validate::Ctx;

const MAX_LABEL: usize = 63;
const MAX_SUBDOMAIN: usize = 253;

/// The Kubernetes selectors, or `None` if any is wrong (errors are in `ctx`).
pub(super) fn check(ctx: &mut Ctx<'_, '_>, raw: &Spanned<RawK8s>) -> Option<K8sSelectors> {
    let k = &raw.value;
    let mut ok = true;
    let mut field = |raw: Option<&S<String>>, key: &str, rule: Rule| {
        let raw = raw?;
        match rule.check(&raw.value) {
            Ok(()) => Some(raw.value.clone()),
            Err(why) => {
                ctx.error(
                    raw.referenced,
                    format!("k8s.{key} `{}` is not valid: {why}", raw.value),
                    rule.hint(key),
                );
                ok = false;
                None
            }
        }
    };
    let namespace = field(k.namespace.as_ref(), "namespace", Rule::Label);
    let service_account = field(
        k.service_account.as_ref(),
        "serviceAccount",
        Rule::Subdomain,
    );
    let pod_name = field(k.pod_name.as_ref(), "podName", Rule::Subdomain);
    let container_name = field(k.container_name.as_ref(), "containerName", Rule::Label);
    let pod_labels = match &k.pod_labels {
        Some(labels) => check_labels(ctx, labels),
        None => Some(BTreeMap::new()),
    };
    ok &= pod_labels.is_some();
    let selectors = K8sSelectors {
        namespace,
        service_account,
        pod_name,
        pod_labels: pod_labels.unwrap_or_default(),
        container_name,
    };
    if ok && selectors.is_empty() {
        ctx.error(
            raw.referenced,
            "k8s has no selector".into(),
            "add at least one of namespace, serviceAccount, podName, podLabels, containerName, or remove k8s",
        );
        return None;
    }
    ok.then_some(selectors)
}

fn check_labels(
    ctx: &mut Ctx<'_, '_>,
    raw: &S<BTreeMap<String, S<String>>>,
) -> Option<BTreeMap<String, String>> {
    if raw.value.is_empty() {
        ctx.error(
            raw.referenced,
            "k8s.podLabels is empty".into(),
            "add labels the pod must have (app: payments), or remove podLabels",
        );
        return None;
    }
    let mut ok = true;
    for (key, value) in &raw.value {
        // serde-saphyr keeps no position for a map key: its value's is the nearest.
        if let Err(why) = label_key(key) {
            ctx.error(
                value.referenced,
                format!("k8s.podLabels key `{key}` is not valid: {why}"),
                "a label key is a name of at most 63 letters, digits, `-`, `_` and `.` (starting and ending with a letter or digit), optionally after a DNS subdomain prefix and `/`, like app.kubernetes.io/name",
            );
            ok = false;
        }
        if let Err(why) = label_value(&value.value) {
            ctx.error(
                value.referenced,
                format!("k8s.podLabels.{key} value `{}` is not valid: {why}", value.value),
                "a label value has at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
            );
            ok = false;
        }
    }
    ok.then(|| {
        raw.value
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect()
    })
}

/// Which Kubernetes naming rule a field follows.
#[derive(Clone, Copy)]
enum Rule {
    /// RFC 1123 label: namespaces and container names.
    Label,
    /// RFC 1123 subdomain: pod and service account names.
    Subdomain,
}

impl Rule {
    fn check(self, value: &str) -> Result<(), String> {
        match self {
            Rule::Label => dns1123_label(value),
            Rule::Subdomain => dns1123_subdomain(value),
        }
    }

    fn hint(self, key: &str) -> String {
        match self {
            Rule::Label => format!(
                "a {key} is a DNS-1123 label: at most {MAX_LABEL} lower-case letters, digits and `-`, starting and ending with a letter or digit"
            ),
            Rule::Subdomain => format!(
                "a {key} is a DNS-1123 subdomain: at most {MAX_SUBDOMAIN} characters, lower-case letters, digits, `-` and `.`, each `.`-separated part starting and ending with a letter or digit"
            ),
        }
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
fn dns1123_label(value: &str) -> Result<(), String> {
    if value.len() > MAX_LABEL {
        return Err(format!("longer than {MAX_LABEL} characters"));
    }
    dns1123_part(value)
}

/// Labels (without their length limit, as Kubernetes checks it) joined by `.`, at most 253.
fn dns1123_subdomain(value: &str) -> Result<(), String> {
    if value.len() > MAX_SUBDOMAIN {
        return Err(format!("longer than {MAX_SUBDOMAIN} characters"));
    }
    value.split('.').try_for_each(dns1123_part)
}

fn dns1123_part(part: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err("it is empty, or has an empty `.`-separated part".into());
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!("it has the character {c:?}"));
    }
    if part.starts_with('-') || part.ends_with('-') {
        return Err("it starts or ends with `-`".into());
    }
    Ok(())
}

/// `[prefix/]name`: an optional DNS-1123 subdomain prefix, and a name as [`label_value`] but
/// not empty.
fn label_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if name.contains('/') {
                return Err("it has more than one `/`".into());
            }
            dns1123_subdomain(prefix).map_err(|why| format!("its prefix `{prefix}`: {why}"))?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("its name is empty".into());
    }
    label_value(name)
}

/// `(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?`, at most 63 characters.
fn label_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_LABEL {
        return Err(format!("longer than {MAX_LABEL} characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("it has the character {c:?}"));
    }
    let edge_ok = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    if !edge_ok(value.chars().next()) || !edge_ok(value.chars().last()) {
        return Err("it starts or ends with a character other than a letter or digit".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_naming_rules() {
        for ok in ["a", "payments", "a-1", &"a".repeat(63)] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad}");
        }
        for ok in ["api-7d9f", "a.b.c", "system.serviceaccount-1"] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.-b", "A.b", &"a".repeat(254)] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad}");
        }
        for ok in ["app", "app.kubernetes.io/name", "a_b.C-d", "x/Y"] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/app",
            "a/",
            "a/b/c",
            "Example.com/app",
            "-app",
            "app_",
            "a b",
        ] {
            assert!(label_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "v1", "A_b.c-D", &"v".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["-v", "v.", "a/b", "a b", &"v".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad}");
        }
    }
}
