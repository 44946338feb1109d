//! The admin API (socket mode 0600): `POST /v1/admin/revoke`, `POST /v1/admin/rotate-key`,
//! `GET /v1/admin/status`, `GET /v1/admin/oidc`.

use std::future::Future;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::net::UnixListener;
use tracing::warn;

use super::CredentialError;
use super::http::{self, HttpResponse};
use super::oidc::{Issuer, discovery_document, oidc_jwks};
use super::registry::RevokeTarget;
use super::service::{CredentialService, Refusal};

/// The `status` callback: what `tessera status` prints.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

const REVOKE_SHAPE: &str = r#"one of {"jti": ID}, {"workload": SPIFFE_ID}, {"pid": PID}"#;

/// Serves the admin API until `shutdown` resolves. Besides the socket's mode, only root and the
/// agent's own uid are served, and only from the agent's own pid namespace: a root process in a
/// container (its own pid namespace) that reaches the socket is refused.
pub async fn serve_admin_api(
    listener: UnixListener,
    svc: Arc<CredentialService>,
    status: StatusFn,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CredentialError> {
    let own_uid = nix::unistd::geteuid().as_raw();
    let own_pidns = std::fs::read_link("/proc/self/ns/pid").ok();
    http::accept_loop(listener, shutdown, "admin", move |stream| {
        let allowed = match getsockopt(&stream, PeerCredentials) {
            Ok(cred) => {
                (cred.uid() == 0 || cred.uid() == own_uid)
                    && same_pid_namespace(cred.pid(), own_pidns.as_deref())
            }
            Err(e) => {
                warn!(error = %e, "cannot read the admin caller's credentials");
                false
            }
        };
        let svc = svc.clone();
        let status = status.clone();
        http::spawn_connection(stream, "admin", move |req| {
            let svc = svc.clone();
            let status = status.clone();
            async move {
                if !allowed {
                    return http::refusal(&Refusal::Forbidden {
                        reason: "not_admin",
                        error: "only root or the agent's user, in the agent's own pid namespace, \
                                may use the admin API"
                            .to_owned(),
                    });
                }
                route(&svc, &status, req).await
            }
        });
    })
    .await
}

/// What `tessera bundle export` writes: the issuer, the trust domain's JWKS and, when the
/// issuer is an https:// URL, its discovery document (`null` otherwise).
fn oidc_documents(svc: &CredentialService) -> serde_json::Value {
    let jwks = oidc_jwks(&svc.bundle().borrow());
    let discovery = svc
        .issuer()
        .parse::<Issuer>()
        .ok()
        .map(|issuer| discovery_document(&issuer, &jwks));
    serde_json::json!({ "issuer": svc.issuer(), "jwks": jwks, "discovery": discovery })
}

/// Whether the peer `pid` (as this process sees it) lives in the agent's pid namespace. A peer
/// in a namespace the agent cannot see has pid 0 here; one in a child namespace (a container)
/// has a pid here but another namespace.
fn same_pid_namespace(pid: i32, own: Option<&std::path::Path>) -> bool {
    let Some(own) = own else {
        warn!("cannot read the agent's own pid namespace: the admin API refuses every caller");
        return false;
    };
    if pid <= 0 {
        return false;
    }
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns == own)
}

async fn route(svc: &CredentialService, status: &StatusFn, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_owned();
    match (path.as_str(), req.method()) {
        ("/v1/admin/revoke", &Method::POST) => {
            let target: RevokeTarget = match http::read_json(req, REVOKE_SHAPE).await {
                Ok(t) => t,
                Err(r) => return http::refusal(&r),
            };
            match svc.revoke(&target) {
                Ok(revoked) => {
                    http::json(StatusCode::OK, &serde_json::json!({ "revoked": revoked }))
                }
                Err(e) => {
                    warn!(error = %e, source = ?std::error::Error::source(&e), "revocation failed");
                    http::refusal(&Refusal::Internal(format!("revocation failed: {e}")))
                }
            }
        }
        ("/v1/admin/revoke", _) => http::method_not_allowed("POST"),
        ("/v1/admin/rotate-key", &Method::POST) => match svc.rotate_key() {
            Ok(rotation) => http::json(StatusCode::OK, &rotation),
            Err(e) => {
                warn!(error = %e, source = ?std::error::Error::source(&e), "key rotation failed");
                http::refusal(&Refusal::Internal(format!("key rotation failed: {e}")))
            }
        },
        ("/v1/admin/rotate-key", _) => http::method_not_allowed("POST"),
        ("/v1/admin/status", &Method::GET) => http::json(StatusCode::OK, &status()),
        ("/v1/admin/status", _) => http::method_not_allowed("GET"),
        ("/v1/admin/oidc", &Method::GET) => http::json(StatusCode::OK, &oidc_documents(svc)),
        ("/v1/admin/oidc", _) => http::method_not_allowed("GET"),
        (p, _) => http::not_found(p),
    }
}
