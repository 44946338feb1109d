//! The decision log: kernel decision events enriched into `tessera.decision/v1` records,
//! written as JSON lines, and read back (filtered, followed, formatted) by `tessera logs`.
mod compact;
mod enrich;
mod filter;
mod follow;
mod record;
mod sink;

pub use compact::{format_compact, format_compact_coloured};
pub use enrich::{CredentialLookup, CredentialRef, Enricher, EvidenceSource, NoCredentials};
pub use filter::RecordFilter;
pub use follow::{FollowError, LogFollower, LogLine};
pub use record::{
    ConnectionRef, CredentialRecord, DecisionMode, DecisionRecord, Destination, Hook, PodRecord,
    PolicyRecord, ProcessRecord, Protocol, Reason, SCHEMA, Verdict, WorkloadRecord,
};
pub use sink::{BatchError, DecisionSink, JOURNAL_SOCKET, Lost, SinkError, SinkOptions};

#[cfg(test)]
pub(crate) mod test_support;
