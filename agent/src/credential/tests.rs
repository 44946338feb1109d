//! End-to-end tests of the Workload and admin APIs: this test process is the caller, attested
//! through the real socket, matched by its own cgroup and uid; grants go to a recording double.

use hyper::Method;
use tessera_common::{GRANT_ACTIVE, GRANT_REVOKED};

use super::client::call;
use super::testing::{GrantCall, ISSUER, boot_ns, harness, own_pid, refusal, req};
use super::*;

#[tokio::test]
async fn issues_verifiable_token_writes_grant_and_ends_it() {
    let h = harness(true).await;
    let resp = request_token(&h.socket, &req("vault", Some(60)))
        .await
        .expect("token issued");
    let claims = h.svc.verify(&resp.token, "vault").expect("token verifies");
    let (me, _) = h.policy.workload_by_name("me").expect("me");
    assert_eq!(claims.sub, h.policy.workload(me).spiffe_id);
    assert_eq!(resp.spiffe_id, claims.sub);
    assert_eq!(
        (claims.aud.as_str(), claims.task.as_str()),
        ("vault", "job-42")
    );
    assert_eq!(
        (claims.jti.as_str(), claims.iss.as_str()),
        (resp.jti.as_str(), ISSUER)
    );
    assert_eq!(claims.exp - claims.iat, 60);
    assert!(humantime::parse_rfc3339(&resp.expires_at).is_ok());
    assert!(h.svc.verify(&resp.token, "api").is_err());

    let slots = h.grants.process_slots(own_pid());
    assert_eq!(slots.len(), 1, "{:?}", h.grants.calls());
    let slot = slots[0];
    let (vault, _) = h.policy.endpoint_by_name("vault").expect("vault");
    assert_eq!(slot.state, GRANT_ACTIVE);
    assert_eq!((slot.endpoint_id, slot.workload_id), (vault.0, me.0));
    assert_ne!(slot.credential_id, 0);
    let now = boot_ns();
    assert!(
        slot.expires_at_ns > now + 58_000_000_000 && slot.expires_at_ns <= now + 60_000_000_000
    );
    let info = h
        .svc
        .lookup(slot.credential_id)
        .expect("lookup by credential id");
    assert_eq!(info.jti, resp.jti);
    assert_eq!(info.pid, own_pid());
    assert_eq!(h.svc.active_count(), 1);

    assert_eq!(
        end_credential(&h.socket, &resp.jti).await.expect("ended"),
        resp.jti
    );
    assert_eq!(h.grants.process_slots(own_pid())[0].state, GRANT_REVOKED);
    assert!(
        h.svc
            .lookup(slot.credential_id)
            .expect("still known")
            .revoked
    );
    assert_eq!(h.svc.active_count(), 0);
    // Idempotent; unknown jtis are 404.
    end_credential(&h.socket, &resp.jti)
        .await
        .expect("ended again");
    let (status, _, _) = refusal(
        end_credential(&h.socket, "nope")
            .await
            .expect_err("unknown"),
    );
    assert_eq!(status, 404);
}

#[tokio::test]
async fn ttl_defaults_to_max_and_workload_bind_uses_workload_grant() {
    let h = harness(true).await;
    let resp = request_token(
        &h.socket,
        &TokenRequest {
            audience: "api".to_owned(),
            task: None,
            ttl_seconds: None,
            scopes: None,
            subject_token: None,
            evidence_tokens: Vec::new(),
        },
    )
    .await
    .expect("token");
    let claims = h.svc.verify(&resp.token, "api").expect("verifies");
    assert_eq!(claims.exp - claims.iat, 60);
    assert_eq!(claims.task, claims.jti, "task defaults to the jti");
    let ws = h.grants.workload_slots();
    assert_eq!(ws.len(), 1);
    let (me, _) = h.policy.workload_by_name("me").expect("me");
    let (api, _) = h.policy.endpoint_by_name("api").expect("api");
    assert_eq!((ws[0].0.workload_id, ws[0].0.endpoint_id), (me.0, api.0));
    assert!(h.grants.process_slots(own_pid()).is_empty());
}

#[tokio::test]
async fn bad_and_refused_requests_write_no_grant() {
    let h = harness(true).await;
    let post = |body: &'static [u8]| {
        let socket = h.socket.clone();
        async move {
            call::<serde_json::Value>(
                &socket,
                Method::POST,
                "/v1/credentials",
                Some(body.to_vec()),
            )
            .await
            .expect_err("refused")
        }
    };
    let cases: [(&[u8], u16, Option<&str>, &str); 9] = [
        (b"{not json", 400, None, "invalid request body"),
        (
            br#"{"audience":"vault","color":"red"}"#,
            400,
            None,
            "unknown field `color`",
        ),
        (br#"{"task":"x"}"#, 400, None, "missing field `audience`"),
        (
            br#"{"audience":"vault","ttl_seconds":0}"#,
            400,
            None,
            "at least 1",
        ),
        (
            br#"{"audience":"vault","ttl_seconds":-5}"#,
            400,
            None,
            "invalid request body",
        ),
        (
            br#"{"audience":"vault","ttl_seconds":301}"#,
            403,
            Some("ttl_exceeds_max"),
            "maxTtl",
        ),
        (
            br#"{"audience":"nosuch"}"#,
            403,
            Some("unknown_audience"),
            "nosuch",
        ),
        (
            br#"{"audience":"elsewhere"}"#,
            403,
            Some("workload_not_allowed"),
            "elsewhere",
        ),
        (
            br#"{"audience":"open"}"#,
            403,
            Some("credential_not_required"),
            "without a credential",
        ),
    ];
    for (body, want_status, want_reason, want_text) in cases {
        let (status, reason, error) = refusal(post(body).await);
        let shown = String::from_utf8_lossy(body);
        assert_eq!(status, want_status, "{shown}: {error}");
        assert_eq!(reason.as_deref(), want_reason, "{shown}: {error}");
        assert!(
            error.contains(want_text),
            "{shown}: {error:?} lacks {want_text:?}"
        );
    }
    let big = vec![b' '; 17 * 1024];
    let big: &'static [u8] = Box::leak(big.into_boxed_slice());
    let (status, _, error) = refusal(post(big).await);
    assert_eq!((status, error.contains("over")), (400, true), "{error}");
    assert!(h.grants.calls().is_empty(), "{:?}", h.grants.calls());
    assert_eq!(h.svc.active_count(), 0);
}

#[tokio::test]
async fn unknown_workload_is_refused() {
    let h = harness(false).await;
    let (status, reason, error) = refusal(
        request_token(&h.socket, &req("vault", None))
            .await
            .expect_err("refused"),
    );
    assert_eq!(
        (status, reason.as_deref()),
        (403, Some("unknown_workload")),
        "{error}"
    );
    assert!(h.grants.calls().is_empty());
}

#[tokio::test]
async fn exited_caller_gets_no_grant() {
    let h = harness(true).await;
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let pidfd =
        nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::PeerPidfd).expect("pidfd");
    let evidence = h.svc.attestor().attest_pidfd(&pidfd).expect("attest");
    let err = h
        .svc
        .issue(&evidence, &req("vault", None), &|| false)
        .expect_err("refused");
    assert!(
        matches!(
            err,
            service::Refusal::Forbidden {
                reason: "caller_exited",
                ..
            }
        ),
        "{err:?}"
    );
    let calls = h.grants.calls();
    assert!(
        matches!(
            calls.as_slice(),
            [GrantCall::PutProcess(..), GrantCall::RemoveProcess(..)]
        ),
        "{calls:?}"
    );
    assert!(h.grants.process_slots(own_pid()).is_empty());
    assert_eq!(h.svc.active_count(), 0);
}

#[tokio::test]
async fn admin_revokes_by_jti_pid_and_workload() {
    let h = harness(true).await;
    let token = |aud: &'static str| {
        let socket = h.socket.clone();
        async move {
            request_token(&socket, &req(aud, None))
                .await
                .expect("token")
                .jti
        }
    };
    let (a, b, c) = (
        token("vault").await,
        token("vault").await,
        token("api").await,
    );
    assert_eq!(h.svc.active_count(), 3);

    assert_eq!(
        admin_revoke(&h.admin, &RevokeTarget::Jti(a.clone()))
            .await
            .expect("jti"),
        vec![a.clone()]
    );
    assert_eq!(
        admin_revoke(&h.admin, &RevokeTarget::Jti(a.clone()))
            .await
            .expect("again"),
        Vec::<String>::new()
    );
    let mut by_pid = admin_revoke(&h.admin, &RevokeTarget::Pid(own_pid()))
        .await
        .expect("pid");
    by_pid.sort();
    let mut want = vec![b.clone(), c.clone()];
    want.sort();
    assert_eq!(by_pid, want);
    assert!(
        h.grants
            .process_slots(own_pid())
            .iter()
            .all(|s| s.state == GRANT_REVOKED)
    );
    assert!(
        h.grants
            .workload_slots()
            .iter()
            .all(|(_, s)| s.state == GRANT_REVOKED)
    );
    assert_eq!(h.svc.active_count(), 0);

    let d = token("vault").await;
    let (me, _) = h.policy.workload_by_name("me").expect("me");
    let me_id = h.policy.workload(me).spiffe_id.clone();
    let other_id = h
        .policy
        .workload_by_name("other")
        .map(|(w, _)| h.policy.workload(w).spiffe_id.clone())
        .expect("other");
    assert!(
        admin_revoke(&h.admin, &RevokeTarget::Workload(other_id))
            .await
            .expect("other")
            .is_empty()
    );
    assert_eq!(
        admin_revoke(&h.admin, &RevokeTarget::Workload(me_id))
            .await
            .expect("workload"),
        vec![d]
    );
    assert_eq!(h.svc.active_count(), 0);

    assert_eq!(
        admin_status(&h.admin).await.expect("status"),
        serde_json::json!({ "hello": "status" })
    );
    let (status, _, _) = refusal(
        call::<serde_json::Value>(
            &h.admin,
            Method::POST,
            "/v1/admin/revoke",
            Some(br#"{"jti":"x","pid":1}"#.to_vec()),
        )
        .await
        .expect_err("two targets"),
    );
    assert_eq!(status, 400);
}

#[tokio::test]
async fn jwks_and_unknown_routes() {
    let h = harness(true).await;
    let jwks: serde_json::Value = call(&h.socket, Method::GET, "/v1/jwks", None)
        .await
        .expect("jwks");
    assert_eq!(jwks, h.svc.jwks());
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    let status_of = |e: ClientError| refusal(e).0;
    let get = |path: &'static str, m: Method| {
        let socket = h.socket.clone();
        async move {
            call::<serde_json::Value>(&socket, m, path, None)
                .await
                .expect_err("refused")
        }
    };
    assert_eq!(status_of(get("/v1/credentials", Method::GET).await), 405);
    assert_eq!(status_of(get("/v1/jwks", Method::POST).await), 405);
    assert_eq!(status_of(get("/v1/credentials/x", Method::GET).await), 405);
    assert_eq!(status_of(get("/nope", Method::GET).await), 404);
    assert_eq!(status_of(get("/v1/admin/status", Method::GET).await), 404);
}

#[tokio::test]
async fn bind_socket_refuses_a_live_socket_and_replaces_a_stale_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a/b/s.sock");
    let live = bind_socket(&path, 0o600).expect("bind");
    let meta = std::fs::metadata(&path).expect("socket");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert!(matches!(
        bind_socket(&path, 0o600),
        Err(CredentialError::Bind { .. })
    ));
    drop(live);
    bind_socket(&path, 0o666).expect("stale socket replaced");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    assert!(bind_socket(&file, 0o600).is_err());
    assert!(file.exists());
}
