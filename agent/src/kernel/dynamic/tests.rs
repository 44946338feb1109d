use ipnet::IpNet;
use tessera_common::{EndpointValue, PROTO_TCP};

use super::*;
use crate::kernel::compile::compile;
use crate::policy::{EndpointKind, HostName, PolicySet};

fn endpoint(name: &str, addresses: &[&str], hosts: &[&str], ports: Vec<u16>) -> Endpoint {
    Endpoint {
        name: name.to_owned(),
        kind: EndpointKind::Api,
        addresses: addresses
            .iter()
            .map(|a| a.parse::<IpNet>().unwrap())
            .collect(),
        hosts: hosts
            .iter()
            .map(|h| h.parse::<HostName>().unwrap())
            .collect(),
        audiences: Vec::new(),
        ports,
        protocol: Protocol::Tcp,
        mode: Mode::Enforce,
        labels: Default::default(),
    }
}

/// 0: `static` 127.0.0.9 port 443; 1: `net` 10.0.0.0/8 every port; 2: `api` (a host, 443);
/// 3: `web` (a host, every port).
fn policy() -> PolicySet {
    PolicySet {
        revision: "sha256:0".to_owned(),
        workloads: vec![],
        endpoints: vec![
            endpoint("static", &["127.0.0.9/32"], &[], vec![443]),
            endpoint("net", &["10.0.0.0/8"], &[], vec![]),
            endpoint("api", &[], &["api.test"], vec![443]),
            endpoint("web", &[], &["web.test"], vec![]),
        ],
        rules: vec![],
        sources: vec![],
        issuance: Vec::new(),
        trusted_issuers: Vec::new(),
    }
}

fn entries() -> (PolicySet, DynamicEntries) {
    let p = policy();
    let mut d = DynamicEntries::default();
    let compiled = compile(&p, |_| Ok(1));
    d.merge(&compiled);
    (p, d)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(addr: &str, port: u16) -> EndpointKey {
    EndpointKey {
        addr: mapped(ip(addr)),
        port,
        protocol: PROTO_TCP,
        _pad: 0,
    }
}

fn owner(d: &DynamicEntries, addr: &str, port: u16) -> Option<u32> {
    d.effective().0.get(&key(addr, port)).map(|v| v.endpoint_id)
}

#[test]
fn resolved_addresses_become_exact_entries() {
    let (p, mut d) = entries();
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.2"));
    d.claim(EndpointId(2), &p.endpoints[2], ip("::ffff:127.0.0.3"));
    d.claim(EndpointId(3), &p.endpoints[3], ip("fd00::7"));
    assert_eq!(owner(&d, "127.0.0.2", 443), Some(2));
    assert_eq!(owner(&d, "127.0.0.3", 443), Some(2));
    assert_eq!(owner(&d, "fd00::7", ANY_PORT), Some(3));
    assert_eq!(
        d.effective().0.get(&key("127.0.0.2", 443)),
        Some(&EndpointValue {
            endpoint_id: 2,
            mode: MODE_ENFORCE
        })
    );
    assert!(d.held().is_empty());
    d.release(EndpointId(2), ip("127.0.0.3"));
    assert_eq!(owner(&d, "127.0.0.3", 443), None);
    assert_eq!(d.effective().0.len(), 2);
}

#[test]
fn static_entries_win_over_a_rebind() {
    let (p, mut d) = entries();
    // The same address and port as `static`, and an address inside `net`.
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.9"));
    d.claim(EndpointId(2), &p.endpoints[2], ip("10.1.2.3"));
    // Every port of 127.0.0.9 would hide nothing of `static` (its port is looked up first),
    // but every port of an address in `net` would hide `net` there.
    d.claim(EndpointId(3), &p.endpoints[3], ip("127.0.0.9"));
    d.claim(EndpointId(3), &p.endpoints[3], ip("10.9.9.9"));
    let (wanted, held) = d.effective();
    assert_eq!(wanted.len(), 1);
    assert_eq!(owner(&d, "127.0.0.9", ANY_PORT), Some(3));
    let held: Vec<_> = held
        .iter()
        .map(|h| (h.endpoint.0, h.ip.to_string(), h.holder, h.holder_is_static))
        .collect();
    assert_eq!(
        held,
        [
            (2, "127.0.0.9".to_owned(), 0, true),
            (2, "10.1.2.3".to_owned(), 1, true),
            (3, "10.9.9.9".to_owned(), 1, true),
        ]
    );
}

#[test]
fn a_destination_two_names_claim_is_denied_to_everyone_until_one_goes() {
    // Issue 15 #2: `api` port 443 resolves onto 127.0.0.5, which `web` (every port) holds.
    // Before, `web`'s rule stayed in force at 127.0.0.5:443 and `api` was open there to
    // whoever `web` lets in.
    let (p, mut d) = entries();
    d.claim(EndpointId(3), &p.endpoints[3], ip("127.0.0.5"));
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.5"));
    assert_eq!(owner(&d, "127.0.0.5", 443), Some(CONTESTED_ENDPOINT_ID));
    assert_eq!(owner(&d, "127.0.0.5", ANY_PORT), Some(3));
    let held = d.held();
    assert_eq!(held.len(), 1);
    assert!(held[0].contested && !held[0].holder_is_static);
    assert_eq!(
        (held[0].endpoint.0, held[0].holder, held[0].port),
        (2, 3, 443)
    );
    // The decision records of the contested destination name both endpoints, oldest first.
    let names = |port| d.claimants(ip("127.0.0.5"), port, PROTO_TCP);
    assert_eq!(
        names(443),
        [p.endpoints[3].name.clone(), p.endpoints[2].name.clone()]
    );
    assert_eq!(names(80), [p.endpoints[3].name.clone()]);
    // The moved name leaves: `web`'s rule again at 443.
    d.release(EndpointId(2), ip("127.0.0.5"));
    assert_eq!(owner(&d, "127.0.0.5", 443), None);
    assert_eq!(owner(&d, "127.0.0.5", ANY_PORT), Some(3));
    assert!(d.held().is_empty());
    // The other order: `web` arrives on `api`'s address; its every-port key hides nothing
    // looked up first, but port 443 is contested all the same.
    d.release(EndpointId(3), ip("127.0.0.5"));
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.5"));
    d.claim(EndpointId(3), &p.endpoints[3], ip("127.0.0.5"));
    assert_eq!(owner(&d, "127.0.0.5", 443), Some(CONTESTED_ENDPOINT_ID));
    assert_eq!(owner(&d, "127.0.0.5", ANY_PORT), Some(3));
    let held = d.held();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].contested);
    assert_eq!(
        (held[0].endpoint.0, held[0].holder, held[0].port),
        (3, 2, 443)
    );
    // The first holder leaves: the destination is `web`'s alone.
    d.release(EndpointId(2), ip("127.0.0.5"));
    assert_eq!(owner(&d, "127.0.0.5", 443), None);
    assert_eq!(owner(&d, "127.0.0.5", ANY_PORT), Some(3));
}

#[test]
fn a_contested_destination_is_enforced_unless_both_audit() {
    let mut p = policy();
    p.endpoints[3].mode = Mode::Audit;
    let compiled = compile(&p, |_| Ok(1));
    let mut d = DynamicEntries::default();
    d.merge(&compiled);
    d.claim(EndpointId(3), &p.endpoints[3], ip("127.0.0.5"));
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.5"));
    let (wanted, _) = d.effective();
    assert_eq!(
        wanted.get(&key("127.0.0.5", 443)).map(|v| v.mode),
        Some(MODE_ENFORCE)
    );
    p.endpoints[2].mode = Mode::Audit;
    let compiled = compile(&p, |_| Ok(1));
    let mut d = DynamicEntries::default();
    d.merge(&compiled);
    d.claim(EndpointId(3), &p.endpoints[3], ip("127.0.0.5"));
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.5"));
    let (wanted, _) = d.effective();
    assert_eq!(
        wanted.get(&key("127.0.0.5", 443)).map(|v| v.mode),
        Some(MODE_AUDIT)
    );
}

#[test]
fn a_new_static_policy_takes_precedence_over_existing_claims() {
    let (mut p, mut d) = entries();
    d.claim(EndpointId(2), &p.endpoints[2], ip("127.0.0.6"));
    assert_eq!(owner(&d, "127.0.0.6", 443), Some(2));
    p.endpoints[0]
        .addresses
        .push("127.0.0.0/24".parse().unwrap());
    let merged = d.merge(&compile(&p, |_| Ok(1)));
    assert_eq!(owner(&d, "127.0.0.6", 443), None);
    assert_eq!(
        merged
            .exact
            .get(&key("127.0.0.9", 443))
            .map(|v| v.endpoint_id),
        Some(0)
    );
    assert!(!merged.exact.contains_key(&key("127.0.0.6", 443)));
}

#[test]
fn own_static_coverage_writes_nothing_and_holds_nothing() {
    let mut p = policy();
    p.endpoints[1].hosts = vec!["net.test".parse().unwrap()];
    let mut d = DynamicEntries::default();
    d.merge(&compile(&p, |_| Ok(1)));
    d.claim(EndpointId(1), &p.endpoints[1], ip("10.4.4.4"));
    assert!(d.effective().0.is_empty());
    assert!(d.held().is_empty());
}

#[test]
fn prefixes_compare_the_leading_bits() {
    let net = mapped(ip("10.0.0.0"));
    assert!(prefix_contains(
        32 + 96 + 8,
        &net,
        &mapped(ip("10.200.0.1"))
    ));
    assert!(!prefix_contains(32 + 96 + 8, &net, &mapped(ip("11.0.0.1"))));
    assert!(prefix_contains(32, &net, &mapped(ip("fd00::1"))));
    assert!(prefix_contains(160, &net, &net));
}
