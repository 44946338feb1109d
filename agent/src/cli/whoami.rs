//! `tessera whoami [--pid PID]`: which workload a process maps to under a policy, its SPIFFE ID,
//! every piece of evidence and, for each workload, which of its selectors hold. The first thing
//! to run when a deny is a surprise.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::identity::evidence::{DEFAULT_MAX_HASH_BYTES, Evidence, EvidenceReader, ExeHash};
use crate::identity::k8s::{self, CacheState};
use crate::identity::selectors::SelectorResult;
use crate::policy::PolicySet;

/// Show which workload a process is, and why.
#[derive(Debug, Clone, clap::Args)]
pub struct WhoamiArgs {
    /// The process to attest (in this pid namespace); this command's own process by default.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Policy files, or directories of them, as `tessera run` is given.
    #[arg(long, default_value = super::DEFAULT_POLICY_DIR, value_name = "PATH")]
    pub policy: Vec<PathBuf>,
    /// Executables larger than this many bytes are not hashed.
    #[arg(long, default_value_t = DEFAULT_MAX_HASH_BYTES, value_name = "BYTES")]
    pub max_exe_hash_bytes: u64,
    #[arg(short, long, value_enum, default_value_t = WhoamiFormat::Text)]
    pub output: WhoamiFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WhoamiFormat {
    Text,
    Json,
}

/// The answer, as `-o json` prints it.
#[derive(Debug, Serialize)]
pub struct WhoamiReport {
    pub schema: &'static str,
    pub pid: u32,
    /// The workload the kernel would attribute the process to; `None`: `unknown_workload`.
    pub workload: Option<WorkloadRef>,
    pub policy: PolicyRef,
    pub evidence: Evidence,
    /// `disabled` outside Kubernetes: `k8s` selectors never match.
    pub kubernetes_metadata: CacheState,
    /// Every workload, in policy order, with each selector compared.
    pub workloads: Vec<WorkloadMatch>,
}

#[derive(Debug, Serialize)]
pub struct WorkloadRef {
    pub name: String,
    pub spiffe_id: String,
}

#[derive(Debug, Serialize)]
pub struct PolicyRef {
    pub revision: String,
    pub sources: Vec<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct WorkloadMatch {
    pub name: String,
    pub spiffe_id: String,
    /// Every selector holds.
    pub matched: bool,
    /// The one the process maps to (the most specific match).
    pub selected: bool,
    pub selectors: Vec<SelectorResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum WhoamiError {
    #[error("cannot load the policy")]
    Policy(#[source] crate::policy::PolicyErrors),
    #[error("cannot attest process {pid}")]
    Evidence {
        pid: u32,
        #[source]
        source: crate::identity::evidence::EvidenceError,
    },
}

pub async fn run(args: &WhoamiArgs) -> ExitCode {
    let text = match whoami(args).await {
        Ok(report) => match args.output {
            WhoamiFormat::Json => match serde_json::to_string_pretty(&report) {
                Ok(json) => json + "\n",
                Err(e) => {
                    eprintln!("tessera whoami: {e}");
                    return ExitCode::FAILURE;
                }
            },
            WhoamiFormat::Text => format_text(&report),
        },
        Err(WhoamiError::Policy(errors)) => {
            eprintln!("tessera whoami: cannot load the policy:");
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("tessera whoami: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // `tessera whoami | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera whoami: cannot write the report: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Attests the process and compares it with every workload of the policy.
pub async fn whoami(args: &WhoamiArgs) -> Result<WhoamiReport, WhoamiError> {
    let set = PolicySet::load(&args.policy).map_err(WhoamiError::Policy)?;
    let pid = args.pid.unwrap_or_else(std::process::id);
    let reader = EvidenceReader::new(args.max_exe_hash_bytes);
    let mut evidence = reader
        .read_pid(pid)
        .map_err(|source| WhoamiError::Evidence { pid, source })?;
    let pods = k8s::from_environment(None);
    if let Some(pod) = &evidence.pod
        && pods.state() != CacheState::Disabled
    {
        // One-shot: wait for the first list, but not forever.
        let synced = pods.wait_until(|c| c.state() == CacheState::Synced);
        let _ = tokio::time::timeout(Duration::from_secs(10), synced).await;
        evidence.kubernetes = pods.get(&pod.uid);
    }
    Ok(report(&set, evidence, pods.state()))
}

/// The report for `evidence` under `set`; the chosen workload is the most specific whose every
/// selector holds ([`PolicySet::match_evidence`]).
pub fn report(set: &PolicySet, evidence: Evidence, k8s_state: CacheState) -> WhoamiReport {
    let chosen = set.match_evidence(&evidence);
    let workloads = set
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let selectors = &w.selectors;
            WorkloadMatch {
                name: w.name.clone(),
                spiffe_id: w.spiffe_id.to_string(),
                matched: selectors.matches(&evidence),
                selected: chosen.is_some_and(|c| c.0 as usize == i),
                selectors: selectors.match_report(&evidence),
            }
        })
        .collect();
    WhoamiReport {
        schema: "tessera.whoami/v1",
        pid: evidence.pid,
        workload: chosen.map(|id| {
            let w = set.workload(id);
            WorkloadRef {
                name: w.name.clone(),
                spiffe_id: w.spiffe_id.to_string(),
            }
        }),
        policy: PolicyRef {
            revision: set.revision.clone(),
            sources: set.sources.clone(),
        },
        evidence,
        kubernetes_metadata: k8s_state,
        workloads,
    }
}

/// The human form: the answer first, then the evidence, then each workload's selectors.
pub fn format_text(r: &WhoamiReport) -> String {
    let mut s = String::new();
    let ev = &r.evidence;
    let _ = writeln!(s, "process {} ({})", r.pid, ev.comm);
    match &r.workload {
        Some(w) => {
            let _ = writeln!(s, "workload   {}", w.name);
            let _ = writeln!(s, "spiffe id  {}", w.spiffe_id);
        }
        None => {
            let _ = writeln!(
                s,
                "workload   none: no workload's selectors match, so its connects to protected endpoints are denied (unknown_workload)"
            );
        }
    }
    let _ = writeln!(
        s,
        "policy     {} ({} files)",
        r.policy.revision,
        r.policy.sources.len()
    );
    let _ = writeln!(s, "\nevidence");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "  {k:<14} {v}");
    };
    row("pid", ev.pid.to_string());
    row("comm", ev.comm.clone());
    row(
        "uid",
        format!("{} (effective {})", ev.uid.real, ev.uid.effective),
    );
    row(
        "gid",
        format!("{} (effective {})", ev.gid.real, ev.gid.effective),
    );
    row("groups", join(ev.groups.iter()));
    row("cgroup", ev.cgroup.clone());
    row(
        "systemd unit",
        match ev.systemd_unit() {
            Some(u) => match (&u.template, &u.instance) {
                (Some(t), Some(i)) => format!("{} (template {t}, instance {i})", u.name),
                _ => u.name.clone(),
            },
            None => "-".into(),
        },
    );
    match &ev.exe {
        Some(exe) => {
            let deleted = if exe.deleted { " (deleted)" } else { "" };
            row("exe", format!("{}{deleted}", exe.path));
            row(
                "exe sha256",
                match &exe.hash {
                    ExeHash::Sha256 { sha256 } => sha256.clone(),
                    ExeHash::TooLarge { size, limit } => {
                        format!("not hashed: {size} bytes, over the {limit}-byte limit")
                    }
                    ExeHash::Unavailable { reason } => format!("unavailable: {reason}"),
                    ExeHash::NotComputed => "not computed".to_owned(),
                },
            );
        }
        None => row("exe", "- (none, or not readable)".into()),
    }
    row(
        "container",
        ev.container.as_ref().map_or("-".into(), |c| {
            format!("{} ({})", c.id, serde_plain(&c.runtime))
        }),
    );
    row(
        "k8s pod",
        ev.pod.as_ref().map_or("-".into(), |p| {
            format!("uid {} qos {}", p.uid, serde_plain(&p.qos))
        }),
    );
    row(
        "k8s metadata",
        match (&ev.kubernetes, r.kubernetes_metadata) {
            (Some(m), _) => format!(
                "namespace {} serviceAccount {} pod {} container {} labels {}",
                m.namespace,
                m.service_account,
                m.name,
                ev.k8s_container_name().unwrap_or("-"),
                join(m.labels.iter().map(|(k, v)| format!("{k}={v}")))
            ),
            (None, CacheState::Disabled) => {
                "not watched (not in a Kubernetes cluster): k8s selectors never match".into()
            }
            (None, _) => "no pod known for this process".into(),
        },
    );
    let _ = writeln!(s, "\nworkloads");
    for w in &r.workloads {
        let verdict = match (w.selected, w.matched) {
            (true, _) => "SELECTED",
            (false, true) => "matches, less specific",
            (false, false) => "no match",
        };
        let _ = writeln!(s, "  {} ({}): {verdict}", w.name, w.spiffe_id);
        for sel in &w.selectors {
            let mark = if sel.matched { "yes" } else { "NO " };
            let actual = sel.actual.as_deref().unwrap_or("(none)");
            let _ = writeln!(
                s,
                "    {mark} {:<12} want {}  have {actual}",
                sel.selector, sel.expected
            );
        }
    }
    s
}

fn join<T: ToString>(items: impl Iterator<Item = T>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(" ")
    }
}

/// An enum's serde name (`cri-o`, `Burstable`).
fn serde_plain<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}
