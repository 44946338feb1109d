//! Denies the kernel could not queue as events (`DENY_LOSSES`), turned into decision records.
//!
//! The kernel counts each such deny under who was refused what; counts only grow while an entry
//! lives. The agent reads the map every second and writes, per key, one record for the denies
//! counted since it last looked, with a `lost` field saying how many. Entries found at start
//! (left by an agent that stopped without reporting them, or crashed) count as unreported: after
//! a crash a loss may be reported twice, never not at all. A clean stop deletes what it reported.
use std::collections::HashMap;

use tessera_common::{DecisionEvent, LostDenies, LostDenyKey, VERDICT_DENY};

/// Denies of one key counted since the last report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub key: LostDenyKey,
    pub count: u64,
    /// Boot clock: none of them is older (the key's first loss, or the last one reported before).
    pub since_ns: u64,
    /// Boot clock: the last of them.
    pub last_ns: u64,
    pub credential_id: u64,
}

impl Loss {
    /// The decision event of the last of them, as the kernel would have sent it (no socket
    /// cookie, creator or comm: the record's process fields come from /proc, like any record's).
    pub fn event(&self) -> DecisionEvent {
        let k = &self.key;
        DecisionEvent {
            timestamp_ns: self.last_ns,
            cgroup_id: k.cgroup_id,
            credential_id: self.credential_id,
            socket_cookie: 0,
            pid: k.tgid,
            tgid: k.tgid,
            uid: k.uid,
            gid: k.gid,
            creator_tgid: 0,
            endpoint_id: k.endpoint_id,
            workload_id: k.workload_id,
            rule_id: k.rule_id,
            policy_generation: k.policy_generation,
            port: k.port,
            hook: k.hook,
            protocol: k.protocol,
            verdict: VERDICT_DENY,
            reason: k.reason,
            enforced: k.enforced,
            family: k.family,
            addr: k.addr,
            comm: [0; 16],
            original: tessera_common::ORIGINAL_AS_GIVEN,
            _pad: [0; 3],
        }
    }
}

/// What was reported per key; the kernel's counts minus these are the new losses.
#[derive(Debug, Default)]
pub struct LossReporter {
    reported: HashMap<LostDenyKey, (u64, u64)>,
}

impl LossReporter {
    /// The losses counted since the last call, given the map's entries now.
    pub fn take(&mut self, entries: Vec<(LostDenyKey, LostDenies)>) -> Vec<Loss> {
        let mut seen = HashMap::with_capacity(entries.len());
        let mut losses = Vec::new();
        for (key, value) in entries {
            let (count, since_ns) = match self.reported.get(&key) {
                // The same entry, grown.
                Some(&(reported, last_ns)) if value.count >= reported => {
                    (value.count - reported, last_ns)
                }
                // New, or evicted and counted again since: all of it is new.
                _ => (value.count, value.first_ns),
            };
            if count > 0 {
                losses.push(Loss {
                    key,
                    count,
                    since_ns,
                    last_ns: value.last_ns,
                    credential_id: value.credential_id,
                });
            }
            seen.insert(key, (value.count, value.last_ns));
        }
        // Entries gone from the map (evicted, deleted) are forgotten with it.
        self.reported = seen;
        losses
    }

    /// Every key with the count reported for it (for `Enforcer::forget_lost_denies`).
    pub fn reported(&self) -> Vec<(LostDenyKey, u64)> {
        self.reported
            .iter()
            .map(|(k, (count, _))| (*k, *count))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tgid: u32) -> LostDenyKey {
        LostDenyKey {
            cgroup_id: 7,
            tgid,
            uid: 1000,
            gid: 1000,
            endpoint_id: 1,
            workload_id: 2,
            rule_id: 3,
            policy_generation: 4,
            port: 8200,
            hook: 1,
            protocol: 6,
            reason: 2,
            enforced: 1,
            family: 4,
            _pad: 0,
            addr: [0; 16],
            _pad2: 0,
        }
    }

    fn value(count: u64, first_ns: u64, last_ns: u64) -> LostDenies {
        LostDenies {
            count,
            first_ns,
            last_ns,
            credential_id: 0,
        }
    }

    #[test]
    fn reports_each_loss_once() {
        let mut r = LossReporter::default();
        let first = r.take(vec![(key(1), value(5, 10, 20))]);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].count, first[0].since_ns, first[0].last_ns),
            (5, 10, 20)
        );
        // Nothing new: nothing reported.
        assert!(r.take(vec![(key(1), value(5, 10, 20))]).is_empty());
        // Grown by 3, and a second key.
        let next = r.take(vec![(key(1), value(8, 10, 30)), (key(2), value(1, 25, 25))]);
        let mut counts: Vec<_> = next
            .iter()
            .map(|l| (l.key.tgid, l.count, l.since_ns))
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![(1, 3, 20), (2, 1, 25)]);
        let total: u64 = [first, next].iter().flatten().map(|l| l.count).sum();
        assert_eq!(total, 9);
    }

    #[test]
    fn an_entry_counted_again_after_eviction_is_all_new() {
        let mut r = LossReporter::default();
        r.take(vec![(key(1), value(5, 10, 20))]);
        // Evicted and recreated with a smaller count: its 2 are new, not negative.
        let again = r.take(vec![(key(1), value(2, 40, 41))]);
        assert_eq!((again[0].count, again[0].since_ns), (2, 40));
        // Gone from the map: forgotten, so a later entry is all new too.
        assert!(r.take(vec![]).is_empty());
        assert!(r.reported().is_empty());
        assert_eq!(r.take(vec![(key(1), value(2, 40, 41))])[0].count, 2);
    }

    #[test]
    fn the_event_is_a_deny_of_the_key() {
        let loss = Loss {
            key: key(9),
            count: 4,
            since_ns: 1,
            last_ns: 2,
            credential_id: 11,
        };
        let ev = loss.event();
        assert_eq!(
            (ev.tgid, ev.pid, ev.port, ev.verdict),
            (9, 9, 8200, VERDICT_DENY)
        );
        assert_eq!((ev.timestamp_ns, ev.credential_id, ev.rule_id), (2, 11, 3));
    }
}
