//! Bypasses closed in the kernel, against the real kernel: raw IP sockets (refused at
//! cgroup/sock_create), packet sockets (the socket-syscall tracepoint kills the caller),
//! IPv4-compatible IPv6 destinations (decided as IPv4) and per-workload egress allow-lists.
//!
//! Each test creates its own cgroup, attaches a real `tessera run` to it only, and drives
//! workloads (tests/workload.py) inside it against loopback servers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::{Agent, Servers, TestCgroup, Workload, extra_tcp_server, privileged};

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_PACKET: i32 = 17;
const SOCK_DGRAM: i32 = 2;
const SOCK_RAW: i32 = 3;
const SOCK_PACKET: i32 = 10;
const IPPROTO_ICMP: i32 = 1;
const IPPROTO_ICMPV6: i32 = 58;

/// `app` (in a rule: restricted), `free` (in no rule, egress open: unrestricted), `locked`
/// (egress allow-list: vault with a credential, dns without), `outside` (in a rule, but in a
/// cgroup the agent is not attached to).
fn policy(rel: &str, outside_rel: &str, port: u16, mode: &str) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata: {{ name: bypass }}
spec:
  trustDomain: test.tessera.dev
  mode: {mode}
  workloads:
    - name: app
      match: {{ cgroup: {rel}/app }}
    - name: free
      match: {{ cgroup: {rel}/free }}
    - name: locked
      egress: allowlist
      match: {{ cgroup: {rel}/locked }}
    - name: outside
      match: {{ cgroup: {outside_rel} }}
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [{port}]
      protocol: tcp
    - name: dns
      addresses: ["127.0.0.1/32"]
      ports: [{port}]
      protocol: udp
  rules:
    - name: to-vault
      workloads: [app, locked, outside]
      endpoints: [vault]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
    - name: locked-dns
      workloads: [locked]
      endpoints: [dns]
"#
    )
}

struct Setup {
    agent: Agent,
    _cg: TestCgroup,
    outside: TestCgroup,
    app: PathBuf,
    free: PathBuf,
    locked: PathBuf,
    port: u16,
}

fn setup(name: &str, mode: &str, extra: &[&str]) -> Setup {
    setup_env(name, mode, extra, &[])
}

fn setup_env(name: &str, mode: &str, extra: &[&str], env: &[(&str, Option<&str>)]) -> Setup {
    let cg = TestCgroup::new(name);
    let outside = TestCgroup::new(&format!("{name}-outside"));
    let (app, _) = cg.child("app");
    let (free, _) = cg.child("free");
    let (locked, _) = cg.child("locked");
    let servers = Servers::start();
    let policy = policy(&cg.rel, &outside.rel, servers.tcp_port, mode);
    let agent = Agent::start_env(&policy, &cg.path, extra, env);
    Setup {
        agent,
        _cg: cg,
        outside,
        app,
        free,
        locked,
        port: servers.tcp_port,
    }
}

fn by(pid: u32, reason: &str) -> impl Fn(&Value) -> bool + '_ {
    move |d| d["process"]["tgid"] == pid && d["reason"] == reason
}

fn records_of(agent: &Agent, pid: u32) -> Vec<Value> {
    agent
        .decisions()
        .into_iter()
        .filter(|d| d["process"]["tgid"] == pid)
        .collect()
}

fn socket(w: &mut Workload, domain: i32, sock_type: i32, proto: i32) -> String {
    let out = w.send(json!({"op": "socket", "domain": domain, "type": sock_type, "proto": proto}));
    out["result"].as_str().unwrap_or("?").to_string()
}

/// Records are written within 50 ms of the event; a marker decision (a denied connect by the
/// same process) shows that everything before it was written.
fn flush_marker(s: &Setup, w: &mut Workload) {
    // `free` and `app` have no grant for vault: workload_not_allowed / no_credential.
    assert_eq!(w.connect4(s.port), "EPERM");
    s.agent.wait_decision("marker", |d| {
        d["process"]["tgid"] == w.pid && d["hook"] == "connect4"
    });
}

/// One python process that joins `cgroup`, asks for a socket and says whether it lived.
/// Returns (stdout, signal that ended it).
fn probe_socket(cgroup: &Path, domain: i32, sock_type: i32) -> (String, Option<i32>, u32) {
    probe_socket_proto(cgroup, domain, sock_type, 0)
}

fn probe_socket_proto(
    cgroup: &Path,
    domain: i32,
    sock_type: i32,
    proto: i32,
) -> (String, Option<i32>, u32) {
    let script = "import os, socket, sys\n\
        open(os.path.join(sys.argv[1], 'cgroup.procs'), 'w').write(str(os.getpid()))\n\
        s = socket.socket(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n\
        print('alive', flush=True)\n";
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(cgroup)
        .arg(domain.to_string())
        .arg(sock_type.to_string())
        .arg(proto.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait python3");
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        out.status.signal(),
        pid,
    )
}

#[test]
fn raw_ip_sockets_are_refused_to_restricted_workloads_only() {
    if !privileged() {
        return;
    }
    let s = setup("raw", "enforce", &[]);
    let mut app = Workload::spawn(&s.app, &s.agent.api);
    let mut locked = Workload::spawn(&s.locked, &s.agent.api);
    let mut free = Workload::spawn(&s.free, &s.agent.api);
    let mut outside = Workload::spawn(&s.outside.path, &s.agent.api);

    assert_eq!(socket(&mut app, AF_INET, SOCK_RAW, IPPROTO_ICMP), "EPERM");
    let d = s
        .agent
        .wait_decision("raw4", by(app.pid, "raw_socket_refused"));
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["enforced"], true);
    assert_eq!(d["mode"], "enforce");
    assert_eq!(d["hook"], "sock_create");
    assert_eq!(d["protocol"], "raw");
    assert_eq!(
        d["destination"],
        json!({"ip": "0.0.0.0", "port": 0, "endpoint": null})
    );
    assert_eq!(d["workload"]["name"], "app");
    assert_eq!(d["policy"]["rule"], Value::Null);

    assert_eq!(
        socket(&mut app, AF_INET6, SOCK_RAW, IPPROTO_ICMPV6),
        "EPERM"
    );
    let d = s.agent.wait_decision("raw6", |d| {
        by(app.pid, "raw_socket_refused")(d) && d["destination"]["ip"] == "::"
    });
    assert_eq!(d["enforced"], true);

    // An egress allow-list makes a workload restricted too.
    assert_eq!(
        socket(&mut locked, AF_INET, SOCK_RAW, IPPROTO_ICMP),
        "EPERM"
    );
    s.agent
        .wait_decision("locked raw", by(locked.pid, "raw_socket_refused"));

    // Other sockets of a restricted workload are not affected (a ping socket may be
    // refused by net.ipv4.ping_group_range, never with a record).
    assert_eq!(socket(&mut app, AF_INET, SOCK_DGRAM, 0), "ok");

    // Unrestricted workload, and a restricted one outside the attached cgroup: allowed.
    assert_eq!(socket(&mut free, AF_INET, SOCK_RAW, IPPROTO_ICMP), "ok");
    assert_eq!(socket(&mut free, AF_INET6, SOCK_RAW, IPPROTO_ICMPV6), "ok");
    assert_eq!(socket(&mut outside, AF_INET, SOCK_RAW, IPPROTO_ICMP), "ok");
    flush_marker(&s, &mut free);
    assert!(
        records_of(&s.agent, free.pid)
            .iter()
            .all(|d| d["hook"] == "connect4"),
        "{:#?}",
        s.agent.decisions()
    );
    // The process outside is not under the agent at all: no record.
    flush_marker(&s, &mut app);
    assert!(records_of(&s.agent, outside.pid).is_empty());
}

#[test]
fn raw_ip_sockets_in_audit_mode_are_allowed_and_logged() {
    if !privileged() {
        return;
    }
    let s = setup("rawaudit", "audit", &[]);
    let mut app = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(socket(&mut app, AF_INET, SOCK_RAW, IPPROTO_ICMP), "ok");
    let d = s
        .agent
        .wait_decision("raw audit", by(app.pid, "raw_socket_refused"));
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["enforced"], false);
    assert_eq!(d["mode"], "audit");

    // `--mode enforce` overrides the document's audit.
    let s = setup("rawforced", "audit", &["--mode", "enforce"]);
    let mut app = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(socket(&mut app, AF_INET, SOCK_RAW, IPPROTO_ICMP), "EPERM");
    let d = s
        .agent
        .wait_decision("raw forced", by(app.pid, "raw_socket_refused"));
    assert_eq!(d["enforced"], true);
}

#[test]
fn packet_sockets_kill_restricted_workloads() {
    if !privileged() {
        return;
    }
    packet_sockets_kill(&setup("packet", "enforce", &[]));
}

/// The same where tracing programs cannot read ancestor cgroup ids (kernels before 5.14): the
/// agent then has the socket-syscall tracepoint test the workload cgroups with
/// `bpf_current_task_under_cgroup` (forced here with `TESSERA_TRACING_ANCESTORS=0`).
#[test]
fn packet_sockets_kill_restricted_workloads_without_the_tracing_ancestor_helper() {
    if !privileged() {
        return;
    }
    let s = setup_env(
        "packet-noanc",
        "enforce",
        &[],
        &[("TESSERA_TRACING_ANCESTORS", Some("0"))],
    );
    assert!(
        s.agent
            .agent_log()
            .contains("tracing programs find workloads through WORKLOAD_CGROUPS"),
        "{}",
        s.agent.agent_log()
    );
    packet_sockets_kill(&s);
}

fn packet_sockets_kill(s: &Setup) {
    // Restricted: killed by SIGKILL on its way back from socket(), before it could print.
    let (out, signal, pid) = probe_socket(&s.app, AF_PACKET, SOCK_RAW);
    assert_eq!((out.as_str(), signal), ("", Some(9)), "pid {pid}");
    let d = s
        .agent
        .wait_decision("packet", by(pid, "packet_socket_refused"));
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["enforced"], true);
    assert_eq!(d["hook"], "socket_syscall");
    assert_eq!(d["protocol"], "raw");
    assert_eq!(
        d["destination"],
        json!({"ip": "::", "port": 0, "endpoint": null})
    );
    assert_eq!(d["workload"]["name"], "app");

    // The obsolete socket(AF_INET, SOCK_PACKET) is a packet socket too.
    let (out, signal, pid) = probe_socket(&s.locked, AF_INET, SOCK_PACKET);
    assert_eq!((out.as_str(), signal), ("", Some(9)), "pid {pid}");
    s.agent
        .wait_decision("sock_packet", by(pid, "packet_socket_refused"));

    // A cgroup below a restricted workload's is that workload's.
    let nested = s.app.join("nested");
    std::fs::create_dir_all(&nested).unwrap();
    let (out, signal, pid) = probe_socket(&nested, AF_PACKET, SOCK_RAW);
    assert_eq!((out.as_str(), signal), ("", Some(9)), "pid {pid}");
    let d = s
        .agent
        .wait_decision("nested", by(pid, "packet_socket_refused"));
    assert_eq!(d["workload"]["name"], "app");

    // Unrestricted, and restricted outside the attached cgroup: the socket is made.
    let (out, signal, free_pid) = probe_socket(&s.free, AF_PACKET, SOCK_RAW);
    assert_eq!((out.as_str(), signal), ("alive", None));
    let (out, signal, outside_pid) = probe_socket(&s.outside.path, AF_PACKET, SOCK_RAW);
    assert_eq!((out.as_str(), signal), ("alive", None));
    let mut marker = Workload::spawn(&s.app, &s.agent.api);
    flush_marker(s, &mut marker);
    assert!(records_of(&s.agent, free_pid).is_empty());
    assert!(records_of(&s.agent, outside_pid).is_empty());
}

#[test]
fn packet_sockets_in_audit_mode_are_made_and_logged() {
    if !privileged() {
        return;
    }
    let s = setup("packetaudit", "audit", &[]);
    let (out, signal, pid) = probe_socket(&s.app, AF_PACKET, SOCK_RAW);
    assert_eq!((out.as_str(), signal), ("alive", None));
    let d = s
        .agent
        .wait_decision("packet audit", by(pid, "packet_socket_refused"));
    assert_eq!(d["enforced"], false);
    assert_eq!(d["mode"], "audit");
}

#[test]
fn ipv4_compatible_ipv6_is_decided_as_ipv4() {
    if !privileged() {
        return;
    }
    let s = setup("compat", "enforce", &[]);
    let mut app = Workload::spawn(&s.app, &s.agent.api);
    let mut free = Workload::spawn(&s.free, &s.agent.api);

    // ::127.0.0.1 is vault's 127.0.0.1.
    assert_eq!(app.net("connect", 6, "::127.0.0.1", s.port), "EPERM");
    let d = s
        .agent
        .wait_decision("compat no credential", by(app.pid, "no_credential"));
    assert_eq!(d["hook"], "connect6");
    assert_eq!(
        d["destination"],
        json!({"ip": "127.0.0.1", "port": s.port, "endpoint": "vault"})
    );
    assert_eq!(free.net("connect", 6, "::127.0.0.1", s.port), "EPERM");
    s.agent
        .wait_decision("compat not allowed", by(free.pid, "workload_not_allowed"));

    // An allow is decided as IPv4 too: `locked` may use dns (udp 127.0.0.1) without a
    // credential. A UDP connect sends nothing (the route to ::127.0.0.1 leaves the host).
    let mut locked = Workload::spawn(&s.locked, &s.agent.api);
    let out = locked.send(
        json!({"op": "udp_connect", "family": 6, "host": "::127.0.0.1",
        "port": s.port, "send": false}),
    );
    assert_eq!(out["result"], "ok");
    let d = s
        .agent
        .wait_decision("compat allowed", by(locked.pid, "allowlisted"));
    assert_eq!(d["hook"], "connect6");
    assert_eq!(
        d["destination"],
        json!({"ip": "127.0.0.1", "port": s.port, "endpoint": "dns"})
    );

    // `::1` stays IPv6 loopback (vault lists it), and `::` is not an IPv4 address.
    assert_eq!(free.net("connect", 6, "::1", s.port), "EPERM");
    s.agent.wait_decision("::1", |d| {
        by(free.pid, "workload_not_allowed")(d) && d["destination"]["ip"] == "::1"
    });
}

#[test]
fn egress_allowlist_denies_unlisted_destinations() {
    if !privileged() {
        return;
    }
    let s = setup("egress", "enforce", &[]);
    let unlisted = extra_tcp_server();
    let mut locked = Workload::spawn(&s.locked, &s.agent.api);
    let mut app = Workload::spawn(&s.app, &s.agent.api);
    let mut free = Workload::spawn(&s.free, &s.agent.api);

    // Unlisted: EPERM, with a record that names no endpoint.
    assert_eq!(locked.connect4(unlisted), "EPERM");
    let d = s
        .agent
        .wait_decision("unlisted", by(locked.pid, "egress_not_allowlisted"));
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["enforced"], true);
    assert_eq!(d["hook"], "connect4");
    assert_eq!(
        d["destination"],
        json!({"ip": "127.0.0.1", "port": unlisted, "endpoint": null})
    );
    assert_eq!(d["workload"]["name"], "locked");
    assert_eq!(locked.net("connect", 6, "::1", unlisted), "EPERM");
    assert_eq!(locked.net("sendto", 4, "127.0.0.1", unlisted), "EPERM");
    s.agent.wait_decision("unlisted udp", |d| {
        by(locked.pid, "egress_not_allowlisted")(d) && d["hook"] == "sendmsg4"
    });

    // Listed: vault with a credential, dns (allowlisted rule) without one.
    assert_eq!(locked.connect4(s.port), "EPERM");
    s.agent
        .wait_decision("listed, no credential", by(locked.pid, "no_credential"));
    locked.must_token("vault", None);
    assert_eq!(locked.connect4(s.port), "ok");
    s.agent
        .wait_decision("listed", by(locked.pid, "credential_valid"));
    assert_eq!(locked.net("sendto", 4, "127.0.0.1", s.port), "ok");
    s.agent.wait_decision("dns", by(locked.pid, "allowlisted"));
    // vault's IPv6 address is listed as well.
    assert_eq!(locked.net("connect", 6, "::1", s.port), "ok");

    // Workloads without an allow-list are unaffected, and not logged.
    assert_eq!(app.connect4(unlisted), "ok");
    assert_eq!(free.connect4(unlisted), "ok");
    assert_eq!(free.net("sendto", 4, "127.0.0.1", unlisted), "ok");
    flush_marker(&s, &mut free);
    flush_marker(&s, &mut app);
    for pid in [app.pid, free.pid] {
        assert!(
            records_of(&s.agent, pid)
                .iter()
                .all(|d| d["reason"] != "egress_not_allowlisted"),
            "{:#?}",
            s.agent.decisions()
        );
    }
}

#[test]
fn egress_allowlist_in_audit_mode_allows_and_logs() {
    if !privileged() {
        return;
    }
    let s = setup("egressaudit", "audit", &[]);
    let unlisted = extra_tcp_server();
    let mut locked = Workload::spawn(&s.locked, &s.agent.api);
    assert_eq!(locked.connect4(unlisted), "ok");
    let d = s
        .agent
        .wait_decision("unlisted audit", by(locked.pid, "egress_not_allowlisted"));
    assert_eq!(d["enforced"], false);
    assert_eq!(d["mode"], "audit");
}

/// AF_PACKET sockets never reach cgroup/sock_create (only inet_create and inet6_create run
/// it): proven with the kernel's own run counter of the attached program.
#[test]
fn packet_sockets_do_not_pass_through_cgroup_sock_create() {
    if !privileged() {
        return;
    }
    use tessera_agent::kernel::{Enforcer, enable_bpf_stats};
    let cg = TestCgroup::new("sockcreate");
    let mut enforcer = Enforcer::load().expect("load");
    enforcer.attach(&cg.path).expect("attach");
    let _stats = enable_bpf_stats().expect("stats");
    let runs = |e: &Enforcer| {
        e.program_stats()
            .unwrap()
            .into_iter()
            .find(|p| p.name == tessera_common::program_names::SOCK_CREATE)
            .unwrap()
            .run_count
    };
    let before = runs(&enforcer);
    let (out, _, _) = probe_socket(&cg.path, AF_PACKET, SOCK_RAW);
    assert_eq!(out, "alive");
    let after_packet = runs(&enforcer);
    let (out, _, _) = probe_socket_proto(&cg.path, AF_INET, SOCK_RAW, IPPROTO_ICMP);
    assert_eq!(out, "alive");
    let after_raw = runs(&enforcer);
    // The probe opens no other socket: the AF_PACKET one leaves the counter alone, the raw
    // IP one adds one run.
    assert_eq!(after_packet, before, "AF_PACKET ran cgroup/sock_create");
    assert_eq!(after_raw, after_packet + 1, "AF_INET raw did not run it");
    enforcer.detach().unwrap();
}
