//! Entry points for the fuzz targets (`fuzz/`, built with `--features fuzzing`): the Workload
//! API's request checks and token signing and verification, without a socket.

use std::path::{Path, PathBuf};

use super::api::TokenRequest;
use super::errors::{CredentialError, TokenError};
use super::http;
use super::jwt::Claims;
use super::keyring::KeyRing;
use super::keys::SigningAlgorithm;

/// What the Workload API makes of the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// No whole head yet: the server reads on.
    Partial,
    /// Refused before the request is routed: the HTTP status.
    Refused(u16),
    /// A well-formed head; `body` is what `POST /v1/credentials` makes of the bytes after it
    /// (the task it would issue for, or the 400 message).
    Head {
        method: String,
        path: String,
        body: Result<Option<String>, String>,
    },
}

/// Runs `bytes` through the head checks of every request, then the credential request's body
/// checks, as [`serve_workload_api`](super::serve_workload_api) does.
pub fn workload_request(bytes: &[u8]) -> RequestOutcome {
    match http::check_head(bytes) {
        Ok(false) if bytes.len() < http::MAX_HEAD_BYTES => RequestOutcome::Partial,
        Ok(false) => RequestOutcome::Refused(http::head_too_large(bytes).status()),
        Err(refused) => RequestOutcome::Refused(refused.status()),
        Ok(true) => {
            let mut headers = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(at)) = req.parse(bytes) else {
                // check_head said complete: the same parser must agree.
                return RequestOutcome::Refused(0);
            };
            let method = req.method.unwrap_or_default().to_owned();
            let path = req.path.unwrap_or_default().to_owned();
            let rest = &bytes[at..];
            let body = if rest.len() > http::MAX_BODY_BYTES {
                Err("the request body is too large".to_owned())
            } else {
                serde_json::from_slice::<TokenRequest>(rest)
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.validate().map_err(|refusal| format!("{refusal:?}")))
            };
            RequestOutcome::Head { method, path, body }
        }
    }
}

/// A signing key of its own (in a private directory it removes on drop), to sign and verify
/// tokens as the agent does.
pub struct TokenKeys {
    keys: KeyRing,
    dir: PathBuf,
    issuer: String,
}

impl TokenKeys {
    /// Creates a key under `parent` (a fresh directory inside it).
    pub fn new(parent: &Path, issuer: &str) -> Result<TokenKeys, CredentialError> {
        let dir = parent.join(format!("tessera-fuzz-keys-{}", std::process::id()));
        Ok(TokenKeys {
            keys: KeyRing::load(&dir, SigningAlgorithm::default())?,
            dir,
            issuer: issuer.to_owned(),
        })
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        self.keys.current().sign(claims)
    }

    pub fn verify(&self, token: &str, audience: &str) -> Result<Claims, TokenError> {
        self.keys.verify(token, &self.issuer, audience)
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }
}

impl Drop for TokenKeys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
