//! The OIDC discovery listener (`--oidc-addr`): `GET <issuer path>/.well-known/openid-configuration`
//! and the JWKS at its `jwks_uri`, the trust domain's union of keys (what `FetchJWTBundles`
//! sends, with `use: "sig"`). HTTPS from `--oidc-cert`/`--oidc-key`; plain HTTP only when asked for
//! (`--oidc-plain-http`) and only on a loopback address, for a reverse proxy on the same host
//! that terminates TLS.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info};

use super::tls::{CertResolver, OidcError, TlsFiles};
use super::{DISCOVERY_PATH, Issuer, JWKS_PATH, discovery_document, oidc_jwks};

/// Connections served at once: the listener may face the internet.
const MAX_CONNECTIONS: usize = 256;
/// A client gets this long for the TLS handshake, and again for its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long verifiers may cache the documents: short, so a rotated key is fetched soon (most
/// verifiers also fetch again on an unknown `kid`).
const CACHE: &str = "public, max-age=60";

/// The listener's settings, as the flags and the configuration file give them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OidcListen {
    pub addr: Option<SocketAddr>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub plain_http: bool,
}

/// A bound listener, not yet serving.
pub struct OidcServer {
    listener: TcpListener,
    addr: SocketAddr,
    issuer: Issuer,
    tls: Option<Arc<CertResolver>>,
}

/// Reads the listener's certificate files again (SIGHUP).
#[derive(Clone)]
pub struct CertReload(Arc<CertResolver>);

impl CertReload {
    pub fn reload(&self) {
        self.0.reload();
    }
}

impl OidcServer {
    /// Checks the settings against the issuer, reads the certificate and binds; `None` when no
    /// `--oidc-addr` is set. Every error says what to change, before anything else starts.
    pub async fn bind(
        settings: &OidcListen,
        issuer: Option<&Issuer>,
    ) -> Result<Option<OidcServer>, OidcError> {
        let refuse = |m: &str| Err(OidcError::Settings(m.to_owned()));
        let Some(addr) = settings.addr else {
            if settings.cert.is_some() || settings.key.is_some() || settings.plain_http {
                return refuse(
                    "--oidc-cert, --oidc-key and --oidc-plain-http configure the OIDC listener: \
                     set --oidc-addr too (or remove them)",
                );
            }
            return Ok(None);
        };
        let Some(issuer) = issuer else {
            return refuse(
                "--oidc-addr serves OIDC discovery, whose issuer must be an https:// URL: set \
                 --issuer (e.g. https://oidc.example.org), the URL verifiers reach this \
                 listener (or its proxy) at",
            );
        };
        let tls = match (&settings.cert, &settings.key, settings.plain_http) {
            (Some(cert), Some(key), false) => Some(Arc::new(CertResolver::new(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })?)),
            (None, None, true) if addr.ip().is_loopback() => None,
            (None, None, true) => {
                return refuse(&format!(
                    "--oidc-plain-http serves without TLS, so only on a loopback address (for a \
                     reverse proxy on this host that terminates TLS), not on {addr}: listen on \
                     127.0.0.1 or ::1, or give --oidc-cert and --oidc-key"
                ));
            }
            (_, _, true) => {
                return refuse(
                    "--oidc-plain-http and --oidc-cert/--oidc-key contradict each other: keep \
                     one",
                );
            }
            _ => {
                return refuse(
                    "--oidc-addr serves HTTPS: give both --oidc-cert FILE and --oidc-key FILE \
                     (PEM), or --oidc-plain-http on a loopback address behind a TLS proxy",
                );
            }
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| OidcError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| OidcError::Bind { addr, source })?;
        Ok(Some(OidcServer {
            listener,
            addr,
            issuer: issuer.clone(),
            tls,
        }))
    }

    /// The address actually bound (port 0 asks the kernel for one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What reloads the certificate; `None` for plain HTTP.
    pub fn cert_reload(&self) -> Option<CertReload> {
        self.tls.clone().map(CertReload)
    }

    /// Serves until `shutdown` completes; `bundle` is the trust domain's JWKS, kept current.
    pub async fn serve(
        self,
        bundle: tokio::sync::watch::Receiver<serde_json::Value>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), OidcError> {
        let acceptor = match &self.tls {
            Some(resolver) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                resolver.server_config()?,
            ))),
            None => None,
        };
        info!(
            addr = %self.addr,
            tls = self.tls.is_some(),
            cert = ?self.tls.as_ref().map(|t| t.cert_path().display().to_string()),
            discovery = %self.issuer.url_of(DISCOVERY_PATH),
            "OIDC discovery listening"
        );
        let issuer = Arc::new(self.issuer);
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => { debug!(error = %e, "OIDC accept"); continue; }
                },
                () = &mut shutdown => return Ok(()),
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%peer, "OIDC listener at its connection limit: connection closed");
                continue;
            };
            let (issuer, bundle, acceptor) = (issuer.clone(), bundle.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match acceptor {
                    Some(acceptor) => {
                        match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => serve_connection(tls, issuer, bundle, peer).await,
                            Ok(Err(e)) => debug!(error = %e, %peer, "OIDC TLS handshake"),
                            Err(_) => debug!(%peer, "OIDC TLS handshake timed out"),
                        }
                    }
                    None => serve_connection(stream, issuer, bundle, peer).await,
                }
            });
        }
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    issuer: Arc<Issuer>,
    bundle: tokio::sync::watch::Receiver<serde_json::Value>,
    peer: SocketAddr,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let jwks = oidc_jwks(&bundle.borrow());
        let response = route(&issuer, &jwks, req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(error = %e, %peer, "OIDC connection");
    }
}

fn route(
    issuer: &Issuer,
    jwks: &serde_json::Value,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: Vec<u8>| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if status == StatusCode::OK {
            headers.insert(CACHE_CONTROL, HeaderValue::from_static(CACHE));
        }
        resp
    };
    let text = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            b"only GET is served here\n".to_vec(),
        );
    }
    let json = |value: &serde_json::Value| {
        reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(value).unwrap_or_default(),
        )
    };
    let (discovery, keys) = (issuer.path_of(DISCOVERY_PATH), issuer.path_of(JWKS_PATH));
    if path == discovery {
        json(&discovery_document(issuer, jwks))
    } else if path == keys {
        json(jwks)
    } else {
        reply(
            StatusCode::NOT_FOUND,
            text,
            format!("not found: try {discovery} or {keys}\n").into_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(addr: &str) -> OidcListen {
        OidcListen {
            addr: Some(addr.parse().expect("addr")),
            ..OidcListen::default()
        }
    }

    async fn refused(settings: &OidcListen, issuer: Option<&Issuer>) -> String {
        match OidcServer::bind(settings, issuer).await {
            Ok(_) => panic!("{settings:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn settings_that_cannot_serve_are_refused_with_what_to_do() {
        let issuer: Issuer = "https://oidc.example.org".parse().expect("issuer");
        let err = refused(&settings("127.0.0.1:0"), None).await;
        assert!(err.contains("--issuer"), "{err}");
        let err = refused(&settings("127.0.0.1:0"), Some(&issuer)).await;
        assert!(err.contains("--oidc-cert"), "{err}");
        let mut plain = settings("0.0.0.0:0");
        plain.plain_http = true;
        let err = refused(&plain, Some(&issuer)).await;
        assert!(err.contains("loopback"), "{err}");
        let no_addr = OidcListen {
            cert: Some("/x".into()),
            ..OidcListen::default()
        };
        let err = refused(&no_addr, Some(&issuer)).await;
        assert!(err.contains("--oidc-addr"), "{err}");
        let mut missing = settings("127.0.0.1:0");
        missing.cert = Some("/nonexistent/cert.pem".into());
        missing.key = Some("/nonexistent/key.pem".into());
        let err = refused(&missing, Some(&issuer)).await;
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn the_documents_are_served_under_the_issuer_path() {
        let issuer: Issuer = "https://example.org/td".parse().expect("issuer");
        let jwks = serde_json::json!({"keys": [{"kid": "a", "alg": "ES256"}]});
        let get = |path: &str| route(&issuer, &jwks, &Method::GET, path).status();
        assert_eq!(get("/td/.well-known/openid-configuration"), StatusCode::OK);
        assert_eq!(get("/td/.well-known/jwks.json"), StatusCode::OK);
        assert_eq!(
            get("/.well-known/openid-configuration"),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&issuer, &jwks, &Method::POST, "/td/.well-known/jwks.json").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
