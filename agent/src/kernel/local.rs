//! Local endpoints: every address that reaches a service on this host is that service.
//!
//! Linux delivers a connect to any `127.0.0.0/8` address, to `::1` and to each address of the
//! host's interfaces to the host itself, so a server bound to a wildcard address (or to one of
//! them) is reached through all of them. An endpoint whose address is *local* is therefore
//! protected, for its ports and protocol, on every *local destination*:
//!
//! - an endpoint address is local when it is `127.0.0.1`, `::1`, a loopback network containing
//!   `127.0.0.1` (inside `127.0.0.0/8`), or exactly one current address of the host's
//!   interfaces (`/32`, `/128`). Another loopback alias (`127.0.0.53/32`) names a server bound
//!   to that alias only, and is not extended. A network that merely contains a host address (`10.0.0.0/8`) names other
//!   hosts too and is not local: it protects the host's address as written, nothing more;
//! - the local destinations are `127.0.0.0/8` (one LPM entry), `::1` and each host address
//!   (exact entries), written with the endpoint's id and mode. The unspecified addresses
//!   (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) are decided as loopback by the kernel programs.
//!
//! These entries are derived from the compiled policy and the host's addresses whenever either
//! changes, and written with the policy of each program set (so a reload keeps them and a
//! restarted agent's first set has them). They give way to the policy as written: where another
//! endpoint's own addresses decide a destination (the same address, a network containing it,
//! overlapping ports), that endpoint keeps it and a warning says so; where two local endpoints
//! share a port, the destinations neither names are *contested* and denied to every workload
//! (`CONTESTED_ENDPOINT_ID`), as for two hostnames resolving to one address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tessera_common::{
    ANY_PORT, CIDR_KEY_HEADER_BITS, EndpointCidrKey, EndpointKey, EndpointValue, MODE_AUDIT,
    MODE_ENFORCE, PROTO_TCP,
};

pub mod addresses;

use super::compile::{CompiledPolicy, SyncWarning, mapped};
use super::dynamic::{CONTESTED_ENDPOINT_ID, prefix_contains};
use super::{KernelError, PolicyMaps, sync};

/// The addresses of the host's interfaces that are not loopback or unspecified (those are
/// local anyway), canonical (an IPv4-mapped address as IPv4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddresses(BTreeSet<IpAddr>);

impl HostAddresses {
    pub fn new(addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        HostAddresses(
            addresses
                .into_iter()
                .map(|a| a.to_canonical())
                .filter(|a| !is_loopback_or_unspecified(*a))
                .collect(),
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = &IpAddr> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A handle on the host addresses the policy maps are expanded with; clones share them.
/// Obtained from `Enforcer::local_entries`; it follows the running program set across reloads.
#[derive(Clone)]
pub struct LocalEntries {
    maps: Arc<Mutex<PolicyMaps>>,
}

impl LocalEntries {
    pub(super) fn new(maps: Arc<Mutex<PolicyMaps>>) -> Self {
        LocalEntries { maps }
    }

    /// Makes the running program set's endpoint maps protect local endpoints on `host` (and
    /// no more on the addresses that are gone): new entries first, then stale ones removed, in
    /// place (the policy generation stays). Returns `None` when `host` is what the maps hold,
    /// else the warnings of the new expansion.
    pub fn set_host_addresses(
        &self,
        host: HostAddresses,
    ) -> Result<Option<Vec<SyncWarning>>, KernelError> {
        let mut maps = self.maps.lock().map_err(|_| KernelError::Poisoned)?;
        let maps = &mut *maps;
        if maps.host == host {
            return Ok(None);
        }
        let expanded = expand(&maps.static_policy, &host);
        let merged = maps.dynamic.merge(&expanded);
        sync::write_endpoints(maps, &merged)?;
        maps.dynamic.committed();
        maps.host = host;
        Ok(Some(expanded.warnings))
    }

    /// The host addresses the maps are expanded with now.
    pub fn host_addresses(&self) -> Result<HostAddresses, KernelError> {
        Ok(self
            .maps
            .lock()
            .map_err(|_| KernelError::Poisoned)?
            .host
            .clone())
    }
}

/// The destination keys of one local endpoint's (protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Exact([u8; 16]),
    /// `127.0.0.0/8`.
    Loopback4,
}

/// `compiled` with the entries that protect its local endpoints on every local destination
/// (see the module doc), and a warning for each destination they give way on or contest.
pub(super) fn expand(compiled: &CompiledPolicy, host: &HostAddresses) -> CompiledPolicy {
    let mut out = compiled.clone();
    let host_keys: BTreeSet<[u8; 16]> = host.iter().map(|a| mapped(*a)).collect();
    // (protocol, port) → the local endpoints there, by id.
    let mut seeds: BTreeMap<(u8, u16), BTreeMap<u32, EndpointValue>> = BTreeMap::new();
    for (key, value) in &compiled.exact {
        if is_local_key(&key.addr, &host_keys) {
            seeds
                .entry((key.protocol, key.port))
                .or_default()
                .insert(value.endpoint_id, *value);
        }
    }
    let localhost = mapped(Ipv4Addr::LOCALHOST.into());
    for (&(prefix, key), value) in &compiled.cidr {
        if inside_loopback4(prefix, &key.addr) && prefix_contains(prefix, &key.addr, &localhost) {
            seeds
                .entry((key.protocol, u16::from_be(key.port_be)))
                .or_default()
                .insert(value.endpoint_id, *value);
        }
    }
    let mut targets = vec![
        Target::Loopback4,
        Target::Exact(mapped(Ipv6Addr::LOCALHOST.into())),
    ];
    targets.extend(host_keys.iter().map(|k| Target::Exact(*k)));

    let mut exact: HashMap<EndpointKey, EndpointValue> = HashMap::new();
    let mut cidr: HashMap<(u32, EndpointCidrKey), EndpointValue> = HashMap::new();
    for (&(protocol, port), endpoints) in &seeds {
        for &target in &targets {
            // Who decides this destination now: another endpoint's own entry keeps it.
            let claimants: Vec<&EndpointValue> = endpoints
                .values()
                .filter(|v| match static_holder(compiled, target, protocol, port) {
                    Some(holder) if holder == v.endpoint_id => false,
                    Some(holder) => {
                        out.warnings.push(SyncWarning::LocalGivesWay {
                            endpoint: name(compiled, v.endpoint_id),
                            holder: name(compiled, holder),
                            destination: describe(target, protocol, port),
                        });
                        false
                    }
                    None => true,
                })
                .collect();
            let value = match claimants.as_slice() {
                [] => continue,
                [only] => **only,
                several => {
                    out.warnings.push(SyncWarning::LocalContested {
                        endpoints: several
                            .iter()
                            .map(|v| name(compiled, v.endpoint_id))
                            .collect(),
                        destination: describe(target, protocol, port),
                    });
                    EndpointValue {
                        endpoint_id: CONTESTED_ENDPOINT_ID,
                        mode: if several.iter().all(|v| v.mode == MODE_AUDIT) {
                            MODE_AUDIT
                        } else {
                            MODE_ENFORCE
                        },
                    }
                }
            };
            match target {
                Target::Exact(addr) => {
                    exact.insert(
                        EndpointKey {
                            addr,
                            port,
                            protocol,
                            _pad: 0,
                        },
                        value,
                    );
                }
                Target::Loopback4 => {
                    cidr.insert(loopback4_key(protocol, port), value);
                }
            }
        }
    }
    out.exact.extend(exact);
    out.cidr.extend(cidr);
    out
}

/// Whether an exact entry's address is local: `127.0.0.1`, `::1`, unspecified or a host
/// address. Another loopback alias (`127.0.0.53`) names a server bound to that alias only.
fn is_local_key(addr: &[u8; 16], host: &BTreeSet<[u8; 16]>) -> bool {
    let ip = IpAddr::from(Ipv6Addr::from(*addr)).to_canonical();
    ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
        || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
        || ip.is_unspecified()
        || host.contains(addr)
}

fn is_loopback_or_unspecified(addr: IpAddr) -> bool {
    addr.is_loopback() || addr.is_unspecified()
}

/// Whether a CIDR entry (`prefix` with the key header) lies inside `127.0.0.0/8`.
fn inside_loopback4(prefix: u32, addr: &[u8; 16]) -> bool {
    let bits = prefix.saturating_sub(CIDR_KEY_HEADER_BITS);
    bits >= 96 + 8
        && addr[..10].iter().all(|b| *b == 0)
        && addr[10..12] == [0xff, 0xff]
        && addr[12] == 127
}

fn loopback4_key(protocol: u8, port: u16) -> (u32, EndpointCidrKey) {
    (
        CIDR_KEY_HEADER_BITS + 96 + 8,
        EndpointCidrKey {
            protocol,
            _pad: 0,
            port_be: port.to_be(),
            addr: mapped(Ipv4Addr::new(127, 0, 0, 0).into()),
        },
    )
}

/// The endpoint whose own (static) entry would decide some destination of `target` at
/// (`protocol`, `port`), or that a new entry there would take destinations from; `None` when
/// no entry of the policy touches it.
///
/// For an exact target: an exact entry of the address on the same port or on every port, or a
/// network containing it on an overlapping port (the exact entry would be looked up first and
/// hide it). For `127.0.0.0/8`: the same key, a network containing it on an overlapping port,
/// or a narrower network inside it on every port while the target has a port (the target's
/// port is looked up first and would hide it). Exact entries and narrower networks on the same
/// port inside `127.0.0.0/8` keep their destinations by themselves (looked up first, or the
/// longest prefix).
fn static_holder(
    compiled: &CompiledPolicy,
    target: Target,
    protocol: u8,
    port: u16,
) -> Option<u32> {
    let overlaps = |other: u16| port == ANY_PORT || other == ANY_PORT || other == port;
    match target {
        Target::Exact(addr) => {
            for p in [port, ANY_PORT] {
                if let Some(v) = compiled.exact.get(&EndpointKey {
                    addr,
                    port: p,
                    protocol,
                    _pad: 0,
                }) {
                    return Some(v.endpoint_id);
                }
            }
            compiled
                .cidr
                .iter()
                .filter(|((prefix, key), _)| {
                    key.protocol == protocol
                        && overlaps(u16::from_be(key.port_be))
                        && prefix_contains(*prefix, &key.addr, &addr)
                })
                .max_by_key(|((prefix, _), _)| *prefix)
                .map(|(_, v)| v.endpoint_id)
        }
        Target::Loopback4 => {
            let (own_prefix, own) = loopback4_key(protocol, port);
            compiled
                .cidr
                .iter()
                .filter(|((prefix, key), _)| {
                    let other_port = u16::from_be(key.port_be);
                    key.protocol == protocol
                        && overlaps(other_port)
                        && if *prefix <= own_prefix {
                            prefix_contains(*prefix, &key.addr, &own.addr)
                        } else {
                            port != ANY_PORT
                                && other_port == ANY_PORT
                                && inside_loopback4(*prefix, &key.addr)
                        }
                })
                .max_by_key(|((prefix, _), _)| *prefix)
                .map(|(_, v)| v.endpoint_id)
        }
    }
}

fn name(compiled: &CompiledPolicy, id: u32) -> String {
    compiled
        .endpoint_names
        .get(&id)
        .cloned()
        .unwrap_or_else(|| format!("#{id}"))
}

fn describe(target: Target, protocol: u8, port: u16) -> String {
    let addr = match target {
        Target::Loopback4 => "127.0.0.0/8".to_owned(),
        Target::Exact(addr) => IpAddr::from(Ipv6Addr::from(addr))
            .to_canonical()
            .to_string(),
    };
    let proto = if protocol == PROTO_TCP { "tcp" } else { "udp" };
    if port == ANY_PORT {
        format!("{addr} every port {proto}")
    } else {
        format!("{addr} port {port} {proto}")
    }
}

#[cfg(test)]
#[path = "local/tests.rs"]
mod tests;
