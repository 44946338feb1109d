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
