//! Policy errors: each one points at a file, line and column, says what is wrong and how to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

/// One problem in a policy file. Displays as `FILE:LINE:COL: message — hint`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message} — {hint}", file.display())]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; 1 when the problem is the whole file (e.g. it cannot be read).
    pub line: usize,
    /// 1-based.
    pub column: usize,
    pub message: String,
    pub hint: String,
}

/// Every problem found in a policy set, in file and position order. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
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

impl std::error::Error for PolicyErrors {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .first()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        PolicyErrors(vec![e])
    }
}

impl PolicyError {
    /// An error about a whole file (or directory) rather than one place in it.
    pub(super) fn whole_file(file: &Path, message: String, hint: impl Into<String>) -> Self {
        PolicyError {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            message,
            hint: hint.into(),
        }
    }

    pub(super) fn at(file: &Path, loc: Location, message: String, hint: impl Into<String>) -> Self {
        // Locations are 1-based; an unknown one (0) still gets a position editors accept.
        let line = usize::try_from(loc.line()).unwrap_or(usize::MAX).max(1);
        let column = usize::try_from(loc.column()).unwrap_or(usize::MAX).max(1);
        PolicyError {
            file: file.to_path_buf(),
            line,
            column,
            message,
            hint: hint.into(),
        }
    }

    /// `FILE:LINE:COL`, to point from one error at another place.
    pub(super) fn place(file: &Path, loc: Location) -> String {
        format!("{}:{}:{}", file.display(), loc.line(), loc.column())
    }
}
