use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;
use tessera_common as common;

use super::*;
use crate::decision::test_support::{example_json, example_record};

#[test]
fn serialises_exactly_as_design_4_4() {
    let value = serde_json::to_value(example_record()).unwrap();
    assert_eq!(value, example_json());
}

#[test]
fn one_line_and_round_trip() {
    let line = example_record().to_json_line().unwrap();
    assert!(!line.contains('\n'));
    assert!(
        line.starts_with(r#"{"schema":"tessera.decision/v1","ts":"2026-11-23T10:00:00.123456Z","#)
    );
    let back: DecisionRecord = serde_json::from_str(&line).unwrap();
    assert_eq!(back, example_record());
}

#[test]
fn credential_is_jti_expiry_and_bind_only() {
    let mut record = example_record();
    record.verdict = Verdict::Allow;
    record.reason = Reason::CredentialValid;
    record.credential = Some(CredentialRecord {
        jti: "0193-jti".to_owned(),
        expires_at: UNIX_EPOCH + Duration::from_secs(1_795_428_300),
        bind: "process".to_owned(),
    });
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(
        value["credential"],
        json!({"jti": "0193-jti", "expires_at": "2026-11-23T10:05:00.000000Z", "bind": "process"})
    );
    assert_eq!(
        serde_json::from_value::<DecisionRecord>(value).unwrap(),
        record
    );
}

#[test]
fn absent_fields_are_null_not_missing() {
    let mut record = example_record();
    record.workload = None;
    record.policy.rule = None;
    record.process.exe = None;
    record.process.cgroup = None;
    record.destination.ip = "::1".parse().unwrap();
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(value["workload"], json!(null));
    assert_eq!(
        value["policy"],
        json!({"revision": "sha256:0123abcd", "rule": null})
    );
    assert_eq!(value["process"]["exe"], json!(null));
    assert_eq!(value["process"]["cgroup"], json!(null));
    assert_eq!(value["destination"]["ip"], json!("::1"));
}

#[test]
fn every_reason_code_maps_to_its_string() {
    let table = [
        (common::REASON_CREDENTIAL_VALID, "credential_valid"),
        (common::REASON_ALLOWLISTED, "allowlisted"),
        (common::REASON_NO_CREDENTIAL, "no_credential"),
        (common::REASON_CREDENTIAL_EXPIRED, "credential_expired"),
        (common::REASON_CREDENTIAL_REVOKED, "credential_revoked"),
        (common::REASON_WORKLOAD_NOT_ALLOWED, "workload_not_allowed"),
        (common::REASON_UNKNOWN_WORKLOAD, "unknown_workload"),
        (
            common::REASON_EGRESS_NOT_ALLOWLISTED,
            "egress_not_allowlisted",
        ),
        (common::REASON_RAW_SOCKET_REFUSED, "raw_socket_refused"),
        (
            common::REASON_PACKET_SOCKET_REFUSED,
            "packet_socket_refused",
        ),
    ];
    for (code, text) in table {
        let reason = Reason::from_code(code);
        assert_eq!(reason.as_str(), text);
        assert_eq!(reason.to_string(), text);
        assert_eq!(serde_json::to_value(reason).unwrap(), json!(text));
        assert_eq!(
            serde_json::from_value::<Reason>(json!(text)).unwrap(),
            reason
        );
        assert!(Reason::ALL.contains(&reason));
    }
    assert_eq!(Reason::from_code(0), Reason::Unknown);
    assert_eq!(Reason::from_code(200), Reason::Unknown);
    // A reason from a newer log still parses.
    assert_eq!(
        serde_json::from_value::<Reason>(json!("quota_exceeded")).unwrap(),
        Reason::Unknown
    );
}

#[test]
fn hook_protocol_and_verdict_codes() {
    for (code, text) in [
        (common::HOOK_CONNECT4, "connect4"),
        (common::HOOK_CONNECT6, "connect6"),
        (common::HOOK_SENDMSG4, "sendmsg4"),
        (common::HOOK_SENDMSG6, "sendmsg6"),
        (common::HOOK_SOCK_CREATE, "sock_create"),
        (common::HOOK_SOCKET_SYSCALL, "socket_syscall"),
    ] {
        assert_eq!(
            serde_json::to_value(Hook::from_code(code)).unwrap(),
            json!(text)
        );
    }
    assert_eq!(
        serde_json::to_value(Protocol::from_code(common::PROTO_TCP)).unwrap(),
        json!("tcp")
    );
    assert_eq!(
        serde_json::to_value(Protocol::from_code(common::PROTO_UDP)).unwrap(),
        json!("udp")
    );
    assert_eq!(
        serde_json::to_value(Protocol::from_code(common::PROTO_RAW)).unwrap(),
        json!("raw")
    );
    assert_eq!(Verdict::from_code(common::VERDICT_ALLOW), Verdict::Allow);
    assert_eq!(Verdict::from_code(common::VERDICT_DENY), Verdict::Deny);
    assert_eq!(
        serde_json::to_value(DecisionMode::Audit).unwrap(),
        json!("audit")
    );
}

#[test]
fn bad_timestamp_is_a_parse_error() {
    let mut value = example_json();
    value["ts"] = json!("yesterday");
    let err = serde_json::from_value::<DecisionRecord>(value).unwrap_err();
    assert!(err.to_string().contains("RFC 3339"), "{err}");
}
