//! Tokens from outside issuers that a credential request carries (`subject_token`: the person
//! the workload acts for; `evidence_tokens`: the workload's own from another system), verified
//! against the policy's trusted issuers: signature with the issuer's key and that key's one
//! algorithm (never the token's choice: `alg: none` and HMAC with a public key are refused),
//! `iss`, `aud`, `exp`, `nbf`. The tokens themselves are never logged nor kept.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde::{Deserialize, Serialize};

use super::api::TokenRequest;
use super::jwt::LEEWAY_SECONDS;
use super::service::Refusal;
use crate::policy::TrustedIssuer;

/// The longest token accepted.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A JWT as a request carries it: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExternalToken(pub String);

impl fmt::Debug for ExternalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExternalToken(<{} bytes>)", self.0.len())
    }
}

/// A verified token's facts, as the issuance module sees them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Verified {
    /// The trusted issuer's name in the policy.
    pub issuer: String,
    pub iss: String,
    pub sub: String,
    pub exp: u64,
    /// Every claim of the token.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// Why a token was not accepted (the request is refused with `untrusted_token`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Untrusted {
    #[error("it is not a well-formed JWT (three base64url parts, JSON header and claims)")]
    Malformed,
    #[error("its alg is `none` (unsigned): refused")]
    Unsigned,
    #[error("it has no `iss` claim")]
    NoIssuer,
    #[error("its issuer {0:?} is not one of the policy's trustedIssuers")]
    NotTrusted(String),
    #[error("it is a credential of this agent: its identity comes from attestation, not a token")]
    OwnCredential,
    #[error("trusted issuer {issuer} has no key {kid:?} (its JWKS was re-read if it was due)")]
    UnknownKey { issuer: String, kid: Option<String> },
    #[error(
        "its alg {token} is not {key}, the algorithm of trusted issuer {issuer}'s key {kid:?}: refused (algorithm confusion)"
    )]
    AlgorithmMismatch {
        issuer: String,
        kid: Option<String>,
        token: String,
        key: String,
    },
    #[error("its signature does not verify with trusted issuer {0}'s key")]
    BadSignature(String),
    #[error("it has expired")]
    Expired,
    #[error("it is not valid yet (nbf)")]
    NotYetValid,
    #[error("its aud holds none of trusted issuer {issuer}'s audiences ({audiences})")]
    WrongAudience { issuer: String, audiences: String },
    #[error("it has no `sub`")]
    NoSubject,
    #[error("its claims are invalid: {0}")]
    Invalid(String),
}

/// Verifies `token` against the trusted issuer its `iss` names. `own_issuer`: this agent's
/// `iss`, whose credentials are never accepted here.
pub(crate) fn verify(
    issuers: &[Arc<TrustedIssuer>],
    own_issuer: &str,
    token: &str,
) -> Result<Verified, Untrusted> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Untrusted::Malformed);
    };
    let header: serde_json::Value = decode_part(header)?;
    let alg = header
        .get("alg")
        .and_then(serde_json::Value::as_str)
        .ok_or(Untrusted::Malformed)?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(Untrusted::Unsigned);
    }
    let kid = header
        .get("kid")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let unverified: serde_json::Value = decode_part(payload)?;
    let iss = unverified
        .get("iss")
        .and_then(serde_json::Value::as_str)
        .ok_or(Untrusted::NoIssuer)?;
    if iss == own_issuer {
        return Err(Untrusted::OwnCredential);
    }
    let trusted = issuers
        .iter()
        .find(|t| t.issuer == iss)
        .ok_or_else(|| Untrusted::NotTrusted(iss.to_owned()))?;
    let key = trusted
        .key(kid.as_deref())
        .ok_or_else(|| Untrusted::UnknownKey {
            issuer: trusted.name.clone(),
            kid: kid.clone(),
        })?;
    let key_alg = format!("{:?}", key.algorithm);
    if alg != key_alg {
        return Err(Untrusted::AlgorithmMismatch {
            issuer: trusted.name.clone(),
            kid,
            token: alg.to_owned(),
            key: key_alg,
        });
    }
    let mut validation = Validation::new(key.algorithm);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_issuer(&[trusted.issuer.as_str()]);
    validation.set_audience(&trusted.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        &key.decoding,
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature => Untrusted::BadSignature(trusted.name.clone()),
        ErrorKind::ExpiredSignature => Untrusted::Expired,
        ErrorKind::ImmatureSignature => Untrusted::NotYetValid,
        ErrorKind::InvalidAudience => Untrusted::WrongAudience {
            issuer: trusted.name.clone(),
            audiences: trusted.audiences.join(", "),
        },
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => Untrusted::Malformed,
        _ => Untrusted::Invalid(e.to_string()),
    })?
    .claims;
    let sub = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(Untrusted::NoSubject)?
        .to_owned();
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Untrusted::Invalid("exp is not a whole number of seconds".into()))?;
    Ok(Verified {
        issuer: trusted.name.clone(),
        iss: trusted.issuer.clone(),
        sub,
        exp,
        claims,
    })
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, Untrusted> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| Untrusted::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| Untrusted::Malformed)
}

/// A request's tokens, verified.
#[derive(Debug, Default)]
pub(crate) struct RequestTokens {
    pub subject: Option<Verified>,
    pub evidence: Vec<Verified>,
}

impl Untrusted {
    /// The metric label (`tessera_issuance_tokens_total{result}`).
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Untrusted::Malformed => "malformed",
            Untrusted::Unsigned => "unsigned",
            Untrusted::NoIssuer | Untrusted::NotTrusted(_) => "untrusted_issuer",
            Untrusted::OwnCredential => "own_credential",
            Untrusted::UnknownKey { .. } => "unknown_key",
            Untrusted::AlgorithmMismatch { .. } => "algorithm_mismatch",
            Untrusted::BadSignature(_) => "bad_signature",
            Untrusted::Expired => "expired",
            Untrusted::NotYetValid => "not_yet_valid",
            Untrusted::WrongAudience { .. } => "wrong_audience",
            Untrusted::NoSubject | Untrusted::Invalid(_) => "invalid_claims",
        }
    }
}

/// Verifies every token `req` carries; `counted(kind, result)` is told of each (`kind`
/// `subject` or `evidence`, `result` `verified` or [`Untrusted::label`]). The first that fails
/// refuses the request with `untrusted_token`.
pub(crate) fn verify_request(
    issuers: &[Arc<TrustedIssuer>],
    own_issuer: &str,
    req: &TokenRequest,
    counted: &dyn Fn(&'static str, &'static str),
) -> Result<RequestTokens, Refusal> {
    let check = |kind: &'static str, what: String, token: &ExternalToken| {
        let result = verify(issuers, own_issuer, &token.0);
        counted(
            kind,
            result
                .as_ref()
                .map_or_else(Untrusted::label, |_| "verified"),
        );
        result.map_err(|e| Refusal::Forbidden {
            reason: "untrusted_token",
            error: format!("{what} is refused: {e}"),
        })
    };
    let mut tokens = RequestTokens::default();
    if let Some(t) = &req.subject_token {
        tokens.subject = Some(check("subject", "subject_token".to_owned(), t)?);
    }
    for (i, t) in req.evidence_tokens.iter().enumerate() {
        tokens
            .evidence
            .push(check("evidence", format!("evidence_tokens[{i}]"), t)?);
    }
    Ok(tokens)
}
