//! `tessera bundle export DIR`: the running agent's OIDC documents (the discovery document and
//! the trust domain's JWKS), written under DIR for publishing on any static host at the issuer
//! URL. Asked through the admin socket: the agent knows the issuer, its retired keys and the
//! other agents' keys (`--trust-bundle-dir`), exactly as its listener and `FetchJWTBundles`
//! serve them.
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::credential::{self, oidc};

#[derive(clap::Args, Debug)]
pub struct BundleArgs {
    #[command(subcommand)]
    pub command: BundleCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BundleCommand {
    /// Write DIR/.well-known/openid-configuration and DIR/.well-known/jwks.json (the trust
    /// domain's keys) for a static host serving DIR at the issuer URL (`--issuer`).
    Export(ExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The directory to write into (created if absent); its .well-known/ files are replaced.
    pub dir: PathBuf,
    /// Write only .well-known/jwks.json: for a verifier given the JWKS itself (Vault's
    /// `jwks_url`, an uploaded JWKS) when the agent's issuer is not an https:// URL.
    #[arg(long)]
    pub jwks_only: bool,
    /// The agent's admin socket.
    #[arg(long, default_value = super::DEFAULT_ADMIN_SOCKET, env = "TESSERA_ADMIN_SOCKET")]
    pub admin_socket: PathBuf,
}

pub async fn run(args: &BundleArgs) -> ExitCode {
    match &args.command {
        BundleCommand::Export(export_args) => match export(export_args).await {
            Ok(written) => {
                for path in written {
                    println!("{}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tessera bundle export: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Asks the agent, then writes; nothing is written when the agent cannot be asked or the
/// issuer cannot be discovered.
async fn export(args: &ExportArgs) -> Result<Vec<PathBuf>, String> {
    let docs = credential::admin_oidc(&args.admin_socket)
        .await
        .map_err(|e| e.to_string())?;
    let issuer = docs["issuer"].as_str().unwrap_or_default();
    let mut files = vec![(oidc::JWKS_PATH, &docs["jwks"])];
    if !args.jwks_only {
        if docs["discovery"].is_null() {
            return Err(format!(
                "the agent's issuer `{issuer}` is not an https:// URL, so it has no discovery \
                 document: start it with --issuer https://… (the URL DIR will be served at), \
                 or export the keys alone with --jwks-only"
            ));
        }
        files.push((oidc::DISCOVERY_PATH, &docs["discovery"]));
    }
    let mut written = Vec::new();
    for (rel, value) in files {
        let path = args.dir.join(rel);
        write_public(&path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Public documents (mode 0644), through a temporary file and a rename: a static host never
/// serves half a file.
fn write_public(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}
