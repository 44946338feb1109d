//! `tessera check PATH...`: validate policy files and report every problem with its location.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy::{PolicyErrors, PolicySet};

/// Validate policy files (or directories of them) without running the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Policy files, or directories (their *.yaml and *.yml files).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Prints each error on stderr and returns 1, or prints a summary on stdout and returns 0.
pub fn run(args: &CheckArgs) -> ExitCode {
    match check(args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The summary line for a valid set: `ok: N files, W workloads, E endpoints, R rules[, M issuance
/// modules] (sha256:…)`.
fn check(args: &CheckArgs) -> Result<String, PolicyErrors> {
    let set = PolicySet::load(&args.paths)?;
    let modules = match set.issuance.len() {
        0 => String::new(),
        n => format!(", {n} issuance modules"),
    };
    Ok(format!(
        "ok: {} files, {} workloads, {} endpoints, {} rules{modules} ({})",
        set.sources.len(),
        set.workloads.len(),
        set.endpoints.len(),
        set.rules.len(),
        set.revision
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(paths: &[&std::path::Path]) -> CheckArgs {
        CheckArgs {
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        }
    }

    #[test]
    fn summarises_a_valid_set() {
        let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let demo = policies.join("demo.yaml");
        let summary = check(&args(&[&demo])).unwrap();
        let set = PolicySet::load(std::slice::from_ref(&demo)).unwrap();
        assert_eq!(
            summary,
            format!(
                "ok: 1 files, 2 workloads, 1 endpoints, 1 rules ({})",
                set.revision
            )
        );
        assert_eq!(run(&args(&[&demo])), ExitCode::SUCCESS);
        assert!(check(&args(&[&policies])).is_ok());
    }

    #[test]
    fn reports_every_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nspec:\n  trustDomain: x.org\n  \
             workloads:\n    - name: a\n      match:\n        uuid: 3\n---\nkind: Policy\n",
        )
        .unwrap();
        let errors = check(&args(&[&bad])).unwrap_err();
        let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        let file = bad.display();
        assert_eq!(
            lines,
            [
                format!(
                    "{file}:8:9: unknown field `uuid` in workload match — allowed: cgroup, uid, \
                     gid, systemdUnit, exe, exeSha256, container, k8s"
                ),
                format!(
                    "{file}:10:1: the document has no apiVersion — add apiVersion: tessera.dev/v1alpha1"
                ),
                format!(
                    "{file}:10:1: the document has no spec — add spec: with trustDomain, workloads, endpoints and rules"
                ),
            ]
        );
        assert_eq!(run(&args(&[&bad])), ExitCode::FAILURE);
    }
}
