//! `cargo xtask test`: unit tests and the privileged integration tests, in one `cargo test`,
//! closing with one summary line over every test binary.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

pub fn run(extra: &[String]) -> Result<()> {
    super::setup::run()?;
    if !is_root() {
        eprintln!(
            "test: not running as root: the privileged integration tests will skip themselves \
             (run as root to load the kernel programs)"
        );
    }
    // The default members: the eBPF crate only builds for the BPF target.
    // Every test binary runs even when one fails: the summary then counts them all.
    let mut args = vec!["test".to_string(), "--no-fail-fast".to_string()];
    if !extra.is_empty() {
        args.push("--".into());
        args.extend(extra.iter().cloned());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(&args)
        .current_dir(crate::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo} test"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    // The deb check runs before the summary, so that the summary stays the closing line.
    let deb = if status.success() {
        deb_check_when_cheap()
    } else {
        Ok(())
    };
    if deb.is_err() {
        totals.failed += 1;
    }
    println!(
        "\nsummary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    deb
}

/// The Debian package check costs about a minute once cargo-deb is installed (it packages the
/// debug build the tests just made); installing cargo-deb costs minutes more, so that is left
/// to `cargo xtask deb`.
fn deb_check_when_cheap() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        println!("deb check skipped: cargo-deb is not installed (`cargo xtask deb` installs it)");
        return Ok(());
    }
    super::deb::run(&super::deb::DebArgs {
        dev: true,
        check: None,
    })
}

/// Sums libtest's `test result: ok. 12 passed; 0 failed; 1 ignored; …` lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn is_root() -> bool {
    // Avoids a dependency for one call: the effective uid is in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn sums_libtest_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 6.36s");
        t.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (15, 2, 1));
    }
}
