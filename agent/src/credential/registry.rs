//! The agent's memory of the credentials it issued: by jti and by kernel credential id.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

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
    }

    pub(crate) fn remove(&self, jti: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_jti.remove(jti) {
            inner.jti_by_id.remove(&c.credential_id);
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
        if let Some(c) = self.lock().by_jti.get_mut(jti) {
            c.revoked = true;
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
