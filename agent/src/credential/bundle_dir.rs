//! `--trust-bundle-dir DIR`: a trust domain's keys gathered through a shared directory. Each
//! agent writes its own JWKS there atomically (`<host>-<id>.jwks.json`) and reads every other
//! agent's file; the union is what it publishes and verifies with. A fleet shares the
//! directory through config management or a shared volume.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::CredentialError;

const SUFFIX: &str = ".jwks.json";

pub(crate) struct BundleDir {
    dir: PathBuf,
    own: PathBuf,
}

impl BundleDir {
    /// `dir` (created 0755 when absent); this agent's file is named after the host and its
    /// state directory, so it stays the same across restarts and rotations.
    pub(crate) fn open(dir: &Path, state_dir: &Path) -> Result<BundleDir, CredentialError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| CredentialError::BundleDir {
                path: dir.to_owned(),
                source,
            })?;
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".to_owned());
        let state = fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        let id = Sha256::digest(format!("{host}\0{}", state.display()).as_bytes());
        let name = format!(
            "{}-{}{SUFFIX}",
            host.replace(['/', '\0'], "_"),
            &URL_SAFE_NO_PAD.encode(id)[..12]
        );
        Ok(BundleDir {
            dir: dir.to_owned(),
            own: dir.join(name),
        })
    }

    /// Writes this agent's JWKS (public keys: mode 0644), through a temporary file and a
    /// rename, so a reader never sees half a file.
    pub(crate) fn publish(&self, jwks: &serde_json::Value) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(jwks).unwrap_or_default();
        let mut tmp = self.own.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &self.own)
    }

    /// The JWKs of every other agent's file (an unreadable or invalid file is skipped, with a
    /// warning).
    pub(crate) fn others(&self) -> Vec<serde_json::Value> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot read the trust bundle directory");
                return Vec::new();
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p != &self.own
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(SUFFIX))
            })
            .collect();
        paths.sort();
        let mut keys = Vec::new();
        for path in paths {
            let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            });
            match parsed {
                Ok(doc) => match doc.get("keys").and_then(serde_json::Value::as_array) {
                    Some(list) => keys.extend(list.iter().cloned()),
                    None => {
                        warn!(path = %path.display(), "a trust bundle file without \"keys\" is skipped")
                    }
                },
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "a trust bundle file is skipped")
                }
            }
        }
        keys
    }
}
