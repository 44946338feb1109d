//! Aggregation of allow records: the first allow of a (workload, endpoint, rule, reason) in an
//! interval stands for all of them, written when the interval ends with how many it counts.
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::super::record::DecisionRecord;

/// The `aggregate` field added to an aggregated record (a compatible extension of
/// `tessera.decision/v1`: readers that do not know it ignore it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(super) struct Summary {
    /// How many allowed calls this record stands for (itself included).
    pub count: u64,
    /// When the last of them was decided, RFC 3339 UTC (the record's `ts` is the first's).
    pub last_ts: String,
    pub interval_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    workload: Option<String>,
    cgroup: Option<String>,
    endpoint: Option<String>,
    rule: Option<String>,
    reason: &'static str,
}

#[derive(Debug)]
struct Pending {
    first: DecisionRecord,
    count: u64,
    last_ts: SystemTime,
    since: Instant,
    order: u64,
}

#[derive(Debug)]
pub(super) struct Aggregator {
    interval: Duration,
    pending: HashMap<Key, Pending>,
    seq: u64,
}

impl Aggregator {
    pub(super) fn new(interval: Duration) -> Self {
        Aggregator {
            interval,
            pending: HashMap::new(),
            seq: 0,
        }
    }

    pub(super) fn add(&mut self, record: &DecisionRecord, now: Instant) {
        let key = Key {
            workload: record.workload.as_ref().map(|w| w.spiffe_id.to_string()),
            // Without a workload the cgroup tells callers apart.
            cgroup: match record.workload {
                None => record.process.cgroup.clone(),
                Some(_) => None,
            },
            endpoint: record.destination.endpoint.clone(),
            rule: record.policy.rule.clone(),
            reason: record.reason.as_str(),
        };
        self.seq += 1;
        let seq = self.seq;
        let entry = self.pending.entry(key).or_insert_with(|| Pending {
            first: record.clone(),
            count: 0,
            last_ts: record.ts,
            since: now,
            order: seq,
        });
        entry.count += 1;
        entry.last_ts = record.ts;
    }

    /// Records whose interval ended by `now` (all of them when `now` is `None`), oldest first.
    pub(super) fn take_due(&mut self, now: Option<Instant>) -> Vec<(DecisionRecord, Summary)> {
        let interval = self.interval;
        let due_keys: Vec<Key> = self
            .pending
            .iter()
            .filter(|(_, p)| now.is_none_or(|n| n.duration_since(p.since) >= interval))
            .map(|(k, _)| k.clone())
            .collect();
        let mut due: Vec<Pending> = due_keys
            .iter()
            .filter_map(|k| self.pending.remove(k))
            .collect();
        due.sort_by_key(|p| p.order);
        due.into_iter()
            .map(|p| {
                let summary = Summary {
                    count: p.count,
                    last_ts: humantime::format_rfc3339_micros(p.last_ts).to_string(),
                    interval_seconds: interval.as_secs(),
                };
                (p.first, summary)
            })
            .collect()
    }
}
