//! The daemon: loads the policy, adopts or installs the pinned kernel programs, serves the
//! Workload and admin APIs, turns kernel events into decision-log records, reloads the policy on
//! SIGHUP or a file change, and stops on SIGTERM/SIGINT (the programs keep enforcing unless
//! `--fail-open`).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    cli::run::{ConnectionEndArg, ModeArg},
    credential::{self, CredentialError, CredentialService},
    decision::{DecisionRecord, DecisionSink, Enricher, Lost, SinkError, SinkOptions},
    identity::attestor::Attestor,
    identity::evidence::{DEFAULT_MAX_HASH_BYTES, EvidenceReader},
    k8s_policies::PolicyResources,
    kernel::{self, Enforcer, KernelError},
    metrics::{self, Metrics, MetricsError, MetricsServer},
    policy::{Mode, PolicyErrors, PolicySet},
    resolve::{self, ResolveError, ResolvedHosts},
};

mod adapters;
mod attestation;
pub mod cgroupns;
mod connections;
mod local_addresses;
mod losses;
mod reload;
mod state_dir;
mod status;

use adapters::{CredentialRefs, KernelGrants};
use losses::{Loss, LossReporter};
pub use reload::{policy_generation, reload_failures, reloads};
pub use status::Counters;

pub struct DaemonConfig {
    pub policies: Vec<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub mode: Option<ModeArg>,
    pub decision_log: String,
    pub api_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    /// How tokens are signed (each algorithm has its own key in the state directory).
    pub signing_algorithm: crate::credential::SigningAlgorithm,
    /// Rotate the signing key once it is this old; `None`: only on command.
    pub key_rotation: Option<std::time::Duration>,
    /// Each agent's JWKS is written here; the union is served (`--trust-bundle-dir`).
    pub trust_bundle_dir: Option<PathBuf>,
    /// Each node's agent publishes its JWKS in a ConfigMap of this namespace (`None`: the
    /// agent's own) and serves the union (`--trust-bundle-k8s`).
    pub trust_bundle_k8s: Option<Option<String>>,
    /// The `iss` of tokens (`--issuer`); `None`: `spiffe://<trust domain>/tessera-agent`.
    pub issuer: Option<crate::credential::oidc::Issuer>,
    /// The OIDC discovery listener (`--oidc-addr`, `--oidc-cert`, `--oidc-key`).
    pub oidc: crate::credential::oidc::OidcListen,
    /// Detach on shutdown (`--fail-open`); by default the pinned programs keep enforcing.
    pub fail_open: bool,
    /// Rotation and aggregation of the decision log.
    pub decision_log_options: SinkOptions,
    /// `/metrics`, `/healthz`, `/readyz`; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Where endpoint `hosts:` are resolved; `None`: the system's resolver configuration.
    pub dns_server: Option<SocketAddr>,
    /// Credential requests per workload (`None`: no limit).
    pub rate_limit: Option<crate::credential::RateLimit>,
    /// Merge `TesseraPolicy` / `TesseraNamespacedPolicy` resources with the files
    /// (`--k8s-policies`).
    pub k8s_policies: bool,
    /// How connections whose credential ended are ended (`--connection-end`).
    pub connection_end: ConnectionEndArg,
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
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Oidc(#[from] credential::oidc::OidcError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    KernelIds(#[from] kernel::IdsError),
    #[error(
        "--connection-end sock-diag: this kernel cannot end sockets over sock_diag (SOCK_DESTROY \
         needs CONFIG_INET_DIAG_DESTROY, the tcp_diag and udp_diag modules and CAP_NET_ADMIN); \
         use --connection-end packet-drop or auto. Nothing was loaded"
    )]
    NoSockDestroy,
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    StateDir(#[from] state_dir::StateDirError),
    #[error("--k8s-policies: cannot reach the Kubernetes API server: {0}")]
    K8s(#[source] crate::identity::k8s::K8sError),
    // The reason follows from the source, as the error chain is printed.
    #[error("--trust-bundle-k8s: cannot reach the Kubernetes API server")]
    TrustBundleK8sClient(#[source] crate::identity::k8s::K8sError),
    #[error(transparent)]
    TrustBundleK8s(#[from] credential::bundle_k8s::BundleK8sError),
}

/// How long the start waits for the first list of the policy resources before it enforces
/// the files alone (the resources follow in a reload once listed).
const RESOURCES_SYNC_WAIT: Duration = Duration::from_secs(30);

/// `--k8s-policies`: the watch of the policy resources, listed (or given up waiting for).
async fn watch_policy_resources() -> Result<PolicyResources, DaemonError> {
    let env = crate::identity::k8s::K8sEnvironment::from_env();
    let client = crate::identity::k8s::client_for(&env)
        .await
        .map_err(DaemonError::K8s)?;
    let resources = PolicyResources::spawn(client);
    if tokio::time::timeout(RESOURCES_SYNC_WAIT, resources.wait_synced())
        .await
        .is_err()
    {
        warn!(
            "the policy resources are not listed yet: enforcing the policy files alone until they are"
        );
    }
    Ok(resources)
}

/// `--trust-bundle-k8s`: this agent's object and the watch of the trust domain's, listed (or
/// given up waiting for).
async fn watch_trust_bundle(
    namespace: Option<&str>,
    trust_domain: &str,
) -> Result<credential::bundle_k8s::K8sBundle, DaemonError> {
    use credential::bundle_k8s::{BundleK8sError, BundlePlace, K8sBundle};
    let env = crate::identity::k8s::K8sEnvironment::from_env();
    let node = env.node_name.clone().unwrap_or_default();
    if node.is_empty() {
        return Err(BundleK8sError::NoNodeName.into());
    }
    let client = crate::identity::k8s::client_for(&env)
        .await
        .map_err(DaemonError::TrustBundleK8sClient)?;
    let namespace = namespace.unwrap_or(client.default_namespace()).to_owned();
    let place = BundlePlace::new(&namespace, &node, trust_domain)?;
    info!(namespace, node, trust_domain, object = %place.name, "sharing the trust bundle through kubernetes");
    let bundle = K8sBundle::spawn(client, place);
    if tokio::time::timeout(RESOURCES_SYNC_WAIT, bundle.wait_synced())
        .await
        .is_err()
    {
        warn!(
            "the trust bundle objects are not listed yet: serving this agent's keys alone until they are"
        );
    }
    Ok(bundle)
}

/// The next change of the policy resources; never without them.
async fn next_change(changes: Option<&mut tokio::sync::watch::Receiver<u64>>) {
    match changes {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The mechanism `--connection-end` asks for, on this kernel.
fn end_mechanism(setting: ConnectionEndArg) -> Result<kernel::EndMechanism, DaemonError> {
    use kernel::EndMechanism;
    let mechanism = match setting {
        ConnectionEndArg::PacketDrop => EndMechanism::PacketDrop,
        ConnectionEndArg::SockDiag => match kernel::probe_mechanism() {
            EndMechanism::Unavailable => return Err(DaemonError::NoSockDestroy),
            m => m,
        },
        ConnectionEndArg::Auto => match kernel::probe_mechanism() {
            EndMechanism::Unavailable => {
                warn!(
                    "this kernel cannot end sockets over sock_diag (SOCK_DESTROY needs \
                     CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN): the packets of connections \
                     whose credential ended are refused instead"
                );
                EndMechanism::PacketDrop
            }
            m => m,
        },
    };
    info!(
        mechanism = mechanism.as_str(),
        "connections end with their credential"
    );
    Ok(mechanism)
}

pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    // Before the first read: an edit made while starting is a change to reload.
    let mut watch = reload::PolicyWatch::new(config.policies.clone());
    let resources = if config.k8s_policies {
        Some(watch_policy_resources().await?)
    } else {
        None
    };
    let merged = match &resources {
        Some(resources) => Some(resources.load(&config.policies)?),
        None => None,
    };
    let policy = Arc::new(match &merged {
        Some(merged) => merged.policy.clone(),
        None => PolicySet::load(&config.policies)?,
    });
    let rendered = merged
        .as_ref()
        .map(|m| m.rendered.clone())
        .unwrap_or_default();
    watch.watch_modules(&policy);
    // Checked and listed before anything is loaded; nothing is written there until the key is.
    let k8s_bundle = match &config.trust_bundle_k8s {
        Some(namespace) => {
            Some(watch_trust_bundle(namespace.as_deref(), &issuer_domain(&policy)).await?)
        }
        None => None,
    };
    // Before anything is written there (kernel ids, policy copies, the key, the registry).
    state_dir::prepare_and_report(&config.state_dir)?;
    info!(
        revision = %policy.revision,
        workloads = policy.workloads.len(),
        endpoints = policy.endpoints.len(),
        rules = policy.rules.len(),
        "policy loaded"
    );
    raise_fd_limit();
    let metrics = Arc::new(Metrics::new());
    metrics.set_policy(&policy);
    // Programs' run counts and times for `tessera status` (a few ns a run), while we live.
    let _program_stats = kernel::enable_bpf_stats()
        .inspect_err(|e| warn!(error = %e, "program run counts stay at 0"))
        .ok();
    // Bound first: a port in use stops the start before anything is loaded.
    let metrics_server = match config.metrics_addr {
        Some(addr) => Some(MetricsServer::bind(addr).await?),
        None => None,
    };
    // Likewise the OIDC listener: its settings and certificate files are checked, and its port
    // bound, before anything is loaded.
    let oidc_server =
        credential::oidc::OidcServer::bind(&config.oidc, config.issuer.as_ref()).await?;
    let oidc_cert = oidc_server
        .as_ref()
        .and_then(credential::oidc::OidcServer::cert_reload);
    let cgroup_root = kernel::cgroup2_root()?;
    let attach_point = resolve_cgroup(config.cgroup.as_deref(), &cgroup_root)?;

    let mode_override = match config.mode {
        None => tessera_common::MODE_OVERRIDE_NONE,
        Some(ModeArg::Enforce) => tessera_common::MODE_OVERRIDE_ENFORCE,
        Some(ModeArg::Audit) => tessera_common::MODE_OVERRIDE_AUDIT,
    };
    // How this kernel lets us end a connection whose credential ended: probed once, before
    // the programs go in (the packet-drop fallback is part of every program set).
    let end_mechanism = end_mechanism(config.connection_end)?;
    // Pinned in bpffs: a previous agent's programs are adopted, and ours outlive us.
    let compiled = reload::compile_policy(&config.state_dir, &cgroup_root, &policy)?;
    for warning in &compiled.warnings {
        warn!(%warning, "policy sync");
    }
    // What the previous agent resolved for endpoint hosts: protected before anything changes.
    let saved_hosts = resolve::Saved::load(&config.state_dir);
    // The host's addresses: local endpoints are protected on them from the first instant.
    let (address_watch, host_addresses) = local_addresses::start();
    let (mut enforcer, adoption) = Enforcer::open_pinned(
        &cgroup_root,
        &attach_point,
        &policy.revision,
        &compiled,
        kernel::RuntimeEntries {
            saved_hosts: &resolve::saved_claims(&policy, &saved_hosts),
            host: &host_addresses,
        },
        mode_override,
        end_mechanism == kernel::EndMechanism::PacketDrop,
        |grants, generation, revision| {
            reload::before_replace(&config.state_dir, &policy, grants, generation, revision)
        },
    )?;
    reload::set_generation(adoption.generation());
    info!(
        ?adoption,
        pins = %enforcer.pin_dir().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
        "enforcing (pinned)"
    );
    let grants = enforcer.grants();
    let connection_records = enforcer.connections();
    let local_entries = enforcer.local_entries();
    // Every selector, checked in user space; the answers go to the kernel's identities.
    let attestor = Arc::new(
        Attestor::new(
            EvidenceReader::new(DEFAULT_MAX_HASH_BYTES),
            crate::identity::k8s::from_environment(None),
            policy.clone(),
        )
        .with_kernel(enforcer.identities(), cgroup_root.clone()),
    );
    let resolved = ResolvedHosts::new(policy.clone(), enforcer.endpoint_entries())
        .with_state(&config.state_dir, saved_hosts);
    let service = Arc::new(
        CredentialService::new(
            &config.state_dir,
            config.issuer.as_ref().map_or_else(
                || format!("spiffe://{}/tessera-agent", issuer_domain(&policy)),
                ToString::to_string,
            ),
            config.signing_algorithm,
            policy.clone(),
            Arc::new(KernelGrants(grants.clone())),
        )?
        .with_attestor(attestor.clone())
        .with_rate_limit(config.rate_limit)
        .with_trust_bundle_dir(config.trust_bundle_dir.as_deref(), &config.state_dir)?
        .with_trust_bundle_k8s(k8s_bundle.clone()),
    );
    if let Some(bundle) = &k8s_bundle {
        // Another agent's object changed: served (and verifying) at once.
        let (service, mut changes) = (service.clone(), bundle.changes());
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                service.refresh_bundle(false);
            }
        });
    }
    service.set_observer(metrics.clone());
    let sink = DecisionSink::open_with(
        Path::new(&config.decision_log),
        &config.decision_log_options,
    )?;
    let enricher = Enricher::new(
        policy.clone(),
        Arc::new(CredentialRefs(service.clone())),
        cgroup_root.clone(),
    )
    .with_mode_override(config.mode.map(|m| match m {
        ModeArg::Enforce => Mode::Enforce,
        ModeArg::Audit => Mode::Audit,
    }))
    .with_evidence({
        // Evidence the attestor read (exe hash, pod metadata) for the decision records.
        let attestor = attestor.clone();
        Arc::new(move |tgid: u32| attestor.evidence(tgid))
    })
    .with_claims(Arc::new(enforcer.endpoint_entries()));

    let api = credential::bind_socket(&config.api_socket, 0o666)?;
    let admin = credential::bind_socket(&config.admin_socket, 0o600)?;
    let mut events = enforcer.events()?;
    let process_events = enforcer.process_events()?;
    info!(cgroup = %attach_point.display(), "programs attached");

    let enforcer = Arc::new(Mutex::new(enforcer));
    // Events of earlier generations (a predecessor's, or before a reload) are explained with
    // their own policy.
    let mut views = reload::Generations::new(enricher, adoption.generation(), policy.clone());
    views.load_saved(&config.state_dir);
    reload::save_policy(&config.state_dir, adoption.generation(), &policy, &rendered);
    if let (Some(resources), Some(merged)) = (&resources, &merged) {
        resources.applied(merged, &policy.revision);
    }
    let mut resource_changes = resources.as_ref().map(PolicyResources::changes);
    let current_policy = Arc::new(Mutex::new(policy.clone()));
    let mut reloader = reload::Reloader::new(
        reload::Shared {
            paths: config.policies.clone(),
            cgroup_root: cgroup_root.clone(),
            state_dir: config.state_dir.clone(),
            mode_override,
            enforcer: enforcer.clone(),
            grants: grants.clone(),
            service: service.clone(),
            current: current_policy.clone(),
            resources,
        },
        watch,
        views,
    );
    let counters = Arc::new(Counters::default());
    let status = reload::live_status(
        attach_point.clone(),
        config.mode,
        current_policy.clone(),
        enforcer.clone(),
        grants.clone(),
        counters.clone(),
    );
    let grants_for_reaper = grants.clone();
    let grants_for_metrics = grants;
    let metrics_listen = metrics_server.as_ref().map(MetricsServer::local_addr);
    let status = metrics::extend_status(status, metrics.clone(), metrics_listen);
    let status = status::with_hosts(status, resolved.clone());
    let status = status::with_local_addresses(status, local_entries.clone());
    // How the Workload API proves its callers: probed once, for the API and the status.
    let method = crate::identity::peer::Method::from_environment();
    let status = status::with_workload_api(status, &method);
    let status = status::with_connection_end(status, end_mechanism);
    if let Err(why) = &method {
        // Enforcing, but no credential can be issued: readiness says so.
        metrics.set_unready_because(Some(format!(
            "the Workload API cannot attest callers ({}); credential requests get 503",
            why.0
        )));
    }
    let active_grants = grants_for_metrics;
    metrics.set_active_grants_source(Arc::new(move || {
        i64::try_from(active_grants.active_count(kernel::boot_time_ns())).unwrap_or(i64::MAX)
    }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Exec events from now on are queued in the ring buffer; then what already runs.
    let (attest, attest_task) =
        attestation::spawn(attestor.clone(), process_events, stop_rx.clone());
    attestation::scan(
        attestor.clone(),
        relative_cgroup(&attach_point, &cgroup_root),
    )
    .await;
    // The host's addresses, followed into the local endpoints' entries until stop.
    let _addresses_task = local_addresses::spawn(address_watch, local_entries, stop_rx.clone());
    // Endpoint hosts: one task per name, resolving and protecting until stop.
    let mut hosts = resolve::spawn(config.dns_server, &resolved, stop_rx.clone()).await?;
    // The signing key's schedule; retired keys unpublished once their tokens have expired.
    tokio::spawn(key_schedule(
        service.clone(),
        config.key_rotation,
        stopped(stop_rx.clone()),
    ));
    let api_task = tokio::spawn(credential::serve_workload_api(
        api,
        service.clone(),
        method,
        stopped(stop_rx.clone()),
    ));
    let admin_task = tokio::spawn(credential::serve_admin_api(
        admin,
        service.clone(),
        status,
        stopped(stop_rx.clone()),
    ));
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    // Without a way to end sockets the records stay until their sockets close.
    let reaper_task = (end_mechanism != kernel::EndMechanism::Unavailable).then(|| {
        tokio::spawn(
            connections::Reaper {
                connections: connection_records.clone(),
                grants: grants_for_reaper,
                ender: kernel::SocketEnder {
                    mechanism: end_mechanism,
                },
                policy: current_policy.clone(),
                revocations: service.revocations(),
                reported: Default::default(),
            }
            .run(ended_tx, stop_rx.clone()),
        )
    });
    let oidc_task = oidc_server
        .map(|server| tokio::spawn(server.serve(service.bundle(), stopped(stop_rx.clone()))));
    let metrics_task = metrics_server
        .map(|server| tokio::spawn(server.serve(metrics.clone(), stopped(stop_rx.clone()))));
    info!(api = %config.api_socket.display(), admin = %config.admin_socket.display(), "ready");
    metrics.set_ready(true);
    metrics::systemd::ready("enforcing; Workload API listening");
    // Workload cgroups that do not exist yet: when one appears, the policy is synced again.
    let mut missing = reload::missing_cgroups(&policy, &cgroup_root);
    let mut housekeeping = tokio::time::interval(
        metrics::systemd::watchdog_interval()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1)),
    );

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut policy_poll = tokio::time::interval(Duration::from_secs(1));
    let mut sink = sink;
    // EVENT_DROPS is pinned: what earlier agents reported is not reported again.
    let mut reported_drops = reload::drops_baseline(
        &config.state_dir,
        enforcer.lock().ok().and_then(|e| e.dropped_events().ok()),
    );
    let mut losses = LossReporter::default();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => {
                    // This event and what else is queued (bounded, so the other arms still
                    // run), then one write for all of their records.
                    let mut next = Some(event);
                    let mut taken = 0;
                    while let Some(event) = next {
                        if event.reason == tessera_common::REASON_IDENTITY_PENDING {
                            attest.pending(event.tgid);
                        }
                        let id = write_decision(&reloader, &mut sink, &counters, &metrics, &event);
                        note_connection(&connection_records, &event, &id);
                        taken += 1;
                        next = if taken < EVENTS_PER_WRITE { events.try_next() } else { None };
                    }
                    flush_decisions(&mut sink, &counters, &metrics);
                }
                None => { warn!("the kernel event stream ended"); break; }
            },
            Some(ended) = ended_rx.recv() => {
                for e in ended {
                    write_ended(&reloader, &mut sink, &counters, &metrics, &e);
                }
            }
            // Reloads run on a blocking thread: events keep being read meanwhile.
            _ = sighup.recv() => {
                reloader.request("SIGHUP");
                if let Some(cert) = &oidc_cert {
                    cert.reload();
                }
            }
            () = next_change(resource_changes.as_mut()) => {
                reloader.request("kubernetes policy resources changed");
            }
            _ = policy_poll.tick() => {
                if reloader.files_changed() {
                    reloader.request("policy files changed");
                }
            }
            outcome = reloader.finished() => {
                missing = reload::missing_cgroups(&reloader.policy(), &cgroup_root);
                if let reload::Outcome::Applied { .. } = outcome {
                    metrics.set_policy(&reloader.policy());
                    hosts.policy_changed(reloader.policy());
                    // The credential service gave the attestor the new policy.
                    let attestor = attestor.clone();
                    tokio::task::spawn_blocking(move || attestor.reattest_all());
                }
            }
            _ = housekeeping.tick() => {
                let root = &cgroup_root;
                if missing.iter().any(|c| root.join(c.trim_start_matches('/')).exists()) {
                    missing.clear();
                    reloader.request_resync("a cgroup a workload names appeared");
                }
                // From the event loop itself: a stuck loop stops the pings and systemd restarts us.
                metrics::systemd::watchdog_ping();
                // The losses first, then the drop counter: the kernel counts a drop before
                // the lost deny, so the drops shown are never fewer than the losses written.
                let lost = take_losses(&enforcer, &mut losses);
                reported_drops =
                    note_drops(&enforcer, &counters, &metrics, &config.state_dir, reported_drops);
                write_losses(lost, &reloader, &mut sink, &counters, &metrics);
                if let Err(e) = sink.flush_due() {
                    warn!(error = %e, "cannot write aggregated decision records");
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
        }
    }

    metrics.set_ready(false);
    metrics::systemd::stopping();
    let _ = stop_tx.send(true);
    if config.fail_open {
        if let Ok(mut enforcer) = enforcer.lock()
            && let Err(e) = enforcer.unpin()
        {
            warn!(error = %e, "detaching the programs");
        }
    } else {
        info!("the pinned programs keep enforcing; `tessera uninstall` removes them");
    }
    // Decisions made before the stop are still in the ring buffer: write them, until the ring
    // is idle, an event made after the stop comes, or the deadline. The pinned programs keep
    // deciding: what they decide from now on stays in the pinned ring for the next agent.
    let deadline = tokio::time::Instant::now() + STOP_DRAIN;
    let stop_ns = kernel::boot_time_ns();
    let mut written = 0u64;
    let mut deadline_reached = false;
    loop {
        let idle = (tokio::time::Instant::now() + Duration::from_millis(100)).min(deadline);
        match tokio::time::timeout_at(idle, events.next()).await {
            Ok(Some(event)) => {
                write_decision(&reloader, &mut sink, &counters, &metrics, &event);
                written += 1;
                if event.timestamp_ns > stop_ns {
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => {
                deadline_reached = tokio::time::Instant::now() >= deadline;
                break;
            }
        }
    }
    flush_decisions(&mut sink, &counters, &metrics);
    if deadline_reached {
        warn!(
            written,
            "decision events written at stop: the {}s deadline ended the drain (the rest stay \
             in the pinned ring buffer for the next agent)",
            STOP_DRAIN.as_secs()
        );
    } else {
        info!(written, "decision events written at stop");
    }
    if let Err(e) = sink.flush_all() {
        warn!(error = %e, "cannot write aggregated decision records");
    }
    let lost = take_losses(&enforcer, &mut losses);
    note_drops(
        &enforcer,
        &counters,
        &metrics,
        &config.state_dir,
        reported_drops,
    );
    write_losses(lost, &reloader, &mut sink, &counters, &metrics);
    if let Ok(mut enforcer) = enforcer.lock() {
        enforcer.forget_lost_denies(&losses.reported());
    }
    // The servers and tasks were told to stop with the loop; they share what is left of one
    // deadline, and whatever has not ended by then is cancelled.
    let deadline = deadline + STOP_TASKS;
    let _ = join_by(deadline, attest_task, "attestation").await;
    if let Some(task) = reaper_task {
        let _ = join_by(deadline, task, "connection reaper").await;
    }
    if let Some(task) = metrics_task {
        let _ = join_by(deadline, task, "metrics server").await;
    }
    if let Some(task) = oidc_task
        && let Some(Err(e)) = join_by(deadline, task, "OIDC listener").await
    {
        warn!(error = %e, "OIDC listener");
    }
    for (task, name) in [(api_task, "Workload API"), (admin_task, "admin API")] {
        if let Some(Err(e)) = join_by(deadline, task, name).await {
            warn!(error = %e, server = name, "API server");
        }
    }
    for socket in [&config.api_socket, &config.admin_socket] {
        let _ = std::fs::remove_file(socket);
    }
    info!(fail_open = config.fail_open, "stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard one (at most 65,536): the APIs' connection
/// budget (`credential::http::MAX_CONNECTIONS` each) then stays well under it, with room for
/// the maps, the logs and the pidfds.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let wanted = hard.min(65_536);
    if wanted > soft {
        match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
            Ok(()) => info!(from = soft, to = wanted, "open file limit raised"),
            Err(e) => warn!(error = %e, soft, "cannot raise the open file limit"),
        }
    }
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    if soft < 4 * crate::credential::MAX_API_CONNECTIONS as u64 {
        warn!(
            limit = soft,
            "the open file limit is low for the APIs' connection budget: raise LimitNOFILE"
        );
    }
}

/// How long a stop may spend writing the decisions queued before it.
const STOP_DRAIN: Duration = Duration::from_secs(3);
/// How much longer the servers and tasks may take to end after the drain (5 s in all).
const STOP_TASKS: Duration = Duration::from_secs(2);

/// Waits for `task` until `deadline`, then cancels it; its output if it ended.
async fn join_by<T>(
    deadline: tokio::time::Instant,
    mut task: tokio::task::JoinHandle<T>,
    name: &str,
) -> Option<T> {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(Ok(out)) => Some(out),
        Ok(Err(e)) => {
            warn!(error = %e, task = name, "task failed");
            None
        }
        Err(_) => {
            warn!(task = name, "still running at the stop deadline: cancelled");
            task.abort();
            None
        }
    }
}

/// Decision events written with one write(2) at most: enough to keep the syscalls per record
/// few under load, few enough that a burst does not hold up the event loop.
const EVENTS_PER_WRITE: usize = 256;

/// Writes (batched) the event's decision record; returns its decision id.
fn write_decision(
    enricher: &reload::Reloader,
    sink: &mut DecisionSink,
    counters: &Counters,
    metrics: &Metrics,
    event: &tessera_common::DecisionEvent,
) -> String {
    let record: DecisionRecord = enricher.enrich(event);
    counters.record(event);
    // Queued: `flush_decisions` writes the batch (a full batch is written at once).
    let written = sink.write_batched(&record);
    metrics.decision(&record, written.is_ok());
    if let Err(e) = written {
        // Losing a decision must be loud: count it and say so every time.
        note_unwritten(counters, metrics, e.records.saturating_sub(1));
        counters.sink_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, decision_id = %record.decision_id, "cannot write a decision record");
    }
    record.decision_id
}

/// Writes `record` at once (after what is batched), for the records the event loop makes
/// itself.
fn write_record(
    sink: &mut DecisionSink,
    counters: &Counters,
    metrics: &Metrics,
    record: &DecisionRecord,
) {
    let written = sink.write(record);
    metrics.decision(record, written.is_ok());
    if let Err(e) = written {
        // Losing a decision must be loud: count it and say so every time.
        counters.sink_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, decision_id = %record.decision_id, "cannot write a decision record");
    }
}

/// A connect allowed under a credential: its decision id goes into the kernel's record of the
/// socket, for the record written when the connection is ended.
fn note_connection(
    records: &kernel::ConnectionMaps,
    event: &tessera_common::DecisionEvent,
    decision_id: &str,
) {
    use tessera_common::{HOOK_CONNECT4, HOOK_CONNECT6, REASON_CREDENTIAL_VALID};
    if event.reason != REASON_CREDENTIAL_VALID
        || !matches!(event.hook, HOOK_CONNECT4 | HOOK_CONNECT6)
    {
        return;
    }
    let Ok(id) = uuid::Uuid::parse_str(decision_id) else {
        return;
    };
    if let Err(e) = records.set_decision_id(event.socket_cookie, id.into_bytes()) {
        warn!(error = %e, "cannot note a connection's decision id");
    }
}

/// The decision record of a connection ended with its credential (hook `connection`).
fn write_ended(
    enricher: &reload::Reloader,
    sink: &mut DecisionSink,
    counters: &Counters,
    metrics: &Metrics,
    ended: &connections::EndedConnection,
) {
    let event = connections::ended_event(ended, reload::policy_generation());
    let mut record: DecisionRecord = enricher.enrich(&event);
    connections::complete(&mut record, ended);
    counters.record(&event);
    write_record(sink, counters, metrics, &record);
}

/// Writes the decision records queued by `write_decision`.
fn flush_decisions(sink: &mut DecisionSink, counters: &Counters, metrics: &Metrics) {
    if let Err(e) = sink.flush_batch() {
        note_unwritten(counters, metrics, e.records);
        warn!(error = %e, "cannot write decision records");
    }
}

/// `records` decision records counted as written that did not reach the log.
fn note_unwritten(counters: &Counters, metrics: &Metrics, records: u64) {
    counters.sink_errors.fetch_add(records, Ordering::Relaxed);
    metrics.decision_log_errors(records);
}

/// The denies the kernel counted in `DENY_LOSSES` since the last look: their events did not fit
/// in the ring buffer.
fn take_losses(enforcer: &Mutex<Enforcer>, reporter: &mut LossReporter) -> Vec<Loss> {
    // A reload holds the lock while it swaps: look again next time rather than wait.
    match enforcer.try_lock() {
        Ok(e) => reporter.take(e.lost_denies()),
        Err(_) => Vec::new(),
    }
}

/// Writes lost denies as `lost` records, and says so loudly.
fn write_losses(
    lost: Vec<Loss>,
    enricher: &reload::Reloader,
    sink: &mut DecisionSink,
    counters: &Counters,
    metrics: &Metrics,
) {
    if lost.is_empty() {
        return;
    }
    let total: u64 = lost.iter().map(|l| l.count).sum();
    error!(
        denies = total,
        records = lost.len(),
        "the decision event ring buffer was full: denies were written as counted `lost` records"
    );
    for loss in lost {
        let record: DecisionRecord = enricher.enrich(&loss.event());
        let span = Duration::from_nanos(loss.last_ns.saturating_sub(loss.since_ns));
        let first = record.ts.checked_sub(span).unwrap_or(record.ts);
        let field = Lost {
            count: loss.count,
            first_ts: humantime::format_rfc3339_micros(first).to_string(),
            last_ts: humantime::format_rfc3339_micros(record.ts).to_string(),
        };
        counters.record_lost(loss.count);
        let written = sink.write_lost(&record, &field);
        metrics.lost_denies(&record, loss.count, written.is_ok());
        if let Err(e) = written {
            counters.sink_errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, decision_id = %record.decision_id, "cannot write a decision record");
        }
    }
}

/// Reads the kernel's drop counter into the status, the metrics and the state directory (so a
/// restarted agent does not report the same drops again); returns the total reported so far.
fn note_drops(
    enforcer: &Mutex<Enforcer>,
    counters: &Counters,
    metrics: &Metrics,
    state_dir: &Path,
    reported: u64,
) -> u64 {
    let total = check_drops(enforcer, counters, reported);
    metrics.set_ringbuf_dropped_total(total);
    if total != reported {
        reload::save_reported_drops(state_dir, total);
    }
    total
}

/// Reports events the kernel could not queue; returns the total reported so far.
fn check_drops(enforcer: &Mutex<Enforcer>, counters: &Counters, reported: u64) -> u64 {
    // A reload holds the lock while it swaps: check again next time rather than wait.
    let Ok(dropped) = enforcer.try_lock().map(|e| e.dropped_events()) else {
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

/// `cgroup` relative to the cgroup v2 root, as /proc/PID/cgroup writes it (`/` for the root).
fn relative_cgroup(cgroup: &Path, root: &Path) -> String {
    let relative = cgroup.strip_prefix(root).unwrap_or(cgroup);
    format!("/{}", relative.display()).replace("//", "/")
}

/// Rotates the signing key once it is `every` old, and prunes retired keys, until `stop`.
async fn key_schedule(
    service: Arc<CredentialService>,
    every: Option<std::time::Duration>,
    stop: impl std::future::Future<Output = ()>,
) {
    use std::time::Duration;
    tokio::pin!(stop);
    // Short enough that another agent's new key (--trust-bundle-dir) is served soon.
    let tick = every.map_or(Duration::from_secs(5), |e| {
        e.clamp(Duration::from_secs(1), Duration::from_secs(5))
    });
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(tick) => {}
        }
        // Also reads the other agents' keys from --trust-bundle-dir.
        service.prune_keys();
        if let Some(every) = every
            && service.key_age() >= every
            && let Err(e) = service.rotate_key()
        {
            warn!(error = %e, "scheduled key rotation failed; the current key keeps signing");
        }
    }
}

/// The issuer's trust domain: the policy's, when every document shares one.
fn issuer_domain(policy: &PolicySet) -> String {
    let mut domains = policy.workloads.iter().map(|w| w.spiffe_id.trust_domain());
    match domains.next() {
        Some(first) if domains.all(|d| d == first) => first.to_string(),
        _ => "tessera.local".to_string(),
    }
}
