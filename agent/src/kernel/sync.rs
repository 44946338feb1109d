//! Writes a compiled policy into the kernel maps, removing what the new policy no longer has.

use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::os::fd::AsRawFd as _;

use aya::{
    Pod,
    maps::{HashMap, MapData, lpm_trie::Key},
};
use tessera_common::{capacity, map_names};

use super::{CompiledPolicy, KernelError, PolicyMaps, SyncWarning, ignore_missing, map_error};

/// What a policy sync wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The new `Config::policy_generation`, copied into every later event.
    pub generation: u32,
    pub exact_endpoints: usize,
    pub cidr_endpoints: usize,
    pub workloads: usize,
    pub rules: usize,
    /// Stale entries removed, over all maps.
    pub removed: usize,
    pub warnings: Vec<SyncWarning>,
}

pub(super) fn write(
    maps: &mut PolicyMaps,
    compiled: &CompiledPolicy,
) -> Result<SyncReport, KernelError> {
    check_capacity(
        map_names::WORKLOADS,
        compiled.workloads.len(),
        capacity::WORKLOADS,
    )?;
    check_capacity(map_names::RULES, compiled.rules.len(), capacity::RULES)?;

    let mut removed = write_endpoints(maps, compiled)?;
    removed += replace_hash(
        &mut maps.workloads,
        map_names::WORKLOADS,
        &compiled.workloads,
    )?;
    removed += replace_hash(&mut maps.rules, map_names::RULES, &compiled.rules)?;

    // The workload cgroups for tracing programs, deepest first; 0 ends the list.
    let ids_err = map_error(map_names::WORKLOAD_CGROUP_IDS);
    let dirs_err = map_error(map_names::WORKLOAD_CGROUPS);
    for index in 0..capacity::WORKLOAD_CGROUPS {
        match compiled.cgroup_dirs.0.get(index as usize) {
            Some((id, dir)) => {
                maps.cgroups
                    .set(index, dir.as_raw_fd(), 0)
                    .map_err(&dirs_err)?;
                maps.cgroup_ids.set(index, *id, 0).map_err(&ids_err)?;
            }
            None => {
                maps.cgroup_ids.set(index, 0, 0).map_err(&ids_err)?;
                ignore_missing(maps.cgroups.unset(index)).map_err(&dirs_err)?;
            }
        }
    }

    let config_err = map_error(map_names::CONFIG);
    let mut config = maps.config.get(&0, 0).map_err(&config_err)?;
    config.policy_generation = config.policy_generation.wrapping_add(1);
    config.flags = compiled.config_flags;
    maps.config.set(0, config, 0).map_err(&config_err)?;

    Ok(SyncReport {
        generation: config.policy_generation,
        exact_endpoints: compiled.exact.len(),
        cidr_endpoints: compiled.cidr.len(),
        workloads: compiled.workloads.len(),
        rules: compiled.rules.len(),
        removed,
        warnings: compiled.warnings.clone(),
    })
}

/// Makes the endpoint maps (exact and CIDR) hold exactly `compiled`'s: new and changed keys
/// first, then stale keys removed. Returns how many it removed.
pub(super) fn write_endpoints(
    maps: &mut PolicyMaps,
    compiled: &CompiledPolicy,
) -> Result<usize, KernelError> {
    check_capacity(
        map_names::ENDPOINTS_EXACT,
        compiled.exact.len(),
        capacity::ENDPOINTS_EXACT,
    )?;
    check_capacity(
        map_names::ENDPOINTS_CIDR,
        compiled.cidr.len(),
        capacity::ENDPOINTS_CIDR,
    )?;
    let mut removed = replace_hash(&mut maps.exact, map_names::ENDPOINTS_EXACT, &compiled.exact)?;
    let cidr_err = map_error(map_names::ENDPOINTS_CIDR);
    for (&(prefix, data), value) in &compiled.cidr {
        maps.cidr
            .insert(&Key::new(prefix, data), value, 0)
            .map_err(&cidr_err)?;
    }
    let stale: Vec<Key<_>> = maps
        .cidr
        .keys()
        .filter_map(Result::ok)
        .filter(|key: &Key<_>| !compiled.cidr.contains_key(&(key.prefix_len(), key.data())))
        .collect();
    for key in &stale {
        ignore_missing(maps.cidr.remove(key)).map_err(&cidr_err)?;
    }
    removed += stale.len();
    Ok(removed)
}

fn check_capacity(map: &'static str, needed: usize, capacity: u32) -> Result<(), KernelError> {
    if needed > capacity as usize {
        return Err(KernelError::PolicyTooLarge {
            map,
            needed,
            capacity,
        });
    }
    Ok(())
}

/// Makes `map` hold exactly `entries`; returns how many stale keys it removed.
fn replace_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    entries: &StdHashMap<K, V>,
) -> Result<usize, KernelError>
where
    K: Pod + Eq + Hash,
    V: Pod,
{
    let err = map_error(name);
    for (key, value) in entries {
        map.insert(key, value, 0).map_err(&err)?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !entries.contains_key(key))
        .collect();
    for key in &stale {
        ignore_missing(map.remove(key)).map_err(&err)?;
    }
    Ok(stale.len())
}
