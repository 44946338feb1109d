//! The HTTP listener for `/metrics`, `/healthz` and `/readyz`.
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr}: {source}; pick another --metrics-addr (or `off`)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener, not yet serving.
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsServer { listener, addr })
    }

    /// The address actually bound (port 0 asks the kernel for one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
        info!(addr = %self.addr, "metrics and health listening");
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => { debug!(error = %e, "metrics accept"); continue; }
                },
                () = &mut shutdown => return,
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, %peer, "metrics connection");
                }
            });
        }
    }
}

pub(super) fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    route(metrics, req.method(), req.uri().path())
}

pub(super) fn route(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    };
    let text = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "only GET is served here\n".into(),
        );
    }
    match path {
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, metrics.encode()),
        "/healthz" => reply(StatusCode::OK, text, "ok\n".into()),
        "/readyz" if metrics.is_ready() => reply(StatusCode::OK, text, "ready\n".into()),
        "/readyz" if let Some(reason) = metrics.unready_reason() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            format!("not ready: {reason}\n"),
        ),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "not ready: the programs are not attached or the Workload API is not listening\n"
                .into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
