//! Which policy explains the decisions of which generation: in memory (the event reader may
//! lag behind a burst of reloads) and in the state directory (for the next agent, which reads
//! the events its predecessor's programs produced).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use tessera_common::DecisionEvent;
use tracing::warn;

use crate::{
    decision::{DecisionRecord, Enricher},
    policy::PolicySet,
};

/// How many generations' policies are kept in memory and in the state directory.
const KEEP_GENERATIONS: usize = 64;
const KEEP_SAVED_GENERATIONS: usize = 16;

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

    /// Explains the events of `generation` with `policy` before that generation exists (a swap
    /// in progress: its first events may be read before the swap returns). The current
    /// generation stays until `commit`.
    pub fn prepare(&mut self, generation: u32, policy: Arc<PolicySet>) {
        self.by_generation
            .insert(generation, self.base.with_policy(policy));
    }

    /// `generation` (prepared) is enforcing now.
    pub fn commit(&mut self, generation: u32) {
        if generation >= self.current {
            self.current = generation;
        }
        while self.by_generation.len() > KEEP_GENERATIONS {
            self.by_generation.pop_first();
        }
    }

    /// A prepared generation that never came to be.
    pub fn discard(&mut self, generation: u32) {
        if generation != self.current {
            self.by_generation.remove(&generation);
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

fn generations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("generations")
}

/// Keeps a copy of the policy files of `generation` (they may change before its events are
/// read), and forgets the oldest copies. `rendered`: the texts of sources that are no files
/// (Kubernetes resources), by source name.
pub fn save_policy(
    state_dir: &Path,
    generation: u32,
    policy: &PolicySet,
    rendered: &[(PathBuf, Vec<u8>)],
) {
    let dir = generations_dir(state_dir).join(format!("g{generation:010}"));
    let result = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(&dir);
        // Inside the 0700 state directory; the copies are no one else's business either.
        std::os::unix::fs::DirBuilderExt::mode(
            std::fs::DirBuilder::new().recursive(true),
            super::super::state_dir::STATE_DIR_MODE,
        )
        .create(&dir)?;
        for (i, source) in policy.sources.iter().enumerate() {
            let copy = dir.join(format!("{i:04}.yaml"));
            match rendered.iter().find(|(name, _)| name == source) {
                Some((_, text)) => std::fs::write(copy, text)?,
                None => std::fs::copy(source, copy).map(|_| ())?,
            }
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

pub(super) fn saved_policies(state_dir: &Path) -> Vec<(u32, PolicySet)> {
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
