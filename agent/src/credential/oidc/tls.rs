//! The OIDC listener's TLS: a certificate chain and key from PEM files (`--oidc-cert`,
//! `--oidc-key`), read at start (a bad file stops the start) and again on SIGHUP (a bad file
//! then keeps the certificate in use).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error(
        "--oidc-cert {path}: {message}; give the PEM certificate chain (server certificate \
         first) the OIDC listener presents"
    )]
    Cert { path: PathBuf, message: String },
    #[error(
        "--oidc-key {path}: {message}; give the PEM private key (PKCS#8, PKCS#1 or SEC1) of --oidc-cert"
    )]
    Key { path: PathBuf, message: String },
    #[error("--oidc-cert {cert} and --oidc-key {key} do not go together: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot set up TLS for the OIDC listener: {0}")]
    Tls(String),
    #[error("{0}")]
    Settings(String),
    #[error("cannot listen for OIDC discovery on {addr}: {source}; pick another --oidc-addr")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the listener's certificate chain and key are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks both files: the chain parses, the key parses and is the chain's.
    fn load(&self, provider: &CryptoProvider) -> Result<CertifiedKey, OidcError> {
        let cert_err = |message: String| OidcError::Cert {
            path: self.cert.clone(),
            message,
        };
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| cert_err(pem_message(&e)))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_err(pem_message(&e)))?;
        if chain.is_empty() {
            return Err(cert_err("no CERTIFICATE in the file".to_owned()));
        }
        if let Ok(meta) = std::fs::metadata(&self.key) {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                warn!(
                    key = %self.key.display(),
                    mode = format!("{mode:04o}"),
                    "the OIDC listener's private key is readable by every user: chmod o-rwx it"
                );
            }
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| OidcError::Key {
            path: self.key.clone(),
            message: pem_message(&e),
        })?;
        CertifiedKey::from_der(chain, key, provider).map_err(|e| OidcError::Mismatch {
            cert: self.cert.clone(),
            key: self.key.clone(),
            message: e.to_string(),
        })
    }
}

fn pem_message(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read it: {io}"),
        Error::NoItemsFound => "no PEM section of the expected kind in the file".to_owned(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// The certificate served now; replaced by [`CertResolver::reload`].
#[derive(Debug)]
pub(super) struct CertResolver {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub(super) fn new(files: TlsFiles) -> Result<CertResolver, OidcError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = files.load(&provider)?;
        Ok(CertResolver {
            files,
            provider,
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Reads the files again; on an error the certificate in use stays, and the error is
    /// logged.
    pub(super) fn reload(&self) {
        match self.files.load(&self.provider) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                info!(cert = %self.files.cert.display(), "OIDC listener certificate reloaded");
            }
            Err(e) => warn!(
                error = %e,
                "the OIDC listener keeps its certificate: the new files are refused"
            ),
        }
    }

    pub(super) fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, OidcError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| OidcError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    pub(super) fn cert_path(&self) -> &Path {
        &self.files.cert
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}
