//! Credential grants in the kernel: per-process slots (`PROCESS_GRANTS`) and per-workload
//! grants (`WORKLOAD_GRANTS`). The kernel reads them on every connect to a protected endpoint.

use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, MapError};
use tessera_common::{
    GRANT_ACTIVE, GRANT_EMPTY, GRANT_REVOKED, GRANT_SLOTS, GrantSlot, ProcessGrants,
    WorkloadGrantKey, map_names,
};

use super::{KernelError, boot_time_ns, ignore_missing, map_error};

type ProcessMap = HashMap<MapData, u32, ProcessGrants>;
type WorkloadMap = HashMap<MapData, WorkloadGrantKey, GrantSlot>;

/// A handle on the grant maps; clones share them. Every change is a read-modify-write under
/// a lock, so two credentials issued at once cannot overwrite each other's slot.
#[derive(Clone)]
pub struct GrantMaps {
    inner: Arc<Inner>,
}

struct Inner {
    process: Mutex<ProcessMap>,
    workload: Mutex<WorkloadMap>,
}

impl GrantMaps {
    pub(super) fn new(process: ProcessMap, workload: WorkloadMap) -> Self {
        GrantMaps {
            inner: Arc::new(Inner {
                process: Mutex::new(process),
                workload: Mutex::new(workload),
            }),
        }
    }

    /// Stores `slot` for process `tgid`, the task whose instance marker is `owner`: it replaces
    /// the slot for the same endpoint, else takes an empty, revoked or expired one. Fails when
    /// all slots hold live credentials. Slots written for another marker (an earlier holder of
    /// the pid) are dropped: they never applied to this process.
    pub fn put_process_grant(
        &self,
        tgid: u32,
        owner: u64,
        slot: GrantSlot,
    ) -> Result<(), KernelError> {
        let mut map = lock(&self.inner.process)?;
        let mut grants = get_or_default(&map, &tgid, map_names::PROCESS_GRANTS)?;
        if grants.owner != owner {
            grants = ProcessGrants {
                owner,
                ..ProcessGrants::default()
            };
        }
        let now = boot_time_ns();
        let index = grants
            .slots
            .iter()
            .position(|s| s.state != GRANT_EMPTY && s.endpoint_id == slot.endpoint_id)
            .or_else(|| grants.slots.iter().position(|s| !is_live(s, now)))
            .ok_or(KernelError::TooManyGrants {
                tgid,
                slots: GRANT_SLOTS,
            })?;
        grants.slots[index] = slot;
        map.insert(tgid, grants, 0)
            .map_err(map_error(map_names::PROCESS_GRANTS))
    }

    /// Marks the process's grant for `credential_id` revoked (the kernel then reports
    /// `credential_revoked`). Returns whether there was one.
    pub fn revoke_process_grant(&self, tgid: u32, credential_id: u64) -> Result<bool, KernelError> {
        self.edit_process_grant(tgid, credential_id, |slot| slot.state = GRANT_REVOKED)
    }

    /// Marks revoked the slot for `credential_id` in every process that holds one (the
    /// kernel copies `bind: process-tree` slots to children at fork). Returns how many.
    pub fn revoke_everywhere(&self, credential_id: u64) -> Result<usize, KernelError> {
        let tgids: Vec<u32> = {
            let map = lock(&self.inner.process)?;
            map.keys().filter_map(Result::ok).collect()
        };
        let mut count = 0;
        for tgid in tgids {
            if self.revoke_process_grant(tgid, credential_id)? {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Empties the process's slot for `credential_id`. Returns whether there was one.
    pub fn remove_process_grant(&self, tgid: u32, credential_id: u64) -> Result<bool, KernelError> {
        self.edit_process_grant(tgid, credential_id, |slot| *slot = GrantSlot::default())
    }

    fn edit_process_grant(
        &self,
        tgid: u32,
        credential_id: u64,
        edit: impl Fn(&mut GrantSlot),
    ) -> Result<bool, KernelError> {
        let mut map = lock(&self.inner.process)?;
        let mut grants = get_or_default(&map, &tgid, map_names::PROCESS_GRANTS)?;
        let Some(slot) = grants
            .slots
            .iter_mut()
            .find(|s| s.state != GRANT_EMPTY && s.credential_id == credential_id)
        else {
            return Ok(false);
        };
        edit(slot);
        let err = map_error(map_names::PROCESS_GRANTS);
        if grants.slots.iter().all(|s| s.state == GRANT_EMPTY) {
            ignore_missing(map.remove(&tgid)).map_err(err)?;
        } else {
            map.insert(tgid, grants, 0).map_err(err)?;
        }
        Ok(true)
    }

    /// Stores the grant of a `bind: workload` credential, replacing the previous one.
    pub fn put_workload_grant(
        &self,
        key: WorkloadGrantKey,
        slot: GrantSlot,
    ) -> Result<(), KernelError> {
        lock(&self.inner.workload)?
            .insert(key, slot, 0)
            .map_err(map_error(map_names::WORKLOAD_GRANTS))
    }

    /// Marks the workload grant revoked if it is still `credential_id`'s. Returns whether it was.
    pub fn revoke_workload_grant(
        &self,
        key: WorkloadGrantKey,
        credential_id: u64,
    ) -> Result<bool, KernelError> {
        let mut map = lock(&self.inner.workload)?;
        let mut slot = get_or_default(&map, &key, map_names::WORKLOAD_GRANTS)?;
        if slot.state == GRANT_EMPTY || slot.credential_id != credential_id {
            return Ok(false);
        }
        slot.state = GRANT_REVOKED;
        map.insert(key, slot, 0)
            .map_err(map_error(map_names::WORKLOAD_GRANTS))?;
        Ok(true)
    }

    /// Grants that are active and unexpired at `now_boot_ns`, in both maps.
    pub fn active_count(&self, now_boot_ns: u64) -> usize {
        let processes = match lock(&self.inner.process) {
            Ok(map) => map
                .iter()
                .filter_map(Result::ok)
                .map(|(_, g)| g.slots.iter().filter(|s| is_live(s, now_boot_ns)).count())
                .sum(),
            Err(_) => 0,
        };
        let workloads = match lock(&self.inner.workload) {
            Ok(map) => map
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, s)| is_live(s, now_boot_ns))
                .count(),
            Err(_) => 0,
        };
        processes + workloads
    }

    /// Keeps the grants whose (workload, endpoint) kernel ids `keep` accepts and removes the
    /// others (a reload removed their workload or endpoint). Returns how many were removed.
    pub fn retain(&self, keep: impl Fn(u32, u32) -> bool) -> Result<usize, KernelError> {
        let mut removed = 0;
        let mut map = lock(&self.inner.process)?;
        let err = map_error(map_names::PROCESS_GRANTS);
        let entries: Vec<(u32, ProcessGrants)> = map.iter().filter_map(Result::ok).collect();
        for (tgid, mut grants) in entries {
            let mut changed = false;
            for slot in grants.slots.iter_mut() {
                if slot.state != GRANT_EMPTY && !keep(slot.workload_id, slot.endpoint_id) {
                    *slot = GrantSlot::default();
                    changed = true;
                    removed += 1;
                }
            }
            if !changed {
                continue;
            }
            if grants.slots.iter().all(|s| s.state == GRANT_EMPTY) {
                ignore_missing(map.remove(&tgid)).map_err(&err)?;
            } else {
                map.insert(tgid, grants, 0).map_err(&err)?;
            }
        }
        drop(map);
        let mut map = lock(&self.inner.workload)?;
        let keys: Vec<WorkloadGrantKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep(k.workload_id, k.endpoint_id))
            .collect();
        for key in keys {
            ignore_missing(map.remove(&key)).map_err(map_error(map_names::WORKLOAD_GRANTS))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes every grant.
    pub fn clear(&self) -> Result<(), KernelError> {
        let mut map = lock(&self.inner.process)?;
        let keys: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            ignore_missing(map.remove(&key)).map_err(map_error(map_names::PROCESS_GRANTS))?;
        }
        drop(map);
        let mut map = lock(&self.inner.workload)?;
        let keys: Vec<WorkloadGrantKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            ignore_missing(map.remove(&key)).map_err(map_error(map_names::WORKLOAD_GRANTS))?;
        }
        Ok(())
    }

    /// The `bind: workload` grant of `key` as the kernel sees it (empty when there is none).
    pub fn workload_grant(&self, key: WorkloadGrantKey) -> Result<GrantSlot, KernelError> {
        let map = lock(&self.inner.workload)?;
        get_or_default(&map, &key, map_names::WORKLOAD_GRANTS)
    }

    /// The process's slots as the kernel sees them (all empty when it has none).
    pub fn process_grants(&self, tgid: u32) -> Result<ProcessGrants, KernelError> {
        let map = lock(&self.inner.process)?;
        get_or_default(&map, &tgid, map_names::PROCESS_GRANTS)
    }
}

fn is_live(slot: &GrantSlot, now: u64) -> bool {
    slot.state == GRANT_ACTIVE && slot.expires_at_ns > now
}

fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, KernelError> {
    mutex.lock().map_err(|_| KernelError::Poisoned)
}

fn get_or_default<K: aya::Pod, V: aya::Pod + Default>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<V, KernelError> {
    match map.get(key, 0) {
        Ok(value) => Ok(value),
        Err(MapError::KeyNotFound) => Ok(V::default()),
        Err(source) => Err(KernelError::Map { map: name, source }),
    }
}
