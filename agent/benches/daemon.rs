//! The benchmark of what a user runs, behind `cargo xtask bench` (root only): the release
//! `tessera run` attached to a scratch cgroup, 100k endpoint addresses loaded, writing its real
//! decision log, and a C client (benches/daemon/client.c, built with `cc`) making the calls.
//!
//! Part 1, alternating rounds (the order flips every round, so machine noise hits every side
//! alike): loopback TCP connect+close from the workload's cgroup (the daemon attached) to a
//! protected endpoint whose rule needs no credential (every connect decided and logged), to an
//! unprotected port, and from a sibling cgroup with nothing attached; and from a second sibling
//! with an empty connect4 program attached (the floor of any program). Medians of the ratios to
//! detached, and of the programs' mean run time per call from the kernel's BPF statistics.
//!
//! Part 2, sustained load: UDP datagrams to a protected endpoint at a paced rate (each decided
//! by sendmsg4 and logged) for a while; the agent's CPU per decision from its own
//! /proc/PID/stat, the events the kernel dropped (from the agent's status), its RSS before and
//! after. Numbers here are measurements, never pass/fail.
use std::{
    net::{TcpListener, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use anyhow::{Context as _, Result, bail};
use common::{mean_run_ns, median};
use serde_json::{Value, json};
use tessera_agent::kernel;
use tessera_common::program_names;

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
/// The empty program's name, to find its statistics among the host's programs.
const FLOOR_NAME: &str = "tsr_bench_floor";

struct Args {
    json: PathBuf,
    rate: f64,
    seconds: f64,
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

    let policy = scratch.dir.join("bench.yaml");
    std::fs::write(
        &policy,
        bench_policy(&scratch.rel("attached"), protected_port, udp_port)?,
    )?;
    let _stats = kernel::enable_bpf_stats()?;
    let floor = FloorProgram::attach(&scratch.cgroup("floor"))?;
    println!(
        "starting {} run with {ENDPOINTS} endpoint addresses",
        tessera().display()
    );
    let agent = Daemon::start(&scratch, &policy)?;
    let rss_start_kib = agent.rss_kib()?;

    // Part 1: alternating rounds.
    let sides = ["detached", "protected", "unprotected", "floor"];
    let mut rates: [Vec<f64>; 4] = Default::default();
    let mut connect4_ns = Vec::new();
    let mut connect4_unprotected_ns = Vec::new();
    let mut floor_ns = Vec::new();
    let mut protected_cpu_ns = 0u64;
    let mut protected_decisions = 0u64;
    for round in 0..ROUNDS {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for side in order {
            let (cgroup, port) = match side {
                0 => ("detached", protected_port),
                1 => ("attached", protected_port),
                2 => ("attached", free_port),
                _ => ("floor", protected_port),
            };
            let programs0 = agent.programs()?;
            let floor0 = floor.stats();
            let decided0 = agent.decisions()?;
            let cpu0 = agent.cpu_ns()?;
            let ns = run_tcp(&client, &scratch.cgroup(cgroup), port, BATCH)?;
            rates[side].push(BATCH as f64 / (ns as f64 / 1e9));
            let programs1 = agent.programs()?;
            match side {
                1 => {
                    connect4_ns.push(per_run(&programs0, &programs1, program_names::CONNECT4));
                    let decided = agent.wait_decisions(decided0 + BATCH as u64)?;
                    protected_cpu_ns += agent.cpu_ns()? - cpu0;
                    protected_decisions += decided - decided0;
                }
                2 => connect4_unprotected_ns.push(per_run(
                    &programs0,
                    &programs1,
                    program_names::CONNECT4,
                )),
                3 => {
                    let (c0, t0) = floor0;
                    let (c1, t1) = floor.stats();
                    floor_ns.push(if c1 > c0 {
                        (t1 - t0) as f64 / (c1 - c0) as f64
                    } else {
                        f64::NAN
                    });
                }
                _ => {}
            }
        }
        println!("round {}/{ROUNDS} done", round + 1);
    }
    let ratio = |side: usize| -> Vec<f64> {
        rates[side]
            .iter()
            .zip(&rates[0])
            .map(|(a, d)| a / d)
            .collect()
    };
    let (protected_ratios, unprotected_ratios, floor_ratios) = (ratio(1), ratio(2), ratio(3));

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
    // The agent reads the kernel's drop counter once a second.
    std::thread::sleep(Duration::from_millis(1_500));
    let dropped1 = agent.dropped()?;
    let rss_after_kib = agent.rss_kib()?;
    let log_errors = agent.status()?["counters"]["decision_log_errors"]
        .as_u64()
        .unwrap_or(0);
    drop(udp_sink);
    let sustained_decisions = decided1 - decided0;
    let report = json!({
        "benchmark": "tessera.daemon/v1",
        "agent": tessera().display().to_string(),
        "machine": machine(),
        "endpoint_entries": ENDPOINTS,
        "batch": BATCH,
        "rounds": ROUNDS,
        "connect": {
            "rate_detached_per_s": median(&rates[0]),
            "rate_protected_per_s": median(&rates[1]),
            "rate_unprotected_per_s": median(&rates[2]),
            "rate_floor_per_s": median(&rates[3]),
            "ratio_protected_vs_detached": median(&protected_ratios),
            "ratio_unprotected_vs_detached": median(&unprotected_ratios),
            "ratio_floor_vs_detached": median(&floor_ratios),
            "connect4_protected_mean_ns": median(&connect4_ns),
            "connect4_unprotected_mean_ns": median(&connect4_unprotected_ns),
            "empty_connect4_mean_ns": median(&floor_ns),
            "agent_cpu_ns_per_decision": protected_cpu_ns as f64 / protected_decisions.max(1) as f64,
            "decisions": protected_decisions,
            "samples": {
                "rate_detached": rates[0], "rate_protected": rates[1],
                "rate_unprotected": rates[2], "rate_floor": rates[3],
                "ratio_protected": protected_ratios, "ratio_unprotected": unprotected_ratios,
                "ratio_floor": floor_ratios, "connect4_protected_ns": connect4_ns,
                "connect4_unprotected_ns": connect4_unprotected_ns, "empty_connect4_ns": floor_ns,
            },
        },
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
            "rss_kib": { "start": rss_start_kib, "before": rss_before_kib, "after": rss_after_kib },
        },
    });
    drop(agent);
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

/// COUNT connect+close from `cgroup`; the ns they took.
fn run_tcp(client: &Path, cgroup: &Path, port: u16, count: usize) -> Result<u64> {
    let out = client_output(
        client,
        cgroup,
        &["tcp", &port.to_string(), &count.to_string()],
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

fn print_report(r: &Value) {
    let c = &r["connect"];
    let s = &r["sustained"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("\nmachine: {}", r["machine"]);
    println!(
        "\nconnect+close, medians of {ROUNDS} alternating rounds of {BATCH}, {ENDPOINTS} endpoints:"
    );
    println!(
        "  detached {:.0}/s; protected (decided and logged) {:.0}/s, ratio {:.3}; unprotected ratio {:.3}; empty program ratio {:.3}",
        f(&c["rate_detached_per_s"]),
        f(&c["rate_protected_per_s"]),
        f(&c["ratio_protected_vs_detached"]),
        f(&c["ratio_unprotected_vs_detached"]),
        f(&c["ratio_floor_vs_detached"]),
    );
    println!(
        "  connect4 mean: protected {:.0} ns, unprotected {:.0} ns, empty program {:.0} ns",
        f(&c["connect4_protected_mean_ns"]),
        f(&c["connect4_unprotected_mean_ns"]),
        f(&c["empty_connect4_mean_ns"]),
    );
    println!(
        "  agent CPU per decision {:.2} µs ({} decisions)",
        f(&c["agent_cpu_ns_per_decision"]) / 1e3,
        c["decisions"]
    );
    println!(
        "\nsustained: {:.0} datagrams/s for {:.1} s: {} sent, {} logged, {} dropped, {} log errors",
        f(&s["achieved_rate_per_s"]),
        f(&s["seconds"]),
        s["sent"],
        s["decisions_logged"],
        s["events_dropped"],
        s["decision_log_errors"],
    );
    println!(
        "  agent CPU per decision {:.2} µs; sendmsg4 mean {:.0} ns; agent RSS {} KiB at start, {} before, {} after",
        f(&s["agent_cpu_ns_per_decision"]) / 1e3,
        f(&s["sendmsg4_mean_ns"]),
        s["rss_kib"]["start"],
        s["rss_kib"]["before"],
        s["rss_kib"]["after"],
    );
}

/// `vault` (tcp, the connect side) and `dns` (udp, the sustained side) on loopback, protected
/// by a rule that needs no credential, so each call is allowed and logged; then the rest of the
/// endpoint entries as /32s in 10.0.0.0/8.
fn bench_policy(cgroup_rel: &str, tcp_port: u16, udp_port: u16) -> Result<String> {
    use std::fmt::Write as _;
    let mut y = String::with_capacity(ENDPOINTS * 64);
    writeln!(
        y,
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: bench }}\nspec:\n  trustDomain: bench.tessera.dev\n  workloads:\n    - {{ name: bench, match: {{ cgroup: {cgroup_rel} }} }}\n  endpoints:\n    - {{ name: vault, addresses: [\"127.0.0.1/32\"], ports: [{tcp_port}] }}\n    - {{ name: dns, addresses: [\"127.0.0.1/32\"], ports: [{udp_port}], protocol: udp }}"
    )?;
    for i in 2..ENDPOINTS {
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

/// `<cgroup2>/tessera-bench-daemon-<pid>` with `attached` (the daemon's attach point and the
/// workload), `detached` (nothing) and `floor` (an empty program); a scratch directory for the
/// agent's files. Removed on drop.
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
        for child in ["attached", "detached", "floor"] {
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
        for child in ["attached", "detached", "floor"] {
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
}

impl Daemon {
    fn start(scratch: &Scratch, policy: &Path) -> Result<Self> {
        let log = std::fs::File::create(scratch.dir.join("agent.log"))?;
        let attach = scratch.cgroup("attached");
        let admin = scratch.dir.join("admin.sock");
        let child = Command::new(tessera())
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(&attach)
            .arg("--api-socket")
            .arg(scratch.dir.join("workload.sock"))
            .arg("--admin-socket")
            .arg(&admin)
            .arg("--decision-log")
            .arg(scratch.dir.join("decisions.jsonl"))
            .arg("--state-dir")
            .arg(scratch.dir.join("state"))
            .arg("--metrics-addr")
            .arg("off")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tessera run")?;
        let mut daemon = Daemon {
            child,
            admin,
            attach,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while daemon.status().is_err() {
            if let Some(st) = daemon.child.try_wait()? {
                bail!(
                    "tessera run exited before it was ready ({st}); see {}",
                    scratch.dir.join("agent.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("tessera run not ready within 120 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(daemon)
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

/// An empty connect4 program (`r0 = 1; exit`) attached through a BPF link to one cgroup: what
/// any cgroup connect program costs at least. Loaded with raw bpf(2) calls (aya loads ELF
/// objects only); the link detaches it when dropped.
struct FloorProgram {
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl FloorProgram {
    fn attach(cgroup: &Path) -> Result<Self> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
        const BPF_CGROUP_INET4_CONNECT: u32 = 10;
        // mov64 r0, 1; exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        let put32 =
            |a: &mut [u8; 128], at: usize, v: u32| a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        let put64 =
            |a: &mut [u8; 128], at: usize, v: u64| a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        put32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
        put32(&mut attr, 4, insns.len() as u32);
        put64(&mut attr, 8, insns.as_ptr() as u64);
        put64(&mut attr, 16, license.as_ptr() as u64);
        attr[48..48 + FLOOR_NAME.len()].copy_from_slice(FLOOR_NAME.as_bytes());
        put32(&mut attr, 68, BPF_CGROUP_INET4_CONNECT);
        let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty connect4 program")?;
        let dir = std::fs::File::open(cgroup)?;
        let mut attr = [0u8; 128];
        put32(&mut attr, 0, prog.as_raw_fd() as u32);
        put32(&mut attr, 4, dir.as_raw_fd() as u32);
        put32(&mut attr, 8, BPF_CGROUP_INET4_CONNECT);
        let link = bpf(BPF_LINK_CREATE, &mut attr).context("attaching the empty program")?;
        Ok(FloorProgram {
            _prog: prog,
            _link: link,
        })
    }

    /// (run count, run time in ns) of the empty program.
    fn stats(&self) -> (u64, u64) {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.name_as_str() == Some(FLOOR_NAME))
            .map(|p| {
                (
                    p.run_count(),
                    u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                )
            })
            .unwrap_or((0, 0))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<OwnedFd> {
    // SAFETY: `attr` is a zero-filled bpf_attr of 128 bytes whose pointers (instructions,
    // license) outlive the call; the kernel returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a file descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
