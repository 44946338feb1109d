//! Error types of the credential module: service, token verification, grant store, clients.

use std::io;
use std::path::PathBuf;

/// Starting or running the credential service and its sockets.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the signing key {path}")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the signing key {path}")]
    KeyWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the signing key {path} has mode {mode:04o}: it must not be readable by group or others; \
         run `chmod 600 {path}` (or delete it to generate a new key)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the signing key {path} is not a regular file owned by uid {expected_uid}; remove it")]
    KeyNotOwned { path: PathBuf, expected_uid: u32 },
    #[error(
        "the signing key {path} is not a valid PKCS#8 {algorithm} key: {message}; delete it to generate a new key"
    )]
    KeyFormat {
        path: PathBuf,
        algorithm: &'static str,
        message: String,
    },
    #[error("cannot generate a signing key: {message}")]
    KeyGenerate { message: String },
    #[error("cannot create the trust bundle directory {path}")]
    BundleDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot update the kernel grant maps")]
    Grants(#[source] GrantStoreError),
}

/// Writing grants to the kernel (implemented over `kernel::GrantMaps` by the lead).
#[derive(Debug, thiserror::Error)]
pub enum GrantStoreError {
    #[error(
        "process {tgid} already holds credentials in all {slots} grant slots; end one (DELETE /v1/credentials/JTI) first"
    )]
    NoFreeSlot { tgid: u32, slots: usize },
    #[error("the kernel grant maps could not be updated")]
    Kernel(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<crate::kernel::KernelError> for GrantStoreError {
    fn from(e: crate::kernel::KernelError) -> Self {
        match e {
            crate::kernel::KernelError::TooManyGrants { tgid, slots } => {
                GrantStoreError::NoFreeSlot { tgid, slots }
            }
            other => GrantStoreError::Kernel(Box::new(other)),
        }
    }
}

/// A token that does not verify.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed(#[source] jsonwebtoken::errors::Error),
    #[error("the token was not signed by this agent's key (kid {kid:?})")]
    UnknownKey { kid: Option<String> },
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token's `sub` is not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH)")]
    NotSpiffe,
    #[error("the token's claims are invalid")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("cannot sign the token")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// Calling the Workload API or the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}; is `tessera run` running, and may you open the socket?")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("HTTP exchange with the agent failed")]
    Http(#[source] hyper::Error),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("the agent's answer (HTTP {status}) is not the JSON expected")]
    Decode {
        status: u16,
        #[source]
        source: serde_json::Error,
    },
    #[error("{error} (HTTP {status}{})", reason_suffix(reason.as_deref()))]
    Refused {
        status: u16,
        reason: Option<String>,
        error: String,
    },
}

fn reason_suffix(reason: Option<&str>) -> String {
    reason.map(|r| format!(", reason {r}")).unwrap_or_default()
}
