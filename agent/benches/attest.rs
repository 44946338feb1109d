//! The attestation benchmark behind `cargo xtask bench`: the cost of reading one process's
//! evidence (procfs, cgroup layout, executable path and SHA-256), cold (hash not cached) and
//! cached, for a few processes this benchmark starts. Reports medians, prints a table and
//! writes JSON. Numbers here are measurements, never pass/fail.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use tessera_agent::identity::evidence::{DEFAULT_MAX_HASH_BYTES, EvidenceReader, open_pidfd};

/// Reads per measurement; the median of these is reported.
const COLD_ROUNDS: usize = 21;
const CACHED_ROUNDS: usize = 501;

/// A started process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<()> {
    // This binary started as one of the measured processes: just stay alive.
    if std::env::args().any(|a| a == "--child") {
        std::thread::sleep(Duration::from_secs(600));
        return Ok(());
    }
    let json_out = std::env::args()
        .skip_while(|a| a != "--json")
        .nth(1)
        .unwrap_or_else(|| "target/bench/attest.json".into());
    // Different executable sizes: a small coreutil, an interpreter, and this (large) binary.
    let own = std::env::current_exe()?;
    let own = own.to_str().context("the benchmark's path is not UTF-8")?;
    let mut started = Vec::new();
    for argv in [
        &["sleep", "600"][..],
        &["python3", "-c", "import time; time.sleep(600)"][..],
        &[own, "--child"][..],
    ] {
        let name = if argv[0] == own {
            "benchmark".to_owned()
        } else {
            argv[0].to_owned()
        };
        let spawned = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        match spawned {
            Ok(c) => started.push((name, Proc(c))),
            Err(e) => eprintln!("skipped {name}: {e}"),
        }
    }

    let mut rows = Vec::new();
    for (name, proc_) in &started {
        rows.push(measure(name, proc_.0.id())?);
    }
    print_table(&rows);
    let report = json!({ "benchmark": "tessera.attest/v1", "processes": rows });
    let path = std::path::PathBuf::from(&json_out);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn measure(name: &str, pid: u32) -> Result<Value> {
    let reader = EvidenceReader::new(DEFAULT_MAX_HASH_BYTES);
    let pidfd = open_pidfd(pid).with_context(|| format!("pidfd of {name}"))?;
    let first = reader
        .read(&pidfd)
        .with_context(|| format!("evidence of {name}"))?;
    let exe_bytes = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map(|m| m.len())
        .unwrap_or(0);
    let mut cold = Vec::with_capacity(COLD_ROUNDS);
    for _ in 0..COLD_ROUNDS {
        reader.exe_hashes().clear();
        let t = Instant::now();
        reader.read(&pidfd)?;
        cold.push(t.elapsed());
    }
    let mut cached = Vec::with_capacity(CACHED_ROUNDS);
    for _ in 0..CACHED_ROUNDS {
        let t = Instant::now();
        reader.read(&pidfd)?;
        cached.push(t.elapsed());
    }
    Ok(json!({
        "process": name,
        "exe": first.exe.map(|e| e.path),
        "exe_bytes": exe_bytes,
        "cold_median_us": micros(median(&mut cold)),
        "cached_median_us": micros(median(&mut cached)),
        "cold_rounds": COLD_ROUNDS,
        "cached_rounds": CACHED_ROUNDS,
    }))
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn micros(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

fn print_table(rows: &[Value]) {
    println!(
        "{:<10} {:>12} {:>16} {:>18}",
        "process", "exe bytes", "cold median µs", "cached median µs"
    );
    // serde_json's Display ignores widths: format the numbers as strings first.
    let cell = |v: &Value| v.to_string();
    for r in rows {
        println!(
            "{:<10} {:>12} {:>16} {:>18}",
            r["process"].as_str().unwrap_or("?"),
            cell(&r["exe_bytes"]),
            cell(&r["cold_median_us"]),
            cell(&r["cached_median_us"])
        );
    }
}
