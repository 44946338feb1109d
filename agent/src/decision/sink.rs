//! `DecisionSink`: where decision records go, one JSON line each, flushed at once.
#[cfg(test)]
use std::fs;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::record::DecisionRecord;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the decision log directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the decision log {} for appending: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot serialise a decision record: {0}")]
    Serialise(#[source] serde_json::Error),
    #[error("cannot write to the decision log {target}: {source}")]
    Write {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// An open decision log.
#[derive(Debug)]
pub enum DecisionSink {
    File { path: PathBuf, file: File },
    Stdout,
}

impl DecisionSink {
    /// `-` is stdout; anything else a file, appended to (created with mode 0640, its missing
    /// parent directories with 0750).
    pub fn open(target: &Path) -> Result<Self, SinkError> {
        if target == Path::new("-") {
            return Ok(Self::Stdout);
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(|source| SinkError::CreateDir {
                    path: parent.to_owned(),
                    source,
                })?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(target)
            .map_err(|source| SinkError::Open {
                path: target.to_owned(),
                source,
            })?;
        Ok(Self::File {
            path: target.to_owned(),
            file,
        })
    }

    /// Writes one record as one line and flushes it. An error means the record is not (or
    /// not entirely) in the log.
    pub fn write(&mut self, record: &DecisionRecord) -> Result<(), SinkError> {
        let mut line = serde_json::to_vec(record).map_err(SinkError::Serialise)?;
        line.push(b'\n');
        let result = match self {
            // One write(2) on an O_APPEND file: concurrent readers never see half a line
            // interleaved with another writer's.
            Self::File { file, .. } => file.write_all(&line).and_then(|()| file.flush()),
            Self::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&line).and_then(|()| out.flush())
            }
        };
        result.map_err(|source| SinkError::Write {
            target: self.describe(),
            source,
        })
    }

    /// The file's path, or "stdout".
    pub fn describe(&self) -> String {
        match self {
            Self::File { path, .. } => path.display().to_string(),
            Self::Stdout => "stdout".to_owned(),
        }
    }

    /// Reopens the file at its path (after log rotation moved it away); a no-op for stdout.
    pub fn reopen(&mut self) -> Result<(), SinkError> {
        if let Self::File { path, .. } = self {
            *self = Self::open(&path.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::decision::test_support::example_record;

    #[test]
    fn creates_parents_and_appends_one_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/tessera/decisions.jsonl");
        let mut sink = DecisionSink::open(&path).unwrap();
        sink.write(&example_record()).unwrap();
        sink.write(&example_record()).unwrap();
        // Reopening appends rather than truncates.
        let mut again = DecisionSink::open(&path).unwrap();
        again.write(&example_record()).unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for line in lines {
            let back: DecisionRecord = serde_json::from_str(line).unwrap();
            assert_eq!(back, example_record());
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
        assert_eq!(sink.describe(), path.display().to_string());
    }

    #[test]
    fn dash_is_stdout() {
        let sink = DecisionSink::open(Path::new("-")).unwrap();
        assert!(matches!(sink, DecisionSink::Stdout));
        assert_eq!(sink.describe(), "stdout");
    }

    #[test]
    fn errors_are_returned_not_swallowed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, "").unwrap();
        let err = DecisionSink::open(&file.join("decisions.jsonl")).unwrap_err();
        assert!(matches!(err, SinkError::CreateDir { .. }), "{err}");

        // /dev/full accepts the open and fails every write with ENOSPC.
        if Path::new("/dev/full").exists() {
            let mut sink = DecisionSink::open(Path::new("/dev/full")).unwrap();
            let err = sink.write(&example_record()).unwrap_err();
            assert!(matches!(err, SinkError::Write { .. }), "{err}");
            assert!(err.to_string().contains("/dev/full"), "{err}");
        }
    }
}
