//! Endpoint entries that change at run time: the resolved addresses of endpoints' `hosts`.
//!
//! Each resolved address of a host endpoint is a *claim*: exact `ENDPOINTS_EXACT` keys
//! (address × port × protocol) with the endpoint's id. Claims never override anything else,
//! so that a DNS answer cannot move a destination from one rule to another:
//! - the static policy wins: a key is not written when a static entry of another endpoint
//!   already decides that destination (same key, the same address on every port, or a CIDR
//!   that contains it), because the kernel looks exact keys up before CIDRs and a specific
//!   port before every port, and the claim would take the destination over;
//! - between claims of different endpoints, neither wins: a destination that two endpoints'
//!   names resolve to (a name that moved onto another's address) is *contested*, written with
//!   [`CONTESTED_ENDPOINT_ID`], which no rule names: every connect there is denied
//!   (`workload_not_allowed`), enforced if either endpoint enforces, until one of the claims
//!   goes. Keeping the older claim's rule would let the callers that endpoint allows reach the
//!   other endpoint's server without its credential; the kernel decides a destination by one
//!   endpoint, so "a credential for both" cannot be asked, and a deny is the answer that never
//!   opens.
//!
//! A key held back or contested this way is a [`HeldEntry`]; the caller logs it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData};
use tessera_common::{
    ANY_PORT, CIDR_KEY_HEADER_BITS, EndpointCidrKey, EndpointKey, EndpointValue, MODE_AUDIT,
    MODE_ENFORCE, PROTO_TCP, PROTO_UDP, map_names,
};

use super::compile::{CompiledPolicy, mapped};
use super::{KernelError, PolicyMaps, ignore_missing, map_error};
use crate::policy::{Endpoint, EndpointId, Mode, Protocol};

/// A handle on the run-time endpoint entries; clones share them. Obtained from
/// `Enforcer::endpoint_entries`; a policy sync keeps them (re-checked against the new policy).
/// A handle belongs to an epoch: `renew` (after a policy reload, whose endpoint ids may mean
/// other endpoints) drops every claim and turns the older handles' writes into no-ops.
#[derive(Clone)]
pub struct EndpointEntries {
    maps: Arc<Mutex<PolicyMaps>>,
    epoch: u64,
}

/// The endpoint id of a destination two endpoints' resolved addresses claim: no rule names it,
/// so the kernel denies every connect there. Kernel ids are handed out from 0 and never reach it.
pub const CONTESTED_ENDPOINT_ID: u32 = u32::MAX - 1;

/// A resolved address's key that is not written because another endpoint decides that
/// destination, or that is written contested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldEntry {
    /// The endpoint whose resolved address this is.
    pub endpoint: EndpointId,
    pub ip: IpAddr,
    /// `0` = every port.
    pub port: u16,
    pub protocol: &'static str,
    /// The kernel id (see [`kernel_endpoint_id`]) of the endpoint whose entry decides the
    /// destination.
    pub holder: u32,
    /// Whether the holder's entry is from the policy file (else it is another host's address).
    pub holder_is_static: bool,
    /// The destination is denied to everyone while both claim it (the holder is a claim).
    pub contested: bool,
}

/// The claims and what they put in the map. Pure bookkeeping: `apply` and `merge` write.
#[derive(Debug, Default)]
pub(super) struct DynamicEntries {
    static_exact: HashMap<EndpointKey, EndpointValue>,
    static_cidr: Vec<(u32, EndpointCidrKey, EndpointValue)>,
    /// By arrival: older claims win.
    claims: BTreeMap<u64, Claim>,
    by_address: HashMap<(u32, IpAddr), u64>,
    next_seq: u64,
    /// The entries in the kernel map now.
    written: HashMap<EndpointKey, EndpointValue>,
    /// Handles of older epochs write nothing.
    epoch: u64,
}

#[derive(Debug)]
struct Claim {
    endpoint: EndpointId,
    /// The endpoint's name, for the decision records of a contested destination.
    name: String,
    ip: IpAddr,
    keys: Vec<EndpointKey>,
    value: EndpointValue,
}

/// Who decides a destination a claim wants.
enum Holder {
    Nobody,
    /// The claiming endpoint itself, through its static entries: nothing to write.
    Itself,
    Other {
        endpoint_id: u32,
        is_static: bool,
    },
}

impl EndpointEntries {
    pub(super) fn new(maps: Arc<Mutex<PolicyMaps>>) -> Self {
        let epoch = maps.lock().map_or(0, |m| m.dynamic.epoch);
        EndpointEntries { maps, epoch }
    }

    /// Drops every claim (the destinations they held are no longer protected as hosts) and
    /// returns a handle of a new epoch; this and every older handle write nothing from now on.
    pub fn renew(&self) -> Result<EndpointEntries, KernelError> {
        let mut maps = self.maps.lock().map_err(|_| KernelError::Poisoned)?;
        let maps = &mut *maps;
        maps.dynamic.claims.clear();
        maps.dynamic.by_address.clear();
        maps.dynamic.epoch += 1;
        let epoch = maps.dynamic.epoch;
        maps.dynamic.apply(&mut maps.exact)?;
        Ok(EndpointEntries {
            maps: self.maps.clone(),
            epoch,
        })
    }

    /// Protects `ip` as an address of endpoint `id` (its ports, protocol and mode). Adding an
    /// address the endpoint already has is a no-op. Returns the keys held back (see module doc).
    pub fn add_host_address(
        &self,
        id: EndpointId,
        endpoint: &Endpoint,
        ip: IpAddr,
    ) -> Result<Vec<HeldEntry>, KernelError> {
        let mut maps = self.maps.lock().map_err(|_| KernelError::Poisoned)?;
        let maps = &mut *maps;
        if maps.dynamic.epoch != self.epoch {
            return Ok(Vec::new());
        }
        maps.dynamic.claim(id, endpoint, ip);
        maps.dynamic.apply(&mut maps.exact)?;
        Ok(maps
            .dynamic
            .held()
            .into_iter()
            .filter(|h| h.endpoint == id && h.ip == ip.to_canonical())
            .collect())
    }

    /// Stops protecting `ip` as an address of endpoint `id` (a no-op if it was not one).
    /// Destinations it held back for other claims go to them.
    pub fn remove_host_address(&self, id: EndpointId, ip: IpAddr) -> Result<(), KernelError> {
        let mut maps = self.maps.lock().map_err(|_| KernelError::Poisoned)?;
        let maps = &mut *maps;
        if maps.dynamic.epoch != self.epoch {
            return Ok(());
        }
        maps.dynamic.release(id, ip);
        maps.dynamic.apply(&mut maps.exact)
    }

    /// Every key held back now.
    pub fn held(&self) -> Result<Vec<HeldEntry>, KernelError> {
        let maps = self.maps.lock().map_err(|_| KernelError::Poisoned)?;
        Ok(maps.dynamic.held())
    }

    /// The names of the endpoints whose resolved addresses claim destination `ip`:`port`
    /// (`protocol` a `PROTO_*` code), oldest claim first: for a contested destination, who
    /// contests it. Any handle answers with the claims of now (names, not ids, so an answer
    /// does not depend on the policy generation).
    pub fn claimants(&self, ip: IpAddr, port: u16, protocol: u8) -> Vec<String> {
        self.maps
            .lock()
            .map(|m| m.dynamic.claimants(ip, port, protocol))
            .unwrap_or_default()
    }
}

impl DynamicEntries {
    fn claim(&mut self, id: EndpointId, endpoint: &Endpoint, ip: IpAddr) {
        let ip = ip.to_canonical();
        if self.by_address.contains_key(&(id.0, ip)) {
            return;
        }
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
        let addr = mapped(ip);
        let keys = protocols
            .iter()
            .flat_map(|&protocol| {
                ports.iter().map(move |&port| EndpointKey {
                    addr,
                    port,
                    protocol,
                    _pad: 0,
                })
            })
            .collect();
        let value = EndpointValue {
            endpoint_id: kernel_endpoint_id(endpoint, id),
            mode: match endpoint.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.claims.insert(
            seq,
            Claim {
                endpoint: id,
                name: endpoint.name.clone(),
                ip,
                keys,
                value,
            },
        );
        self.by_address.insert((id.0, ip), seq);
    }

    fn claimants(&self, ip: IpAddr, port: u16, protocol: u8) -> Vec<String> {
        let ip = ip.to_canonical();
        let mut names: Vec<String> = Vec::new();
        for claim in self.claims.values() {
            let covers = claim.ip == ip
                && claim
                    .keys
                    .iter()
                    .any(|k| k.protocol == protocol && (k.port == port || k.port == ANY_PORT));
            if covers && !names.contains(&claim.name) {
                names.push(claim.name.clone());
            }
        }
        names
    }

    fn release(&mut self, id: EndpointId, ip: IpAddr) {
        if let Some(seq) = self.by_address.remove(&(id.0, ip.to_canonical())) {
            self.claims.remove(&seq);
        }
    }

    /// The entries the claims should have in the map, and the keys held back or contested.
    fn effective(&self) -> (HashMap<EndpointKey, EndpointValue>, Vec<HeldEntry>) {
        let mut accepted: HashMap<EndpointKey, EndpointValue> = HashMap::new();
        let mut held = Vec::new();
        for claim in self.claims.values() {
            for key in &claim.keys {
                let holder = self.holder(key, claim.value.endpoint_id, &accepted);
                let (holder, is_static) = match holder {
                    Holder::Nobody => {
                        accepted.insert(*key, claim.value);
                        // Every port of an address hides nothing looked up first (a specific
                        // port of it another claim holds), but both claim that destination.
                        if key.port == ANY_PORT {
                            for (k, v) in accepted.iter_mut() {
                                if k.port != ANY_PORT
                                    && k.addr == key.addr
                                    && k.protocol == key.protocol
                                    && v.endpoint_id != claim.value.endpoint_id
                                {
                                    held.push(HeldEntry {
                                        endpoint: claim.endpoint,
                                        ip: claim.ip,
                                        port: k.port,
                                        protocol: protocol_name(k.protocol),
                                        holder: v.endpoint_id,
                                        holder_is_static: false,
                                        contested: true,
                                    });
                                    *v = contested(v, &claim.value);
                                }
                            }
                        }
                        continue;
                    }
                    Holder::Itself => continue,
                    Holder::Other {
                        endpoint_id,
                        is_static,
                    } => (endpoint_id, is_static),
                };
                if !is_static {
                    let any = EndpointKey {
                        port: ANY_PORT,
                        ..*key
                    };
                    let theirs = accepted
                        .get(key)
                        .or_else(|| accepted.get(&any))
                        .copied()
                        .unwrap_or(claim.value);
                    accepted.insert(*key, contested(&theirs, &claim.value));
                }
                held.push(HeldEntry {
                    endpoint: claim.endpoint,
                    ip: claim.ip,
                    port: key.port,
                    protocol: protocol_name(key.protocol),
                    holder,
                    holder_is_static: is_static,
                    contested: !is_static,
                });
            }
        }
        (accepted, held)
    }

    fn held(&self) -> Vec<HeldEntry> {
        self.effective().1
    }

    /// Who decides the destinations `key` would take: an entry the kernel finds for them
    /// now, that `key` would hide or replace.
    fn holder(
        &self,
        key: &EndpointKey,
        endpoint_id: u32,
        accepted: &HashMap<EndpointKey, EndpointValue>,
    ) -> Holder {
        let mut hidden = vec![*key];
        if key.port != ANY_PORT {
            hidden.push(EndpointKey {
                port: ANY_PORT,
                ..*key
            });
        }
        let mut found: Option<(u32, bool)> = None;
        for k in &hidden {
            if let Some(v) = self.static_exact.get(k) {
                found = found.or(Some((v.endpoint_id, true)));
                if v.endpoint_id != endpoint_id {
                    return other(v.endpoint_id, true);
                }
            }
        }
        for (prefix, cidr, v) in &self.static_cidr {
            let port_overlaps = key.port == ANY_PORT
                || cidr.port_be == ANY_PORT
                || cidr.port_be == key.port.to_be();
            if cidr.protocol == key.protocol
                && port_overlaps
                && prefix_contains(*prefix, &cidr.addr, &key.addr)
            {
                if v.endpoint_id != endpoint_id {
                    return other(v.endpoint_id, true);
                }
                found = found.or(Some((v.endpoint_id, true)));
            }
        }
        for k in &hidden {
            if let Some(v) = accepted.get(k)
                && v.endpoint_id != endpoint_id
            {
                return other(v.endpoint_id, false);
            }
        }
        match found {
            Some(_) => Holder::Itself,
            None => Holder::Nobody,
        }
    }

    /// Brings the kernel map to the claims' effective entries: writes first, then removes.
    fn apply(
        &mut self,
        map: &mut BpfHashMap<MapData, EndpointKey, EndpointValue>,
    ) -> Result<(), KernelError> {
        let err = map_error(map_names::ENDPOINTS_EXACT);
        let (wanted, _) = self.effective();
        for (key, value) in &wanted {
            if self.written.get(key) != Some(value) {
                map.insert(key, value, 0).map_err(&err)?;
                self.written.insert(*key, *value);
            }
        }
        let stale: Vec<EndpointKey> = self
            .written
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            ignore_missing(map.remove(&key)).map_err(&err)?;
            self.written.remove(&key);
        }
        Ok(())
    }

    /// Takes `compiled` as the new static policy and returns it with the claims' entries
    /// added, to be written as a whole; `committed` must follow a successful write.
    /// Claims `saved` (resolved addresses a predecessor saved: endpoint, its definition,
    /// address) against `compiled`'s static entries, writing nothing; returns `compiled` with
    /// them, for the first program set of a restarted agent.
    pub(super) fn restore(
        &mut self,
        compiled: &CompiledPolicy,
        saved: &[(EndpointId, &Endpoint, IpAddr)],
    ) -> CompiledPolicy {
        self.merge(compiled);
        for &(id, endpoint, ip) in saved {
            self.claim(id, endpoint, ip);
        }
        self.merge(compiled)
    }

    pub(super) fn merge(&mut self, compiled: &CompiledPolicy) -> CompiledPolicy {
        self.static_exact = compiled.exact.clone();
        self.static_cidr = compiled
            .cidr
            .iter()
            .map(|(&(prefix, key), &value)| (prefix, key, value))
            .collect();
        let (wanted, _) = self.effective();
        let mut merged = compiled.clone();
        merged.exact.extend(wanted);
        merged
    }

    /// Records that the map now holds the static policy plus the claims' entries.
    pub(super) fn committed(&mut self) {
        self.written = self.effective().0;
    }
}

/// The endpoint id the policy maps hold for `endpoint` (at position `id` of the policy): the
/// kernel id of its name (`KernelIds`), as `compile` numbers endpoints.
pub fn kernel_endpoint_id(endpoint: &Endpoint, id: EndpointId) -> u32 {
    super::ids::endpoint_by_name(&endpoint.name, id)
}

fn protocol_name(protocol: u8) -> &'static str {
    if protocol == PROTO_TCP { "tcp" } else { "udp" }
}

/// The entry of a destination claimed by `a` and `b`: denied to every workload, enforced
/// unless both are audited.
fn contested(a: &EndpointValue, b: &EndpointValue) -> EndpointValue {
    EndpointValue {
        endpoint_id: CONTESTED_ENDPOINT_ID,
        mode: if a.mode == MODE_AUDIT && b.mode == MODE_AUDIT {
            MODE_AUDIT
        } else {
            MODE_ENFORCE
        },
    }
}

fn other(endpoint_id: u32, is_static: bool) -> Holder {
    Holder::Other {
        endpoint_id,
        is_static,
    }
}

/// Whether the first `prefix - CIDR_KEY_HEADER_BITS` bits of `net` and `addr` are equal.
pub(super) fn prefix_contains(prefix: u32, net: &[u8; 16], addr: &[u8; 16]) -> bool {
    let bits = prefix.saturating_sub(CIDR_KEY_HEADER_BITS).min(128);
    let a = u128::from_be_bytes(*net);
    let b = u128::from_be_bytes(*addr);
    if bits == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - bits);
    a & mask == b & mask
}

#[cfg(test)]
#[path = "dynamic/tests.rs"]
mod tests;
