//! Glue between modules that do not know each other: the kernel's grant maps behind the
//! credential service's `GrantStore`, and the credential registry behind the enricher's lookup.
use std::sync::Arc;

use tessera_common::{GrantSlot, WorkloadGrantKey};

use crate::{
    credential::{CredentialService, GrantStore, GrantStoreError},
    decision::{CredentialLookup, CredentialRef},
    kernel::GrantMaps,
};

pub struct KernelGrants(pub GrantMaps);

impl GrantStore for KernelGrants {
    fn put_process_grant(
        &self,
        tgid: u32,
        owner: u64,
        slot: GrantSlot,
    ) -> Result<(), GrantStoreError> {
        Ok(self.0.put_process_grant(tgid, owner, slot)?)
    }
    fn revoke_process_grant(&self, tgid: u32, credential_id: u64) -> Result<bool, GrantStoreError> {
        Ok(self.0.revoke_process_grant(tgid, credential_id)?)
    }
    fn remove_process_grant(&self, tgid: u32, credential_id: u64) -> Result<bool, GrantStoreError> {
        Ok(self.0.remove_process_grant(tgid, credential_id)?)
    }
    fn put_workload_grant(
        &self,
        key: WorkloadGrantKey,
        slot: GrantSlot,
    ) -> Result<(), GrantStoreError> {
        Ok(self.0.put_workload_grant(key, slot)?)
    }
    fn revoke_workload_grant(
        &self,
        key: WorkloadGrantKey,
        credential_id: u64,
    ) -> Result<bool, GrantStoreError> {
        Ok(self.0.revoke_workload_grant(key, credential_id)?)
    }
    fn revoke_tree_grant(&self, credential_id: u64) -> Result<usize, GrantStoreError> {
        Ok(self.0.revoke_everywhere(credential_id)?)
    }
}

pub struct CredentialRefs(pub Arc<CredentialService>);

impl CredentialLookup for CredentialRefs {
    fn lookup(&self, credential_id: u64) -> Option<CredentialRef> {
        self.0.lookup(credential_id).map(CredentialRef::from)
    }
}
