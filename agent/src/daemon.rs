//! The daemon: loads the policy, loads and attaches the kernel programs, serves the Workload and
//! admin APIs, turns kernel events into decision-log records, and detaches on SIGTERM/SIGINT.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    cli::run::ModeArg,
    credential::{self, CredentialError, CredentialService},
    decision::{DecisionSink, Enricher, SinkError},
    kernel::{self, Enforcer, KernelError},
    policy::{Mode, PolicyErrors, PolicySet},
};

mod adapters;
mod status;

use adapters::{CredentialRefs, KernelGrants};
pub use status::Counters;

pub struct DaemonConfig {
    pub policies: Vec<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub mode: Option<ModeArg>,
    pub decision_log: String,
    pub api_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the policy is refused, nothing was loaded:\n{0}")]
    Policy(#[from] PolicyErrors),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    DecisionLog(#[from] SinkError),
    #[error("--cgroup {0}: no such cgroup under the cgroup v2 hierarchy {1}; create it first")]
    NoSuchCgroup(PathBuf, PathBuf),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let policy = Arc::new(PolicySet::load(&config.policies)?);
    info!(
        revision = %policy.revision,
        workloads = policy.workloads.len(),
        endpoints = policy.endpoints.len(),
        rules = policy.rules.len(),
        "policy loaded"
    );
    let cgroup_root = kernel::cgroup2_root()?;
    let attach_point = resolve_cgroup(config.cgroup.as_deref(), &cgroup_root)?;

    let mut enforcer = Enforcer::load()?;
    enforcer.set_mode_override(match config.mode {
        None => tessera_common::MODE_OVERRIDE_NONE,
        Some(ModeArg::Enforce) => tessera_common::MODE_OVERRIDE_ENFORCE,
        Some(ModeArg::Audit) => tessera_common::MODE_OVERRIDE_AUDIT,
    })?;
    let report = enforcer.sync_policy(&policy, &cgroup_root)?;
    for warning in &report.warnings {
        warn!(%warning, "policy sync");
    }
    let grants = enforcer.grants();
    let service = Arc::new(CredentialService::new(
        &config.state_dir,
        format!("spiffe://{}/tessera-agent", issuer_domain(&policy)),
        policy.clone(),
        Arc::new(KernelGrants(grants.clone())),
    )?);
    let sink = DecisionSink::open(Path::new(&config.decision_log))?;
    let enricher = Enricher::new(
        policy.clone(),
        Arc::new(CredentialRefs(service.clone())),
        cgroup_root.clone(),
    )
    .with_mode_override(config.mode.map(|m| match m {
        ModeArg::Enforce => Mode::Enforce,
        ModeArg::Audit => Mode::Audit,
    }));

    let api = credential::bind_socket(&config.api_socket, 0o666)?;
    let admin = credential::bind_socket(&config.admin_socket, 0o600)?;
    let mut events = enforcer.events()?;
    enforcer.attach(&attach_point)?;
    info!(cgroup = %attach_point.display(), "programs attached");

    let enforcer = Arc::new(Mutex::new(enforcer));
    let counters = Arc::new(Counters::default());
    let status = status::provider(
        attach_point.clone(),
        config.mode,
        policy.clone(),
        enforcer.clone(),
        grants,
        counters.clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api_task = tokio::spawn(credential::serve_workload_api(
        api,
        service.clone(),
        stopped(stop_rx.clone()),
    ));
    let admin_task = tokio::spawn(credential::serve_admin_api(
        admin,
        service.clone(),
        status,
        stopped(stop_rx.clone()),
    ));
    info!(api = %config.api_socket.display(), admin = %config.admin_socket.display(), "ready");

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut drop_check = tokio::time::interval(Duration::from_secs(5));
    let mut sink = sink;
    let mut reported_drops = 0;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => write_decision(&enricher, &mut sink, &counters, &event),
                None => { warn!("the kernel event stream ended"); break; }
            },
            _ = drop_check.tick() => {
                reported_drops = check_drops(&enforcer, &counters, reported_drops);
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
        }
    }

    let _ = stop_tx.send(true);
    if let Ok(mut enforcer) = enforcer.lock()
        && let Err(e) = enforcer.detach()
    {
        warn!(error = %e, "detaching the programs");
    }
    // Decisions made before the detach are still in the ring buffer: write them all.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        write_decision(&enricher, &mut sink, &counters, &event);
    }
    check_drops(&enforcer, &counters, reported_drops);
    for task in [api_task, admin_task] {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "API server"),
            Ok(Err(e)) => warn!(error = %e, "API server task"),
            _ => {}
        }
    }
    for socket in [&config.api_socket, &config.admin_socket] {
        let _ = std::fs::remove_file(socket);
    }
    info!("detached and stopped");
    Ok(())
}

fn write_decision(
    enricher: &Enricher,
    sink: &mut DecisionSink,
    counters: &Counters,
    event: &tessera_common::DecisionEvent,
) {
    let record = enricher.enrich(event);
    counters.record(event);
    if let Err(e) = sink.write(&record) {
        // Losing a decision must be loud: count it and say so every time.
        counters.sink_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, decision_id = %record.decision_id, "cannot write a decision record");
    }
}

/// Reports events the kernel could not queue; returns the total reported so far.
fn check_drops(enforcer: &Mutex<Enforcer>, counters: &Counters, reported: u64) -> u64 {
    let Ok(dropped) = enforcer.lock().map(|e| e.dropped_events()) else {
        return reported;
    };
    match dropped {
        Ok(total) => {
            counters.dropped_events.store(total, Ordering::Relaxed);
            if total > reported {
                warn!(
                    dropped = total - reported,
                    total, "the kernel dropped decision events"
                );
            }
            total
        }
        Err(e) => {
            warn!(error = %e, "reading the drop counter");
            reported
        }
    }
}

/// `--cgroup` may be a path under the cgroup v2 mount or relative to it.
fn resolve_cgroup(arg: Option<&Path>, root: &Path) -> Result<PathBuf, DaemonError> {
    let path = match arg {
        None => root.to_path_buf(),
        Some(p) if p.starts_with(root) => p.to_path_buf(),
        Some(p) => root.join(p.strip_prefix("/").unwrap_or(p)),
    };
    if !path.join("cgroup.procs").exists() {
        return Err(DaemonError::NoSuchCgroup(path, root.to_path_buf()));
    }
    Ok(path)
}

/// The issuer's trust domain: the policy's, when every document shares one.
fn issuer_domain(policy: &PolicySet) -> String {
    let mut domains = policy.workloads.iter().map(|w| w.spiffe_id.trust_domain());
    match domains.next() {
        Some(first) if domains.all(|d| d == first) => first.to_string(),
        _ => "tessera.local".to_string(),
    }
}
