//! `tessera run`: the daemon in the foreground. Settings come from, highest first: flags,
//! `TESSERA_*` environment variables, the configuration file (`--config`, default
//! /etc/tessera/config.yaml when present), built-in defaults.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use crate::{
    config::{self, FileConfig},
    credential::{RateLimit, RateLimitSetting},
    daemon::{
        self, DaemonConfig,
        cgroupns::{self, CgroupNamespace},
    },
    decision::SinkOptions,
    telemetry::{self, LogFormat},
};

#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {
    /// Configuration file (YAML, the same settings as these flags; flags and TESSERA_*
    /// variables override it). Default: /etc/tessera/config.yaml when it exists.
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective settings (after file, environment and flags) as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Policy file or directory (its *.yaml files); repeatable. [default: /etc/tessera/policies]
    #[arg(long = "policy", env = "TESSERA_POLICY")]
    pub policies: Vec<PathBuf>,
    /// The cgroup to enforce on (it and everything below it): a path under the cgroup v2 mount,
    /// or relative to it (`/tessera-demo`). Default: the cgroup v2 root, i.e. the whole host.
    #[arg(long, env = "TESSERA_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// The cgroup namespace cgroup paths are read in: `host` enters the host's (PID 1's) at
    /// start, for a container with a cgroup namespace of its own (a Kubernetes DaemonSet;
    /// needs hostPID and CAP_SYS_ADMIN); `inherit` keeps the agent's own and warns when it is
    /// not the host's; a path (`/proc/PID/ns/cgroup`) enters that namespace. [default: inherit]
    #[arg(long, env = "TESSERA_CGROUP_NAMESPACE", value_parser = cgroupns::parse_arg)]
    pub cgroup_namespace: Option<CgroupNamespace>,
    /// Force every rule into this mode; by default each rule's own mode applies.
    #[arg(long, value_enum, env = "TESSERA_MODE")]
    pub mode: Option<ModeArg>,
    /// Where decisions are written (JSON lines): a file, `-` for stdout or `journald`.
    /// [default: /var/log/tessera/decisions.jsonl]
    #[arg(long, env = "TESSERA_DECISION_LOG")]
    pub decision_log: Option<String>,
    /// Rotate the decision log file before it grows past this size (e.g. 100MiB; 0: never).
    /// [default: 100MiB]
    #[arg(long, env = "TESSERA_DECISION_LOG_MAX_SIZE", value_parser = config::parse_size)]
    pub decision_log_max_size: Option<u64>,
    /// Rotate the decision log file once it is this old (e.g. 24h). [default: never]
    #[arg(long, env = "TESSERA_DECISION_LOG_MAX_AGE", value_parser = humantime::parse_duration)]
    pub decision_log_max_age: Option<Duration>,
    /// Rotated decision log files kept (FILE.1 … FILE.N). [default: 5]
    #[arg(long, env = "TESSERA_DECISION_LOG_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
    pub decision_log_keep: Option<u32>,
    /// Write allows of one (workload, endpoint) once per this interval, with their count
    /// (e.g. 10s). Denies are always written one by one. [default: every allow]
    #[arg(long, env = "TESSERA_DECISION_LOG_AGGREGATE_ALLOWS", value_parser = humantime::parse_duration)]
    pub decision_log_aggregate_allows: Option<Duration>,
    /// The Workload API socket (mode 0666: every local process may ask).
    /// [default: /run/tessera/workload.sock]
    #[arg(long, env = "TESSERA_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
    /// The admin socket for `tessera revoke` and `tessera status` (mode 0600: root only).
    /// [default: /run/tessera/admin.sock]
    #[arg(long, env = "TESSERA_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Where the signing key lives (created 0700; the key 0600). [default: /var/lib/tessera]
    #[arg(long, env = "TESSERA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How tokens are signed: ES256 (P-256 ECDSA, what JWT-SVID clients accept) or EdDSA
    /// (Ed25519, for servers that want it). Each has its own key in the state directory.
    /// [default: ES256]
    #[arg(long, env = "TESSERA_SIGNING_ALGORITHM")]
    pub signing_algorithm: Option<crate::credential::SigningAlgorithm>,
    /// Rotate the signing key once it is this old (e.g. 24h); `tessera rotate-key` rotates
    /// at once. [default: never]
    #[arg(long, env = "TESSERA_KEY_ROTATION", value_parser = humantime::parse_duration)]
    pub key_rotation: Option<Duration>,
    /// A directory shared by the trust domain's agents: each writes its public keys there
    /// (atomically, its own file) and serves the union of all. [default: none]
    #[arg(long, env = "TESSERA_TRUST_BUNDLE_DIR")]
    pub trust_bundle_dir: Option<PathBuf>,
    /// Share the trust domain's keys through the Kubernetes API: publish this agent's public
    /// keys in a ConfigMap of its own (`tessera-bundle-$NODE_NAME`) in NAMESPACE (default: the
    /// agent's own namespace) and serve the union of every ConfigMap there labelled
    /// `tessera.dev/trust-bundle=<trust domain>` (the in-cluster config, or the kubeconfig
    /// KUBECONFIG names). [default: off]
    #[arg(long, env = "TESSERA_TRUST_BUNDLE_K8S", value_name = "NAMESPACE", num_args = 0..=1,
          default_missing_value = "")]
    pub trust_bundle_k8s: Option<String>,
    /// The `iss` of every token, as an https:// URL (e.g. https://oidc.example.org) that
    /// verifiers can discover: <issuer>/.well-known/openid-configuration, served by
    /// --oidc-addr or from `tessera bundle export`. [default: spiffe://<trust domain>/tessera-agent]
    #[arg(long, env = "TESSERA_ISSUER", value_parser = parse_issuer)]
    pub issuer: Option<crate::credential::oidc::Issuer>,
    /// Serve OIDC discovery (the discovery document and the trust domain's JWKS, under the
    /// --issuer URL's path) on IP:PORT, over HTTPS from --oidc-cert and --oidc-key, or `off`.
    /// [default: off]
    #[arg(long, env = "TESSERA_OIDC_ADDR", value_parser = config::parse_listen_arg,
          overrides_with = "oidc_addr")]
    pub oidc_addr: Option<config::Listen>,
    /// The OIDC listener's certificate chain (PEM, server certificate first); reread on SIGHUP.
    #[arg(long, env = "TESSERA_OIDC_CERT")]
    pub oidc_cert: Option<PathBuf>,
    /// The OIDC listener's private key (PEM); reread on SIGHUP.
    #[arg(long, env = "TESSERA_OIDC_KEY")]
    pub oidc_key: Option<PathBuf>,
    /// Serve OIDC discovery over plain HTTP, for a reverse proxy on this host that terminates
    /// TLS: only on a loopback --oidc-addr. [default: false]
    #[arg(long, env = "TESSERA_OIDC_PLAIN_HTTP", num_args = 0..=1, default_missing_value = "true")]
    pub oidc_plain_http: Option<bool>,
    /// DNS server (IP:PORT) that resolves endpoint `hosts:`. [default: the system's resolver
    /// configuration, /etc/resolv.conf]
    #[arg(long, env = "TESSERA_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Operational log format on stderr. [default: plain]
    #[arg(long, value_enum, env = "TESSERA_LOG_FORMAT")]
    pub log_format: Option<LogFormatArg>,
    /// On shutdown, detach the programs (calls go through unchecked until the agent is back).
    /// By default the pinned programs keep enforcing while the agent is down. [default: false]
    #[arg(long, env = "TESSERA_FAIL_OPEN", num_args = 0..=1, default_missing_value = "true")]
    pub fail_open: Option<bool>,
    /// Where /metrics, /healthz and /readyz are served (IP:PORT), or `off`.
    /// [default: 127.0.0.1:9477]
    #[arg(long, env = "TESSERA_METRICS_ADDR", value_parser = config::parse_listen_arg,
          overrides_with = "metrics_addr")]
    pub metrics_addr: Option<config::Listen>,
    /// Credential requests each workload may make on the Workload API: `N/s` or `N/m`, or
    /// `off`; past it a request gets 429 with `Retry-After`. [default: 200/s]
    #[arg(long, env = "TESSERA_RATE_LIMIT")]
    pub rate_limit: Option<RateLimitSetting>,
    /// How many of them a workload may make at once (the token bucket's size).
    /// [default: twice the rate]
    #[arg(long, env = "TESSERA_RATE_LIMIT_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: Option<u32>,
    /// Also take policies from the Kubernetes custom resources TesseraPolicy and
    /// TesseraNamespacedPolicy (list+watch through the in-cluster config, or the kubeconfig
    /// KUBECONFIG names), merged with the policy files; each resource's status says whether
    /// it was accepted, and why not. [default: false]
    #[arg(long, env = "TESSERA_K8S_POLICIES", num_args = 0..=1, default_missing_value = "true")]
    pub k8s_policies: Option<bool>,
    /// How a connection whose credential was revoked or expired is ended: `sock-diag`
    /// (SOCK_DESTROY: a TCP reset, a UDP socket disconnected), `packet-drop` (the kernel
    /// refuses the socket's packets both ways; for kernels without SOCK_DESTROY), or `auto`:
    /// sock-diag where the kernel has it, else packet-drop. [default: auto]
    #[arg(long, value_enum, env = "TESSERA_CONNECTION_END")]
    pub connection_end: Option<ConnectionEndArg>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionEndArg {
    #[default]
    Auto,
    SockDiag,
    PacketDrop,
}

fn parse_issuer(s: &str) -> Result<crate::credential::oidc::Issuer, String> {
    s.parse()
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Enforce,
    Audit,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormatArg {
    Plain,
    Json,
}

/// What must happen before the async runtime (and so any other thread) exists: entering the
/// host's cgroup namespace (`--cgroup-namespace host`), a per-thread attribute that threads
/// inherit from their creator. Errors are printed; the exit code is returned.
pub fn before_runtime(args: &RunArgs) -> Result<(), ExitCode> {
    if args.print_config {
        return Ok(());
    }
    // A refused file is reported by `run` with every error; nothing to enter then.
    let Ok(file) = load_file(args.config.as_deref()) else {
        return Ok(());
    };
    match cgroupns::enter(&cgroup_namespace(args, &file)) {
        Ok(_) => Ok(()),
        Err(e) => {
            eprintln!("tessera run: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// `--cgroup-namespace` over `cgroupNamespace:` over `inherit`.
pub fn cgroup_namespace(args: &RunArgs, file: &FileConfig) -> CgroupNamespace {
    args.cgroup_namespace
        .clone()
        .or_else(|| file.cgroup_namespace.clone())
        .unwrap_or_default()
}

pub async fn run(args: RunArgs) -> ExitCode {
    let file = match load_file(args.config.as_deref()) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("tessera run: the configuration is refused:\n{e}");
            return ExitCode::from(2);
        }
    };
    let (config, log_format) = resolve(&args, &file);
    if args.print_config {
        let mut described = describe(&config, log_format, &file);
        described["cgroupNamespace"] = cgroup_namespace(&args, &file).describe().into();
        println!("{described:#}");
        return ExitCode::SUCCESS;
    }
    telemetry::init(match log_format {
        LogFormatArg::Plain => LogFormat::Plain,
        LogFormatArg::Json => LogFormat::Json,
    });
    if let Some(source) = &file.source {
        tracing::info!(config = %source.display(), "configuration file read");
    }
    if let Err(e) = cgroupns::report(&cgroup_namespace(&args, &file)) {
        eprintln!("tessera run: {e}");
        return ExitCode::FAILURE;
    }
    match daemon::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The causes say what to fix (a verifier log, a path, an errno).
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("tessera run: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `--config FILE` must exist; without it, the default file is read only when present.
pub fn load_file(explicit: Option<&Path>) -> Result<FileConfig, config::ConfigErrors> {
    match explicit {
        Some(path) => FileConfig::load(path),
        None if Path::new(config::DEFAULT_CONFIG_FILE).exists() => {
            FileConfig::load(Path::new(config::DEFAULT_CONFIG_FILE))
        }
        None => Ok(FileConfig::default()),
    }
}

/// Flags and environment (already merged by clap) over the file over the defaults.
pub fn resolve(args: &RunArgs, file: &FileConfig) -> (DaemonConfig, LogFormatArg) {
    let mode = args.mode.or(match file.mode.as_deref() {
        Some("enforce") => Some(ModeArg::Enforce),
        Some("audit") => Some(ModeArg::Audit),
        _ => None,
    });
    let log_format = args.log_format.unwrap_or(match file.log_format.as_deref() {
        Some("json") => LogFormatArg::Json,
        _ => LogFormatArg::Plain,
    });
    let defaults = SinkOptions::default();
    let config = DaemonConfig {
        policies: if args.policies.is_empty() {
            file.policies
                .clone()
                .unwrap_or_else(|| vec![PathBuf::from(super::DEFAULT_POLICY_DIR)])
        } else {
            args.policies.clone()
        },
        cgroup: args.cgroup.clone().or_else(|| file.cgroup.clone()),
        mode,
        decision_log: args
            .decision_log
            .clone()
            .or_else(|| file.decision_log.clone())
            .unwrap_or_else(|| super::DEFAULT_DECISION_LOG.to_owned()),
        api_socket: args
            .api_socket
            .clone()
            .or_else(|| file.api_socket.clone())
            .unwrap_or_else(|| super::DEFAULT_API_SOCKET.into()),
        admin_socket: args
            .admin_socket
            .clone()
            .or_else(|| file.admin_socket.clone())
            .unwrap_or_else(|| super::DEFAULT_ADMIN_SOCKET.into()),
        state_dir: args
            .state_dir
            .clone()
            .or_else(|| file.state_dir.clone())
            .unwrap_or_else(|| super::DEFAULT_STATE_DIR.into()),
        decision_log_options: SinkOptions {
            max_size: args
                .decision_log_max_size
                .or(file.decision_log_max_size)
                .unwrap_or(defaults.max_size),
            max_age: args
                .decision_log_max_age
                .or(file.decision_log_max_age)
                .filter(|d| !d.is_zero()),
            keep: args
                .decision_log_keep
                .or(file.decision_log_keep)
                .unwrap_or(defaults.keep),
            aggregate_allows: args
                .decision_log_aggregate_allows
                .or(file.decision_log_aggregate_allows)
                .filter(|d| !d.is_zero()),
        },
        metrics_addr: args
            .metrics_addr
            .map(|l| l.0)
            .or(file.metrics_listen)
            .unwrap_or_else(|| config::DEFAULT_METRICS_ADDR.parse().ok()),
        signing_algorithm: args
            .signing_algorithm
            .or(file.signing_algorithm)
            .unwrap_or_default(),
        key_rotation: args
            .key_rotation
            .or(file.key_rotation)
            .filter(|d| !d.is_zero()),
        trust_bundle_dir: args
            .trust_bundle_dir
            .clone()
            .or_else(|| file.trust_bundle_dir.clone()),
        trust_bundle_k8s: match args.trust_bundle_k8s.as_deref() {
            Some("") => Some(None),
            Some(namespace) => Some(Some(namespace.to_owned())),
            None => file.trust_bundle_k8s.clone(),
        },
        issuer: args.issuer.clone().or_else(|| file.issuer.clone()),
        oidc: crate::credential::oidc::OidcListen {
            addr: args.oidc_addr.map(|l| l.0).or(file.oidc_listen).flatten(),
            cert: args.oidc_cert.clone().or_else(|| file.oidc_cert.clone()),
            key: args.oidc_key.clone().or_else(|| file.oidc_key.clone()),
            plain_http: args
                .oidc_plain_http
                .or(file.oidc_plain_http)
                .unwrap_or(false),
        },
        dns_server: args.dns_server.or(file.dns_server),
        fail_open: args.fail_open.or(file.fail_open).unwrap_or(false),
        rate_limit: rate_limit(args, file),
        k8s_policies: args.k8s_policies.unwrap_or(false),
        connection_end: args
            .connection_end
            .or(match file.connection_end.as_deref() {
                Some("sock-diag") => Some(ConnectionEndArg::SockDiag),
                Some("packet-drop") => Some(ConnectionEndArg::PacketDrop),
                _ => None,
            })
            .unwrap_or_default(),
    };
    (config, log_format)
}

/// `--rate-limit` over `rateLimit:` over the default; the burst likewise, over twice the rate.
fn rate_limit(args: &RunArgs, file: &FileConfig) -> Option<RateLimit> {
    let limit = args
        .rate_limit
        .or(file.rate_limit)
        .unwrap_or(RateLimitSetting(Some(RateLimit::DEFAULT)))
        .0?;
    Some(match args.rate_limit_burst.or(file.rate_limit_burst) {
        Some(burst) => limit.with_burst(burst),
        None => limit,
    })
}

/// The effective settings, in the configuration file's vocabulary.
fn describe(c: &DaemonConfig, log_format: LogFormatArg, file: &FileConfig) -> serde_json::Value {
    serde_json::json!({
        "configFile": file.source.as_ref().map(|p| p.display().to_string()),
        "policies": c.policies.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "cgroup": c.cgroup.as_ref().map(|p| p.display().to_string()),
        "mode": c.mode.map(|m| match m { ModeArg::Enforce => "enforce", ModeArg::Audit => "audit" }),
        "decisionLog": {
            "path": c.decision_log,
            "maxSize": c.decision_log_options.max_size,
            "maxAge": c.decision_log_options.max_age.map(|d| humantime::format_duration(d).to_string()),
            "keep": c.decision_log_options.keep,
            "aggregateAllows": c.decision_log_options.aggregate_allows.map(|d| humantime::format_duration(d).to_string()),
        },
        "apiSocket": c.api_socket.display().to_string(),
        "adminSocket": c.admin_socket.display().to_string(),
        "stateDir": c.state_dir.display().to_string(),
        "signingAlgorithm": c.signing_algorithm.as_str(),
        "trustBundleDir": c.trust_bundle_dir.as_ref().map(|p| p.display().to_string()),
        "trustBundleK8s": c.trust_bundle_k8s.as_ref().map(|ns| serde_json::json!({ "namespace": ns })),
        "keyRotation": c.key_rotation.map(|d| humantime::format_duration(d).to_string()),
        "issuer": c.issuer.as_ref().map(|i| i.to_string()),
        "oidc": {
            "listen": c.oidc.addr.map(|a| a.to_string()),
            "cert": c.oidc.cert.as_ref().map(|p| p.display().to_string()),
            "key": c.oidc.key.as_ref().map(|p| p.display().to_string()),
            "plainHttp": c.oidc.plain_http,
        },
        "dnsServer": c.dns_server.map(|a| a.to_string()),
        "failOpen": c.fail_open,
        "logFormat": match log_format { LogFormatArg::Plain => "plain", LogFormatArg::Json => "json" },
        "metrics": { "listen": c.metrics_addr.map(|a| a.to_string()) },
        "rateLimit": c.rate_limit.map(|l| format!("{}/{}", l.count, if l.per.as_secs() == 60 { "m" } else { "s" })),
        "rateLimitBurst": c.rate_limit.map(|l| l.burst),
        "connectionEnd": match c.connection_end {
            ConnectionEndArg::Auto => "auto",
            ConnectionEndArg::SockDiag => "sock-diag",
            ConnectionEndArg::PacketDrop => "packet-drop",
        },
    })
}
