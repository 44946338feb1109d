//! `RecordFilter`: which records `tessera logs` shows.
use super::record::{DecisionRecord, Reason, Verdict};

/// Every set criterion must hold; an empty filter matches every record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordFilter {
    pub verdict: Option<Verdict>,
    pub reason: Option<Reason>,
    /// A workload name or SPIFFE ID.
    pub workload: Option<String>,
    /// An endpoint name.
    pub endpoint: Option<String>,
}

impl RecordFilter {
    pub fn matches(&self, record: &DecisionRecord) -> bool {
        self.verdict.is_none_or(|v| v == record.verdict)
            && self.reason.is_none_or(|r| r == record.reason)
            && self.workload.as_deref().is_none_or(|wanted| {
                record
                    .workload
                    .as_ref()
                    .is_some_and(|w| w.name == wanted || w.spiffe_id.to_string() == wanted)
            })
            && self
                .endpoint
                .as_deref()
                .is_none_or(|wanted| record.destination.endpoint.as_deref() == Some(wanted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::test_support::example_record;

    #[test]
    fn empty_filter_matches_everything() {
        assert!(RecordFilter::default().matches(&example_record()));
    }

    #[test]
    fn each_criterion() {
        let record = example_record();
        let matches = |f: RecordFilter| f.matches(&record);
        assert!(matches(RecordFilter {
            verdict: Some(Verdict::Deny),
            ..Default::default()
        }));
        assert!(!matches(RecordFilter {
            verdict: Some(Verdict::Allow),
            ..Default::default()
        }));
        assert!(matches(RecordFilter {
            reason: Some(Reason::NoCredential),
            ..Default::default()
        }));
        assert!(!matches(RecordFilter {
            reason: Some(Reason::CredentialExpired),
            ..Default::default()
        }));
        let workload = |w: &str| RecordFilter {
            workload: Some(w.to_owned()),
            ..Default::default()
        };
        assert!(matches(workload("payments-agent")));
        assert!(matches(workload("spiffe://example.org/agents/payments")));
        assert!(!matches(workload("payments")));
        assert!(!matches(workload("spiffe://example.org/agents")));
        let endpoint = |e: &str| RecordFilter {
            endpoint: Some(e.to_owned()),
            ..Default::default()
        };
        assert!(matches(endpoint("vault")));
        assert!(!matches(endpoint("vault2")));
    }

    #[test]
    fn criteria_combine_with_and() {
        let record = example_record();
        let both = RecordFilter {
            verdict: Some(Verdict::Deny),
            endpoint: Some("vault".to_owned()),
            ..Default::default()
        };
        assert!(both.matches(&record));
        let one_fails = RecordFilter {
            reason: Some(Reason::Allowlisted),
            ..both
        };
        assert!(!one_fails.matches(&record));
    }

    #[test]
    fn workload_filter_skips_records_without_workload() {
        let mut record = example_record();
        record.workload = None;
        let f = RecordFilter {
            workload: Some("payments-agent".to_owned()),
            ..Default::default()
        };
        assert!(!f.matches(&record));
    }
}
