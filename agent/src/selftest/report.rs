//! Results: one [`AttemptResult`] per attempt, the table printed by `tessera selftest`, and the
//! JSON document (`schema: tessera.selftest/v1`) it writes with `--json`.

use serde::Serialize;
use serde_json::Value;

use super::actor::ActorReport;
use super::catalog::{Attempt, Expected, ExpectedRecord};

pub const SCHEMA: &str = "tessera.selftest/v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Observed what the catalog expects: refused and recorded (or allowed where it must be).
    Pass,
    /// Observed what the catalog expects, and that is a way through Tessera does not stop today.
    Gap,
    /// Got through where it must not, or a record is missing or wrong.
    Fail,
    /// This kernel cannot make the attempt (e.g. io_uring disabled).
    Skipped,
    /// Not run (an earlier failure stopped the run without --keep-going, or interrupted).
    NotRun,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Gap => "GAP",
            Self::Fail => "FAIL",
            Self::Skipped => "skipped",
            Self::NotRun => "not run",
        }
    }
}

/// What was observed: the syscall's result and the decision record(s) of the deciding process.
#[derive(Clone, Debug, Serialize)]
pub struct Observed {
    /// `ok`, the errno name, `setup: …`, or `skipped`.
    pub result: String,
    pub tgid: u32,
    /// The record that matched the expectation, else the first for that process, else null.
    pub record: Option<Value>,
    pub steps: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttemptResult {
    pub attempt: Attempt,
    pub description: &'static str,
    pub expected: Expected,
    pub observed: Option<Observed>,
    pub status: Status,
    /// Why it failed or was skipped.
    pub note: Option<String>,
}

impl AttemptResult {
    pub fn not_run(attempt: Attempt, note: &str) -> Self {
        Self {
            attempt,
            description: attempt.describe(),
            expected: attempt.expected(),
            observed: None,
            status: Status::NotRun,
            note: Some(note.to_owned()),
        }
    }

    /// Compares the actor's report and the records of its process with the expectation.
    pub fn judge(attempt: Attempt, report: ActorReport, records: &[Value]) -> Self {
        let expected = attempt.expected();
        let matching = expected
            .record
            .and_then(|e| records.iter().find(|r| record_matches(r, &e)).cloned());
        let mut note = None;
        let status = if let Some(why) = &report.skipped {
            note = Some(why.clone());
            Status::Skipped
        } else if report.result != expected.result.as_observed() {
            note = Some(format!(
                "expected {}, observed {}",
                expected.result.as_observed(),
                report.result
            ));
            Status::Fail
        } else if let (Some(e), None) = (expected.record, &matching) {
            note = Some(format!(
                "no {} record with reason {} at {} for tgid {} ({} record(s) for it)",
                e.verdict,
                e.reason,
                e.hook,
                report.tgid,
                records.len()
            ));
            Status::Fail
        } else if expected.gap.is_some() {
            Status::Gap
        } else {
            Status::Pass
        };
        let record = matching.or_else(|| records.first().cloned());
        Self {
            attempt,
            description: attempt.describe(),
            expected,
            observed: Some(Observed {
                result: report.result,
                tgid: report.tgid,
                record,
                steps: report.steps,
            }),
            status,
            note,
        }
    }
}

fn record_matches(r: &Value, e: &ExpectedRecord) -> bool {
    r["verdict"] == e.verdict && r["reason"] == e.reason && r["hook"] == e.hook
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub kernel: String,
    /// /proc/sys/kernel/io_uring_disabled (0: enabled for all, 1: privileged only, 2: off);
    /// null when the file does not exist (kernels before 6.6 have no switch).
    pub io_uring_disabled: Option<u8>,
    pub results: Vec<AttemptResult>,
    pub passed: usize,
    pub gaps: usize,
    pub failed: usize,
    pub skipped: usize,
    pub not_run: usize,
    /// Attempts for kernel features that this build does not have yet.
    pub pending: Vec<&'static str>,
}

impl Report {
    pub fn new(results: Vec<AttemptResult>, pending: Vec<&'static str>) -> Self {
        let count = |s| results.iter().filter(|r| r.status == s).count();
        Self {
            schema: SCHEMA,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            io_uring_disabled: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            passed: count(Status::Pass),
            gaps: count(Status::Gap),
            failed: count(Status::Fail),
            skipped: count(Status::Skipped),
            not_run: count(Status::NotRun),
            results,
            pending,
        }
    }

    /// True when nothing got through that must not, and no record was missing.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.not_run == 0
    }

    /// The table: attempt, expected, observed, status (and why, for failures and gaps).
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "attempt".to_owned(),
            "expected".to_owned(),
            "observed".to_owned(),
            "status".to_owned(),
        ]];
        for r in &self.results {
            rows.push([
                r.attempt.name().to_owned(),
                expected_cell(&r.expected),
                observed_cell(r),
                r.status.as_str().to_owned(),
            ]);
        }
        let widths: Vec<usize> = (0..4)
            .map(|i| rows.iter().map(|row| row[i].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let line = format!(
                "{:w0$}  {:w1$}  {:w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for r in &self.results {
            if let Some(gap) = r.expected.gap.filter(|_| r.status == Status::Gap) {
                out.push_str(&format!("GAP  {}: {gap}\n", r.attempt));
            }
            if let (Some(note), Status::Fail | Status::Skipped) = (&r.note, r.status) {
                out.push_str(&format!("{}  {}: {note}\n", r.status.as_str(), r.attempt));
            }
        }
        for p in &self.pending {
            out.push_str(&format!("pending  {p}\n"));
        }
        out.push_str(&format!(
            "{} passed, {} failed, {} gaps (documented in docs/bypass-catalog.md), {} skipped, {} not run\n",
            self.passed, self.failed, self.gaps, self.skipped, self.not_run
        ));
        out
    }
}

fn expected_cell(e: &Expected) -> String {
    match e.record {
        Some(r) => format!(
            "{} + {} {} ({})",
            e.result.as_observed(),
            r.verdict,
            r.reason,
            r.hook
        ),
        None => format!("{} (no record)", e.result.as_observed()),
    }
}

fn observed_cell(r: &AttemptResult) -> String {
    let Some(o) = &r.observed else {
        return "-".to_owned();
    };
    match &o.record {
        Some(rec) => format!(
            "{} + {} {} ({})",
            o.result,
            rec["verdict"].as_str().unwrap_or("?"),
            rec["reason"].as_str().unwrap_or("?"),
            rec["hook"].as_str().unwrap_or("?")
        ),
        None => format!("{} (no record)", o.result),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report(result: &str, tgid: u32) -> ActorReport {
        ActorReport {
            result: result.to_owned(),
            tgid,
            ..ActorReport::default()
        }
    }

    fn record(verdict: &str, reason: &str, hook: &str) -> Value {
        json!({"verdict": verdict, "reason": reason, "hook": hook, "process": {"tgid": 7}})
    }

    #[test]
    fn refused_and_recorded_passes() {
        let recs = [record("deny", "no_credential", "connect4")];
        let r = AttemptResult::judge(Attempt::TcpConnect4, report("EPERM", 7), &recs);
        assert_eq!(r.status, Status::Pass, "{r:?}");
    }

    #[test]
    fn getting_through_fails() {
        let r = AttemptResult::judge(Attempt::TcpConnect4, report("ok", 7), &[]);
        assert_eq!(r.status, Status::Fail);
        assert!(
            r.note
                .expect("note")
                .contains("expected EPERM, observed ok")
        );
    }

    #[test]
    fn a_missing_or_wrong_record_fails() {
        let r = AttemptResult::judge(Attempt::TcpConnect4, report("EPERM", 7), &[]);
        assert_eq!(r.status, Status::Fail);
        let wrong = [record("deny", "unknown_workload", "connect4")];
        let r = AttemptResult::judge(Attempt::TcpConnect4, report("EPERM", 7), &wrong);
        assert_eq!(r.status, Status::Fail);
    }

    #[test]
    fn a_documented_way_through_is_a_gap_and_the_report_still_passes() {
        let r = AttemptResult::judge(Attempt::CgroupMoveOutside, report("ok", 7), &[]);
        assert_eq!(r.status, Status::Gap);
        let all = Report::new(vec![r], vec![]);
        assert!(all.ok());
        assert!(all.table().contains("GAP  cgroup_move_outside"));
    }

    #[test]
    fn skipped_and_not_run() {
        let mut rep = report("skipped", 7);
        rep.skipped = Some("io_uring disabled".to_owned());
        let r = AttemptResult::judge(Attempt::UringConnect4, rep, &[]);
        assert_eq!(r.status, Status::Skipped);
        let all = Report::new(
            vec![r, AttemptResult::not_run(Attempt::TcpConnect4, "stopped")],
            vec![],
        );
        assert!(!all.ok(), "an attempt not run is not a clean run");
        let json = serde_json::to_value(&all).expect("json");
        assert_eq!(json["schema"], SCHEMA);
        assert_eq!(json["results"][0]["status"], "skipped");
        assert_eq!(json["results"][1]["status"], "not_run");
        assert_eq!(json["results"][1]["expected"]["result"], "EPERM");
    }
}
