//! The signing keys in use: the current one, which signs, and retired ones, whose public keys
//! stay published (and verify) until every token they signed has expired. Retired public keys
//! are kept in `<state>/retired-keys.json`, so a restarted agent publishes them still.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::errors::{CredentialError, TokenError};
use super::jwt::{Claims, Verifier};
use super::keys::{SigningAlgorithm, SigningKeys};
use crate::identity::spiffe::SpiffeId;

/// File name of the retired public keys inside the state directory.
pub const RETIRED_FILE: &str = "retired-keys.json";
/// Published this much longer than the last token's `exp`: verifiers' clock skew.
const GRACE_SECONDS: u64 = 30;
/// The `until` of another agent's key while the trust bundle source holds it.
const IN_SOURCE: u64 = u64::MAX;

/// A retired key: its public JWK, until when it is published.
struct Retired {
    kid: String,
    algorithm: SigningAlgorithm,
    jwk: serde_json::Value,
    decoding: DecodingKey,
    until: u64,
}

#[derive(Serialize, Deserialize)]
struct RetiredEntry {
    jwk: serde_json::Value,
    /// Unix seconds.
    until: u64,
}

pub(crate) struct KeyRing {
    state_dir: PathBuf,
    algorithm: SigningAlgorithm,
    current: SigningKeys,
    /// The latest `exp` the current key signed (unix seconds).
    signed_until: u64,
    retired: Vec<Retired>,
    /// Other agents' keys of the trust domain (`--trust-bundle-dir`): `until` is [`IN_SOURCE`]
    /// while the source holds one, then the expiry of the last token it could have signed.
    foreign: Vec<Retired>,
}

/// What a rotation did.
#[derive(Clone, Debug, Serialize)]
pub struct Rotation {
    pub kid: String,
    pub retired: String,
    /// Unix seconds until which the retired key stays published.
    pub retired_until: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl KeyRing {
    pub(crate) fn load(
        state_dir: &Path,
        algorithm: SigningAlgorithm,
    ) -> Result<KeyRing, CredentialError> {
        let current = SigningKeys::load_or_generate(state_dir, algorithm)?;
        let retired = read_retired(&state_dir.join(RETIRED_FILE))
            .into_iter()
            .filter(|r| r.until > now())
            .collect();
        Ok(KeyRing {
            state_dir: state_dir.to_owned(),
            algorithm,
            current,
            signed_until: 0,
            retired,
            foreign: Vec::new(),
        })
    }

    pub(crate) fn current(&self) -> &SigningKeys {
        &self.current
    }

    /// Remembers that the current key signed a token valid until `exp`.
    pub(crate) fn signed(&mut self, exp: u64) {
        self.signed_until = self.signed_until.max(exp);
    }

    /// This agent's JWKS: the current key, then the retired ones still published.
    pub(crate) fn own_jwks(&self) -> serde_json::Value {
        let now = now();
        let mut keys = vec![self.current.jwk()];
        keys.extend(
            self.retired
                .iter()
                .filter(|r| r.until > now)
                .map(|r| r.jwk.clone()),
        );
        serde_json::json!({ "keys": keys })
    }

    /// The trust domain's JWKS: this agent's keys, then other agents' (`--trust-bundle-dir`),
    /// those that left the directory included until their tokens have expired.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        let now = now();
        let mut doc = self.own_jwks();
        if let Some(keys) = doc["keys"].as_array_mut() {
            keys.extend(
                self.foreign
                    .iter()
                    .filter(|r| r.until > now)
                    .map(|r| r.jwk.clone()),
            );
        }
        doc
    }

    /// Replaces the other agents' keys with `jwks` (ours and invalid ones left out); true when
    /// the set changed. A key that left the source may have signed a token a moment ago: it
    /// keeps verifying (and is published) for `longest_ttl` more, plus the clock-skew grace,
    /// then goes. (Remembered in memory: a restarted agent knows only what the source holds.)
    pub(crate) fn set_foreign(
        &mut self,
        jwks: Vec<serde_json::Value>,
        longest_ttl: Duration,
    ) -> bool {
        let now = now();
        let mut foreign: Vec<Retired> = Vec::new();
        for jwk in jwks {
            let Some(r) = retired_from(jwk, IN_SOURCE) else {
                continue;
            };
            let ours = r.kid == self.current.kid || self.retired.iter().any(|o| o.kid == r.kid);
            if !ours && !foreign.iter().any(|f| f.kid == r.kid) {
                foreign.push(r);
            }
        }
        let departed_until = now
            .saturating_add(longest_ttl.as_secs())
            .saturating_add(GRACE_SECONDS);
        // Every key held was published at the last call (expired ones are dropped here).
        let before: Vec<String> = self.foreign.iter().map(|f| f.kid.clone()).collect();
        for mut old in std::mem::take(&mut self.foreign) {
            if foreign.iter().any(|f| f.kid == old.kid) {
                continue;
            }
            if old.until == IN_SOURCE {
                old.until = departed_until;
                info!(
                    kid = %old.kid,
                    until = departed_until,
                    "a trust bundle key left the source: it verifies until its last token expires"
                );
            }
            if old.until > now {
                foreign.push(old);
            }
        }
        let changed =
            foreign.len() != before.len() || foreign.iter().zip(&before).any(|(f, b)| &f.kid != b);
        self.foreign = foreign;
        changed
    }

    /// A new current key; the old one is published until the later of the last token it
    /// signed and `now + longest_ttl` (a restarted agent does not know what its predecessor
    /// signed), plus a grace for clock skew.
    pub(crate) fn rotate(&mut self, longest_ttl: Duration) -> Result<Rotation, CredentialError> {
        let now = now();
        let until = self
            .signed_until
            .max(now.saturating_add(longest_ttl.as_secs()))
            .saturating_add(GRACE_SECONDS);
        let old_jwk = self.current.jwk();
        let old = Retired {
            kid: self.current.kid.clone(),
            algorithm: self.current.algorithm,
            decoding: self.current.decoding.clone(),
            jwk: old_jwk,
            until,
        };
        // The retired key is on disk before the new one replaces it: a crash in between
        // publishes one key too many, never one too few.
        let mut retired: Vec<&Retired> = self.retired.iter().filter(|r| r.until > now).collect();
        retired.push(&old);
        write_retired(&self.state_dir.join(RETIRED_FILE), &retired)?;
        let new = SigningKeys::regenerate(&self.state_dir, self.algorithm)?;
        let rotation = Rotation {
            kid: new.kid.clone(),
            retired: old.kid.clone(),
            retired_until: until,
        };
        self.current = new;
        self.signed_until = 0;
        self.retired.retain(|r| r.until > now);
        self.retired.push(old);
        Ok(rotation)
    }

    /// Drops retired keys past their time; true when one went.
    pub(crate) fn prune(&mut self) -> bool {
        let now = now();
        let before = self.retired.len();
        self.retired.retain(|r| r.until > now);
        if self.retired.len() == before {
            return false;
        }
        let left: Vec<&Retired> = self.retired.iter().collect();
        if let Err(e) = write_retired(&self.state_dir.join(RETIRED_FILE), &left) {
            warn!(error = %e, "cannot rewrite the retired keys");
        }
        true
    }

    fn verifier(&self, token: &str) -> Result<Verifier<'_>, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(TokenError::Malformed)?;
        let kid = header.kid.as_deref();
        let now = now();
        let found = if kid == Some(self.current.kid.as_str()) {
            Some(Verifier {
                algorithm: self.current.algorithm,
                decoding: &self.current.decoding,
            })
        } else {
            self.retired
                .iter()
                .chain(&self.foreign)
                .find(|r| Some(r.kid.as_str()) == kid && r.until > now)
                .map(|r| Verifier {
                    algorithm: r.algorithm,
                    decoding: &r.decoding,
                })
        };
        match found {
            Some(v) if v.algorithm.jose() == header.alg => Ok(v),
            _ => Err(TokenError::UnknownKey { kid: header.kid }),
        }
    }

    /// Verifies a token signed by a published key (see [`SigningKeys::verify`]).
    pub(crate) fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
    ) -> Result<Claims, TokenError> {
        self.verifier(token)?.claims(token, issuer, audience)
    }

    /// Verifies a JWT-SVID signed by a published key (see [`SigningKeys::verify_svid`]).
    pub(crate) fn verify_svid(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), TokenError> {
        self.verifier(token)?.svid(token, audience)
    }
}

fn read_retired(path: &Path) -> Vec<Retired> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the retired keys; they are no longer published");
            return Vec::new();
        }
    };
    let entries: Vec<RetiredEntry> = match serde_json::from_str(&text) {
        Ok(e) => e,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the retired keys file is not valid; they are no longer published");
            return Vec::new();
        }
    };
    entries
        .into_iter()
        .filter_map(|e| retired_from(e.jwk, e.until))
        .collect()
}

/// A published key from its JWK (which must name its `kid` and `alg`).
fn retired_from(value: serde_json::Value, until: u64) -> Option<Retired> {
    let jwk: Jwk = serde_json::from_value(value.clone()).ok()?;
    let decoding = DecodingKey::from_jwk(&jwk).ok()?;
    let kid = jwk.common.key_id.clone()?;
    let algorithm = value.get("alg")?.as_str()?.parse().ok()?;
    Some(Retired {
        kid,
        algorithm,
        jwk: value,
        decoding,
        until,
    })
}

/// Atomically (a temporary file, then a rename); public keys only, mode 0600 all the same.
fn write_retired(path: &Path, retired: &[&Retired]) -> Result<(), CredentialError> {
    let entries: Vec<RetiredEntry> = retired
        .iter()
        .map(|r| RetiredEntry {
            jwk: r.jwk.clone(),
            until: r.until,
        })
        .collect();
    let bytes = serde_json::to_vec_pretty(&entries).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|source| CredentialError::KeyWrite {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::jwt::Claims;

    fn claims(ttl: u64) -> Claims {
        let iat = now();
        Claims {
            iss: "iss".to_owned(),
            sub: "spiffe://demo.tessera.dev/app".parse().expect("id"),
            aud: "vault".to_owned(),
            iat,
            nbf: iat,
            exp: iat + ttl,
            jti: "j".to_owned(),
            task: "t".to_owned(),
            scope: None,
            obo: None,
        }
    }

    #[test]
    fn old_tokens_verify_after_a_rotation_and_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ring = KeyRing::load(dir.path(), SigningAlgorithm::Es256).expect("ring");
        let old = ring.current().sign(&claims(60)).expect("sign");
        ring.signed(now() + 60);
        let r = ring.rotate(Duration::from_secs(60)).expect("rotate");
        assert_ne!(r.kid, r.retired);
        assert!(r.retired_until >= now() + 60);
        let new = ring.current().sign(&claims(60)).expect("sign");
        for t in [&old, &new] {
            ring.verify(t, "iss", "vault").expect("verifies");
        }
        let kids: Vec<String> = ring.jwks()["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid").to_owned())
            .collect();
        assert_eq!(kids, vec![r.kid.clone(), r.retired.clone()]);
        // A restarted agent publishes the retired key too, and signs with the new one.
        let again = KeyRing::load(dir.path(), SigningAlgorithm::Es256).expect("reload");
        assert_eq!(again.current().kid(), r.kid);
        again
            .verify(&old, "iss", "vault")
            .expect("old token after restart");
        assert_eq!(again.jwks(), ring.jwks());
    }

    #[test]
    fn a_key_that_leaves_the_source_verifies_until_its_last_token_expires() {
        let (dir_a, dir_b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let mut ring = KeyRing::load(dir_a.path(), SigningAlgorithm::Es256).expect("ring");
        let other = KeyRing::load(dir_b.path(), SigningAlgorithm::Es256).expect("other");
        let token = other.current().sign(&claims(60)).expect("sign");
        let kid = other.current().kid().to_owned();
        let ttl = Duration::from_secs(60);
        assert!(matches!(
            ring.verify(&token, "iss", "vault"),
            Err(TokenError::UnknownKey { .. })
        ));
        assert!(ring.set_foreign(vec![other.current().jwk()], ttl));
        assert!(
            !ring.set_foreign(vec![other.current().jwk()], ttl),
            "no change"
        );
        ring.verify(&token, "iss", "vault")
            .expect("a foreign key verifies");
        // Gone from the source: still published and verifying, for the longest TTL and grace.
        assert!(
            !ring.set_foreign(Vec::new(), ttl),
            "still published: no change"
        );
        ring.verify(&token, "iss", "vault")
            .expect("verifies after leaving");
        assert!(
            ring.jwks()["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .any(|k| k["kid"] == kid.as_str())
        );
        let until = ring.foreign[0].until;
        assert!(
            until >= now() + 60 + GRACE_SECONDS - 1 && until <= now() + 60 + GRACE_SECONDS,
            "{until}"
        );
        // Back in the source: held again with no end; gone again, then past its time: dropped.
        assert!(!ring.set_foreign(vec![other.current().jwk()], ttl));
        assert_eq!(ring.foreign[0].until, IN_SOURCE);
        ring.set_foreign(Vec::new(), ttl);
        ring.foreign[0].until = now() - 1;
        assert!(ring.set_foreign(Vec::new(), ttl), "the key went");
        assert!(ring.foreign.is_empty());
        assert!(matches!(
            ring.verify(&token, "iss", "vault"),
            Err(TokenError::UnknownKey { .. })
        ));
        assert_eq!(ring.jwks()["keys"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn a_retired_key_past_its_time_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ring = KeyRing::load(dir.path(), SigningAlgorithm::Es256).expect("ring");
        let old = ring.current().sign(&claims(60)).expect("sign");
        ring.rotate(Duration::ZERO).expect("rotate");
        // Published for the grace only; pretend it passed.
        for r in &mut ring.retired {
            r.until = now() - 1;
        }
        assert!(ring.prune());
        assert!(matches!(
            ring.verify(&old, "iss", "vault"),
            Err(TokenError::UnknownKey { .. })
        ));
        assert_eq!(ring.jwks()["keys"].as_array().map(Vec::len), Some(1));
        let again = KeyRing::load(dir.path(), SigningAlgorithm::Es256).expect("reload");
        assert_eq!(again.jwks()["keys"].as_array().map(Vec::len), Some(1));
    }
}
