//! Endpoint `hosts:` against the real kernel and a real DNS server on loopback: resolved
//! addresses are protected, follow the answers as TTLs run out, and a rebind to another
//! endpoint's address neither opens that endpoint nor removes its protection, and a name moved
//! onto another name's address is denied to everyone there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::{
    net::{IpAddr, TcpListener, UdpSocket},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};
use serde_json::Value;
use support::{Agent, TestCgroup, Workload, privileged};

const HOST: &str = "vault.tessera.test";
/// A second name, for the endpoint `api` of [`two_hosts_policy`].
const OTHER: &str = "api.tessera.test";

/// A UDP DNS server on 127.0.0.1 answering A and AAAA queries for `HOST` from a table the test
/// changes
/// (`None`: SERVFAIL to everything).
struct DnsServer {
    port: u16,
    records: Table,
    /// `OTHER`'s records.
    other: Table,
}

/// (address, TTL) records; `None`: fail.
type Table = Arc<Mutex<Option<Vec<(IpAddr, u32)>>>>;

impl DnsServer {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        let port = socket.local_addr().expect("addr").port();
        let records: Table = Arc::default();
        let other: Table = Arc::new(Mutex::new(Some(Vec::new())));
        let (table, other_table) = (records.clone(), other.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let asks_other = query.queries.first().is_some_and(|q| {
                    q.name()
                        .eq_case(&Name::from_ascii(format!("{OTHER}.")).unwrap())
                });
                let reply = if asks_other {
                    answer(&query, OTHER, other_table.lock().unwrap().as_deref())
                } else {
                    answer(&query, HOST, table.lock().unwrap().as_deref())
                };
                let _ = socket.send_to(&reply.to_vec().expect("encode"), peer);
            }
        });
        DnsServer {
            port,
            records,
            other,
        }
    }

    fn set_other(&self, records: &[(&str, u32)]) {
        *self.other.lock().unwrap() = Some(
            records
                .iter()
                .map(|(ip, ttl)| (ip.parse().unwrap(), *ttl))
                .collect(),
        );
    }

    fn set(&self, records: &[(&str, u32)]) {
        *self.records.lock().unwrap() = Some(
            records
                .iter()
                .map(|(ip, ttl)| (ip.parse().unwrap(), *ttl))
                .collect(),
        );
    }

    fn fail(&self) {
        *self.records.lock().unwrap() = None;
    }
}

fn answer(query: &Message, name: &str, records: Option<&[(IpAddr, u32)]>) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    let Some(q) = query.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    reply.queries.push(q.clone());
    let Some(records) = records else {
        reply.metadata.response_code = ResponseCode::ServFail;
        return reply;
    };
    let host = Name::from_ascii(format!("{name}.")).unwrap();
    if !q.name().eq_case(&host) {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return reply;
    }
    // A type without records gets an empty answer (NODATA).
    for (ip, ttl) in records {
        let rdata = match (ip, q.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        reply
            .answers
            .push(Record::from_rdata(host.clone(), *ttl, rdata));
    }
    reply
}

/// TCP listeners on one port at each of these loopback addresses.
fn listen_on(addresses: &[&str]) -> u16 {
    'retry: for _ in 0..50 {
        let first = TcpListener::bind((addresses[0], 0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        let mut listeners = vec![first];
        for addr in &addresses[1..] {
            match TcpListener::bind((*addr, port)) {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'retry,
            }
        }
        for l in listeners {
            thread::spawn(move || for _c in l.incoming().flatten() {});
        }
        return port;
    }
    panic!("no common free port on {addresses:?}");
}

fn policy(cgroup_rel: &str, port: u16) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: hosts
spec:
  trustDomain: test.tessera.dev
  mode: enforce
  workloads:
    - name: app
      match:
        cgroup: {cgroup_rel}/app
  endpoints:
    - name: secret
      kind: secret-store
      addresses: ["127.0.0.9/32"]
      ports: [{port}]
    - name: vault
      kind: secret-store
      hosts: ["{HOST}"]
      ports: [{port}]
  rules:
    - name: app-to-secret
      workloads: [app]
      endpoints: [secret]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
"#
    )
}

/// `tessera status --json`'s entry for `HOST`.
fn host_status(agent: &Agent) -> Value {
    let admin = agent.admin.to_str().unwrap();
    let (code, out, err) = agent.cli(&["status", "--json", "--admin-socket", admin]);
    assert_eq!(code, 0, "tessera status failed: {err}");
    let status: Value = serde_json::from_str(&out).expect("status JSON");
    status["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["host"] == HOST).cloned())
        .unwrap_or_else(|| panic!("no {HOST} in status: {status:#}"))
}

fn address<'a>(host: &'a Value, ip: &str) -> Option<&'a Value> {
    host["addresses"].as_array()?.iter().find(|a| a["ip"] == ip)
}

/// Polls the status until `pred` holds for the host (the agent refreshes every 5 s at most
/// here: every TTL is at or below the 5 s floor, except the long one that must not expire).
fn wait_host(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let host = host_status(agent);
        if pred(&host) {
            return host;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; host status: {host:#}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn resolved_addresses_are_protected_and_follow_the_answers() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("hosts");
    let (app, _) = cg.child("app");
    let dns = DnsServer::start();
    // .2 expires soon after it leaves the answers; .4 is kept for 10 minutes after.
    dns.set(&[("127.0.0.2", 1), ("127.0.0.4", 600), ("::1", 600)]);
    let port = listen_on(&["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9", "::1"]);
    let server = format!("127.0.0.1:{}", dns.port);
    let agent = Agent::start(&policy(&cg.rel, port), &cg.path, &["--dns-server", &server]);

    let first = wait_host(&agent, "the first answer", |h| {
        ["127.0.0.2", "127.0.0.4", "::1"]
            .iter()
            .all(|ip| address(h, ip).is_some())
    });
    assert_eq!(first["endpoints"], serde_json::json!(["vault"]));

    let mut holder = Workload::spawn(&app, &agent.api);
    let mut bare = Workload::spawn(&app, &agent.api);
    // Not (yet) an address of the host: unprotected.
    assert_eq!(bare.net("connect", 4, "127.0.0.3", port), "ok");
    for ip in ["127.0.0.2", "127.0.0.4"] {
        assert_eq!(bare.net("connect", 4, ip, port), "EPERM", "bare to {ip}");
    }
    assert_eq!(
        bare.net("connect", 6, "::1", port),
        "EPERM",
        "bare to ::1 (AAAA)"
    );
    holder.must_token("vault", Some(600));
    for ip in ["127.0.0.2", "127.0.0.4"] {
        assert_eq!(holder.net("connect", 4, ip, port), "ok", "holder to {ip}");
    }
    assert_eq!(holder.net("connect", 6, "::1", port), "ok", "holder to ::1");
    let deny = agent.wait_decision("the deny at a resolved address", |d| {
        d["process"]["tgid"] == bare.pid
            && d["destination"]["ip"] == "127.0.0.2"
            && d["reason"] == "no_credential"
    });
    assert_eq!(deny["destination"]["endpoint"], "vault");
    assert_eq!(deny["policy"]["rule"], "app-to-vault");

    // The name moves to .3: .3 is protected from the next refresh on; .4 stays protected
    // (its TTL has minutes left); .2 goes once its TTL (the 5 s floor) has passed.
    dns.set(&[("127.0.0.3", 1)]);
    let moved = wait_host(&agent, "the new address", |h| {
        address(h, "127.0.0.3").is_some_and(|a| a["in_answer"] == true)
    });
    let old = address(&moved, "127.0.0.4").expect("the old address is kept");
    assert_eq!(old["in_answer"], false);
    assert_eq!(bare.net("connect", 4, "127.0.0.3", port), "EPERM");
    assert_eq!(bare.net("connect", 4, "127.0.0.4", port), "EPERM");
    assert_eq!(holder.net("connect", 4, "127.0.0.3", port), "ok");
    assert_eq!(holder.net("connect", 4, "127.0.0.4", port), "ok");
    wait_host(&agent, ".2 leaving after its TTL", |h| {
        address(h, "127.0.0.2").is_none()
    });
    assert_eq!(
        bare.net("connect", 4, "127.0.0.2", port),
        "ok",
        "an expired address is released"
    );

    // A rebind to `secret`'s address: `secret` keeps its own rule, and the vault credential
    // does not open it.
    dns.set(&[("127.0.0.3", 1), ("127.0.0.9", 1)]);
    let rebound = wait_host(&agent, "the rebind", |h| address(h, "127.0.0.9").is_some());
    assert_eq!(
        holder.net("connect", 4, "127.0.0.9", port),
        "EPERM",
        "a vault credential must not open `secret` through the rebind"
    );
    assert_eq!(bare.net("connect", 4, "127.0.0.9", port), "EPERM");
    let held = &address(&rebound, "127.0.0.9").unwrap()["held_by"];
    assert!(
        held.as_array().is_some_and(|h| h
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.starts_with("secret")))),
        "the rebound address should be held by `secret`: {rebound:#}"
    );
    let held_deny = agent.wait_decision("the holder's deny at the rebound address", |d| {
        d["process"]["tgid"] == holder.pid && d["destination"]["ip"] == "127.0.0.9"
    });
    assert_eq!(held_deny["destination"]["endpoint"], "secret");
    assert_eq!(held_deny["reason"], "no_credential");
    // And `secret` still opens with its own credential.
    holder.must_token("secret", Some(600));
    assert_eq!(holder.net("connect", 4, "127.0.0.9", port), "ok");
    // The name still protects .3.
    assert_eq!(bare.net("connect", 4, "127.0.0.3", port), "EPERM");
}

#[test]
fn a_failing_dns_server_keeps_the_last_addresses() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("hosts-fail");
    let (app, _) = cg.child("app");
    let dns = DnsServer::start();
    dns.set(&[("127.0.0.5", 1)]);
    let port = listen_on(&["127.0.0.5"]);
    let server = format!("127.0.0.1:{}", dns.port);
    let agent = Agent::start(&policy(&cg.rel, port), &cg.path, &["--dns-server", &server]);
    wait_host(&agent, "the first answer", |h| {
        address(h, "127.0.0.5").is_some()
    });

    // The server fails every lookup: the address stays protected.
    dns.fail();
    wait_host(&agent, "a failed lookup", |h| !h["last_error"].is_null());
    let host = host_status(&agent);
    assert!(address(&host, "127.0.0.5").is_some(), "{host:#}");
    let mut bare = Workload::spawn(&app, &agent.api);
    assert_eq!(bare.net("connect", 4, "127.0.0.5", port), "EPERM");
}

#[test]
fn a_reload_that_renumbers_endpoints_keeps_each_address_with_its_endpoint() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("hosts-reload");
    let (app, _) = cg.child("app");
    let dns = DnsServer::start();
    dns.set(&[("127.0.0.6", 1)]);
    let port = listen_on(&["127.0.0.6", "127.0.0.9"]);
    let server = format!("127.0.0.1:{}", dns.port);
    let before = policy(&cg.rel, port);
    let agent = Agent::start(&before, &cg.path, &["--dns-server", &server]);
    wait_host(&agent, "the first answer", |h| {
        address(h, "127.0.0.6").is_some()
    });

    // `vault` moves to position 0, `secret` to 1: the resolved address must follow `vault`.
    let secret =
        "    - name: secret\n      kind: secret-store\n      addresses: [\"127.0.0.9/32\"]\n";
    let start = before.find(secret).expect("the secret endpoint");
    let mut after = before.clone();
    after.replace_range(start..start + secret.len(), "");
    let rules = after.find("  rules:").expect("rules");
    after.insert_str(rules, &format!("{secret}      ports: [{port}]\n"));
    let first_ports = after
        .find(&format!("      ports: [{port}]\n"))
        .expect("ports");
    after.replace_range(
        first_ports..first_ports + format!("      ports: [{port}]\n").len(),
        "",
    );
    assert_ne!(after, before);
    std::fs::write(&agent.policy, &after).expect("rewrite the policy");

    let reloaded = |agent: &Agent| {
        let admin = agent.admin.to_str().unwrap();
        let (_, out, _) = agent.cli(&["status", "--json", "--admin-socket", admin]);
        serde_json::from_str::<Value>(&out).ok().is_some_and(|s| {
            s["hosts"][0]["endpoints"] == serde_json::json!(["vault"])
                && s["policy"]["reloads"].as_u64() >= Some(1)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reloaded(&agent) {
        assert!(
            Instant::now() < deadline,
            "the policy was not reloaded: {after}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    wait_host(&agent, "the answer under the new policy", |h| {
        address(h, "127.0.0.6").is_some()
    });
    let mut bare = Workload::spawn(&app, &agent.api);
    assert_eq!(bare.net("connect", 4, "127.0.0.6", port), "EPERM");
    let deny = agent.wait_decision("the deny after the reload", |d| {
        d["process"]["tgid"] == bare.pid && d["destination"]["ip"] == "127.0.0.6"
    });
    assert_eq!(deny["destination"]["endpoint"], "vault");
    let mut holder = Workload::spawn(&app, &agent.api);
    holder.must_token("vault", Some(600));
    assert_eq!(holder.net("connect", 4, "127.0.0.6", port), "ok");
    assert_eq!(holder.net("connect", 4, "127.0.0.9", port), "EPERM");
}

/// A restart never opens a hostname endpoint (issue 15 #2): the resolved addresses are saved in
/// the state directory and written again before the new agent's program set goes in, so a
/// process that keeps connecting across a kill and a restart (with the DNS server failing
/// meanwhile) is refused every time.
#[test]
fn a_restart_keeps_resolved_addresses_protected_while_dns_is_down() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("hosts-restart");
    let (app, _) = cg.child("app");
    let dns = DnsServer::start();
    dns.set(&[("127.0.0.6", 60)]);
    let port = listen_on(&["127.0.0.6"]);
    let server = format!("127.0.0.1:{}", dns.port);
    let mut agent = Agent::start(&policy(&cg.rel, port), &cg.path, &["--dns-server", &server]);
    wait_host(&agent, "the first answer", |h| {
        address(h, "127.0.0.6").is_some()
    });
    let mut bare = Workload::spawn(&app, &agent.api);
    assert_eq!(bare.net("connect", 4, "127.0.0.6", port), "EPERM");

    // Connects without a credential, every 10 ms for 10 s, counted by result.
    let script = format!(
        "import json, socket, time\nresults = {{}}\nend = time.time() + 10\n\
         while time.time() < end:\n    s = socket.socket()\n    try:\n        \
         s.connect(('127.0.0.6', {port}))\n        r = 'ok'\n    except OSError as e:\n        \
         r = str(e.errno)\n    s.close()\n    results[r] = results.get(r, 0) + 1\n    \
         time.sleep(0.01)\nprint(json.dumps(results))\n"
    );
    let loader = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec python3 -c "$1""#)
        .arg(&app)
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    agent.kill();
    dns.fail();
    agent.restart();
    let host = host_status(&agent);
    assert!(
        address(&host, "127.0.0.6").is_some(),
        "the saved address is not protected after the restart: {host:#}"
    );
    // The same policy and the same addresses: the pinned set was kept as it was.
    let log = agent.agent_log();
    assert_eq!(
        log.matches("adopted the pinned program set").count(),
        1,
        "{log}"
    );
    assert_eq!(bare.net("connect", 4, "127.0.0.6", port), "EPERM");
    let out = loader.wait_with_output().unwrap();
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        results.get("ok").is_none(),
        "connects got through across the restart: {results}"
    );
    assert!(results["1"].as_u64().unwrap_or(0) > 100, "{results}");
}

fn two_hosts_policy(cgroup_rel: &str, port: u16) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: two-hosts
spec:
  trustDomain: test.tessera.dev
  mode: enforce
  workloads:
    - name: app
      match:
        cgroup: {cgroup_rel}/app
  endpoints:
    - name: vault
      kind: secret-store
      hosts: ["{HOST}"]
      ports: [{port}]
    - name: api
      kind: api
      hosts: ["{OTHER}"]
      ports: [{port}]
  rules:
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
    - name: app-to-api
      workloads: [app]
      endpoints: [api]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
"#
    )
}

/// Issue 15 #2, the moved name: `vault`'s name moves onto the address `api`'s name holds.
/// Before, `api`'s rule stayed in force there, so an `api` credential reached what DNS now
/// calls vault; now the destination is contested and denied to everyone until the name
/// leaves it.
#[test]
fn a_name_moved_onto_another_names_address_is_denied_to_all() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("hosts-contested");
    let (app, _) = cg.child("app");
    let dns = DnsServer::start();
    dns.set(&[("127.0.0.7", 1)]);
    dns.set_other(&[("127.0.0.8", 600)]);
    let port = listen_on(&["127.0.0.7", "127.0.0.8"]);
    let server = format!("127.0.0.1:{}", dns.port);
    let agent = Agent::start(
        &two_hosts_policy(&cg.rel, port),
        &cg.path,
        &["--dns-server", &server],
    );
    wait_host(&agent, "the first answer", |h| {
        address(h, "127.0.0.7").is_some()
    });
    let mut api_holder = Workload::spawn(&app, &agent.api);
    let mut vault_holder = Workload::spawn(&app, &agent.api);
    api_holder.must_token("api", Some(600));
    vault_holder.must_token("vault", Some(600));
    // Settled: .8 is api's (the other name's status shows up through the kernel only).
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_holder.net("connect", 4, "127.0.0.8", port) != "ok" {
        assert!(
            Instant::now() < deadline,
            "api's address never opened for its holder"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(vault_holder.net("connect", 4, "127.0.0.8", port), "EPERM");
    assert_eq!(vault_holder.net("connect", 4, "127.0.0.7", port), "ok");

    // vault's name moves onto .8.
    dns.set(&[("127.0.0.8", 1)]);
    let moved = wait_host(&agent, "the move", |h| {
        address(h, "127.0.0.8").is_some_and(|a| a["in_answer"] == true)
    });
    let held = address(&moved, "127.0.0.8").unwrap()["held_by"].clone();
    assert!(
        held.as_array().is_some_and(|h| h.iter().any(|x| x
            .as_str()
            .is_some_and(|s| s.starts_with("api") && s.contains("contested")))),
        "{moved:#}"
    );
    assert_eq!(
        api_holder.net("connect", 4, "127.0.0.8", port),
        "EPERM",
        "an api credential must not reach what vault's name now points at"
    );
    assert_eq!(vault_holder.net("connect", 4, "127.0.0.8", port), "EPERM");
    let deny = agent.wait_decision("the deny at the contested address", |d| {
        d["process"]["tgid"] == api_holder.pid
            && d["destination"]["ip"] == "127.0.0.8"
            && d["verdict"] == "deny"
    });
    assert_eq!(deny["reason"], "workload_not_allowed", "{deny}");
    // No one endpoint decides the destination; the record names both that claim it.
    assert_eq!(deny["destination"]["endpoint"], Value::Null, "{deny}");
    assert_eq!(
        deny["destination"]["contested"],
        serde_json::json!(["api", "vault"]),
        "{deny}"
    );
    assert!(
        agent
            .agent_log()
            .contains("resolved address is another endpoint's resolved address too"),
        "no warning"
    );

    // The name moves back: once .8's own TTL for vault has run out, it is api's alone again.
    dns.set(&[("127.0.0.7", 1)]);
    wait_host(&agent, ".8 leaving vault", |h| {
        address(h, "127.0.0.8").is_none()
    });
    assert_eq!(api_holder.net("connect", 4, "127.0.0.8", port), "ok");
    assert_eq!(vault_holder.net("connect", 4, "127.0.0.8", port), "EPERM");
    assert_eq!(vault_holder.net("connect", 4, "127.0.0.7", port), "ok");
}
