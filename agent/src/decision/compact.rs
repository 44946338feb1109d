//! The one-line human format of a decision record (`tessera logs -o compact`, the demo).
use super::record::{DecisionRecord, Verdict};

const RED: &str = "\x1b[1;31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[1;33m";
const RESET: &str = "\x1b[0m";

/// `2026-11-23T10:00:00.123Z DENY  no_credential  agent(spiffe://…) -> 127.0.0.1:18200 vault
/// [connect4 pid 4242 curl] rule=agent-to-vault cred=-`, with ` (audit: not enforced)` after
/// a deny that audit mode let through.
pub fn format_compact(record: &DecisionRecord) -> String {
    format_line(record, false)
}

/// [`format_compact`] with the verdict in ANSI colour (for a terminal).
pub fn format_compact_coloured(record: &DecisionRecord) -> String {
    format_line(record, true)
}

fn format_line(r: &DecisionRecord, colour: bool) -> String {
    let audited_deny = r.verdict == Verdict::Deny && !r.enforced;
    let verdict = format!("{:<5}", r.verdict.as_str().to_uppercase());
    let verdict = match (colour, r.verdict, audited_deny) {
        (false, ..) => verdict,
        (true, Verdict::Allow, _) => format!("{GREEN}{verdict}{RESET}"),
        (true, Verdict::Deny, false) => format!("{RED}{verdict}{RESET}"),
        (true, Verdict::Deny, true) => format!("{YELLOW}{verdict}{RESET}"),
    };
    let who = match (&r.workload, &r.process.cgroup) {
        (Some(w), _) => format!("{}({})", w.name, w.spiffe_id),
        (None, Some(cgroup)) => format!("unknown({cgroup} uid {})", r.process.uid),
        (None, None) => format!("unknown(uid {})", r.process.uid),
    };
    let destination = std::net::SocketAddr::new(r.destination.ip, r.destination.port);
    let mut line = format!(
        "{ts} {verdict} {reason}  {who} -> {destination} {endpoint} [{hook} pid {pid} {comm}] rule={rule} cred={cred}",
        ts = humantime::format_rfc3339_millis(r.ts),
        reason = r.reason,
        endpoint = r.destination.endpoint.as_deref().unwrap_or("-"),
        hook = r.hook,
        pid = r.process.pid,
        comm = r.process.comm,
        rule = r.policy.rule.as_deref().unwrap_or("-"),
        cred = r.credential.as_ref().map_or("-", |c| c.jti.as_str()),
    );
    if audited_deny {
        line.push_str(" (audit: not enforced)");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::record::{CredentialRecord, Reason};
    use crate::decision::test_support::{example_record, example_ts};

    #[test]
    fn deny_line() {
        assert_eq!(
            format_compact(&example_record()),
            "2026-11-23T10:00:00.123Z DENY  no_credential  \
             payments-agent(spiffe://example.org/agents/payments) -> 127.0.0.1:8200 vault \
             [connect4 pid 4242 curl] rule=payments-to-vault cred=-"
        );
    }

    #[test]
    fn allow_with_credential_ipv6_and_audit_deny() {
        let mut record = example_record();
        record.verdict = Verdict::Allow;
        record.reason = Reason::CredentialValid;
        record.destination.ip = "::1".parse().unwrap();
        record.credential = Some(CredentialRecord {
            jti: "jti-1".to_owned(),
            expires_at: example_ts(),
            bind: "process".to_owned(),
        });
        let line = format_compact(&record);
        assert!(line.contains(" ALLOW credential_valid  "), "{line}");
        assert!(line.contains(" -> [::1]:8200 vault "), "{line}");
        assert!(line.ends_with(" cred=jti-1"), "{line}");

        let mut audited = example_record();
        audited.enforced = false;
        audited.workload = None;
        audited.policy.rule = None;
        let line = format_compact(&audited);
        assert!(
            line.contains(" DENY  no_credential  unknown(/tessera-demo/payments uid 1001) -> "),
            "{line}"
        );
        assert!(
            line.ends_with("rule=- cred=- (audit: not enforced)"),
            "{line}"
        );
    }

    #[test]
    fn colour_only_when_asked() {
        let record = example_record();
        assert!(!format_compact(&record).contains('\x1b'));
        let coloured = format_compact_coloured(&record);
        assert!(
            coloured.contains("\x1b[1;31mDENY \x1b[0m no_credential"),
            "{coloured:?}"
        );
    }
}
