//! Policy: workloads, protected endpoints and the rules between them, loaded from YAML files
//! (DESIGN 4.2) and validated into the types the rest of the agent uses.
//!
//! Everything here has been checked: names are unique, references resolve, selectors are
//! unambiguous, no two rules cover the same (workload, endpoint) pair. Ids are indexes into
//! the set's vectors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::identity::selectors::Selectors;
use crate::identity::spiffe::SpiffeId;

mod attested;
pub mod crd;
pub mod issuance;
pub mod issuers;
mod load;
mod raw;
pub mod resources;
mod validate;

pub use crate::located::{LocatedError as PolicyError, LocatedErrors as PolicyErrors};
pub use issuance::{IssuanceId, IssuanceModule};
pub use issuers::{TokenMatch, TrustedIssuer};

/// A validated policy: every loaded file, merged.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySet {
    /// `sha256:<hex>` over the loaded files' bytes, in path order.
    pub revision: String,
    /// Index = `WorkloadId.0`.
    pub workloads: Vec<Workload>,
    /// Index = `EndpointId.0`.
    pub endpoints: Vec<Endpoint>,
    /// Index = `RuleId.0`.
    pub rules: Vec<Rule>,
    /// The documents' issuance modules (`spec.issuance`); index = `IssuanceId.0`.
    pub issuance: Vec<Arc<IssuanceModule>>,
    /// Every document's `spec.trustedIssuers` (names and `issuer`s unique across the set).
    pub trusted_issuers: Vec<Arc<TrustedIssuer>>,
    /// The files loaded, in load order.
    pub sources: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u32);

/// A set of processes sharing an identity, chosen by selectors (at least one is set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub spiffe_id: SpiffeId,
    /// Its whole `match:` (at least one selector; validated and normalised: a cgroup is an
    /// absolute path relative to the cgroup v2 root, `/a/b`, `/` the root, matching that
    /// cgroup and its subtree; hashes and container IDs are lower case).
    pub selectors: Selectors,
    /// `egress:`; `Open` when not written.
    pub egress: Egress,
    /// Its document's `spec.mode`: applies to the denies no rule covers (raw and packet
    /// sockets, destinations outside an egress allow-list).
    pub mode: Mode,
}

/// What a workload may reach besides its rules' endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    /// Every destination that no endpoint protects.
    #[default]
    Open,
    /// Only the endpoints its rules allow: any other destination is denied
    /// (`egress_not_allowlisted`).
    Allowlist,
}

/// A protected destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub kind: EndpointKind,
    /// Host bits are zero. `addresses` and `hosts` are not both empty.
    pub addresses: Vec<ipnet::IpNet>,
    /// Names the agent resolves (A and AAAA) and protects at run time; unique.
    pub hosts: Vec<HostName>,
    /// Other names a token for this endpoint may carry as its `aud` (a JWT-SVID audience such
    /// as `vault.example.org`); unique across endpoints' names and audiences.
    pub audiences: Vec<String>,
    /// Empty = every port.
    pub ports: Vec<u16>,
    pub protocol: Protocol,
    /// Its document's `spec.mode`.
    pub mode: Mode,
    /// `labels:`, free keys and values that issuance modules see (e.g. `sensitivity: high`).
    pub labels: BTreeMap<String, String>,
}

/// A DNS name, as an endpoint's `hosts` lists it: lower case, without the trailing dot, labels
/// of 1 to 63 letters, digits and `-` (not first or last), at most 253 characters, not an IP
/// address. It is resolved as an absolute name: search domains do not apply.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostName {
    /// What is wrong with the name.
    type Err = String;

    fn from_str(text: &str) -> Result<HostName, String> {
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        if name.is_empty() {
            return Err("the name is empty".into());
        }
        if name.len() > 253 {
            return Err("the name is longer than 253 characters".into());
        }
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Err("it is an IP address, not a name".into());
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(format!("label `{label}` is not 1 to 63 characters long"));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
            {
                return Err(format!("label `{label}` has the character {c:?}"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!("label `{label}` starts or ends with `-`"));
            }
        }
        if name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
        {
            return Err("its last label is all digits".into());
        }
        Ok(HostName(name))
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which workloads may reach which endpoints, and on what terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub workloads: Vec<WorkloadId>,
    pub endpoints: Vec<EndpointId>,
    /// `None` when no credential is required (the pair is allowlisted).
    pub credential: Option<CredentialPolicy>,
    pub mode: Mode,
    /// `scopes:`, what its endpoints offer under it (unique; empty: the token carries none).
    pub scopes: Vec<String>,
    /// Its document's issuance module, which decides each credential request after the rule.
    pub issuance: Option<IssuanceId>,
    /// `match.token`: a credential request must carry a matching evidence token.
    pub token_match: Option<TokenMatch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CredentialPolicy {
    /// Greater than zero, at most 24 hours.
    pub max_ttl: Duration,
    pub bind: Bind,
    /// `keepOnExec: true`: a `bind: process` grant survives an exec of a different executable
    /// (otherwise it ends there). Always false for other binds.
    pub keep_on_exec: bool,
    /// The rule's `connections:`: what becomes of a connection when its credential ends.
    pub connections: ConnectionLifetime,
}

/// A rule's `connections:`, for the sockets connected under one of its credentials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionLifetime {
    /// The agent ends the socket once its holder holds no valid credential for the endpoint
    /// (revoked or expired; a renewal before expiry keeps it).
    #[default]
    EndWithCredential,
    /// The socket stays open (for clients that cannot reconnect).
    Outlive,
}

/// What a credential's kernel grant is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bind {
    /// The process (tgid) that asked for it.
    Process,
    /// The process that asked for it and the children it forks after issuance (inherited in
    /// the kernel).
    ProcessTree,
    /// Every process of the workload.
    Workload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Deny what the policy does not allow.
    Enforce,
    /// Allow, but log what would have been denied.
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointKind {
    SecretStore,
    Api,
    Other,
}

impl PolicySet {
    /// Loads and validates policy files. Each path is a file or a directory (its `*.yaml` and
    /// `*.yml` files, sorted by name, not recursive). Finding no file at all is an error.
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
        load::load(paths)
    }

    /// Reads the policy files `paths` name, as [`PolicySet::load`] does, for
    /// [`PolicySet::from_sources`]; finding none is not an error here.
    pub fn read_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<u8>)>, PolicyErrors> {
        load::read(paths)
    }

    /// Validates sources already read (files, or renderings of Kubernetes resources named
    /// like `TesseraPolicy/NAME`) as one set; the revision covers their bytes in this order.
    pub fn from_sources(texts: &[(PathBuf, Vec<u8>)]) -> Result<PolicySet, PolicyErrors> {
        load::from_texts(texts)
    }

    /// Validates one file's text, as if loaded from `file`.
    pub fn from_str(file: &Path, text: &str) -> Result<PolicySet, PolicyErrors> {
        load::from_texts(&[(file.to_path_buf(), text.as_bytes().to_vec())])
    }

    /// Panics if `id` is not from this set.
    pub fn workload(&self, id: WorkloadId) -> &Workload {
        &self.workloads[id.0 as usize]
    }

    /// Panics if `id` is not from this set.
    pub fn endpoint(&self, id: EndpointId) -> &Endpoint {
        &self.endpoints[id.0 as usize]
    }

    /// Panics if `id` is not from this set.
    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id.0 as usize]
    }

    /// Panics if `id` is not from this set.
    pub fn issuance_module(&self, id: IssuanceId) -> &Arc<IssuanceModule> {
        &self.issuance[id.0 as usize]
    }

    /// The trusted issuer whose tokens carry `iss`.
    pub fn trusted_issuer(&self, iss: &str) -> Option<&Arc<TrustedIssuer>> {
        self.trusted_issuers.iter().find(|t| t.issuer == iss)
    }

    pub fn workload_by_name(&self, name: &str) -> Option<(WorkloadId, &Workload)> {
        find(&self.workloads, |w| w.name == name).map(|(i, w)| (WorkloadId(i), w))
    }

    pub fn endpoint_by_name(&self, name: &str) -> Option<(EndpointId, &Endpoint)> {
        find(&self.endpoints, |e| e.name == name).map(|(i, e)| (EndpointId(i), e))
    }

    /// The endpoint a token audience names: by its name, or one of its `audiences:`.
    pub fn endpoint_by_audience(&self, audience: &str) -> Option<(EndpointId, &Endpoint)> {
        self.endpoint_by_name(audience).or_else(|| {
            find(&self.endpoints, |e| {
                e.audiences.iter().any(|a| a == audience)
            })
            .map(|(i, e)| (EndpointId(i), e))
        })
    }

    pub fn workload_by_spiffe_id(&self, id: &SpiffeId) -> Option<(WorkloadId, &Workload)> {
        find(&self.workloads, |w| w.spiffe_id == *id).map(|(i, w)| (WorkloadId(i), w))
    }

    /// The rule covering (`w`, `e`); validation guarantees there is at most one.
    pub fn rule_for(&self, w: WorkloadId, e: EndpointId) -> Option<(RuleId, &Rule)> {
        find(&self.rules, |r| {
            r.workloads.contains(&w) && r.endpoints.contains(&e)
        })
        .map(|(i, r)| (RuleId(i), r))
    }

    /// The workload a process maps to, with the kernel's precedence: candidates are workloads
    /// whose `cgroup` (if set) is the process's cgroup or an ancestor of it, and whose `uid`
    /// (if set) equals `uid`; the deepest cgroup wins; at equal depth one with `uid` beats one
    /// without; a workload without `cgroup` ranks below all with one. `cgroup_path` is relative
    /// to the cgroup v2 root, like `/tessera-demo/payments` (`/` is the root).
    pub fn match_workload(&self, cgroup_path: &str, uid: u32) -> Option<WorkloadId> {
        let process_cgroup = cgroup_path.trim_end_matches('/');
        self.workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.selectors.uid.is_none_or(|u| u == uid))
            .filter_map(|(i, w)| {
                let rank = match &w.selectors.cgroup {
                    None => (false, 0, w.selectors.uid.is_some()),
                    Some(c) if cgroup_contains(c, process_cgroup) => {
                        (true, cgroup_depth(c), w.selectors.uid.is_some())
                    }
                    Some(_) => return None,
                };
                Some((rank, std::cmp::Reverse(i)))
            })
            .max()
            .map(|(_, std::cmp::Reverse(i))| WorkloadId(index_u32(i)))
    }
}

/// Whether `process` (no trailing `/`; `""` is the root) is `ancestor` or below it.
fn cgroup_contains(ancestor: &str, process: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    match process.strip_prefix(ancestor) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn cgroup_depth(normalised: &str) -> usize {
    normalised.split('/').filter(|s| !s.is_empty()).count()
}

fn find<T>(items: &[T], pred: impl Fn(&T) -> bool) -> Option<(u32, &T)> {
    items
        .iter()
        .enumerate()
        .find(|(_, item)| pred(item))
        .map(|(i, item)| (index_u32(i), item))
}

/// Ids are u32 (the kernel's width); no policy holds 2^32 items (its YAML would not fit in memory).
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl Bind {
    pub fn as_str(self) -> &'static str {
        match self {
            Bind::Process => "process",
            Bind::ProcessTree => "process-tree",
            Bind::Workload => "workload",
        }
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        }
    }
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::SecretStore => "secret-store",
            EndpointKind::Api => "api",
            EndpointKind::Other => "other",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Mode, Bind, Protocol, EndpointKind);

macro_rules! display_id {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
display_id!(WorkloadId, EndpointId, RuleId);

#[cfg(test)]
mod tests;
