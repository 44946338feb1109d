//! Attested process identities in the kernel (`PROCESS_IDENTITY`, keyed by tgid) and the
//! exec notifications that ask the agent to attest (`PROCESS_EVENTS`).

use std::mem::{offset_of, size_of};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData};
use tessera_common::{ProcessEvent, ProcessIdentity, map_names};

use super::{KernelError, ignore_missing, map_error};

type IdentityMap = HashMap<MapData, u32, ProcessIdentity>;
type InstanceMap = HashMap<MapData, u32, u64>;

/// A handle on `PROCESS_IDENTITY` and `PROCESS_INSTANCE`; clones share them.
#[derive(Clone)]
pub struct Identities {
    map: Arc<Mutex<IdentityMap>>,
    instances: Arc<Mutex<InstanceMap>>,
}

impl Identities {
    pub(super) fn new(map: IdentityMap, instances: InstanceMap) -> Self {
        Identities {
            map: Arc::new(Mutex::new(map)),
            instances: Arc::new(Mutex::new(instances)),
        }
    }

    /// The instance marker of the task that holds pid `tgid` now (`PROCESS_INSTANCE`), made when
    /// it has none. Never replaces one: the kernel's fork hook owns the markers of the tasks it
    /// saw start. The marker names the caller only if the caller is seen alive afterwards.
    pub fn instance(&self, tgid: u32) -> Result<u64, KernelError> {
        // bpf(2)'s BPF_NOEXIST: insert only if absent.
        const NOEXIST: u64 = 1;
        let mut map = self.instances.lock().map_err(|_| KernelError::Poisoned)?;
        let err = map_error(map_names::PROCESS_INSTANCE);
        for _ in 0..2 {
            match map.get(&tgid, 0) {
                Ok(marker) => return Ok(marker),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(err(e)),
            }
            // The boot clock: later than the marker of any earlier holder of the pid.
            let marker = super::boot_time_ns().max(1);
            match map.insert(tgid, marker, NOEXIST) {
                Ok(()) => return Ok(marker),
                // A fork made one meanwhile: read it.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(err(e)),
            }
        }
        map.get(&tgid, 0).map_err(err)
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
