//! The connect-path benchmark behind `cargo xtask bench` (root only).
//!
//! In one run, alternating so that machine noise hits both sides alike: the loopback TCP
//! connect+close rate of this process with the programs attached to its own cgroup vs detached;
//! and, from the kernel's BPF run-time statistics, the mean run time per call of connect4 and
//! sendmsg4. Each with 1k and with 100k endpoint entries loaded; then with 10 and with 10k
//! workloads, this process attested (its identity in `PROCESS_IDENTITY`, beside one for each
//! workload). Reports medians and ratios, prints a table and writes JSON. Numbers here are
//! measurements, never pass/fail.
use std::{
    net::{TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

#[path = "common/attach.rs"]
mod attach;
mod common;

use anyhow::{Context as _, Result, bail};
use attach::{BenchCgroup, per_run};
use common::median;
use serde_json::{Value, json};
use tessera_agent::{kernel, policy::PolicySet};
use tessera_common::{GRANT_ACTIVE, GrantSlot, ProcessIdentity};

/// Where a measurement's policy and identities stand.
#[derive(Clone, Copy)]
struct Shape {
    endpoints: usize,
    workloads: usize,
    /// This process has an attested identity (and so does each workload's fake process).
    attested: bool,
}

/// Keys of the fake processes' identities: above any pid (pid_max is at most 2^22).
const FAKE_TGID_BASE: u32 = 1 << 23;

/// Connects per measured batch, and batches per side.
const BATCH: usize = 2_000;
const ROUNDS: usize = 7;

fn main() -> Result<()> {
    let json_out = std::env::args()
        .skip_while(|a| a != "--json")
        .nth(1)
        .unwrap_or_else(|| "target/bench/connect.json".into());
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark loads eBPF programs and creates a cgroup: run it as root");
    }
    let root = kernel::cgroup2_root()?;
    let cgroup = BenchCgroup::create(&root)?;
    let server = TcpListener::bind("127.0.0.1:0")?;
    let tcp_port = server.local_addr()?.port();
    std::thread::spawn(move || for _c in server.incoming() {});
    // A destination no endpoint covers: the common case, decided by the first lookup.
    let free = TcpListener::bind("127.0.0.1:0")?;
    let free_port = free.local_addr()?.port();
    std::thread::spawn(move || for _c in free.incoming() {});
    let udp_sink = UdpSocket::bind("127.0.0.1:0")?;
    let udp_port = udp_sink.local_addr()?.port();
    let _udp_sink = Arc::new(udp_sink);

    // This process is the workload: its own connects are the ones decided.
    cgroup.enter()?;
    let mut results = Vec::new();
    let shapes = [
        (1_000, 1, false),
        (100_000, 1, false),
        (1_000, 10, true),
        (1_000, 10_000, true),
    ];
    for (endpoints, workloads, attested) in shapes {
        let shape = Shape {
            endpoints,
            workloads,
            attested,
        };
        results.push(measure(
            shape,
            &root,
            &cgroup,
            [tcp_port, free_port, udp_port],
        )?);
    }
    cgroup.leave()?;

    print_table(&results);
    let report = json!({
        "benchmark": "tessera.connect/v1",
        "batch": BATCH,
        "rounds": ROUNDS,
        "results": results,
    });
    let path = PathBuf::from(json_out);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

fn measure(
    shape: Shape,
    root: &Path,
    cg: &BenchCgroup,
    [tcp_port, free_port, udp_port]: [u16; 3],
) -> Result<Value> {
    let entries = shape.endpoints;
    let policy = bench_policy(shape, &cg.rel, tcp_port, udp_port)?;
    let mut enforcer = kernel::Enforcer::load()?;
    enforcer.sync_policy(&policy, root)?;
    // A grant for this process, so the connects take the full path: endpoint, workload, rule,
    // grant, event.
    let workload = policy
        .match_workload(&cg.rel, nix::unistd::getuid().as_raw())
        .context("workload")?;
    let grants = enforcer.grants();
    // The grants name this process's instance marker, as the agent's do.
    let owner = enforcer.identities().instance(std::process::id())?;
    for name in ["vault", "dns"] {
        let (endpoint, _) = policy.endpoint_by_name(name).context("endpoint")?;
        grants.put_process_grant(
            std::process::id(),
            owner,
            GrantSlot {
                expires_at_ns: kernel::boot_time_ns() + 3_600_000_000_000,
                credential_id: 1,
                endpoint_id: endpoint.0,
                workload_id: workload.0,
                state: GRANT_ACTIVE,
                flags: 0,
            },
        )?;
    }
    if shape.attested {
        // As the agent writes them after attesting: this process, and one fake process per
        // workload (keys no real process has).
        let identities = enforcer.identities();
        let cgroup_id = kernel::cgroup_id(&cg.path)?;
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let identity = |workload_id| ProcessIdentity {
            cgroup_id,
            workload_id,
            flags: 0,
            uid,
            gid,
        };
        identities.put(std::process::id(), identity(workload.0))?;
        for i in 1..shape.workloads {
            let i = u32::try_from(i)?;
            identities.put(FAKE_TGID_BASE + i, identity(i))?;
        }
    }
    // Drain events so the ring buffer never fills (a full buffer would be a different path).
    let mut events = enforcer.events()?;
    let drain = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(async move {
                let mut n = 0u64;
                while tokio::time::timeout(std::time::Duration::from_secs(3), events.next())
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    n += 1;
                }
                n
            })
        } else {
            0
        }
    });
    let _stats = kernel::enable_bpf_stats()?;

    let mut detached = Vec::new();
    let mut attached = Vec::new();
    let mut unprotected = Vec::new();
    let mut connect4_ns = Vec::new();
    let mut connect4_unprotected_ns = Vec::new();
    let mut sendmsg4_ns = Vec::new();
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    for _ in 0..ROUNDS {
        detached.push(connect_rate(tcp_port)?);
        enforcer.attach(&cg.path)?;
        let s0 = stats(&enforcer)?;
        attached.push(connect_rate(tcp_port)?);
        let s1 = stats(&enforcer)?;
        unprotected.push(connect_rate(free_port)?);
        let s2 = stats(&enforcer)?;
        for _ in 0..BATCH {
            udp.send_to(b"x", ("127.0.0.1", udp_port))?;
        }
        let s3 = stats(&enforcer)?;
        enforcer.detach()?;
        connect4_ns.push(per_run(&s0, &s1, tessera_common::program_names::CONNECT4));
        connect4_unprotected_ns.push(per_run(&s1, &s2, tessera_common::program_names::CONNECT4));
        sendmsg4_ns.push(per_run(&s2, &s3, tessera_common::program_names::SENDMSG4));
    }
    drop(enforcer);
    let drained = drain.join().unwrap_or(0);
    let ratios: Vec<f64> = attached.iter().zip(&detached).map(|(a, d)| a / d).collect();
    let unprotected_ratios: Vec<f64> = unprotected
        .iter()
        .zip(&detached)
        .map(|(a, d)| a / d)
        .collect();
    Ok(json!({
        "endpoint_entries": entries,
        "workloads": shape.workloads,
        "attested": shape.attested,
        "connect_rate_detached_per_s": median(&detached),
        "connect_rate_attached_per_s": median(&attached),
        "rate_ratio_attached_vs_detached": median(&ratios),
        "connect4_mean_run_ns": median(&connect4_ns),
        "unprotected_rate_ratio_attached_vs_detached": median(&unprotected_ratios),
        "connect4_unprotected_mean_run_ns": median(&connect4_unprotected_ns),
        "sendmsg4_mean_run_ns": median(&sendmsg4_ns),
        "events_read": drained,
        "samples": { "detached": detached, "attached": attached, "ratios": ratios,
                     "unprotected_attached": unprotected,
                     "connect4_ns": connect4_ns, "connect4_unprotected_ns": connect4_unprotected_ns,
                     "sendmsg4_ns": sendmsg4_ns },
    }))
}

/// Loopback TCP connect+close per second over one batch.
fn connect_rate(port: u16) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..BATCH {
        let s = TcpStream::connect(("127.0.0.1", port)).context("benchmark connect")?;
        drop(s);
    }
    Ok(BATCH as f64 / start.elapsed().as_secs_f64())
}

fn stats(enforcer: &kernel::Enforcer) -> Result<Vec<kernel::ProgramStats>> {
    Ok(enforcer.program_stats()?)
}

fn print_table(results: &[Value]) {
    println!(
        "\n{:>9} | {:>10} | {:>11} | {:>11} | {:>10} | {:>11} | {:>10} | {:>11} | {:>11}",
        "endpoints",
        "workloads",
        "detached/s",
        "attached/s",
        "ratio",
        "connect4 ns",
        "unprot. ratio",
        "unprot. ns",
        "sendmsg4 ns"
    );
    println!("{}", "-".repeat(118));
    for r in results {
        println!(
            "{:>9} | {:>10} | {:>11.0} | {:>11.0} | {:>10.3} | {:>11.0} | {:>13.3} | {:>10.0} | {:>11.0}",
            r["endpoint_entries"].as_u64().unwrap_or(0),
            format!(
                "{}{}",
                r["workloads"],
                if r["attested"].as_bool() == Some(true) {
                    " att."
                } else {
                    ""
                }
            ),
            r["connect_rate_detached_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["connect_rate_attached_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["rate_ratio_attached_vs_detached"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["connect4_mean_run_ns"].as_f64().unwrap_or(f64::NAN),
            r["unprotected_rate_ratio_attached_vs_detached"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["connect4_unprotected_mean_run_ns"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["sendmsg4_mean_run_ns"].as_f64().unwrap_or(f64::NAN),
        );
    }
}

/// `shape.endpoints` endpoints in all: `vault` (tcp) and `dns` (udp) on loopback, the rest
/// /32s in 10.0.0.0/8 and a share of CIDRs, as a large allow-list would have; and
/// `shape.workloads` workloads: `bench` (this cgroup), the others one uid each.
fn bench_policy(shape: Shape, cgroup_rel: &str, tcp_port: u16, udp_port: u16) -> Result<PolicySet> {
    let entries = shape.endpoints;
    use std::fmt::Write as _;
    let mut y = String::with_capacity(entries * 80);
    // Attested: `bench` also selects by gid, which only the agent checks, so the kernel decides
    // with the identity the benchmark writes for this process (as the agent would).
    let gid = if shape.attested {
        format!(", gid: {}", nix::unistd::getgid().as_raw())
    } else {
        String::new()
    };
    writeln!(
        y,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: bench }}\nspec:\n  trustDomain: bench.tessera.dev\n  workloads:\n    - {{ name: bench, match: {{ cgroup: {cgroup_rel}{gid} }} }}\n  endpoints:\n    - {{ name: vault, addresses: [\"127.0.0.1/32\"], ports: [{tcp_port}] }}\n    - {{ name: dns, addresses: [\"127.0.0.1/32\"], ports: [{udp_port}], protocol: udp }}"
    )?;
    let workloads_end = y.find("  endpoints:").context("policy text")?;
    let mut others = String::new();
    for i in 1..shape.workloads {
        writeln!(
            others,
            "    - {{ name: w{i}, match: {{ uid: {uid} }} }}",
            uid = 200_000 + i
        )?;
    }
    y.insert_str(workloads_end, &others);
    for i in 2..entries {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        // One in ten is a network, in ranges of their own so that no two overlap.
        if i % 10 == 0 {
            writeln!(
                y,
                "    - {{ name: e{i}, addresses: [\"{net}.{b}.{c}.0/24\"], ports: [443] }}",
                net = 20 + a
            )?;
        } else {
            writeln!(
                y,
                "    - {{ name: e{i}, addresses: [\"10.{a}.{b}.{c}/32\"], ports: [443] }}"
            )?;
        }
    }
    writeln!(
        y,
        "  rules:\n    - name: bench\n      workloads: [bench]\n      endpoints: [vault, dns]\n      credential: {{ required: true, maxTtl: 1h, bind: process }}"
    )?;
    Ok(PolicySet::from_str(Path::new("bench.yaml"), &y)?)
}
