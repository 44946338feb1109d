//! The time from a revocation to the holder's failed write, behind `cargo xtask bench` (root
//! only): the release `tessera run` attached to a scratch cgroup, a holder
//! (tests/workload.py) with an open connection writing a byte every 2 ms, and 100 revocations,
//! each of a new credential with a new connection, from the start of `tessera revoke` (a
//! process of its own, as an operator runs it) to the failure of the holder's next write (the
//! holder stamps it on CLOCK_MONOTONIC). For each way of ending connections this kernel has:
//! SOCK_DESTROY (TCP: `ECONNABORTED`; connected UDP: `EDESTADDRREQ`) and the packet-drop
//! fallback (connected UDP: `EPERM`; a TCP holder sees no error, its bytes stop reaching the
//! peer, so it is not timed here). p50/p99/max; measurements, never pass/fail.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "the tests' kit (tests/support.rs), shared here, panics with context"
)]
use std::{
    io::Read as _,
    net::{TcpListener, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

#[path = "../../tests/support.rs"]
mod support;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use support::{Agent, TestCgroup, Workload};

const REVOCATIONS: usize = 100;

fn main() -> Result<()> {
    let json_out = std::env::args()
        .skip_while(|a| a != "--json")
        .nth(1)
        .unwrap_or_else(|| "target/bench/revocation.json".into());
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark starts the agent and creates a cgroup: run it as root");
    }
    let (tcp_port, udp_port) = servers()?;
    let mut results = Vec::new();
    for (args, mechanism, proto) in [
        (&[][..], "sock_diag_destroy", "tcp"),
        (&[][..], "sock_diag_destroy", "udp"),
        (
            &["--connection-end", "packet-drop"][..],
            "packet_drop",
            "udp",
        ),
    ] {
        let cg = TestCgroup::new("bench-revoke");
        let (app, _) = cg.child("app");
        let agent = Agent::start(&policy(&cg.rel, tcp_port, udp_port), &cg.path, args);
        let found = agent.status_json()["kernel"]["connection_end"].clone();
        if found != mechanism {
            println!("{mechanism} {proto}: not on this kernel (connection_end {found}), skipped");
            continue;
        }
        let port = if proto == "tcp" { tcp_port } else { udp_port };
        let audience = if proto == "tcp" { "vault" } else { "dns" };
        let mut latencies = measure(&agent, &app, audience, proto, port)?;
        latencies.sort_by(f64::total_cmp);
        let ms = |i: usize| latencies[i] * 1e3;
        println!(
            "{mechanism} {proto}: revocation -> failed write over {REVOCATIONS} revocations: \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(REVOCATIONS / 2 - 1),
            ms(REVOCATIONS * 99 / 100 - 1),
            ms(REVOCATIONS - 1)
        );
        results.push(json!({
            "mechanism": mechanism,
            "protocol": proto,
            "revocations": REVOCATIONS,
            "p50_ms": ms(REVOCATIONS / 2 - 1),
            "p99_ms": ms(REVOCATIONS * 99 / 100 - 1),
            "max_ms": ms(REVOCATIONS - 1),
            "samples_ms": latencies.iter().map(|l| l * 1e3).collect::<Vec<_>>(),
        }));
    }
    let report = json!({ "benchmark": "tessera.revocation/v1", "results": results });
    let path = PathBuf::from(json_out);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("written to {}", path.display());
    Ok(())
}

/// Loopback servers that take whatever the holders write: TCP (read until the connection
/// ends) and UDP.
fn servers() -> Result<(u16, u16)> {
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    let ports = (tcp.local_addr()?.port(), udp.local_addr()?.port());
    thread::spawn(move || {
        for mut c in tcp.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while c.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while udp.recv_from(&mut buf).is_ok() {}
    });
    Ok(ports)
}

/// Seconds from the start of each `tessera revoke` to the holder's failed write.
fn measure(
    agent: &Agent,
    app: &std::path::Path,
    audience: &str,
    proto: &str,
    port: u16,
) -> Result<Vec<f64>> {
    let admin = agent.admin.to_str().context("admin socket path")?;
    let mut w = Workload::spawn(app, &agent.api);
    let mut latencies = Vec::with_capacity(REVOCATIONS);
    for _ in 0..REVOCATIONS {
        let jti = w.must_token(audience, Some(60));
        let out = w.send(
            json!({"op": "open", "proto": proto, "family": 4, "host": "127.0.0.1", "port": port}),
        );
        let id = out["id"].as_u64().with_context(|| format!("open: {out}"))?;
        w.send(json!({"op": "keep_writing", "id": id}));
        thread::sleep(Duration::from_millis(20));
        let before = monotonic();
        let (code, out, err) = agent.cli(&["revoke", "--jti", &jti, "--admin-socket", admin]);
        if code != 0 {
            bail!("tessera revoke: {out} {err}");
        }
        let failed = wait_failed(&mut w, id)?;
        latencies.push(failed["failed_at"].as_f64().context("failed_at")? - before);
    }
    Ok(latencies)
}

fn wait_failed(w: &mut Workload, id: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = w.send(json!({"op": "conn_status", "id": id}));
        if !s["error"].is_null() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the connection still writes 5 s after its revocation: {s}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// CLOCK_MONOTONIC in seconds: the clock of the holder's `failed_at`.
fn monotonic() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

fn policy(cgroup_rel: &str, tcp_port: u16, udp_port: u16) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: revocation }}\nspec:\n  \
         trustDomain: bench.tessera.dev\n  workloads:\n    - {{ name: app, match: {{ cgroup: \
         {cgroup_rel}/app }} }}\n  endpoints:\n    - {{ name: vault, addresses: [\"127.0.0.1/32\"], \
         ports: [{tcp_port}], protocol: tcp }}\n    - {{ name: dns, addresses: [\"127.0.0.1/32\"], \
         ports: [{udp_port}], protocol: udp }}\n  rules:\n    - name: app\n      workloads: [app]\n      \
         endpoints: [vault, dns]\n      credential: {{ required: true, maxTtl: 10m }}\n"
    )
}
