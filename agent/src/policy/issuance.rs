//! Issuance modules: the Rego a policy document names in `spec.issuance`, compiled with
//! regorus when the policy loads, evaluated for each credential request its rules cover, and
//! its own unit tests (`test_*` rules, as `opa test` runs them).

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regorus::unstable::{Parser, Rule, RuleHead};
use regorus::utils::limits::ExecutionTimerConfig;
use sha2::{Digest, Sha256};

use super::PolicyError;

/// How long one evaluation may run when the document does not say (`timeout:`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest `timeout:` accepted: issuance is on the caller's request path.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest module accepted.
const MAX_MODULE_BYTES: u64 = 1024 * 1024;
/// Units of interpreter work between two looks at the clock.
const CHECK_INTERVAL: u32 = 32;

/// Index into [`PolicySet::issuance`](super::PolicySet::issuance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IssuanceId(pub u32);

/// A compiled issuance module and the rule path whose value decides.
pub struct IssuanceModule {
    /// The `.rego` file (as the policy named it, joined to the policy file's directory).
    pub path: PathBuf,
    /// `data.<package>.<rule>`.
    pub query: String,
    /// `data.<package>`.
    pub package: String,
    pub timeout: Duration,
    /// `sha256:<hex>` of the module's bytes (part of the policy revision).
    pub sha256: String,
    /// The module's `test_*` rules, in source order.
    pub tests: Vec<String>,
    /// Parsed and prepared once; each evaluation works on a clone.
    engine: regorus::Engine,
}

/// Why an evaluation gave no answer (the request is then refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalFailure {
    /// The module ran longer than its `timeout`.
    Timeout(Duration),
    /// The module failed (a builtin error, a conflict, a bad input): the engine's message.
    Error(String),
}

impl fmt::Display for EvalFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalFailure::Timeout(limit) => write!(
                f,
                "the issuance module ran longer than its timeout of {} ms",
                limit.as_millis()
            ),
            EvalFailure::Error(e) => write!(f, "the issuance module failed: {e}"),
        }
    }
}

/// Where the policy file's errors about a module point: its `rego:` and its `query:`.
pub(super) struct Places<'a> {
    pub rego: &'a dyn Fn(String, &str) -> PolicyError,
    pub query: &'a dyn Fn(String, &str) -> PolicyError,
}

/// One `test_*` rule's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// `data.<package>.test_…`.
    pub name: String,
    /// `None`: it passed (its value is `true`); otherwise what it was instead.
    pub failure: Option<String>,
}

impl IssuanceModule {
    /// Reads, parses and prepares the module at `path` for `query` (`None`:
    /// `data.<package>.decision`). Errors point into the module (`FILE:LINE:COL`), or into the
    /// policy file (`at`) when the module cannot be read or the query names no rule.
    pub(super) fn compile(
        path: &Path,
        query: Option<&str>,
        timeout: Duration,
        at: Places<'_>,
    ) -> Result<IssuanceModule, PolicyError> {
        let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_MODULE_BYTES);
        if too_big {
            return Err((at.rego)(
                format!("the Rego module {} is over 1 MiB", path.display()),
                "split it, or move data out of it",
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            (at.rego)(
                format!("cannot read the Rego module {}: {e}", path.display()),
                "give a path relative to this policy file, to a readable UTF-8 .rego file",
            )
        })?;
        let sha256 = format!("sha256:{}", hex(&Sha256::digest(text.as_bytes())));
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: timeout,
            check_interval: NonZeroU32::new(CHECK_INTERVAL).unwrap_or(NonZeroU32::MIN),
        });
        let package = engine
            .add_policy(path.display().to_string(), text)
            .map_err(|e| rego_error(path, &format!("{e:#}")))?;
        let rules = rule_names(&mut engine);
        let query = match query {
            Some(q) => q.to_owned(),
            None => format!("{package}.decision"),
        };
        let Some(rule) = query
            .strip_prefix(package.as_str())
            .and_then(|r| r.strip_prefix('.'))
        else {
            return Err((at.query)(
                format!("query `{query}` is not a rule of the module's package {package}"),
                &format!("write query: {package}.<rule>, e.g. {package}.decision"),
            ));
        };
        if !rules.iter().any(|r| r == rule) {
            return Err((at.query)(
                format!(
                    "the Rego module {} has no rule `{rule}` for query `{query}`",
                    path.display()
                ),
                "define the rule in the module (an object {allow, reasons, ttl_seconds, scopes}), \
                 or name another in query:",
            ));
        }
        let entry: regorus::Rc<str> = query.as_str().into();
        engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| rego_error(path, &format!("{e:#}")))?;
        let tests = rules
            .into_iter()
            .filter(|r| r.starts_with("test_"))
            .map(|r| format!("{package}.{r}"))
            .collect();
        Ok(IssuanceModule {
            path: path.to_path_buf(),
            query,
            package,
            timeout,
            sha256,
            tests,
            engine,
        })
    }

    /// The query's value for `input` (JSON), within the timeout. `Ok(None)`: undefined.
    pub fn evaluate(
        &self,
        input: &serde_json::Value,
    ) -> Result<Option<serde_json::Value>, EvalFailure> {
        let mut engine = self.engine.clone();
        let input = regorus::Value::from_json_str(&input.to_string())
            .map_err(|e| EvalFailure::Error(format!("{e:#}")))?;
        engine.set_input(input);
        self.rule_value(&mut engine, &self.query)
    }

    /// Runs every `test_*` rule with no input (tests set theirs with `with input as …`).
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        self.tests
            .iter()
            .map(|name| {
                let mut engine = self.engine.clone();
                let failure = match self.rule_value(&mut engine, name) {
                    Ok(Some(serde_json::Value::Bool(true))) => None,
                    Ok(None) => Some("undefined (a condition in its body failed)".to_owned()),
                    Ok(Some(other)) => Some(format!("its value is {other}, not true")),
                    Err(e) => Some(e.to_string()),
                };
                TestOutcome {
                    name: name.clone(),
                    failure,
                }
            })
            .collect()
    }

    fn rule_value(
        &self,
        engine: &mut regorus::Engine,
        rule: &str,
    ) -> Result<Option<serde_json::Value>, EvalFailure> {
        let value = engine.eval_rule(rule.to_owned()).map_err(|e| {
            let timed_out = e.chain().any(|c| {
                matches!(
                    c.downcast_ref(),
                    Some(regorus::LimitError::TimeLimitExceeded { .. })
                )
            }) || format!("{e:#}").contains("TimeLimitExceeded");
            if timed_out {
                EvalFailure::Timeout(self.timeout)
            } else {
                EvalFailure::Error(one_line(&format!("{e:#}")))
            }
        })?;
        if value == regorus::Value::Undefined {
            return Ok(None);
        }
        let json = value
            .to_json_str()
            .map_err(|e| EvalFailure::Error(format!("{e:#}")))?;
        serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| EvalFailure::Error(e.to_string()))
    }
}

impl PartialEq for IssuanceModule {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
            && self.query == other.query
            && self.timeout == other.timeout
            && self.sha256 == other.sha256
    }
}

impl fmt::Debug for IssuanceModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuanceModule")
            .field("path", &self.path)
            .field("query", &self.query)
            .field("timeout", &self.timeout)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// The names of the module's rules that take no arguments (one path component).
fn rule_names(engine: &mut regorus::Engine) -> Vec<String> {
    let mut names = Vec::new();
    for module in engine.get_modules() {
        for rule in &module.policy {
            let refr = match rule.as_ref() {
                Rule::Spec {
                    head: RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. },
                    ..
                } => refr,
                Rule::Default { refr, .. } => refr,
                Rule::Spec { .. } => continue,
            };
            let Ok(parts) = Parser::get_path_ref_components(refr) else {
                continue;
            };
            let name: Vec<&str> = parts.iter().map(|s| s.text()).collect();
            let name = name.join(".");
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// regorus's message (`--> FILE:LINE:COL`, the line, a caret, `error: what`) as one
/// `FILE:LINE:COL: what — hint` error.
fn rego_error(path: &Path, message: &str) -> PolicyError {
    let place = message
        .lines()
        .find_map(|l| l.trim().strip_prefix("--> "))
        .and_then(|p| {
            let mut parts = p.rsplitn(3, ':');
            let col = parts.next()?.parse::<usize>().ok()?;
            let line = parts.next()?.parse::<usize>().ok()?;
            Some((line, col))
        });
    let what = message
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(|| one_line(message), str::to_owned);
    let (line, column) = place.unwrap_or((1, 1));
    PolicyError {
        file: path.to_path_buf(),
        line: line.max(1),
        column: column.max(1),
        message: format!("Rego: {what}"),
        hint: "fix the module (Rego v1: rules need `if`, multi-value rules `contains`); \
               `tessera check` compiles it"
            .to_owned(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
