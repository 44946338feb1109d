//! `tessera test PATH...`: load policy files and run the unit tests of the issuance modules
//! they name (every `test_*` rule, as `opa test` does).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy::PolicySet;

/// Run the Rego unit tests of the policies' issuance modules.
#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// Policy files, or directories (their *.yaml and *.yml files).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// What the tests of one policy set gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One line a test: `PASS name (module)` or `FAIL name (module): why`.
    pub lines: Vec<String>,
    pub passed: usize,
    pub failed: usize,
}

/// Prints each test's line on stdout and a summary; 1 when a test failed or the policy is
/// invalid (its errors on stderr, as `tessera check` prints them).
pub fn run(args: &TestArgs) -> ExitCode {
    let set = match PolicySet::load(&args.paths) {
        Ok(set) => set,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let report = test(&set);
    for line in &report.lines {
        println!("{line}");
    }
    if set.issuance.is_empty() {
        println!("no issuance module: nothing to test");
    } else {
        println!(
            "{} passed, {} failed ({} modules)",
            report.passed,
            report.failed,
            set.issuance.len()
        );
    }
    if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs every module's tests.
pub fn test(set: &PolicySet) -> Report {
    let mut report = Report::default();
    for module in &set.issuance {
        if module.tests.is_empty() {
            report.lines.push(format!(
                "NONE {}: no test_* rule (add some: `tessera test` runs them)",
                module.path.display()
            ));
        }
        for outcome in module.run_tests() {
            match outcome.failure {
                None => {
                    report.passed += 1;
                    report
                        .lines
                        .push(format!("PASS {} ({})", outcome.name, module.path.display()));
                }
                Some(why) => {
                    report.failed += 1;
                    report.lines.push(format!(
                        "FAIL {} ({}): {why}",
                        outcome.name,
                        module.path.display()
                    ));
                }
            }
        }
    }
    report
}
