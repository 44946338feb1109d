//! Enforcement that outlives the agent: programs, links and maps pinned in bpffs, one
//! directory per attach point, adopted by the next agent, swapped atomically on reload.
//!
//! ```text
//! /sys/fs/bpf/tessera/<cgroup, escaped>/
//!     maps/{PROCESS_GRANTS,WORKLOAD_GRANTS,EVENTS,EVENT_DROPS,SOCKET_TAGS,
//!           PROCESS_IDENTITY,PROCESS_EVENTS,DENY_LOSSES,PROCESS_INSTANCE,
//!           CONNECTIONS}                                                     shared by every set
//!     g<generation>-<revision, escaped>/                                    one program set
//!         {ENDPOINTS_EXACT,ENDPOINTS_CIDR,WORKLOADS,RULES,CONFIG,           its policy maps
//!          ATTACHED_CGROUP,WORKLOAD_CGROUPS,WORKLOAD_CGROUP_IDS}
//!         link-<program>                                                     its links (one per program;
//!                                                                            the packet-drop ones only
//!                                                                            where that fallback is used)
//! ```
//!
//! A *program set* is one load of the eBPF object: its own policy maps (and `CONFIG`, so its
//! generation and policy always agree) and the shared grant, event and socket-tag maps, found by
//! pin path. A reload builds a complete new set beside the running one, attaches it, and only
//! then unpins the old set's links (which detaches it). While both are attached the kernel runs
//! both and refuses a connect when either refuses, so each connect gets the verdict of the old
//! policy or of the new one (both complete), never a mixture. A set is complete when all its
//! links are pinned; an agent killed halfway leaves an incomplete set, which the next one
//! removes (the old set was never detached, so enforcement did not lapse).

use std::borrow::Cow;
use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSock, CgroupSockAddr, TracePoint, links::FdLink,
    },
};
use tessera_common::{Config, map_names, program_names};
use tracing::{info, warn};

use super::pinfs::{escape, list_sets, pin_dir, remove_set, uninstall};
use super::{
    CompiledPolicy, Enforcer, KernelError, PROGRAMS, PolicyMaps, SKB_PROGRAMS, SOCK_ADDR_PROGRAMS,
    SOCK_PROGRAMS, SyncReport, map_error, program, program_error, sync, system, take_map,
};
use crate::kernel::GrantMaps;
use crate::policy::{Endpoint, EndpointId};

/// The oldest kernel pinned enforcement runs on: the fork, exec and exit tracepoints must stay
/// attached while no agent runs, and a tracepoint's link can be pinned only from 5.15
/// (`BPF_LINK_CREATE` for perf events); before, it ends with the agent's process.
pub const PINNED_FLOOR: (u32, u32) = (5, 15);

/// Maps every program set shares: grants and socket tags must not reset on a reload, and the
/// events of the old set must reach the same reader.
const SHARED_MAPS: [&str; 10] = [
    map_names::PROCESS_GRANTS,
    map_names::WORKLOAD_GRANTS,
    map_names::EVENTS,
    map_names::EVENT_DROPS,
    map_names::SOCKET_TAGS,
    map_names::PROCESS_IDENTITY,
    map_names::PROCESS_EVENTS,
    map_names::DENY_LOSSES,
    map_names::PROCESS_INSTANCE,
    map_names::CONNECTIONS,
];

/// Maps each program set has its own of (a new per-policy map belongs here).
const SET_MAPS: [&str; 8] = [
    map_names::ENDPOINTS_EXACT,
    map_names::ENDPOINTS_CIDR,
    map_names::WORKLOADS,
    map_names::RULES,
    map_names::CONFIG,
    map_names::ATTACHED_CGROUP,
    map_names::WORKLOAD_CGROUPS,
    map_names::WORKLOAD_CGROUP_IDS,
];

/// Tracepoints every set attaches: (program, category, name).
pub(super) const TRACEPOINTS: [(&str, &str, &str); 4] = [
    (program_names::PROCESS_EXIT, "sched", "sched_process_exit"),
    (program_names::PROCESS_EXEC, "sched", "sched_process_exec"),
    (program_names::PROCESS_FORK, "sched", "sched_process_fork"),
    (
        program_names::SOCKET_SYSCALL,
        "syscalls",
        "sys_enter_socket",
    ),
];

/// The links of a set without the packet-drop programs; a set with them has
/// [`PACKET_DROP_LINK_COUNT`].
pub(super) const LINK_COUNT: usize =
    SOCK_PROGRAMS.len() + SOCK_ADDR_PROGRAMS.len() + TRACEPOINTS.len();
pub(super) const PACKET_DROP_LINK_COUNT: usize = LINK_COUNT + SKB_PROGRAMS.len();

/// The pinned state of an attach point the running enforcer owns.
#[derive(Clone, Debug)]
pub(super) struct PinState {
    /// `PIN_ROOT/<cgroup, escaped>`.
    dir: PathBuf,
    cgroup: PathBuf,
    generation: u32,
    revision: String,
    /// Every set attaches the packet-drop programs too (the connection-ending fallback).
    packet_drop: bool,
}

/// The run-time endpoint entries a starting agent protects before its programs go in.
pub struct RuntimeEntries<'a> {
    /// The endpoint host addresses a predecessor resolved (endpoint, its definition, address),
    /// as run-time claims the host refreshers then take over.
    pub saved_hosts: &'a [(EndpointId, &'a Endpoint, IpAddr)],
    /// The host's interface addresses, that local endpoints are protected on (`kernel::local`).
    pub host: &'a super::HostAddresses,
}

/// What `Enforcer::open_pinned` found in bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Nothing was pinned: a first set was installed.
    Fresh { generation: u32 },
    /// The pinned set already enforces this revision: kept as it runs, no gap at all.
    Kept { generation: u32 },
    /// A set of another revision (or stale contents) was pinned: replaced atomically.
    Swapped {
        generation: u32,
        previous_generation: u32,
        previous_revision: String,
    },
}

impl Adoption {
    pub fn generation(&self) -> u32 {
        match self {
            Adoption::Fresh { generation }
            | Adoption::Kept { generation }
            | Adoption::Swapped { generation, .. } => *generation,
        }
    }
}

impl Enforcer {
    /// Enforcement on `cgroup` that stays when the agent stops: adopts what is pinned for it,
    /// keeping it running when it already enforces `revision` with exactly `compiled`, else
    /// installs a new program set atomically. `before_replace(grants, generation, revision)` runs
    /// before a pinned set of another revision is replaced (the grants still serve it).
    ///
    /// `runtime` are the run-time endpoint entries, protected from the first instant so that a
    /// restart never opens them.
    /// `packet_drop`: every set also attaches the packet-drop programs (a pinned set that
    /// differs in this is replaced).
    #[expect(clippy::too_many_arguments, reason = "one caller, the daemon's start")]
    pub fn open_pinned(
        cgroup_root: &Path,
        cgroup: &Path,
        revision: &str,
        compiled: &CompiledPolicy,
        runtime: RuntimeEntries<'_>,
        mode_override: u32,
        packet_drop: bool,
        before_replace: impl FnOnce(&GrantMaps, u32, &str) -> Result<(), KernelError>,
    ) -> Result<(Enforcer, Adoption), KernelError> {
        if let Some(release) = system::kernel_release()
            && release < PINNED_FLOOR
        {
            return Err(KernelError::KernelTooOld {
                found: release,
                floor: PINNED_FLOOR,
            });
        }
        system::ensure_mounted()?;
        let dir = pin_dir(cgroup_root, cgroup);
        let sets = list_sets(&dir)?;
        let best = sets
            .iter()
            .filter(|s| s.complete)
            .max_by_key(|s| s.generation);
        // An incomplete set is a reload or start that did not finish: never attached in full.
        for set in sets.iter().filter(|s| !s.complete) {
            warn!(set = %set.path.display(), "removing an incomplete program set");
            remove_set(&set.path)?;
        }
        if let Some(best) = best {
            for set in sets.iter().filter(|s| s.complete && s.path != best.path) {
                info!(set = %set.path.display(), "removing a superseded program set");
                remove_set(&set.path)?;
            }
        }
        let state = PinState {
            dir: dir.clone(),
            cgroup: cgroup.to_path_buf(),
            generation: best.map_or(0, |b| b.generation),
            revision: best.map(|b| b.revision.clone()).unwrap_or_default(),
            packet_drop,
        };
        let mut ebpf = load_set(&dir, best.map(|b| b.path.as_path()), packet_drop)?;
        let policy = Arc::new(Mutex::new(policy_maps(&mut ebpf)?));
        let mut enforcer = Enforcer {
            grants: GrantMaps::new(
                take_map(&mut ebpf, map_names::PROCESS_GRANTS)?,
                take_map(&mut ebpf, map_names::WORKLOAD_GRANTS)?,
            ),
            connections: super::ConnectionMaps::new(take_map(&mut ebpf, map_names::CONNECTIONS)?),
            drops: take_map(&mut ebpf, map_names::EVENT_DROPS)?,
            deny_losses: take_map(&mut ebpf, map_names::DENY_LOSSES)?,
            events: Some(take_map(&mut ebpf, map_names::EVENTS)?),
            process_events: Some(take_map(&mut ebpf, map_names::PROCESS_EVENTS)?),
            identities: super::Identities::new(
                take_map(&mut ebpf, map_names::PROCESS_IDENTITY)?,
                take_map(&mut ebpf, map_names::PROCESS_INSTANCE)?,
            ),
            ebpf,
            policy,
            attachments: Vec::new(),
            // Not `Some`: dropping the enforcer must leave the pinned set's CONFIG alone.
            cgroup: None,
            pins: Some(state),
        };
        let with_hosts = {
            let mut maps = enforcer.policy.lock().map_err(|_| KernelError::Poisoned)?;
            maps.host = runtime.host.clone();
            maps.static_policy = compiled.clone();
            let expanded = super::local::expand(compiled, runtime.host);
            maps.dynamic.restore(&expanded, runtime.saved_hosts)
        };
        let adoption = match best {
            Some(best)
                if best.revision == revision
                    && best.packet_drop == packet_drop
                    && enforcer.holds(&with_hosts) =>
            {
                if let Ok(mut maps) = enforcer.policy.lock() {
                    maps.dynamic.committed();
                }
                enforcer.set_mode_override(mode_override)?;
                info!(
                    generation = best.generation,
                    revision, "adopted the pinned program set"
                );
                Adoption::Kept {
                    generation: best.generation,
                }
            }
            Some(best) => {
                before_replace(&enforcer.grants, best.generation, &best.revision)?;
                let report = enforcer.swap_policy(revision, compiled, mode_override)?;
                info!(
                    generation = report.generation,
                    previous = best.generation,
                    previous_revision = %best.revision,
                    "replaced the pinned program set"
                );
                Adoption::Swapped {
                    generation: report.generation,
                    previous_generation: best.generation,
                    previous_revision: best.revision.clone(),
                }
            }
            None => {
                let report = match enforcer.swap_policy(revision, compiled, mode_override) {
                    Ok(report) => report,
                    Err(e) => {
                        // Nothing enforced here before: leave nothing behind.
                        enforcer.pins = None;
                        let _ = uninstall(Some(&dir));
                        return Err(e);
                    }
                };
                Adoption::Fresh {
                    generation: report.generation,
                }
            }
        };
        Ok((enforcer, adoption))
    }

    /// Installs `compiled` (kernel ids) as a new program set beside the running one, attaches
    /// and pins it, then detaches the old set. On failure the old set keeps enforcing.
    pub fn swap_policy(
        &mut self,
        revision: &str,
        compiled: &CompiledPolicy,
        mode_override: u32,
    ) -> Result<SyncReport, KernelError> {
        let Some(state) = self.pins.clone() else {
            return Err(KernelError::NotPinned);
        };
        let generation = match state.generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        let set_path = state
            .dir
            .join(format!("g{generation:010}-{}", escape(revision)));
        if set_path.exists() {
            remove_set(&set_path)?;
        }
        // Held throughout: run-time endpoint entries (resolved hosts) move to the new set.
        let policy = self.policy.clone();
        let mut current = policy.lock().map_err(|_| KernelError::Poisoned)?;
        let previous = current.static_policy.clone();
        let merged = current.expand_and_merge(compiled);
        let result = install_set(&state, &set_path, generation, &merged, mode_override);
        let (ebpf, mut maps, report) = match result {
            Ok(done) => done,
            Err(e) => {
                // Unpinning what was attached detaches it again.
                let _ = remove_set(&set_path);
                // The old set keeps enforcing: later run-time entries are derived from its policy.
                current.expand_and_merge(&previous);
                return Err(e);
            }
        };
        for set in list_sets(&state.dir)? {
            if set.path != set_path {
                remove_set(&set.path)?;
            }
        }
        maps.dynamic = std::mem::take(&mut current.dynamic);
        maps.dynamic.committed();
        maps.static_policy = std::mem::take(&mut current.static_policy);
        maps.host = std::mem::take(&mut current.host);
        *current = maps;
        drop(current);
        self.ebpf = ebpf;
        self.pins = Some(PinState {
            generation,
            revision: revision.to_owned(),
            ..state
        });
        info!(generation, revision, "program set swapped in");
        Ok(report)
    }

    /// Removes this attach point's pins: the programs detach once the agent lets go of them
    /// (`tessera run --fail-open` on shutdown). A no-op when not pinned.
    pub fn unpin(&mut self) -> Result<(), KernelError> {
        if let Some(state) = self.pins.take() {
            uninstall(Some(&state.dir))?;
            info!(dir = %state.dir.display(), "pins removed: enforcement ends with the agent");
        }
        Ok(())
    }

    /// The policy generation of the running program set (pinned enforcers).
    pub fn pinned_generation(&self) -> Option<u32> {
        self.pins.as_ref().map(|s| s.generation)
    }

    /// The policy revision of the running program set (pinned enforcers).
    pub fn pinned_revision(&self) -> Option<&str> {
        self.pins.as_ref().map(|s| s.revision.as_str())
    }

    /// The bpffs directory of the attach point (pinned enforcers).
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|s| s.dir.as_path())
    }

    /// Whether the policy maps hold exactly `compiled`.
    fn holds(&self, compiled: &CompiledPolicy) -> bool {
        let Ok(maps) = self.policy.lock() else {
            return false;
        };
        same(&maps.exact, &compiled.exact)
            && same(&maps.workloads, &compiled.workloads)
            && same(&maps.rules, &compiled.rules)
            && {
                let cidr: std::collections::HashMap<_, _> = maps
                    .cidr
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(k, v): (Key<_>, _)| ((k.prefix_len(), k.data()), v))
                    .collect();
                cidr == compiled.cidr
            }
    }
}

fn same<K, V>(map: &HashMap<MapData, K, V>, want: &std::collections::HashMap<K, V>) -> bool
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let have: std::collections::HashMap<K, V> = map.iter().filter_map(Result::ok).collect();
    have == *want
}

/// The key and value sizes this build's programs give map `name` (0 and 0 for a ring buffer).
fn layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    use tessera_common::*;
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Some(match name {
        map_names::PROCESS_GRANTS => (4, size(size_of::<ProcessGrants>())),
        map_names::WORKLOAD_GRANTS => (
            size(size_of::<WorkloadGrantKey>()),
            size(size_of::<GrantSlot>()),
        ),
        map_names::EVENTS | map_names::PROCESS_EVENTS => (0, 0),
        map_names::EVENT_DROPS => (4, 8),
        map_names::SOCKET_TAGS => (8, size(size_of::<SocketTag>())),
        map_names::PROCESS_IDENTITY => (4, size(size_of::<ProcessIdentity>())),
        map_names::DENY_LOSSES => (
            size(size_of::<LostDenyKey>()),
            size(size_of::<LostDenies>()),
        ),
        map_names::PROCESS_INSTANCE => (4, 8),
        map_names::CONNECTIONS => (8, size(size_of::<ConnectionRecord>())),
        map_names::ENDPOINTS_EXACT => (
            size(size_of::<EndpointKey>()),
            size(size_of::<EndpointValue>()),
        ),
        // An LPM trie's key is the prefix length (u32) and the data.
        map_names::ENDPOINTS_CIDR => (
            size(4 + size_of::<EndpointCidrKey>()),
            size(size_of::<EndpointValue>()),
        ),
        map_names::WORKLOADS => (
            size(size_of::<WorkloadKey>()),
            size(size_of::<WorkloadValue>()),
        ),
        map_names::RULES => (size(size_of::<RuleKey>()), size(size_of::<RuleValue>())),
        map_names::CONFIG => (4, size(size_of::<Config>())),
        // A cgroup array's values are the cgroups' descriptors (u32) as written.
        map_names::ATTACHED_CGROUP | map_names::WORKLOAD_CGROUPS => (4, 4),
        map_names::WORKLOAD_CGROUP_IDS => (4, 8),
        _ => return None,
    })
}

/// Refuses, with what to do, maps pinned in `dir` by a build whose programs lay them out
/// otherwise: the kernel would refuse this build's programs over them with a verifier log.
/// Enforcement is untouched: the programs pinned with those maps keep running.
fn check_layouts(dir: &Path, names: &[&'static str]) -> Result<(), KernelError> {
    for &name in names {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = layout(name) else {
            continue;
        };
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|source| KernelError::Map { map: name, source })?;
        let found = (info.key_size(), info.value_size());
        if found != want {
            return Err(KernelError::IncompatiblePins {
                dir: dir.to_path_buf(),
                map: name,
                found,
                want,
            });
        }
    }
    Ok(())
}

/// Loads the object with the shared maps and `set_path`'s policy maps found (or created and
/// pinned) by pin path, and loads every program; attaches nothing. Without `set_path` the
/// policy maps are new and unpinned.
fn load_set(dir: &Path, set_path: Option<&Path>, packet_drop: bool) -> Result<Ebpf, KernelError> {
    let shared = dir.join("maps");
    for d in std::iter::once(shared.as_path()).chain(set_path) {
        std::fs::create_dir_all(d).map_err(|source| KernelError::Io {
            path: d.to_path_buf(),
            source,
        })?;
    }
    check_layouts(&shared, &SHARED_MAPS)?;
    if let Some(set_path) = set_path {
        check_layouts(set_path, &SET_MAPS)?;
    }
    let offsets = super::tracefs::globals();
    let mut loader = super::tracefs::loader(&offsets);
    for name in SHARED_MAPS {
        loader.map_pin_path(name, Cow::Owned(shared.join(name)));
    }
    if let Some(set_path) = set_path {
        for name in SET_MAPS {
            loader.map_pin_path(name, Cow::Owned(set_path.join(name)));
        }
    }
    let mut ebpf = loader.load(PROGRAMS).map_err(KernelError::Object)?;
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSock = program(&mut ebpf, name)?;
        prog.load().map_err(program_error(name))?;
    }
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(program_error(name))?;
    }
    if packet_drop {
        for (name, _) in SKB_PROGRAMS {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load().map_err(program_error(name))?;
        }
    }
    for (name, _, _) in TRACEPOINTS {
        let tp: &mut TracePoint = program(&mut ebpf, name)?;
        tp.load().map_err(program_error(name))?;
    }
    Ok(ebpf)
}

fn policy_maps(ebpf: &mut Ebpf) -> Result<PolicyMaps, KernelError> {
    Ok(PolicyMaps {
        exact: take_map(ebpf, map_names::ENDPOINTS_EXACT)?,
        cidr: take_map(ebpf, map_names::ENDPOINTS_CIDR)?,
        workloads: take_map(ebpf, map_names::WORKLOADS)?,
        rules: take_map(ebpf, map_names::RULES)?,
        config: take_map(ebpf, map_names::CONFIG)?,
        attached: take_map(ebpf, map_names::ATTACHED_CGROUP)?,
        cgroups: take_map(ebpf, map_names::WORKLOAD_CGROUPS)?,
        cgroup_ids: take_map(ebpf, map_names::WORKLOAD_CGROUP_IDS)?,
        dynamic: Default::default(),
        static_policy: Default::default(),
        host: Default::default(),
    })
}

/// Loads a set into `set_path`, writes its policy, attaches and pins its links.
fn install_set(
    state: &PinState,
    set_path: &Path,
    generation: u32,
    compiled: &CompiledPolicy,
    mode_override: u32,
) -> Result<(Ebpf, PolicyMaps, SyncReport), KernelError> {
    let mut ebpf = load_set(&state.dir, Some(set_path), state.packet_drop)?;
    let mut maps = policy_maps(&mut ebpf)?;
    let config = Config {
        mode_override,
        // `sync::write` bumps it to `generation`.
        policy_generation: generation.wrapping_sub(1),
        attached_cgroup_id: system::cgroup_id(&state.cgroup)?,
        ..Config::default()
    };
    maps.config
        .set(0, config, 0)
        .map_err(map_error(map_names::CONFIG))?;
    let report = sync::write(&mut maps, compiled)?;

    let cgroup = std::fs::File::open(&state.cgroup).map_err(|source| KernelError::Io {
        path: state.cgroup.clone(),
        source,
    })?;
    maps.attached
        .set(0, cgroup.as_raw_fd(), 0)
        .map_err(map_error(map_names::ATTACHED_CGROUP))?;
    let mut links: Vec<(&'static str, FdLink)> = Vec::with_capacity(PACKET_DROP_LINK_COUNT);
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSock = program(&mut ebpf, name)?;
        let id = prog
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(program_error(name))?;
        let link = prog.take_link(id).map_err(program_error(name))?;
        links.push((name, FdLink::try_from(link).map_err(link_error(name))?));
    }
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        let id = prog
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(program_error(name))?;
        let link = prog.take_link(id).map_err(program_error(name))?;
        links.push((name, FdLink::try_from(link).map_err(link_error(name))?));
    }
    for (name, category, event) in TRACEPOINTS {
        let tp: &mut TracePoint = program(&mut ebpf, name)?;
        let id = tp.attach(category, event).map_err(program_error(name))?;
        let link = tp.take_link(id).map_err(program_error(name))?;
        links.push((name, FdLink::try_from(link).map_err(link_error(name))?));
    }
    // Last: a set cut short after the others' pins is a complete set without them (and so
    // never kept by an agent that wants them).
    if state.packet_drop {
        for (name, attach_type) in SKB_PROGRAMS {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            let id = prog
                .attach(cgroup.as_fd(), attach_type, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            let link = prog.take_link(id).map_err(program_error(name))?;
            links.push((name, FdLink::try_from(link).map_err(link_error(name))?));
        }
    }
    for (name, link) in links {
        link.pin(set_path.join(format!("link-{name}")))
            .map_err(|source| KernelError::Pin {
                path: set_path.join(format!("link-{name}")),
                source,
            })?;
    }
    Ok((ebpf, maps, report))
}

fn link_error(program: &'static str) -> impl Fn(aya::programs::links::LinkError) -> KernelError {
    move |source| KernelError::Link { program, source }
}
