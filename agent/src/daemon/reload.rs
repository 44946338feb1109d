//! Policy reload (SIGHUP, or a policy file that changed) and what a restarted agent needs to
//! explain the past: the policy of every recent generation, and the drops already reported.
//!
//! A reload is all or nothing: the new files are loaded and validated whole, compiled, and
//! installed as a new program set (`Enforcer::swap_policy`); any failure leaves the running
//! policy enforcing and is logged with its reason. Decision events carry the generation of the
//! program set that decided them, and are explained with that generation's policy.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tessera_common::DecisionEvent;
use tracing::{info, warn};

use crate::{
    credential::CredentialService,
    decision::{DecisionRecord, Enricher},
    kernel::{self, Enforcer, GrantMaps},
    policy::PolicySet,
};

/// Reload counters, for status and metrics (`reloads()`, `reload_failures()`, ...).
pub struct ReloadCounters {
    reloads: AtomicU64,
    failures: AtomicU64,
    generation: AtomicU32,
}

static COUNTERS: ReloadCounters = ReloadCounters {
    reloads: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    generation: AtomicU32::new(0),
};

/// Policies applied by a reload since the agent started.
pub fn reloads() -> u64 {
    COUNTERS.reloads.load(Ordering::Relaxed)
}

/// Reloads refused (invalid policy, or the kernel refused the new program set).
pub fn reload_failures() -> u64 {
    COUNTERS.failures.load(Ordering::Relaxed)
}

/// The policy generation the kernel enforces now.
pub fn policy_generation() -> u32 {
    COUNTERS.generation.load(Ordering::Relaxed)
}

pub(super) fn set_generation(generation: u32) {
    COUNTERS.generation.store(generation, Ordering::Relaxed);
}

/// How many generations' policies are kept in memory (the event reader may lag behind a burst
/// of reloads) and in the state directory (for the next agent).
const KEEP_GENERATIONS: usize = 64;
const KEEP_SAVED_GENERATIONS: usize = 16;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The files hold the revision already enforced.
    Unchanged,
    Applied {
        generation: u32,
        revision: String,
    },
    /// The old policy still enforces; the reason was logged.
    Refused(String),
}

/// Everything a reload touches.
pub struct Reloader {
    pub(super) paths: Vec<PathBuf>,
    pub(super) cgroup_root: PathBuf,
    pub(super) state_dir: PathBuf,
    pub(super) mode_override: u32,
    pub(super) enforcer: Arc<Mutex<Enforcer>>,
    pub(super) grants: GrantMaps,
    pub(super) service: Arc<CredentialService>,
    /// The policy enforced now; shared with the status provider.
    pub(super) current: Arc<Mutex<Arc<PolicySet>>>,
    pub(super) watch: PolicyWatch,
    pub(super) views: Generations,
}

impl Reloader {
    pub fn policy(&self) -> Arc<PolicySet> {
        lock(&self.current).clone()
    }

    /// Whether a policy file changed since the last reload.
    pub fn files_changed(&mut self) -> bool {
        self.watch.changed()
    }

    pub fn reload(&mut self, why: &'static str) -> Outcome {
        let outcome = self.try_reload();
        match &outcome {
            Outcome::Unchanged => info!(why, "reload: the policy is unchanged"),
            Outcome::Applied {
                generation,
                revision,
            } => {
                COUNTERS.reloads.fetch_add(1, Ordering::Relaxed);
                info!(why, generation, %revision, "reload: new policy enforcing");
            }
            Outcome::Refused(reason) => {
                COUNTERS.failures.fetch_add(1, Ordering::Relaxed);
                let old = self.policy();
                warn!(why, %reason, revision = %old.revision, "reload refused: the previous policy is still enforcing");
            }
        }
        outcome
    }

    fn try_reload(&mut self) -> Outcome {
        // The files were read now: later edits are a new change.
        self.watch.mark_seen();
        let policy = match PolicySet::load(&self.paths) {
            Ok(policy) => Arc::new(policy),
            Err(errors) => return Outcome::Refused(errors.to_string()),
        };
        let old = self.policy();
        if policy.revision == old.revision {
            return Outcome::Unchanged;
        }
        let compiled = kernel::compile(&policy, |path| {
            kernel::cgroup_id(&self.cgroup_root.join(path.trim_start_matches('/')))
        });
        let Ok(mut enforcer) = self.enforcer.lock() else {
            return Outcome::Refused("the kernel handle is poisoned".to_owned());
        };
        // Grants name workloads and endpoints by position: when a position now names
        // something else, the grants go first (callers ask again) rather than open a door.
        if !ids_compatible(&old, &policy) {
            let live = self.grants.active_count(kernel::boot_time_ns());
            if let Err(e) = self.grants.clear() {
                return Outcome::Refused(format!("cannot clear the renumbered grants: {e}"));
            }
            warn!(
                grants = live,
                "the new policy renumbers workloads or endpoints: credentials must be requested again"
            );
        }
        let report = match enforcer.swap_policy(&policy.revision, &compiled, self.mode_override) {
            Ok(report) => report,
            Err(e) => return Outcome::Refused(error_chain(&e)),
        };
        drop(enforcer);
        for warning in &report.warnings {
            warn!(%warning, "policy sync");
        }
        self.service.set_policy(policy.clone());
        self.views.insert(report.generation, policy.clone());
        save_policy(&self.state_dir, report.generation, &policy);
        set_generation(report.generation);
        *lock(&self.current) = policy.clone();
        Outcome::Applied {
            generation: report.generation,
            revision: policy.revision.clone(),
        }
    }

    pub fn enrich(&self, event: &DecisionEvent) -> DecisionRecord {
        self.views.enrich(event)
    }
}

/// The status of the policy enforced now (not the one the agent started with), with the
/// generation and the reload counters under `policy`.
pub(super) fn live_status(
    attach_point: PathBuf,
    mode: Option<crate::cli::run::ModeArg>,
    current: Arc<Mutex<Arc<PolicySet>>>,
    enforcer: Arc<Mutex<Enforcer>>,
    grants: GrantMaps,
    counters: Arc<super::Counters>,
) -> super::status::StatusProvider {
    Arc::new(move || {
        let policy = lock(&current).clone();
        let mut value = super::status::provider(
            attach_point.clone(),
            mode,
            policy,
            enforcer.clone(),
            grants.clone(),
            counters.clone(),
        )();
        if let Some(p) = value.get_mut("policy").and_then(|p| p.as_object_mut()) {
            p.insert("generation".into(), policy_generation().into());
            p.insert("reloads".into(), reloads().into());
            p.insert("reload_failures".into(), reload_failures().into());
        }
        value
    })
}

/// Kernel ids are positions: grants keep their meaning when every workload and endpoint of the
/// old policy keeps its position (new ones may follow).
pub fn ids_compatible(old: &PolicySet, new: &PolicySet) -> bool {
    fn prefix<'a>(
        old: impl ExactSizeIterator<Item = &'a str>,
        mut new: impl Iterator<Item = &'a str>,
    ) -> bool {
        old.into_iter().all(|name| new.next() == Some(name))
    }
    prefix(
        old.workloads.iter().map(|w| w.name.as_str()),
        new.workloads.iter().map(|w| w.name.as_str()),
    ) && prefix(
        old.endpoints.iter().map(|e| e.name.as_str()),
        new.endpoints.iter().map(|e| e.name.as_str()),
    )
}

/// Decision enrichers by policy generation.
pub struct Generations {
    by_generation: BTreeMap<u32, Enricher>,
    current: u32,
    base: Enricher,
    /// The last unknown generation warned about.
    unknown: AtomicU32,
}

impl Generations {
    /// `base` explains the events of `generation`; later ones get its settings.
    pub fn new(base: Enricher, generation: u32, policy: Arc<PolicySet>) -> Self {
        let mut by_generation = BTreeMap::new();
        by_generation.insert(generation, base.with_policy(policy));
        Generations {
            by_generation,
            current: generation,
            base,
            unknown: AtomicU32::new(u32::MAX),
        }
    }

    /// Explains the events of `generation` with `policy` (the newest generation is current).
    pub fn insert(&mut self, generation: u32, policy: Arc<PolicySet>) {
        self.by_generation
            .insert(generation, self.base.with_policy(policy));
        if generation >= self.current {
            self.current = generation;
        }
        while self.by_generation.len() > KEEP_GENERATIONS {
            self.by_generation.pop_first();
        }
    }

    /// Loads what the state directory kept of earlier generations (a restarted agent reads
    /// the events its predecessor's programs produced).
    pub fn load_saved(&mut self, state_dir: &Path) {
        for (generation, policy) in saved_policies(state_dir) {
            self.by_generation
                .entry(generation)
                .or_insert_with(|| self.base.with_policy(Arc::new(policy)));
        }
        while self.by_generation.len() > KEEP_GENERATIONS {
            self.by_generation.pop_first();
        }
    }

    pub fn enrich(&self, event: &DecisionEvent) -> DecisionRecord {
        let view = match self.by_generation.get(&event.policy_generation) {
            Some(view) => view,
            None => {
                // Once per generation: its records name the current policy instead.
                let generation = event.policy_generation;
                if self.unknown.swap(generation, Ordering::Relaxed) != generation {
                    warn!(
                        generation,
                        current = self.current,
                        "decisions of a policy generation this agent does not know: explained with the current policy"
                    );
                }
                self.by_generation.get(&self.current).unwrap_or(&self.base)
            }
        };
        view.enrich(event)
    }
}

/// Mtimes of the policy files (and of directories, whose mtime changes when a file is added
/// or removed).
pub struct PolicyWatch {
    paths: Vec<PathBuf>,
    seen: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

impl PolicyWatch {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let mut watch = PolicyWatch {
            paths,
            seen: Vec::new(),
        };
        watch.mark_seen();
        watch
    }

    fn snapshot(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        let mut out = Vec::new();
        for path in &self.paths {
            out.push(stamp(path));
            if let Ok(entries) = std::fs::read_dir(path) {
                let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                files.sort();
                out.extend(files.iter().map(|f| stamp(f)));
            }
        }
        out
    }

    pub fn mark_seen(&mut self) {
        self.seen = self.snapshot();
    }

    pub fn changed(&mut self) -> bool {
        self.snapshot() != self.seen
    }
}

fn stamp(path: &Path) -> (PathBuf, Option<SystemTime>, u64) {
    let meta = std::fs::metadata(path).ok();
    (
        path.to_path_buf(),
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map_or(0, |m| m.len()),
    )
}

fn generations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("generations")
}

/// Keeps a copy of the policy files of `generation` (they may change before its events are
/// read), and forgets the oldest copies.
pub fn save_policy(state_dir: &Path, generation: u32, policy: &PolicySet) {
    let dir = generations_dir(state_dir).join(format!("g{generation:010}"));
    let result = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(state_dir)?;
        std::fs::create_dir_all(&dir)?;
        for (i, source) in policy.sources.iter().enumerate() {
            std::fs::copy(source, dir.join(format!("{i:04}.yaml")))?;
        }
        std::fs::write(dir.join("revision"), &policy.revision)
    })();
    if let Err(e) = result {
        warn!(error = %e, dir = %dir.display(), "cannot keep a copy of the policy for later decisions");
        return;
    }
    let mut saved: Vec<PathBuf> = std::fs::read_dir(generations_dir(state_dir))
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    saved.sort();
    while saved.len() > KEEP_SAVED_GENERATIONS {
        let _ = std::fs::remove_dir_all(saved.remove(0));
    }
}

fn saved_policies(state_dir: &Path) -> Vec<(u32, PolicySet)> {
    let Ok(entries) = std::fs::read_dir(generations_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(generation) = name.strip_prefix('g').and_then(|g| g.parse().ok()) else {
            continue;
        };
        let Ok(revision) = std::fs::read_to_string(entry.path().join("revision")) else {
            continue;
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(entry.path())
            .map(|e| e.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|f| f.extension().is_some_and(|x| x == "yaml"));
        files.sort();
        match PolicySet::load(&files) {
            Ok(mut policy) => {
                policy.revision = revision;
                out.push((generation, policy));
            }
            Err(e) => warn!(generation, error = %e, "a saved policy no longer loads"),
        }
    }
    out
}

/// Before a restarted agent replaces the pinned set of another revision: the grants stay when
/// the saved policy of that generation numbers workloads and endpoints as the new one does,
/// else they are cleared (unknown numbering must not open a door).
pub fn before_replace(
    state_dir: &Path,
    new: &PolicySet,
    grants: &GrantMaps,
    generation: u32,
    revision: &str,
) -> Result<(), kernel::KernelError> {
    let previous = saved_policies(state_dir)
        .into_iter()
        .find(|(g, p)| *g == generation && p.revision == revision);
    if previous.is_some_and(|(_, old)| ids_compatible(&old, new)) {
        return Ok(());
    }
    let live = grants.active_count(kernel::boot_time_ns());
    if live > 0 {
        warn!(
            grants = live,
            generation,
            %revision,
            "the pinned policy numbers workloads or endpoints differently (or is unknown): \
             its grants are cleared, credentials must be requested again"
        );
    }
    grants.clear()
}

/// The drop count already reported, given the kernel's `total` now (a recreated map restarts
/// from zero).
pub fn drops_baseline(state_dir: &Path, total: Option<u64>) -> u64 {
    let saved = reported_drops(state_dir);
    match total {
        Some(total) if total < saved => 0,
        _ => saved,
    }
}

/// Drops the previous agents already reported (`EVENT_DROPS` is pinned and outlives them).
pub fn reported_drops(state_dir: &Path) -> u64 {
    std::fs::read_to_string(state_dir.join("reported-drops"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

pub fn save_reported_drops(state_dir: &Path, total: u64) {
    if let Err(e) = std::fs::write(state_dir.join("reported-drops"), total.to_string()) {
        warn!(error = %e, "cannot record the reported drop count");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(workloads: &[&str], endpoints: &[&str]) -> PolicySet {
        let mut text = String::from(
            "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: t\nspec:\n  trustDomain: t.dev\n  workloads:\n",
        );
        for (i, w) in workloads.iter().enumerate() {
            text.push_str(&format!(
                "    - name: {w}\n      match:\n        uid: {}\n",
                1000 + i
            ));
        }
        text.push_str("  endpoints:\n");
        for (i, e) in endpoints.iter().enumerate() {
            text.push_str(&format!(
                "    - name: {e}\n      addresses: [\"10.0.0.{}/32\"]\n      ports: [80]\n",
                i + 1
            ));
        }
        PolicySet::from_str(Path::new("t.yaml"), &text).expect("valid policy")
    }

    #[test]
    fn grants_keep_their_meaning_only_when_positions_do() {
        let old = policy(&["a", "b"], &["x"]);
        assert!(ids_compatible(&old, &policy(&["a", "b", "c"], &["x", "y"])));
        assert!(!ids_compatible(&old, &policy(&["b", "a"], &["x"])));
        assert!(!ids_compatible(&old, &policy(&["a"], &["x"])));
        assert!(!ids_compatible(&old, &policy(&["a", "b"], &["y", "x"])));
    }

    #[test]
    fn the_watch_sees_a_changed_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "a").expect("write");
        let mut watch = PolicyWatch::new(vec![dir.path().to_path_buf()]);
        assert!(!watch.changed());
        std::fs::write(&file, "ab").expect("write");
        assert!(watch.changed());
        watch.mark_seen();
        assert!(!watch.changed());
        std::fs::write(dir.path().join("q.yaml"), "c").expect("write");
        assert!(watch.changed());
    }
}
