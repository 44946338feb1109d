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
        (common::REASON_IDENTITY_PENDING, "identity_pending"),
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
        (common::HOOK_CONNECTION, "connection"),
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

fn with_evidence() -> DecisionRecord {
    let mut record = example_record();
    record.process.exe_sha256 = Some("ab".repeat(32));
    record.process.systemd_unit = Some("payments@1.service".to_owned());
    record.process.container = Some("c".repeat(64));
    record.process.pod = Some(PodRecord {
        uid: "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d".to_owned(),
        namespace: Some("payments".to_owned()),
        name: Some("api-0".to_owned()),
        service_account: Some("api".to_owned()),
    });
    record
}

#[test]
fn evidence_fields_are_absent_when_unknown() {
    let value = serde_json::to_value(example_record()).unwrap();
    let process = value["process"].as_object().unwrap();
    for key in ["exe_sha256", "systemd_unit", "container", "pod"] {
        assert!(!process.contains_key(key), "{key} written while unknown");
    }
    // A pod known by its cgroup only: just its uid.
    let mut record = example_record();
    record.process.pod = Some(PodRecord {
        uid: "u-1".to_owned(),
        namespace: None,
        name: None,
        service_account: None,
    });
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(value["process"]["pod"], json!({"uid": "u-1"}));
}

#[test]
fn evidence_fields_are_written_when_known() {
    let record = with_evidence();
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(
        value["process"],
        json!({"pid": 4242, "tgid": 4242, "uid": 1001, "gid": 1001, "comm": "curl",
               "exe": "/usr/bin/curl", "cgroup": "/tessera-demo/payments",
               "exe_sha256": "ab".repeat(32), "systemd_unit": "payments@1.service",
               "container": "c".repeat(64),
               "pod": {"uid": "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d", "namespace": "payments",
                       "name": "api-0", "service_account": "api"}})
    );
    let line = record.to_json_line().unwrap();
    assert_eq!(
        serde_json::from_str::<DecisionRecord>(&line).unwrap(),
        record
    );
}

#[test]
fn logs_with_and_without_evidence_still_parse_and_filter() {
    use crate::decision::RecordFilter;
    // A line of an older agent: DESIGN 4.4's example, no evidence fields.
    let old: DecisionRecord = serde_json::from_value(example_json()).unwrap();
    assert_eq!(old, example_record());
    let new_line = with_evidence().to_json_line().unwrap();
    let new: DecisionRecord = serde_json::from_str(&new_line).unwrap();
    let filter = RecordFilter {
        verdict: Some(Verdict::Deny),
        workload: Some("payments-agent".to_owned()),
        endpoint: Some("vault".to_owned()),
        ..Default::default()
    };
    assert!(filter.matches(&old));
    assert!(filter.matches(&new));
    assert_eq!(
        crate::decision::format_compact(&old),
        crate::decision::format_compact(&new)
    );
}
