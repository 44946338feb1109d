//! Operational metrics and health: Prometheus metrics at `/metrics` (OpenMetrics text,
//! prometheus-client), `/healthz` (the process answers) and `/readyz` (programs attached and
//! the Workload API listening), on a TCP listener that is loopback by default.
//!
//! The daemon owns one [`Metrics`]; others record through it: the event loop (decisions,
//! drops), the credential service (through [`crate::credential::CredentialObserver`]) and
//! policy reloads ([`Metrics::set_policy`], [`Metrics::reload_failed`]).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::decision::DecisionRecord;
use crate::policy::PolicySet;

mod server;
pub mod systemd;
#[cfg(test)]
mod tests;

pub use server::{MetricsError, MetricsServer};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    verdict: &'static str,
    reason: &'static str,
    enforced: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    revision: String,
}

/// Computes a gauge's value when it is scraped (e.g. active grants from the kernel maps).
pub type GaugeSource = Arc<dyn Fn() -> i64 + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    ringbuf_dropped: Counter,
    lost_denies: Counter,
    decision_log_errors: Counter,
    active_grants: Gauge,
    credentials_issued: Counter,
    credentials_refused: Family<ReasonLabels, Counter>,
    issuance_seconds: Histogram,
    module_decisions: Family<ModuleLabels, Counter>,
    token_checks: Family<TokenLabels, Counter>,
    policy_info: Family<PolicyLabels, Gauge>,
    policy_loaded: Gauge,
    reload_failures: Counter,
    ready: AtomicBool,
    /// Why the agent is not ready although it enforces (the Workload API cannot attest).
    unready_because: Mutex<Option<String>>,
    /// When the current policy was loaded, seconds since the epoch (for `tessera status`).
    policy_loaded_at: AtomicU64,
    active_grants_source: Mutex<Option<GaugeSource>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let m = Metrics {
            decisions: Family::default(),
            ringbuf_dropped: Counter::default(),
            lost_denies: Counter::default(),
            decision_log_errors: Counter::default(),
            active_grants: Gauge::default(),
            credentials_issued: Counter::default(),
            credentials_refused: Family::default(),
            // 50 µs … ~3.3 s
            issuance_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 17)),
            module_decisions: Family::default(),
            token_checks: Family::default(),
            policy_info: Family::default(),
            policy_loaded: Gauge::default(),
            reload_failures: Counter::default(),
            ready: AtomicBool::new(false),
            unready_because: Mutex::new(None),
            policy_loaded_at: AtomicU64::new(0),
            active_grants_source: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "decisions",
            "Decisions written to the decision log, by verdict and reason",
            m.decisions.clone(),
        );
        registry.register(
            "ringbuf_dropped_events",
            "Decision events the kernel could not queue (the ring buffer was full)",
            m.ringbuf_dropped.clone(),
        );
        registry.register(
            "lost_denies",
            "Denies whose event the kernel could not queue, written to the decision log as \
             counted `lost` records",
            m.lost_denies.clone(),
        );
        registry.register(
            "decision_log_errors",
            "Decision records that could not be written",
            m.decision_log_errors.clone(),
        );
        registry.register(
            "active_grants",
            "Kernel grants neither expired nor revoked",
            m.active_grants.clone(),
        );
        registry.register(
            "credentials_issued",
            "Credentials issued by the Workload API",
            m.credentials_issued.clone(),
        );
        registry.register(
            "credentials_refused",
            "Credential requests refused, by reason",
            m.credentials_refused.clone(),
        );
        registry.register(
            "credential_issuance_seconds",
            "Time to answer a credential request (issued or refused)",
            m.issuance_seconds.clone(),
        );
        registry.register(
            "issuance_module_decisions",
            "Credential requests decided by an issuance module, by result: allow, deny, or \
             (each a deny) error, timeout, undefined, invalid_result",
            m.module_decisions.clone(),
        );
        registry.register(
            "issuance_tokens",
            "Outside tokens credential requests carried, by kind (subject, evidence) and result: \
             verified, or why not (expired, bad_signature, wrong_audience, untrusted_issuer, \
             unsigned, algorithm_mismatch, unknown_key, not_yet_valid, malformed, \
             own_credential, invalid_claims)",
            m.token_checks.clone(),
        );
        registry.register(
            "policy_info",
            "The loaded policy's revision (always 1)",
            m.policy_info.clone(),
        );
        registry.register(
            "policy_loaded_timestamp_seconds",
            "When the loaded policy was loaded, seconds since the epoch",
            m.policy_loaded.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy reloads refused (the previous policy stays in force)",
            m.reload_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A decision record that was written (or that failed to be: `written` false).
    pub fn decision(&self, record: &DecisionRecord, written: bool) {
        self.decisions_counted(record, 1, written);
    }

    /// A record that stands for `count` denies whose events were lost (see `Lost`).
    pub fn lost_denies(&self, record: &DecisionRecord, count: u64, written: bool) {
        self.lost_denies.inc_by(count);
        self.decisions_counted(record, count, written);
    }

    fn decisions_counted(&self, record: &DecisionRecord, count: u64, written: bool) {
        self.decisions
            .get_or_create(&DecisionLabels {
                verdict: record.verdict.as_str(),
                reason: record.reason.as_str(),
                enforced: if record.enforced { "true" } else { "false" },
            })
            .inc_by(count);
        if !written {
            self.decision_log_errors.inc();
        }
    }

    /// Records counted by [`decision`](Self::decision) as written whose batch then failed.
    pub fn decision_log_errors(&self, records: u64) {
        self.decision_log_errors.inc_by(records);
    }

    /// The kernel's total of dropped events (a counter that only grows).
    pub fn set_ringbuf_dropped_total(&self, total: u64) {
        let now = self.ringbuf_dropped.get();
        if total > now {
            self.ringbuf_dropped.inc_by(total - now);
        }
    }

    /// Where `active_grants` comes from, read at each scrape.
    pub fn set_active_grants_source(&self, source: GaugeSource) {
        *self
            .active_grants_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    pub fn credential_issued(&self, elapsed: Duration) {
        self.credentials_issued.inc();
        self.issuance_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn credential_refused(&self, reason: &str, elapsed: Duration) {
        self.credentials_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        self.issuance_seconds.observe(elapsed.as_secs_f64());
    }

    /// A policy was loaded (at start or by a reload).
    pub fn set_policy(&self, policy: &PolicySet) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.policy_info.clear();
        self.policy_info
            .get_or_create(&PolicyLabels {
                revision: policy.revision.clone(),
            })
            .set(1);
        self.policy_loaded
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        self.policy_loaded_at.store(now, Ordering::Relaxed);
    }

    /// When the current policy was loaded, seconds since the epoch; 0 before the first.
    pub fn policy_loaded_at(&self) -> u64 {
        self.policy_loaded_at.load(Ordering::Relaxed)
    }

    /// A reload was refused.
    pub fn reload_failed(&self) {
        self.reload_failures.inc();
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.unready_reason().is_none()
    }

    /// Keeps `/readyz` at 503 with `reason` (None: lifts it), for a part of the agent that
    /// cannot work although the rest does.
    pub fn set_unready_because(&self, reason: Option<String>) {
        *self
            .unready_because
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reason;
    }

    pub fn unready_reason(&self) -> Option<String> {
        self.unready_because
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let source = self
            .active_grants_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(source) = source {
            self.active_grants.set(source());
        }
        // The daemon's reloader counts refused reloads process-wide.
        let refused = crate::daemon::reload_failures();
        let counted = self.reload_failures.get();
        if refused > counted {
            self.reload_failures.inc_by(refused - counted);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

impl crate::credential::CredentialObserver for Metrics {
    fn issued(&self, elapsed: Duration) {
        self.credential_issued(elapsed);
    }

    fn refused(&self, reason: &str, elapsed: Duration) {
        self.credential_refused(reason, elapsed);
    }

    fn module_decided(&self, result: &'static str) {
        self.module_decisions
            .get_or_create(&ModuleLabels { result })
            .inc();
    }

    fn token_checked(&self, kind: &'static str, result: &'static str) {
        self.token_checks
            .get_or_create(&TokenLabels { kind, result })
            .inc();
    }
}

/// `tessera status` with what the metrics know added: `policy.loaded_at` (RFC 3339) and
/// `metrics.listen` (the bound address, or null when metrics are off).
pub fn extend_status(
    base: crate::credential::StatusFn,
    metrics: Arc<Metrics>,
    listen: Option<std::net::SocketAddr>,
) -> crate::credential::StatusFn {
    Arc::new(move || {
        let mut status = base();
        let loaded = UNIX_EPOCH + Duration::from_secs(metrics.policy_loaded_at());
        if let Some(policy) = status.get_mut("policy").and_then(|p| p.as_object_mut()) {
            policy.insert(
                "loaded_at".into(),
                humantime::format_rfc3339_seconds(loaded).to_string().into(),
            );
        }
        if let Some(obj) = status.as_object_mut() {
            obj.insert(
                "metrics".into(),
                serde_json::json!({ "listen": listen.map(|a| a.to_string()), "ready": metrics.is_ready() }),
            );
        }
        status
    })
}
