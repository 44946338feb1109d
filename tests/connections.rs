//! A connection lives only while its holder holds a valid credential (issue 11): an open TCP
//! connection or connected UDP socket that keeps writing is ended when its credential is
//! revoked or expires (not before), survives a renewal, a restart of the agent keeps the record
//! of it, and `connections: outlive` keeps today's behaviour.
//!
//! Real kernel, real agent, real sockets: the holder is tests/workload.py in a test cgroup, the
//! servers are loopback listeners of this test that read until the connection ends. How soon
//! a connection ends is a measurement, not a check here: `cargo xtask bench --only revocation`
//! (agent/benches/revocation.rs) reports it; these tests wait at most `HANG_GUARD`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::collections::HashMap;
use std::io::Read as _;
use std::net::{TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::{thread, time::Duration};

use serde_json::{Value, json};
use support::{Agent, TestCgroup, Workload, privileged};

/// A TCP server that reads each connection until it ends, remembering how it ended, and a
/// UDP server that reads datagrams; both count what each peer (by its port) got through.
struct HoldingServers {
    tcp_port: u16,
    udp_port: u16,
    /// How each accepted connection ended: "eof", an errno name, in accept order.
    endings: Arc<Mutex<Vec<String>>>,
    /// Bytes received, by (protocol, the peer's port).
    received: Arc<Mutex<HashMap<(&'static str, u16), u64>>>,
}

impl HoldingServers {
    fn start() -> Self {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let endings = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(HashMap::new()));
        let seen = endings.clone();
        let tcp_port = tcp.local_addr().unwrap().port();
        let udp_port = udp.local_addr().unwrap().port();
        let counts = received.clone();
        thread::spawn(move || {
            for mut c in tcp.incoming().flatten() {
                let seen = seen.clone();
                let counts = counts.clone();
                thread::spawn(move || {
                    let peer = c.peer_addr().map_or(0, |a| a.port());
                    let mut buf = [0u8; 4096];
                    let ending = loop {
                        match c.read(&mut buf) {
                            Ok(0) => break "eof".to_owned(),
                            Ok(n) => {
                                *counts.lock().unwrap().entry(("tcp", peer)).or_insert(0) +=
                                    n as u64;
                            }
                            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                                break "ECONNRESET".to_owned();
                            }
                            Err(e) => break e.to_string(),
                        }
                    };
                    seen.lock().unwrap().push(ending);
                });
            }
        });
        let counts = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                *counts
                    .lock()
                    .unwrap()
                    .entry(("udp", from.port()))
                    .or_insert(0) += n as u64;
            }
        });
        HoldingServers {
            tcp_port,
            udp_port,
            endings,
            received,
        }
    }

    fn wait_ending(&self) -> String {
        for _ in 0..100 {
            if let Some(e) = self.endings.lock().unwrap().first() {
                return e.clone();
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("the server never saw its connection end");
    }

    /// What `conn` got through to the server so far.
    fn received(&self, conn: &Conn) -> u64 {
        self.received
            .lock()
            .unwrap()
            .get(&(conn.proto, conn.local_port))
            .copied()
            .unwrap_or(0)
    }
}

/// How the agent under test ends connections (`tessera run --connection-end`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mechanism {
    /// `auto`, which is sock-diag where the kernel has SOCK_DESTROY (the test skips otherwise).
    SockDiag,
    PacketDrop,
}

impl Mechanism {
    fn args(self) -> &'static [&'static str] {
        match self {
            Mechanism::SockDiag => &[],
            Mechanism::PacketDrop => &["--connection-end", "packet-drop"],
        }
    }

    fn status_name(self) -> &'static str {
        match self {
            Mechanism::SockDiag => "sock_diag_destroy",
            Mechanism::PacketDrop => "packet_drop",
        }
    }
}

/// How long a test waits for a connection to end before it calls the end missing: a guard
/// against a hang, far above the bench's figures (milliseconds).
const HANG_GUARD: Duration = Duration::from_secs(10);

/// A connected socket of a holder that keeps writing.
struct Conn {
    id: u64,
    proto: &'static str,
    local_port: u16,
}

fn policy(cgroup_rel: &str, tcp_port: u16, udp_port: u16) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: connections
spec:
  trustDomain: test.tessera.dev
  workloads:
    - name: app
      match:
        cgroup: {cgroup_rel}/app
    - name: legacy
      match:
        cgroup: {cgroup_rel}/legacy
  endpoints:
    - name: vault
      addresses: ["127.0.0.1/32"]
      ports: [{tcp_port}]
      protocol: tcp
    - name: dns
      addresses: ["127.0.0.1/32"]
      ports: [{udp_port}]
      protocol: udp
  rules:
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault, dns]
      credential: {{ required: true, maxTtl: 10m }}
    - name: legacy-to-vault
      workloads: [legacy]
      endpoints: [vault, dns]
      credential: {{ required: true, maxTtl: 10m }}
      connections: outlive
"#
    )
}

struct Setup {
    agent: Agent,
    servers: HoldingServers,
    mechanism: Mechanism,
    app: std::path::PathBuf,
    legacy: std::path::PathBuf,
    _cg: TestCgroup,
}

/// The agent with `mechanism`, or `None` (a skip, reported) when the kernel lacks it.
fn setup(name: &str, mechanism: Mechanism) -> Option<Setup> {
    let cg = TestCgroup::new(name);
    let (app, _) = cg.child("app");
    let (legacy, _) = cg.child("legacy");
    let servers = HoldingServers::start();
    let agent = Agent::start(
        &policy(&cg.rel, servers.tcp_port, servers.udp_port),
        &cg.path,
        mechanism.args(),
    );
    let found = agent.status_json()["kernel"]["connection_end"].clone();
    if found != mechanism.status_name() {
        assert_eq!(
            mechanism,
            Mechanism::SockDiag,
            "--connection-end packet-drop runs everywhere: {found}"
        );
        tessera_agent::testkit::skip(&format!(
            "this kernel cannot end sockets over sock_diag (kernel.connection_end {found})"
        ));
        return None;
    }
    Some(Setup {
        agent,
        servers,
        mechanism,
        app,
        legacy,
        _cg: cg,
    })
}

/// CLOCK_MONOTONIC in seconds: the clock of the workload's `failed_at`.
fn monotonic() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
}

/// Opens a connected socket to `port` and starts writing on it.
fn open_writing(w: &mut Workload, proto: &'static str, port: u16) -> Conn {
    let out = w.send(
        json!({"op": "open", "proto": proto, "family": 4, "host": "127.0.0.1", "port": port}),
    );
    assert_eq!(out["result"], "ok", "open {proto}: {out}");
    let conn = Conn {
        id: out["id"].as_u64().expect("id"),
        proto,
        local_port: out["port"].as_u64().expect("port") as u16,
    };
    let out = w.send(json!({"op": "keep_writing", "id": conn.id}));
    assert_eq!(out["result"], "ok", "{out}");
    conn
}

fn status(w: &mut Workload, conn: &Conn) -> Value {
    w.send(json!({"op": "conn_status", "id": conn.id}))
}

/// Waits up to `HANG_GUARD` for the socket's writes to fail; returns the status.
fn wait_failed(w: &mut Workload, conn: &Conn) -> Value {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let s = status(w, conn);
        if !s["error"].is_null() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the connection still writes after {HANG_GUARD:?}: {s}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The holder writes without an error, and what it writes reaches the server.
fn assert_alive(s: &Setup, w: &mut Workload, conn: &Conn, what: &str) {
    let before = s.servers.received(conn);
    let st = status(w, conn);
    assert!(st["error"].is_null(), "{what}: the connection ended: {st}");
    for _ in 0..100 {
        if s.servers.received(conn) > before {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: nothing the holder writes reaches the server: {st}");
}

/// Waits up to `HANG_GUARD` for the connection to end as the mechanism ends it; returns the
/// holder's status. SOCK_DESTROY: the holder's write fails. Packet drop: a connected UDP
/// socket's send fails (`EPERM`); a TCP connection's writes are queued by the holder's kernel
/// but stop reaching the server (and, below, never do).
fn wait_cut(s: &Setup, w: &mut Workload, conn: &Conn) -> Value {
    if s.mechanism == Mechanism::SockDiag || conn.proto == "udp" {
        return wait_failed(w, conn);
    }
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let (got, writes) = (s.servers.received(conn), status(w, conn)["writes"].clone());
        thread::sleep(Duration::from_millis(100));
        let st = status(w, conn);
        if s.servers.received(conn) == got && st["writes"] != writes {
            // Bytes in flight have landed: from now on, nothing gets through.
            let got = s.servers.received(conn);
            thread::sleep(Duration::from_millis(300));
            assert_eq!(
                s.servers.received(conn),
                got,
                "the holder's writes reach the server again"
            );
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the holder's writes still reach the server after {HANG_GUARD:?}: {st}"
        );
    }
}

/// The error a connection cut by `s`'s mechanism gives its holder (`None`: no error, the
/// packets are refused).
fn cut_error(s: &Setup, conn: &Conn) -> Option<&'static str> {
    match (s.mechanism, conn.proto) {
        (Mechanism::SockDiag, "tcp") => Some("ECONNABORTED"),
        // Disconnected by the kernel: a send has no destination any more.
        (Mechanism::SockDiag, _) => Some("EDESTADDRREQ"),
        (Mechanism::PacketDrop, "tcp") => None,
        // The egress program's drop is the send's error.
        (Mechanism::PacketDrop, _) => Some("EPERM"),
    }
}

fn assert_cut_error(s: &Setup, conn: &Conn, st: &Value) {
    match cut_error(s, conn) {
        Some(e) => assert_eq!(st["error"], e, "{st}"),
        None => assert!(st["error"].is_null(), "{st}"),
    }
}

fn revoke(agent: &Agent, jti: &str) {
    let admin = agent.admin.to_str().expect("utf-8");
    let (code, out, err) = agent.cli(&["revoke", "--jti", jti, "--admin-socket", admin]);
    assert_eq!(code, 0, "tessera revoke: {out} {err}");
}

fn connect_allow(agent: &Agent, pid: u32, port: u16) -> Value {
    agent.wait_decision("the connect's allow", |d| {
        d["process"]["tgid"] == pid
            && d["reason"] == "credential_valid"
            && d["destination"]["port"] == port
    })
}

fn ended(agent: &Agent, pid: u32, reason: &str, protocol: &str) -> Value {
    agent.wait_decision("the connection's end", |d| {
        d["process"]["tgid"] == pid
            && d["hook"] == "connection"
            && d["reason"] == reason
            && d["protocol"] == protocol
    })
}

fn revocation_ends_connections(mechanism: Mechanism, name: &str) {
    let Some(s) = setup(name, mechanism) else {
        return;
    };
    let status_json = s.agent.status_json();
    let admin = s.agent.admin.to_str().expect("utf-8");
    let (code, out, _) = s.agent.cli(&["status", "--admin-socket", admin]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "connections end:  with their credential ({}",
            mechanism.status_name()
        )),
        "{out}"
    );
    for p in status_json["programs"].as_array().expect("programs") {
        eprintln!("verified_insns {}: {}", p["name"], p["verified_insns"]);
    }
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    let tcp_jti = w.must_token("vault", Some(60));
    let udp_jti = w.must_token("dns", Some(60));
    let tcp = open_writing(&mut w, "tcp", s.servers.tcp_port);
    let udp = open_writing(&mut w, "udp", s.servers.udp_port);
    thread::sleep(Duration::from_millis(200));
    assert_alive(&s, &mut w, &tcp, "before revocation");
    assert_alive(&s, &mut w, &udp, "before revocation");

    // The TCP connection's credential: only the TCP connection ends.
    revoke(&s.agent, &tcp_jti);
    let failed = wait_cut(&s, &mut w, &tcp);
    assert_cut_error(&s, &tcp, &failed);
    if mechanism == Mechanism::SockDiag {
        assert_eq!(
            s.servers.wait_ending(),
            "ECONNRESET",
            "the server saw no reset"
        );
    }
    assert_alive(&s, &mut w, &udp, "another credential's socket");

    let allow = connect_allow(&s.agent, w.pid, s.servers.tcp_port);
    let end = ended(&s.agent, w.pid, "credential_revoked", "tcp");
    assert_eq!(end["verdict"], "deny");
    assert_eq!(end["enforced"], true);
    assert_eq!(end["destination"]["endpoint"], "vault");
    assert_eq!(end["destination"]["port"], s.servers.tcp_port);
    assert_eq!(end["credential"]["jti"], tcp_jti.as_str());
    assert_eq!(end["policy"]["rule"], "app-to-vault");
    assert_eq!(end["workload"]["name"], "app");
    assert_eq!(
        end["connection"]["decision_id"], allow["decision_id"],
        "the end names the connect's decision"
    );

    // The connected UDP socket: refused from then on.
    revoke(&s.agent, &udp_jti);
    let failed = wait_cut(&s, &mut w, &udp);
    assert_cut_error(&s, &udp, &failed);
    ended(&s.agent, w.pid, "credential_revoked", "udp");
    // A new connect is refused too.
    assert_eq!(w.connect4(s.servers.tcp_port), "EPERM");
    // The packet-drop records stay (the kernel goes by them) and are reported once.
    thread::sleep(Duration::from_millis(1500));
    let ends = s
        .agent
        .decisions()
        .iter()
        .filter(|d| d["hook"] == "connection" && d["process"]["tgid"] == w.pid)
        .count();
    assert_eq!(ends, 2, "each ended connection is one record");
}

#[test]
fn revocation_ends_open_tcp_and_connected_udp() {
    if !privileged() {
        return;
    }
    revocation_ends_connections(Mechanism::SockDiag, "conn-revoke");
}

#[test]
fn revocation_refuses_the_packets_of_open_tcp_and_connected_udp_with_packet_drop() {
    if !privileged() {
        return;
    }
    revocation_ends_connections(Mechanism::PacketDrop, "conn-revoke-pd");
}

/// The credential's `expires_at` on CLOCK_MONOTONIC (the token's `exp` is whole seconds,
/// and so is its grant's expiry).
fn expiry_monotonic(body: &Value) -> f64 {
    let at = humantime::parse_rfc3339(body["expires_at"].as_str().expect("expires_at"))
        .expect("RFC 3339");
    let wall = std::time::SystemTime::now();
    let ahead = match at.duration_since(wall) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    monotonic() + ahead
}

/// A connection ends with its credential's expiry, not before it: the holder's first failed
/// write (`failed`, on CLOCK_MONOTONIC) is past `expires`. How long after is printed.
fn assert_not_before_expiry(failed: &Value, expires: f64, what: &str) {
    let after_expiry = failed["failed_at"].as_f64().expect("failed_at") - expires;
    eprintln!("{what} ended {after_expiry:.3} s after its credential's expiry");
    assert!(
        after_expiry >= 0.0,
        "{what} ended {:.3} s before its credential's expiry",
        -after_expiry
    );
}

fn expiry_ends_and_renewal_keeps(mechanism: Mechanism, name: &str) {
    let Some(s) = setup(name, mechanism) else {
        return;
    };
    // Expiry: a 2 s credential.
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    let (status, body) = w.token("vault", Some(2));
    assert_eq!(status, 200, "{body}");
    let expires = expiry_monotonic(&body);
    let tcp = open_writing(&mut w, "tcp", s.servers.tcp_port);

    // Renewal: a holder that asks again before expiry keeps its connection.
    let mut r = Workload::spawn(&s.app, &s.agent.api);
    let (status, body) = r.token("vault", Some(3));
    assert_eq!(status, 200, "{body}");
    let first_expiry = expiry_monotonic(&body);
    let renewed = open_writing(&mut r, "tcp", s.servers.tcp_port);
    let (status, body) = r.token("vault", Some(5));
    assert_eq!(status, 200, "{body}");
    assert!(
        monotonic() < first_expiry - 0.5,
        "the renewal came too late for this test"
    );

    let failed = wait_cut(&s, &mut w, &tcp);
    assert_cut_error(&s, &tcp, &failed);
    if mechanism == Mechanism::SockDiag {
        assert_not_before_expiry(&failed, expires, "the connection");
    }
    ended(&s.agent, w.pid, "credential_expired", "tcp");

    let past_first = first_expiry + 0.5 - monotonic();
    if past_first > 0.0 {
        thread::sleep(Duration::from_secs_f64(past_first));
    }
    assert_alive(
        &s,
        &mut r,
        &renewed,
        "renewed before expiry, past the first expiry",
    );
    // The renewal's own expiry ends it.
    let failed = wait_cut(&s, &mut r, &renewed);
    assert_cut_error(&s, &renewed, &failed);
    if mechanism == Mechanism::SockDiag {
        assert_not_before_expiry(&failed, expiry_monotonic(&body), "the renewed connection");
    }
    ended(&s.agent, r.pid, "credential_expired", "tcp");
}

#[test]
fn expiry_ends_the_connection_and_renewal_keeps_it() {
    if !privileged() {
        return;
    }
    expiry_ends_and_renewal_keeps(Mechanism::SockDiag, "conn-expiry");
}

#[test]
fn expiry_refuses_the_packets_and_renewal_keeps_them_flowing_with_packet_drop() {
    if !privileged() {
        return;
    }
    expiry_ends_and_renewal_keeps(Mechanism::PacketDrop, "conn-expiry-pd");
}

fn outlive_and_restart(mechanism: Mechanism, name: &str) {
    let Some(mut s) = setup(name, mechanism) else {
        return;
    };
    let mut legacy = Workload::spawn(&s.legacy, &s.agent.api);
    let legacy_jti = legacy.must_token("vault", Some(60));
    let legacy_udp_jti = legacy.must_token("dns", Some(60));
    let kept = open_writing(&mut legacy, "tcp", s.servers.tcp_port);
    let kept_udp = open_writing(&mut legacy, "udp", s.servers.udp_port);

    let mut app = Workload::spawn(&s.app, &s.agent.api);
    let app_jti = app.must_token("vault", Some(60));
    let cut = open_writing(&mut app, "tcp", s.servers.tcp_port);

    // The record lives in the kernel, pinned: an agent restarted meanwhile still ends it.
    assert!(s.agent.stop(), "the agent did not stop cleanly");
    s.agent.restart();
    assert_eq!(
        s.agent.status_json()["kernel"]["connection_end"],
        mechanism.status_name()
    );

    revoke(&s.agent, &legacy_jti);
    revoke(&s.agent, &legacy_udp_jti);
    revoke(&s.agent, &app_jti);
    let failed = wait_cut(&s, &mut app, &cut);
    assert_cut_error(&s, &cut, &failed);
    ended(&s.agent, app.pid, "credential_revoked", "tcp");
    thread::sleep(Duration::from_millis(500));
    assert_alive(&s, &mut legacy, &kept, "connections: outlive");
    assert_alive(&s, &mut legacy, &kept_udp, "connections: outlive");
    assert!(
        !s.agent
            .decisions()
            .iter()
            .any(|d| d["hook"] == "connection" && d["process"]["tgid"] == legacy.pid),
        "an outlive connection was logged as ended"
    );
    // New connects still need a credential.
    assert_eq!(legacy.connect4(s.servers.tcp_port), "EPERM");
}

#[test]
fn outlive_keeps_connections_and_a_restart_keeps_the_record() {
    if !privileged() {
        return;
    }
    outlive_and_restart(Mechanism::SockDiag, "conn-outlive");
}

#[test]
fn outlive_keeps_connections_and_a_restart_keeps_the_record_with_packet_drop() {
    if !privileged() {
        return;
    }
    outlive_and_restart(Mechanism::PacketDrop, "conn-outlive-pd");
}

/// `tessera revoke --workload` after a restart: every connection of every holder of the
/// workload ends (the records, pinned, say which socket counts on what), another workload's
/// credential stays good.
fn revoke_workload_after_restart(mechanism: Mechanism, name: &str) {
    let Some(mut s) = setup(name, mechanism) else {
        return;
    };
    let mut first = Workload::spawn(&s.app, &s.agent.api);
    let (code, body) = first.token("vault", Some(60));
    assert_eq!(code, 200, "{body}");
    let spiffe_id = body["spiffe_id"].as_str().expect("spiffe_id").to_owned();
    first.must_token("dns", Some(60));
    let mut second = Workload::spawn(&s.app, &s.agent.api);
    second.must_token("vault", Some(60));
    let mut legacy = Workload::spawn(&s.legacy, &s.agent.api);
    legacy.must_token("vault", Some(60));
    let conns = [
        (0, open_writing(&mut first, "tcp", s.servers.tcp_port)),
        (0, open_writing(&mut first, "udp", s.servers.udp_port)),
        (1, open_writing(&mut second, "tcp", s.servers.tcp_port)),
    ];
    let mut holders = [first, second];
    for (h, c) in &conns {
        assert_alive(&s, &mut holders[*h], c, "before revocation");
    }

    assert!(s.agent.stop(), "the agent did not stop cleanly");
    s.agent.restart();
    let admin = s.agent.admin.to_str().expect("utf-8");
    let (code, out, err) =
        s.agent
            .cli(&["revoke", "--workload", &spiffe_id, "--admin-socket", admin]);
    assert_eq!(code, 0, "tessera revoke --workload: {out} {err}");

    for (h, c) in &conns {
        let failed = wait_cut(&s, &mut holders[*h], c);
        assert_cut_error(&s, c, &failed);
        ended(&s.agent, holders[*h].pid, "credential_revoked", c.proto);
    }
    // Another workload's credential is untouched.
    assert_eq!(legacy.connect4(s.servers.tcp_port), "ok");
    assert_eq!(holders[1].connect4(s.servers.tcp_port), "EPERM");
}

#[test]
fn revoking_a_workload_after_a_restart_ends_all_its_connections() {
    if !privileged() {
        return;
    }
    revoke_workload_after_restart(Mechanism::SockDiag, "conn-workload");
}

#[test]
fn revoking_a_workload_after_a_restart_ends_all_its_connections_with_packet_drop() {
    if !privileged() {
        return;
    }
    revoke_workload_after_restart(Mechanism::PacketDrop, "conn-workload-pd");
}
