//! Trusted issuers (`spec.trustedIssuers`): the outside issuers whose tokens a credential
//! request may carry (a person's for delegation, a workload's own as evidence), their public
//! keys (a JWKS file, re-read when a token names a key it does not hold), and the rule
//! selector on such a token (`match: {token: …}`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tracing::{debug, warn};

/// The largest JWKS file read.
const MAX_JWKS_BYTES: u64 = 256 * 1024;
/// How often at most a token naming an unknown key makes the agent re-read the JWKS.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// How long a JWKS read is used before it is read again.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// One issuer the policy trusts.
pub struct TrustedIssuer {
    /// Its name in the policy (rules' `match.token.issuer` and the Rego input name it).
    pub name: String,
    /// The tokens' `iss`, exactly.
    pub issuer: String,
    /// A token's `aud` must hold one of these.
    pub audiences: Vec<String>,
    /// The JWKS file (joined to the policy file's directory).
    pub jwks: PathBuf,
    keys: RwLock<LoadedKeys>,
    min_refresh: Duration,
    max_age: Duration,
}

struct LoadedKeys {
    at: Instant,
    keys: Vec<IssuerKey>,
}

/// A public key and the one algorithm it verifies (from the JWK's `kty`/`crv` and `alg`,
/// never from a token).
#[derive(Clone, Debug)]
pub struct IssuerKey {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub decoding: DecodingKey,
}

/// A rule's `match.token`: one of the request's evidence tokens must be from `issuer` (a
/// trusted issuer's name), with this `sub` (when set) and these claims (each a string, or a
/// number or boolean written the same way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMatch {
    pub issuer: String,
    pub subject: Option<String>,
    pub claims: BTreeMap<String, String>,
}

impl TrustedIssuer {
    /// Reads the JWKS at `jwks`; `Err`: what is wrong with it.
    pub fn load(
        name: String,
        issuer: String,
        audiences: Vec<String>,
        jwks: PathBuf,
    ) -> Result<TrustedIssuer, String> {
        let keys = read_jwks(&jwks)?;
        Ok(TrustedIssuer {
            name,
            issuer,
            audiences,
            jwks,
            keys: RwLock::new(LoadedKeys {
                at: Instant::now(),
                keys,
            }),
            min_refresh: MIN_REFRESH,
            max_age: MAX_AGE,
        })
    }

    /// The key a token's header names (`kid`; without one, the only key). The JWKS is
    /// re-read when it is older than [`MAX_AGE`] (so a key the issuer withdrew stops
    /// verifying), and when it lacks the `kid` (rotation), at most every [`MIN_REFRESH`].
    pub fn key(&self, kid: Option<&str>) -> Option<IssuerKey> {
        if self.age() >= self.max_age {
            self.reread(Duration::ZERO, "period");
        } else if let Some(key) = self.find(kid) {
            return Some(key);
        } else {
            self.reread(self.min_refresh, "unknown key id");
        }
        self.find(kid)
    }

    fn age(&self) -> Duration {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .at
            .elapsed()
    }

    /// Re-reads the JWKS unless it was read less than `min_age` ago; a JWKS that no longer
    /// reads keeps the keys read before.
    fn reread(&self, min_age: Duration, why: &'static str) {
        let mut loaded = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if loaded.at.elapsed() < min_age {
            return;
        }
        loaded.at = Instant::now();
        match read_jwks(&self.jwks) {
            Ok(keys) => {
                debug!(issuer = %self.name, keys = keys.len(), why, "trusted issuer's JWKS re-read");
                loaded.keys = keys;
            }
            Err(e) => {
                warn!(issuer = %self.name, error = %e, "cannot re-read a trusted issuer's JWKS: the keys read before stay");
            }
        }
    }

    fn find(&self, kid: Option<&str>) -> Option<IssuerKey> {
        let loaded = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match kid {
            Some(kid) => loaded
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .cloned(),
            None if loaded.keys.len() == 1 => loaded.keys.first().cloned(),
            None => None,
        }
    }
}

impl PartialEq for TrustedIssuer {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.issuer == other.issuer
            && self.audiences == other.audiences
            && self.jwks == other.jwks
    }
}

impl fmt::Debug for TrustedIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedIssuer")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl TokenMatch {
    /// Whether a verified token from trusted issuer `issuer` with `sub` and `claims` matches.
    pub fn matches(
        &self,
        issuer: &str,
        sub: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        self.issuer == issuer
            && self.subject.as_deref().is_none_or(|s| s == sub)
            && self.claims.iter().all(|(k, want)| {
                claims.get(k).is_some_and(|v| match v {
                    serde_json::Value::String(s) => s == want,
                    serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                        serde_json::from_str::<serde_json::Value>(want).is_ok_and(|w| w == *v)
                    }
                    _ => false,
                })
            })
    }
}

/// The public keys of a JWKS file; keys for encryption (`use: enc`) are left out.
fn read_jwks(path: &Path) -> Result<Vec<IssuerKey>, String> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_JWKS_BYTES) {
        return Err(format!("the JWKS {} is over 256 KiB", path.display()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the JWKS {}: {e}", path.display()))?;
    parse_jwks(&text).map_err(|e| format!("the JWKS {}: {e}", path.display()))
}

/// Each signing key of a JWKS document with the algorithm it verifies.
pub fn parse_jwks(text: &str) -> Result<Vec<IssuerKey>, String> {
    let set: JwkSet = serde_json::from_str(text)
        .map_err(|e| format!("not a JWKS ({{\"keys\": [JWK, ...]}}): {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let which = jwk
            .common
            .key_id
            .as_deref()
            .map_or_else(|| format!("key {i}"), |kid| format!("key {kid:?}"));
        let algorithm = key_algorithm(&jwk.algorithm, jwk.common.key_algorithm)
            .map_err(|e| format!("{which}: {e}"))?;
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("{which}: {e}"))?;
        keys.push(IssuerKey {
            kid: jwk.common.key_id.clone(),
            algorithm,
            decoding,
        });
    }
    if keys.is_empty() {
        return Err("it holds no signing key".to_owned());
    }
    Ok(keys)
}

/// The one algorithm a key verifies: its `alg` if it has one (which must suit its type),
/// else the one its type allows (RS256 for an RSA key).
fn key_algorithm(
    params: &AlgorithmParameters,
    alg: Option<KeyAlgorithm>,
) -> Result<Algorithm, String> {
    let allowed: &[Algorithm] = match params {
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return Err("an EC key's crv must be P-256 or P-384".to_owned()),
        },
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            &[Algorithm::EdDSA]
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric key (kty oct): a trusted issuer's JWKS holds public keys only"
                    .to_owned(),
            );
        }
        _ => return Err("an unsupported key type (use EC, RSA or OKP Ed25519)".to_owned()),
    };
    let Some(alg) = alg else {
        return Ok(allowed[0]);
    };
    let named = match alg {
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    };
    match named {
        Some(a) if allowed.contains(&a) => Ok(a),
        _ => Err(format!("its alg {alg:?} does not suit its key type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_and_mismatched_keys_are_refused() {
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(parse_jwks(oct).unwrap_err().contains("public keys only"));
        let ec = r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"HS256","kid":"e",
            "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        assert!(parse_jwks(ec).unwrap_err().contains("does not suit"));
        let ec = ec.replace("HS256", "ES256");
        let keys = parse_jwks(&ec).expect("an ES256 key");
        assert_eq!(keys[0].algorithm, Algorithm::ES256);
        assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
    }

    const KEY_A: &str = r#"{"kty":"EC","crv":"P-256","alg":"ES256","kid":"a",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
    const KEY_B: &str = r#"{"kty":"EC","crv":"P-256","alg":"ES256","kid":"b",
        "x":"EDFBt_d_WMPQOsXEay4bY7ndCSAccLYJW6h064bSF6Q",
        "y":"O7tPnf-ylhJ0_xONjAQoII9J_varQtYs6X1IZL_BXjw"}"#;

    fn issuer_with(
        jwks: &str,
        min_refresh: Duration,
        max_age: Duration,
    ) -> (tempfile::TempDir, TrustedIssuer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, jwks).expect("write");
        let mut t = TrustedIssuer::load("i".into(), "https://i".into(), vec!["a".into()], file)
            .expect("loads");
        t.min_refresh = min_refresh;
        t.max_age = max_age;
        (dir, t)
    }

    #[test]
    fn an_unknown_kid_rereads_at_most_every_min_refresh_and_a_stale_jwks_is_reread() {
        let day = Duration::from_secs(86400);
        // Rotation: key b appears; found at once when a re-read is due, not before.
        for (min_refresh, found) in [(Duration::ZERO, true), (day, false)] {
            let (_d, t) = issuer_with(&format!(r#"{{"keys":[{KEY_A}]}}"#), min_refresh, day);
            std::fs::write(&t.jwks, format!(r#"{{"keys":[{KEY_A},{KEY_B}]}}"#)).expect("write");
            assert_eq!(t.key(Some("b")).is_some(), found);
            assert!(t.key(Some("a")).is_some());
        }
        // Withdrawal: key a is gone from the file; a stale JWKS is read again, so it is too.
        let (_d, t) = issuer_with(&format!(r#"{{"keys":[{KEY_A}]}}"#), day, Duration::ZERO);
        std::fs::write(&t.jwks, format!(r#"{{"keys":[{KEY_B}]}}"#)).expect("write");
        assert!(t.key(Some("a")).is_none());
        assert!(t.key(None).is_some_and(|k| k.kid.as_deref() == Some("b")));
        // A file that no longer reads keeps the keys read before.
        std::fs::write(&t.jwks, "not json").expect("write");
        assert!(t.key(Some("b")).is_some());
    }

    #[test]
    fn token_match_compares_issuer_subject_and_claims() {
        let m = TokenMatch {
            issuer: "ci".into(),
            subject: None,
            claims: [
                ("repository".to_owned(), "acme/app".to_owned()),
                ("run_attempt".to_owned(), "1".to_owned()),
            ]
            .into(),
        };
        let claims = serde_json::json!({"repository": "acme/app", "run_attempt": 1});
        let claims = claims.as_object().expect("object");
        assert!(m.matches("ci", "job", claims));
        assert!(!m.matches("other", "job", claims));
        let other = serde_json::json!({"repository": "acme/other", "run_attempt": 1});
        assert!(!m.matches("ci", "job", other.as_object().expect("object")));
    }
}
