//! What `tessera status` shows: built on demand from the kernel, the grants and the counters.
use crate::kernel::EndMechanism;
use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::{Value, json};
use tessera_common::{DecisionEvent, VERDICT_ALLOW};

use crate::{
    cli::run::ModeArg,
    kernel::{self, Enforcer, GrantMaps},
    policy::PolicySet,
};

/// Decisions written since start.
#[derive(Debug, Default)]
pub struct Counters {
    pub decisions: AtomicU64,
    pub allow: AtomicU64,
    pub deny: AtomicU64,
    pub dropped_events: AtomicU64,
    /// Denies written as `lost` records (their events were dropped by the kernel).
    pub lost_denies: AtomicU64,
    pub sink_errors: AtomicU64,
}

impl Counters {
    pub fn record(&self, event: &DecisionEvent) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        if event.verdict == VERDICT_ALLOW {
            self.allow.fetch_add(1, Ordering::Relaxed);
        } else {
            self.deny.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `count` denies written as one `lost` record.
    pub fn record_lost(&self, count: u64) {
        self.decisions.fetch_add(count, Ordering::Relaxed);
        self.deny.fetch_add(count, Ordering::Relaxed);
        self.lost_denies.fetch_add(count, Ordering::Relaxed);
    }
}

pub type StatusProvider = Arc<dyn Fn() -> Value + Send + Sync>;

pub fn provider(
    attach_point: PathBuf,
    mode: Option<ModeArg>,
    policy: Arc<PolicySet>,
    enforcer: Arc<Mutex<Enforcer>>,
    grants: GrantMaps,
    counters: Arc<Counters>,
) -> StatusProvider {
    Arc::new(move || {
        let programs: Vec<Value> = enforcer
            .lock()
            .ok()
            .and_then(|e| e.program_stats().ok())
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "run_count": p.run_count,
                    "run_time_ns": p.run_time_ns,
                    "verified_insns": p.verified_insns,
                })
            })
            .collect();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "attach_point": attach_point.display().to_string(),
            "mode_override": match mode { None => "none", Some(ModeArg::Enforce) => "enforce", Some(ModeArg::Audit) => "audit" },
            "programs": programs,
            "policy": {
                "revision": policy.revision,
                "sources": policy.sources.iter().map(|s| s.display().to_string()).collect::<Vec<_>>(),
                "workloads": policy.workloads.len(),
                "endpoints": policy.endpoints.len(),
                "rules": policy.rules.len(),
            },
            "counters": {
                "decisions": load(&counters.decisions),
                "allow": load(&counters.allow),
                "deny": load(&counters.deny),
                "dropped_events": load(&counters.dropped_events),
                "lost_denies": load(&counters.lost_denies),
                "decision_log_errors": load(&counters.sink_errors),
            },
            "grants": { "active": grants.active_count(kernel::boot_time_ns()) },
        })
    })
}

/// `status` plus `"kernel"` (release, and how its optional features are used) and
/// `"workload_api"`: how the Workload API proves who its callers are
/// (`attestation`: `peer-pidfd`, `sock-diag`, or null with `unavailable` saying why; the API
/// then answers every credential request 503 `attestation_unavailable`).
pub fn with_workload_api(
    status: StatusProvider,
    method: &Result<crate::identity::peer::Method, crate::identity::peer::Unavailable>,
) -> StatusProvider {
    let field = match method {
        Ok(m) => serde_json::json!({ "attestation": match m {
            crate::identity::peer::Method::PeerPidfd => "peer-pidfd",
            crate::identity::peer::Method::SockDiag => "sock-diag",
        } }),
        Err(why) => serde_json::json!({ "attestation": null, "unavailable": why.0 }),
    };
    // What this kernel offers that the agent uses, emulates or lacks.
    let kernel = serde_json::json!({
        "release": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_owned())
            .unwrap_or_default(),
        "caller_proof": field["attestation"].clone(),
        "tracing_ancestor_helper": if crate::kernel::tracing_ancestors() {
            "used"
        } else {
            "emulated (bpf_current_task_under_cgroup over WORKLOAD_CGROUPS)"
        },
    });
    Arc::new(move || {
        let mut value = status();
        if let Value::Object(fields) = &mut value {
            fields.insert("workload_api".to_owned(), field.clone());
            fields.insert("kernel".to_owned(), kernel.clone());
        }
        value
    })
}

/// Adds `kernel.connection_end`: how connections whose credential ended are ended here
/// (`sock_diag_destroy`, `packet_drop`, or `unavailable`: they outlive their credentials).
pub fn with_connection_end(status: StatusProvider, mechanism: EndMechanism) -> StatusProvider {
    Arc::new(move || {
        let mut value = status();
        if let Some(Value::Object(kernel)) = value.get_mut("kernel") {
            kernel.insert("connection_end".to_owned(), Value::from(mechanism.as_str()));
        }
        value
    })
}

/// `status` plus `"hosts"`: each endpoint host's resolved addresses (see `ResolvedHosts`).
pub fn with_hosts(status: StatusProvider, hosts: crate::resolve::ResolvedHosts) -> StatusProvider {
    Arc::new(move || {
        let mut value = status();
        if let Value::Object(fields) = &mut value {
            fields.insert("hosts".to_owned(), hosts.to_json());
        }
        value
    })
}

/// `local_addresses`: the host's interface addresses local endpoints are protected on now
/// (besides `127.0.0.0/8` and `::1`).
pub fn with_local_addresses(
    status: StatusProvider,
    local: crate::kernel::LocalEntries,
) -> StatusProvider {
    Arc::new(move || {
        let mut value = status();
        if let Value::Object(fields) = &mut value {
            let addresses: Vec<Value> = local
                .host_addresses()
                .map(|h| h.iter().map(|a| Value::String(a.to_string())).collect())
                .unwrap_or_default();
            fields.insert("local_addresses".to_owned(), Value::Array(addresses));
        }
        value
    })
}
