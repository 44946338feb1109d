//! SPIFFE IDs and trust domains, parsed strictly per the SPIFFE ID specification.
//!
//! A `SpiffeId` can only be built by parsing, so holding one means it is well formed:
//! `spiffe://<trust-domain><path>`, trust domain of `[a-z0-9._-]`, path segments of
//! `[A-Za-z0-9._-]`, no empty, `.` or `..` segment, no trailing slash, no port, userinfo,
//! query, fragment or percent-encoding, at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod template;

const SCHEME_PREFIX: &str = "spiffe://";
/// The spec caps a SPIFFE ID at 2048 bytes (URI length limits of common tooling).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The spec caps a trust domain at 255 bytes (it is usually a DNS name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A SPIFFE ID such as `spiffe://example.org/agents/payments`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte length of the trust domain, which starts right after `spiffe://`.
    trust_domain_len: usize,
}

/// A trust domain such as `example.org`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("does not start with `spiffe://` (the scheme must be `spiffe`, in lower case)")]
    WrongScheme,
    #[error("has no trust domain after `spiffe://`")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain contains a port (`:`); SPIFFE IDs carry no port")]
    Port,
    #[error("contains userinfo (`@`); SPIFFE IDs carry no user")]
    Userinfo,
    #[error("contains a query (`?`); SPIFFE IDs have none")]
    Query,
    #[error("contains a fragment (`#`); SPIFFE IDs have none")]
    Fragment,
    #[error("contains percent-encoding (`%`); write the characters as they are")]
    PercentEncoded,
    #[error(
        "trust domain has the character {0:?}; only lower-case letters, digits, `.`, `-` and `_` are allowed"
    )]
    TrustDomainChar(char),
    #[error("path has the character {0:?}; only letters, digits, `.`, `-` and `_` are allowed")]
    PathChar(char),
    #[error("path has an empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("path has a `.` or `..` segment")]
    DotSegment,
}

impl SpiffeId {
    /// The trust domain, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.trust_domain_len]
    }

    /// The path, e.g. `/agents/payments` (empty for the trust domain's own ID).
    pub fn path(&self) -> &str {
        &self.id[SCHEME_PREFIX.len() + self.trust_domain_len..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID `spiffe://<self><path>`; `path` must start with `/`.
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        format!("{SCHEME_PREFIX}{}{path}", self.0).parse()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // Report the URI parts SPIFFE forbids by name: clearer than "bad character '?'".
        for (c, err) in [
            ('#', SpiffeIdError::Fragment),
            ('?', SpiffeIdError::Query),
            ('%', SpiffeIdError::PercentEncoded),
        ] {
            if rest.contains(c) {
                return Err(err);
            }
        }
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') {
            return Err(SpiffeIdError::Userinfo);
        }
        validate_trust_domain(authority)?;
        validate_path(path)?;
        Ok(SpiffeId {
            id: s.to_owned(),
            trust_domain_len: authority.len(),
        })
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        validate_trust_domain(s)?;
        Ok(TrustDomain(s.to_owned()))
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::Userinfo);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is the empty string before it.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("SPIFFE ID {s:?} {e}")))
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("trust domain {s:?} {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        s.parse()
    }

    #[test]
    fn valid_ids() {
        let id = parse("spiffe://example.org/agents/payments").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/agents/payments");
        assert_eq!(id.to_string(), "spiffe://example.org/agents/payments");

        let root = parse("spiffe://example.org").unwrap();
        assert_eq!(root.trust_domain(), "example.org");
        assert_eq!(root.path(), "");

        let odd = parse("spiffe://a-b_c.9/A.b-C_9/...x/x..").unwrap();
        assert_eq!(odd.trust_domain(), "a-b_c.9");
        assert_eq!(odd.path(), "/A.b-C_9/...x/x..");
    }

    #[test]
    fn rejects_malformed_ids() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:/example.org/a", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///a", MissingTrustDomain),
            ("spiffe://Example.org/a", TrustDomainChar('E')),
            ("spiffe://exa mple.org/a", TrustDomainChar(' ')),
            ("spiffe://example.org:8080/a", Port),
            ("spiffe://user@example.org/a", Userinfo),
            ("spiffe://user:pw@example.org/a", Userinfo),
            ("spiffe://example.org/a?x=1", Query),
            ("spiffe://example.org/a#frag", Fragment),
            ("spiffe://example.org/a%20b", PercentEncoded),
            ("spiffe://ex%41mple.org/a", PercentEncoded),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org/a/", EmptySegment),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/./a", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a/../b", DotSegment),
            ("spiffe://example.org/a*b", PathChar('*')),
            ("spiffe://example.org/ä", PathChar('ä')),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).as_ref(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn length_limits() {
        let prefix = "spiffe://example.org/";
        let exact = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert!(parse(&exact).is_ok());
        let over = format!("{exact}a");
        assert_eq!(parse(&over), Err(SpiffeIdError::TooLong));

        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            parse(&format!("spiffe://{td}/a")),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
        assert!(td[1..].parse::<TrustDomain>().is_ok());
    }

    #[test]
    fn trust_domain_parsing() {
        let td: TrustDomain = "demo.tessera.dev".parse().unwrap();
        assert_eq!(td.to_string(), "demo.tessera.dev");
        assert_eq!(
            td.id_with_path("/agent").unwrap().as_str(),
            "spiffe://demo.tessera.dev/agent"
        );
        assert_eq!(
            "".parse::<TrustDomain>(),
            Err(SpiffeIdError::MissingTrustDomain)
        );
        assert_eq!(
            "Example.org".parse::<TrustDomain>(),
            Err(SpiffeIdError::TrustDomainChar('E'))
        );
        assert_eq!(
            "example.org:443".parse::<TrustDomain>(),
            Err(SpiffeIdError::Port)
        );
    }

    #[test]
    fn serde_as_string() {
        let id = parse("spiffe://example.org/a").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://example.org/a\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/\"").is_err());
    }
}
