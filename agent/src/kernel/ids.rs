//! Kernel ids of workloads, endpoints and rules, stable across reloads and restarts.
//!
//! The kernel's maps, its grants and its decision events name workloads, endpoints and rules by
//! a `u32`. A policy numbers them by position, which changes when a reload reorders or removes
//! them; kernel ids are given by *name* instead, from a table kept in the state directory
//! (`kernel-ids.json`): a name keeps its id for as long as the table lives, a new name gets the
//! next unused one, and an id never passes to another name (ids are never reused). A name that
//! leaves the policy keeps its id in the table, so a reload that brings it back gives it the
//! same one (its grants were dropped when it left).
//!
//! A first table (no file yet) numbers the first policy it sees by position: what an agent
//! without a table wrote, so its pinned state keeps its meaning.
//!
//! [`KernelIds`] maps one policy's `WorkloadId`/`EndpointId`/`RuleId` to kernel ids and back;
//! every place that makes or reads a kernel id goes through it. Until a table is loaded
//! ([`load_table`]: the daemon), `KernelIds::of` numbers by position (unit tests, tools).
use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tessera_common::NONE_ID;

use crate::policy::{EndpointId, PolicySet, RuleId, WorkloadId};

/// The table's file in the state directory.
pub const TABLE_FILE: &str = "kernel-ids.json";

#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("cannot read the kernel id table {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel id table {} is not valid ({source}); move it away only together with the \
         pins (`tessera uninstall`): grants name its ids",
        path.display()
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the kernel id table {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel id table has no unused {0} id left")]
    Exhausted(&'static str),
}

/// Name → kernel id, per kind, with the next id to give.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdTable {
    version: u32,
    workloads: Names,
    endpoints: Names,
    rules: Names,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Names {
    ids: BTreeMap<String, u32>,
    /// Never given yet (ids are not reused).
    next: u32,
}

impl Names {
    fn id(&mut self, name: &str, kind: &'static str, changed: &mut bool) -> Result<u32, IdsError> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(id);
        }
        let id = self.next;
        if id == NONE_ID {
            return Err(IdsError::Exhausted(kind));
        }
        self.next += 1;
        self.ids.insert(name.to_owned(), id);
        *changed = true;
        Ok(id)
    }
}

impl IdTable {
    /// The table in `state_dir`; an empty one when there is no file yet.
    pub fn load(state_dir: &Path) -> Result<IdTable, IdsError> {
        let path = state_dir.join(TABLE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| IdsError::Parse {
                path: path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IdTable {
                version: 1,
                ..IdTable::default()
            }),
            Err(source) => Err(IdsError::Read { path, source }),
        }
    }

    /// Writes the table atomically (a temporary file, fsync, rename), mode 0640.
    pub fn save(&self, state_dir: &Path) -> Result<(), IdsError> {
        let path = state_dir.join(TABLE_FILE);
        let tmp = state_dir.join(format!(".{TABLE_FILE}.tmp"));
        let write = |p: &Path| -> std::io::Result<()> {
            // 0700, as the daemon makes it (a first write may come before the daemon's check).
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(state_dir)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(p)?;
            let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(p, &path)
        };
        write(&tmp).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            IdsError::Write {
                path: path.clone(),
                source,
            }
        })
    }

    /// The kernel ids of `policy`'s names, giving new names new ids. Returns whether the table
    /// changed (and must be saved before the kernel sees the ids).
    pub fn assign(&mut self, policy: &PolicySet) -> Result<(KernelIds, bool), IdsError> {
        let mut changed = false;
        let workloads = policy
            .workloads
            .iter()
            .map(|w| self.workloads.id(&w.name, "workload", &mut changed))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = policy
            .endpoints
            .iter()
            .map(|e| self.endpoints.id(&e.name, "endpoint", &mut changed))
            .collect::<Result<Vec<_>, _>>()?;
        let rules = policy
            .rules
            .iter()
            .map(|r| self.rules.id(&r.name, "rule", &mut changed))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((KernelIds::new(workloads, endpoints, rules), changed))
    }
}

/// One policy's kernel ids: forward by position, backward by kernel id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelIds {
    workloads: Vec<u32>,
    endpoints: Vec<u32>,
    rules: Vec<u32>,
    workload_of: HashMap<u32, u32>,
    endpoint_of: HashMap<u32, u32>,
    rule_of: HashMap<u32, u32>,
}

fn reverse(ids: &[u32]) -> HashMap<u32, u32> {
    (0u32..).zip(ids).map(|(pos, &id)| (id, pos)).collect()
}

impl KernelIds {
    fn new(workloads: Vec<u32>, endpoints: Vec<u32>, rules: Vec<u32>) -> Self {
        KernelIds {
            workload_of: reverse(&workloads),
            endpoint_of: reverse(&endpoints),
            rule_of: reverse(&rules),
            workloads,
            endpoints,
            rules,
        }
    }

    /// Kernel ids = positions (no table).
    pub fn positional(policy: &PolicySet) -> Self {
        let count = |n: usize| (0u32..).take(n).collect::<Vec<_>>();
        KernelIds::new(
            count(policy.workloads.len()),
            count(policy.endpoints.len()),
            count(policy.rules.len()),
        )
    }

    /// `policy`'s ids from the loaded table (names it does not know get ids in memory only:
    /// `assign_and_save` gives them before the kernel sees them), or positions when no table
    /// is loaded.
    pub fn of(policy: &PolicySet) -> Self {
        let mut global = lock();
        match global.as_mut() {
            Some((_, table)) => table
                .assign(policy)
                .map(|(ids, _)| ids)
                .unwrap_or_else(|_| KernelIds::positional(policy)),
            None => KernelIds::positional(policy),
        }
    }

    pub fn workload(&self, id: WorkloadId) -> u32 {
        self.workloads
            .get(id.0 as usize)
            .copied()
            .unwrap_or(NONE_ID)
    }

    pub fn endpoint(&self, id: EndpointId) -> u32 {
        self.endpoints
            .get(id.0 as usize)
            .copied()
            .unwrap_or(NONE_ID)
    }

    pub fn rule(&self, id: RuleId) -> u32 {
        self.rules.get(id.0 as usize).copied().unwrap_or(NONE_ID)
    }

    /// The workload with kernel id `kernel` (`None` for `NONE_ID` or an id of no workload).
    pub fn workload_id(&self, kernel: u32) -> Option<WorkloadId> {
        self.workload_of.get(&kernel).map(|&p| WorkloadId(p))
    }

    pub fn endpoint_id(&self, kernel: u32) -> Option<EndpointId> {
        self.endpoint_of.get(&kernel).map(|&p| EndpointId(p))
    }

    pub fn rule_id(&self, kernel: u32) -> Option<RuleId> {
        self.rule_of.get(&kernel).map(|&p| RuleId(p))
    }
}

/// The kernel id of the endpoint named `name` at position `position` of the policy enforced:
/// from the loaded table, or the position when there is none (or the name is new to it).
pub fn endpoint_by_name(name: &str, position: EndpointId) -> u32 {
    lock()
        .as_ref()
        .and_then(|(_, table)| table.endpoints.ids.get(name).copied())
        .unwrap_or(position.0)
}

/// The daemon's table and its state directory.
static TABLE: Mutex<Option<(PathBuf, IdTable)>> = Mutex::new(None);
/// The loaded table had no file: what was pinned before was numbered by position.
static TABLE_WAS_NEW: AtomicBool = AtomicBool::new(true);

/// Whether the table was created by this agent (no file when it started, or none loaded):
/// ids of what was pinned before are positions.
pub fn table_was_new() -> bool {
    TABLE_WAS_NEW.load(Ordering::Relaxed)
}

fn lock() -> std::sync::MutexGuard<'static, Option<(PathBuf, IdTable)>> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads the table of `state_dir` for `KernelIds::of` (once; later calls keep it). Returns
/// whether a table file existed (else the first policy is numbered by position).
pub fn load_table(state_dir: &Path) -> Result<bool, IdsError> {
    let mut global = lock();
    if global.as_ref().is_some_and(|(dir, _)| dir == state_dir) {
        return Ok(true);
    }
    let existed = state_dir.join(TABLE_FILE).exists();
    *global = Some((state_dir.to_path_buf(), IdTable::load(state_dir)?));
    TABLE_WAS_NEW.store(!existed, Ordering::Relaxed);
    Ok(existed)
}

/// Gives `policy`'s new names ids in the loaded table and saves it (before the kernel sees
/// them). Positions when no table is loaded.
pub fn assign_and_save(policy: &PolicySet) -> Result<KernelIds, IdsError> {
    let mut global = lock();
    let Some((dir, table)) = global.as_mut() else {
        return Ok(KernelIds::positional(policy));
    };
    let mut next = table.clone();
    let (ids, changed) = next.assign(policy)?;
    if changed {
        next.save(dir)?;
        *table = next;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

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
        text.push_str("  rules:\n");
        for w in workloads {
            for e in endpoints {
                text.push_str(&format!(
                    "    - name: {w}-{e}\n      workloads: [{w}]\n      endpoints: [{e}]\n"
                ));
            }
        }
        PolicySet::from_str(Path::new("t.yaml"), &text).expect("valid policy")
    }

    fn names(ids: &KernelIds, p: &PolicySet) -> Vec<(String, u32)> {
        (0u32..)
            .zip(&p.workloads)
            .map(|(i, w)| (w.name.clone(), ids.workload(WorkloadId(i))))
            .collect()
    }

    #[test]
    fn a_first_table_numbers_by_position() {
        let p = policy(&["a", "b", "c"], &["x", "y"]);
        let mut table = IdTable::default();
        let (ids, changed) = table.assign(&p).expect("ids");
        assert!(changed);
        assert_eq!(ids, KernelIds::positional(&p));
    }

    #[test]
    fn names_keep_their_ids_when_reordered_or_others_removed() {
        let mut table = IdTable::default();
        let first = policy(&["a", "b", "c"], &["x", "y"]);
        table.assign(&first).expect("ids");
        // Reordered, `b` and `x` removed, `d` and `z` new.
        let second = policy(&["c", "d", "a"], &["z", "y"]);
        let (ids, changed) = table.assign(&second).expect("ids");
        assert!(changed);
        assert_eq!(
            names(&ids, &second),
            [("c".into(), 2), ("d".into(), 3), ("a".into(), 0)]
        );
        assert_eq!(ids.endpoint(EndpointId(0)), 2, "z is new: the next id");
        assert_eq!(ids.endpoint(EndpointId(1)), 1, "y keeps its id");
        // Reverse lookups name the positions of this policy.
        assert_eq!(ids.workload_id(0), Some(WorkloadId(2)));
        assert_eq!(ids.workload_id(1), None, "b is gone");
        assert_eq!(ids.endpoint_id(0), None, "x is gone");
        assert_eq!(ids.workload_id(NONE_ID), None);
        let rule = ids.rule(RuleId(0));
        assert_eq!(ids.rule_id(rule), Some(RuleId(0)));
        // The same policy again changes nothing.
        assert!(!table.assign(&second).expect("ids").1);
        // `b` comes back with its own id; no other name ever gets it.
        let third = policy(&["b", "e"], &["x"]);
        let (ids, _) = table.assign(&third).expect("ids");
        assert_eq!(names(&ids, &third), [("b".into(), 1), ("e".into(), 4)]);
        assert_eq!(ids.endpoint(EndpointId(0)), 0);
    }

    #[test]
    fn the_table_survives_a_restart_and_is_written_atomically_0640() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut table = IdTable::load(dir.path()).expect("empty");
        table.assign(&policy(&["a", "b"], &["x"])).expect("ids");
        table.save(dir.path()).expect("save");
        let mode = std::fs::metadata(dir.path().join(TABLE_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert!(!dir.path().join(format!(".{TABLE_FILE}.tmp")).exists());
        let mut again = IdTable::load(dir.path()).expect("load");
        assert_eq!(again, table);
        let p = policy(&["b", "a"], &["x"]);
        let (ids, changed) = again.assign(&p).expect("ids");
        assert!(!changed);
        assert_eq!(names(&ids, &p), [("b".into(), 1), ("a".into(), 0)]);
    }

    #[test]
    fn a_damaged_table_is_an_error_not_a_renumbering() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(TABLE_FILE), "{not json").expect("write");
        let err = IdTable::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
    }

    #[test]
    fn ids_are_never_past_none() {
        let mut names = Names {
            ids: BTreeMap::new(),
            next: NONE_ID,
        };
        let mut changed = false;
        assert!(matches!(
            names.id("late", "workload", &mut changed),
            Err(IdsError::Exhausted("workload"))
        ));
    }
}
