//! The agent's Ed25519 signing key: generated on first start, stored as PKCS#8 (mode 0600), reused.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{DecodingKey, EncodingKey};
use sha2::{Digest, Sha256};
use tracing::info;

use super::CredentialError;

/// File name of the key inside the state directory.
pub const KEY_FILE: &str = "signing-key.pk8";

/// The signing key in the forms jsonwebtoken needs, and its public JWK.
pub struct SigningKeys {
    pub(crate) encoding: EncodingKey,
    pub(crate) decoding: DecodingKey,
    /// RFC 7638 thumbprint of the public JWK.
    pub(crate) kid: String,
    /// base64url of the 32-byte public key (the JWK `x`).
    x: String,
}

impl SigningKeys {
    /// Loads `<state_dir>/signing-key.pk8`, or generates it when absent.
    pub fn load_or_generate(state_dir: &Path) -> Result<SigningKeys, CredentialError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| CredentialError::StateDir {
                path: state_dir.to_owned(),
                source,
            })?;
        let path = state_dir.join(KEY_FILE);
        let key = match fs::symlink_metadata(&path) {
            Ok(meta) => read_key(&path, &meta)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => generate_key(&path)?,
            Err(source) => return Err(CredentialError::KeyRead { path, source }),
        };
        SigningKeys::from_signing_key(&key, &path)
    }

    fn from_signing_key(key: &SigningKey, path: &Path) -> Result<SigningKeys, CredentialError> {
        let der = key.to_pkcs8_der().map_err(|e| CredentialError::KeyFormat {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        let decoding =
            DecodingKey::from_ed_components(&x).map_err(|e| CredentialError::KeyFormat {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        Ok(SigningKeys {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding,
            kid: thumbprint(&x),
            x,
        })
    }

    /// The JWKS document (`GET /v1/jwks`).
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "x": self.x,
                "kid": self.kid,
                "alg": "EdDSA",
                "use": "sig",
            }]
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// RFC 7638 thumbprint of an Ed25519 JWK: SHA-256 over its required members in lexical order.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn read_key(path: &Path, meta: &fs::Metadata) -> Result<SigningKey, CredentialError> {
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != euid {
        return Err(CredentialError::KeyNotOwned {
            path: path.to_owned(),
            expected_uid: euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let der = fs::read(path).map_err(|source| CredentialError::KeyRead {
        path: path.to_owned(),
        source,
    })?;
    let key = SigningKey::from_pkcs8_der(&der).map_err(|e| CredentialError::KeyFormat {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    info!(path = %path.display(), "signing key loaded");
    Ok(key)
}

fn generate_key(path: &Path) -> Result<SigningKey, CredentialError> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let der = key
        .to_pkcs8_der()
        .map_err(|e| CredentialError::KeyGenerate {
            message: e.to_string(),
        })?;
    // Write a temporary file with the final mode, then rename: no window where the key is
    // readable by others, and no half-written key after a crash.
    let tmp = tmp_path(path);
    let write = |tmp: &Path| -> io::Result<()> {
        let _ = fs::remove_file(tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)?;
        file.write_all(der.as_bytes())?;
        file.sync_all()?;
        fs::rename(tmp, path)
    };
    write(&tmp).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        CredentialError::KeyWrite {
            path: path.to_owned(),
            source,
        }
    })?;
    info!(path = %path.display(), "signing key generated");
    Ok(key)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_with_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = SigningKeys::load_or_generate(&state).expect("generate");
        let meta = fs::metadata(state.join(KEY_FILE)).expect("key file");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&state).expect("dir").mode() & 0o777, 0o700);
        let second = SigningKeys::load_or_generate(&state).expect("reuse");
        assert_eq!(first.kid, second.kid);
        assert_eq!(first.jwks(), second.jwks());
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        SigningKeys::load_or_generate(dir.path()).expect("generate");
        let path = dir.path().join(KEY_FILE);
        for mode in [0o640, 0o604] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let err = SigningKeys::load_or_generate(dir.path())
                .err()
                .expect("refused");
            assert!(
                matches!(err, CredentialError::KeyPermissions { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn garbage_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, b"not a key").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = SigningKeys::load_or_generate(dir.path())
            .err()
            .expect("refused");
        assert!(matches!(err, CredentialError::KeyFormat { .. }), "{err}");
    }

    #[test]
    fn kid_is_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        assert_eq!(
            thumbprint("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }
}
