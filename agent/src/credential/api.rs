//! The Workload API server: `POST /v1/credentials`, `DELETE /v1/credentials/{jti}`, `GET /v1/jwks`
//! over HTTP/1.1 on a unix socket, and the SPIFFE Workload API (gRPC, [`super::grpc`]) on the
//! same socket, told apart by the HTTP/2 preface; the caller attested from a pidfd of the process that holds
//! the client end ([`peer`](crate::identity::peer): `SO_PEERPIDFD`, or its proven fallback).

use std::fs::{self, DirBuilder};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tracing::warn;

use super::CredentialError;
use super::external::{ExternalToken, MAX_TOKEN_LEN};
use super::grpc;
use super::http::{self, HttpResponse};
use super::service::{CredentialService, Refusal};
use crate::identity::attest::still_running;
use crate::identity::attestor::Attested;
use crate::identity::peer::{self, Caller, Method as ProofMethod, error_chain};
use crate::identity::spiffe::SpiffeId;

/// Longest `task` accepted.
const MAX_TASK_LEN: usize = 256;
/// Most `scopes` one request may name.
const MAX_SCOPES: usize = 64;
/// Most `evidence_tokens` one request may carry.
const MAX_EVIDENCE_TOKENS: usize = 8;
const REQUEST_SHAPE: &str = r#"{"audience": ENDPOINT, "task": ID (optional), "ttl_seconds": N (optional, >= 1), "scopes": [SCOPE, ...] (optional), "subject_token": JWT (optional), "evidence_tokens": [JWT, ...] (optional)}"#;

/// `POST /v1/credentials` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The endpoint name the token is for.
    pub audience: String,
    /// Names the task in the token; the jti when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Defaults to the rule's maxTtl; more than that is refused, not shortened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// The scopes the token should carry, each one the rule's `scopes:` lists; all of the
    /// rule's when absent. An issuance module may grant fewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// The person the workload acts for: a JWT from one of the policy's `trustedIssuers`
    /// (RFC 8693's `subject_token`). The credential then names them in `obo` and lives no
    /// longer than this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token: Option<ExternalToken>,
    /// The workload's own tokens from trusted issuers (a Kubernetes projected service-account
    /// token, a CI job's OIDC token): evidence for rules' `match.token` and the issuance
    /// module, never its identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence_tokens: Vec<ExternalToken>,
}

/// `POST /v1/credentials` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub jti: String,
    pub spiffe_id: SpiffeId,
    pub audience: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
    /// What the kernel grant is bound to, from the rule: `process`, `process-tree` or
    /// `workload` (empty from an agent older than this field).
    #[serde(default)]
    pub bind: String,
    /// The scopes granted (the token's `scope` claim); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

impl TokenRequest {
    /// Checks what the type cannot; returns the task, if any.
    pub(crate) fn validate(&self) -> Result<Option<String>, Refusal> {
        if self.audience.is_empty() {
            return Err(Refusal::BadRequest(
                "audience is empty: give the name of the endpoint the token is for".to_owned(),
            ));
        }
        if self.ttl_seconds == Some(0) {
            return Err(Refusal::BadRequest(
                "ttl_seconds must be at least 1; leave it out to get the rule's maxTtl".to_owned(),
            ));
        }
        if let Some(task) = &self.task
            && (task.is_empty() || task.len() > MAX_TASK_LEN || task.chars().any(char::is_control))
        {
            return Err(Refusal::BadRequest(format!(
                "task must be 1 to {MAX_TASK_LEN} bytes without control characters"
            )));
        }
        if let Some(scopes) = &self.scopes {
            let bad = scopes.iter().find(|s| {
                s.is_empty() || s.len() > 128 || !s.chars().all(|c| c.is_ascii_graphic())
            });
            if scopes.len() > MAX_SCOPES || bad.is_some() {
                return Err(Refusal::BadRequest(format!(
                    "scopes must be at most {MAX_SCOPES} names of 1 to 128 printable characters \
                     without spaces (e.g. [\"secrets:read\"]); leave scopes out to get the rule's"
                )));
            }
        }
        let too_long = |t: &ExternalToken| t.0.is_empty() || t.0.len() > MAX_TOKEN_LEN;
        if self.subject_token.as_ref().is_some_and(too_long) {
            return Err(Refusal::BadRequest(format!(
                "subject_token must be a JWT of 1 to {MAX_TOKEN_LEN} bytes"
            )));
        }
        if self.evidence_tokens.len() > MAX_EVIDENCE_TOKENS
            || self.evidence_tokens.iter().any(too_long)
        {
            return Err(Refusal::BadRequest(format!(
                "evidence_tokens must be at most {MAX_EVIDENCE_TOKENS} JWTs of 1 to {MAX_TOKEN_LEN} bytes each"
            )));
        }
        Ok(self.task.clone())
    }
}

/// Binds a unix socket at `path` with permissions `mode`: creates the parent directory (0755),
/// replaces a stale socket, refuses to replace anything else or a socket still in use.
/// Call it inside a tokio runtime.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, CredentialError> {
    let fail = |source: io::Error| CredentialError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(fail)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving this socket (is another agent running?)",
                )));
            }
            fs::remove_file(path).map_err(fail)?;
        }
        Ok(_) => {
            return Err(fail(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; remove it or choose another path",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(fail)?;
    Ok(listener)
}

/// Serves the Workload API until `shutdown` resolves, proving callers with `method` (see
/// [`ProofMethod::from_environment`]; without one, every credential request gets a 503).
pub async fn serve_workload_api(
    listener: UnixListener,
    svc: Arc<CredentialService>,
    method: Result<ProofMethod, peer::Unavailable>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CredentialError> {
    let method = Arc::new(method);
    http::accept_loop(listener, shutdown, "workload", move |stream| {
        // Take the caller at once: its pidfd pins the connecting process, whatever happens to
        // its pid; the proof (if the method needs one) comes with the request.
        let caller = Arc::new(match method.as_ref() {
            Ok(m) => Ok(Caller::take(*m, &stream)),
            Err(why) => Err(why.0.clone()),
        });
        let svc = svc.clone();
        let h2 = grpc::h2_handler(svc.clone(), caller.clone());
        http::spawn_connection_or_h2(
            stream,
            "workload",
            move |req| route(svc.clone(), caller.clone(), req),
            Some(h2),
        );
    })
    .await
}

/// Why a request was not answered with a credential.
pub(super) enum Refused {
    Refusal(Refusal),
    /// 503 `{"error", "reason": "attestation_unavailable"}`: the agent cannot attest callers.
    Unavailable(String),
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Self {
        Refused::Refusal(r)
    }
}

fn refused(r: &Refused) -> HttpResponse {
    match r {
        Refused::Refusal(r) => http::refusal(r),
        Refused::Unavailable(error) => http::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "error": error, "reason": "attestation_unavailable" }),
        ),
    }
}

async fn route(
    svc: Arc<CredentialService>,
    caller: Arc<Result<Caller, String>>,
    req: Request<Incoming>,
) -> HttpResponse {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match path.as_str() {
        "/v1/credentials" if method == Method::POST => {
            let result = async {
                let body: TokenRequest = http::read_json(req, REQUEST_SHAPE).await?;
                let (pidfd, evidence) = attest(&svc, &caller)?;
                Ok(svc.issue(&evidence, &body, &|| {
                    still_running(pidfd, evidence.evidence.pid)
                })?)
            }
            .await;
            match result {
                Ok(resp) => http::json(StatusCode::OK, &resp),
                Err(r) => refused(&r),
            }
        }
        "/v1/credentials" => http::method_not_allowed("POST"),
        "/v1/jwks" if method == Method::GET => http::json(StatusCode::OK, &svc.jwks()),
        "/v1/jwks" => http::method_not_allowed("GET"),
        p => match p.strip_prefix("/v1/credentials/") {
            Some(jti) if !jti.is_empty() && !jti.contains('/') => {
                if method != Method::DELETE {
                    return http::method_not_allowed("DELETE");
                }
                let result = attest(&svc, &caller)
                    .and_then(|(_, evidence)| Ok(svc.end_own(&evidence, jti)?));
                match result {
                    Ok(jti) => http::json(StatusCode::OK, &serde_json::json!({ "revoked": jti })),
                    Err(r) => refused(&r),
                }
            }
            _ => http::not_found(p),
        },
    }
}

pub(super) fn attest<'a>(
    svc: &CredentialService,
    caller: &'a Result<Caller, String>,
) -> Result<(&'a std::os::fd::OwnedFd, Attested), Refused> {
    let caller = caller
        .as_ref()
        .map_err(|why| Refused::Unavailable(format!("the agent cannot attest callers: {why}")))?;
    let pidfd = caller.proven().map_err(|e| match e {
        e if e.is_exited() => Refused::Refusal(Refusal::Forbidden {
            reason: "caller_exited",
            error: e.to_string(),
        }),
        e => {
            warn!(error = %error_chain(&e), "cannot prove who a caller is");
            Refused::Unavailable(format!("cannot attest the caller: {}", error_chain(&e)))
        }
    })?;
    match svc.attestor().attest_pidfd(pidfd) {
        Ok(evidence) => Ok((pidfd, evidence)),
        Err(e) if e.is_exited() => Err(Refused::Refusal(Refusal::Forbidden {
            reason: "caller_exited",
            error: "the calling process exited".to_owned(),
        })),
        Err(e) => {
            warn!(error = %e, "cannot attest a caller");
            Err(Refused::Refusal(Refusal::Internal(format!(
                "cannot attest the caller: {e}"
            ))))
        }
    }
}
