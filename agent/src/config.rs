//! The configuration file of `tessera run` (default `/etc/tessera/config.yaml`): the same
//! settings as the flags, in YAML. Flags and `TESSERA_*` variables override it; built-in
//! defaults fill in what neither gives. Errors read like policy errors:
//! `FILE:LINE:COL: what is wrong — how to fix it`, all of them at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

mod parse;
#[cfg(test)]
mod tests;

pub use parse::{Listen, parse_listen, parse_listen_arg, parse_size};

/// Where `tessera run` looks when `--config` is not given (read only when the file exists).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/tessera/config.yaml";
/// The metrics and health listener when nothing else is said.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

type S<T> = Spanned<T>;

/// The file exactly as written; every field optional (absent = not set here).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    policies: Option<S<Vec<S<String>>>>,
    cgroup: Option<S<String>>,
    cgroup_namespace: Option<S<String>>,
    mode: Option<S<String>>,
    decision_log: Option<S<RawDecisionLog>>,
    api_socket: Option<S<String>>,
    admin_socket: Option<S<String>>,
    state_dir: Option<S<String>>,
    signing_algorithm: Option<S<String>>,
    key_rotation: Option<S<String>>,
    trust_bundle_dir: Option<S<String>>,
    trust_bundle_k8s: Option<S<RawTrustBundleK8s>>,
    issuer: Option<S<String>>,
    oidc: Option<S<RawOidc>>,
    dns_server: Option<S<String>>,
    log_format: Option<S<String>>,
    fail_open: Option<S<bool>>,
    metrics: Option<S<RawMetrics>>,
    rate_limit: Option<S<String>>,
    rate_limit_burst: Option<S<i64>>,
    connection_end: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDecisionLog {
    path: Option<S<String>>,
    max_size: Option<S<String>>,
    max_age: Option<S<String>>,
    keep: Option<S<i64>>,
    aggregate_allows: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOidc {
    listen: Option<S<String>>,
    cert: Option<S<String>>,
    key: Option<S<String>>,
    plain_http: Option<S<bool>>,
}

/// `trustBundleK8s: { namespace: NS }` (`{}`: the agent's own namespace).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTrustBundleK8s {
    namespace: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMetrics {
    listen: Option<S<String>>,
}

/// What the file sets, validated. `None`: the file does not say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub policies: Option<Vec<PathBuf>>,
    pub cgroup: Option<PathBuf>,
    /// `host`, `inherit` or a namespace file: the cgroup namespace cgroup paths are read in.
    pub cgroup_namespace: Option<crate::daemon::cgroupns::CgroupNamespace>,
    /// `enforce` or `audit`.
    pub mode: Option<String>,
    /// A path, `-` (stdout) or `journald`.
    pub decision_log: Option<String>,
    pub decision_log_max_size: Option<u64>,
    pub decision_log_max_age: Option<Duration>,
    pub decision_log_keep: Option<u32>,
    pub decision_log_aggregate_allows: Option<Duration>,
    pub api_socket: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// `ES256` (the default) or `EdDSA`.
    pub signing_algorithm: Option<crate::credential::SigningAlgorithm>,
    /// Rotate the signing key once it is this old.
    pub key_rotation: Option<Duration>,
    /// `--trust-bundle-dir`.
    pub trust_bundle_dir: Option<PathBuf>,
    /// `--trust-bundle-k8s`: `Some(None)` is the agent's own namespace.
    pub trust_bundle_k8s: Option<Option<String>>,
    /// `issuer`: the `iss` of tokens, an https:// URL (OIDC discovery).
    pub issuer: Option<crate::credential::oidc::Issuer>,
    /// `oidc.listen`; `Some(None)`: switched off (`listen: off`).
    pub oidc_listen: Option<Option<SocketAddr>>,
    pub oidc_cert: Option<PathBuf>,
    pub oidc_key: Option<PathBuf>,
    pub oidc_plain_http: Option<bool>,
    pub dns_server: Option<SocketAddr>,
    /// `plain` or `json`.
    pub log_format: Option<String>,
    /// `auto`, `sock-diag` or `packet-drop` (checked).
    pub connection_end: Option<String>,
    /// Detach the programs on shutdown.
    pub fail_open: Option<bool>,
    /// `Some(None)`: metrics switched off (`listen: off`).
    pub metrics_listen: Option<Option<SocketAddr>>,
    /// Credential requests a workload may make (`rateLimit`; `Some(None)`: off).
    pub rate_limit: Option<crate::credential::RateLimitSetting>,
    /// Their burst (`rateLimitBurst`).
    pub rate_limit_burst: Option<u32>,
    /// The file it came from (relative policy paths are relative to its directory).
    pub source: Option<PathBuf>,
}

/// Problems in a configuration file, as `FILE:LINE:COL: message — hint`: the same type as a
/// policy's errors.
pub use crate::located::{LocatedError as ConfigError, LocatedErrors as ConfigErrors};

impl FileConfig {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<FileConfig, ConfigErrors> {
        let bytes = std::fs::read(file).map_err(|e| {
            ConfigErrors(vec![ConfigError::at(
                file,
                Location::UNKNOWN,
                format!("cannot read the configuration file: {e}"),
                "check the path and its permissions, or leave --config out",
            )])
        })?;
        Self::from_bytes(file, &bytes)
    }

    /// Validates a configuration already read; `file` names it in errors.
    pub fn from_bytes(file: &Path, bytes: &[u8]) -> Result<FileConfig, ConfigErrors> {
        let text = String::from_utf8_lossy(bytes);
        let only_comments = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
        if only_comments {
            return Ok(FileConfig {
                source: Some(file.to_path_buf()),
                ..FileConfig::default()
            });
        }
        let raw: S<RawConfig> = serde_saphyr::from_str(&text)
            .map_err(|e| ConfigErrors(vec![parse::yaml_error(file, &e)]))?;
        let mut errors = Vec::new();
        let config = parse::validate(file, raw.value, &mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors(errors))
        }
    }
}
