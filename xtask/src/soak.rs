//! `cargo xtask soak` (root): a million connects (`--connects`) against the real agent on a
//! scratch cgroup, with credentials issued, ended and expiring, children forked and images
//! exec'd all along; every verdict is checked against a model of the policy
//! ([`model`]), in compiled workers ([`worker`]) that connect many times a process.
use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::cgroup::ScratchCgroup;

pub mod model;
pub mod worker;

use worker::Stats;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Connects in all, shared by the workers.
    #[arg(long, default_value_t = 1_000_000)]
    pub connects: u64,
    /// Workloads, one worker process (and its children) each, run at once.
    #[arg(long, default_value_t = 2)]
    pub workers: u64,
    /// Seed of the workers' choices (default: the clock); the same seed replays the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use the release binaries already built (target/release/tessera and xtask).
    #[arg(long)]
    pub no_build: bool,
}

/// The ports of vault, tree, shared, open, closed and an unprotected one: nothing listens on
/// them (an allowed TCP connect is refused by the stack, a denied one gets EPERM first).
const PORTS: [u16; 6] = [47_101, 47_102, 47_103, 47_104, 47_105, 47_106];

pub fn run(args: &SoakArgs) -> Result<()> {
    if !nix_is_root() {
        bail!("cargo xtask soak attaches the agent to a scratch cgroup: run it as root");
    }
    if !args.no_build {
        crate::setup::run()?;
        crate::setup::cargo(&[
            "build",
            "--release",
            "--package",
            "tessera-agent",
            "--bin",
            "tessera",
        ])?;
        crate::setup::cargo(&["build", "--release", "--package", "xtask"])?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::workspace_root().join("target"), PathBuf::from);
    let tessera = target.join("release/tessera");
    // The release build of this very program runs the workers: debug connects are slower.
    let xtask = target.join("release/xtask");

    let name = format!("tessera-soak-{}", std::process::id());
    let cgroup = ScratchCgroup::create(&name)?;
    let dir = std::env::temp_dir().join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let _dir = RemoveDir(dir.clone());
    let workloads: Vec<String> = (0..args.workers.max(1)).map(|i| format!("w{i}")).collect();
    for w in &workloads {
        cgroup.child(w)?;
    }
    let policy = dir.join("soak.yaml");
    std::fs::write(&policy, policy_yaml(&name, &workloads))?;
    let api = dir.join("workload.sock");
    let agent = Agent::start(&tessera, &dir, &policy, cgroup.path(), &api)?;

    let seed = args
        .seed
        .unwrap_or_else(|| model::now_ms() ^ u64::from(std::process::id()));
    let per_worker = args.connects.div_ceil(workloads.len() as u64);
    eprintln!(
        "soak: {} connects by {} workloads (seed {seed}), agent pid {}",
        per_worker * workloads.len() as u64,
        workloads.len(),
        agent.child.id()
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        let ports = PORTS.map(|p| p.to_string()).join(",");
        let mut child = Command::new(&xtask)
            .args(["soak-worker", "--wait", "--api"])
            .arg(&api)
            .args(["--ports", &ports, "--connects", &per_worker.to_string()])
            .args(["--seed", &(seed.wrapping_add(i as u64 * 7919)).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a soak worker")?;
        std::fs::write(
            cgroup.path().join(w).join("cgroup.procs"),
            child.id().to_string(),
        )
        .context("moving a worker into its cgroup")?;
        if let Some(stdin) = child.stdin.as_mut() {
            writeln!(stdin, "go")?;
        }
        workers.push(child);
    }
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for child in workers {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text
            .lines()
            .find_map(|l| l.strip_prefix("stats "))
            .and_then(Stats::decode)
        {
            Some(s) if out.status.success() => total.add(&s),
            _ => failures.push(format!("a worker failed ({}): {text}", out.status)),
        }
    }
    let took = started.elapsed();
    drop(agent);
    let rate = total.connects as f64 / took.as_secs_f64().max(0.001);
    println!(
        "soak: {} connects in {:.1} s ({rate:.0}/s), {} verdicts checked, {} wrong; {} allowed, \
         {} credentials issued, {} ended, {} forks, {} execs, {} waits at an expiry, {} API errors; \
         seed {seed}",
        total.connects,
        took.as_secs_f64(),
        total.checked,
        total.wrong,
        total.allowed,
        total.issued,
        total.ended,
        total.forks,
        total.execs,
        total.expired_waits,
        total.api_errors
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    if total.wrong > 0 {
        bail!("{} wrong verdicts (the first ones are above)", total.wrong);
    }
    if total.checked < args.connects {
        bail!(
            "only {} of {} connects were checked",
            total.checked,
            args.connects
        );
    }
    Ok(())
}

fn policy_yaml(cgroup: &str, workloads: &[String]) -> String {
    let [vault, tree, shared, open, closed, _] = PORTS;
    let all = workloads.join(", ");
    let mut yaml = String::from(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: soak\nspec:\n  \
         trustDomain: soak.tessera.dev\n  mode: enforce\n  workloads:\n",
    );
    for w in workloads {
        yaml.push_str(&format!(
            "    - name: {w}\n      match:\n        cgroup: /{cgroup}/{w}\n"
        ));
    }
    yaml.push_str("  endpoints:\n");
    for (name, port) in [
        ("vault", vault),
        ("tree", tree),
        ("shared", shared),
        ("open", open),
        ("closed", closed),
    ] {
        yaml.push_str(&format!(
            "    - name: {name}\n      addresses: [\"127.0.0.1/32\", \"::1/128\"]\n      \
             ports: [{port}]\n      protocol: any\n"
        ));
    }
    yaml.push_str(&format!(
        "  rules:\n    - name: to-vault\n      workloads: [{all}]\n      endpoints: [vault]\n      \
         credential: {{ required: true, maxTtl: 1m, bind: process }}\n    - name: to-tree\n      \
         workloads: [{all}]\n      endpoints: [tree]\n      \
         credential: {{ required: true, maxTtl: 1m, bind: process-tree }}\n    - name: to-shared\n      \
         workloads: [{all}]\n      endpoints: [shared]\n      \
         credential: {{ required: true, maxTtl: 1m, bind: workload }}\n    - name: to-open\n      \
         workloads: [{all}]\n      endpoints: [open]\n      credential: {{ required: false }}\n"
    ));
    yaml
}

/// `tessera run` on the scratch cgroup; stopped (SIGTERM) and uninstalled on drop.
struct Agent {
    child: Child,
    tessera: PathBuf,
    cgroup: PathBuf,
}

impl Agent {
    fn start(
        tessera: &Path,
        dir: &Path,
        policy: &Path,
        cgroup: &Path,
        api: &Path,
    ) -> Result<Agent> {
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new(tessera)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--api-socket")
            .arg(api)
            .arg("--admin-socket")
            .arg(dir.join("admin.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            // A million decisions: allows counted every 10 s, the file kept small.
            .args(["--decision-log-aggregate-allows", "10s"])
            .args([
                "--decision-log-max-size",
                "64MiB",
                "--decision-log-keep",
                "1",
            ])
            .args(["--metrics-addr", "off", "--rate-limit", "off"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tessera run")?;
        let mut agent = Agent {
            child,
            tessera: tessera.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(api.exists() && dir.join("admin.sock").exists()) {
            if let Some(st) = agent.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                bail!("tessera run exited ({st}) before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("tessera run was not ready within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The programs are pinned and outlive the agent: never leave them behind.
        let st = Command::new(&self.tessera)
            .arg("uninstall")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .stdout(Stdio::null())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!(
                "warning: tessera uninstall --cgroup {} failed",
                self.cgroup.display()
            );
        }
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}
