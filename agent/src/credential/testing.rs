//! Test helpers: a `GrantStore` that records every call, and a harness serving both APIs on
//! temporary sockets with a policy that maps this test process to workload `me`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use tessera_common::{GRANT_REVOKED, GrantSlot, WorkloadGrantKey};

use super::{
    ClientError, CredentialService, GrantStore, GrantStoreError, SigningAlgorithm, StatusFn,
    TokenRequest, bind_socket, serve_admin_api, serve_workload_api,
};
use crate::policy::PolicySet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum GrantCall {
    PutProcess(u32, GrantSlot),
    RevokeProcess(u32, u64),
    RemoveProcess(u32, u64),
    PutWorkload(WorkloadGrantKey, GrantSlot),
    RevokeWorkload(WorkloadGrantKey, u64),
    RevokeTree(u64),
}

/// Records calls and keeps the slots, so revocation can be checked.
#[derive(Default)]
pub(crate) struct RecordingGrants {
    pub(crate) calls: Mutex<Vec<GrantCall>>,
    process: Mutex<Vec<(u32, GrantSlot)>>,
    workload: Mutex<Vec<(WorkloadGrantKey, GrantSlot)>>,
}

impl RecordingGrants {
    pub(crate) fn calls(&self) -> Vec<GrantCall> {
        self.calls.lock().expect("lock").clone()
    }

    pub(crate) fn process_slots(&self, tgid: u32) -> Vec<GrantSlot> {
        self.process
            .lock()
            .expect("lock")
            .iter()
            .filter(|(t, _)| *t == tgid)
            .map(|(_, s)| *s)
            .collect()
    }

    pub(crate) fn workload_slots(&self) -> Vec<(WorkloadGrantKey, GrantSlot)> {
        self.workload.lock().expect("lock").clone()
    }

    fn record(&self, c: GrantCall) {
        self.calls.lock().expect("lock").push(c);
    }
}

impl GrantStore for RecordingGrants {
    fn revoke_tree_grant(&self, id: u64) -> Result<usize, GrantStoreError> {
        self.record(GrantCall::RevokeTree(id));
        let mut found = 0;
        for (_, s) in self.process.lock().expect("lock").iter_mut() {
            if s.credential_id == id {
                s.state = GRANT_REVOKED;
                found += 1;
            }
        }
        Ok(found)
    }

    fn put_process_grant(
        &self,
        tgid: u32,
        _owner: u64,
        slot: GrantSlot,
    ) -> Result<(), GrantStoreError> {
        self.record(GrantCall::PutProcess(tgid, slot));
        self.process.lock().expect("lock").push((tgid, slot));
        Ok(())
    }

    fn revoke_process_grant(&self, tgid: u32, id: u64) -> Result<bool, GrantStoreError> {
        self.record(GrantCall::RevokeProcess(tgid, id));
        let mut found = false;
        for (t, s) in self.process.lock().expect("lock").iter_mut() {
            if *t == tgid && s.credential_id == id {
                s.state = GRANT_REVOKED;
                found = true;
            }
        }
        Ok(found)
    }

    fn remove_process_grant(&self, tgid: u32, id: u64) -> Result<bool, GrantStoreError> {
        self.record(GrantCall::RemoveProcess(tgid, id));
        let mut slots = self.process.lock().expect("lock");
        let before = slots.len();
        slots.retain(|(t, s)| !(*t == tgid && s.credential_id == id));
        Ok(slots.len() != before)
    }

    fn put_workload_grant(
        &self,
        key: WorkloadGrantKey,
        slot: GrantSlot,
    ) -> Result<(), GrantStoreError> {
        self.record(GrantCall::PutWorkload(key, slot));
        let mut slots = self.workload.lock().expect("lock");
        slots.retain(|(k, _)| *k != key);
        slots.push((key, slot));
        Ok(())
    }

    fn revoke_workload_grant(
        &self,
        key: WorkloadGrantKey,
        id: u64,
    ) -> Result<bool, GrantStoreError> {
        self.record(GrantCall::RevokeWorkload(key, id));
        let mut found = false;
        for (k, s) in self.workload.lock().expect("lock").iter_mut() {
            if *k == key && s.credential_id == id {
                s.state = GRANT_REVOKED;
                found = true;
            }
        }
        Ok(found)
    }
}

pub(crate) const ISSUER: &str = "spiffe://test.tessera.dev/tessera-agent";

/// This process's cgroup v2 path and uid: the selectors of workload `me`.
pub(crate) fn own_selectors() -> (String, u32) {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let cgroup = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned();
    (cgroup, nix::unistd::getuid().as_raw())
}

pub(crate) fn policy_yaml(include_me: bool) -> String {
    let (cgroup, uid) = own_selectors();
    let me = if include_me {
        format!("    - name: me\n      match: {{ cgroup: \"{cgroup}\", uid: {uid} }}\n")
    } else {
        String::new()
    };
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {{ name: credential-tests }}
spec:
  trustDomain: test.tessera.dev
  workloads:
{me}    - name: other
      match: {{ cgroup: /tessera-test-nobody-is-here }}
  endpoints:
    - {{ name: vault, addresses: ["127.0.0.1/32"], ports: [18200] }}
    - {{ name: api, addresses: ["127.0.0.2/32"] }}
    - {{ name: open, addresses: ["127.0.0.3/32"] }}
    - {{ name: elsewhere, addresses: ["127.0.0.4/32"] }}
  rules:
    - {{ name: other-to-elsewhere, workloads: [other], endpoints: [elsewhere], credential: {{ required: true, maxTtl: 5m }} }}
"#
    ) + if include_me {
        r#"    - { name: me-to-vault, workloads: [me], endpoints: [vault], credential: { required: true, maxTtl: 5m, bind: process } }
    - { name: me-to-api, workloads: [me], endpoints: [api], credential: { required: true, maxTtl: 1m, bind: workload } }
    - { name: me-to-open, workloads: [me], endpoints: [open] }
"#
    } else {
        ""
    }
}

pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    pub(crate) svc: Arc<CredentialService>,
    pub(crate) grants: Arc<RecordingGrants>,
    pub(crate) policy: Arc<PolicySet>,
    pub(crate) socket: PathBuf,
    pub(crate) admin: PathBuf,
    _stop: Vec<oneshot::Sender<()>>,
}

pub(crate) async fn harness(include_me: bool) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = policy_yaml(include_me);
    let policy = Arc::new(
        PolicySet::from_str(&dir.path().join("test.yaml"), &yaml)
            .unwrap_or_else(|e| panic!("test policy invalid:\n{e}\n{yaml}")),
    );
    let grants = Arc::new(RecordingGrants::default());
    let svc = Arc::new(
        CredentialService::new(
            &dir.path().join("state"),
            ISSUER.to_owned(),
            SigningAlgorithm::default(),
            policy.clone(),
            grants.clone(),
        )
        .expect("service"),
    );
    let socket = dir.path().join("run/workload.sock");
    let admin = dir.path().join("run/admin.sock");
    let (stop_w, stopped_w) = oneshot::channel::<()>();
    let (stop_a, stopped_a) = oneshot::channel::<()>();
    let listener = bind_socket(&socket, 0o666).expect("bind workload socket");
    let method = crate::identity::peer::Method::from_environment();
    tokio::spawn(serve_workload_api(listener, svc.clone(), method, async {
        let _ = stopped_w.await;
    }));
    let listener = bind_socket(&admin, 0o600).expect("bind admin socket");
    let status: StatusFn = Arc::new(|| serde_json::json!({ "hello": "status" }));
    tokio::spawn(serve_admin_api(listener, svc.clone(), status, async {
        let _ = stopped_a.await;
    }));
    Harness {
        _dir: dir,
        svc,
        grants,
        policy,
        socket,
        admin,
        _stop: vec![stop_w, stop_a],
    }
}

pub(crate) fn req(audience: &str, ttl: Option<u64>) -> TokenRequest {
    TokenRequest {
        audience: audience.to_owned(),
        task: Some("job-42".to_owned()),
        ttl_seconds: ttl,
        scopes: None,
        subject_token: None,
        evidence_tokens: Vec::new(),
    }
}

pub(crate) fn own_pid() -> u32 {
    std::process::id()
}

pub(crate) fn refusal(e: ClientError) -> (u16, Option<String>, String) {
    match e {
        ClientError::Refused {
            status,
            reason,
            error,
        } => (status, reason, error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub(crate) fn boot_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("clock");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
