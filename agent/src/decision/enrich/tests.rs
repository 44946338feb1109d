use std::path::Path;

use tessera_common as common;

use super::*;
use crate::policy::{EndpointId, RuleId, WorkloadId};

const POLICY: &str = r#"
apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: { name: payments }
spec:
  trustDomain: example.org
  mode: enforce
  workloads:
    - name: payments-agent
      spiffeId: spiffe://example.org/agents/payments
      match: { cgroup: /payments/agent }
    - name: intruder
      match: { cgroup: /intruder }
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [8200]
  rules:
    - name: payments-to-vault
      workloads: [payments-agent]
      endpoints: [vault]
      credential: { required: true, maxTtl: 10m, bind: process }
---
apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: { name: batch }
spec:
  trustDomain: example.org
  mode: audit
  workloads:
    - name: batch
      match: { cgroup: /batch }
  endpoints:
    - name: api
      addresses: ["203.0.113.0/24"]
      ports: [443]
  rules:
    - name: batch-to-api
      workloads: [batch]
      endpoints: [api]
      credential: { required: true, maxTtl: 1h, bind: workload }
"#;

/// No process has this pid (pid_max is at most 2^22).
const GONE_PID: u32 = 4_000_000_000;

struct Fixture {
    policy: Arc<PolicySet>,
}

impl Fixture {
    fn new() -> Self {
        let policy = PolicySet::from_str(Path::new("test.yaml"), POLICY).unwrap();
        Self {
            policy: Arc::new(policy),
        }
    }

    fn enricher(&self) -> Enricher {
        Enricher::new(
            self.policy.clone(),
            Arc::new(NoCredentials),
            PathBuf::from("/nonexistent"),
        )
    }

    fn workload(&self, name: &str) -> u32 {
        self.policy.workload_by_name(name).unwrap().0.0
    }

    fn endpoint(&self, name: &str) -> u32 {
        self.policy.endpoint_by_name(name).unwrap().0.0
    }

    fn rule(&self, workload: &str, endpoint: &str) -> u32 {
        let w = WorkloadId(self.workload(workload));
        let e = EndpointId(self.endpoint(endpoint));
        let (RuleId(id), _) = self.policy.rule_for(w, e).unwrap();
        id
    }

    /// A connect4 from `payments-agent` to vault at 127.0.0.1:8200, denied: no credential.
    fn event(&self) -> DecisionEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        DecisionEvent {
            timestamp_ns: boot_now_ns(),
            cgroup_id: 0,
            credential_id: 0,
            socket_cookie: 99,
            pid: GONE_PID,
            tgid: GONE_PID,
            uid: 1001,
            gid: 1002,
            creator_tgid: GONE_PID,
            endpoint_id: self.endpoint("vault"),
            workload_id: self.workload("payments-agent"),
            rule_id: self.rule("payments-agent", "vault"),
            policy_generation: 1,
            port: 8200,
            hook: common::HOOK_CONNECT4,
            protocol: common::PROTO_TCP,
            verdict: common::VERDICT_DENY,
            reason: common::REASON_NO_CREDENTIAL,
            enforced: 1,
            family: 4,
            addr,
            comm,
            original: common::ORIGINAL_AS_GIVEN,
            _pad: [0; 3],
        }
    }
}

fn boot_now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_BOOTTIME).unwrap();
    u64::try_from(t.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap()
}

#[test]
fn enforced_deny_gets_names_rule_mode_and_the_mapped_ipv4() {
    let fx = Fixture::new();
    let record = fx.enricher().enrich(&fx.event());
    let value = serde_json::to_value(&record).unwrap();
    let expected = serde_json::json!({
        "schema": "tessera.decision/v1",
        "ts": value["ts"], "decision_id": value["decision_id"],
        "verdict": "deny", "enforced": true, "mode": "enforce", "reason": "no_credential",
        "hook": "connect4", "protocol": "tcp",
        "destination": {"ip": "127.0.0.1", "port": 8200, "endpoint": "vault"},
        "process": {"pid": GONE_PID, "tgid": GONE_PID, "uid": 1001, "gid": 1002, "comm": "curl",
                    "exe": null, "cgroup": null},
        "workload": {"name": "payments-agent", "spiffe_id": "spiffe://example.org/agents/payments"},
        "credential": null,
        "policy": {"revision": fx.policy.revision, "rule": "payments-to-vault"}
    });
    assert_eq!(value, expected);
    assert!(fx.policy.revision.starts_with("sha256:"));

    let id = uuid::Uuid::parse_str(&record.decision_id).unwrap();
    assert_eq!(id.get_version_num(), 7);
    let age = SystemTime::now()
        .duration_since(record.ts)
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(5),
        "ts {:?} is not now",
        record.ts
    );
}

#[test]
fn decision_ids_are_distinct_v7_uuids_of_now() {
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let ids: std::collections::HashSet<String> = (0..10_000).map(|_| decision_id()).collect();
    assert_eq!(ids.len(), 10_000, "a decision id repeated");
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    for id in &ids {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(uuid.get_version_num(), 7, "{id}");
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        let ms = u128::from(secs) * 1000 + u128::from(nanos / 1_000_000);
        assert!(
            (before..=after).contains(&ms),
            "{id}: {ms} not in {before}..={after}"
        );
    }
}

#[test]
fn unenforced_deny_is_audit() {
    let fx = Fixture::new();
    let mut ev = fx.event();
    ev.enforced = 0;
    let record = fx.enricher().enrich(&ev);
    assert_eq!(record.verdict, Verdict::Deny);
    assert!(!record.enforced);
    assert_eq!(record.mode, DecisionMode::Audit);
}

#[test]
fn allow_takes_the_rules_mode_and_shows_the_credential() {
    let fx = Fixture::new();
    let expires_at = UNIX_EPOCH + Duration::from_secs(1_795_428_300);
    let lookup = move |id: u64| {
        (id == 7).then(|| CredentialRef {
            jti: "jti-7".to_owned(),
            expires_at,
            bind: "workload",
        })
    };
    let enricher = Enricher::new(
        fx.policy.clone(),
        Arc::new(lookup),
        PathBuf::from("/nonexistent"),
    );
    let mut ev = fx.event();
    ev.workload_id = fx.workload("batch");
    ev.endpoint_id = fx.endpoint("api");
    ev.rule_id = fx.rule("batch", "api");
    ev.verdict = common::VERDICT_ALLOW;
    ev.reason = common::REASON_CREDENTIAL_VALID;
    ev.credential_id = 7;
    let record = enricher.enrich(&ev);
    assert_eq!(record.mode, DecisionMode::Audit);
    assert_eq!(record.policy.rule.as_deref(), Some("batch-to-api"));
    assert_eq!(
        record.workload.as_ref().unwrap().spiffe_id.to_string(),
        "spiffe://example.org/batch"
    );
    assert_eq!(
        record.credential,
        Some(CredentialRecord {
            jti: "jti-7".to_owned(),
            expires_at,
            bind: "workload".to_owned()
        })
    );

    // A credential the registry no longer knows is null, not an error.
    ev.credential_id = 8;
    assert_eq!(enricher.enrich(&ev).credential, None);

    // `tessera run --mode enforce` overrides the rule's audit.
    let forced = enricher.with_mode_override(Some(Mode::Enforce));
    ev.credential_id = 7;
    assert_eq!(forced.enrich(&ev).mode, DecisionMode::Enforce);
}

#[test]
fn unknown_workload_has_no_workload_nor_rule() {
    let fx = Fixture::new();
    let mut ev = fx.event();
    ev.workload_id = common::NONE_ID;
    ev.rule_id = common::NONE_ID;
    ev.reason = common::REASON_UNKNOWN_WORKLOAD;
    let record = fx.enricher().enrich(&ev);
    assert_eq!(record.reason, Reason::UnknownWorkload);
    assert_eq!(record.workload, None);
    assert_eq!(record.policy.rule, None);
    assert_eq!(record.destination.endpoint.as_deref(), Some("vault"));
    assert_eq!(record.mode, DecisionMode::Enforce);

    // Ids the policy does not have (an event from before a reload) do not panic.
    ev.endpoint_id = 1000;
    ev.workload_id = 1000;
    let record = fx.enricher().enrich(&ev);
    assert_eq!(record.destination.endpoint, None);
    assert_eq!(record.workload, None);
}

#[test]
fn ipv6_udp_sendmsg6() {
    let fx = Fixture::new();
    let mut ev = fx.event();
    ev.family = 6;
    ev.addr = std::net::Ipv6Addr::LOCALHOST.octets();
    ev.hook = common::HOOK_SENDMSG6;
    ev.protocol = common::PROTO_UDP;
    let value = serde_json::to_value(fx.enricher().enrich(&ev)).unwrap();
    assert_eq!(value["destination"]["ip"], "::1");
    assert_eq!(value["hook"], "sendmsg6");
    assert_eq!(value["protocol"], "udp");
}

#[test]
fn the_original_destination_is_logged_when_the_kernel_decided_another() {
    let fx = Fixture::new();
    let original = |hook, family, addr: std::net::IpAddr, original| {
        let mut ev = fx.event();
        ev.hook = hook;
        ev.family = family;
        ev.addr = match addr {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        ev.original = original;
        let value = serde_json::to_value(fx.enricher().enrich(&ev)).unwrap();
        (
            value["destination"]["ip"].clone(),
            value["destination"]["original"].clone(),
        )
    };
    let v4 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    use common::{HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6};
    use common::{ORIGINAL_AS_GIVEN, ORIGINAL_UNSPECIFIED, ORIGINAL_V4_COMPATIBLE};
    let cases = [
        (
            HOOK_CONNECT4,
            4,
            "127.0.0.1",
            ORIGINAL_UNSPECIFIED,
            "127.0.0.1",
            "0.0.0.0",
        ),
        (
            HOOK_SENDMSG4,
            4,
            "127.0.0.1",
            ORIGINAL_UNSPECIFIED,
            "127.0.0.1",
            "0.0.0.0",
        ),
        (HOOK_CONNECT6, 6, "::1", ORIGINAL_UNSPECIFIED, "::1", "::"),
        (
            HOOK_CONNECT6,
            4,
            "127.0.0.1",
            ORIGINAL_UNSPECIFIED,
            "127.0.0.1",
            "::ffff:0.0.0.0",
        ),
        (
            HOOK_SENDMSG6,
            4,
            "10.1.2.3",
            ORIGINAL_V4_COMPATIBLE,
            "10.1.2.3",
            "::a01:203",
        ),
    ];
    for (hook, family, decided, how, ip, given) in cases {
        let (got_ip, got_original) = original(hook, family, v4(decided), how);
        assert_eq!(got_ip, ip);
        assert_eq!(
            got_original,
            serde_json::json!({"ip": given, "port": 8200}),
            "hook {hook} family {family} original {how}"
        );
    }
    // As given (the kernel says nothing): no `original`.
    assert_eq!(
        original(HOOK_CONNECT6, 4, v4("10.1.2.3"), ORIGINAL_AS_GIVEN).1,
        serde_json::Value::Null
    );
    assert_eq!(
        original(HOOK_CONNECT4, 4, v4("127.0.0.2"), ORIGINAL_AS_GIVEN).1,
        serde_json::Value::Null
    );
    assert_eq!(
        original(HOOK_CONNECT6, 6, v4("::1"), ORIGINAL_AS_GIVEN).1,
        serde_json::Value::Null
    );
}

#[test]
fn raw_socket_refusal_has_no_destination() {
    let fx = Fixture::new();
    let mut ev = fx.event();
    ev.hook = common::HOOK_SOCK_CREATE;
    ev.protocol = common::PROTO_RAW;
    ev.reason = common::REASON_RAW_SOCKET_REFUSED;
    ev.endpoint_id = common::NONE_ID;
    ev.rule_id = common::NONE_ID;
    ev.port = 0;
    ev.addr = std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets();
    let value = serde_json::to_value(fx.enricher().enrich(&ev)).unwrap();
    assert_eq!(value["reason"], "raw_socket_refused");
    assert_eq!(value["hook"], "sock_create");
    assert_eq!(value["protocol"], "raw");
    assert_eq!(
        value["destination"],
        serde_json::json!({"ip": "0.0.0.0", "port": 0, "endpoint": null})
    );
    assert_eq!(value["workload"]["name"], "payments-agent");
    assert_eq!(value["policy"]["rule"], serde_json::Value::Null);
    assert_eq!(value["mode"], "enforce");

    ev.hook = common::HOOK_SOCKET_SYSCALL;
    ev.reason = common::REASON_PACKET_SOCKET_REFUSED;
    ev.family = 6;
    ev.addr = [0; 16];
    ev.enforced = 0;
    let value = serde_json::to_value(fx.enricher().enrich(&ev)).unwrap();
    assert_eq!(value["reason"], "packet_socket_refused");
    assert_eq!(value["hook"], "socket_syscall");
    assert_eq!(value["destination"]["ip"], "::");
    assert_eq!(value["mode"], "audit");
}

#[test]
fn egress_not_allowlisted_keeps_the_destination_without_endpoint() {
    let fx = Fixture::new();
    let mut ev = fx.event();
    ev.reason = common::REASON_EGRESS_NOT_ALLOWLISTED;
    ev.endpoint_id = common::NONE_ID;
    ev.rule_id = common::NONE_ID;
    ev.port = 9999;
    let value = serde_json::to_value(fx.enricher().enrich(&ev)).unwrap();
    assert_eq!(value["reason"], "egress_not_allowlisted");
    assert_eq!(
        value["destination"],
        serde_json::json!({"ip": "127.0.0.1", "port": 9999, "endpoint": null})
    );
    assert_eq!(value["verdict"], "deny");
    assert_eq!(value["enforced"], true);
}

/// The cgroup v2 mount point, from this process's mountinfo.
fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

#[test]
fn a_live_process_gets_its_exe_and_cgroup() {
    let Some(root) = cgroup2_root() else {
        crate::testkit::skip("no cgroup v2 mount");
        return;
    };
    let own = unified_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap())
        .unwrap()
        .to_owned();
    let dir = root.join(own.trim_start_matches('/'));
    let Ok(meta) = fs::metadata(&dir) else {
        crate::testkit::skip(&format!("{} is not visible", dir.display()));
        return;
    };
    let fx = Fixture::new();
    let enricher = Enricher::new(fx.policy.clone(), Arc::new(NoCredentials), root);
    let mut ev = fx.event();
    ev.pid = std::process::id();
    ev.tgid = std::process::id();
    ev.cgroup_id = meta.ino();
    let record = enricher.enrich(&ev);
    let exe = std::env::current_exe().unwrap();
    assert_eq!(record.process.exe.as_deref(), Some(exe.to_str().unwrap()));
    assert_eq!(record.process.cgroup.as_deref(), Some(own.as_str()));

    // Once learnt, the cgroup of an id is known even after the process is gone.
    ev.tgid = GONE_PID;
    assert_eq!(
        enricher.enrich(&ev).process.cgroup.as_deref(),
        Some(own.as_str())
    );
    // An id that is not that cgroup's is not reported as it.
    ev.tgid = std::process::id();
    ev.cgroup_id = meta.ino() + 1_000_000;
    assert_eq!(enricher.enrich(&ev).process.cgroup, None);
}

#[test]
fn boot_clock_converts_to_wall_clock() {
    let fx = Fixture::new();
    let enricher = fx.enricher();
    let converted = enricher.wall_time(boot_now_ns());
    let now = SystemTime::now();
    let diff = now
        .duration_since(converted)
        .unwrap_or_else(|e| e.duration());
    assert!(diff < Duration::from_millis(100), "off by {diff:?}");
}

#[test]
fn comm_stops_at_nul() {
    let mut comm = [0u8; 16];
    comm.copy_from_slice(b"sixteen-bytes-xx");
    assert_eq!(comm_string(&comm), "sixteen-bytes-xx");
    assert_eq!(comm_string(&[0u8; 16]), "");
}

mod evidence {
    use std::collections::BTreeMap;

    use super::*;
    use crate::identity::evidence::{ExeHash, Ids};
    use crate::identity::k8s::PodMetadata;

    const POD_UID: &str = "8b2e6c1a-3d4f-4a5b-9c8d-7e6f5a4b3c2d";
    const CGROUP_ID: u64 = 777;

    fn container_id() -> String {
        "3f".repeat(32)
    }

    /// A containerd container of a burstable pod, systemd driver.
    fn pod_cgroup() -> String {
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
            POD_UID.replace('-', "_"),
            container_id()
        )
    }

    fn evidence(pid: u32, cgroup: &str) -> Evidence {
        let facts = crate::identity::evidence::cgroup::parse(cgroup);
        Evidence {
            pid,
            comm: "api".to_owned(),
            uid: Ids {
                real: 1001,
                effective: 1001,
            },
            gid: Ids {
                real: 1002,
                effective: 1002,
            },
            groups: vec![],
            cgroup: cgroup.to_owned(),
            systemd_units: facts.units,
            exe: Some(Exe {
                path: "/usr/bin/api".to_owned(),
                deleted: false,
                hash: ExeHash::Sha256 {
                    sha256: "ab".repeat(32),
                },
            }),
            container: facts.container,
            pod: facts.pod,
            kubernetes: Some(PodMetadata {
                uid: POD_UID.to_owned(),
                namespace: "payments".to_owned(),
                name: "api-0".to_owned(),
                service_account: "api".to_owned(),
                labels: BTreeMap::new(),
                containers: vec![],
            }),
        }
    }

    /// A source that knows one process, and counts the questions.
    fn fake_source(known: Evidence) -> (Arc<dyn EvidenceSource>, Arc<Mutex<Vec<u32>>>) {
        let asked: Arc<Mutex<Vec<u32>>> = Arc::default();
        let log = asked.clone();
        let known = Arc::new(known);
        let source = move |tgid: u32| {
            log.lock().unwrap().push(tgid);
            Some(known.clone())
        };
        (Arc::new(source), asked)
    }

    /// An enricher that already knows `CGROUP_ID` as `path` (learnt from a process since gone).
    fn enricher(fx: &Fixture, path: &str) -> Enricher {
        let enricher = fx.enricher();
        enricher
            .cgroup_paths
            .lock()
            .unwrap()
            .insert(CGROUP_ID, Arc::new(KnownCgroup::new(path.to_owned())));
        enricher
    }

    fn event(fx: &Fixture) -> DecisionEvent {
        let mut ev = fx.event();
        ev.cgroup_id = CGROUP_ID;
        ev
    }

    #[test]
    fn attested_evidence_fills_exe_hash_unit_container_and_pod() {
        let fx = Fixture::new();
        let (source, asked) = fake_source(evidence(GONE_PID, &pod_cgroup()));
        let enricher = enricher(&fx, &pod_cgroup()).with_evidence(source);
        let value = serde_json::to_value(enricher.enrich(&event(&fx))).unwrap();
        assert_eq!(
            value["process"],
            serde_json::json!({
                "pid": GONE_PID, "tgid": GONE_PID, "uid": 1001, "gid": 1002, "comm": "curl",
                "exe": "/usr/bin/api", "cgroup": pod_cgroup(),
                "exe_sha256": "ab".repeat(32),
                "systemd_unit": format!("cri-containerd-{}.scope", container_id()),
                "container": container_id(),
                "pod": {"uid": POD_UID, "namespace": "payments", "name": "api-0",
                        "service_account": "api"}
            })
        );
        assert_eq!(*asked.lock().unwrap(), [GONE_PID]);
    }

    #[test]
    fn evidence_of_another_pid_or_cgroup_is_not_used() {
        let fx = Fixture::new();
        for stale in [
            evidence(GONE_PID - 1, &pod_cgroup()),
            evidence(GONE_PID, "/system.slice/other.service"),
        ] {
            let (source, _) = fake_source(stale);
            let enricher = enricher(&fx, &pod_cgroup()).with_evidence(source);
            let process = enricher.enrich(&event(&fx)).process;
            // No hash, no pod metadata, and the exe from /proc (gone: none).
            assert_eq!(process.exe, None);
            assert_eq!(process.exe_sha256, None);
            // What the cgroup path (checked against the kernel's id) says stays.
            assert_eq!(process.container, Some(container_id()));
            assert_eq!(
                process.pod,
                Some(PodRecord {
                    uid: POD_UID.to_owned(),
                    namespace: None,
                    name: None,
                    service_account: None,
                })
            );
        }
    }

    #[test]
    fn no_cgroup_means_no_evidence() {
        let fx = Fixture::new();
        let (source, asked) = fake_source(evidence(GONE_PID, &pod_cgroup()));
        // The kernel's cgroup id is unknown to the enricher: nothing to check the evidence by.
        let enricher = fx.enricher().with_evidence(source);
        let process = enricher.enrich(&event(&fx)).process;
        assert_eq!(process.cgroup, None);
        assert_eq!(process.exe_sha256, None);
        assert_eq!(process.pod, None);
        assert!(asked.lock().unwrap().is_empty());
    }

    #[test]
    fn without_a_source_the_cgroup_path_still_tells_unit_container_and_pod() {
        let fx = Fixture::new();
        let process = enricher(&fx, &pod_cgroup()).enrich(&event(&fx)).process;
        assert_eq!(process.exe_sha256, None);
        assert_eq!(process.container, Some(container_id()));
        assert_eq!(process.pod.map(|p| p.uid), Some(POD_UID.to_owned()));

        let unit = "/system.slice/system-payments.slice/payments@1.service";
        let process = enricher(&fx, unit).enrich(&event(&fx)).process;
        assert_eq!(process.systemd_unit.as_deref(), Some("payments@1.service"));
        assert_eq!(process.container, None);
        assert_eq!(process.pod, None);
        let value = serde_json::to_value(&process).unwrap();
        assert!(value.get("pod").is_none() && value.get("exe_sha256").is_none());
    }

    #[test]
    fn metadata_of_another_pod_and_unhashed_or_deleted_exes() {
        let fx = Fixture::new();
        let mut known = evidence(GONE_PID, &pod_cgroup());
        if let Some(k8s) = known.kubernetes.as_mut() {
            k8s.uid = "another-pod".to_owned();
        }
        if let Some(exe) = known.exe.as_mut() {
            exe.deleted = true;
            exe.hash = ExeHash::TooLarge {
                size: 1 << 40,
                limit: 1 << 28,
            };
        }
        let (source, _) = fake_source(known);
        let process = enricher(&fx, &pod_cgroup())
            .with_evidence(source)
            .enrich(&event(&fx))
            .process;
        assert_eq!(process.exe.as_deref(), Some("/usr/bin/api (deleted)"));
        assert_eq!(process.exe_sha256, None);
        let pod = process.pod.unwrap();
        assert_eq!((pod.uid.as_str(), pod.namespace), (POD_UID, None));
    }

    #[test]
    fn a_new_policy_generation_keeps_the_source() {
        let fx = Fixture::new();
        let (source, asked) = fake_source(evidence(GONE_PID, &pod_cgroup()));
        let base = enricher(&fx, &pod_cgroup()).with_evidence(source);
        let next = base.with_policy(fx.policy.clone());
        let process = next.enrich(&event(&fx)).process;
        assert_eq!(process.exe_sha256, Some("ab".repeat(32)));
        assert_eq!(asked.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_live_process_checked_against_its_real_cgroup() {
        let Some(root) = cgroup2_root() else {
            crate::testkit::skip("no cgroup v2 mount");
            return;
        };
        let own = unified_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap())
            .unwrap()
            .to_owned();
        let Ok(meta) = fs::metadata(root.join(own.trim_start_matches('/'))) else {
            crate::testkit::skip("own cgroup not visible");
            return;
        };
        let fx = Fixture::new();
        let pid = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        let mut known = evidence(pid, &own);
        if let Some(e) = known.exe.as_mut() {
            e.path = exe.to_owned();
        }
        let (source, _) = fake_source(known);
        let enricher = Enricher::new(fx.policy.clone(), Arc::new(NoCredentials), root.clone())
            .with_evidence(source);
        let mut ev = fx.event();
        ev.pid = pid;
        ev.tgid = pid;
        ev.cgroup_id = meta.ino();
        let process = enricher.enrich(&ev).process;
        assert_eq!(process.cgroup.as_deref(), Some(own.as_str()));
        assert_eq!(process.exe.as_deref(), Some(exe));
        assert_eq!(
            process.exe_sha256,
            Some("ab".repeat(32)),
            "from the evidence"
        );

        // The kernel saw another cgroup id: the evidence is not about that.
        ev.cgroup_id = meta.ino() + 1_000_000;
        let process = enricher.enrich(&ev).process;
        assert_eq!(process.exe.as_deref(), Some(exe));
        assert_eq!(process.exe_sha256, None);

        // Evidence of another executable (attested before an exec): no hash, /proc's exe.
        let (source, _) = fake_source(evidence(pid, &own));
        let enricher =
            Enricher::new(fx.policy.clone(), Arc::new(NoCredentials), root).with_evidence(source);
        ev.cgroup_id = meta.ino();
        let process = enricher.enrich(&ev).process;
        assert_eq!(process.exe.as_deref(), Some(exe));
        assert_eq!(process.exe_sha256, None);
    }
}
