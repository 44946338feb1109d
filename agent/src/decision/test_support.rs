//! Test fixtures: the record of DESIGN 4.4's example, built as a value and as JSON.
use std::time::{Duration, UNIX_EPOCH};

use super::record::*;

/// 2026-11-23T10:00:00.123456Z
pub(crate) fn example_ts() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_micros(1_795_428_000_123_456)
}

/// DESIGN 4.4's example record.
pub(crate) fn example_record() -> DecisionRecord {
    DecisionRecord {
        schema: SCHEMA.to_owned(),
        ts: example_ts(),
        decision_id: "01936f5e-8a3b-7c4d-9e2f-0a1b2c3d4e5f".to_owned(),
        verdict: Verdict::Deny,
        enforced: true,
        mode: DecisionMode::Enforce,
        reason: Reason::NoCredential,
        hook: Hook::Connect4,
        protocol: Protocol::Tcp,
        destination: Destination {
            ip: "127.0.0.1".parse().unwrap(),
            port: 8200,
            endpoint: Some("vault".to_owned()),
            contested: Vec::new(),
            original: None,
        },
        process: ProcessRecord {
            pid: 4242,
            tgid: 4242,
            uid: 1001,
            gid: 1001,
            comm: "curl".to_owned(),
            exe: Some("/usr/bin/curl".to_owned()),
            cgroup: Some("/tessera-demo/payments".to_owned()),
            exe_sha256: None,
            systemd_unit: None,
            container: None,
            pod: None,
        },
        workload: Some(WorkloadRecord {
            name: "payments-agent".to_owned(),
            spiffe_id: "spiffe://example.org/agents/payments".parse().unwrap(),
        }),
        credential: None,
        policy: PolicyRecord {
            revision: "sha256:0123abcd".to_owned(),
            rule: Some("payments-to-vault".to_owned()),
        },
        connection: None,
    }
}

/// The same record as DESIGN 4.4 writes it, key by key.
pub(crate) fn example_json() -> serde_json::Value {
    serde_json::json!({
        "schema": "tessera.decision/v1",
        "ts": "2026-11-23T10:00:00.123456Z",
        "decision_id": "01936f5e-8a3b-7c4d-9e2f-0a1b2c3d4e5f",
        "verdict": "deny", "enforced": true, "mode": "enforce", "reason": "no_credential",
        "hook": "connect4", "protocol": "tcp",
        "destination": {"ip": "127.0.0.1", "port": 8200, "endpoint": "vault"},
        "process": {"pid": 4242, "tgid": 4242, "uid": 1001, "gid": 1001, "comm": "curl",
                    "exe": "/usr/bin/curl", "cgroup": "/tessera-demo/payments"},
        "workload": {"name": "payments-agent", "spiffe_id": "spiffe://example.org/agents/payments"},
        "credential": null,
        "policy": {"revision": "sha256:0123abcd", "rule": "payments-to-vault"}
    })
}
