//! Turns a validated `PolicySet` into the entries of the kernel's policy maps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use tessera_common::{
    ANY_CGROUP, ANY_PORT, ANY_UID, CIDR_KEY_HEADER_BITS, CONFIG_EGRESS_ALLOWLIST,
    CONFIG_RESTRICTED, EndpointCidrKey, EndpointKey, EndpointValue, MODE_AUDIT, MODE_ENFORCE,
    PROTO_TCP, PROTO_UDP, RULE_CONNECTIONS_OUTLIVE, RULE_CREDENTIAL_REQUIRED, RuleKey, RuleValue,
    WORKLOAD_EGRESS_ALLOWLIST, WORKLOAD_MODE_AUDIT, WORKLOAD_RESTRICTED, WorkloadKey,
    WorkloadValue, capacity,
};

use super::{KernelError, scope};
use crate::kernel::KernelIds;
use crate::policy::{
    ConnectionLifetime, Egress, EndpointId, Mode, PolicySet, Protocol, RuleId, Workload, WorkloadId,
};

/// The policy maps' contents. CIDR keys are `(prefix length, data)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledPolicy {
    pub exact: HashMap<EndpointKey, EndpointValue>,
    pub cidr: HashMap<(u32, EndpointCidrKey), EndpointValue>,
    pub workloads: HashMap<WorkloadKey, WorkloadValue>,
    pub rules: HashMap<RuleKey, RuleValue>,
    /// `Config::flags` (`CONFIG_*`).
    pub config_flags: u32,
    pub warnings: Vec<SyncWarning>,
    /// The cgroups `workloads` is keyed by (policy paths, relative to the cgroup v2 root).
    pub cgroup_paths: BTreeMap<u64, String>,
    /// Those cgroups opened, deepest first, for `WORKLOAD_CGROUPS` ([`Self::open_cgroups`]).
    pub cgroup_dirs: CgroupDirs,
    /// Endpoint names by kernel id, for warnings about entries derived later (local endpoints).
    pub endpoint_names: BTreeMap<u32, String>,
}

/// Open cgroup directories, deepest first: `(id, descriptor)`. Equal when the ids are.
#[derive(Clone, Debug, Default)]
pub struct CgroupDirs(pub Vec<(u64, Arc<OwnedFd>)>);

impl PartialEq for CgroupDirs {
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .map(|(id, _)| id)
            .eq(other.0.iter().map(|(id, _)| id))
    }
}

impl CompiledPolicy {
    /// Opens the cgroups of `cgroup_paths` under `cgroup_root`, deepest first, at most
    /// `capacity::WORKLOAD_CGROUPS` (a cgroup that is gone, or that another took the place of,
    /// is left out: the next sync sees it again).
    pub fn open_cgroups(&mut self, cgroup_root: &Path) {
        let mut dirs: Vec<(usize, u64, Arc<OwnedFd>)> = Vec::new();
        for (&id, path) in &self.cgroup_paths {
            let relative = path.trim_start_matches('/');
            let full = cgroup_root.join(relative);
            let Ok(dir) = std::fs::File::open(&full) else {
                continue;
            };
            if dir.metadata().map(|m| m.ino()).ok() != Some(id) {
                continue;
            }
            let depth = relative.split('/').filter(|p| !p.is_empty()).count();
            dirs.push((depth, id, Arc::new(OwnedFd::from(dir))));
        }
        dirs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        dirs.truncate(capacity::WORKLOAD_CGROUPS as usize);
        self.cgroup_dirs = CgroupDirs(dirs.into_iter().map(|(_, id, fd)| (id, fd)).collect());
    }
}

/// Something in the policy that the kernel will not enforce as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncWarning {
    /// The workload's cgroup does not exist (yet): the workload is not written until the next
    /// sync after the cgroup appears (the daemon watches for it).
    MissingCgroup {
        workload: String,
        cgroup: String,
        error: String,
    },
    /// Two endpoints cover the same destination; the first one wins.
    OverlappingEndpoints {
        kept: String,
        ignored: String,
        destination: String,
    },
    /// A local endpoint is not extended to a local destination that another endpoint's own
    /// addresses decide (see `kernel::local`).
    LocalGivesWay {
        endpoint: String,
        holder: String,
        destination: String,
    },
    /// Several local endpoints reach a local destination none of them names: it is denied to
    /// every workload.
    LocalContested {
        endpoints: Vec<String>,
        destination: String,
    },
}

impl fmt::Display for SyncWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncWarning::MissingCgroup {
                workload,
                cgroup,
                error,
            } => write!(
                f,
                "workload {workload} skipped: cgroup {cgroup} cannot be resolved ({error}); \
                 the agent syncs the policy again as soon as it appears (checked every second)"
            ),
            SyncWarning::OverlappingEndpoints {
                kept,
                ignored,
                destination,
            } => write!(
                f,
                "endpoints {kept} and {ignored} both cover {destination}; {kept} is enforced there"
            ),
            SyncWarning::LocalGivesWay {
                endpoint,
                holder,
                destination,
            } => write!(
                f,
                "local endpoint {endpoint} also reaches {destination}, which endpoint {holder} \
                 names: {holder} is enforced there"
            ),
            SyncWarning::LocalContested {
                endpoints,
                destination,
            } => write!(
                f,
                "local endpoints {} all reach {destination} and none names it: it is denied to \
                 every workload; name it in one endpoint's addresses to give it to that one",
                endpoints.join(", ")
            ),
        }
    }
}

/// Compiles `policy`; `resolve_cgroup` maps a workload's cgroup path (`/a/b`, relative to
/// the cgroup v2 root) to its cgroup id. Kernel ids are `KernelIds::of(policy)`: stable by
/// name once the daemon loaded its table, positions otherwise.
pub fn compile(
    policy: &PolicySet,
    resolve_cgroup: impl Fn(&str) -> Result<u64, KernelError>,
) -> CompiledPolicy {
    let ids = KernelIds::of(policy);
    let mut out = CompiledPolicy::default();
    // Every cgroup resolved, for the tracing programs' `WORKLOAD_CGROUPS`.
    let resolved = std::cell::RefCell::new(BTreeMap::new());
    let resolve_cgroup = |path: &str| {
        let id = resolve_cgroup(path)?;
        resolved.borrow_mut().insert(id, path.to_owned());
        Ok(id)
    };
    for (pos, endpoint) in (0u32..).zip(&policy.endpoints) {
        let value = EndpointValue {
            endpoint_id: ids.endpoint(EndpointId(pos)),
            mode: mode(endpoint.mode),
        };
        out.endpoint_names
            .insert(value.endpoint_id, endpoint.name.clone());
        let protocols: &[u8] = match endpoint.protocol {
            Protocol::Tcp => &[PROTO_TCP],
            Protocol::Udp => &[PROTO_UDP],
            Protocol::Any => &[PROTO_TCP, PROTO_UDP],
        };
        let ports: &[u16] = if endpoint.ports.is_empty() {
            &[ANY_PORT]
        } else {
            &endpoint.ports
        };
        for net in &endpoint.addresses {
            for &protocol in protocols {
                for &port in ports {
                    out.add_endpoint(policy, &ids, net, port, protocol, value);
                }
            }
        }
    }
    let in_rules: HashSet<u32> = policy
        .rules
        .iter()
        .flat_map(|r| r.workloads.iter().map(|w| w.0))
        .collect();
    let mut scopes = Vec::new();
    for (pos, workload) in (0u32..).zip(&policy.workloads) {
        let scope = scope::Scope {
            cgroup: workload.selectors.cgroup.clone(),
            uid: workload.selectors.uid,
        };
        let flags = workload_flags(workload, in_rules.contains(&pos));
        if workload.needs_attestation() {
            // The agent attests its processes and writes their identities; the kernel only
            // learns where to wait for them.
            config_flags_of(&mut out, flags);
            scopes.push(scope);
            continue;
        }
        let cgroup_id = match &workload.selectors.cgroup {
            None => ANY_CGROUP,
            Some(path) => match resolve_cgroup(path) {
                Ok(cgroup_id) => cgroup_id,
                Err(error) => {
                    out.warnings.push(SyncWarning::MissingCgroup {
                        workload: workload.name.clone(),
                        cgroup: path.to_string(),
                        error: error_chain(&error),
                    });
                    continue;
                }
            },
        };
        let key = WorkloadKey {
            cgroup_id,
            uid: workload.selectors.uid.unwrap_or(ANY_UID),
            _pad: 0,
        };
        config_flags_of(&mut out, flags);
        // Validation refuses two workloads with the same selectors.
        out.workloads.entry(key).or_insert(WorkloadValue {
            workload_id: ids.workload(WorkloadId(pos)),
            flags,
        });
    }
    scope::mark(&mut out, &scopes, &resolve_cgroup);
    for (pos, rule) in (0u32..).zip(&policy.rules) {
        let value = RuleValue {
            rule_id: ids.rule(RuleId(pos)),
            flags: match rule.credential {
                Some(c) if c.connections == ConnectionLifetime::Outlive => {
                    RULE_CREDENTIAL_REQUIRED | RULE_CONNECTIONS_OUTLIVE
                }
                Some(_) => RULE_CREDENTIAL_REQUIRED,
                None => 0,
            },
            mode: mode(rule.mode),
            _pad: 0,
        };
        for workload in &rule.workloads {
            for endpoint in &rule.endpoints {
                let key = RuleKey {
                    workload_id: ids.workload(*workload),
                    endpoint_id: ids.endpoint(*endpoint),
                };
                out.rules.entry(key).or_insert(value);
            }
        }
    }
    let keyed: HashSet<u64> = out.workloads.keys().map(|k| k.cgroup_id).collect();
    out.cgroup_paths = resolved
        .into_inner()
        .into_iter()
        .filter(|(id, _)| keyed.contains(id))
        .collect();
    out
}

impl CompiledPolicy {
    fn add_endpoint(
        &mut self,
        policy: &PolicySet,
        ids: &KernelIds,
        net: &IpNet,
        port: u16,
        protocol: u8,
        value: EndpointValue,
    ) {
        let addr = mapped(net.network());
        let existing = if net.prefix_len() == net.max_prefix_len() {
            let key = EndpointKey {
                addr,
                port,
                protocol,
                _pad: 0,
            };
            *self.exact.entry(key).or_insert(value)
        } else {
            let prefix = match net {
                IpNet::V4(v4) => 96 + u32::from(v4.prefix_len()),
                IpNet::V6(v6) => u32::from(v6.prefix_len()),
            };
            let key = EndpointCidrKey {
                protocol,
                _pad: 0,
                port_be: port.to_be(),
                addr,
            };
            *self
                .cidr
                .entry((CIDR_KEY_HEADER_BITS + prefix, key))
                .or_insert(value)
        };
        if existing.endpoint_id != value.endpoint_id {
            let name = |id: u32| {
                ids.endpoint_id(id)
                    .map_or_else(|| format!("#{id}"), |e| policy.endpoint(e).name.clone())
            };
            let proto = if protocol == PROTO_TCP { "tcp" } else { "udp" };
            self.warnings.push(SyncWarning::OverlappingEndpoints {
                kept: name(existing.endpoint_id),
                ignored: name(value.endpoint_id),
                destination: format!("{net} port {port} {proto}"),
            });
        }
    }

    /// Entries per map, to check against the maps' capacities.
    pub fn len(&self) -> usize {
        self.exact.len() + self.cidr.len() + self.workloads.len() + self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `WORKLOAD_*` flags: restricted when it is in a rule or has an egress allow-list.
/// The `CONFIG_*` flags a workload with `WORKLOAD_*` `flags` needs.
fn config_flags_of(out: &mut CompiledPolicy, flags: u32) {
    if flags & WORKLOAD_EGRESS_ALLOWLIST != 0 {
        out.config_flags |= CONFIG_EGRESS_ALLOWLIST;
    }
    if flags & WORKLOAD_RESTRICTED != 0 {
        out.config_flags |= CONFIG_RESTRICTED;
    }
}

/// The `WORKLOAD_*` decision flags of a workload (`in_rules`: some rule names it).
pub fn workload_flags(workload: &Workload, in_rules: bool) -> u32 {
    let mut flags = 0;
    if workload.egress == Egress::Allowlist {
        flags |= WORKLOAD_EGRESS_ALLOWLIST | WORKLOAD_RESTRICTED;
    }
    if in_rules {
        flags |= WORKLOAD_RESTRICTED;
    }
    if workload.mode == Mode::Audit {
        flags |= WORKLOAD_MODE_AUDIT;
    }
    flags
}

fn mode(mode: Mode) -> u32 {
    match mode {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    }
}

/// The 16-byte form the kernel compares: IPv4 as IPv4-mapped IPv6.
pub(crate) fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{
        Bind, CredentialPolicy, Endpoint, EndpointId, EndpointKind, Rule, Workload, WorkloadId,
    };
    use tessera_common::{CONFIG_ATTEST_EXEC, NONE_ID, WORKLOAD_NEEDS_ATTEST};

    fn endpoint(name: &str, addresses: &[&str], ports: Vec<u16>, protocol: Protocol) -> Endpoint {
        Endpoint {
            name: name.to_owned(),
            kind: EndpointKind::Api,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            hosts: Vec::new(),
            audiences: Vec::new(),
            ports,
            protocol,
            mode: Mode::Audit,
            labels: Default::default(),
        }
    }

    fn workload(name: &str, cgroup: Option<&str>, uid: Option<u32>) -> Workload {
        Workload {
            name: name.to_owned(),
            spiffe_id: format!("spiffe://example.org/{name}").parse().unwrap(),
            selectors: crate::identity::selectors::Selectors {
                cgroup: cgroup.map(str::to_owned),
                uid,
                ..Default::default()
            },
            egress: Egress::Open,
            mode: Mode::Enforce,
        }
    }

    fn policy() -> PolicySet {
        PolicySet {
            revision: "sha256:0".to_owned(),
            workloads: vec![
                workload("a", Some("/demo/a"), None),
                workload("b", Some("/demo/b"), Some(1001)),
                workload("c", None, Some(0)),
                workload("gone", Some("/demo/gone"), None),
                Workload {
                    // A workload the agent attests, whose cgroup is missing: its scope is
                    // marked at the nearest existing ancestor.
                    selectors: crate::identity::selectors::Selectors {
                        cgroup: Some("/demo/later".to_owned()),
                        exe: Some("/usr/bin/later".to_owned()),
                        ..Default::default()
                    },
                    ..workload("later", None, None)
                },
            ],
            endpoints: vec![
                endpoint(
                    "vault",
                    &["127.0.0.1/32", "::1/128"],
                    vec![8200],
                    Protocol::Tcp,
                ),
                endpoint("net", &["10.0.0.0/8", "fd00::/8"], vec![], Protocol::Any),
            ],
            rules: vec![
                Rule {
                    name: "ab-vault".to_owned(),
                    workloads: vec![WorkloadId(0), WorkloadId(1)],
                    endpoints: vec![EndpointId(0)],
                    credential: Some(CredentialPolicy {
                        max_ttl: Duration::from_secs(60),
                        bind: Bind::Process,
                        keep_on_exec: false,
                        connections: Default::default(),
                    }),
                    mode: Mode::Enforce,
                    scopes: Vec::new(),
                    issuance: None,
                    token_match: None,
                },
                Rule {
                    name: "c-net".to_owned(),
                    workloads: vec![WorkloadId(2)],
                    endpoints: vec![EndpointId(1)],
                    credential: None,
                    mode: Mode::Audit,
                    scopes: Vec::new(),
                    issuance: None,
                    token_match: None,
                },
            ],
            issuance: Vec::new(),
            trusted_issuers: Vec::new(),
            sources: Vec::new(),
        }
    }

    fn resolve(path: &str) -> Result<u64, KernelError> {
        match path {
            "/" => Ok(1),
            "/demo" => Ok(10),
            "/demo/a" => Ok(100),
            "/demo/b" => Ok(200),
            _ => Err(KernelError::NoCgroup2),
        }
    }

    #[test]
    fn host_addresses_are_exact_and_ipv4_is_mapped() {
        let c = compile(&policy(), resolve);
        let v4 = EndpointKey {
            addr: mapped("127.0.0.1".parse().unwrap()),
            port: 8200,
            protocol: PROTO_TCP,
            _pad: 0,
        };
        assert_eq!(&v4.addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(
            c.exact.get(&v4),
            Some(&EndpointValue {
                endpoint_id: 0,
                mode: MODE_AUDIT
            })
        );
        assert_eq!(c.exact.len(), 2);
    }

    #[test]
    fn networks_go_to_the_trie_per_protocol_with_any_port() {
        let c = compile(&policy(), resolve);
        // 2 networks × (tcp, udp), every port.
        assert_eq!(c.cidr.len(), 4);
        let v4 = EndpointCidrKey {
            protocol: PROTO_UDP,
            _pad: 0,
            port_be: 0,
            addr: mapped("10.0.0.0".parse().unwrap()),
        };
        assert!(c.cidr.contains_key(&(CIDR_KEY_HEADER_BITS + 96 + 8, v4)));
        let v6 = EndpointCidrKey {
            protocol: PROTO_TCP,
            _pad: 0,
            port_be: 0,
            addr: mapped("fd00::".parse().unwrap()),
        };
        assert!(c.cidr.contains_key(&(CIDR_KEY_HEADER_BITS + 8, v6)));
    }

    #[test]
    fn workloads_are_keyed_by_cgroup_and_uid() {
        let c = compile(&policy(), resolve);
        let key = |cgroup_id, uid| WorkloadKey {
            cgroup_id,
            uid,
            _pad: 0,
        };
        let id = |k| c.workloads.get(&k).map(|v| v.workload_id);
        assert_eq!(id(key(100, ANY_UID)), Some(0));
        assert_eq!(id(key(200, 1001)), Some(1));
        assert_eq!(id(key(ANY_CGROUP, 0)), Some(2));
        // The missing cgroup's nearest ancestor waits for the agent's attestation.
        assert_eq!(
            c.workloads.get(&key(10, ANY_UID)),
            Some(&WorkloadValue {
                workload_id: NONE_ID,
                flags: WORKLOAD_NEEDS_ATTEST
            })
        );
        assert_eq!(c.workloads.len(), 4);
        assert!(matches!(
            c.warnings.as_slice(),
            [SyncWarning::MissingCgroup { workload, .. }] if workload == "gone"
        ));
    }

    #[test]
    fn rules_cover_every_pair_with_flags_and_mode() {
        let c = compile(&policy(), resolve);
        let rule = |w, e| {
            c.rules.get(&RuleKey {
                workload_id: w,
                endpoint_id: e,
            })
        };
        assert_eq!(
            rule(1, 0),
            Some(&RuleValue {
                rule_id: 0,
                flags: RULE_CREDENTIAL_REQUIRED,
                mode: MODE_ENFORCE,
                _pad: 0
            })
        );
        assert_eq!(rule(2, 1).map(|r| (r.flags, r.mode)), Some((0, MODE_AUDIT)));
        assert_eq!(rule(2, 0), None);
        assert_eq!(c.rules.len(), 3);
    }

    #[test]
    fn workloads_in_rules_are_restricted_without_an_allowlist_flag() {
        let c = compile(&policy(), resolve);
        let flags = |k: WorkloadKey| c.workloads.get(&k).map(|v| v.flags);
        let key = |cgroup_id, uid| WorkloadKey {
            cgroup_id,
            uid,
            _pad: 0,
        };
        assert_eq!(flags(key(100, ANY_UID)), Some(WORKLOAD_RESTRICTED));
        assert_eq!(flags(key(ANY_CGROUP, 0)), Some(WORKLOAD_RESTRICTED));
        assert_eq!(c.config_flags, CONFIG_RESTRICTED | CONFIG_ATTEST_EXEC);
    }

    #[test]
    fn egress_allowlist_sets_workload_and_config_flags() {
        let mut p = policy();
        p.workloads.push(Workload {
            egress: Egress::Allowlist,
            mode: Mode::Audit,
            ..workload("locked", Some("/demo/a"), Some(7))
        });
        p.workloads.push(workload("free", Some("/demo/b"), Some(8)));
        let c = compile(&p, resolve);
        let flags = |cgroup_id, uid| {
            c.workloads
                .get(&WorkloadKey {
                    cgroup_id,
                    uid,
                    _pad: 0,
                })
                .map(|v| v.flags)
        };
        assert_eq!(
            flags(100, 7),
            Some(WORKLOAD_RESTRICTED | WORKLOAD_EGRESS_ALLOWLIST | WORKLOAD_MODE_AUDIT)
        );
        // In no rule and open: unrestricted.
        assert_eq!(flags(200, 8), Some(0));
        assert_eq!(
            c.config_flags,
            CONFIG_RESTRICTED | CONFIG_EGRESS_ALLOWLIST | CONFIG_ATTEST_EXEC
        );
    }

    #[test]
    fn no_rules_and_no_allowlist_leave_the_config_flags_clear() {
        let mut p = policy();
        p.rules.clear();
        p.workloads.pop();
        let c = compile(&p, resolve);
        assert_eq!(c.config_flags, 0);
        assert!(c.workloads.values().all(|v| v.flags == 0));
    }

    #[test]
    fn overlapping_endpoints_keep_the_first_and_warn() {
        let mut p = policy();
        p.endpoints.push(endpoint(
            "vault-again",
            &["127.0.0.1/32"],
            vec![8200],
            Protocol::Any,
        ));
        let c = compile(&p, resolve);
        assert!(c.warnings.iter().any(|w| matches!(
            w,
            SyncWarning::OverlappingEndpoints { kept, ignored, .. } if kept == "vault" && ignored == "vault-again"
        )));
        // Its udp entry does not overlap.
        assert_eq!(c.exact.len(), 3);
    }
}
