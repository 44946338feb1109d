//! Every address of a local service is that service: an endpoint at `127.0.0.1` is protected
//! on the whole of `127.0.0.0/8`, `::1` and the host's own interface addresses (followed while
//! the agent runs), from this network namespace and from another one.
//!
//! Traffic goes to loopback and to the addresses of a veth pair each test creates (its host
//! end is an address of this host; its other end is in a network namespace of the test's own).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Agent, TestCgroup, TestNetns, Workload, extra_tcp_server, privileged, standard_policy,
    wildcard_tcp_server,
};

/// How long the agent may take to follow an address change before the test gives up (the
/// agent's own bound is 1 s; the measured time is printed).
const FOLLOW_DEADLINE: Duration = Duration::from_secs(10);

struct Setup {
    // Dropped in this order: the agent, then the cgroup, then the namespace.
    agent: Agent,
    _cg: TestCgroup,
    ns: TestNetns,
    app: std::path::PathBuf,
    port: u16,
}

/// A server on `0.0.0.0:port`, a namespace with a veth pair, and the agent enforcing the
/// standard policy (endpoint `vault` at `127.0.0.1/32` and `::1/128`, that port, TCP).
fn setup(name: &str) -> Setup {
    let ns = TestNetns::new();
    let cg = TestCgroup::new(name);
    let (app, _) = cg.child("app");
    let port = wildcard_tcp_server();
    let policy = standard_policy(&cg.rel, port, extra_tcp_server(), "enforce");
    let agent = Agent::start(&policy, &cg.path, &[]);
    Setup {
        agent,
        _cg: cg,
        ns,
        app,
        port,
    }
}

fn denied_as_vault<'a>(pid: u32, ip: &'a str, port: u16) -> impl Fn(&Value) -> bool + 'a {
    move |d| {
        d["process"]["tgid"] == pid
            && d["reason"] == "no_credential"
            && d["destination"]["ip"] == ip
            && d["destination"]["port"] == port
            && d["destination"]["endpoint"] == "vault"
    }
}

/// `call` until it returns `want`, for at most `FOLLOW_DEADLINE`; returns how long it took.
fn until(what: &str, want: &str, mut call: impl FnMut() -> String) -> Duration {
    let start = Instant::now();
    loop {
        let got = call();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < FOLLOW_DEADLINE,
            "{what}: still {got} after {FOLLOW_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_wildcard_server_is_protected_on_loopback_aliases_and_the_hosts_own_address() {
    if !privileged() {
        return;
    }
    let s = setup("local-alias");
    let host_addr = s.ns.addr(1);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    let targets = ["127.0.0.2", "127.255.255.254", host_addr.as_str()];
    for ip in targets {
        assert_eq!(
            bare.net("connect", 4, ip, s.port),
            "EPERM",
            "{ip} without a credential"
        );
        let d = s
            .agent
            .wait_decision(ip, denied_as_vault(bare.pid, ip, s.port));
        assert_eq!(d["verdict"], "deny", "{d}");
        assert_eq!(d["hook"], "connect4", "{d}");
    }
    holder.must_token("vault", Some(60));
    for ip in targets {
        assert_eq!(
            holder.net("connect", 4, ip, s.port),
            "ok",
            "{ip} with a credential"
        );
    }
    // Another port of the host's address is no endpoint's.
    let free = wildcard_tcp_server();
    assert_eq!(bare.net("connect", 4, &host_addr, free), "ok");
    let status = s.agent.status_json();
    let listed = status["local_addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        listed.iter().any(|a| a == host_addr.as_str()),
        "status lists the host's addresses local endpoints are protected on: {status}"
    );
}

#[test]
fn an_address_added_while_running_is_protected_and_one_removed_is_not() {
    if !privileged() {
        return;
    }
    let s = setup("local-follow");
    let added = s.ns.addr(5);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);
    s.ns.ip(&["addr", "add", &format!("{added}/32"), "dev", &s.ns.host_if]);
    let took = until("an address added to the host", "EPERM", || {
        bare.net("connect", 4, &added, s.port)
    });
    eprintln!("address added: protected after {took:?}");
    s.agent
        .wait_decision("added", denied_as_vault(bare.pid, &added, s.port));
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    holder.must_token("vault", Some(60));
    assert_eq!(holder.net("connect", 4, &added, s.port), "ok");

    // Moved to the namespace's end, the address is another host's: no endpoint's any more.
    s.ns.ip(&["addr", "del", &format!("{added}/32"), "dev", &s.ns.host_if]);
    s.ns.inside(&["addr", "add", &format!("{added}/32"), "dev", &s.ns.peer_if]);
    let _server = s.ns.server(s.port);
    let took = until("an address removed from the host", "ok", || {
        bare.net("connect", 4, &added, s.port)
    });
    eprintln!("address removed: unprotected after {took:?}");
    let status = s.agent.status_json();
    assert!(
        !status["local_addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == added.as_str())),
        "{status}"
    );
}

#[test]
fn a_caller_in_another_network_namespace_is_decided_by_the_agents_addresses() {
    if !privileged() {
        return;
    }
    let s = setup("local-netns");
    let host_addr = s.ns.addr(1);
    let own_addr = s.ns.addr(2);
    // The namespace's own server on the same port: its loopback and its own address reach it.
    let _server = s.ns.server(s.port);
    let mut bare = Workload::spawn_with(s.ns.command("python3"), &s.app, &s.agent.api);
    let mut holder = Workload::spawn_with(s.ns.command("python3"), &s.app, &s.agent.api);
    // The host's address reaches the host's server: protected from any namespace.
    assert_eq!(bare.net("connect", 4, &host_addr, s.port), "EPERM");
    s.agent.wait_decision(
        "host address",
        denied_as_vault(bare.pid, &host_addr, s.port),
    );
    // The caller's own loopback is decided as the host's loopback endpoint (the kernel's hook
    // does not tell network namespaces apart): closed, not open.
    assert_eq!(bare.net("connect", 4, "127.0.0.1", s.port), "EPERM");
    assert_eq!(bare.net("connect", 4, "0.0.0.0", s.port), "EPERM");
    // The caller's own interface address is not the host's: it reaches the namespace's server.
    assert_eq!(bare.net("connect", 4, &own_addr, s.port), "ok");
    holder.must_token("vault", Some(60));
    for ip in [host_addr.as_str(), "127.0.0.1", "0.0.0.0"] {
        assert_eq!(holder.net("connect", 4, ip, s.port), "ok", "{ip}");
    }
}

/// The record of a connect to another form of a local address keeps the address the caller
/// gave (`destination.original`) beside the one decided (`destination.ip`) and its endpoint;
/// a connect to the address itself (loopback, an alias, the host's address) has no `original`.
///
/// Ignored: this build's kernel programs do not fill `destination.original` yet (classifying
/// the address as the event is written, or carrying it through the decision, took 6.1's
/// verifier over the kernel matrix's budget: README, *The decision log*). Run it with
/// `--ignored` once they do.
#[test]
#[ignore = "the kernel programs do not fill destination.original yet (6.1 verifier budget)"]
fn a_record_keeps_the_address_the_caller_gave_beside_the_one_decided() {
    if !privileged() {
        return;
    }
    let s = setup("local-original");
    let host_addr = s.ns.addr(1);
    let mut bare = Workload::spawn(&s.app, &s.agent.api);
    // (family, as given, as decided, hook, the record's `original`)
    let cases = [
        (4u8, "0.0.0.0", "127.0.0.1", "connect4", Some("0.0.0.0")),
        (6, "::", "::1", "connect6", Some("::")),
        (
            6,
            "::ffff:0.0.0.0",
            "127.0.0.1",
            "connect6",
            Some("::ffff:0.0.0.0"),
        ),
        // IPv4-compatible (deprecated): decided as the IPv4 address it embeds.
        (
            6,
            "::127.0.0.1",
            "127.0.0.1",
            "connect6",
            Some("::127.0.0.1"),
        ),
        (4, "127.0.0.1", "127.0.0.1", "connect4", None),
        (4, "127.0.0.2", "127.0.0.2", "connect4", None),
        (4, host_addr.as_str(), host_addr.as_str(), "connect4", None),
        (6, "::1", "::1", "connect6", None),
        // IPv4-mapped: the IPv4 address itself, on an IPv6 socket.
        (6, "::ffff:127.0.0.1", "127.0.0.1", "connect6", None),
    ];
    for (family, given, decided, hook, original) in cases {
        let (result, d, _) = s
            .agent
            .settled(bare.pid, || bare.net("connect", family, given, s.port));
        assert_eq!(result, "EPERM", "{given} without a credential: {d}");
        assert!(
            denied_as_vault(bare.pid, decided, s.port)(&d) && d["hook"] == hook,
            "{given}: decided as {decided} (vault, {hook}): {d}"
        );
        match original {
            // Compared as addresses: the log writes `::127.0.0.1` as `::7f00:1` (RFC 5952).
            Some(ip) => {
                let logged = &d["destination"]["original"];
                assert_eq!(
                    logged["ip"].as_str().and_then(|a| a.parse::<IpAddr>().ok()),
                    Some(ip.parse::<IpAddr>().unwrap()),
                    "{given}: {d}"
                );
                assert_eq!(logged["port"], s.port, "{given}: {d}");
            }
            None => assert!(
                d["destination"].get("original").is_none(),
                "{given}: a connect to the address decided has no original: {d}"
            ),
        }
    }
    // An allow says the same.
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    holder.must_token("vault", Some(60));
    let (result, d, _) = s
        .agent
        .settled(holder.pid, || holder.net("connect", 4, "0.0.0.0", s.port));
    assert_eq!(result, "ok", "{d}");
    assert_eq!(d["reason"], "credential_valid", "{d}");
    assert_eq!(d["destination"]["ip"], "127.0.0.1", "{d}");
    assert_eq!(
        d["destination"]["original"],
        serde_json::json!({"ip": "0.0.0.0", "port": s.port}),
        "{d}"
    );
}
