//! Build prerequisites: nightly with rust-src (the eBPF crate builds `core` itself) and bpf-linker.
//! Each step checks first and does nothing when the piece is already there.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release that builds with rustc's own LLVM here (see DESIGN.md section 5).
const BPF_LINKER: &str = "bpf-linker@0.10.4";

pub fn run() -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_python()?;
    Ok(())
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    );
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Some(_) => {
            eprintln!("setup: adding rust-src to the nightly toolchain");
            status(
                "rustup",
                &["component", "add", "rust-src", "--toolchain", "nightly"],
            )
        }
        None => {
            eprintln!("setup: installing the nightly toolchain with rust-src");
            status(
                "rustup",
                &[
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ],
            )
        }
    }
}

fn ensure_bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some() {
        return Ok(());
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin/bpf-linker"));
    if let Some(path) = cargo_bin.filter(|p| p.exists()) {
        bail!(
            "bpf-linker is installed at {} but not on PATH: add its directory to PATH",
            path.display()
        );
    }
    eprintln!("setup: installing {BPF_LINKER} (about 80 s)");
    status("cargo", &["install", "--locked", BPF_LINKER])
}

fn ensure_python() -> Result<()> {
    // The demo's workloads and the README's examples are small Python scripts.
    if output("python3", &["--version"]).is_none() {
        bail!("python3 is missing: install it (apt-get install -y python3)");
    }
    Ok(())
}

/// Runs `cargo ARGS` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    let root = crate::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .args(args)
        .current_dir(&root)
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !st.success() {
        bail!("{cargo} {} failed ({st})", args.join(" "));
    }
    Ok(())
}

fn status(program: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !st.success() {
        bail!("{program} {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// stdout of a command that succeeded, or None.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
