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

/// The agent's credentials, in memory and (from `Registry::open`) in the state directory: a
/// snapshot (`credentials.json`, a JSON array) and a journal of the changes since
/// (`credentials.journal`, one JSON line each: `put`, `revoke`, `del`). A change appends one
/// line; the snapshot is rewritten (and the journal emptied) when the journal has grown past
/// twice the credentials kept, so the cost of an issue does not grow with history. A line cut
/// short by a crash mid-write is where replay stops; everything before it is kept.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// Where the registry is kept across restarts (`Registry::open`); never a token.
    path: Option<PathBuf>,
}

/// The files `Registry::open` keeps in the state directory.
const REGISTRY_FILE: &str = "credentials.json";
const JOURNAL_FILE: &str = "credentials.journal";
/// The journal is compacted once it has more lines than this, or than twice the credentials.
const JOURNAL_MIN_LINES: usize = 1024;

/// One line of the journal.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Change {
    Put { c: Persisted },
    Revoke { jti: String },
    Del { jti: String },
}

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
    /// The journal, open for appending, and its lines since the snapshot.
    journal: Option<std::fs::File>,
    journal_lines: usize,
    /// Snapshots written since open (for tests of the cost per change).
    snapshots: usize,
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
    /// kernel grants it left behind can still be explained and revoked): the snapshot, then the
    /// journal replayed over it; then compacted into a new snapshot.
    pub(crate) fn open(state_dir: &Path) -> Registry {
        let path = state_dir.join(REGISTRY_FILE);
        let mut inner = Inner::default();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Persisted>>(&bytes) {
                Ok(entries) => {
                    for info in entries.into_iter().filter_map(Persisted::into_info) {
                        inner.put(info);
                    }
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
        let journal = state_dir.join(JOURNAL_FILE);
        match std::fs::read(&journal) {
            Ok(bytes) => inner.replay(&bytes, &journal),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, path = %journal.display(), "cannot read the credential journal")
            }
        }
        inner.prune(SystemTime::now());
        let registry = Registry {
            inner: Mutex::new(inner),
            path: Some(path),
        };
        registry.compact(&mut registry.lock());
        registry
    }

    /// Writes the snapshot (whole, through a rename), then empties the journal.
    fn compact(&self, inner: &mut Inner) {
        let Some(path) = &self.path else {
            return;
        };
        let entries: Vec<Persisted> = inner.by_jti.values().map(Persisted::from_info).collect();
        let result = serde_json::to_vec(&entries)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::files::replace_private(path, &bytes));
        if let Err(e) = result {
            tracing::warn!(error = %e, path = %path.display(), "cannot save the credential registry");
            return;
        }
        inner.snapshots += 1;
        // The snapshot holds every change: the journal starts again (replaying it over the new
        // snapshot after a crash just here would change nothing).
        let journal = path.with_file_name(JOURNAL_FILE);
        let opened = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&journal)
                .and_then(|_| {
                    std::fs::OpenOptions::new()
                        .append(true)
                        .mode(0o600)
                        .open(&journal)
                })
        };
        match opened {
            Ok(file) => {
                inner.journal = Some(file);
                inner.journal_lines = 0;
            }
            Err(e) => {
                inner.journal = None;
                tracing::warn!(error = %e, path = %journal.display(), "cannot open the credential journal");
            }
        }
    }

    /// Records `change` (one appended line), compacting when the journal has grown enough.
    fn record(&self, inner: &mut Inner, change: &Change) {
        if self.path.is_none() {
            return;
        }
        let line = serde_json::to_vec(change).map(|mut l| {
            l.push(b'\n');
            l
        });
        let appended = match (&mut inner.journal, line) {
            // One write of the whole line: a crash leaves it whole or cut short at the end.
            (Some(file), Ok(line)) => std::io::Write::write_all(file, &line).is_ok(),
            _ => false,
        };
        inner.journal_lines += 1;
        if !appended || inner.journal_lines > JOURNAL_MIN_LINES.max(2 * inner.by_jti.len()) {
            self.compact(inner);
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
        let change = Change::Put {
            c: Persisted::from_info(&info),
        };
        inner.put(info);
        self.record(&mut inner, &change);
    }

    pub(crate) fn remove(&self, jti: &str) {
        let mut inner = self.lock();
        if inner.del(jti) {
            let change = Change::Del {
                jti: jti.to_owned(),
            };
            self.record(&mut inner, &change);
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

    /// Every credential of workload `id` the registry still keeps (expired and revoked ones
    /// too, for a while: the history issuance modules see).
    pub(crate) fn kept_of(&self, id: &SpiffeId) -> Vec<CredentialInfo> {
        self.lock()
            .by_jti
            .values()
            .filter(|c| &c.spiffe_id == id)
            .cloned()
            .collect()
    }

    pub(crate) fn mark_revoked(&self, jti: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_jti.get_mut(jti) {
            c.revoked = true;
            let change = Change::Revoke {
                jti: jti.to_owned(),
            };
            self.record(&mut inner, &change);
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
    fn put(&mut self, info: CredentialInfo) {
        self.jti_by_id.insert(info.credential_id, info.jti.clone());
        self.by_jti.insert(info.jti.clone(), info);
    }

    fn del(&mut self, jti: &str) -> bool {
        match self.by_jti.remove(jti) {
            Some(c) => {
                self.jti_by_id.remove(&c.credential_id);
                true
            }
            None => false,
        }
    }

    /// Applies the journal's lines in order, up to the first that is not whole (a crash cut it
    /// short: nothing after it was written).
    fn replay(&mut self, bytes: &[u8], path: &Path) {
        let lines = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        for (applied, line) in lines.enumerate() {
            match serde_json::from_slice::<Change>(line) {
                Ok(Change::Put { c }) => {
                    if let Some(info) = c.into_info() {
                        self.put(info);
                    }
                }
                Ok(Change::Revoke { jti }) => {
                    if let Some(c) = self.by_jti.get_mut(&jti) {
                        c.revoked = true;
                    }
                }
                Ok(Change::Del { jti }) => {
                    self.del(&jti);
                }
                Err(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        applied,
                        error = %e,
                        "the credential journal ends with a line cut short (a crash mid-write): \
                         the changes before it are kept"
                    );
                    return;
                }
            }
        }
    }

    fn prune(&mut self, now: SystemTime) {
        let Some(cutoff) = now.checked_sub(RETAIN_AFTER_EXPIRY) else {
            return;
        };
        let Inner {
            by_jti, jti_by_id, ..
        } = self;
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
    fn a_change_appends_a_line_and_history_does_not_grow_the_cost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Registry::open(dir.path());
        let opened = r.lock().snapshots;
        for i in 0..5000u64 {
            r.insert(info(&format!("j{i}"), 100 + i, 10, 300));
        }
        // 5,000 live credentials: a snapshot each time the journal passed twice the count,
        // not one a change.
        let snapshots = r.lock().snapshots - opened;
        assert!(snapshots <= 4, "{snapshots} snapshots for 5,000 issues");
        let journal = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).expect("journal");
        assert!(
            journal.lines().count() <= 2 * 5000,
            "{}",
            journal.lines().count()
        );
        r.mark_revoked("j4999");
        r.remove("j4998");
        let again = Registry::open(dir.path());
        assert_eq!(again.active_count(SystemTime::now()), 4998);
        assert!(
            again
                .by_credential_id(100 + 4999)
                .is_some_and(|c| c.revoked)
        );
        assert!(again.get("j4998").is_none());
        assert!(again.get("j0").is_some());
    }

    #[test]
    fn a_line_cut_short_by_a_crash_loses_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Registry::open(dir.path());
        r.insert(info("a", 1, 10, 300));
        r.insert(info("b", 2, 10, 300));
        r.mark_revoked("a");
        drop(r);
        // A kill -9 in the middle of the next line's write.
        let path = dir.path().join(JOURNAL_FILE);
        let mut journal = std::fs::read(&path).expect("journal");
        let line = serde_json::to_vec(&Change::Put {
            c: Persisted::from_info(&info("c", 3, 10, 300)),
        })
        .expect("json");
        journal.extend_from_slice(&line[..line.len() / 2]);
        std::fs::write(&path, journal).expect("write");
        let again = Registry::open(dir.path());
        assert!(again.get("a").is_some_and(|c| c.revoked));
        assert!(again.get("b").is_some_and(|c| !c.revoked));
        assert!(again.get("c").is_none());
        // Compacted at open: the torn line is gone, and the next change is whole.
        again.insert(info("d", 4, 10, 300));
        let third = Registry::open(dir.path());
        assert_eq!(third.active_count(SystemTime::now()), 2);
        assert!(third.get("d").is_some());
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
