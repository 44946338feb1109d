//! Credentials: the Workload API, JWT signing and verification, the signing key, and the
//! kernel grants written for each credential issued.

mod admin;
mod api;
mod bundle_dir;
pub mod bundle_k8s;
mod client;
mod decide;
mod errors;
mod external;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod grpc;
mod h2_authority;
mod http;
mod jwt;
mod keyring;
mod keys;
mod limit;
pub mod oidc;
mod registry;
mod service;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use admin::{StatusFn, serve_admin_api};
pub use api::{TokenRequest, TokenResponse, bind_socket, serve_workload_api};
pub use client::{
    admin_oidc, admin_revoke, admin_rotate_key, admin_status, end_credential, request_token,
};
pub use errors::{ClientError, CredentialError, GrantStoreError, TokenError};
pub use external::ExternalToken;
pub use jwt::{Claims, OnBehalfOf};
pub use keyring::{RETIRED_FILE, Rotation};
pub use keys::{ES256_KEY_FILE, KEY_FILE, SigningAlgorithm};
pub use limit::{RateLimit, RateLimitSetting};
pub use registry::{CredentialInfo, RevokeTarget};
pub use service::{CredentialObserver, CredentialService};
/// Connections each API serves at once.
pub const MAX_API_CONNECTIONS: usize = http::MAX_CONNECTIONS;

use tessera_common::{GrantSlot, WorkloadGrantKey};

/// Where credentials become kernel grants. Implemented over `kernel::GrantMaps`; unit tests use
/// a recording double.
pub trait GrantStore: Send + Sync {
    /// Puts `slot` into the grants of process `tgid`, the task with instance marker `owner`
    /// (replacing a slot for the same endpoint).
    fn put_process_grant(
        &self,
        tgid: u32,
        owner: u64,
        slot: GrantSlot,
    ) -> Result<(), GrantStoreError>;
    /// Marks the slot holding `credential_id` revoked; false when there is none.
    fn revoke_process_grant(&self, tgid: u32, credential_id: u64) -> Result<bool, GrantStoreError>;
    /// Deletes the slot holding `credential_id`; false when there is none.
    fn remove_process_grant(&self, tgid: u32, credential_id: u64) -> Result<bool, GrantStoreError>;
    fn put_workload_grant(
        &self,
        key: WorkloadGrantKey,
        slot: GrantSlot,
    ) -> Result<(), GrantStoreError>;
    /// Marks the workload grant revoked if it still holds `credential_id`; false otherwise.
    fn revoke_workload_grant(
        &self,
        key: WorkloadGrantKey,
        credential_id: u64,
    ) -> Result<bool, GrantStoreError>;
    /// Marks revoked every process's slot holding `credential_id` (a `bind: process-tree`
    /// grant, copied by the kernel to children); returns how many there were.
    fn revoke_tree_grant(&self, credential_id: u64) -> Result<usize, GrantStoreError>;
}
