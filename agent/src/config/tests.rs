use std::path::Path;
use std::time::Duration;

use clap::Parser as _;

use super::*;
use crate::cli::run::{ModeArg, resolve};
use crate::cli::{Cli, Command};

fn load(text: &str) -> Result<FileConfig, ConfigErrors> {
    FileConfig::from_bytes(Path::new("/etc/tessera/config.yaml"), text.as_bytes())
}

fn errors(text: &str) -> Vec<String> {
    load(text)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn run_args(argv: &[&str]) -> crate::cli::run::RunArgs {
    let mut full = vec!["tessera", "run"];
    full.extend_from_slice(argv);
    match Cli::try_parse_from(full).unwrap().command {
        Command::Run(args) => *args,
        other => panic!("not run: {other:?}"),
    }
}

#[test]
fn the_shipped_default_is_valid_and_complete() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.yaml");
    let c = FileConfig::load(&path).unwrap();
    assert_eq!(
        c.policies,
        Some(vec![PathBuf::from("/etc/tessera/policies")])
    );
    assert_eq!(
        c.decision_log.as_deref(),
        Some("/var/log/tessera/decisions.jsonl")
    );
    assert_eq!(c.decision_log_max_size, Some(100 << 20));
    assert_eq!(c.decision_log_max_age, Some(Duration::from_secs(86400)));
    assert_eq!(c.decision_log_keep, Some(5));
    assert_eq!(
        c.api_socket,
        Some(PathBuf::from("/run/tessera/workload.sock"))
    );
    assert_eq!(
        c.metrics_listen,
        Some(Some("127.0.0.1:9477".parse().unwrap()))
    );
    assert_eq!(c.fail_open, Some(false));
    assert_eq!(
        c.rate_limit,
        Some(crate::credential::RateLimitSetting(Some(
            crate::credential::RateLimit::DEFAULT
        )))
    );
    assert_eq!(c.rate_limit_burst, Some(400));
}

#[test]
fn every_setting_is_read() {
    let c = load(
        "policies: [p1.yaml, /abs/dir]\ncgroup: /tessera-demo\nmode: audit\n\
         decisionLog:\n  path: '-'\n  maxSize: 10MB\n  maxAge: 1h\n  keep: 3\n  aggregateAllows: 10s\n\
         apiSocket: /tmp/a.sock\nadminSocket: /tmp/b.sock\nstateDir: /tmp/state\n\
         dnsServer: 127.0.0.53:53\nlogFormat: json\nfailOpen: true\nmetrics:\n  listen: 'off'\n",
    )
    .unwrap();
    // Relative policy paths are relative to the configuration file.
    assert_eq!(
        c.policies,
        Some(vec![
            PathBuf::from("/etc/tessera/p1.yaml"),
            PathBuf::from("/abs/dir")
        ])
    );
    assert_eq!(c.cgroup, Some(PathBuf::from("/tessera-demo")));
    assert_eq!(c.mode.as_deref(), Some("audit"));
    assert_eq!(c.decision_log.as_deref(), Some("-"));
    assert_eq!(c.decision_log_max_size, Some(10_000_000));
    assert_eq!(c.decision_log_max_age, Some(Duration::from_secs(3600)));
    assert_eq!(c.decision_log_keep, Some(3));
    assert_eq!(
        c.decision_log_aggregate_allows,
        Some(Duration::from_secs(10))
    );
    assert_eq!(c.dns_server, Some("127.0.0.53:53".parse().unwrap()));
    assert_eq!(c.log_format.as_deref(), Some("json"));
    assert_eq!(c.fail_open, Some(true));
    assert_eq!(c.metrics_listen, Some(None));
}

#[test]
fn empty_or_comment_only_file_sets_nothing() {
    assert_eq!(load("").unwrap().policies, None);
    assert_eq!(load("# nothing here\n\n").unwrap().mode, None);
}

#[test]
fn unknown_keys_are_refused_with_place_and_fix() {
    let e = errors("policies: [a]\npolicy_dir: /x\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("/etc/tessera/config.yaml:2:1: unknown setting `policy_dir`"),
        "{e:?}"
    );
    assert!(e[0].contains(" — allowed here: "), "{e:?}");
    assert!(e[0].contains("decisionLog"), "{e:?}");
    let e = errors("decisionLog:\n  path: /x\n  rotate: yes\n");
    assert!(
        e[0].starts_with("/etc/tessera/config.yaml:3:3: unknown setting `rotate`"),
        "{e:?}"
    );
    assert!(e[0].contains("maxSize"), "{e:?}");
}

#[test]
fn bad_values_are_all_reported_in_order() {
    let e = errors(
        "mode: block\nlogFormat: xml\ndnsServer: 1.2.3.4\ndecisionLog:\n  maxSize: 10 parsecs\n  \
         maxAge: soon\n  keep: 0\n  aggregateAllows: 0s\nmetrics:\n  listen: localhost\n",
    );
    let expected = [
        ("1:7", "unknown mode `block`"),
        ("2:12", "unknown logFormat `xml`"),
        ("3:12", "dnsServer `1.2.3.4` is not an address with a port"),
        ("5:12", "unknown size unit"),
        ("6:11", "`soon` is not a duration"),
        ("7:9", "keep must be at least 1"),
        ("8:20", "aggregateAllows must be longer than 0s"),
        ("10:11", "`localhost` is not an address with a port"),
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (err, (place, what)) in e.iter().zip(expected) {
        assert!(
            err.starts_with(&format!("/etc/tessera/config.yaml:{place}: {what}")),
            "{err} (expected {place}: {what})"
        );
        assert!(err.contains(" — "), "{err}");
    }
}

#[test]
fn wrong_types_and_syntax_point_at_the_place() {
    let e = errors("policies: /etc/tessera/policies\n");
    assert!(e[0].starts_with("/etc/tessera/config.yaml:1:"), "{e:?}");
    assert!(e[0].contains("expected"), "{e:?}");
    let e = errors("metrics:\n  listen: [1\n");
    assert!(e[0].starts_with("/etc/tessera/config.yaml:"), "{e:?}");
    let e = errors("failOpen: perhaps\n");
    assert!(e[0].starts_with("/etc/tessera/config.yaml:1:11"), "{e:?}");
}

#[test]
fn flags_override_the_file_which_overrides_defaults() {
    let file = load(
        "policies: [/from/file]\nmode: audit\napiSocket: /file/api.sock\n\
         decisionLog:\n  path: /file/log\n  keep: 2\nmetrics:\n  listen: 127.0.0.1:1\n",
    )
    .unwrap();
    let (c, _) = resolve(&run_args(&[]), &file);
    assert_eq!(c.policies, vec![PathBuf::from("/from/file")]);
    assert_eq!(c.mode, Some(ModeArg::Audit));
    assert_eq!(c.api_socket, PathBuf::from("/file/api.sock"));
    assert_eq!(c.decision_log, "/file/log");
    assert_eq!(c.decision_log_options.keep, 2);
    assert_eq!(c.decision_log_options.max_size, 100 << 20);
    assert_eq!(c.metrics_addr, Some("127.0.0.1:1".parse().unwrap()));
    assert_eq!(
        c.admin_socket,
        PathBuf::from(crate::cli::DEFAULT_ADMIN_SOCKET)
    );
    assert!(!c.fail_open);

    let (c, _) = resolve(
        &run_args(&[
            "--policy",
            "/flag/p",
            "--mode",
            "enforce",
            "--decision-log-keep",
            "9",
            "--metrics-addr",
            "off",
            "--decision-log-max-size",
            "1KiB",
            "--fail-open",
        ]),
        &file,
    );
    assert_eq!(c.policies, vec![PathBuf::from("/flag/p")]);
    assert_eq!(c.mode, Some(ModeArg::Enforce));
    assert_eq!(c.decision_log_options.keep, 9);
    assert_eq!(c.decision_log_options.max_size, 1024);
    assert_eq!(c.metrics_addr, None);
    assert!(c.fail_open);
    // Still from the file.
    assert_eq!(c.api_socket, PathBuf::from("/file/api.sock"));

    let (c, format) = resolve(&run_args(&[]), &FileConfig::default());
    assert_eq!(
        c.policies,
        vec![PathBuf::from(crate::cli::DEFAULT_POLICY_DIR)]
    );
    assert_eq!(c.metrics_addr, Some(DEFAULT_METRICS_ADDR.parse().unwrap()));
    assert_eq!(c.decision_log, crate::cli::DEFAULT_DECISION_LOG);
    assert_eq!(format, crate::cli::run::LogFormatArg::Plain);
}

#[test]
fn sizes_and_listeners_parse() {
    assert_eq!(parse_size("0"), Ok(0));
    assert_eq!(parse_size("512KiB"), Ok(512 << 10));
    assert_eq!(parse_size("2 GB"), Ok(2_000_000_000));
    assert!(parse_size("MiB").is_err());
    assert!(parse_size("99999999999999GiB").is_err());
    assert_eq!(parse_listen("off"), Ok(None));
    assert_eq!(
        parse_listen("[::1]:9477"),
        Ok(Some("[::1]:9477".parse().unwrap()))
    );
    assert!(parse_listen("9477").is_err());
}

#[test]
fn the_cgroup_namespace_comes_from_flag_file_or_default() {
    use crate::cli::run::cgroup_namespace;
    use crate::daemon::cgroupns::CgroupNamespace;
    let file = load("cgroupNamespace: host\n").unwrap();
    assert_eq!(file.cgroup_namespace, Some(CgroupNamespace::Host));
    assert_eq!(
        cgroup_namespace(&run_args(&[]), &file),
        CgroupNamespace::Host
    );
    assert_eq!(
        cgroup_namespace(&run_args(&["--cgroup-namespace", "inherit"]), &file),
        CgroupNamespace::Inherit
    );
    assert_eq!(
        cgroup_namespace(&run_args(&[]), &FileConfig::default()),
        CgroupNamespace::Inherit
    );
    let e = errors("cgroupNamespace: private\n");
    assert!(
        e[0].starts_with("/etc/tessera/config.yaml:1:18: unknown cgroupNamespace `private`"),
        "{e:?}"
    );
    assert!(e[0].contains("write host"), "{e:?}");
}

#[test]
fn the_rate_limit_comes_from_flag_file_or_default() {
    use crate::credential::RateLimit;
    let second = Duration::from_secs(1);
    let (c, _) = resolve(&run_args(&[]), &FileConfig::default());
    assert_eq!(c.rate_limit, Some(RateLimit::DEFAULT));
    let file = load("rateLimit: 600/m\nrateLimitBurst: 50\n").unwrap();
    let (c, _) = resolve(&run_args(&[]), &file);
    assert_eq!(
        c.rate_limit,
        Some(RateLimit {
            count: 600,
            per: Duration::from_secs(60),
            burst: 50
        })
    );
    // The flag's rate with the file's burst; without a burst, twice the rate.
    let (c, _) = resolve(&run_args(&["--rate-limit", "5/s"]), &file);
    assert_eq!(
        c.rate_limit,
        Some(RateLimit {
            count: 5,
            per: second,
            burst: 50
        })
    );
    let (c, _) = resolve(&run_args(&["--rate-limit", "5/s"]), &FileConfig::default());
    assert_eq!(c.rate_limit.map(|l| l.burst), Some(10));
    for off in ["off", "0"] {
        let (c, _) = resolve(&run_args(&["--rate-limit", off]), &file);
        assert_eq!(c.rate_limit, None, "{off}");
    }
    let file = load("rateLimit: off\n").unwrap();
    assert_eq!(resolve(&run_args(&[]), &file).0.rate_limit, None);

    let e = errors("rateLimit: fast\nrateLimitBurst: 0\n");
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with("/etc/tessera/config.yaml:1:12: `fast` is not a rate"),
        "{e:?}"
    );
    assert!(e[0].contains("200/s"), "{e:?}");
    assert!(
        e[1].starts_with("/etc/tessera/config.yaml:2:17: rateLimitBurst must be at least 1"),
        "{e:?}"
    );
    let bad = crate::cli::Cli::try_parse_from(["tessera", "run", "--rate-limit", "lots"]);
    assert!(bad.is_err());
}

#[test]
fn the_issuer_and_the_oidc_listener_come_from_flag_or_file() {
    let c = load(
        "issuer: https://oidc.example.org/td\noidc:\n  listen: 0.0.0.0:8443\n  \
         cert: /etc/tessera/oidc.pem\n  key: /etc/tessera/oidc.key\n",
    )
    .unwrap();
    assert_eq!(
        c.issuer.as_ref().map(|i| i.as_str()),
        Some("https://oidc.example.org/td")
    );
    assert_eq!(c.oidc_listen, Some(Some("0.0.0.0:8443".parse().unwrap())));
    assert_eq!(c.oidc_cert, Some(PathBuf::from("/etc/tessera/oidc.pem")));
    let (config, _) = resolve(&run_args(&[]), &c);
    assert_eq!(config.oidc.addr, Some("0.0.0.0:8443".parse().unwrap()));
    assert_eq!(
        config.oidc.key,
        Some(PathBuf::from("/etc/tessera/oidc.key"))
    );
    assert!(!config.oidc.plain_http);
    // Flags win: another issuer, the listener off.
    let (config, _) = resolve(
        &run_args(&[
            "--issuer",
            "https://other.example.org",
            "--oidc-addr",
            "off",
        ]),
        &c,
    );
    assert_eq!(
        config.issuer.map(|i| i.to_string()).as_deref(),
        Some("https://other.example.org")
    );
    assert_eq!(config.oidc.addr, None);
    // Without either: no issuer (the spiffe:// default) and no listener.
    let (config, _) = resolve(&run_args(&[]), &load("").unwrap());
    assert_eq!(config.issuer, None);
    assert_eq!(config.oidc, crate::credential::oidc::OidcListen::default());

    let e =
        errors("issuer: http://oidc.example.org\noidc:\n  listen: everywhere\n  plainHttp: true\n");
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with(
            "/etc/tessera/config.yaml:1:9: issuer `http://oidc.example.org` is not an https:// URL"
        ),
        "{}",
        e[0]
    );
    assert!(
        e[1].starts_with("/etc/tessera/config.yaml:3:11: "),
        "{}",
        e[1]
    );
    assert!(
        Cli::try_parse_from(["tessera", "run", "--issuer", "spiffe://x/y"]).is_err(),
        "a spiffe:// --issuer is refused"
    );
}

#[test]
fn connection_end_comes_from_flag_file_or_default() {
    use crate::cli::run::ConnectionEndArg;
    let (c, _) = resolve(&run_args(&[]), &FileConfig::default());
    assert_eq!(c.connection_end, ConnectionEndArg::Auto);
    let file = load("connectionEnd: packet-drop\n").unwrap();
    assert_eq!(
        resolve(&run_args(&[]), &file).0.connection_end,
        ConnectionEndArg::PacketDrop
    );
    let (c, _) = resolve(&run_args(&["--connection-end", "sock-diag"]), &file);
    assert_eq!(c.connection_end, ConnectionEndArg::SockDiag);
    let e = errors("connectionEnd: reset\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("/etc/tessera/config.yaml:1:16: unknown connectionEnd `reset`"),
        "{e:?}"
    );
    assert!(e[0].contains("packet-drop"), "{e:?}");
}

#[test]
fn the_kubernetes_trust_bundle_comes_from_flag_or_file() {
    let (c, _) = resolve(&run_args(&[]), &FileConfig::default());
    assert_eq!(c.trust_bundle_k8s, None, "off by default");
    let own = load("trustBundleK8s: {}\n").unwrap();
    assert_eq!(own.trust_bundle_k8s, Some(None));
    let named = load("trustBundleK8s:\n  namespace: tessera\n").unwrap();
    assert_eq!(named.trust_bundle_k8s, Some(Some("tessera".to_owned())));
    assert_eq!(
        resolve(&run_args(&[]), &named).0.trust_bundle_k8s,
        Some(Some("tessera".to_owned()))
    );
    // The flag without a value: the agent's own namespace; with one, that namespace.
    let (c, _) = resolve(&run_args(&["--trust-bundle-k8s"]), &named);
    assert_eq!(c.trust_bundle_k8s, Some(None));
    let (c, _) = resolve(&run_args(&["--trust-bundle-k8s", "bundles"]), &named);
    assert_eq!(c.trust_bundle_k8s, Some(Some("bundles".to_owned())));
    let e = errors("trustBundleK8s:\n  namespace: Not_A_Namespace\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(
            "/etc/tessera/config.yaml:2:14: trustBundleK8s.namespace `Not_A_Namespace` is not a namespace name"
        ),
        "{e:?}"
    );
    let e = errors("trustBundleK8s:\n  namespaces: tessera\n");
    assert_eq!(e.len(), 1, "{e:?}");
}
