//! `cargo xtask fuzz [--minutes N] [TARGET...]`: runs each cargo-fuzz target of fuzz/ for N
//! minutes (default 10) with nightly, from its committed seeds (fuzz/seeds/TARGET) plus what
//! earlier runs found (target/fuzz/corpus/TARGET). Installs cargo-fuzz when it is missing.
//! Not part of CI: it takes the machine for the whole time.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// The targets in fuzz/fuzz_targets, in the order they run.
pub const TARGETS: [&str; 5] = ["policy", "config", "workload_request", "token", "events"];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Minutes per target.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Run the targets at once (each for --minutes) rather than one after another.
    #[arg(long)]
    pub parallel: bool,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    crate::setup::run()?;
    ensure_cargo_fuzz()?;
    let root = crate::workspace_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("fuzz");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "no fuzz target {t:?}: the targets are {}",
                    TARGETS.join(", ")
                );
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    // Build once: the runs below then find the targets built.
    let st = Command::new("cargo")
        .args([
            "+nightly",
            "fuzz",
            "build",
            "--fuzz-dir",
            "fuzz",
            "-O",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(&root)
        .status()
        .context("running cargo +nightly fuzz build")?;
    if !st.success() {
        bail!("cargo +nightly fuzz build failed ({st})");
    }
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for target in targets {
        let corpus = target_dir.join("corpus").join(target);
        let artifacts = target_dir.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root.join("fuzz/seeds").join(target);
        eprintln!("fuzz: {target} for {} min", args.minutes);
        let mut cmd = Command::new("cargo");
        cmd.args([
            "+nightly",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "-O",
            "--target-dir",
        ])
        .arg(&target_dir)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", args.minutes * 60))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .current_dir(&root);
        let child = cmd.spawn().context("running cargo +nightly fuzz run")?;
        runs.push((target, artifacts, child));
        if !args.parallel {
            finish(runs.pop(), &mut failed)?;
        }
    }
    while let Some(run) = runs.pop() {
        finish(Some(run), &mut failed)?;
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {}; fix each finding and add it as a unit test",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Waits for one target's run; a failure is recorded with where its input is.
fn finish(
    run: Option<(&str, PathBuf, std::process::Child)>,
    failed: &mut Vec<String>,
) -> Result<()> {
    let Some((target, artifacts, mut child)) = run else {
        return Ok(());
    };
    let st = child.wait()?;
    if st.success() {
        eprintln!("fuzz: {target} passed");
    } else {
        eprintln!(
            "fuzz: {target} FAILED ({st}); the input is in {}",
            artifacts.display()
        );
        failed.push(target.to_owned());
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz (cargo install --locked cargo-fuzz)");
    let st = Command::new("cargo")
        .args(["install", "--locked", "cargo-fuzz"])
        .status()
        .context("running cargo install")?;
    if !st.success() {
        bail!("cargo install --locked cargo-fuzz failed ({st})");
    }
    Ok(())
}
