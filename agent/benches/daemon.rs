//! The benchmark of what a user runs, behind `cargo xtask bench` (root only): the release
//! `tessera run` attached to a scratch cgroup, 100k endpoint addresses loaded, writing its real
//! decision log, and a C client (benches/daemon/client.c, built with `cc`) making the calls.
//! Two more agents, each on a sibling cgroup of its own, change one dimension of the policy
//! (1k endpoint addresses with 10 workloads, and with 10k workloads): see `SETUPS`.
//!
//! Part 1, alternating rounds (the order flips every round, so machine noise hits every side
//! alike): loopback TCP connect+close from the workload's cgroup (the daemon attached) to a
//! protected endpoint whose rule needs no credential (every connect decided and logged), to an
//! unprotected port, and from a sibling cgroup with nothing attached; and from a second sibling
//! with an empty connect4 program attached (the floor of any program); the same protected
//! connects under the two other agents; unpaced UDP datagrams to a protected endpoint under each
//! agent. Medians of the ratios to detached, and of the programs' mean run time per call
//! (connect4, sendmsg4, sock_create, sock_release) from the kernel's BPF statistics; the ring
//! buffer wakeups while each side ran (a kprobe through tracefs, when there is one).
//!
//! Part 2, sustained load: UDP datagrams to a protected endpoint at a paced rate (each decided
//! by sendmsg4 and logged) for a while; the agent's CPU per decision from its own
//! /proc/PID/stat, the events the kernel dropped (from the agent's status), its RSS before and
//! after. Numbers here are measurements, never pass/fail.
use std::{
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;
// The crate root is benches/daemon.rs: its own modules sit beside its client in benches/daemon/.
#[path = "daemon/floor.rs"]
mod floor;
#[path = "daemon/report.rs"]
mod report;
#[path = "daemon/wakeups.rs"]
mod wakeups;

use anyhow::{Context as _, Result, bail};
use common::{mean_run_ns, median};
use floor::FloorProgram;
use report::print_report;
use serde_json::{Value, json};
use tessera_agent::kernel;
use tessera_common::program_names;
use wakeups::WakeupProbe;

/// The agent measured: this build's, or the binary `TESSERA_BENCH_AGENT` names (to compare
/// two builds on the same machine in the same conditions).
fn tessera() -> PathBuf {
    std::env::var_os("TESSERA_BENCH_AGENT").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_tessera")),
        PathBuf::from,
    )
}
const CLIENT_C: &str = include_str!("daemon/client.c");

/// Endpoint entries loaded (the loopback ones and the rest in 10.0.0.0/8).
const ENDPOINTS: usize = 100_000;
/// Connects per measured batch, and rounds (each round: one batch per side).
const BATCH: usize = 10_000;
const ROUNDS: usize = 7;

struct Args {
    json: PathBuf,
    rate: f64,
    seconds: f64,
}

/// The agents measured side by side, each attached to a child cgroup of its own: the main one
/// (100k endpoint addresses, 10 workloads) and two that each change one dimension, so that the
/// protected path's cost is seen at 1k and 100k endpoints and at 10 and 10k workloads.
struct Setup {
    cgroup: &'static str,
    endpoints: usize,
    workloads: usize,
}
const SETUPS: [Setup; 3] = [
    Setup {
        cgroup: "attached",
        endpoints: ENDPOINTS,
        workloads: 10,
    },
    Setup {
        cgroup: "small",
        endpoints: 1_000,
        workloads: 10,
    },
    Setup {
        cgroup: "wide",
        endpoints: 1_000,
        workloads: 10_000,
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Call {
    /// connect+close of a TCP socket.
    Tcp,
    /// sendto() of one UDP datagram, unpaced.
    Udp,
}

/// One side of the alternating rounds: BATCH calls from `cgroup` (to the protected endpoint or
/// to an unprotected port), decided by `SETUPS[agent]` when one is attached there.
struct Side {
    name: &'static str,
    cgroup: &'static str,
    call: Call,
    protected: bool,
    agent: Option<usize>,
}
const fn side(
    name: &'static str,
    cgroup: &'static str,
    call: Call,
    protected: bool,
    agent: Option<usize>,
) -> Side {
    Side {
        name,
        cgroup,
        call,
        protected,
        agent,
    }
}
const SIDES: [Side; 9] = [
    side("detached", "detached", Call::Tcp, true, None),
    side("protected", "attached", Call::Tcp, true, Some(0)),
    side("unprotected", "attached", Call::Tcp, false, Some(0)),
    side("floor", "floor", Call::Tcp, true, None),
    side("protected_1k_endpoints", "small", Call::Tcp, true, Some(1)),
    side("protected_10k_workloads", "wide", Call::Tcp, true, Some(2)),
    side("udp_protected", "attached", Call::Udp, true, Some(0)),
    side(
        "udp_protected_1k_endpoints",
        "small",
        Call::Udp,
        true,
        Some(1),
    ),
    side(
        "udp_protected_10k_workloads",
        "wide",
        Call::Udp,
        true,
        Some(2),
    ),
];
impl Call {
    /// The programs whose mean run time is read after a side an agent decides: those that run
    /// once per call (a UDP side creates one socket for the whole batch).
    fn programs(self) -> &'static [&'static str] {
        match self {
            Call::Tcp => &[
                program_names::CONNECT4,
                program_names::SOCK_CREATE,
                program_names::SOCK_RELEASE,
            ],
            Call::Udp => &[program_names::SENDMSG4],
        }
    }
}
/// The key of the empty program's samples.
const FLOOR_KEY: &str = "empty_connect4";

/// What one side measured over the rounds.
#[derive(Default)]
struct Samples {
    rate: Vec<f64>,
    /// Mean run time per call, one sample per round, by program name.
    programs: std::collections::BTreeMap<&'static str, Vec<f64>>,
    wakeups: u64,
    decisions: u64,
    cpu_ns: u64,
}

impl Samples {
    fn median_ns(&self, program: &str) -> f64 {
        self.programs.get(program).map_or(f64::NAN, |v| median(v))
    }
}

fn main() -> Result<()> {
    let args = parse_args();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark starts the agent and creates cgroups: run it as root");
    }
    let root = kernel::cgroup2_root()?;
    let scratch = Scratch::create(&root)?;
    let client = build_client(&scratch.dir)?;

    let (protected_port, free_port) = (loopback_server()?, loopback_server()?);
    // Never read: a full queue drops datagrams after their decision, which is what is measured.
    let udp_sink = UdpSocket::bind("127.0.0.1:0")?;
    let udp_port = udp_sink.local_addr()?.port();

    let _stats = kernel::enable_bpf_stats()?;
    let floor = FloorProgram::attach(&scratch.cgroup("floor"))?;
    let wakeups = WakeupProbe::install();
    if wakeups.is_none() {
        println!(
            "ring buffer wakeups not counted: no kprobe on bpf_ringbuf_notify through tracefs"
        );
    }
    // The agents load side by side; each is ready before the rounds start.
    let mut agents = Vec::new();
    for setup in &SETUPS {
        let policy = scratch.dir.join(format!("{}.yaml", setup.cgroup));
        std::fs::write(
            &policy,
            bench_policy(&scratch.rel(setup.cgroup), protected_port, udp_port, setup)?,
        )?;
        println!(
            "starting {} run on {} with {} endpoint addresses and {} workloads",
            tessera().display(),
            setup.cgroup,
            setup.endpoints,
            setup.workloads
        );
        agents.push(Daemon::spawn(&scratch, setup.cgroup, &policy)?);
    }
    for agent in &mut agents {
        agent.wait_ready()?;
    }
    let agent = &agents[0];
    let rss_start_kib = agent.rss_kib()?;
    let wakeup_count = || wakeups.as_ref().map_or(0, WakeupProbe::count);

    // Part 1: alternating rounds.
    let mut samples: Vec<Samples> = SIDES.iter().map(|_| Samples::default()).collect();
    for round in 0..ROUNDS {
        let mut order: Vec<usize> = (0..SIDES.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let side = &SIDES[i];
            let daemon = side.agent.map(|a| &agents[a]);
            let programs0 = daemon.map(Daemon::programs).transpose()?;
            let decided0 = daemon.map(Daemon::decisions).transpose()?.unwrap_or(0);
            let cpu0 = daemon.map(Daemon::cpu_ns).transpose()?.unwrap_or(0);
            let floor0 = floor.stats();
            let wake0 = wakeup_count();
            let cgroup = scratch.cgroup(side.cgroup);
            let (mode, port) = match (side.call, side.protected) {
                (Call::Tcp, true) => ("tcp", protected_port),
                (Call::Tcp, false) => ("tcp", free_port),
                (Call::Udp, _) => ("udp-burst", udp_port),
            };
            let ns = run_batch(&client, &cgroup, mode, port, BATCH)?;
            let s = &mut samples[i];
            s.rate.push(BATCH as f64 / (ns as f64 / 1e9));
            if let (Some(daemon), Some(programs0)) = (daemon, programs0) {
                let programs1 = daemon.programs()?;
                for &name in side.call.programs() {
                    let ns = per_run(&programs0, &programs1, name);
                    s.programs.entry(name).or_default().push(ns);
                }
                if side.protected {
                    // Every call was decided and logged: wait until the agent wrote them all.
                    let decided = daemon.wait_decisions(decided0 + BATCH as u64)?;
                    s.cpu_ns += daemon.cpu_ns()? - cpu0;
                    s.decisions += decided - decided0;
                }
            }
            if side.cgroup == "floor" {
                let ns = mean_run_ns(floor0, floor.stats());
                s.programs.entry(FLOOR_KEY).or_default().push(ns);
            }
            s.wakeups += wakeup_count() - wake0;
        }
        println!("round {}/{ROUNDS} done", round + 1);
    }
    let ratio = |side: usize| -> Vec<f64> {
        samples[side]
            .rate
            .iter()
            .zip(&samples[0].rate)
            .map(|(a, d)| a / d)
            .collect()
    };
    let (protected_ratios, unprotected_ratios, floor_ratios) = (ratio(1), ratio(2), ratio(3));
    // Every TCP side of the main agent creates and releases one socket per call.
    let socket_ns = |program: &str| {
        let mut v = samples[1]
            .programs
            .get(program)
            .cloned()
            .unwrap_or_default();
        v.extend(samples[2].programs.get(program).into_iter().flatten());
        median(&v)
    };

    // Part 2: sustained load through sendmsg4.
    println!(
        "sustained: {} datagrams/s for {} s to a protected endpoint",
        args.rate, args.seconds
    );
    let rss_before_kib = agent.rss_kib()?;
    let dropped0 = agent.dropped()?;
    let decided0 = agent.decisions()?;
    let cpu0 = agent.cpu_ns()?;
    let programs0 = agent.programs()?;
    let wake0 = wakeup_count();
    let (sent, sent_ns) = run_udp(
        &client,
        &scratch.cgroup("attached"),
        udp_port,
        args.rate,
        args.seconds,
    )?;
    let programs1 = agent.programs()?;
    let decided1 = agent.wait_decisions(decided0 + sent)?;
    let cpu1 = agent.cpu_ns()?;
    let sustained_wakeups = wakeup_count() - wake0;
    // The agent reads the kernel's drop counter once a second.
    std::thread::sleep(Duration::from_millis(1_500));
    let dropped1 = agent.dropped()?;
    let rss_after_kib = agent.rss_kib()?;
    let log_errors = agent.status()?["counters"]["decision_log_errors"]
        .as_u64()
        .unwrap_or(0);
    drop(udp_sink);
    let sustained_decisions = decided1 - decided0;
    let (protected, scale) = (&samples[1], |i: usize, program: &str| {
        samples[i].median_ns(program)
    });
    let per_decision = |s: &Samples| s.cpu_ns as f64 / s.decisions.max(1) as f64;
    let sides: serde_json::Map<String, Value> = SIDES
        .iter()
        .zip(&samples)
        .map(|(side, s)| {
            let programs: serde_json::Map<String, Value> = s
                .programs
                .iter()
                .map(|(name, v)| {
                    (
                        (*name).to_owned(),
                        json!({ "median": median(v), "samples": v }),
                    )
                })
                .collect();
            let value = json!({
                "cgroup": side.cgroup,
                "call": if side.call == Call::Tcp { "tcp connect+close" } else { "udp sendto" },
                "protected": side.protected,
                "rate_per_s": median(&s.rate),
                "rate_samples": s.rate,
                "mean_run_ns": programs,
                "ringbuf_wakeups": s.wakeups,
                "decisions": s.decisions,
                "agent_cpu_ns_per_decision": per_decision(s),
            });
            (side.name.to_owned(), value)
        })
        .collect();
    let report = json!({
        "benchmark": "tessera.daemon/v1",
        "agent": tessera().display().to_string(),
        "machine": machine(),
        "endpoint_entries": ENDPOINTS,
        "batch": BATCH,
        "rounds": ROUNDS,
        "connect": {
            "rate_detached_per_s": median(&samples[0].rate),
            "rate_protected_per_s": median(&samples[1].rate),
            "rate_unprotected_per_s": median(&samples[2].rate),
            "rate_floor_per_s": median(&samples[3].rate),
            "ratio_protected_vs_detached": median(&protected_ratios),
            "ratio_unprotected_vs_detached": median(&unprotected_ratios),
            "ratio_floor_vs_detached": median(&floor_ratios),
            "connect4_protected_mean_ns": protected.median_ns(program_names::CONNECT4),
            "connect4_unprotected_mean_ns": samples[2].median_ns(program_names::CONNECT4),
            "empty_connect4_mean_ns": samples[3].median_ns(FLOOR_KEY),
            "sock_create_mean_ns": socket_ns(program_names::SOCK_CREATE),
            "sock_release_mean_ns": socket_ns(program_names::SOCK_RELEASE),
            "agent_cpu_ns_per_decision": per_decision(protected),
            "decisions": protected.decisions,
            "ringbuf_wakeups_protected": protected.wakeups,
            "samples": {
                "ratio_protected": protected_ratios, "ratio_unprotected": unprotected_ratios,
                "ratio_floor": floor_ratios,
            },
        },
        "scaling": {
            "connect4_protected_mean_ns": {
                "endpoints_100k_workloads_10": scale(1, program_names::CONNECT4),
                "endpoints_1k_workloads_10": scale(4, program_names::CONNECT4),
                "endpoints_1k_workloads_10k": scale(5, program_names::CONNECT4),
            },
            "sendmsg4_protected_mean_ns": {
                "endpoints_100k_workloads_10": scale(6, program_names::SENDMSG4),
                "endpoints_1k_workloads_10": scale(7, program_names::SENDMSG4),
                "endpoints_1k_workloads_10k": scale(8, program_names::SENDMSG4),
            },
        },
        "sides": sides,
        "sustained": {
            "target_rate_per_s": args.rate,
            "seconds": sent_ns as f64 / 1e9,
            "sent": sent,
            "achieved_rate_per_s": sent as f64 / (sent_ns as f64 / 1e9),
            "decisions_logged": sustained_decisions,
            "events_dropped": dropped1 - dropped0,
            "decision_log_errors": log_errors,
            "agent_cpu_ns_per_decision": (cpu1 - cpu0) as f64 / sustained_decisions.max(1) as f64,
            "sendmsg4_mean_ns": per_run(&programs0, &programs1, program_names::SENDMSG4),
            "ringbuf_wakeups": sustained_wakeups,
            "rss_kib": { "start": rss_start_kib, "before": rss_before_kib, "after": rss_after_kib },
        },
        "ringbuf_wakeups_counted": wakeups.is_some(),
    });
    drop(agents);
    drop(wakeups);
    drop(floor);
    print_report(&report);
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", args.json.display());
    Ok(())
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Args {
        json: value("--json")
            .unwrap_or_else(|| "target/bench/daemon.json".into())
            .into(),
        rate: value("--rate")
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000.0),
        seconds: value("--seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60.0),
    }
}

/// A loopback TCP server that accepts and closes, on a thread; its port. The accept queue is
/// deep (4096, not std's 128): on a loaded machine the accepting thread may wait for a CPU, and
/// an overflowing queue drops SYNs, which costs the client a 1 s retransmit.
fn loopback_server() -> Result<u16> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))?;
    listen(&fd, Backlog::new(4096)?)?;
    let server = TcpListener::from(fd);
    let port = server.local_addr()?.port();
    std::thread::spawn(move || for _c in server.incoming() {});
    Ok(port)
}

fn build_client(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("client.c");
    let bin = dir.join("client");
    std::fs::write(&src, CLIENT_C)?;
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .context("running cc (the benchmark's client is C)")?;
    if !status.success() {
        bail!("cc could not build {}", src.display());
    }
    Ok(bin)
}

/// COUNT calls from `cgroup` (`tcp`: connect+close; `udp-burst`: unpaced datagrams); the ns
/// they took.
fn run_batch(client: &Path, cgroup: &Path, mode: &str, port: u16, count: usize) -> Result<u64> {
    let out = client_output(
        client,
        cgroup,
        &[mode, &port.to_string(), &count.to_string()],
    )?;
    Ok(out.trim().parse()?)
}

/// Datagrams at `rate` for `seconds` from `cgroup`: (sent, ns taken).
fn run_udp(client: &Path, cgroup: &Path, port: u16, rate: f64, seconds: f64) -> Result<(u64, u64)> {
    let out = client_output(
        client,
        cgroup,
        &[
            "udp",
            &port.to_string(),
            &rate.to_string(),
            &seconds.to_string(),
        ],
    )?;
    let mut it = out.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(sent)), Some(Ok(ns))) => Ok((sent, ns)),
        _ => bail!("unexpected client output {out:?}"),
    }
}

fn client_output(client: &Path, cgroup: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(client)
        .arg(cgroup.join("cgroup.procs"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("running the benchmark client")?;
    if !out.status.success() {
        bail!("the benchmark client failed ({})", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn per_run(before: &Value, after: &Value, name: &str) -> f64 {
    let find = |v: &Value| {
        v.as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .map(|p| {
                (
                    p["run_count"].as_u64().unwrap_or(0),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0))
    };
    mean_run_ns(find(before), find(after))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": release,
        "loadavg_at_end": load.trim(),
    })
}

/// `vault` (tcp, the connect side) and `dns` (udp, the UDP sides) on loopback, protected by a
/// rule that needs no credential, so each call is allowed and logged; then the rest of the
/// endpoint entries as /32s in 10.0.0.0/8. The other workloads are in the same cgroup, each for
/// a uid of its own (the benchmark runs as root): each is one more `WORKLOADS` entry, none the
/// caller's.
fn bench_policy(cgroup_rel: &str, tcp_port: u16, udp_port: u16, setup: &Setup) -> Result<String> {
    use std::fmt::Write as _;
    let mut y = String::with_capacity(setup.endpoints * 64 + setup.workloads * 96);
    writeln!(
        y,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: bench }}\nspec:\n  trustDomain: bench.tessera.dev\n  workloads:\n    - {{ name: bench, match: {{ cgroup: {cgroup_rel} }} }}"
    )?;
    for i in 1..setup.workloads {
        let uid = 10_000 + i;
        writeln!(
            y,
            "    - {{ name: w{i}, match: {{ cgroup: {cgroup_rel}, uid: {uid} }} }}"
        )?;
    }
    writeln!(
        y,
        "  endpoints:\n    - {{ name: vault, addresses: [\"127.0.0.1/32\"], ports: [{tcp_port}] }}\n    - {{ name: dns, addresses: [\"127.0.0.1/32\"], ports: [{udp_port}], protocol: udp }}"
    )?;
    for i in 2..setup.endpoints {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        writeln!(
            y,
            "    - {{ name: e{i}, addresses: [\"10.{a}.{b}.{c}/32\"], ports: [443] }}"
        )?;
    }
    writeln!(
        y,
        "  rules:\n    - name: bench\n      workloads: [bench]\n      endpoints: [vault, dns]\n      credential: {{ required: false }}"
    )?;
    Ok(y)
}

/// The children of the scratch cgroup.
const CGROUPS: [&str; 5] = ["attached", "small", "wide", "detached", "floor"];

/// `<cgroup2>/tessera-bench-daemon-<pid>` with `attached`, `small` and `wide` (the agents'
/// attach points and their workloads: see `SETUPS`), `detached` (nothing) and `floor` (an empty
/// program); a scratch directory for the agents' files. Removed on drop.
struct Scratch {
    base: PathBuf,
    rel: String,
    dir: PathBuf,
}

impl Scratch {
    fn create(root: &Path) -> Result<Self> {
        let rel = format!("/tessera-bench-daemon-{}", std::process::id());
        let base = root.join(&rel[1..]);
        std::fs::create_dir(&base).with_context(|| format!("creating {}", base.display()))?;
        let dir = std::env::temp_dir().join(format!("tessera-bench-daemon-{}", std::process::id()));
        let scratch = Self { base, rel, dir };
        for child in CGROUPS {
            std::fs::create_dir(scratch.cgroup(child))?;
        }
        std::fs::create_dir_all(&scratch.dir)?;
        Ok(scratch)
    }

    fn cgroup(&self, child: &str) -> PathBuf {
        self.base.join(child)
    }

    fn rel(&self, child: &str) -> String {
        format!("{}/{child}", self.rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The clients exited: the cgroups are empty.
        for child in CGROUPS {
            let _ = std::fs::remove_dir(self.cgroup(child));
        }
        let _ = std::fs::remove_dir(&self.base);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The release `tessera run`, stopped (SIGTERM) and uninstalled on drop.
struct Daemon {
    child: Child,
    admin: PathBuf,
    attach: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `tessera run` on the scratch cgroup's child `name`, its files in a directory of
    /// that name; [`Daemon::wait_ready`] waits for it.
    fn spawn(scratch: &Scratch, name: &str, policy: &Path) -> Result<Self> {
        let dir = scratch.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("agent.log");
        let attach = scratch.cgroup(name);
        let admin = dir.join("admin.sock");
        let child = Command::new(tessera())
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(&attach)
            .arg("--api-socket")
            .arg(dir.join("workload.sock"))
            .arg("--admin-socket")
            .arg(&admin)
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--metrics-addr")
            .arg("off")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting tessera run")?;
        Ok(Daemon {
            child,
            admin,
            attach,
            log,
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.status().is_err() {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "tessera run exited before it was ready ({st}); see {}",
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "tessera run not ready within 180 s; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn status(&self) -> Result<Value> {
        let out = Command::new(tessera())
            .arg("status")
            .arg("--json")
            .arg("--admin-socket")
            .arg(&self.admin)
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("tessera status failed");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn programs(&self) -> Result<Value> {
        Ok(self.status()?["programs"].clone())
    }

    fn decisions(&self) -> Result<u64> {
        self.status()?["counters"]["decisions"]
            .as_u64()
            .context("status counters.decisions")
    }

    fn dropped(&self) -> Result<u64> {
        self.status()?["counters"]["dropped_events"]
            .as_u64()
            .context("status counters.dropped_events")
    }

    /// Waits until the agent has written `expected` decisions (or stops making progress);
    /// returns how many it wrote.
    fn wait_decisions(&self, expected: u64) -> Result<u64> {
        let mut last = self.decisions()?;
        let mut still_since = Instant::now();
        while last < expected && still_since.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.decisions()?;
            if now != last {
                still_since = Instant::now();
                last = now;
            }
        }
        Ok(last)
    }

    /// utime + stime of the agent process (all its threads), in ns.
    fn cpu_ns(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
        Ok(ticks * 1_000_000_000 / hz)
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The programs are pinned and outlive the agent: never leave them behind.
        let _ = Command::new(tessera())
            .arg("uninstall")
            .arg("--cgroup")
            .arg(&self.attach)
            .stdout(Stdio::null())
            .status();
    }
}
