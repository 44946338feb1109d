//! The state directory: created 0700 before anything is written into it, and tightened (with a
//! warning) when it already exists with group or other access, since it holds the signing key,
//! the credential registry and copies of the policies.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tracing::warn;

/// The only mode the state directory may have.
pub(crate) const STATE_DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state directory {path}: {source}; choose another --state-dir or fix its parent")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state directory {path} is not a directory; remove it or choose another --state-dir")]
    NotADirectory { path: PathBuf },
    #[error(
        "state directory {path} belongs to uid {owner}, not to the agent's uid {euid}; chown it or choose another --state-dir"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
}

/// Makes `path` a directory of the agent's own with mode 0700. Returns the mode it had when
/// that mode was wider (and has now been tightened), so the caller can say so.
pub(crate) fn prepare(path: &Path) -> Result<Option<u32>, StateDirError> {
    let io_err = |source| StateDirError::Io {
        path: path.to_owned(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(path)
        .map_err(io_err)?;
    let meta = fs::metadata(path).map_err(io_err)?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(StateDirError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode == STATE_DIR_MODE {
        return Ok(None);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(STATE_DIR_MODE)).map_err(io_err)?;
    Ok(Some(mode))
}

/// [`prepare`], saying when a wider mode was found and tightened.
pub(crate) fn prepare_and_report(path: &Path) -> Result<(), StateDirError> {
    if let Some(old) = prepare(path)? {
        warn!(
            path = %path.display(),
            old_mode = %format!("{old:04o}"),
            new_mode = %format!("{STATE_DIR_MODE:04o}"),
            "the state directory was readable by others; its mode is now 0700 (it holds the signing key and the credential registry)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0)
    }

    #[test]
    fn a_new_directory_is_created_0700_with_its_parents() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b/state");
        assert_eq!(prepare(&dir).expect("prepare"), None);
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_wider_directory_is_tightened_and_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(prepare(&dir).expect("prepare"), Some(0o755));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(prepare(&dir).expect("again"), None);
    }

    #[test]
    fn a_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("state");
        fs::write(&file, b"x").expect("write");
        assert!(matches!(
            prepare(&file),
            Err(StateDirError::NotADirectory { .. }) | Err(StateDirError::Io { .. })
        ));
    }
}
