//! `cargo xtask test`: unit tests and the privileged integration tests, in one `cargo test`.
use anyhow::Result;

pub fn run(extra: &[String]) -> Result<()> {
    super::setup::run()?;
    if !nix_is_root() {
        eprintln!(
            "test: not running as root: the privileged integration tests will skip themselves \
             (run as root to load the kernel programs)"
        );
    }
    // The default members: the eBPF crate only builds for the BPF target.
    let mut args = vec!["test"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    super::setup::cargo(&args)
}

fn nix_is_root() -> bool {
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
