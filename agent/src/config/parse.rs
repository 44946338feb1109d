//! Validation of the raw configuration, and the value syntaxes it shares with the flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::Location;

use super::{ConfigError, FileConfig, RawConfig, S};
use crate::daemon::cgroupns::CgroupNamespace;

const FIELDS: &str = "policies, cgroup, cgroupNamespace, mode, decisionLog, apiSocket, adminSocket, stateDir, \
                      signingAlgorithm, keyRotation, trustBundleDir, trustBundleK8s, issuer, oidc, dnsServer, logFormat, failOpen, metrics, rateLimit, rateLimitBurst, connectionEnd";

pub(super) fn validate(file: &Path, raw: RawConfig, errors: &mut Vec<ConfigError>) -> FileConfig {
    let mut out = FileConfig {
        source: Some(file.to_path_buf()),
        ..FileConfig::default()
    };
    let err = |loc: Location, message: String, hint: &str| {
        ConfigError::at(file, loc, message, hint.to_owned())
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let path = |s: &S<String>, what: &str, errors: &mut Vec<ConfigError>| -> Option<PathBuf> {
        if s.value.trim().is_empty() {
            errors.push(err(
                s.referenced,
                format!("{what} is empty"),
                "give a path, or remove the key to use the default",
            ));
            return None;
        }
        Some(PathBuf::from(&s.value))
    };

    if let Some(list) = raw.policies {
        if list.value.is_empty() {
            errors.push(err(
                list.referenced,
                "policies is an empty list".into(),
                "name at least one policy file or directory, or remove the key for /etc/tessera/policies",
            ));
        }
        let mut paths = Vec::new();
        for p in &list.value {
            if let Some(pb) = path(p, "a policy path", errors) {
                // Relative to the configuration file, as a person reading it would expect.
                paths.push(if pb.is_relative() { base.join(pb) } else { pb });
            }
        }
        out.policies = Some(paths);
    }
    if let Some(c) = raw.cgroup {
        out.cgroup = path(&c, "cgroup", errors);
    }
    if let Some(n) = raw.cgroup_namespace {
        match CgroupNamespace::parse(&n.value) {
            Some(mode) => out.cgroup_namespace = Some(mode),
            None => errors.push(err(
                n.referenced,
                format!("unknown cgroupNamespace `{}`", n.value),
                "write host (enter the host's cgroup namespace, for a DaemonSet), inherit, or the \
                 absolute path of a namespace file such as /proc/1/ns/cgroup",
            )),
        }
    }
    if let Some(m) = raw.mode {
        match m.value.as_str() {
            "enforce" | "audit" => out.mode = Some(m.value.clone()),
            other => errors.push(err(
                m.referenced,
                format!("unknown mode `{other}`"),
                "write enforce or audit, or remove the key to keep each rule's own mode",
            )),
        }
    }
    if let Some(c) = raw.connection_end {
        match c.value.as_str() {
            "auto" | "sock-diag" | "packet-drop" => out.connection_end = Some(c.value.clone()),
            other => errors.push(err(
                c.referenced,
                format!("unknown connectionEnd `{other}`"),
                "write auto, sock-diag or packet-drop, or remove the key for auto",
            )),
        }
    }
    if let Some(f) = raw.log_format {
        match f.value.as_str() {
            "plain" | "json" => out.log_format = Some(f.value.clone()),
            other => errors.push(err(
                f.referenced,
                format!("unknown logFormat `{other}`"),
                "write plain or json",
            )),
        }
    }
    if let Some(s) = raw.api_socket {
        out.api_socket = path(&s, "apiSocket", errors);
    }
    if let Some(s) = raw.admin_socket {
        out.admin_socket = path(&s, "adminSocket", errors);
    }
    if let Some(s) = raw.state_dir {
        out.state_dir = path(&s, "stateDir", errors);
    }
    if let Some(a) = raw.signing_algorithm {
        match a.value.parse() {
            Ok(alg) => out.signing_algorithm = Some(alg),
            Err(e) => errors.push(err(
                a.referenced,
                e,
                "ES256 is what SPIFFE clients accept; EdDSA only for servers that ask for it",
            )),
        }
    }
    if let Some(d) = raw.trust_bundle_dir {
        out.trust_bundle_dir = path(&d, "trustBundleDir", errors);
    }
    if let Some(k) = raw.trust_bundle_k8s {
        let namespace = k.value.namespace.and_then(|n| {
            let valid = crate::credential::bundle_k8s::is_dns_label(&n.value);
            if !valid {
                errors.push(err(
                    n.referenced,
                    format!("trustBundleK8s.namespace `{}` is not a namespace name", n.value),
                    "write at most 63 lowercase letters, digits and '-', or leave namespace out for the agent's own",
                ));
            }
            valid.then_some(n.value)
        });
        out.trust_bundle_k8s = Some(namespace);
    }
    if let Some(i) = raw.issuer {
        match i.value.parse() {
            Ok(issuer) => out.issuer = Some(issuer),
            Err(e) => errors.push(err(
                i.referenced,
                e,
                "or remove the key for the default spiffe://<trust domain>/tessera-agent",
            )),
        }
    }
    if let Some(o) = raw.oidc {
        let o = o.value;
        if let Some(l) = &o.listen {
            match parse_listen(&l.value) {
                Ok(a) => out.oidc_listen = Some(a),
                Err(e) => errors.push(err(
                    l.referenced,
                    e,
                    "write IP:PORT (e.g. 0.0.0.0:8443), or off to serve no OIDC discovery",
                )),
            }
        }
        if let Some(c) = &o.cert {
            out.oidc_cert = path(c, "oidc.cert", errors);
        }
        if let Some(k) = &o.key {
            out.oidc_key = path(k, "oidc.key", errors);
        }
        out.oidc_plain_http = o.plain_http.map(|p| p.value);
    }
    if let Some(k) = raw.key_rotation {
        match humantime::parse_duration(&k.value) {
            Ok(d) => out.key_rotation = Some(d),
            Err(e) => errors.push(err(
                k.referenced,
                format!("keyRotation `{}` is not a duration: {e}", k.value),
                "write a duration like 24h or 7d, or remove the key to rotate only on command",
            )),
        }
    }
    if let Some(d) = raw.dns_server {
        match d.value.parse::<SocketAddr>() {
            Ok(a) => out.dns_server = Some(a),
            Err(_) => errors.push(err(
                d.referenced,
                format!("dnsServer `{}` is not an address with a port", d.value),
                "write IP:PORT, e.g. 127.0.0.53:53 or [::1]:53",
            )),
        }
    }
    out.fail_open = raw.fail_open.map(|f| f.value);
    if let Some(m) = raw.metrics
        && let Some(l) = &m.value.listen
    {
        match parse_listen(&l.value) {
            Ok(a) => out.metrics_listen = Some(a),
            Err(e) => errors.push(err(
                l.referenced,
                e,
                "write IP:PORT (e.g. 127.0.0.1:9477), or off to serve no metrics",
            )),
        }
    }
    if let Some(r) = raw.rate_limit {
        match r.value.parse() {
            Ok(limit) => out.rate_limit = Some(limit),
            Err(e) => errors.push(err(
                r.referenced,
                e,
                "write how many credential requests a workload may make, e.g. 200/s or 600/m, \
                 or off for no limit",
            )),
        }
    }
    if let Some(b) = raw.rate_limit_burst {
        match u32::try_from(b.value) {
            Ok(n) if n >= 1 => out.rate_limit_burst = Some(n),
            _ => errors.push(err(
                b.referenced,
                format!("rateLimitBurst must be at least 1, found {}", b.value),
                "write how many requests a workload may make at once, e.g. 400, or remove the \
                 key for twice the rate",
            )),
        }
    }
    if let Some(d) = raw.decision_log {
        let d = d.value;
        if let Some(p) = &d.path {
            if p.value.trim().is_empty() {
                errors.push(err(
                    p.referenced,
                    "decisionLog.path is empty".into(),
                    "give a file path, - for stdout or journald",
                ));
            } else {
                out.decision_log = Some(p.value.clone());
            }
        }
        if let Some(s) = &d.max_size {
            match parse_size(&s.value) {
                Ok(n) => out.decision_log_max_size = Some(n),
                Err(e) => errors.push(err(
                    s.referenced,
                    e,
                    "write a size such as 100MiB, 512KiB or 1GB (0 never rotates by size)",
                )),
            }
        }
        if let Some(s) = &d.max_age {
            match parse_duration(&s.value) {
                Ok(v) => out.decision_log_max_age = Some(v),
                Err(e) => errors.push(err(
                    s.referenced,
                    e,
                    "write a duration such as 24h, 30m or 7days (0s never rotates by age)",
                )),
            }
        }
        if let Some(k) = &d.keep {
            match u32::try_from(k.value) {
                Ok(n) if n >= 1 => out.decision_log_keep = Some(n),
                _ => errors.push(err(
                    k.referenced,
                    format!("keep must be at least 1, found {}", k.value),
                    "write how many rotated files to keep, e.g. 5",
                )),
            }
        }
        if let Some(s) = &d.aggregate_allows {
            match parse_duration(&s.value) {
                Ok(v) if !v.is_zero() => out.decision_log_aggregate_allows = Some(v),
                Ok(_) => errors.push(err(
                    s.referenced,
                    "aggregateAllows must be longer than 0s".into(),
                    "write an interval such as 10s, or remove the key to log every allow",
                )),
                Err(e) => errors.push(err(s.referenced, e, "write an interval such as 10s or 1m")),
            }
        }
    }
    out
}

/// `off` (or empty) switches the listener off; anything else must be IP:PORT.
pub fn parse_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "" | "off" | "none" => Ok(None),
        t => t
            .parse::<SocketAddr>()
            .map(Some)
            .map_err(|_| format!("`{s}` is not an address with a port")),
    }
}

/// A metrics listener as a flag or variable gives it: an address, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

pub fn parse_listen_arg(s: &str) -> Result<Listen, String> {
    parse_listen(s).map(Listen)
}

/// A byte size: a whole number with an optional unit (B, K/KB/KiB, M/MB/MiB, G/GB/GiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("`{s}` is not a duration ({e})"))
}

/// Turns a serde-saphyr error into ours, saying how to fix the common ones.
pub(super) fn yaml_error(file: &Path, err: &serde_saphyr::Error) -> ConfigError {
    crate::located::yaml_error(file, err, |field, expected| {
        let allowed = if expected.len() > 6 {
            FIELDS.to_owned()
        } else {
            expected.join(", ")
        };
        (
            format!("unknown setting `{field}`"),
            format!("allowed here: {allowed} (see packaging/config.yaml)"),
        )
    })
}
