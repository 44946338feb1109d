//! Attested process identities in the kernel (`PROCESS_IDENTITY`, keyed by tgid) and the
//! exec notifications that ask the agent to attest (`PROCESS_EVENTS`).

use std::mem::{offset_of, size_of};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData};
use tessera_common::{ProcessEvent, ProcessIdentity, map_names};

use super::{KernelError, ignore_missing, map_error};

type IdentityMap = HashMap<MapData, u32, ProcessIdentity>;

/// A handle on `PROCESS_IDENTITY`; clones share it.
#[derive(Clone)]
pub struct Identities {
    map: Arc<Mutex<IdentityMap>>,
}

impl Identities {
    pub(super) fn new(map: IdentityMap) -> Self {
        Identities {
            map: Arc::new(Mutex::new(map)),
        }
    }

    /// Writes the identity of process `tgid` (replacing any).
    pub fn put(&self, tgid: u32, identity: ProcessIdentity) -> Result<(), KernelError> {
        self.lock()?
            .insert(tgid, identity, 0)
            .map_err(map_error(map_names::PROCESS_IDENTITY))
    }

    /// Removes the identity of `tgid` (absent is fine).
    pub fn remove(&self, tgid: u32) -> Result<(), KernelError> {
        ignore_missing(self.lock()?.remove(&tgid)).map_err(map_error(map_names::PROCESS_IDENTITY))
    }

    pub fn get(&self, tgid: u32) -> Option<ProcessIdentity> {
        self.lock().ok()?.get(&tgid, 0).ok()
    }

    /// Every key (tgids, and ids of threads created since their process was attested).
    pub fn keys(&self) -> Result<Vec<u32>, KernelError> {
        Ok(self.lock()?.keys().filter_map(Result::ok).collect())
    }

    pub fn clear(&self) -> Result<(), KernelError> {
        for tgid in self.keys()? {
            self.remove(tgid)?;
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, IdentityMap>, KernelError> {
        self.map.lock().map_err(|_| KernelError::Poisoned)
    }
}

/// Copies a `ProcessEvent` out of the ring buffer's bytes.
pub fn decode_process_event(bytes: &[u8]) -> Option<ProcessEvent> {
    if bytes.len() < size_of::<ProcessEvent>() {
        return None;
    }
    let u32_at =
        |at: usize| -> Option<u32> { Some(u32::from_ne_bytes(bytes[at..at + 4].try_into().ok()?)) };
    Some(ProcessEvent {
        cgroup_id: u64::from_ne_bytes(
            bytes[offset_of!(ProcessEvent, cgroup_id)..][..8]
                .try_into()
                .ok()?,
        ),
        tgid: u32_at(offset_of!(ProcessEvent, tgid))?,
        kind: u32_at(offset_of!(ProcessEvent, kind))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_process_event() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&77u64.to_ne_bytes());
        bytes.extend_from_slice(&4242u32.to_ne_bytes());
        bytes.extend_from_slice(&1u32.to_ne_bytes());
        assert_eq!(
            decode_process_event(&bytes),
            Some(ProcessEvent {
                cgroup_id: 77,
                tgid: 4242,
                kind: 1
            })
        );
        assert_eq!(decode_process_event(&bytes[..15]), None);
    }
}
