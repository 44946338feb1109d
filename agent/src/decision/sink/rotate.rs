//! A decision-log file rotated by size and age: `FILE` → `FILE.1` → … → `FILE.<keep>`.
//! Readers following `FILE` (`tessera logs -f`) see the rename and reopen the new file.
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::info;

use super::{SinkError, SinkOptions};

#[derive(Debug)]
pub(super) struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    /// When the current file was started (its age is measured from here).
    started: SystemTime,
    max_size: u64,
    max_age: Option<Duration>,
    keep: u32,
    /// Whole lines not yet written: written with one write(2) by [`flush`](Self::flush).
    pending: Vec<u8>,
}

impl RotatingFile {
    pub(super) fn open(path: &Path, options: &SinkOptions) -> Result<Self, SinkError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
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
        let (file, size, started) = open_file(path)?;
        Ok(RotatingFile {
            path: path.to_owned(),
            file,
            size,
            started,
            max_size: options.max_size,
            max_age: options.max_age,
            keep: options.keep.max(1),
            pending: Vec::new(),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one whole line for the next [`flush`](Self::flush); rotates first (writing what
    /// is queued to the old file) when the line would not fit, so a file never grows past
    /// `max_size` because lines were batched.
    pub(super) fn push_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.due(line.len() as u64, SystemTime::now()) {
            self.rotate()?;
        }
        self.pending.extend_from_slice(line);
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub(super) fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Writes the queued lines with one write(2) on the O_APPEND file (whole lines only, so
    /// concurrent readers never see half a line interleaved with another writer's). On an error the queued lines are dropped: the caller reports them lost.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        if result.is_ok() {
            self.size += self.pending.len() as u64;
        }
        self.pending.clear();
        result
    }

    fn due(&self, incoming: u64, now: SystemTime) -> bool {
        let size = self.size + self.pending.len() as u64;
        if size == 0 {
            return false;
        }
        let too_big = self.max_size > 0 && size + incoming > self.max_size;
        let too_old = self.max_age.is_some_and(|age| {
            now.duration_since(self.started)
                .is_ok_and(|elapsed| elapsed >= age)
        });
        too_big || too_old
    }

    /// Shifts `FILE.i` to `FILE.i+1` (the oldest falls off), `FILE` to `FILE.1`, and starts
    /// a new `FILE`.
    pub(super) fn rotate(&mut self) -> io::Result<()> {
        // What is queued belongs to the file being rotated away.
        self.flush()?;
        let numbered = |i: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{i}"));
            PathBuf::from(name)
        };
        // Files beyond `keep` (left by a larger `keep` before) go.
        let mut extra = self.keep + 1;
        while std::fs::remove_file(numbered(extra)).is_ok() {
            extra += 1;
        }
        for i in (1..self.keep).rev() {
            match std::fs::rename(numbered(i), numbered(i + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        let (file, size, started) = open_file(&self.path).map_err(|e| match e {
            SinkError::Open { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })?;
        let old_size = self.size;
        self.file = file;
        self.size = size;
        self.started = started;
        info!(path = %self.path.display(), bytes = old_size, keep = self.keep, "decision log rotated");
        Ok(())
    }

    pub(super) fn reopen(&mut self) -> Result<(), SinkError> {
        // Queued lines go to the file they were queued for (moved away or not).
        let _ = self.flush();
        let (file, size, started) = open_file(&self.path)?;
        self.file = file;
        self.size = size;
        self.started = started;
        Ok(())
    }
}

fn open_file(path: &Path) -> Result<(File, u64, SystemTime), SinkError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| SinkError::Open {
            path: path.to_owned(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| SinkError::Open {
        path: path.to_owned(),
        source,
    })?;
    let started = if meta.len() == 0 {
        SystemTime::now()
    } else {
        meta.created()
            .or_else(|_| meta.modified())
            .unwrap_or_else(|_| SystemTime::now())
    };
    Ok((file, meta.len(), started))
}

#[cfg(test)]
impl RotatingFile {
    pub(super) fn replace_file_for_test(&mut self, file: File) {
        self.file = file;
    }

    pub(super) fn backdate(&mut self, by: Duration) {
        self.started = self.started.checked_sub(by).unwrap_or(self.started);
    }
}
