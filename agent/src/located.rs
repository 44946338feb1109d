//! Errors that point at a place in a YAML file (a policy or the configuration): each one says
//! `FILE:LINE:COL: what is wrong — how to fix`. Also serde-saphyr's errors, reworded that way.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, MessageFormatter, UserMessageFormatter};

/// One problem in a YAML file. Displays as `FILE:LINE:COL: message — hint`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message} — {hint}", file.display())]
pub struct LocatedError {
    pub file: PathBuf,
    /// 1-based; 1 when the problem is the whole file (e.g. it cannot be read).
    pub line: usize,
    /// 1-based.
    pub column: usize,
    pub message: String,
    pub hint: String,
}

/// Every problem found in a set of files, in file and position order. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedErrors(pub Vec<LocatedError>);

impl fmt::Display for LocatedErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LocatedErrors {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .first()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<LocatedError> for LocatedErrors {
    fn from(e: LocatedError) -> Self {
        LocatedErrors(vec![e])
    }
}

impl LocatedError {
    /// An error about a whole file (or directory) rather than one place in it.
    pub(crate) fn whole_file(file: &Path, message: String, hint: impl Into<String>) -> Self {
        LocatedError {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            message,
            hint: hint.into(),
        }
    }

    pub(crate) fn at(file: &Path, loc: Location, message: String, hint: impl Into<String>) -> Self {
        // Locations are 1-based; an unknown one (0) still gets a position editors accept.
        let line = usize::try_from(loc.line()).unwrap_or(usize::MAX).max(1);
        let column = usize::try_from(loc.column()).unwrap_or(usize::MAX).max(1);
        LocatedError {
            file: file.to_path_buf(),
            line,
            column,
            message,
            hint: hint.into(),
        }
    }

    /// `FILE:LINE:COL`, to point from one error at another place.
    pub(crate) fn place(file: &Path, loc: Location) -> String {
        format!("{}:{}:{}", file.display(), loc.line(), loc.column())
    }
}

/// Turns a serde-saphyr error into ours, rewording the common ones so they say how to fix them.
///
/// `unknown_field(field, expected)` words an unknown key for the dialect (which keys are allowed
/// there and why).
pub(crate) fn yaml_error(
    file: &Path,
    err: &serde_saphyr::Error,
    unknown_field: impl Fn(&str, &[&str]) -> (String, String),
) -> LocatedError {
    use serde_saphyr::Error as E;
    let loc = err.location().unwrap_or(Location::UNKNOWN);
    let mut inner = err;
    while let E::AliasError { error, .. } | E::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let (message, hint) = match inner {
        E::SerdeUnknownField {
            field, expected, ..
        } => unknown_field(field, expected),
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => (
            format!("expected {expected}, found {unexpected}"),
            format!("write {expected} here"),
        ),
        E::InvalidScalar { ty, .. } => {
            let what = scalar_kind(ty);
            (format!("expected {what}"), format!("write {what} here"))
        }
        E::Unexpected { expected, .. } => {
            let what = match *expected {
                "sequence start" => "a list",
                "mapping start" => "a mapping (key: value)",
                other => other,
            };
            (format!("expected {what}"), format!("write {what} here"))
        }
        E::DuplicateMappingKey { key, .. } => (
            match key {
                Some(k) => format!("duplicate key `{k}`"),
                None => "duplicate key".into(),
            },
            "keep only one of them".into(),
        ),
        other => (
            sanitize(&UserMessageFormatter.format_message(other)),
            "fix the YAML here (check indentation, quotes and brackets)".into(),
        ),
    };
    LocatedError::at(file, loc, message, hint)
}

fn scalar_kind(ty: &str) -> &str {
    match ty {
        "bool" => "true or false",
        t if t.starts_with('i') || t.starts_with('u') => "a whole number",
        t if t.starts_with('f') => "a number",
        t => t,
    }
}

/// Keeps an error on one line whatever the YAML library put into it.
fn sanitize(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
