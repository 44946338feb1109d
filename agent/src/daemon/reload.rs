//! Policy reload (SIGHUP, or a policy file that changed) and what a restarted agent needs to
//! explain the past: the policy of every recent generation, and the drops already reported.
//!
//! A reload is all or nothing: the new files are loaded and validated whole, compiled, and
//! installed as a new program set (`Enforcer::swap_policy`); any failure leaves the running
//! policy enforcing and is logged with its reason. Decision events carry the generation of the
//! program set that decided them, and are explained with that generation's policy.
//!
//! The work (reading, compiling, loading and attaching programs: 0.2–1 s) runs on a blocking
//! thread, so the event loop keeps reading decisions meanwhile: `Reloader::request` starts it,
//! `Reloader::finished` is its completion. The policy of the new generation is known to the
//! enricher before the new programs are attached, so their first decisions are explained right.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tessera_common::DecisionEvent;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{
    credential::CredentialService,
    decision::DecisionRecord,
    k8s_policies::PolicyResources,
    kernel::{self, Enforcer, GrantMaps},
    policy::PolicySet,
};

mod generations;

use crate::kernel::{IdsError, KernelIds, ids as kernel_ids};

use generations::saved_policies;
pub use generations::{Generations, save_policy};

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

/// Everything a reload touches, shared with the blocking thread that does it.
pub struct Shared {
    pub paths: Vec<PathBuf>,
    pub cgroup_root: PathBuf,
    pub state_dir: PathBuf,
    pub mode_override: u32,
    pub enforcer: Arc<Mutex<Enforcer>>,
    pub grants: GrantMaps,
    pub service: Arc<CredentialService>,
    /// The policy enforced now; shared with the status provider.
    pub current: Arc<Mutex<Arc<PolicySet>>>,
    /// `--k8s-policies`: the custom resources merged with the files.
    pub resources: Option<PolicyResources>,
}

/// Reloads, one at a time, off the event loop; explains decisions by generation.
pub struct Reloader {
    shared: Arc<Shared>,
    views: Arc<Mutex<Generations>>,
    watch: PolicyWatch,
    /// The reload running now.
    running: Option<JoinHandle<Outcome>>,
    /// Asked for while one was running: runs next (requests coalesce).
    queued: Option<&'static str>,
    /// The next reload syncs the kernel even when the revision is unchanged (a workload's
    /// cgroup appeared).
    resync: bool,
}

impl Reloader {
    pub fn new(shared: Shared, watch: PolicyWatch, views: Generations) -> Self {
        Reloader {
            shared: Arc::new(shared),
            views: Arc::new(Mutex::new(views)),
            watch,
            running: None,
            queued: None,
            resync: false,
        }
    }

    pub fn policy(&self) -> Arc<PolicySet> {
        lock(&self.shared.current).clone()
    }

    /// Whether a policy file changed since the last reload started.
    pub fn files_changed(&mut self) -> bool {
        self.watch.changed()
    }

    /// Starts a reload on a blocking thread, or queues one behind the reload running now.
    /// Its outcome comes from `finished`.
    pub fn request(&mut self, why: &'static str) {
        if self.running.is_some() {
            debug!(why, "reload queued behind the one running");
            self.queued = Some(why);
            return;
        }
        // The files are read from now on: later edits are a new change.
        self.watch.mark_seen();
        let shared = self.shared.clone();
        let views = self.views.clone();
        let resync = std::mem::take(&mut self.resync);
        self.running = Some(tokio::task::spawn_blocking(move || {
            reload_blocking(&shared, &views, why, resync)
        }));
    }

    /// Like `request`, but the kernel is synced again even if the policy is unchanged: a
    /// cgroup a workload names now exists.
    pub fn request_resync(&mut self, why: &'static str) {
        self.resync = true;
        self.request(why);
    }

    /// The outcome of the running reload once it is done (then starts a queued one); never
    /// completes while none runs. Cancel-safe: dropped before completion, the reload keeps
    /// running and a later call returns its outcome.
    pub async fn finished(&mut self) -> Outcome {
        let Some(task) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = match task.await {
            Ok(outcome) => outcome,
            Err(e) => {
                let outcome = Outcome::Refused(format!("the reload task failed: {e}"));
                log_outcome("reload task", &outcome, &self.policy());
                outcome
            }
        };
        self.running = None;
        if let Outcome::Applied { .. } = outcome {
            let policy = self.policy();
            self.watch.watch_modules(&policy);
        }
        if let Some(why) = self.queued.take() {
            self.request(why);
        }
        outcome
    }

    pub fn enrich(&self, event: &DecisionEvent) -> DecisionRecord {
        lock(&self.views).enrich(event)
    }
}

/// One reload, start to end, logged; runs on a blocking thread.
fn reload_blocking(
    shared: &Shared,
    views: &Mutex<Generations>,
    why: &'static str,
    resync: bool,
) -> Outcome {
    let outcome = try_reload(shared, views, resync);
    if let Outcome::Applied { .. } = outcome {
        COUNTERS.reloads.fetch_add(1, Ordering::Relaxed);
    }
    if let Outcome::Refused(_) = outcome {
        COUNTERS.failures.fetch_add(1, Ordering::Relaxed);
    }
    log_outcome(why, &outcome, &lock(&shared.current));
    outcome
}

fn log_outcome(why: &'static str, outcome: &Outcome, current: &PolicySet) {
    match outcome {
        Outcome::Unchanged => info!(why, "reload: the policy is unchanged"),
        Outcome::Applied {
            generation,
            revision,
        } => info!(why, generation, %revision, "reload: new policy enforcing"),
        Outcome::Refused(reason) => warn!(
            why,
            %reason,
            revision = %current.revision,
            "reload refused: the previous policy is still enforcing"
        ),
    }
}

fn try_reload(shared: &Shared, views: &Mutex<Generations>, resync: bool) -> Outcome {
    let Some(resources) = &shared.resources else {
        return match PolicySet::load(&shared.paths) {
            Ok(policy) => install(shared, views, resync, Arc::new(policy), &[]),
            Err(errors) => Outcome::Refused(errors.to_string()),
        };
    };
    // The files and the custom resources: a refused resource is left out (its status says
    // why), refused files refuse the reload.
    let outcome = match resources.load(&shared.paths) {
        Ok(merged) => {
            let policy = Arc::new(merged.policy.clone());
            let outcome = install(shared, views, resync, policy.clone(), &merged.rendered);
            if !matches!(outcome, Outcome::Refused(_)) {
                resources.applied(&merged, &lock(&shared.current).revision);
            }
            outcome
        }
        Err(errors) => Outcome::Refused(errors.to_string()),
    };
    if let Outcome::Refused(reason) = &outcome {
        resources.not_applied(reason, &lock(&shared.current).revision);
    }
    outcome
}

/// Compiles and installs `policy` as the next generation (unless it is the one enforcing);
/// `rendered`: the texts of its sources that are no files.
fn install(
    shared: &Shared,
    views: &Mutex<Generations>,
    resync: bool,
    policy: Arc<PolicySet>,
    rendered: &[(PathBuf, Vec<u8>)],
) -> Outcome {
    let old = lock(&shared.current).clone();
    if policy.revision == old.revision && !resync {
        return Outcome::Unchanged;
    }
    let compiled = match compile_policy(&shared.state_dir, &shared.cgroup_root, &policy) {
        Ok(compiled) => compiled,
        Err(e) => return Outcome::Refused(error_chain(&e)),
    };
    let Ok(mut enforcer) = shared.enforcer.lock() else {
        return Outcome::Refused("the kernel handle is poisoned".to_owned());
    };
    // Grants name workloads and endpoints by kernel id, stable by name: they keep their
    // meaning across reorderings and additions. The grants of a workload or endpoint that is
    // gone go (its callers would have to ask again anyway); all others stay.
    if !ids_compatible(&old, &policy) {
        let ids = KernelIds::of(&policy);
        let keep = |w: u32, e: u32| ids.workload_id(w).is_some() && ids.endpoint_id(e).is_some();
        match shared.grants.retain(keep) {
            Ok(removed) => warn!(
                grants = removed,
                "the new policy removes workloads or endpoints: their grants are gone"
            ),
            Err(e) => return Outcome::Refused(format!("cannot remove the grants: {e}")),
        }
    }
    // The generation the swap will create, explained before its programs decide anything.
    let next = next_generation(enforcer.pinned_generation().unwrap_or(policy_generation()));
    lock(views).prepare(next, policy.clone());
    let report = match enforcer.swap_policy(&policy.revision, &compiled, shared.mode_override) {
        Ok(report) => report,
        Err(e) => {
            lock(views).discard(next);
            return Outcome::Refused(error_chain(&e));
        }
    };
    drop(enforcer);
    {
        let mut views = lock(views);
        if report.generation != next {
            views.discard(next);
            views.prepare(report.generation, policy.clone());
        }
        views.commit(report.generation);
    }
    for warning in &report.warnings {
        warn!(%warning, "policy sync");
    }
    shared.service.set_policy(policy.clone());
    save_policy(&shared.state_dir, report.generation, &policy, rendered);
    set_generation(report.generation);
    *lock(&shared.current) = policy.clone();
    Outcome::Applied {
        generation: report.generation,
        revision: policy.revision.clone(),
    }
}

/// Compiles `policy` for the kernel, at the start and on every reload: its names get their
/// kernel ids from the state directory's table (new names: new ids, saved before the kernel
/// sees them); workload cgroup paths are resolved under `cgroup_root`.
pub fn compile_policy(
    state_dir: &Path,
    cgroup_root: &Path,
    policy: &PolicySet,
) -> Result<kernel::CompiledPolicy, IdsError> {
    kernel_ids::load_table(state_dir)?;
    kernel_ids::assign_and_save(policy)?;
    let mut compiled = kernel::compile(policy, |path| {
        kernel::cgroup_id(&cgroup_root.join(path.trim_start_matches('/')))
    });
    compiled.open_cgroups(cgroup_root);
    Ok(compiled)
}

/// The generation `Enforcer::swap_policy` gives the set after `current` (0 is never used).
fn next_generation(current: u32) -> u32 {
    match current.wrapping_add(1) {
        0 => 1,
        g => g,
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

/// Whether the grants written under `old` keep their meaning under `new`: kernel ids are
/// stable by name (`KernelIds`), so when every workload and endpoint of `old` is still in `new`
/// (in any order; new ones may be added).
pub fn ids_compatible(old: &PolicySet, new: &PolicySet) -> bool {
    let names = |p: &PolicySet| -> (Vec<String>, Vec<String>) {
        (
            p.workloads.iter().map(|w| w.name.clone()).collect(),
            p.endpoints.iter().map(|e| e.name.clone()).collect(),
        )
    };
    let ((old_w, old_e), (new_w, new_e)) = (names(old), names(new));
    old_w.iter().all(|n| new_w.contains(n)) && old_e.iter().all(|n| new_e.contains(n))
}

/// Every workload and endpoint of `old` at the same position in `new`.
fn positions_kept(old: &PolicySet, new: &PolicySet) -> bool {
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

/// Mtimes of the policy files (and of directories, whose mtime changes when a file is added
/// or removed), and of the issuance modules the enforced policy names.
pub struct PolicyWatch {
    paths: Vec<PathBuf>,
    modules: Vec<PathBuf>,
    seen: Vec<(PathBuf, Option<SystemTime>, u64)>,
    modules_seen: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

impl PolicyWatch {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let mut watch = PolicyWatch {
            paths,
            modules: Vec::new(),
            seen: Vec::new(),
            modules_seen: Vec::new(),
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

    fn module_stamps(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        self.modules.iter().map(|m| stamp(m)).collect()
    }

    /// Watches the modules of `policy` (the one enforced) too, from their state now.
    pub fn watch_modules(&mut self, policy: &PolicySet) {
        let modules: Vec<PathBuf> = policy.issuance.iter().map(|m| m.path.clone()).collect();
        if modules != self.modules {
            self.modules = modules;
            self.modules_seen = self.module_stamps();
        }
    }

    pub fn mark_seen(&mut self) {
        self.seen = self.snapshot();
        self.modules_seen = self.module_stamps();
    }

    pub fn changed(&mut self) -> bool {
        self.snapshot() != self.seen || self.module_stamps() != self.modules_seen
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
    // Without a table from before this agent (a first start, or pins of an agent that
    // numbered by position), the pinned set's ids are positions: every name must keep its own.
    let compatible = |old: &PolicySet| {
        if kernel_ids::table_was_new() {
            positions_kept(old, new)
        } else {
            ids_compatible(old, new)
        }
    };
    if previous.is_some_and(|(_, old)| compatible(&old)) {
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

/// The cgroups (relative to the cgroup v2 root) that workloads name and that do not exist:
/// the daemon syncs the policy again when one appears.
pub fn missing_cgroups(policy: &PolicySet, cgroup_root: &Path) -> Vec<String> {
    policy
        .workloads
        .iter()
        .filter_map(|w| w.selectors.cgroup.clone())
        .filter(|c| !cgroup_root.join(c.trim_start_matches('/')).exists())
        .collect()
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
    fn grants_keep_their_meaning_while_their_names_stay() {
        let old = policy(&["a", "b"], &["x"]);
        // By position (no table from before): only additions at the end.
        assert!(positions_kept(&old, &policy(&["a", "b", "c"], &["x", "y"])));
        assert!(!positions_kept(&old, &policy(&["b", "a"], &["x"])));
        assert!(!positions_kept(&old, &policy(&["a"], &["x"])));
        assert!(!positions_kept(&old, &policy(&["a", "b"], &["y", "x"])));
        // By name (kernel ids from the table): any order, removals only break it.
        assert!(ids_compatible(&old, &policy(&["c", "b", "a"], &["y", "x"])));
        assert!(!ids_compatible(&old, &policy(&["a"], &["x"])));
        assert!(!ids_compatible(&old, &policy(&["a", "b"], &["y"])));
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
