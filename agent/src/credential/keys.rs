//! The agent's signing key: ES256 (P-256 ECDSA, the JWT-SVID default) or EdDSA (Ed25519),
//! generated on first start, stored as PKCS#8 (mode 0600), reused.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};
use tracing::info;

use super::CredentialError;

/// File name of the Ed25519 key inside the state directory (the name it always had).
pub const KEY_FILE: &str = "signing-key.pk8";
/// File name of the P-256 key inside the state directory.
pub const ES256_KEY_FILE: &str = "signing-key-es256.pk8";

/// How tokens are signed. ES256 by default: the JWT-SVID standard allows RS, ES and PS
/// algorithms only, and SPIFFE libraries (py-spiffe, go-spiffe) refuse EdDSA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    #[default]
    Es256,
    EdDsa,
}

impl SigningAlgorithm {
    /// The JOSE name (`alg`).
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::Es256 => "ES256",
            SigningAlgorithm::EdDsa => "EdDSA",
        }
    }

    pub(crate) fn jose(self) -> Algorithm {
        match self {
            SigningAlgorithm::Es256 => Algorithm::ES256,
            SigningAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }

    fn key_file(self) -> &'static str {
        match self {
            SigningAlgorithm::Es256 => ES256_KEY_FILE,
            SigningAlgorithm::EdDsa => KEY_FILE,
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SigningAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ES256" | "es256" => Ok(SigningAlgorithm::Es256),
            "EdDSA" | "eddsa" => Ok(SigningAlgorithm::EdDsa),
            other => Err(format!(
                "unknown signing algorithm `{other}`: write ES256 (JWT-SVID, the default) or EdDSA"
            )),
        }
    }
}

/// The public half of a signing key, as a JWK's members.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PublicJwk {
    /// P-256: base64url of the 32-byte affine coordinates.
    Ec { x: String, y: String },
    /// Ed25519: base64url of the 32-byte public key.
    Okp { x: String },
}

/// The signing key in the forms jsonwebtoken needs, and its public JWK.
pub struct SigningKeys {
    pub(crate) algorithm: SigningAlgorithm,
    pub(crate) encoding: EncodingKey,
    pub(crate) decoding: DecodingKey,
    /// RFC 7638 thumbprint of the public JWK.
    pub(crate) kid: String,
    public: PublicJwk,
    /// When the key was made (its file's mtime).
    pub(crate) created: std::time::SystemTime,
}

impl SigningKeys {
    /// Loads the key of `algorithm` from the state directory, or generates it when absent.
    pub fn load_or_generate(
        state_dir: &Path,
        algorithm: SigningAlgorithm,
    ) -> Result<SigningKeys, CredentialError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| CredentialError::StateDir {
                path: state_dir.to_owned(),
                source,
            })?;
        let path = state_dir.join(algorithm.key_file());
        let (der, created) = match fs::symlink_metadata(&path) {
            Ok(meta) => (
                read_key(&path, &meta)?,
                meta.modified()
                    .unwrap_or_else(|_| std::time::SystemTime::now()),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                generate_key(&path, algorithm)?,
                std::time::SystemTime::now(),
            ),
            Err(source) => return Err(CredentialError::KeyRead { path, source }),
        };
        let mut keys = SigningKeys::from_pkcs8(algorithm, &der, &path)?;
        keys.created = created;
        Ok(keys)
    }

    /// A new key of `algorithm` in place of the current one (the old file is replaced
    /// atomically).
    pub(crate) fn regenerate(
        state_dir: &Path,
        algorithm: SigningAlgorithm,
    ) -> Result<SigningKeys, CredentialError> {
        let path = state_dir.join(algorithm.key_file());
        let der = generate_key(&path, algorithm)?;
        SigningKeys::from_pkcs8(algorithm, &der, &path)
    }

    fn from_pkcs8(
        algorithm: SigningAlgorithm,
        der: &[u8],
        path: &Path,
    ) -> Result<SigningKeys, CredentialError> {
        let format = |message: String| CredentialError::KeyFormat {
            path: path.to_owned(),
            algorithm: algorithm.as_str(),
            message,
        };
        let (public, encoding, decoding) = match algorithm {
            SigningAlgorithm::Es256 => {
                let key =
                    p256::SecretKey::from_pkcs8_der(der).map_err(|e| format(e.to_string()))?;
                let point = key.public_key().to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    return Err(format("the public key is the identity point".to_owned()));
                };
                let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
                let decoding =
                    DecodingKey::from_ec_components(&x, &y).map_err(|e| format(e.to_string()))?;
                (
                    PublicJwk::Ec { x, y },
                    EncodingKey::from_ec_der(der),
                    decoding,
                )
            }
            SigningAlgorithm::EdDsa => {
                let key = ed25519_dalek::SigningKey::from_pkcs8_der(der)
                    .map_err(|e| format(e.to_string()))?;
                let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
                let decoding =
                    DecodingKey::from_ed_components(&x).map_err(|e| format(e.to_string()))?;
                (
                    PublicJwk::Okp { x },
                    EncodingKey::from_ed_der(der),
                    decoding,
                )
            }
        };
        Ok(SigningKeys {
            algorithm,
            encoding,
            decoding,
            kid: thumbprint(&public),
            public,
            created: std::time::SystemTime::now(),
        })
    }

    /// This key's public JWK: `kid`, `use: "jwt-svid"` (a SPIFFE bundle's), `alg`.
    pub fn jwk(&self) -> serde_json::Value {
        let mut jwk = match &self.public {
            PublicJwk::Ec { x, y } => serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": x, "y": y,
            }),
            PublicJwk::Okp { x } => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": x,
            }),
        };
        jwk["kid"] = self.kid.clone().into();
        jwk["alg"] = self.algorithm.as_str().into();
        jwk["use"] = "jwt-svid".into();
        jwk
    }

    /// A JWKS of this key alone (the service publishes its key ring's).
    #[cfg(test)]
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.jwk()] })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// RFC 7638 thumbprint of a JWK: SHA-256 over its required members in lexical order.
fn thumbprint(jwk: &PublicJwk) -> String {
    let canonical = match jwk {
        PublicJwk::Ec { x, y } => format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
        PublicJwk::Okp { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn read_key(path: &Path, meta: &fs::Metadata) -> Result<Vec<u8>, CredentialError> {
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
    info!(path = %path.display(), "signing key loaded");
    Ok(der)
}

fn generate_key(path: &Path, algorithm: SigningAlgorithm) -> Result<Vec<u8>, CredentialError> {
    let generated = match algorithm {
        SigningAlgorithm::Es256 => p256::SecretKey::random(&mut rand::rngs::OsRng)
            .to_pkcs8_der()
            .map(|d| d.as_bytes().to_vec()),
        SigningAlgorithm::EdDsa => ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng)
            .to_pkcs8_der()
            .map(|d| d.as_bytes().to_vec()),
    };
    let der = generated.map_err(|e| CredentialError::KeyGenerate {
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
        file.write_all(&der)?;
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
    info!(path = %path.display(), algorithm = %algorithm, "signing key generated");
    Ok(der)
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

    const BOTH: [SigningAlgorithm; 2] = [SigningAlgorithm::Es256, SigningAlgorithm::EdDsa];

    #[test]
    fn generated_with_0600_and_reused() {
        for alg in BOTH {
            let dir = tempfile::tempdir().expect("tempdir");
            let state = dir.path().join("state");
            let first = SigningKeys::load_or_generate(&state, alg).expect("generate");
            let meta = fs::metadata(state.join(alg.key_file())).expect("key file");
            assert_eq!(meta.mode() & 0o777, 0o600);
            assert_eq!(fs::metadata(&state).expect("dir").mode() & 0o777, 0o700);
            let second = SigningKeys::load_or_generate(&state, alg).expect("reuse");
            assert_eq!(first.kid, second.kid);
            assert_eq!(first.jwks(), second.jwks());
        }
    }

    #[test]
    fn jwks_entries_are_jwt_svid_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let es = SigningKeys::load_or_generate(dir.path(), SigningAlgorithm::Es256).expect("es");
        let jwk = es.jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(jwk["kid"], es.kid());
        for coord in ["x", "y"] {
            let bytes = URL_SAFE_NO_PAD
                .decode(jwk[coord].as_str().expect("coordinate"))
                .expect("base64url");
            assert_eq!(bytes.len(), 32, "{coord}");
        }
        // Both keys live side by side: switching the setting does not destroy the other.
        let ed = SigningKeys::load_or_generate(dir.path(), SigningAlgorithm::EdDsa).expect("ed");
        assert_eq!(ed.jwk()["alg"], "EdDSA");
        assert_eq!(ed.jwk()["use"], "jwt-svid");
        assert_ne!(ed.kid(), es.kid());
    }

    #[test]
    fn algorithm_parses_from_its_jose_name() {
        assert_eq!("ES256".parse(), Ok(SigningAlgorithm::Es256));
        assert_eq!("EdDSA".parse(), Ok(SigningAlgorithm::EdDsa));
        let err = "RS256".parse::<SigningAlgorithm>().expect_err("refused");
        assert!(err.contains("ES256"), "{err}");
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alg = SigningAlgorithm::Es256;
        SigningKeys::load_or_generate(dir.path(), alg).expect("generate");
        let path = dir.path().join(ES256_KEY_FILE);
        for mode in [0o640, 0o604] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let err = SigningKeys::load_or_generate(dir.path(), alg)
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
        for alg in BOTH {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join(alg.key_file());
            fs::write(&path, b"not a key").expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
            let err = SigningKeys::load_or_generate(dir.path(), alg)
                .err()
                .expect("refused");
            assert!(matches!(err, CredentialError::KeyFormat { .. }), "{err}");
        }
    }

    #[test]
    fn kid_is_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        assert_eq!(
            thumbprint(&PublicJwk::Okp {
                x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".to_owned()
            }),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }
}
