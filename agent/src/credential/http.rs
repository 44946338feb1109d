//! Plumbing shared by the Workload API and the admin API: accept loop, JSON bodies and answers.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::CredentialError;
use super::service::Refusal;

/// Largest request body accepted.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;
/// A client gets this long to send its headers, and again its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type HttpResponse = Response<Full<Bytes>>;

/// Accepts connections until `shutdown` resolves; `on_conn` handles each (it spawns).
pub(crate) async fn accept_loop(
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
    api: &'static str,
    mut on_conn: impl FnMut(UnixStream),
) -> Result<(), CredentialError> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => on_conn(stream),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(api, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves HTTP/1.1 on one connection with `handle`, on its own task.
pub(crate) fn spawn_connection<H, F>(stream: UnixStream, api: &'static str, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let fut = handle(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(e) = conn.await {
            debug!(api, error = %e, "connection ended with an error");
        }
    });
}

/// Reads a JSON body of at most `MAX_BODY_BYTES`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, Refusal> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return Err(Refusal::BadRequest(
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the request body is over {MAX_BODY_BYTES} bytes")
                } else {
                    format!("cannot read the request body: {e}")
                },
            ));
        }
        Err(_) => {
            return Err(Refusal::BadRequest(
                "the request body did not arrive in time".to_owned(),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::BadRequest(format!("invalid request body: {e}; expected {expected}")))
}

pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> HttpResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(crate) fn refusal(r: &Refusal) -> HttpResponse {
    match r {
        Refusal::BadRequest(error) => json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": error }),
        ),
        Refusal::Forbidden { reason, error } => json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({ "error": error, "reason": reason }),
        ),
        Refusal::NotFound(error) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": error }),
        ),
        Refusal::Internal(error) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": error }),
        ),
    }
}

pub(crate) fn not_found(path: &str) -> HttpResponse {
    refusal(&Refusal::NotFound(format!("no such resource: {path}")))
}

pub(crate) fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut resp = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": format!("method not allowed here; use {allow}") }),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}
