//! Plumbing shared by the Workload API and the admin API: accept loop, JSON bodies and answers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::CredentialError;
use super::service::Refusal;

/// Largest request body accepted.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;
/// A client gets this long to send its headers, and again its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type HttpResponse = Response<Full<Bytes>>;

/// Connections one API serves at once, from every peer together.
pub(crate) const MAX_CONNECTIONS: usize = 512;
/// …and from the processes of one uid: one local process cannot take the API from the others.
pub(crate) const MAX_CONNECTIONS_PER_UID: usize = 64;

/// The connections open now, in all and per peer uid.
#[derive(Default)]
struct Budget {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

/// One admitted connection's place in the budget, given back when it is dropped.
pub(crate) struct Slot {
    budget: Arc<Mutex<Budget>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        budget.total = budget.total.saturating_sub(1);
        if let Some(n) = budget.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                budget.per_uid.remove(&self.uid);
            }
        }
    }
}

/// An accepted connection within the budget: the stream, and its place.
pub(crate) struct Admitted {
    stream: UnixStream,
    slot: Slot,
}

impl std::os::fd::AsFd for Admitted {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Takes a place for a connection from `uid`, or says why there is none.
fn admit(budget: &Arc<Mutex<Budget>>, uid: u32) -> Result<Slot, String> {
    let mut b = budget.lock().unwrap_or_else(|e| e.into_inner());
    let of_uid = b.per_uid.get(&uid).copied().unwrap_or(0);
    if of_uid >= MAX_CONNECTIONS_PER_UID {
        return Err(format!(
            "uid {uid} has {of_uid} connections open to this API, the most one uid may have; \
             close some (one request a connection) and retry"
        ));
    }
    if b.total >= MAX_CONNECTIONS {
        return Err(format!(
            "the API has {} connections open, the most it serves at once; retry shortly",
            b.total
        ));
    }
    b.total += 1;
    *b.per_uid.entry(uid).or_default() += 1;
    Ok(Slot {
        budget: budget.clone(),
        uid,
    })
}

/// Accepts connections until `shutdown` resolves; `on_conn` handles each admitted one (it
/// spawns). A connection past the budget gets a JSON 503 `too_many_connections` with a
/// `Retry-After` and is closed at once.
pub(crate) async fn accept_loop(
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
    api: &'static str,
    mut on_conn: impl FnMut(Admitted),
) -> Result<(), CredentialError> {
    tokio::pin!(shutdown);
    let budget = Arc::new(Mutex::new(Budget::default()));
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
                    match admit(&budget, uid) {
                        Ok(slot) => on_conn(Admitted { stream, slot }),
                        Err(error) => {
                            debug!(api, uid, "connection refused: over the budget");
                            tokio::spawn(async move {
                                let refused = BadHead::new(StatusCode::SERVICE_UNAVAILABLE, error)
                                    .with_reason("too_many_connections");
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(1),
                                    refused.write_to(&mut stream),
                                )
                                .await;
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(api, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves one HTTP/1.1 request on one connection with `handle`, on its own task. The request
/// head is read and checked first ([`read_head`]): a malformed one gets a JSON error and the
/// connection is closed. One request a connection, so that every head is checked that way.
pub(crate) fn spawn_connection<H, F>(admitted: Admitted, api: &'static str, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    spawn_connection_or_h2(admitted, api, handle, None);
}

/// The HTTP/2 client preface (RFC 9113 §3.4): how a gRPC connection starts.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves an HTTP/2 connection (its preface already read, and read again first).
pub(crate) type H2Handler =
    Box<dyn FnOnce(Prefixed) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// As [`spawn_connection`], but a connection that starts with the HTTP/2 preface goes to `h2`
/// (when given) instead: one socket speaks both.
pub(crate) fn spawn_connection_or_h2<H, F>(
    admitted: Admitted,
    api: &'static str,
    handle: H,
    h2: Option<H2Handler>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let Admitted { mut stream, slot } = admitted;
    tokio::spawn(async move {
        // The place in the budget is given back when the connection ends.
        let _slot = slot;
        let mut start = BytesMut::with_capacity(1024);
        if let Some(h2) = h2 {
            // Read until the bytes leave the preface (HTTP/1.1) or hold all of it (HTTP/2).
            loop {
                let read = tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut start)).await;
                if !matches!(read, Ok(Ok(n)) if n > 0) {
                    return;
                }
                let n = start.len().min(H2_PREFACE.len());
                if start[..n] != H2_PREFACE[..n] {
                    break;
                }
                if n == H2_PREFACE.len() {
                    debug!(api, "HTTP/2 connection");
                    h2(Prefixed::new(start.freeze(), stream)).await;
                    return;
                }
            }
        }
        let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, start)).await {
            Ok(Ok(head)) => head,
            Ok(Err(Some(refused))) => {
                debug!(api, status = %refused.status, error = %refused.error, "malformed request refused");
                let _ = refused.write_to(&mut stream).await;
                return;
            }
            Ok(Err(None)) => return,
            Err(_) => {
                let refused = BadHead::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request head did not arrive within {} s",
                        READ_TIMEOUT.as_secs()
                    ),
                );
                let _ = refused.write_to(&mut stream).await;
                return;
            }
        };
        let service = service_fn(move |req| {
            let fut = handle(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(READ_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(Prefixed::new(head.freeze(), stream)), service);
        if let Err(e) = conn.await {
            debug!(api, error = %e, "connection ended with an error");
        }
    });
}

/// Longest request head (request line and header fields) accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields accepted in one request.
pub(crate) const MAX_HEADERS: usize = 64;

/// Reads from `stream` until a whole request head is in, and checks it with the parser hyper
/// uses, plus the `Content-Length` rules of RFC 9110 §8.6. Returns what was read (the head and
/// any body bytes after it); `Err(Some(_))` is a malformed head, `Err(None)` a connection closed
/// before a head.
pub(crate) async fn read_head(
    stream: &mut UnixStream,
    mut buf: BytesMut,
) -> Result<BytesMut, Option<BadHead>> {
    // What the caller read already is looked at first.
    let mut fresh = buf.is_empty();
    loop {
        if fresh {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
        fresh = true;
        match check_head(&buf) {
            Ok(true) => return Ok(buf),
            Ok(false) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(false) => return Err(Some(head_too_large(&buf))),
            Err(refused) => return Err(Some(refused)),
        }
    }
}

/// A connection refused before hyper saw it (a malformed head, the budget): the status, the
/// JSON error text and, for a refusal to retry, its reason.
#[derive(Debug)]
pub(crate) struct BadHead {
    status: StatusCode,
    error: String,
    reason: Option<&'static str>,
}

impl BadHead {
    fn new(status: StatusCode, error: String) -> Self {
        BadHead {
            status,
            error,
            reason: None,
        }
    }

    /// The HTTP status it answers with.
    #[cfg_attr(
        not(feature = "fuzzing"),
        expect(dead_code, reason = "read by the fuzz targets")
    )]
    pub(crate) fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// A refusal worth retrying: says `reason`, and `Retry-After: 1`.
    fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// Writes the answer as HTTP/1.1 and closes the connection.
    async fn write_to(&self, stream: &mut UnixStream) -> std::io::Result<()> {
        let body = match self.reason {
            Some(reason) => serde_json::json!({ "error": self.error, "reason": reason }),
            None => serde_json::json!({ "error": self.error }),
        };
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let retry = if self.reason.is_some() {
            "retry-after: 1\r\n"
        } else {
            ""
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             {retry}connection: close\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    }
}

/// Whether `buf` holds a complete and well-formed request head (false: not complete yet).
pub(crate) fn check_head(buf: &[u8]) -> Result<bool, BadHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(false),
        Ok(httparse::Status::Complete(_)) => {
            content_length(req.headers).map_err(|e| BadHead::new(StatusCode::BAD_REQUEST, e))?;
            Ok(true)
        }
        Err(httparse::Error::TooManyHeaders) => Err(BadHead::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request has more than {MAX_HEADERS} header fields"),
        )),
        Err(e) => Err(BadHead::new(
            StatusCode::BAD_REQUEST,
            format!(
                "malformed HTTP/1.1 request: {e} (within the first {} bytes)",
                buf.len()
            ),
        )),
    }
}

/// The body length the head declares, if any: every `Content-Length` must be a decimal number,
/// and several must agree.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, String> {
    let mut found: Option<u64> = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        let text = std::str::from_utf8(h.value)
            .unwrap_or("")
            .trim_matches([' ', '\t']);
        let value = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| {
                format!(
                    "Content-Length {:?} is not a decimal number of bytes",
                    String::from_utf8_lossy(h.value)
                )
            })?;
        if found.is_some_and(|f| f != value) {
            return Err("the request has Content-Length headers that disagree".to_owned());
        }
        found = Some(value);
    }
    Ok(found)
}

pub(crate) fn head_too_large(buf: &[u8]) -> BadHead {
    if buf.contains(&b'\n') {
        BadHead::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request head is over {MAX_HEAD_BYTES} bytes"),
        )
    } else {
        BadHead::new(
            StatusCode::URI_TOO_LONG,
            format!("the request line is over {MAX_HEAD_BYTES} bytes"),
        )
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub(crate) struct Prefixed {
    prefix: Bytes,
    inner: UnixStream,
}

impl Prefixed {
    fn new(prefix: Bytes, inner: UnixStream) -> Self {
        Prefixed { prefix, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
        Refusal::PolicyDenied { error, reasons } => json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({ "error": error, "reason": "policy_denied", "reasons": reasons }),
        ),
        Refusal::NotFound(error) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": error }),
        ),
        Refusal::Internal(error) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": error }),
        ),
        Refusal::TooManyRequests { retry_after, error } => {
            let mut resp = json(
                StatusCode::TOO_MANY_REQUESTS,
                &serde_json::json!({ "error": error, "reason": "rate_limited" }),
            );
            // Whole seconds (RFC 9110), rounded up: never 0.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
            resp
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &[u8]) -> Result<bool, StatusCode> {
        check_head(head).map_err(|e| e.status)
    }

    #[test]
    fn a_head_is_complete_only_with_its_blank_line() {
        assert_eq!(status(b"GET /v1/jwks HTTP/1.1\r\nHost: x\r\n"), Ok(false));
        assert_eq!(
            status(b"GET /v1/jwks HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(true)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n{}"),
            Ok(true),
            "equal duplicates are one length"
        );
    }

    #[test]
    fn malformed_heads_get_their_status() {
        for (head, want) in [
            (&b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"[..], 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nA: \0\r\n\r\n", 400),
            (b"\x16\x03\x01\r\n\r\n", 400),
        ] {
            assert_eq!(
                status(head),
                Err(StatusCode::from_u16(want).unwrap()),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            status(many.as_bytes()),
            Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(
            head_too_large(b"GET /aaaa").status,
            StatusCode::URI_TOO_LONG
        );
        assert_eq!(
            head_too_large(b"GET / HTTP/1.1\r\nA: b").status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
}
