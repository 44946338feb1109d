//! Connections that count on a credential: the kernel's `CONNECTIONS` record of each socket
//! connected under a grant, which of them no longer have a valid grant behind them, and ending
//! those sockets (`SOCK_DESTROY` over `sock_diag`).

use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, MapError};
use tessera_common::{
    ConnectionRecord, GRANT_ACTIVE, GRANT_EMPTY, GRANT_REVOKED, GrantSlot, ProcessGrants,
    WorkloadGrantKey, map_names,
};

use super::{GrantMaps, KernelError, ignore_missing, map_error};

mod destroy;

pub use destroy::{EndMechanism, EndedSocket, SocketEnder, probe_mechanism};

type RecordMap = HashMap<MapData, u64, ConnectionRecord>;

/// `BPF_EXIST`: update an existing element only.
const BPF_EXIST: u64 = 2;

/// A handle on `CONNECTIONS` (pinned and shared by every program set, like the grants); clones
/// share it.
#[derive(Clone)]
pub struct ConnectionMaps {
    records: Arc<Mutex<RecordMap>>,
}

/// Why a connection's holder no longer holds a valid credential for its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapse {
    Revoked,
    Expired,
}

/// A recorded connection whose holder holds no valid grant for its endpoint any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapsedConnection {
    pub cookie: u64,
    pub record: ConnectionRecord,
    pub lapse: Lapse,
}

/// What a look at the records found: the lapsed ones, and the earliest boot-clock instant at
/// which one of the others lapses by expiry (`None`: none will by itself).
#[derive(Debug, Default)]
pub struct Survey {
    pub lapsed: Vec<LapsedConnection>,
    pub next_expiry_ns: Option<u64>,
}

impl ConnectionMaps {
    pub(super) fn new(records: RecordMap) -> Self {
        ConnectionMaps {
            records: Arc::new(Mutex::new(records)),
        }
    }

    /// Every recorded connection.
    pub fn records(&self) -> Result<Vec<(u64, ConnectionRecord)>, KernelError> {
        let map = self.lock()?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Writes the connect's decision id into the socket's record, if the socket still has one
    /// (never creates a record for a socket released meanwhile).
    pub fn set_decision_id(&self, cookie: u64, decision_id: [u8; 16]) -> Result<(), KernelError> {
        let mut map = self.lock()?;
        let mut record = match map.get(&cookie, 0) {
            Ok(r) => r,
            Err(MapError::KeyNotFound) => return Ok(()),
            Err(source) => {
                return Err(KernelError::Map {
                    map: map_names::CONNECTIONS,
                    source,
                });
            }
        };
        record.decision_id = decision_id;
        // BPF_EXIST: a socket released between the lookup and the update stays forgotten.
        ignore_missing(map.insert(cookie, record, BPF_EXIST))
            .map_err(map_error(map_names::CONNECTIONS))
    }

    /// Forgets a socket (it was ended, or it is gone).
    pub fn forget(&self, cookie: u64) -> Result<(), KernelError> {
        let mut map = self.lock()?;
        ignore_missing(map.remove(&cookie)).map_err(map_error(map_names::CONNECTIONS))
    }

    /// Checks every record against the grants as the kernel holds them at `now_ns` (boot
    /// clock), as a connect at `now_ns` would be decided: the holder process's slot for the
    /// (workload, endpoint), else the workload's grant. `keep(rule_id)` says whether the
    /// record's rule ends connections with their credential (`outlive` rules: left alone).
    pub fn survey(
        &self,
        grants: &GrantMaps,
        now_ns: u64,
        keep: impl Fn(u32) -> bool,
    ) -> Result<Survey, KernelError> {
        let mut survey = Survey::default();
        for (cookie, record) in self.records()? {
            if keep(record.rule_id) {
                continue;
            }
            let process = grants.process_grants(record.tgid)?;
            let workload = grants.workload_grant(WorkloadGrantKey {
                workload_id: record.workload_id,
                endpoint_id: record.endpoint_id,
            })?;
            match standing(&record, &process, &workload, now_ns) {
                Standing::Valid { expires_at_ns } => {
                    survey.next_expiry_ns = Some(
                        survey
                            .next_expiry_ns
                            .map_or(expires_at_ns, |n| n.min(expires_at_ns)),
                    );
                }
                Standing::Lapsed(lapse) => survey.lapsed.push(LapsedConnection {
                    cookie,
                    record,
                    lapse,
                }),
            }
        }
        Ok(survey)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RecordMap>, KernelError> {
        self.records.lock().map_err(|_| KernelError::Poisoned)
    }
}

/// Whether a record's holder still holds a valid grant for its endpoint.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// Valid until `expires_at_ns` (the latest of the valid grants).
    Valid {
        expires_at_ns: u64,
    },
    Lapsed(Lapse),
}

/// The holder's standing from its process slots (only those for the record's workload and
/// endpoint) and its workload's grant. A slot that is gone (the holder exited, a reload removed
/// the rule, the credential was ended by its holder) counts as revoked; an expired one as
/// expired, unless a revoked one is also there.
fn standing(
    record: &ConnectionRecord,
    process: &ProcessGrants,
    workload: &GrantSlot,
    now_ns: u64,
) -> Standing {
    let mut lapse = Lapse::Revoked;
    let mut valid_until: Option<u64> = None;
    let relevant = process
        .slots
        .iter()
        .chain(std::iter::once(workload))
        .filter(|s| {
            s.state != GRANT_EMPTY
                && s.endpoint_id == record.endpoint_id
                && s.workload_id == record.workload_id
        });
    let mut seen_revoked = false;
    let mut seen_expired = false;
    for slot in relevant {
        match slot.state {
            GRANT_ACTIVE if slot.expires_at_ns > now_ns => {
                valid_until =
                    Some(valid_until.map_or(slot.expires_at_ns, |v| v.max(slot.expires_at_ns)));
            }
            GRANT_ACTIVE => seen_expired = true,
            GRANT_REVOKED => seen_revoked = true,
            _ => {}
        }
    }
    if let Some(expires_at_ns) = valid_until {
        return Standing::Valid { expires_at_ns };
    }
    if seen_expired && !seen_revoked {
        lapse = Lapse::Expired;
    }
    Standing::Lapsed(lapse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::GRANT_SLOTS;

    fn record() -> ConnectionRecord {
        ConnectionRecord {
            connected_at_ns: 1,
            credential_id: 7,
            tgid: 100,
            workload_id: 3,
            endpoint_id: 4,
            rule_id: 5,
            decision_id: [0; 16],
        }
    }

    fn slot(state: u32, expires_at_ns: u64, endpoint_id: u32) -> GrantSlot {
        GrantSlot {
            expires_at_ns,
            credential_id: 9,
            endpoint_id,
            workload_id: 3,
            state,
            flags: 0,
        }
    }

    fn process(slots: &[GrantSlot]) -> ProcessGrants {
        let mut p = ProcessGrants {
            owner: 1,
            ..ProcessGrants::default()
        };
        p.slots[..slots.len()].copy_from_slice(slots);
        assert!(slots.len() <= GRANT_SLOTS);
        p
    }

    #[test]
    fn a_valid_slot_keeps_the_connection_until_it_expires() {
        let p = process(&[slot(GRANT_ACTIVE, 50, 4)]);
        assert_eq!(
            standing(&record(), &p, &GrantSlot::default(), 10),
            Standing::Valid { expires_at_ns: 50 }
        );
        assert_eq!(
            standing(&record(), &p, &GrantSlot::default(), 50),
            Standing::Lapsed(Lapse::Expired)
        );
    }

    #[test]
    fn a_renewal_replaces_the_expiry_and_a_workload_grant_counts() {
        // The process slot expired, the workload's grant (a renewal under bind: workload) holds.
        let p = process(&[slot(GRANT_ACTIVE, 5, 4)]);
        assert_eq!(
            standing(&record(), &p, &slot(GRANT_ACTIVE, 90, 4), 10),
            Standing::Valid { expires_at_ns: 90 }
        );
    }

    #[test]
    fn revoked_missing_and_other_endpoints() {
        let revoked = process(&[slot(GRANT_REVOKED, 50, 4), slot(GRANT_ACTIVE, 5, 4)]);
        assert_eq!(
            standing(&record(), &revoked, &GrantSlot::default(), 10),
            Standing::Lapsed(Lapse::Revoked)
        );
        // Only a grant for another endpoint: as good as none (the holder exited or ended it).
        let other = process(&[slot(GRANT_ACTIVE, 50, 8)]);
        assert_eq!(
            standing(&record(), &other, &GrantSlot::default(), 10),
            Standing::Lapsed(Lapse::Revoked)
        );
    }
}
