//! The per-packet cost of the packet-drop fallback of connection ending, behind `cargo xtask
//! bench` (root only): unprotected traffic (connected UDP datagrams between two sockets of
//! this process, in a cgroup of its own, to a port no endpoint covers: every datagram one
//! egress and one ingress packet) with nothing attached, with the socket programs attached
//! (what every host runs; no program on the packet path), and with the packet-drop programs
//! attached as well (cgroup_skb egress and ingress: one `CONNECTIONS` lookup a packet). In
//! alternating rounds, the order rotating every round so that machine noise hits every side
//! alike; medians of the per-round ratios to detached, and of the packet programs' mean run
//! time from the kernel's BPF statistics. Numbers here are measurements, never pass/fail.
use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    time::Instant,
};

#[path = "common/attach.rs"]
mod attach;
mod common;

use anyhow::{Result, bail};
use attach::{BenchCgroup, per_run};
use common::median;
use serde_json::json;
use tessera_agent::{kernel, policy::PolicySet};
use tessera_common::program_names;

/// Datagrams per measured batch, and rounds (each round: one batch per side).
const BATCH: usize = 50_000;
const ROUNDS: usize = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Detached,
    Attached,
    PacketDrop,
}

fn main() -> Result<()> {
    let json_out = std::env::args()
        .skip_while(|a| a != "--json")
        .nth(1)
        .unwrap_or_else(|| "target/bench/packets.json".into());
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark loads eBPF programs and creates a cgroup: run it as root");
    }
    let root = kernel::cgroup2_root()?;
    let cg = BenchCgroup::create(&root)?;
    // Both sockets are made inside the cgroup: the kernel runs a cgroup's skb programs for
    // the sockets created there.
    cg.enter()?;
    let sink = UdpSocket::bind("127.0.0.1:0")?;
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(sink.local_addr()?)?;
    cg.leave()?;
    let received = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut n = 0u64;
        while sink.recv(&mut buf).is_ok_and(|len| len > 0) {
            n += 1;
        }
        n
    });

    let policy = bench_policy(&cg.rel)?;
    let mut enforcer = kernel::Enforcer::load()?;
    enforcer.sync_policy(&policy, &root)?;
    let _stats = kernel::enable_bpf_stats()?;

    let mut rates: Vec<(Side, f64)> = Vec::new();
    let mut egress_ns = Vec::new();
    let mut ingress_ns = Vec::new();
    let sides = [Side::Detached, Side::Attached, Side::PacketDrop];
    for round in 0..ROUNDS {
        for i in 0..sides.len() {
            let side = sides[(round + i) % sides.len()];
            enforcer.detach()?;
            if side != Side::Detached {
                enforcer.attach(&cg.path)?;
            }
            if side == Side::PacketDrop {
                enforcer.attach_packet_drop()?;
            }
            let before = enforcer.program_stats()?;
            rates.push((side, send_rate(&sender)?));
            let after = enforcer.program_stats()?;
            if side == Side::PacketDrop {
                egress_ns.push(per_run(&before, &after, program_names::CONNECTION_EGRESS));
                ingress_ns.push(per_run(&before, &after, program_names::CONNECTION_INGRESS));
            }
        }
    }
    enforcer.detach()?;
    drop(enforcer);
    // A zero-length datagram ends the receiver.
    sender.send(&[])?;
    let received = received.join().unwrap_or(0);

    let of = |side: Side| -> Vec<f64> {
        rates
            .iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, r)| *r)
            .collect()
    };
    let (detached, attached, packet_drop) =
        (of(Side::Detached), of(Side::Attached), of(Side::PacketDrop));
    let ratio = |a: &[f64]| -> Vec<f64> { a.iter().zip(&detached).map(|(a, d)| a / d).collect() };
    let (attached_ratios, packet_drop_ratios) = (ratio(&attached), ratio(&packet_drop));
    let report = json!({
        "benchmark": "tessera.packets/v1",
        "traffic": "connected UDP, 1-byte datagrams, unprotected port, both sockets in the cgroup",
        "batch": BATCH,
        "rounds": ROUNDS,
        "rate_detached_per_s": median(&detached),
        "rate_attached_per_s": median(&attached),
        "rate_packet_drop_per_s": median(&packet_drop),
        "ratio_attached_vs_detached": median(&attached_ratios),
        "ratio_packet_drop_vs_detached": median(&packet_drop_ratios),
        "connection_egress_mean_run_ns": median(&egress_ns),
        "connection_ingress_mean_run_ns": median(&ingress_ns),
        "datagrams_received": received,
        "samples": {
            "detached": detached, "attached": attached, "packet_drop": packet_drop,
            "attached_ratios": attached_ratios, "packet_drop_ratios": packet_drop_ratios,
            "egress_ns": egress_ns, "ingress_ns": ingress_ns,
        },
    });
    println!(
        "\nunprotected UDP datagrams/s (median of {ROUNDS} rounds of {BATCH}):\n  \
         detached {:.0}, socket programs attached {:.0} (ratio {:.3}), with packet drop {:.0} \
         (ratio {:.3})\n  packet-drop programs: egress {:.0} ns, ingress {:.0} ns a packet",
        median(&detached),
        median(&attached),
        median(&attached_ratios),
        median(&packet_drop),
        median(&packet_drop_ratios),
        median(&egress_ns),
        median(&ingress_ns),
    );
    let path = PathBuf::from(json_out);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("written to {}", path.display());
    Ok(())
}

/// Datagrams sent per second over one batch.
fn send_rate(sender: &UdpSocket) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..BATCH {
        sender.send(b"x")?;
    }
    Ok(BATCH as f64 / start.elapsed().as_secs_f64())
}

/// One workload (the bench cgroup) and one protected endpoint, which the traffic does not
/// reach: the packet programs see only unprotected packets.
fn bench_policy(cgroup_rel: &str) -> Result<PolicySet> {
    let y = format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: packets }}\nspec:\n  \
         trustDomain: bench.tessera.dev\n  workloads:\n    - {{ name: bench, match: {{ cgroup: \
         {cgroup_rel} }} }}\n  endpoints:\n    - {{ name: vault, addresses: [\"127.0.0.1/32\"], \
         ports: [1] }}\n  rules:\n    - name: bench\n      workloads: [bench]\n      endpoints: \
         [vault]\n      credential: {{ required: true, maxTtl: 1h }}\n"
    );
    Ok(PolicySet::from_str(Path::new("packets.yaml"), &y)?)
}
