//! The SPIFFE Workload API (gRPC `SpiffeWorkloadAPI`, from SPIFFE's `workload.proto`) on the
//! Workload API socket: JWT-SVIDs issued by the same path as `POST /v1/credentials`
//! (attestation, policy, the kernel grant written before the answer, the log), the trust
//! domain's JWT bundle as a stream, and JWT-SVID validation. X.509 and WIT RPCs answer
//! `Unimplemented`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::codegen::Service as _;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::api::{Refused, TokenRequest, attest};
use super::h2_authority;
use super::http::{H2Handler, Prefixed};
use super::service::{CredentialService, Refusal};
use crate::identity::attest::still_running;
use crate::identity::peer::Caller;
use crate::identity::spiffe::SpiffeId;

/// Generated from `agent/proto/spiffe/workload/workload.proto` by build.rs.
pub(crate) mod proto {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        clippy::expect_used,
        missing_docs
    )]
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

use proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use proto::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};

/// The metadata every Workload API request carries (SPIFFE Workload Endpoint §4.2), so that a
/// browser or a proxy cannot be made to call it.
const SECURITY_HEADER: &str = "workload.spiffe.io";
/// gRPC metadata for what the proto has no field for.
const TASK_HEADER: &str = "tessera-task";
const TTL_HEADER: &str = "tessera-ttl";
const SCOPES_HEADER: &str = "tessera-scopes";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One connection's Workload API: the caller was taken when it connected.
struct WorkloadApi {
    svc: Arc<CredentialService>,
    caller: Arc<Result<Caller, String>>,
}

/// The HTTP/2 handler for a Workload API connection from `caller`.
pub(crate) fn h2_handler(
    svc: Arc<CredentialService>,
    caller: Arc<Result<Caller, String>>,
) -> H2Handler {
    Box::new(move |io: Prefixed| {
        Box::pin(async move {
            let server = SpiffeWorkloadApiServer::new(WorkloadApi { svc, caller });
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let mut server = server.clone();
                server.call(req)
            });
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(h2_authority::repaired(io)), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "gRPC connection ended with an error");
            }
        })
    })
}

fn check_security_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: send the metadata `workload.spiffe.io: true`",
        )),
    }
}

/// `tessera-task` and `tessera-ttl` (seconds, or a duration like `5m`).
fn task_and_ttl<T>(req: &Request<T>) -> Result<(Option<String>, Option<u64>), Status> {
    let text = |name: &str| -> Result<Option<String>, Status> {
        req.metadata()
            .get(name)
            .map(|v| {
                v.to_str().map(str::to_owned).map_err(|_| {
                    Status::invalid_argument(format!("metadata {name} is not printable ASCII"))
                })
            })
            .transpose()
    };
    let task = text(TASK_HEADER)?;
    let ttl = match text(TTL_HEADER)? {
        None => None,
        Some(t) => Some(parse_ttl(&t).ok_or_else(|| {
            Status::invalid_argument(format!(
                "metadata {TTL_HEADER} `{t}` is not a duration: write seconds (300) or 5m"
            ))
        })?),
    };
    Ok((task, ttl))
}

/// `tessera-scopes`: the scopes asked for, space-separated as OAuth writes them.
fn scopes_metadata<T>(req: &Request<T>) -> Result<Option<Vec<String>>, Status> {
    req.metadata()
        .get(SCOPES_HEADER)
        .map(|v| {
            v.to_str()
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .map_err(|_| {
                    Status::invalid_argument(format!(
                        "metadata {SCOPES_HEADER} is not printable ASCII"
                    ))
                })
        })
        .transpose()
}

fn parse_ttl(text: &str) -> Option<u64> {
    text.parse::<u64>()
        .ok()
        .or_else(|| humantime::parse_duration(text).ok().map(|d| d.as_secs()))
}

/// A refusal as the gRPC status the Workload API specification names.
fn status(refused: &Refused) -> Status {
    match refused {
        Refused::Refusal(Refusal::BadRequest(m)) => Status::invalid_argument(m.clone()),
        Refused::Refusal(Refusal::Forbidden { reason, error }) => {
            Status::permission_denied(format!("{reason}: {error}"))
        }
        Refused::Refusal(Refusal::PolicyDenied { error, .. }) => {
            Status::permission_denied(format!("policy_denied: {error}"))
        }
        Refused::Refusal(Refusal::NotFound(m)) => Status::not_found(m.clone()),
        Refused::Refusal(Refusal::Internal(m)) => Status::internal(m.clone()),
        // gRPC's status for a rate limit; the delay is in the message.
        Refused::Refusal(Refusal::TooManyRequests { error, .. }) => {
            Status::resource_exhausted(format!("rate_limited: {error}"))
        }
        Refused::Unavailable(m) => Status::unavailable(m.clone()),
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} are not issued by Tessera yet (a later release); use FetchJWTSVID and \
         FetchJWTBundles (JWT-SVIDs)"
    ))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = BoxStream<WitsvidResponse>;
    type FetchWITBundlesStream = BoxStream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(&request)?;
        Err(unimplemented("X.509-SVIDs"))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(&request)?;
        Err(unimplemented("X.509 bundles"))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_security_header(&request)?;
        let (task, ttl_seconds) = task_and_ttl(&request)?;
        let scopes = scopes_metadata(&request)?;
        let body = request.into_inner();
        let audience = match body.audience.as_slice() {
            [] => {
                return Err(Status::invalid_argument(
                    "audience is empty: name the endpoint the JWT-SVID is for",
                ));
            }
            [one] => one.clone(),
            _ => {
                return Err(Status::invalid_argument(
                    "a Tessera JWT-SVID carries one audience: ask once for each",
                ));
            }
        };
        let wanted = match body.spiffe_id.as_str() {
            "" => None,
            id => Some(id.parse::<SpiffeId>().map_err(|e| {
                Status::invalid_argument(format!("spiffe_id `{id}` is not a SPIFFE ID: {e}"))
            })?),
        };
        let req = TokenRequest {
            audience,
            task,
            ttl_seconds,
            scopes,
            subject_token: None,
            evidence_tokens: Vec::new(),
        };
        let (pidfd, attested) = attest(&self.svc, &self.caller).map_err(|r| status(&r))?;
        if let (Some(wanted), Some(wid)) = (&wanted, attested.workload) {
            let have = &attested.policy.workload(wid).spiffe_id;
            if have != wanted {
                return Err(Status::permission_denied(format!(
                    "not_entitled: the caller is {have}, not {wanted}"
                )));
            }
        }
        let issued = self
            .svc
            .issue(&attested, &req, &|| {
                still_running(pidfd, attested.evidence.pid)
            })
            .map_err(|r| status(&Refused::Refusal(r)))?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: issued.spiffe_id.to_string(),
                svid: issued.token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_security_header(&request)?;
        let svc = self.svc.clone();
        let bundle = svc.bundle();
        // The whole JWKS at once, then again each time it changes.
        let stream = futures_util::stream::unfold((bundle, true), move |(mut rx, first)| {
            let svc = svc.clone();
            async move {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let jwks = rx.borrow_and_update().clone();
                let bytes = serde_json::to_vec(&jwks).unwrap_or_default();
                let bundles = svc
                    .trust_domains()
                    .into_iter()
                    .map(|td| (format!("spiffe://{td}"), bytes.clone()))
                    .collect();
                Some((Ok(JwtBundlesResponse { bundles }), (rx, false)))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_security_header(&request)?;
        let body = request.into_inner();
        if body.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if body.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let (spiffe_id, claims) = self
            .svc
            .validate_svid(&body.svid, &body.audience)
            .map_err(|e| Status::invalid_argument(format!("the JWT-SVID is not valid: {e}")))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            claims: Some(to_struct(claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_security_header(&request)?;
        Err(unimplemented("WIT-SVIDs"))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_security_header(&request)?;
        Err(unimplemented("WIT bundles"))
    }
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_metadata_is_seconds_or_a_duration() {
        assert_eq!(parse_ttl("300"), Some(300));
        assert_eq!(parse_ttl("5m"), Some(300));
        assert_eq!(parse_ttl("soon"), None);
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        let claims = serde_json::json!({"sub": "spiffe://a/b", "exp": 5, "aud": ["x"], "n": null});
        let serde_json::Value::Object(map) = claims else {
            panic!("an object")
        };
        let s = to_struct(map);
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://a/b".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        assert!(matches!(s.fields["aud"].kind, Some(Kind::ListValue(_))));
    }
}
