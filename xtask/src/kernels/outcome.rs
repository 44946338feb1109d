//! One kernel's run as the suite's `KTEST` console lines report it, and the line printed for it.
use std::{collections::BTreeMap, time::Duration};

/// What one kernel's run showed.
#[derive(Default)]
pub struct Outcome {
    pub label: String,
    pub package: String,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    /// (program, instructions processed by the verifier or "n/a").
    pub verifier: Vec<(String, String)>,
    /// In-VM phase durations in seconds (load, suite, selftest, reload).
    pub times: BTreeMap<String, String>,
    pub boot: Option<Duration>,
    pub total: Duration,
    pub summary: bool,
    pub problem: Option<String>,
    /// The suite's `KTEST NOTE` lines (e.g. which checks did not run).
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.summary && self.failed.is_empty() && self.problem.is_none()
    }

    pub fn line(&self) -> String {
        let verdict = if self.ok() { "PASS" } else { "FAIL" };
        let mut parts = vec![format!(
            "{} passed, {} failed",
            self.passed.len(),
            self.failed.len()
        )];
        if let Some(p) = &self.problem {
            parts.push(p.clone());
        }
        parts.extend(self.notes.iter().cloned());
        let mut times = Vec::new();
        if let Some(b) = self.boot {
            times.push(format!("boot {:.1} s", b.as_secs_f64()));
        }
        for phase in ["load", "suite", "reload", "selftest"] {
            if let Some(t) = self.times.get(phase) {
                times.push(format!("{phase} {t} s"));
            }
        }
        times.push(format!("total {:.0} s", self.total.as_secs_f64()));
        parts.push(times.join(", "));
        let counted: Vec<(&str, u64)> = self
            .verifier
            .iter()
            .filter_map(|(p, n)| n.parse().ok().map(|n| (p.as_str(), n)))
            .collect();
        if let Some((prog, max)) = counted.iter().max_by_key(|(_, n)| *n) {
            parts.push(format!("verifier max {max} insns ({prog})"));
        } else if !self.verifier.is_empty() {
            parts.push("verifier insns n/a".into());
        }
        format!(
            "kernel {} ({}): {verdict}: {}",
            self.label,
            self.package,
            parts.join("; ")
        )
    }
}

/// One `KTEST` console line into the outcome; PASS/FAIL lines are echoed as they come.
pub fn record(outcome: &mut Outcome, rest: &str, elapsed: Duration) {
    let mut words = rest.splitn(2, ' ');
    let kind = words.next().unwrap_or("");
    let tail = words.next().unwrap_or("").trim().to_owned();
    match kind {
        "BOOT" => {
            outcome.boot = Some(elapsed);
            eprintln!(
                "  {} booted in {:.1} s: {tail}",
                outcome.label,
                elapsed.as_secs_f64()
            );
        }
        "PASS" | "FAIL" => {
            eprintln!("  {} {kind} {tail}", outcome.label);
            if kind == "PASS" {
                outcome.passed.push(tail);
            } else {
                outcome.failed.push(tail);
            }
        }
        "VERIFIER" => {
            eprintln!("  {} verifier {tail}", outcome.label);
            let (prog, n) = tail.split_once(' ').unwrap_or((&tail, "?"));
            outcome.verifier.push((prog.to_owned(), n.to_owned()));
        }
        "TIME" => {
            if let Some((phase, secs)) = tail.split_once(' ') {
                outcome.times.insert(phase.to_owned(), secs.to_owned());
            }
        }
        "SUMMARY" => outcome.summary = true,
        "NOTE" => {
            eprintln!("  {} note: {tail}", outcome.label);
            outcome.notes.push(tail);
        }
        _ => {}
    }
}
