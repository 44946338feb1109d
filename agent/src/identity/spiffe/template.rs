//! SPIFFE ID templates such as `spiffe://{trustDomain}/ns/{k8s.namespace}/sa/{k8s.serviceAccount}`,
//! rendered from a process's evidence. Every rendered ID goes through [`SpiffeId`]'s `FromStr`;
//! a value that cannot be part of a path segment is an error that names its placeholder.

use std::fmt;
use std::str::FromStr;

use super::{SCHEME_PREFIX, SpiffeId, SpiffeIdError, TrustDomain};

/// A value a template can take from the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{trustDomain}`: only as the whole trust domain.
    TrustDomain,
    /// `{uid}`, `{gid}`: the real ids.
    Uid,
    Gid,
    /// `{systemdUnit}`: the innermost unit's name.
    SystemdUnit,
    /// `{container}`: the container ID.
    Container,
    /// `{k8s.podUid}`, from the cgroup path.
    PodUid,
    /// `{k8s.namespace}`, `{k8s.serviceAccount}`, `{k8s.podName}`, `{k8s.containerName}`: from
    /// the API server.
    Namespace,
    ServiceAccount,
    PodName,
    ContainerName,
    /// `{k8s.podLabels.<key>}`.
    PodLabel(String),
}

impl Placeholder {
    fn parse(name: &str) -> Option<Placeholder> {
        Some(match name {
            "trustDomain" => Placeholder::TrustDomain,
            "uid" => Placeholder::Uid,
            "gid" => Placeholder::Gid,
            "systemdUnit" => Placeholder::SystemdUnit,
            "container" => Placeholder::Container,
            "k8s.podUid" => Placeholder::PodUid,
            "k8s.namespace" => Placeholder::Namespace,
            "k8s.serviceAccount" => Placeholder::ServiceAccount,
            "k8s.podName" => Placeholder::PodName,
            "k8s.containerName" => Placeholder::ContainerName,
            other => {
                let key = other.strip_prefix("k8s.podLabels.")?;
                if key.is_empty() {
                    return None;
                }
                Placeholder::PodLabel(key.to_owned())
            }
        })
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Placeholder::TrustDomain => "trustDomain",
            Placeholder::Uid => "uid",
            Placeholder::Gid => "gid",
            Placeholder::SystemdUnit => "systemdUnit",
            Placeholder::Container => "container",
            Placeholder::PodUid => "k8s.podUid",
            Placeholder::Namespace => "k8s.namespace",
            Placeholder::ServiceAccount => "k8s.serviceAccount",
            Placeholder::PodName => "k8s.podName",
            Placeholder::ContainerName => "k8s.containerName",
            Placeholder::PodLabel(key) => return write!(f, "{{k8s.podLabels.{key}}}"),
        };
        write!(f, "{{{name}}}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Value(Placeholder),
}

/// A parsed template: `spiffe://` + a trust domain (literal or `{trustDomain}`) + a path of
/// literals and placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeIdTemplate {
    text: String,
    /// `None`: `{trustDomain}`.
    trust_domain: Option<TrustDomain>,
    path: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("does not start with `spiffe://`")]
    WrongScheme,
    #[error("has a `{{` at byte {0} that is not closed")]
    Unclosed(usize),
    #[error("has a `}}` at byte {0} that no `{{` opens")]
    Unopened(usize),
    #[error(
        "has an unknown placeholder `{{{0}}}`; known: trustDomain, uid, gid, systemdUnit, container, k8s.podUid, k8s.namespace, k8s.serviceAccount, k8s.podName, k8s.containerName, k8s.podLabels.<key>"
    )]
    Unknown(String),
    #[error("uses `{0}` in the trust domain; only `{{trustDomain}}` may stand there, alone")]
    TrustDomainPlaceholder(String),
    #[error("uses `{{trustDomain}}` in the path; it may only be the trust domain")]
    TrustDomainInPath,
    #[error("would never render a valid SPIFFE ID: it {0}")]
    Invalid(SpiffeIdError),
}

/// Why a template did not render for a process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("{placeholder} has no value for this process")]
    Missing { placeholder: Placeholder },
    #[error("{placeholder} is {value:?}, which cannot be part of a SPIFFE ID path: it {problem}")]
    Value {
        placeholder: Placeholder,
        value: String,
        problem: SpiffeIdError,
    },
    #[error("the rendered SPIFFE ID {0}")]
    Invalid(SpiffeIdError),
}

impl SpiffeIdTemplate {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The placeholders of the path (`{trustDomain}` is not one of them), in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.path.iter().filter_map(|p| match p {
            Part::Value(v) => Some(v),
            Part::Literal(_) => None,
        })
    }

    /// The ID for a process: `trust_domain` fills `{trustDomain}`, `value` the others.
    pub fn render(
        &self,
        trust_domain: &TrustDomain,
        value: impl Fn(&Placeholder) -> Option<String>,
    ) -> Result<SpiffeId, RenderError> {
        let td = self.trust_domain.as_ref().unwrap_or(trust_domain);
        let mut path = String::new();
        for (i, part) in self.path.iter().enumerate() {
            match part {
                Part::Literal(text) => path.push_str(text),
                Part::Value(p) => {
                    let v = value(p).ok_or_else(|| RenderError::Missing {
                        placeholder: p.clone(),
                    })?;
                    let whole_segment = path.ends_with('/')
                        && match self.path.get(i + 1) {
                            None => true,
                            Some(Part::Literal(next)) => next.starts_with('/'),
                            Some(Part::Value(_)) => false,
                        };
                    check_value(&v, whole_segment).map_err(|problem| RenderError::Value {
                        placeholder: p.clone(),
                        value: v.clone(),
                        problem,
                    })?;
                    path.push_str(&v);
                }
            }
        }
        format!("{SCHEME_PREFIX}{td}{path}")
            .parse()
            .map_err(RenderError::Invalid)
    }
}

/// A value must be a non-empty run of path characters, and not `.` or `..` on its own.
fn check_value(v: &str, whole_segment: bool) -> Result<(), SpiffeIdError> {
    if v.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeIdError::PathChar(c));
    }
    if whole_segment && (v == "." || v == "..") {
        return Err(SpiffeIdError::DotSegment);
    }
    Ok(())
}

impl FromStr for SpiffeIdTemplate {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, TemplateError> {
        let rest = text
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(TemplateError::WrongScheme)?;
        let (authority, path_text) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let trust_domain = if authority == "{trustDomain}" {
            None
        } else if let Some(open) = authority.find('{') {
            let name = authority[open..].split('}').next().unwrap_or_default();
            return Err(TemplateError::TrustDomainPlaceholder(format!("{name}}}")));
        } else {
            Some(authority.parse().map_err(TemplateError::Invalid)?)
        };
        let base = SCHEME_PREFIX.len() + authority.len();
        let path = parse_path(path_text, base)?;
        let template = SpiffeIdTemplate {
            text: text.to_owned(),
            trust_domain,
            path,
        };
        // The literals must be valid whatever the values: try with a harmless one.
        let td: TrustDomain = "example.org".parse().map_err(TemplateError::Invalid)?;
        template
            .render(&td, |_| Some("x".to_owned()))
            .map_err(|e| match e {
                RenderError::Invalid(e) | RenderError::Value { problem: e, .. } => {
                    TemplateError::Invalid(e)
                }
                RenderError::Missing { .. } => TemplateError::Invalid(SpiffeIdError::Empty),
            })?;
        Ok(template)
    }
}

fn parse_path(text: &str, base: usize) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    let mut at = base;
    while let Some(i) = rest.find(['{', '}']) {
        if rest.as_bytes()[i] == b'}' {
            return Err(TemplateError::Unopened(at + i));
        }
        literal.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let close = after.find('}').ok_or(TemplateError::Unclosed(at + i))?;
        let name = &after[..close];
        if name.contains('{') {
            return Err(TemplateError::Unclosed(at + i));
        }
        let placeholder =
            Placeholder::parse(name).ok_or_else(|| TemplateError::Unknown(name.to_owned()))?;
        if placeholder == Placeholder::TrustDomain {
            return Err(TemplateError::TrustDomainInPath);
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(std::mem::take(&mut literal)));
        }
        parts.push(Part::Value(placeholder));
        let consumed = i + 1 + close + 1;
        at += consumed;
        rest = &rest[consumed..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    Ok(parts)
}

impl fmt::Display for SpiffeIdTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests;
