//! OIDC discovery for federation: the `https://` issuer, the discovery document and the JWKS at
//! its `jwks_uri`, as the optional listener (`--oidc-addr`) serves them and `tessera bundle
//! export` writes them for a static host.

use std::fmt;
use std::str::FromStr;

mod server;
mod tls;

pub use server::{CertReload, OidcListen, OidcServer};
pub use tls::{OidcError, TlsFiles};

/// Where the discovery document lives under the issuer (OpenID Connect Discovery 1.0 §4).
pub const DISCOVERY_PATH: &str = ".well-known/openid-configuration";
/// Where the JWKS lives under the issuer (the discovery document's `jwks_uri`).
pub const JWKS_PATH: &str = ".well-known/jwks.json";

/// An issuer that verifiers can discover: an `https://` URL with a host, no user, query or
/// fragment. Tokens carry it verbatim as `iss`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    url: String,
    /// The URL's path without its trailing `/` (empty for a bare host).
    base_path: String,
}

impl Issuer {
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The URL of a document `rel` (e.g. [`JWKS_PATH`]) under the issuer.
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url.trim_end_matches('/'))
    }

    /// The request path of a document `rel` under the issuer, as the listener is asked for it.
    pub fn path_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base_path)
    }
}

impl fmt::Display for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl FromStr for Issuer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            Err(format!(
                "issuer `{s}` {why}: write an https:// URL such as https://oidc.example.org or \
                 https://example.org/tessera (verifiers fetch <issuer>/{DISCOVERY_PATH})"
            ))
        };
        if s.contains(['#', '?']) {
            return bad("has a query or fragment");
        }
        let Ok(uri) = s.parse::<hyper::Uri>() else {
            return bad("is not a URL");
        };
        if uri.scheme_str() != Some("https") {
            return bad("is not an https:// URL");
        }
        let Some(authority) = uri.authority() else {
            return bad("has no host");
        };
        if authority.as_str().contains('@') {
            return bad("has a user name in it");
        }
        if authority.host().is_empty() {
            return bad("has no host");
        }
        Ok(Issuer {
            url: s.to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// The trust domain's bundle as an OIDC JWKS: the same keys with `use: "sig"` in place of the
/// SPIFFE bundle's `use: "jwt-svid"`. OIDC relying parties take only `sig` keys (RFC 7517
/// §4.2; PyJWT's `PyJWKClient`, for one, skips every other key).
pub fn oidc_jwks(bundle: &serde_json::Value) -> serde_json::Value {
    let mut jwks = bundle.clone();
    if let Some(keys) = jwks
        .get_mut("keys")
        .and_then(serde_json::Value::as_array_mut)
    {
        for key in keys {
            if key.get("use").and_then(serde_json::Value::as_str) == Some("jwt-svid") {
                key["use"] = "sig".into();
            }
        }
    }
    jwks
}

/// The JOSE algorithms of a JWKS's keys (sorted, each once).
fn algorithms(jwks: &serde_json::Value) -> Vec<String> {
    let mut algs: Vec<String> = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["alg"].as_str().map(str::to_owned))
        .collect();
    algs.sort();
    algs.dedup();
    algs
}

/// The discovery document of `issuer` whose keys are `jwks`: what a relying party (Vault's
/// `oidc_discovery_url`, a cloud's workload-identity federation) reads to find the keys. Tessera
/// issues no ID tokens through a browser flow; `response_types_supported` and
/// `subject_types_supported` are required members and say `id_token` and `public`.
pub fn discovery_document(issuer: &Issuer, jwks: &serde_json::Value) -> serde_json::Value {
    let mut algs = algorithms(jwks);
    if algs.is_empty() {
        algs.push(super::SigningAlgorithm::default().as_str().to_owned());
    }
    serde_json::json!({
        "issuer": issuer.as_str(),
        "jwks_uri": issuer.url_of(JWKS_PATH),
        "id_token_signing_alg_values_supported": algs,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "task"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_issuers_are_accepted_as_written() {
        let i: Issuer = "https://oidc.example.org".parse().expect("issuer");
        assert_eq!(i.as_str(), "https://oidc.example.org");
        assert_eq!(
            i.url_of(JWKS_PATH),
            "https://oidc.example.org/.well-known/jwks.json"
        );
        assert_eq!(
            i.path_of(DISCOVERY_PATH),
            "/.well-known/openid-configuration"
        );
        let i: Issuer = "https://example.org:8443/tessera/prod/"
            .parse()
            .expect("issuer");
        assert_eq!(i.as_str(), "https://example.org:8443/tessera/prod/");
        assert_eq!(
            i.url_of(DISCOVERY_PATH),
            "https://example.org:8443/tessera/prod/.well-known/openid-configuration"
        );
        assert_eq!(i.path_of(JWKS_PATH), "/tessera/prod/.well-known/jwks.json");
    }

    #[test]
    fn other_issuers_are_refused_with_what_to_write() {
        for bad in [
            "http://oidc.example.org",
            "spiffe://example.org/tessera-agent",
            "oidc.example.org",
            "https://",
            "https://user@oidc.example.org",
            "https://oidc.example.org/?a=b",
            "https://oidc.example.org/#x",
            "",
        ] {
            let err = bad.parse::<Issuer>().expect_err(bad);
            assert!(err.contains("https://oidc.example.org"), "{err}");
        }
    }

    #[test]
    fn the_oidc_jwks_marks_the_keys_for_signatures() {
        let bundle = serde_json::json!({"keys": [
            {"kid": "a", "alg": "ES256", "use": "jwt-svid"}, {"kid": "b", "alg": "ES256"}
        ]});
        let jwks = oidc_jwks(&bundle);
        assert_eq!(jwks["keys"][0]["use"], "sig");
        assert_eq!(jwks["keys"][0]["kid"], "a");
        assert!(jwks["keys"][1].get("use").is_none());
    }

    #[test]
    fn the_discovery_document_names_the_keys_and_their_algorithms() {
        let issuer: Issuer = "https://oidc.example.org/td".parse().expect("issuer");
        let jwks = serde_json::json!({"keys": [
            {"kid": "a", "alg": "ES256"}, {"kid": "b", "alg": "EdDSA"}, {"kid": "c", "alg": "ES256"}
        ]});
        let doc = discovery_document(&issuer, &jwks);
        assert_eq!(doc["issuer"], "https://oidc.example.org/td");
        assert_eq!(
            doc["jwks_uri"],
            "https://oidc.example.org/td/.well-known/jwks.json"
        );
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            serde_json::json!(["ES256", "EdDSA"])
        );
        assert_eq!(
            doc["response_types_supported"],
            serde_json::json!(["id_token"])
        );
        assert_eq!(
            doc["subject_types_supported"],
            serde_json::json!(["public"])
        );
    }
}
