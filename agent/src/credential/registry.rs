//! The agent's memory of the credentials it issued: by jti and by kernel credential id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::identity::spiffe::SpiffeId;
use crate::policy::{Bind, EndpointId, WorkloadId};

/// How long an expired credential is remembered, so decisions made just after its expiry
/// (`credential_expired`) can still name its jti.
const RETAIN_AFTER_EXPIRY: Duration = Duration::from_secs(600);

/// One issued credential. Never holds the token itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialInfo {
    /// The kernel grant's `credential_id`.
    pub credential_id: u64,
    pub jti: String,
    pub spiffe_id: SpiffeId,
    pub workload: WorkloadId,
    /// The endpoint name (the token's `aud`).
    pub audience: String,
    pub endpoint: EndpointId,
    pub task: String,
    /// The process the credential was issued to.
    pub pid: u32,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub bind: Bind,
    pub revoked: bool,
}

/// What `tessera revoke` (and the admin API) revokes. On the wire: `{"jti": "…"}`,
/// `{"workload": "spiffe://…"}` or `{"pid": 4242}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RevokeTarget {
    Jti(String),
    /// Every credential of the workload.
    Workload(SpiffeId),
    /// Every credential issued to the process (workload-bound ones included: the process
    /// could otherwise keep using its workload's grant).
    Pid(u32),
}

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// Where the registry is kept across restarts (`Registry::open`); never a token.
    path: Option<PathBuf>,
}

/// The file `Registry::open` keeps in the state directory.
const REGISTRY_FILE: &str = "credentials.json";

/// One credential as persisted: ids, names and times, never the token.
#[derive(Serialize, Deserialize)]
struct Persisted {
    credential_id: u64,
    jti: String,
    spiffe_id: String,
    workload: u32,
    audience: String,
    endpoint: u32,
    task: String,
    pid: u32,
    issued_at: u64,
    expires_at: u64,
    bind: String,
    revoked: bool,
}

impl Persisted {
    fn from_info(c: &CredentialInfo) -> Self {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Persisted {
            credential_id: c.credential_id,
            jti: c.jti.clone(),
            spiffe_id: c.spiffe_id.to_string(),
            workload: c.workload.0,
            audience: c.audience.clone(),
            endpoint: c.endpoint.0,
            task: c.task.clone(),
            pid: c.pid,
            issued_at: secs(c.issued_at),
            expires_at: secs(c.expires_at),
            bind: c.bind.as_str().to_owned(),
            revoked: c.revoked,
        }
    }

    fn into_info(self) -> Option<CredentialInfo> {
        Some(CredentialInfo {
            credential_id: self.credential_id,
            jti: self.jti,
            spiffe_id: self.spiffe_id.parse().ok()?,
            workload: WorkloadId(self.workload),
            audience: self.audience,
            endpoint: EndpointId(self.endpoint),
            task: self.task,
            pid: self.pid,
            issued_at: UNIX_EPOCH + Duration::from_secs(self.issued_at),
            expires_at: UNIX_EPOCH + Duration::from_secs(self.expires_at),
            bind: match self.bind.as_str() {
                "process" => Bind::Process,
                "process-tree" => Bind::ProcessTree,
                "workload" => Bind::Workload,
                // Written by a newer agent: revoke it everywhere a process holds it (a
                // process-tree revocation covers every process slot of the credential).
                other => {
                    tracing::warn!(
                        credential_id = self.credential_id,
                        bind = other,
                        "unknown bind mode in the credential registry; revoking it will search every process"
                    );
                    Bind::ProcessTree
                }
            },
            revoked: self.revoked,
        })
    }
}

#[derive(Default)]
struct Inner {
    by_jti: HashMap<String, CredentialInfo>,
    jti_by_id: HashMap<u64, String>,
}

/// What the decision log shows of a credential.
impl From<CredentialInfo> for crate::decision::CredentialRef {
    fn from(c: CredentialInfo) -> Self {
        crate::decision::CredentialRef {
            jti: c.jti,
            expires_at: c.expires_at,
            bind: c.bind.as_str(),
        }
    }
}

impl RevokeTarget {
    fn matches(&self, c: &CredentialInfo) -> bool {
        match self {
            RevokeTarget::Jti(jti) => &c.jti == jti,
            RevokeTarget::Workload(id) => &c.spiffe_id == id,
            RevokeTarget::Pid(pid) => c.pid == *pid,
        }
    }
}

impl Registry {
    /// The registry kept in `state_dir`, with what an earlier agent left there (so that the
    /// kernel grants it left behind can still be explained and revoked).
    pub(crate) fn open(state_dir: &Path) -> Registry {
        let path = state_dir.join(REGISTRY_FILE);
        let mut inner = Inner::default();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Persisted>>(&bytes) {
                Ok(entries) => {
                    for info in entries.into_iter().filter_map(Persisted::into_info) {
                        inner.jti_by_id.insert(info.credential_id, info.jti.clone());
                        inner.by_jti.insert(info.jti.clone(), info);
                    }
                    inner.prune(SystemTime::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "ignoring an unreadable credential registry")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot read the credential registry")
            }
        }
        Registry {
            inner: Mutex::new(inner),
            path: Some(path),
        }
    }

    /// Writes the registry (whole, through a rename) when it is persistent.
    fn save(&self, inner: &Inner) {
        let Some(path) = &self.path else {
            return;
        };
        let entries: Vec<Persisted> = inner.by_jti.values().map(Persisted::from_info).collect();
        let result = serde_json::to_vec(&entries)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::files::replace_private(path, &bytes));
        if let Err(e) = result {
            tracing::warn!(error = %e, path = %path.display(), "cannot save the credential registry");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind: still consistent enough.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A random nonzero id not in use (0 means "no credential" in kernel events).
    pub(crate) fn fresh_id(&self) -> u64 {
        let inner = self.lock();
        loop {
            let id: u64 = rand::random();
            if id != 0 && !inner.jti_by_id.contains_key(&id) {
                return id;
            }
        }
    }

    pub(crate) fn insert(&self, info: CredentialInfo) {
        let mut inner = self.lock();
        inner.prune(SystemTime::now());
        inner.jti_by_id.insert(info.credential_id, info.jti.clone());
        inner.by_jti.insert(info.jti.clone(), info);
        self.save(&inner);
    }

    pub(crate) fn remove(&self, jti: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_jti.remove(jti) {
            inner.jti_by_id.remove(&c.credential_id);
            self.save(&inner);
        }
    }

    pub(crate) fn get(&self, jti: &str) -> Option<CredentialInfo> {
        self.lock().by_jti.get(jti).cloned()
    }

    pub(crate) fn by_credential_id(&self, id: u64) -> Option<CredentialInfo> {
        let inner = self.lock();
        let jti = inner.jti_by_id.get(&id)?;
        inner.by_jti.get(jti).cloned()
    }

    /// Unrevoked, unexpired credentials the target names.
    pub(crate) fn select(&self, target: &RevokeTarget, now: SystemTime) -> Vec<CredentialInfo> {
        let mut found: Vec<CredentialInfo> = self
            .lock()
            .by_jti
            .values()
            .filter(|c| !c.revoked && c.expires_at > now && target.matches(c))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.issued_at.cmp(&b.issued_at).then(a.jti.cmp(&b.jti)));
        found
    }

    pub(crate) fn mark_revoked(&self, jti: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_jti.get_mut(jti) {
            c.revoked = true;
            self.save(&inner);
        }
    }

    pub(crate) fn active_count(&self, now: SystemTime) -> usize {
        self.lock()
            .by_jti
            .values()
            .filter(|c| !c.revoked && c.expires_at > now)
            .count()
    }
}

impl Inner {
    fn prune(&mut self, now: SystemTime) {
        let Some(cutoff) = now.checked_sub(RETAIN_AFTER_EXPIRY) else {
            return;
        };
        let Inner { by_jti, jti_by_id } = self;
        by_jti.retain(|_, c| {
            let keep = c.expires_at > cutoff;
            if !keep {
                jti_by_id.remove(&c.credential_id);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(jti: &str, id: u64, pid: u32, expires_in: i64) -> CredentialInfo {
        let now = SystemTime::now();
        let expires_at = if expires_in >= 0 {
            now + Duration::from_secs(expires_in.unsigned_abs())
        } else {
            now - Duration::from_secs(expires_in.unsigned_abs())
        };
        CredentialInfo {
            credential_id: id,
            jti: jti.to_owned(),
            spiffe_id: "spiffe://demo.tessera.dev/agent".parse().expect("id"),
            workload: WorkloadId(0),
            audience: "vault".to_owned(),
            endpoint: EndpointId(0),
            task: "t".to_owned(),
            pid,
            issued_at: now,
            expires_at,
            bind: Bind::Process,
            revoked: false,
        }
    }

    #[test]
    fn lookup_select_and_prune() {
        let r = Registry::default();
        r.insert(info("a", 1, 10, 300));
        r.insert(info("b", 2, 11, -5));
        r.insert(info("old", 3, 12, -3600));
        // Inserting prunes what expired long ago, keeps what expired recently.
        r.insert(info("c", 4, 10, 300));
        assert!(r.by_credential_id(3).is_none());
        assert_eq!(r.by_credential_id(2).map(|c| c.jti), Some("b".to_owned()));
        assert_eq!(r.active_count(SystemTime::now()), 2);
        let pid10: Vec<_> = r
            .select(&RevokeTarget::Pid(10), SystemTime::now())
            .into_iter()
            .map(|c| c.jti)
            .collect();
        assert_eq!(pid10.len(), 2);
        r.mark_revoked("a");
        assert_eq!(r.active_count(SystemTime::now()), 1);
        assert!(r.by_credential_id(1).is_some_and(|c| c.revoked));
        assert_ne!(r.fresh_id(), 0);
    }

    #[test]
    fn a_reopened_registry_remembers_ids_but_no_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Registry::open(dir.path());
        r.insert(info("a", 7, 10, 300));
        r.insert(info("b", 8, 11, 300));
        r.mark_revoked("b");
        let text = std::fs::read_to_string(dir.path().join(REGISTRY_FILE)).expect("saved");
        assert!(!text.contains("eyJ"));
        let again = Registry::open(dir.path());
        assert_eq!(
            again.by_credential_id(7).map(|c| c.jti),
            Some("a".to_owned())
        );
        assert!(again.by_credential_id(8).is_some_and(|c| c.revoked));
        assert_eq!(again.active_count(SystemTime::now()), 1);
    }

    #[test]
    fn a_reopened_registry_keeps_every_bind_mode() {
        // Revocation after a restart follows the bind mode: a process-tree credential read
        // back as `process` would leave its children's copies alive.
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Registry::open(dir.path());
        for (i, bind) in [Bind::Process, Bind::ProcessTree, Bind::Workload]
            .into_iter()
            .enumerate()
        {
            let id = 20 + i as u64;
            r.insert(CredentialInfo {
                bind,
                ..info(bind.as_str(), id, 30, 300)
            });
        }
        let again = Registry::open(dir.path());
        for (i, bind) in [Bind::Process, Bind::ProcessTree, Bind::Workload]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                again.by_credential_id(20 + i as u64).map(|c| c.bind),
                Some(bind),
                "{} after a restart",
                bind.as_str()
            );
        }
    }

    #[test]
    fn revoke_target_wire_format() {
        let t: RevokeTarget = serde_json::from_str(r#"{"pid": 42}"#).expect("pid");
        assert_eq!(t, RevokeTarget::Pid(42));
        let t: RevokeTarget =
            serde_json::from_str(r#"{"workload": "spiffe://demo.tessera.dev/agent"}"#)
                .expect("workload");
        assert!(matches!(t, RevokeTarget::Workload(_)));
        assert_eq!(
            serde_json::to_string(&RevokeTarget::Jti("x".into())).expect("json"),
            r#"{"jti":"x"}"#
        );
        assert!(serde_json::from_str::<RevokeTarget>(r#"{"workload": "not an id"}"#).is_err());
        assert!(serde_json::from_str::<RevokeTarget>(r#"{"jti": "a", "pid": 1}"#).is_err());
    }
}
