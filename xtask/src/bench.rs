//! `cargo xtask bench`: runs the connect-path benchmark (agent/benches/connect.rs) as root, the
//! attestation benchmark (agent/benches/attest.rs), the per-packet cost of the packet-drop
//! fallback (agent/benches/packets.rs), the revocation-to-failed-write latency
//! (agent/benches/revocation.rs: the real `tessera run`), then the daemon benchmark
//! (agent/benches/daemon.rs: the release `tessera run` under load).
use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/connect.json")]
    pub json: String,
    /// Datagrams per second of the daemon benchmark's sustained part.
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Seconds of the daemon benchmark's sustained part.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only the daemon benchmark (`--only daemon`).
    #[arg(long, conflicts_with = "only")]
    pub daemon_only: bool,
    /// Run only these benchmarks (repeatable; default: all, in this order).
    #[arg(long, value_enum)]
    pub only: Vec<Bench>,
}

/// One benchmark of `cargo xtask bench` (agent/benches/NAME.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    Connect,
    Attest,
    Packets,
    Revocation,
    Daemon,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Connect => "connect",
            Bench::Attest => "attest",
            Bench::Packets => "packets",
            Bench::Revocation => "revocation",
            Bench::Daemon => "daemon",
        }
    }
}

impl BenchArgs {
    fn runs(&self, bench: Bench) -> bool {
        if self.daemon_only {
            bench == Bench::Daemon
        } else {
            self.only.is_empty() || self.only.contains(&bench)
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    crate::setup::run()?;
    program_benches(args)?;
    if !args.runs(Bench::Daemon) {
        return Ok(());
    }
    // The real daemon under load (agent/benches/daemon.rs).
    let daemon_json = absolute("target/bench/daemon.json")?;
    crate::setup::cargo(&[
        "bench",
        "--package",
        "tessera-agent",
        "--bench",
        "daemon",
        "--",
        "--json",
        &daemon_json,
        "--rate",
        &args.rate.to_string(),
        "--seconds",
        &args.seconds.to_string(),
    ])
}

fn absolute(relative: &str) -> Result<String> {
    crate::workspace_root()
        .join(relative)
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("the workspace path is not UTF-8"))
}

fn program_benches(args: &BenchArgs) -> Result<()> {
    // cargo runs the benchmark in agent/: hand it an absolute path.
    let json = crate::workspace_root().join(&args.json);
    let json = json
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("the --json path is not UTF-8"))?;
    if args.runs(Bench::Connect) {
        crate::setup::cargo(&[
            "bench",
            "--package",
            "tessera-agent",
            "--bench",
            "connect",
            "--",
            "--json",
            json,
        ])?;
    }
    // Attestation cost per process (agent/benches/attest.rs), the packet-drop programs' cost
    // on unprotected traffic and the revocation latency, beside the connect results.
    for bench in [Bench::Attest, Bench::Packets, Bench::Revocation] {
        if !args.runs(bench) {
            continue;
        }
        let bench = bench.name();
        let out = absolute(&format!("target/bench/{bench}.json"))?;
        crate::setup::cargo(&[
            "bench",
            "--package",
            "tessera-agent",
            "--bench",
            bench,
            "--",
            "--json",
            &out,
        ])?;
    }
    Ok(())
}
