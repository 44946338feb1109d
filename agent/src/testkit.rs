//! What the tests share with `cargo xtask test`: a test that cannot run here says so through
//! [`skip`], and the summary counts it as skipped (with its reason), not as passed.
//!
//! libtest has no runtime skip: a test that returns early passes. So each skip is also appended
//! to the ledger named by `TESSERA_SKIP_LOG` (set by `cargo xtask test`), one line per skip:
//! `binary<TAB>test<TAB>kind<TAB>reason`.

use std::io::Write as _;

/// A loopback Kubernetes API server (list, watch, status patches) for the tests.
pub mod apiserver;

/// The variable naming the ledger file.
pub const SKIP_LOG: &str = "TESSERA_SKIP_LOG";

/// Why a test could not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// This machine lacks something the test needs (root, a tool, a kernel feature). CI, which
    /// installs everything, fails when a test skips for this reason as root.
    Missing,
    /// The machine was too busy for the test's setup (a pid could not be reused in time): the
    /// test is reported as skipped but does not fail CI.
    Busy,
    /// A tool the test fetches from a package registry could not be had (the registry is
    /// unreachable): reported as skipped, does not fail CI.
    Offline,
}

impl SkipKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Busy => "busy",
            Self::Offline => "offline",
        }
    }
}

/// Reports the running test as skipped for `reason` (on stderr, and in the ledger).
pub fn skip(reason: &str) {
    record(SkipKind::Missing, reason);
}

/// Reports the running test as skipped because the machine was too busy for its setup.
pub fn skip_busy(reason: &str) {
    record(SkipKind::Busy, reason);
}

/// Reports the running test as skipped because a registry it fetches a tool from is unreachable.
pub fn skip_offline(reason: &str) {
    record(SkipKind::Offline, reason);
}

fn record(kind: SkipKind, reason: &str) {
    eprintln!("skipped: {reason}");
    let Some(ledger) = std::env::var_os(SKIP_LOG) else {
        return;
    };
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // libtest names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    let line = format!(
        "{binary}\t{test}\t{}\t{}\n",
        kind.as_str(),
        reason.replace(['\t', '\n'], " ")
    );
    // One short O_APPEND write per skip: lines from parallel tests and binaries do not mix.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ledger)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("skip ledger {}: {e}", ledger.to_string_lossy());
    }
}
