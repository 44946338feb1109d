//! Kernel ids stable by name (privileged): a reload that reorders workloads and endpoints (and
//! adds one) keeps the grants, decisions still name the right workload, endpoint and rule, and
//! a restarted agent adopts the pinned state with the same ids (`kernel-ids.json`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::{
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Agent, Servers, TestCgroup, Workload, extra_tcp_server, privileged};

/// `app` → `vault` (credential), `other` → `api` (none). `Order::Reordered`: the workloads and
/// endpoints in the other order, with a new workload `extra` first; `Order::Back`: the first
/// order again, `extra` last.
#[derive(Clone, Copy)]
enum Order {
    First,
    Reordered,
    Back,
}

fn policy(rel: &str, port: u16, api_port: u16, order: Order) -> String {
    let app = format!("    - name: app\n      match:\n        cgroup: {rel}/app\n");
    let other = format!("    - name: other\n      match:\n        cgroup: {rel}/other\n");
    let extra = format!("    - name: extra\n      match:\n        cgroup: {rel}/extra\n");
    let vault = format!(
        "    - name: vault\n      addresses: [\"127.0.0.1/32\"]\n      ports: [{port}]\n      protocol: tcp\n"
    );
    let api = format!(
        "    - name: api\n      addresses: [\"127.0.0.1/32\"]\n      ports: [{api_port}]\n      protocol: tcp\n"
    );
    let (workloads, endpoints) = match order {
        Order::First => (format!("{app}{other}"), format!("{vault}{api}")),
        Order::Reordered => (format!("{extra}{other}{app}"), format!("{api}{vault}")),
        Order::Back => (format!("{app}{other}{extra}"), format!("{vault}{api}")),
    };
    let rules = "    - name: other-to-api\n      workloads: [other]\n      endpoints: [api]\n\
                 \x20   - name: app-to-vault\n      workloads: [app]\n      endpoints: [vault]\n\
                 \x20     credential: { required: true, maxTtl: 10m, bind: process }\n";
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: ids\nspec:\n  \
         trustDomain: test.tessera.dev\n  mode: enforce\n  workloads:\n{workloads}  endpoints:\n\
         {endpoints}  rules:\n{rules}"
    )
}

fn write_policy(agent: &Agent, text: &str) {
    let tmp = agent.policy.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write policy");
    std::fs::rename(&tmp, &agent.policy).expect("rename policy");
}

fn wait_reloads(agent: &Agent, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent
        .agent_log()
        .matches("reload: new policy enforcing")
        .count()
        < count
    {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            agent.agent_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn ids_file(agent: &Agent) -> Value {
    let path = agent.dir.path().join("state/kernel-ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("kernel-ids.json")
}

/// The newest record of `pid` to `port`, after `seen` of them.
fn record_after(agent: &Agent, pid: u32, port: u16, seen: usize) -> Value {
    let matching = |d: &Value| d["process"]["tgid"] == pid && d["destination"]["port"] == port;
    agent.wait_decision("the connect after the reload", |_| {
        agent.decisions().iter().filter(|d| matching(d)).count() > seen
    });
    agent
        .decisions()
        .into_iter()
        .filter(|d| matching(d))
        .nth(seen)
        .expect("record")
}

#[test]
fn a_reordering_reload_and_a_restart_keep_grants_and_ids() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("ids");
    let (app_cg, _) = cg.child("app");
    let (other_cg, _) = cg.child("other");
    cg.child("extra");
    let servers = Servers::start();
    let (port, api_port) = (servers.tcp_port, extra_tcp_server());
    let mut agent = Agent::start(
        &policy(&cg.rel, port, api_port, Order::First),
        &cg.path,
        &[],
    );
    let before = ids_file(&agent);
    assert_eq!(before["workloads"]["ids"]["app"], 0, "{before}");
    assert_eq!(before["endpoints"]["ids"]["api"], 1, "{before}");

    let mut app = Workload::spawn(&app_cg, &agent.api);
    let mut other = Workload::spawn(&other_cg, &agent.api);
    app.must_token("vault", Some(600));
    assert_eq!(app.connect4(port), "ok");
    let first = record_after(&agent, app.pid, port, 0);
    assert_eq!(first["reason"], "credential_valid");

    // Reordered, plus a new workload first: every position changes, no name goes.
    write_policy(&agent, &policy(&cg.rel, port, api_port, Order::Reordered));
    agent.signal(Signal::SIGHUP);
    wait_reloads(&agent, 1);
    assert!(
        !agent.agent_log().contains("grants are "),
        "the grants were cleared:\n{}",
        agent.agent_log()
    );
    assert_eq!(
        app.connect4(port),
        "ok",
        "the grant did not survive the reorder"
    );
    let d = record_after(&agent, app.pid, port, 1);
    assert_eq!(d["verdict"], "allow", "{d:#}");
    assert_eq!(d["workload"]["name"], "app", "{d:#}");
    assert_eq!(d["destination"]["endpoint"], "vault", "{d:#}");
    assert_eq!(d["policy"]["rule"], "app-to-vault", "{d:#}");
    assert_ne!(d["policy"]["revision"], first["policy"]["revision"]);
    assert_eq!(other.connect4(api_port), "ok");
    let d = record_after(&agent, other.pid, api_port, 0);
    assert_eq!(d["workload"]["name"], "other", "{d:#}");
    assert_eq!(d["destination"]["endpoint"], "api", "{d:#}");
    assert_eq!(d["policy"]["rule"], "other-to-api", "{d:#}");
    let after = ids_file(&agent);
    for kind in ["workloads", "endpoints", "rules"] {
        for (name, id) in before[kind]["ids"].as_object().unwrap() {
            assert_eq!(
                &after[kind]["ids"][name], id,
                "{kind} {name} was renumbered"
            );
        }
    }
    assert_eq!(after["workloads"]["ids"]["extra"], 2, "{after}");

    // Killed, then restarted with the first order again (a new revision for the pinned set;
    // no name goes): the swap keeps the grants, the ids stay.
    agent.kill();
    write_policy(&agent, &policy(&cg.rel, port, api_port, Order::Back));
    agent.restart();
    agent.wait_log("enforcing (pinned)");
    assert_eq!(ids_file(&agent), after);
    assert_eq!(
        app.connect4(port),
        "ok",
        "the grant did not survive the restart"
    );
    let d = record_after(&agent, app.pid, port, 2);
    assert_eq!(d["workload"]["name"], "app", "{d:#}");
    assert_eq!(d["policy"]["rule"], "app-to-vault", "{d:#}");
    assert!(!agent.agent_log().contains("grants are "));
    let mut bare = Workload::spawn(&app_cg, &agent.api);
    assert_eq!(bare.connect4(port), "EPERM");

    // A reload that removes `extra` (which holds no grant): only the grants of what is gone
    // go, so `app` keeps its grant; the ids of the names that stay do not change.
    write_policy(&agent, &policy(&cg.rel, port, api_port, Order::First));
    agent.signal(Signal::SIGHUP);
    // The log spans both agents: the second reload in it.
    wait_reloads(&agent, 2);
    assert!(agent.agent_log().contains("their grants are gone"));
    assert_eq!(
        app.connect4(port),
        "ok",
        "a grant of a workload that stays was dropped"
    );
    let last = ids_file(&agent);
    assert_eq!(last["workloads"]["ids"]["app"], 0, "{last}");
    assert_eq!(
        last["workloads"]["ids"]["extra"], 2,
        "an id is never given again: {last}"
    );
}
