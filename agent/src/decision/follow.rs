//! `LogFollower`: reads a decision log line by line and, polled again, picks up what was
//! appended since, across truncation and replacement of the file (log rotation).
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot open the decision log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the decision log {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One line of the log, without its newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// 1-based, counted from the start of the current file (restarts after truncation).
    pub number: u64,
    pub text: String,
}

#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    file: Option<OpenLog>,
    /// Bytes after the last newline, waiting for the rest of their line.
    partial: Vec<u8>,
    line_number: u64,
}

#[derive(Debug)]
struct OpenLog {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
}

const CHUNK: usize = 64 * 1024;

impl LogFollower {
    /// Opens an existing log.
    pub fn open(path: &Path) -> Result<Self, FollowError> {
        let mut follower = Self::waiting_for(path);
        follower.file = Some(OpenLog::open(path)?);
        Ok(follower)
    }

    /// A follower for a log that may not exist yet: it is opened when it appears.
    pub fn waiting_for(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            partial: Vec::new(),
            line_number: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `on_line` for every complete line not yet seen; stops early when it breaks.
    /// A truncated file is read again from its start; a file replaced at the path is read
    /// to its end, then the new one from its start.
    pub fn read_available(
        &mut self,
        on_line: &mut dyn FnMut(LogLine) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, FollowError> {
        if self.file.is_none() {
            match OpenLog::open(&self.path) {
                Ok(log) => self.file = Some(log),
                Err(FollowError::Open { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    return Ok(ControlFlow::Continue(()));
                }
                Err(e) => return Err(e),
            }
        }
        loop {
            if self.read_current(on_line)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
            // Replaced (rotated) at the path: the old file is drained, go on with the new one.
            let replaced = match (fs::metadata(&self.path), &self.file) {
                (Ok(meta), Some(log)) => (meta.dev(), meta.ino()) != (log.dev, log.ino),
                _ => false,
            };
            if !replaced {
                return Ok(ControlFlow::Continue(()));
            }
            match OpenLog::open(&self.path) {
                Ok(log) => {
                    self.file = Some(log);
                    self.restart();
                }
                // Gone again between the two calls: try at the next poll.
                Err(_) => return Ok(ControlFlow::Continue(())),
            }
        }
    }

    /// The last line when it has no newline (the end of a log read once, not followed).
    pub fn finish(&mut self) -> Option<LogLine> {
        if self.partial.is_empty() {
            return None;
        }
        let bytes = std::mem::take(&mut self.partial);
        self.line_number += 1;
        Some(LogLine {
            number: self.line_number,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    fn restart(&mut self) {
        self.partial.clear();
        self.line_number = 0;
    }

    fn read_current(
        &mut self,
        on_line: &mut dyn FnMut(LogLine) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, FollowError> {
        let Some(log) = self.file.as_mut() else {
            return Ok(ControlFlow::Continue(()));
        };
        let read_error = |source| FollowError::Read {
            path: self.path.clone(),
            source,
        };
        let len = log.file.metadata().map_err(read_error)?.len();
        if len < log.offset {
            log.offset = 0;
            self.partial.clear();
            self.line_number = 0;
        }
        log.file
            .seek(SeekFrom::Start(log.offset))
            .map_err(read_error)?;
        let mut chunk = vec![0u8; CHUNK];
        loop {
            let n = match log.file.read(&mut chunk) {
                Ok(0) => return Ok(ControlFlow::Continue(())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            log.offset += n as u64;
            self.partial.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(end) = self.partial[start..].iter().position(|&b| b == b'\n') {
                let text = String::from_utf8_lossy(&self.partial[start..start + end]).into_owned();
                start += end + 1;
                self.line_number += 1;
                if on_line(LogLine {
                    number: self.line_number,
                    text,
                })
                .is_break()
                {
                    // What follows the stopping line is read again next time.
                    log.offset -= (self.partial.len() - start) as u64;
                    self.partial.clear();
                    return Ok(ControlFlow::Break(()));
                }
            }
            self.partial.drain(..start);
        }
    }
}

impl OpenLog {
    fn open(path: &Path) -> Result<Self, FollowError> {
        let open_error = |source| FollowError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        Ok(Self {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset: 0,
        })
    }
}

#[cfg(test)]
mod tests;
