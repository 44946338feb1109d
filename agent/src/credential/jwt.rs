//! JWT claims, signing and verification (JWS compact, ES256 or EdDSA, `kid` = the key's
//! thumbprint). Every token is a JWT-SVID: `sub` the SPIFFE ID, one `aud`, `exp`.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::TokenError;
use super::keys::{SigningAlgorithm, SigningKeys};
use crate::identity::spiffe::SpiffeId;

/// Seconds of clock skew tolerated when checking `exp` and `nbf`.
pub(crate) const LEEWAY_SECONDS: u64 = 5;

/// The claims of a Tessera credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The holder's workload.
    pub sub: SpiffeId,
    /// One endpoint name.
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub task: String,
    /// The granted scopes, space-separated (RFC 8693 4.2); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// On whose behalf (delegation): the person's token's issuer and subject; absent when the
    /// workload acts for itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obo: Option<OnBehalfOf>,
}

/// The `obo` claim: who the holder acts for, from a verified `subject_token`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnBehalfOf {
    pub iss: String,
    pub sub: String,
}

impl SigningKeys {
    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut header = Header::new(self.algorithm.jose());
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(TokenError::Sign)
    }

    /// Verifies signature, key id, issuer, audience, `exp` and `nbf` (the service verifies
    /// through its key ring, which knows retired keys too).
    #[cfg(test)]
    pub(crate) fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
    ) -> Result<Claims, TokenError> {
        self.verifier(token)?.claims(token, issuer, audience)
    }

    /// Verifies a JWT-SVID signed by this key for `audience`: signature, `aud`, `exp`, `nbf`,
    /// and `sub` a SPIFFE ID. The issuer is not checked (JWT-SVID does not require one).
    #[cfg(test)]
    pub(crate) fn verify_svid(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), TokenError> {
        self.verifier(token)?.svid(token, audience)
    }

    #[cfg(test)]
    fn verifier(&self, token: &str) -> Result<Verifier<'_>, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(TokenError::Malformed)?;
        if header.alg != self.algorithm.jose() || header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(TokenError::UnknownKey { kid: header.kid });
        }
        Ok(Verifier {
            algorithm: self.algorithm,
            decoding: &self.decoding,
        })
    }
}

/// A public key that a token's header named (its `kid` and `alg` already checked).
pub(crate) struct Verifier<'a> {
    pub(crate) algorithm: SigningAlgorithm,
    pub(crate) decoding: &'a DecodingKey,
}

impl Verifier<'_> {
    fn validation(&self, audience: &str) -> Validation {
        let mut validation = Validation::new(self.algorithm.jose());
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_audience(&[audience]);
        validation
    }

    /// A Tessera credential: issuer too, and every claim Tessera writes.
    pub(crate) fn claims(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
    ) -> Result<Claims, TokenError> {
        let mut validation = self.validation(audience);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "sub", "aud"]);
        jsonwebtoken::decode::<Claims>(token, self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(classify)
    }

    /// A JWT-SVID: `sub` a SPIFFE ID, `aud`, `exp`; its claims as they are.
    pub(crate) fn svid(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), TokenError> {
        let mut validation = self.validation(audience);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            self.decoding,
            &validation,
        )
        .map(|data| data.claims)
        .map_err(classify)?;
        let sub = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| s.parse::<SpiffeId>().ok())
            .ok_or(TokenError::NotSpiffe)?;
        Ok((sub, claims))
    }
}

fn classify(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed(e)
        }
        _ => TokenError::Invalid(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::Algorithm;
    use std::time::{SystemTime, UNIX_EPOCH};

    const ISS: &str = "spiffe://demo.tessera.dev/tessera-agent";

    fn keys() -> (tempfile::TempDir, SigningKeys) {
        keys_of(SigningAlgorithm::Es256)
    }

    fn keys_of(alg: SigningAlgorithm) -> (tempfile::TempDir, SigningKeys) {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = SigningKeys::load_or_generate(dir.path(), alg).expect("keys");
        (dir, keys)
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn claims(iat: u64, ttl: u64) -> Claims {
        Claims {
            iss: ISS.to_owned(),
            sub: "spiffe://demo.tessera.dev/agent"
                .parse()
                .expect("spiffe id"),
            aud: "vault".to_owned(),
            iat,
            nbf: iat,
            exp: iat + ttl,
            jti: uuid::Uuid::now_v7().to_string(),
            task: "job-42".to_owned(),
            scope: None,
            obo: None,
        }
    }

    #[test]
    fn round_trip() {
        for (alg, jose) in [
            (SigningAlgorithm::Es256, Algorithm::ES256),
            (SigningAlgorithm::EdDsa, Algorithm::EdDSA),
        ] {
            let (_d, keys) = keys_of(alg);
            let c = claims(now(), 300);
            let token = keys.sign(&c).expect("sign");
            assert_eq!(keys.verify(&token, ISS, "vault").expect("verify"), c);
            let header = jsonwebtoken::decode_header(&token).expect("header");
            assert_eq!(header.alg, jose);
            assert_eq!(header.kid.as_deref(), Some(keys.kid()));
            assert_eq!(header.typ.as_deref(), Some("JWT"));
        }
    }

    #[test]
    fn verifies_with_the_published_jwk() {
        for alg in [SigningAlgorithm::Es256, SigningAlgorithm::EdDsa] {
            let (_d, keys) = keys_of(alg);
            let token = keys.sign(&claims(now(), 300)).expect("sign");
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_value(keys.jwks()).expect("jwks parses");
            let jwk = set.find(keys.kid()).expect("kid in jwks");
            let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("decoding key");
            let mut v = Validation::new(alg.jose());
            v.set_audience(&["vault"]);
            jsonwebtoken::decode::<Claims>(&token, &key, &v).expect("verifies via JWKS");
        }
    }

    #[test]
    fn tampered_payload_and_signature_are_rejected() {
        let (_d, keys) = keys();
        let token = keys.sign(&claims(now(), 300)).expect("sign");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);

        let mut forged = claims(now(), 300);
        forged.sub = "spiffe://demo.tessera.dev/intruder".parse().expect("id");
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        let tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
        assert!(matches!(
            keys.verify(&tampered, ISS, "vault"),
            Err(TokenError::BadSignature)
        ));

        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig b64");
        sig[0] ^= 1;
        let tampered = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert!(matches!(
            keys.verify(&tampered, ISS, "vault"),
            Err(TokenError::BadSignature)
        ));

        assert!(matches!(
            keys.verify("not.a.jwt", ISS, "vault"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn verify_svid_answers_the_spiffe_id_and_claims() {
        let (_d, keys) = keys();
        let c = claims(now(), 300);
        let token = keys.sign(&c).expect("sign");
        let (id, got) = keys.verify_svid(&token, "vault").expect("valid svid");
        assert_eq!(id, c.sub);
        assert_eq!(got["task"], "job-42");
        assert!(matches!(
            keys.verify_svid(&token, "payments-api"),
            Err(TokenError::WrongAudience)
        ));
        let (_d2, theirs) = keys_of(SigningAlgorithm::Es256);
        assert!(matches!(
            keys.verify_svid(&theirs.sign(&c).expect("sign"), "vault"),
            Err(TokenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn expired_is_rejected() {
        let (_d, keys) = keys();
        let token = keys.sign(&claims(now() - 600, 60)).expect("sign");
        assert!(matches!(
            keys.verify(&token, ISS, "vault"),
            Err(TokenError::Expired)
        ));
    }

    #[test]
    fn not_yet_valid_is_rejected() {
        let (_d, keys) = keys();
        let token = keys.sign(&claims(now() + 600, 60)).expect("sign");
        assert!(matches!(
            keys.verify(&token, ISS, "vault"),
            Err(TokenError::NotYetValid)
        ));
    }

    #[test]
    fn wrong_audience_and_issuer_are_rejected() {
        let (_d, keys) = keys();
        let token = keys.sign(&claims(now(), 300)).expect("sign");
        assert!(matches!(
            keys.verify(&token, ISS, "payments-api"),
            Err(TokenError::WrongAudience)
        ));
        assert!(matches!(
            keys.verify(&token, "tessera", "vault"),
            Err(TokenError::WrongIssuer)
        ));
    }

    #[test]
    fn token_from_another_key_is_rejected() {
        let (_d1, ours) = keys();
        let (_d2, theirs) = keys();
        let token = theirs.sign(&claims(now(), 300)).expect("sign");
        assert!(matches!(
            ours.verify(&token, ISS, "vault"),
            Err(TokenError::UnknownKey { .. })
        ));
        // Even when it claims our kid, the signature gives it away.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(ours.kid().to_owned());
        let forged =
            jsonwebtoken::encode(&header, &claims(now(), 300), &theirs.encoding).expect("sign");
        assert!(matches!(
            ours.verify(&forged, ISS, "vault"),
            Err(TokenError::BadSignature)
        ));
    }
}
