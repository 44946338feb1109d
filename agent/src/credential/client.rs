//! Clients of the Workload API and the admin API (used by `tessera token|revoke|status`).

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tracing::debug;

use super::ClientError;
use super::api::{TokenRequest, TokenResponse};
use super::registry::RevokeTarget;

/// Asks for a credential for the calling process (`POST /v1/credentials`).
pub async fn request_token(
    socket: &Path,
    req: &TokenRequest,
) -> Result<TokenResponse, ClientError> {
    let body = serde_json::to_vec(req).map_err(ClientError::Encode)?;
    call(socket, Method::POST, "/v1/credentials", Some(body)).await
}

/// Ends a credential early (`DELETE /v1/credentials/{jti}`); returns the jti ended.
pub async fn end_credential(socket: &Path, jti: &str) -> Result<String, ClientError> {
    #[derive(Deserialize)]
    struct Revoked {
        revoked: String,
    }
    let path = format!("/v1/credentials/{jti}");
    let r: Revoked = call(socket, Method::DELETE, &path, None).await?;
    Ok(r.revoked)
}

/// Revokes credentials through the admin API; returns the jtis revoked.
pub async fn admin_revoke(
    socket: &Path,
    target: &RevokeTarget,
) -> Result<Vec<String>, ClientError> {
    #[derive(Deserialize)]
    struct Revoked {
        revoked: Vec<String>,
    }
    let body = serde_json::to_vec(target).map_err(ClientError::Encode)?;
    let r: Revoked = call(socket, Method::POST, "/v1/admin/revoke", Some(body)).await?;
    Ok(r.revoked)
}

/// A new signing key now (`POST /v1/admin/rotate-key`): `{"kid", "retired", "retired_until"}`.
pub async fn admin_rotate_key(socket: &Path) -> Result<serde_json::Value, ClientError> {
    call(
        socket,
        Method::POST,
        "/v1/admin/rotate-key",
        Some(b"{}".to_vec()),
    )
    .await
}

/// The agent's status document (`GET /v1/admin/status`).
pub async fn admin_status(socket: &Path) -> Result<serde_json::Value, ClientError> {
    call(socket, Method::GET, "/v1/admin/status", None).await
}

/// The OIDC documents (`GET /v1/admin/oidc`): `{"issuer", "jwks", "discovery"}`.
pub async fn admin_oidc(socket: &Path) -> Result<serde_json::Value, ClientError> {
    call(socket, Method::GET, "/v1/admin/oidc", None).await
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    reason: Option<String>,
}

pub(crate) async fn call<T: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "connection to the agent ended with an error");
        }
    });

    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "localhost");
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Refused {
            status: 0,
            reason: None,
            error: format!("cannot build the request: {e}"),
        })?;
    let response = sender
        .send_request(request)
        .await
        .map_err(ClientError::Http)?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes();
    drop(sender);
    conn.abort();

    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            status: status.as_u16(),
            source,
        });
    }
    let (error, reason) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(e) => (e.error, e.reason),
        Err(_) => (String::from_utf8_lossy(&bytes).into_owned(), None),
    };
    Err(ClientError::Refused {
        status: status.as_u16(),
        reason,
        error,
    })
}
