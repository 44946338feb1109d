//! One endpoint: its name, kind, addresses, hosts, audiences, ports and protocol.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_saphyr::Spanned;

use super::{Ctx, check_name};
use crate::policy::raw::{RawEndpoint, S};
use crate::policy::{Endpoint, EndpointKind, HostName, Mode, Protocol};

/// The endpoint, or `None` if something was wrong (errors are in `ctx`). `mode` is its
/// document's. Set-wide checks (unique names, overlaps) are the caller's.
pub(super) fn check(
    ctx: &mut Ctx<'_, '_>,
    raw: &Spanned<RawEndpoint>,
    mode: Mode,
) -> Option<Endpoint> {
    let loc = raw.referenced;
    let raw = &raw.value;
    let name = check_name(ctx, raw.name.as_ref(), "endpoint", loc);
    let kind = match raw.kind.as_ref() {
        None => Some(EndpointKind::Other),
        Some(k) => match k.value.as_str() {
            "secret-store" => Some(EndpointKind::SecretStore),
            "api" => Some(EndpointKind::Api),
            "other" => Some(EndpointKind::Other),
            other => {
                ctx.error(
                    k.referenced,
                    format!("unknown endpoint kind `{other}`"),
                    "use secret-store, api or other",
                );
                None
            }
        },
    };
    let hosts = check_hosts(ctx, raw.hosts.as_ref());
    let addresses = match (&raw.addresses, &raw.hosts) {
        (None, Some(_)) => Some(Vec::new()),
        (addresses, _) => check_addresses(ctx, addresses.as_ref(), loc),
    };
    let audiences = check_audiences(ctx, raw.audiences.as_ref());
    let ports = check_ports(ctx, raw.ports.as_ref());
    let protocol = match raw.protocol.as_ref() {
        None => Some(Protocol::Tcp),
        Some(p) => match p.value.as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "any" => Some(Protocol::Any),
            other => {
                ctx.error(
                    p.referenced,
                    format!("unknown protocol `{other}`"),
                    "use tcp, udp or any",
                );
                None
            }
        },
    };
    Some(Endpoint {
        name: name?,
        kind: kind?,
        addresses: addresses?,
        hosts: hosts?,
        audiences: audiences?,
        ports: ports?,
        protocol: protocol?,
        mode,
        labels: check_labels(ctx, raw.labels.as_ref())?,
    })
}

fn check_addresses(
    ctx: &mut Ctx<'_, '_>,
    raw: Option<&S<Vec<S<String>>>>,
    endpoint_loc: serde_saphyr::Location,
) -> Option<Vec<IpNet>> {
    let list = match raw {
        Some(list) if !list.value.is_empty() => list,
        Some(list) => {
            ctx.error(
                list.referenced,
                "addresses is empty".into(),
                "list at least one IP address or CIDR, like \"10.0.0.1\" or \"10.0.0.0/8\"",
            );
            return None;
        }
        None => {
            ctx.error(
                endpoint_loc,
                "endpoint has no addresses or hosts".into(),
                "add addresses: [\"10.0.0.1\"] (IP addresses or CIDRs) or hosts: [vault.internal]",
            );
            return None;
        }
    };
    let mut ok = true;
    let mut nets = Vec::with_capacity(list.value.len());
    for addr in &list.value {
        let text = addr.value.trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) if net.trunc() == net => nets.push(net),
            Ok(net) => {
                ctx.error(
                    addr.referenced,
                    format!("address `{text}` has host bits set"),
                    format!("write the network address: {}", net.trunc()),
                );
                ok = false;
            }
            Err(_) => {
                ctx.error(
                    addr.referenced,
                    format!("`{text}` is not an IP address or CIDR"),
                    "write an address like 10.0.0.1 or ::1, or a network like 10.0.0.0/8",
                );
                ok = false;
            }
        }
    }
    ok.then_some(nets)
}

/// Longest audience accepted (a URL at most, as Vault's `bound_audiences` would hold).
const MAX_AUDIENCE_LEN: usize = 256;

/// Absent `audiences` is an empty list; a present one lists at least one, each once, non-empty,
/// without whitespace or control characters.
fn check_audiences(ctx: &mut Ctx<'_, '_>, raw: Option<&S<Vec<S<String>>>>) -> Option<Vec<String>> {
    let Some(list) = raw else {
        return Some(Vec::new());
    };
    if list.value.is_empty() {
        ctx.error(
            list.referenced,
            "audiences is empty".into(),
            "list at least one audience, like vault.example.org, or remove audiences",
        );
        return None;
    }
    let mut ok = true;
    let mut out: Vec<String> = Vec::with_capacity(list.value.len());
    for a in &list.value {
        let text = a.value.as_str();
        if text.is_empty()
            || text.len() > MAX_AUDIENCE_LEN
            || text.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            ctx.error(
                a.referenced,
                format!("audience `{text}` is not usable as a token audience"),
                format!("write 1 to {MAX_AUDIENCE_LEN} characters without spaces, like vault.example.org or https://vault.example.org"),
            );
            ok = false;
        } else if out.iter().any(|o| o == text) {
            ctx.error(
                a.referenced,
                format!("audience `{text}` is listed twice"),
                "list each audience once",
            );
            ok = false;
        } else {
            out.push(text.to_owned());
        }
    }
    ok.then_some(out)
}

/// Absent `hosts` is an empty list; a present one lists at least one valid name, each once.
fn check_hosts(ctx: &mut Ctx<'_, '_>, raw: Option<&S<Vec<S<String>>>>) -> Option<Vec<HostName>> {
    let Some(list) = raw else {
        return Some(Vec::new());
    };
    if list.value.is_empty() {
        ctx.error(
            list.referenced,
            "hosts is empty".into(),
            "list at least one DNS name, like vault.internal, or remove hosts",
        );
        return None;
    }
    let mut ok = true;
    let mut hosts: Vec<HostName> = Vec::with_capacity(list.value.len());
    for host in &list.value {
        let text = host.value.trim();
        match text.parse::<HostName>() {
            Ok(name) if hosts.contains(&name) => {
                ctx.error(
                    host.referenced,
                    format!("host `{name}` is listed twice"),
                    "list each host once",
                );
                ok = false;
            }
            Ok(name) => hosts.push(name),
            Err(why) => {
                ctx.error(
                    host.referenced,
                    format!("`{text}` is not a valid DNS name: {why}"),
                    "write a name like vault.internal (letters, digits, `-` and dots); \
                     put IP addresses under addresses",
                );
                ok = false;
            }
        }
    }
    ok.then_some(hosts)
}

/// Empty (absent `ports`) means every port.
fn check_ports(ctx: &mut Ctx<'_, '_>, raw: Option<&S<Vec<S<i64>>>>) -> Option<Vec<u16>> {
    let Some(list) = raw else {
        return Some(Vec::new());
    };
    if list.value.is_empty() {
        ctx.error(
            list.referenced,
            "ports is empty".into(),
            "list the ports, or remove ports to cover every port",
        );
        return None;
    }
    let mut ok = true;
    let mut seen = HashSet::new();
    let mut ports = Vec::with_capacity(list.value.len());
    for port in &list.value {
        match u16::try_from(port.value) {
            Ok(p) if p != 0 => {
                if seen.insert(p) {
                    ports.push(p);
                } else {
                    ctx.error(
                        port.referenced,
                        format!("port {p} is listed twice"),
                        "list each port once",
                    );
                    ok = false;
                }
            }
            _ => {
                ctx.error(
                    port.referenced,
                    format!("port {} is out of range", port.value),
                    "use a port from 1 to 65535",
                );
                ok = false;
            }
        }
    }
    ok.then_some(ports)
}

/// The keys the kernel's endpoint maps would hold for `e`: (network, protocol, port; 0 = every
/// port). Two endpoints with a key in common could not be told apart.
pub(super) fn kernel_keys(e: &Endpoint) -> Vec<(IpNet, &'static str, u16)> {
    let protocols: &[&'static str] = match e.protocol {
        Protocol::Tcp => &["tcp"],
        Protocol::Udp => &["udp"],
        Protocol::Any => &["tcp", "udp"],
    };
    let ports: &[u16] = if e.ports.is_empty() { &[0] } else { &e.ports };
    let mut keys = Vec::new();
    for &net in &e.addresses {
        let net = unmap_ipv4(net);
        for &protocol in protocols {
            for &port in ports {
                keys.push((net, protocol, port));
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The kernel stores IPv4 as IPv4-mapped IPv6, so `::ffff:10.0.0.1/128` and `10.0.0.1/32` are
/// the same key there.
fn unmap_ipv4(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

/// `labels:`: keys of letters, digits, `.`, `-`, `_` and `/` (as Kubernetes writes them);
/// values any text of at most 256 characters.
fn check_labels(
    ctx: &mut Ctx<'_, '_>,
    raw: Option<&S<BTreeMap<String, S<String>>>>,
) -> Option<BTreeMap<String, String>> {
    let Some(raw) = raw else {
        return Some(BTreeMap::new());
    };
    let mut ok = true;
    let mut labels = BTreeMap::new();
    for (key, value) in &raw.value {
        let key_ok = !key.is_empty()
            && key.len() <= 128
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
        if !key_ok {
            ctx.error(
                value.referenced,
                format!("invalid label key `{key}`"),
                "use 1 to 128 letters, digits, `.`, `-`, `_` and `/`",
            );
            ok = false;
        } else if value.value.len() > 256 || value.value.chars().any(char::is_control) {
            ctx.error(
                value.referenced,
                format!("the value of label `{key}` is over 256 bytes or has control characters"),
                "shorten it",
            );
            ok = false;
        } else {
            labels.insert(key.clone(), value.value.clone());
        }
    }
    ok.then_some(labels)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::policy::PolicySet;
    use crate::policy::validate::tests::{assert_errors, with_head};

    #[test]
    fn endpoint_errors() {
        let yaml = with_head(
            "  endpoints:
    - name: no-addr
    - name: empty-addr
      addresses: []
    - name: bad-addr
      addresses: [10.0.0.1, not-an-ip, 10.0.0.1/8, 'fd00::1/64']
      ports: [0, 80, 80, 65536]
      protocol: sctp
      kind: database
    - name: empty-ports
      addresses: [10.1.0.0/16]
      ports: []
",
        );
        assert_errors(
            &yaml,
            &[
                "p.yaml:7:7: endpoint has no addresses or hosts — add addresses: [\"10.0.0.1\"] (IP addresses or CIDRs) or hosts: [vault.internal]",
                "p.yaml:9:18: addresses is empty — list at least one IP address or CIDR, like \"10.0.0.1\" or \"10.0.0.0/8\"",
                "p.yaml:11:29: `not-an-ip` is not an IP address or CIDR — write an address like 10.0.0.1 or ::1, or a network like 10.0.0.0/8",
                "p.yaml:11:40: address `10.0.0.1/8` has host bits set — write the network address: 10.0.0.0/8",
                "p.yaml:11:52: address `fd00::1/64` has host bits set — write the network address: fd00::/64",
                "p.yaml:12:15: port 0 is out of range — use a port from 1 to 65535",
                "p.yaml:12:22: port 80 is listed twice — list each port once",
                "p.yaml:12:26: port 65536 is out of range — use a port from 1 to 65535",
                "p.yaml:13:17: unknown protocol `sctp` — use tcp, udp or any",
                "p.yaml:14:13: unknown endpoint kind `database` — use secret-store, api or other",
                "p.yaml:17:14: ports is empty — list the ports, or remove ports to cover every port",
            ],
        );
    }

    #[test]
    fn hosts_are_validated() {
        let yaml = with_head(
            "  endpoints:
    - name: empty-hosts
      hosts: []
    - name: bad-hosts
      hosts: [vault.internal, 'Vault.Internal.', 10.0.0.1, -a.b, 'a..b', 'a_b.c', x.123]
    - name: both-empty
      addresses: []
      hosts: [ok.example]
",
        );
        assert_errors(
            &yaml,
            &[
                "p.yaml:8:14: hosts is empty — list at least one DNS name, like vault.internal, or remove hosts",
                "p.yaml:10:31: host `vault.internal` is listed twice — list each host once",
                "p.yaml:10:50: `10.0.0.1` is not a valid DNS name: it is an IP address, not a name — write a name like vault.internal (letters, digits, `-` and dots); put IP addresses under addresses",
                "p.yaml:10:60: `-a.b` is not a valid DNS name: label `-a` starts or ends with `-` — write a name like vault.internal (letters, digits, `-` and dots); put IP addresses under addresses",
                "p.yaml:10:66: `a..b` is not a valid DNS name: label `` is not 1 to 63 characters long — write a name like vault.internal (letters, digits, `-` and dots); put IP addresses under addresses",
                "p.yaml:10:74: `a_b.c` is not a valid DNS name: label `a_b` has the character '_' — write a name like vault.internal (letters, digits, `-` and dots); put IP addresses under addresses",
                "p.yaml:10:83: `x.123` is not a valid DNS name: its last label is all digits — write a name like vault.internal (letters, digits, `-` and dots); put IP addresses under addresses",
                "p.yaml:12:18: addresses is empty — list at least one IP address or CIDR, like \"10.0.0.1\" or \"10.0.0.0/8\"",
            ],
        );
    }

    #[test]
    fn audiences_name_one_endpoint_each() {
        let yaml = with_head(
            "  endpoints:
    - {name: vault, addresses: [10.0.0.1], audiences: [vault.example.org, 'https://vault']}
    - {name: api, addresses: [10.0.0.2], audiences: [vault.example.org]}
    - {name: web, addresses: [10.0.0.3], audiences: [vault]}
    - {name: bad, addresses: [10.0.0.4], audiences: ['', 'a b', x, x]}
    - {name: none, addresses: [10.0.0.5], audiences: []}
",
        );
        let errors = super::super::tests::errors(&yaml);
        let want = [
            "audience `vault.example.org` of endpoint `api` already names endpoint `vault`",
            "audience `vault` of endpoint `web` already names endpoint `vault`",
            "audience `` is not usable as a token audience",
            "audience `a b` is not usable as a token audience",
            "audience `x` is listed twice",
            "audiences is empty",
        ];
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
        for (got, want) in errors.iter().zip(want) {
            assert!(got.contains(want), "{got:?} does not say {want:?}");
        }
        let ok = with_head(
            "  endpoints:
    - {name: vault, addresses: [10.0.0.1], audiences: [vault.example.org]}
",
        );
        let set = PolicySet::from_str(Path::new("p.yaml"), &ok).unwrap();
        assert_eq!(
            set.endpoint_by_audience("vault.example.org")
                .unwrap()
                .1
                .name,
            "vault"
        );
        assert_eq!(set.endpoint_by_audience("vault").unwrap().1.name, "vault");
        assert!(set.endpoint_by_audience("nowhere").is_none());
    }

    #[test]
    fn hosts_alone_or_with_addresses() {
        let yaml = with_head(
            "  endpoints:
    - {name: a, hosts: [Vault.Internal., api.example.com], ports: [8200]}
    - {name: b, addresses: [10.0.0.1], hosts: [b.example]}
",
        );
        let set = PolicySet::from_str(Path::new("p.yaml"), &yaml).unwrap();
        let names =
            |i: usize| -> Vec<&str> { set.endpoints[i].hosts.iter().map(|h| h.as_str()).collect() };
        assert_eq!(names(0), ["vault.internal", "api.example.com"]);
        assert!(set.endpoints[0].addresses.is_empty());
        assert_eq!(names(1), ["b.example"]);
        assert_eq!(set.endpoints[1].addresses.len(), 1);
    }

    #[test]
    fn overlapping_endpoints() {
        let yaml = with_head(
            "  endpoints:
    - {name: a, addresses: [10.0.0.1], ports: [80, 443]}
    - {name: b, addresses: ['::ffff:10.0.0.1/128'], ports: [443], protocol: any}
    - {name: c, addresses: [10.0.0.1], ports: [443], protocol: udp}
    - {name: d, addresses: [10.0.0.0/24]}
",
        );
        assert_errors(
            &yaml,
            &[
                "p.yaml:8:7: endpoint `b` overlaps endpoint `a` (p.yaml:7:7) on 10.0.0.1/32 tcp port 443 — a destination must belong to one endpoint; merge them or narrow one's addresses, ports or protocol",
            ],
        );
    }
}
