use std::time::Duration;

use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::server::route;
use super::*;
use crate::decision::{Reason, Verdict};

fn record(verdict: Verdict, reason: Reason) -> DecisionRecord {
    let mut r = crate::decision::test_support::example_record();
    r.verdict = verdict;
    r.reason = reason;
    r
}

#[test]
fn encodes_every_family_with_labels() {
    let m = Metrics::new();
    m.decision(&record(Verdict::Allow, Reason::CredentialValid), true);
    m.decision(&record(Verdict::Allow, Reason::CredentialValid), true);
    m.decision(&record(Verdict::Deny, Reason::NoCredential), false);
    m.set_ringbuf_dropped_total(7);
    m.set_ringbuf_dropped_total(9);
    m.set_ringbuf_dropped_total(3);
    m.credential_issued(Duration::from_micros(300));
    m.credential_refused("unknown_workload", Duration::from_micros(100));
    m.reload_failed();
    m.set_active_grants_source(Arc::new(|| 4));
    let text = m.encode();
    for expected in [
        r#"tessera_decisions_total{verdict="allow",reason="credential_valid",enforced="true"} 2"#,
        r#"tessera_decisions_total{verdict="deny",reason="no_credential",enforced="true"} 1"#,
        "tessera_decision_log_errors_total 1",
        "tessera_ringbuf_dropped_events_total 9",
        "tessera_active_grants 4",
        "tessera_credentials_issued_total 1",
        r#"tessera_credentials_refused_total{reason="unknown_workload"} 1"#,
        "tessera_credential_issuance_seconds_count 2",
        "tessera_policy_reload_failures_total 1",
        "# EOF",
    ] {
        assert!(text.contains(expected), "no {expected:?} in\n{text}");
    }
}

#[test]
fn policy_info_follows_the_loaded_revision() {
    let m = Metrics::new();
    assert_eq!(m.policy_loaded_at(), 0);
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo.yaml");
    let policy = crate::policy::PolicySet::load(&[demo]).unwrap();
    m.set_policy(&policy);
    let text = m.encode();
    assert!(
        text.contains(&format!(
            "tessera_policy_info{{revision=\"{}\"}} 1",
            policy.revision
        )),
        "{text}"
    );
    assert!(m.policy_loaded_at() > 0);
}

#[test]
fn health_and_readiness() {
    let m = Metrics::new();
    let status = |path: &str| route(&m, &Method::GET, path).status();
    assert_eq!(status("/healthz"), StatusCode::OK);
    assert_eq!(status("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
    m.set_ready(true);
    assert_eq!(status("/readyz"), StatusCode::OK);
    // Enforcing, but a part cannot work: not ready, and why.
    m.set_unready_because(Some("the Workload API cannot attest callers".into()));
    assert_eq!(status("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
    m.set_unready_because(None);
    assert_eq!(status("/readyz"), StatusCode::OK);
    assert_eq!(status("/metrics"), StatusCode::OK);
    assert_eq!(status("/nope"), StatusCode::NOT_FOUND);
    assert_eq!(
        route(&m, &Method::POST, "/metrics").status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn serves_over_http_on_loopback() {
    let m = Arc::new(Metrics::new());
    m.set_ready(true);
    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(m.clone(), async move {
        let _ = stop_rx.await;
    }));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("application/openmetrics-text"),
        "{metrics}"
    );
    assert!(metrics.contains("tessera_active_grants"), "{metrics}");
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    // A port in use is refused with a message that says what to do.
    let err = MetricsServer::bind(addr).await.err().unwrap();
    assert!(err.to_string().contains("--metrics-addr"), "{err}");
    let _ = stop_tx.send(());
    task.await.unwrap();
}
