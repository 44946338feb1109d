use super::*;
use tessera_common::PROTO_UDP;

const VAULT: u32 = 0;
const OTHER: u32 = 1;

fn value(endpoint_id: u32) -> EndpointValue {
    EndpointValue {
        endpoint_id,
        mode: MODE_ENFORCE,
    }
}

fn exact_key(ip: &str, port: u16, protocol: u8) -> EndpointKey {
    EndpointKey {
        addr: mapped(ip.parse().unwrap()),
        port,
        protocol,
        _pad: 0,
    }
}

fn cidr_key(net: &str, port: u16, protocol: u8) -> (u32, EndpointCidrKey) {
    let net: ipnet::IpNet = net.parse().unwrap();
    let bits = match net {
        ipnet::IpNet::V4(v4) => 96 + u32::from(v4.prefix_len()),
        ipnet::IpNet::V6(v6) => u32::from(v6.prefix_len()),
    };
    (
        CIDR_KEY_HEADER_BITS + bits,
        EndpointCidrKey {
            protocol,
            _pad: 0,
            port_be: port.to_be(),
            addr: mapped(net.network()),
        },
    )
}

fn policy(exact: &[(&str, u16, u32)], cidr: &[(&str, u16, u32)]) -> CompiledPolicy {
    let mut c = CompiledPolicy::default();
    for &(ip, port, id) in exact {
        c.exact.insert(exact_key(ip, port, PROTO_TCP), value(id));
    }
    for &(net, port, id) in cidr {
        c.cidr.insert(cidr_key(net, port, PROTO_TCP), value(id));
    }
    c.endpoint_names.insert(VAULT, "vault".to_owned());
    c.endpoint_names.insert(OTHER, "other".to_owned());
    c
}

fn host(addresses: &[&str]) -> HostAddresses {
    HostAddresses::new(addresses.iter().map(|a| a.parse().unwrap()))
}

fn exact_id(c: &CompiledPolicy, ip: &str, port: u16) -> Option<u32> {
    c.exact
        .get(&exact_key(ip, port, PROTO_TCP))
        .map(|v| v.endpoint_id)
}

fn cidr_id(c: &CompiledPolicy, net: &str, port: u16) -> Option<u32> {
    c.cidr
        .get(&cidr_key(net, port, PROTO_TCP))
        .map(|v| v.endpoint_id)
}

#[test]
fn a_loopback_endpoint_covers_all_of_loopback_and_the_host_addresses() {
    let c = expand(
        &policy(&[("127.0.0.1", 8200, VAULT)], &[]),
        &host(&["10.1.2.3", "fd00::5", "127.0.0.1", "::1"]),
    );
    assert_eq!(cidr_id(&c, "127.0.0.0/8", 8200), Some(VAULT));
    assert_eq!(exact_id(&c, "::1", 8200), Some(VAULT));
    assert_eq!(exact_id(&c, "10.1.2.3", 8200), Some(VAULT));
    assert_eq!(exact_id(&c, "fd00::5", 8200), Some(VAULT));
    // Only the endpoint's own port and protocol.
    assert_eq!(exact_id(&c, "10.1.2.3", 8201), None);
    assert!(
        !c.exact
            .contains_key(&exact_key("10.1.2.3", 8200, PROTO_UDP))
    );
    // Loopback addresses of the host are not listed twice.
    assert_eq!(c.exact.len(), 4);
    assert_eq!(c.cidr.len(), 1);
    assert!(c.warnings.is_empty());
}

#[test]
fn an_endpoint_at_a_host_address_covers_loopback_and_follows_the_host() {
    let p = policy(&[("10.1.2.3", 0, VAULT)], &[]);
    let c = expand(&p, &host(&["10.1.2.3", "192.0.2.7"]));
    assert_eq!(cidr_id(&c, "127.0.0.0/8", 0), Some(VAULT));
    assert_eq!(exact_id(&c, "::1", 0), Some(VAULT));
    assert_eq!(exact_id(&c, "192.0.2.7", 0), Some(VAULT));
    // Once 10.1.2.3 is no host address, it is an address like any other: nothing is added.
    let c = expand(&p, &host(&["192.0.2.7"]));
    assert_eq!(c, p);
}

#[test]
fn a_network_containing_a_host_address_is_not_local() {
    let p = policy(&[], &[("10.0.0.0/8", 443, VAULT)]);
    assert_eq!(expand(&p, &host(&["10.1.2.3"])), p);
    // A loopback network containing 127.0.0.1 is; one that does not, or another loopback
    // alias, names servers bound there only.
    for alias in [
        policy(&[], &[("127.5.0.0/16", 443, VAULT)]),
        policy(&[("127.0.0.53", 53, VAULT)], &[]),
    ] {
        assert_eq!(expand(&alias, &host(&["10.1.2.3"])), alias);
    }
    let p = policy(&[], &[("127.0.0.0/16", 443, VAULT)]);
    let c = expand(&p, &host(&["10.1.2.3"]));
    assert_eq!(cidr_id(&c, "127.0.0.0/8", 443), Some(VAULT));
    assert_eq!(exact_id(&c, "10.1.2.3", 443), Some(VAULT));
}

#[test]
fn another_endpoints_own_addresses_keep_their_destinations() {
    let p = policy(
        &[("127.0.0.1", 8200, VAULT), ("10.1.2.3", 0, OTHER)],
        &[("127.5.0.0/16", 0, OTHER)],
    );
    let c = expand(&p, &host(&["10.1.2.3"]));
    // 10.1.2.3 is `other`'s on every port: vault's port is not taken from it.
    assert_eq!(exact_id(&c, "10.1.2.3", 8200), None);
    assert_eq!(exact_id(&c, "10.1.2.3", 0), Some(OTHER));
    // 127.5/16 on every port is `other`'s; vault's 127/8 port 8200 entry would hide it there.
    assert_eq!(cidr_id(&c, "127.0.0.0/8", 8200), None);
    assert!(c.warnings.iter().any(|w| matches!(
        w,
        SyncWarning::LocalGivesWay { endpoint, holder, destination }
            if endpoint == "vault" && holder == "other" && destination == "10.1.2.3 port 8200 tcp"
    )));
}

#[test]
fn loopback_endpoints_on_one_port_keep_their_own_addresses_and_contest_the_rest() {
    let p = policy(
        &[("127.0.0.1", 8200, VAULT), ("127.0.0.9", 8200, OTHER)],
        &[("127.0.0.0/16", 8200, OTHER)],
    );
    let c = expand(&p, &host(&[]));
    // Exact entries are looked up first and the longest prefix wins: each keeps its own.
    assert_eq!(exact_id(&c, "127.0.0.1", 8200), Some(VAULT));
    assert_eq!(exact_id(&c, "127.0.0.9", 8200), Some(OTHER));
    assert_eq!(cidr_id(&c, "127.0.0.0/16", 8200), Some(OTHER));
    assert_eq!(
        cidr_id(&c, "127.0.0.0/8", 8200),
        Some(CONTESTED_ENDPOINT_ID)
    );
}

#[test]
fn a_network_containing_loopback_keeps_it() {
    let p = policy(&[("127.0.0.1", 80, VAULT)], &[("0.0.0.0/0", 0, OTHER)]);
    let c = expand(&p, &host(&[]));
    assert_eq!(cidr_id(&c, "127.0.0.0/8", 80), None);
    // ::1 is not in 0.0.0.0/0.
    assert_eq!(exact_id(&c, "::1", 80), Some(VAULT));
}

#[test]
fn two_local_endpoints_on_one_port_contest_what_neither_names() {
    let p = policy(&[("127.0.0.1", 8200, VAULT), ("::1", 8200, OTHER)], &[]);
    let c = expand(&p, &host(&["10.1.2.3"]));
    // Each keeps its own address.
    assert_eq!(exact_id(&c, "127.0.0.1", 8200), Some(VAULT));
    assert_eq!(exact_id(&c, "::1", 8200), Some(OTHER));
    // The rest reaches both: denied to all.
    assert_eq!(
        cidr_id(&c, "127.0.0.0/8", 8200),
        Some(CONTESTED_ENDPOINT_ID)
    );
    assert_eq!(exact_id(&c, "10.1.2.3", 8200), Some(CONTESTED_ENDPOINT_ID));
    assert!(c.warnings.iter().any(|w| matches!(
        w,
        SyncWarning::LocalContested { endpoints, .. } if endpoints.len() == 2
    )));
}

#[test]
fn unspecified_and_loopback_addresses_are_never_host_addresses() {
    let h = host(&["0.0.0.0", "::", "127.0.0.2", "::1", "::ffff:10.0.0.1"]);
    assert_eq!(
        h.iter().copied().collect::<Vec<_>>(),
        vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
    );
}
