//! `cargo xtask deb`: builds the Debian package with cargo-deb (installed with
//! `cargo install --locked cargo-deb` when missing), then checks what is inside it with
//! dpkg-deb: the binary, the systemd unit, the default configuration (a conffile) and the
//! example policies, byte for byte the repository's files.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

#[derive(clap::Args, Debug)]
pub struct DebArgs {
    /// Package the debug build (faster; for checking the packaging, not for shipping).
    #[arg(long)]
    pub dev: bool,
    /// Only check an existing package (no build).
    #[arg(long, value_name = "DEB")]
    pub check: Option<PathBuf>,
}

/// What the package must hold (paths as `dpkg-deb -c` prints them, less the leading `.`),
/// and the repository file each must equal (None: only present).
const EXPECTED: &[(&str, Option<&str>)] = &[
    ("/usr/bin/tessera", None),
    ("/etc/tessera/config.yaml", Some("packaging/config.yaml")),
    (
        "/lib/systemd/system/tessera.service",
        Some("systemd/tessera.service"),
    ),
    (
        "/usr/share/doc/tessera/examples/policies/example.yaml",
        Some("policies/example.yaml"),
    ),
    (
        "/usr/share/doc/tessera/examples/policies/demo.yaml",
        Some("policies/demo.yaml"),
    ),
];

pub fn run(args: &DebArgs) -> Result<()> {
    let deb = match &args.check {
        Some(deb) => deb.clone(),
        None => build(args.dev)?,
    };
    check(&deb)?;
    println!("deb: {} is complete", deb.display());
    Ok(())
}

fn build(dev: bool) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    super::setup::run()?;
    let root = crate::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["deb", "--package", "tessera-agent"])
        .current_dir(&root);
    if dev {
        cmd.args(["--profile", "dev"]);
    }
    let out = cmd.output().context("running cargo deb")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "cargo deb failed ({})", out.status);
    // cargo-deb prints the package's path last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .context("cargo deb printed no .deb path")?;
    Ok(root.join(path))
}

fn ensure_cargo_deb() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let present = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("deb: installing cargo-deb (cargo install --locked cargo-deb; a few minutes)");
    super::setup::cargo(&["install", "--locked", "cargo-deb"])
}

fn dpkg_deb(args: &[&str], deb: &Path) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .context("running dpkg-deb (apt-get install dpkg)")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb {} {}: {}",
            args.join(" "),
            deb.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Inspects a built package; an error names everything that is wrong.
pub fn check(deb: &Path) -> Result<()> {
    let listing = dpkg_deb(&["-c"], deb)?;
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.'))
        .collect();
    let mut problems = Vec::new();
    let root = crate::workspace_root();
    let unpacked = std::env::temp_dir().join(format!("tessera-deb-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&unpacked);
    let extract = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&unpacked)
        .status()
        .context("dpkg-deb -x")?;
    ensure!(extract.success(), "dpkg-deb -x failed");
    for (path, source) in EXPECTED {
        // Newer cargo-deb versions install units under /usr/lib.
        let alt = format!("/usr{path}");
        let found = [*path, alt.as_str()]
            .into_iter()
            .find(|p| files.contains(p));
        let Some(found) = found else {
            problems.push(format!("{path} is missing"));
            continue;
        };
        if let Some(source) = source {
            let inside = std::fs::read(unpacked.join(found.trim_start_matches('/')))?;
            let ours = std::fs::read(root.join(source))?;
            if inside != ours {
                problems.push(format!("{found} differs from {source}"));
            }
        }
    }
    let mode = listing
        .lines()
        .find(|l| l.ends_with("./usr/bin/tessera"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    if mode != "-rwxr-xr-x" {
        problems.push(format!("/usr/bin/tessera has mode {mode}, not -rwxr-xr-x"));
    }
    let _ = std::fs::remove_dir_all(&unpacked);

    let control = dpkg_deb(&["-f"], deb)?;
    for field in ["Package: tessera", "Section: net", "Depends:"] {
        if !control.contains(field) {
            problems.push(format!("control has no `{field}`"));
        }
    }
    let ctrl_dir = std::env::temp_dir().join(format!("tessera-deb-ctrl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ctrl_dir);
    let st = Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(&ctrl_dir)
        .status()?;
    ensure!(st.success(), "dpkg-deb -e failed");
    let conffiles = std::fs::read_to_string(ctrl_dir.join("conffiles")).unwrap_or_default();
    if !conffiles
        .lines()
        .any(|l| l.trim() == "/etc/tessera/config.yaml")
    {
        problems.push("/etc/tessera/config.yaml is not a conffile".into());
    }
    let _ = std::fs::remove_dir_all(&ctrl_dir);
    if !problems.is_empty() {
        bail!("{}: {}", deb.display(), problems.join("; "));
    }
    Ok(())
}
