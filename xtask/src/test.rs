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
    // Tests that cannot run here append themselves to this ledger (agent/src/testkit.rs):
    // libtest would count them as passed.
    let ledger = crate::workspace_root().join("target/test-skips.log");
    if let Err(e) = std::fs::remove_file(&ledger)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        bail!("removing {}: {e}", ledger.display());
    }
    // The chart tests render with helm; without it (no registry) they skip with the reason.
    let helm = match super::helm::ensure() {
        Ok(path) => ("TESSERA_HELM", path.into_os_string()),
        Err(e) => {
            eprintln!("test: helm unavailable: {e:#}");
            ("TESSERA_HELM_UNAVAILABLE", format!("{e:#}").into())
        }
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(&args)
        .env("TESSERA_SKIP_LOG", &ledger)
        .env(helm.0, helm.1)
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
        deb_check_when_cheap().and_then(|()| image_check())
    } else {
        Ok(())
    };
    if deb.is_err() {
        totals.failed += 1;
    }
    let skips = Skip::read(&ledger)?;
    let refused = report_skips(&skips, &mut totals);
    println!(
        "\nsummary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if let Some(why) = refused {
        bail!(why);
    }
    deb
}

/// One line of the skip ledger: `binary<TAB>test<TAB>kind<TAB>reason`.
#[derive(Debug, PartialEq)]
struct Skip {
    binary: String,
    test: String,
    /// Busy or offline: reported, but not a CI failure.
    transient: bool,
    reason: String,
}

impl Skip {
    fn read(ledger: &std::path::Path) -> Result<Vec<Self>> {
        let text = match std::fs::read_to_string(ledger) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => bail!("reading {}: {e}", ledger.display()),
        };
        Ok(text.lines().filter_map(Self::parse).collect())
    }

    fn parse(line: &str) -> Option<Self> {
        let mut cols = line.splitn(4, '\t');
        let (binary, test, kind, reason) = (cols.next()?, cols.next()?, cols.next()?, cols.next()?);
        // Binaries are named `name-<hash>`: the hash says nothing to a reader.
        let binary = binary.rsplit_once('-').map_or(binary, |(name, _)| name);
        Some(Self {
            binary: binary.to_owned(),
            test: test.to_owned(),
            transient: kind == "busy" || kind == "offline",
            reason: reason.to_owned(),
        })
    }
}

/// Moves the skipped tests from passed to skipped and lists them with their reasons. In CI as
/// root nothing may be missing (`.ci/run` installs it all): returns why the run fails then.
fn report_skips(skips: &[Skip], totals: &mut Totals) -> Option<String> {
    if skips.is_empty() {
        return None;
    }
    // A skipped test returned early, so libtest counted it as passed.
    let n = skips.len() as u64;
    totals.passed = totals.passed.saturating_sub(n);
    totals.ignored += n;
    println!("\nskipped ({n}):");
    for s in skips {
        println!("  {} {}: {}", s.binary, s.test, s.reason);
    }
    let missing = skips.iter().filter(|s| !s.transient).count();
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    (ci && is_root() && missing > 0).then(|| {
        format!(
            "{missing} test(s) skipped as root in CI for something missing on this machine \
             (listed above): .ci/run must install what they need"
        )
    })
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

/// The container image, assembled from the debug build the tests just used and checked (its
/// layout, entry point, no shell; as root the agent runs in a chroot of it). A few seconds.
fn image_check() -> Result<()> {
    let root = crate::workspace_root();
    let image = super::image::assemble(
        &root.join("target/debug/tessera"),
        &root.join("target/image-check"),
    )?;
    super::image::check(&image)?;
    println!(
        "image check: {} holds the agent and runs it",
        image.layout.display()
    );
    Ok(())
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

pub fn is_root() -> bool {
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
    use super::{Skip, Totals, report_skips};

    #[test]
    fn sums_libtest_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 6.36s");
        t.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (15, 2, 1));
    }

    #[test]
    fn skipped_tests_move_from_passed_to_skipped() {
        let skips: Vec<_> = [
            "ops_static-0123abcd\tsystemd_unit_verifies\tmissing\tsystemd-analyze is not installed",
            "lifecycle-99\tpid_reuse\tbusy\tcould not get pid 7 reused",
            "garbage line",
        ]
        .into_iter()
        .filter_map(Skip::parse)
        .collect();
        assert_eq!(skips.len(), 2);
        assert_eq!(skips[0].binary, "ops_static");
        assert!(!skips[0].transient && skips[1].transient);
        let mut t = Totals {
            passed: 10,
            failed: 0,
            ignored: 1,
        };
        let _ = report_skips(&skips, &mut t);
        assert_eq!((t.passed, t.failed, t.ignored), (8, 0, 3));
    }
}
