//! `DecisionSink`: where decision records go, one JSON line each, flushed at once: a file
//! (rotated by size and age, `keep` old files), stdout (`-`, for DaemonSets) or journald
//! (`journald`). Optionally, allows of one (workload, endpoint) are aggregated per interval.
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::record::{DecisionRecord, Verdict};

mod aggregate;
mod journal;
mod rotate;
#[cfg(test)]
mod tests;

use aggregate::Aggregator;
pub use journal::JOURNAL_SOCKET;
use journal::Journal;
use rotate::RotatingFile;

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
    #[error("cannot rotate the decision log {}: {source}", path.display())]
    Rotate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach journald at {}: {source}; is systemd-journald running?", path.display())]
    Journal {
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

/// How a decision log is kept.
/// The `lost` field of a record that stands for denies the kernel could not queue as events
/// (the ring buffer was full): how many, and the span of time they fell in. The record itself is
/// the last of them (its `ts`, process, destination, rule and credential); `decision_id` is new.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Lost {
    pub count: u64,
    /// RFC 3339 UTC: no lost deny of this record is older.
    pub first_ts: String,
    /// RFC 3339 UTC: the last of them (the record's `ts`).
    pub last_ts: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkOptions {
    /// Rotate a file before it would grow past this many bytes; 0: never by size.
    pub max_size: u64,
    /// Rotate a file once it is this old; `None`: never by age.
    pub max_age: Option<Duration>,
    /// Rotated files kept (`FILE.1` newest … `FILE.<keep>` oldest); at least 1.
    pub keep: u32,
    /// Aggregate allows of one (workload, endpoint) per this interval; `None`: every allow
    /// is written. Denies are never aggregated.
    pub aggregate_allows: Option<Duration>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            max_size: 100 << 20,
            max_age: None,
            keep: 5,
            aggregate_allows: None,
        }
    }
}

#[derive(Debug)]
enum Output {
    File(RotatingFile),
    Stdout,
    Journald(Journal),
}

/// An open decision log.
#[derive(Debug)]
pub struct DecisionSink {
    output: Output,
    aggregator: Option<Aggregator>,
    /// The line being serialised, reused for every record (no allocation per record).
    line: Vec<u8>,
    /// Lines for stdout not yet written (files keep their own; journald takes one datagram a
    /// record).
    stdout_pending: Vec<u8>,
    /// Records queued by [`write_batched`](Self::write_batched) and not yet written.
    pending_records: u64,
}

/// Queued records are written once this many bytes are queued, if no flush came first.
const BATCH_BYTES: usize = 64 << 10;

/// A batch of records could not be written: `records` of them are not in the log.
#[derive(Debug, thiserror::Error)]
#[error("{records} decision records not written: {source}")]
pub struct BatchError {
    pub records: u64,
    #[source]
    pub source: SinkError,
}

impl DecisionSink {
    /// `-` is stdout, `journald` the journal; anything else a file, appended to (created with
    /// mode 0640, its missing parent directories with 0750). Default [`SinkOptions`].
    pub fn open(target: &Path) -> Result<Self, SinkError> {
        Self::open_with(target, &SinkOptions::default())
    }

    pub fn open_with(target: &Path, options: &SinkOptions) -> Result<Self, SinkError> {
        let output = if target == Path::new("-") {
            Output::Stdout
        } else if target == Path::new("journald") {
            Output::Journald(Journal::connect(Path::new(JOURNAL_SOCKET))?)
        } else {
            Output::File(RotatingFile::open(target, options)?)
        };
        Ok(DecisionSink::with_output(
            output,
            options.aggregate_allows.map(Aggregator::new),
        ))
    }

    /// Journald at another socket (tests).
    #[cfg(test)]
    fn journald_at(socket: &Path) -> Result<Self, SinkError> {
        Ok(DecisionSink::with_output(
            Output::Journald(Journal::connect(socket)?),
            None,
        ))
    }

    fn with_output(output: Output, aggregator: Option<Aggregator>) -> Self {
        DecisionSink {
            output,
            aggregator,
            line: Vec::with_capacity(1024),
            stdout_pending: Vec::new(),
            pending_records: 0,
        }
    }

    /// Writes one record as one line and flushes it (an aggregated allow is held until its
    /// interval ends: see [`DecisionSink::flush_due`]). An error means the record is not (or
    /// not entirely) in the log.
    pub fn write(&mut self, record: &DecisionRecord) -> Result<(), SinkError> {
        if self.aggregated(record) {
            return Ok(());
        }
        self.emit(record, None)?;
        self.flush_queued()
    }

    /// Queues one record as one line, to be written with the others by
    /// [`flush_batch`](Self::flush_batch) (or once 64 KiB are queued): one write(2) for many
    /// records when they come fast. Same lines, same order, same rotation as
    /// [`write`](Self::write). An error here is about this record only.
    pub fn write_batched(&mut self, record: &DecisionRecord) -> Result<(), BatchError> {
        if self.aggregated(record) {
            return Ok(());
        }
        self.emit(record, None)
            .map_err(|source| BatchError { records: 1, source })?;
        if matches!(self.output, Output::Journald(_)) {
            return Ok(());
        }
        self.pending_records += 1;
        let queued = match &self.output {
            Output::File(file) => file.pending_bytes(),
            Output::Stdout => self.stdout_pending.len(),
            Output::Journald(_) => 0,
        };
        if queued >= BATCH_BYTES {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Writes the records queued by [`write_batched`](Self::write_batched).
    pub fn flush_batch(&mut self) -> Result<(), BatchError> {
        let records = std::mem::take(&mut self.pending_records);
        self.flush_queued()
            .map_err(|source| BatchError { records, source })
    }

    /// An allow the aggregator holds until its interval ends.
    fn aggregated(&mut self, record: &DecisionRecord) -> bool {
        if record.verdict == Verdict::Allow
            && let Some(agg) = &mut self.aggregator
        {
            agg.add(record, Instant::now());
            return true;
        }
        false
    }

    /// Writes the aggregated records whose interval has ended; call it every second or so.
    pub fn flush_due(&mut self) -> Result<(), SinkError> {
        self.flush(Some(Instant::now()))
    }

    /// Writes every aggregated record now (at shutdown).
    pub fn flush_all(&mut self) -> Result<(), SinkError> {
        self.flush(None)
    }

    fn flush(&mut self, now: Option<Instant>) -> Result<(), SinkError> {
        let Some(agg) = &mut self.aggregator else {
            return Ok(());
        };
        let due = agg.take_due(now);
        let mut first_error = None;
        for (record, summary) in due {
            let extra = serde_json::to_value(&summary).map_err(SinkError::Serialise)?;
            if let Err(e) = self
                .emit(&record, Some(("aggregate", extra)))
                .and_then(|()| self.flush_queued())
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes one record that stands for `lost.count` denies whose events the kernel could not
    /// queue (never aggregated): the record of the last of them, with a `lost` field.
    pub fn write_lost(&mut self, record: &DecisionRecord, lost: &Lost) -> Result<(), SinkError> {
        let extra = serde_json::to_value(lost).map_err(SinkError::Serialise)?;
        self.emit(record, Some(("lost", extra)))?;
        self.flush_queued()
    }

    /// Serialises one record as one line and queues it (journald: sends it). `extra`: a
    /// field added to the record (a compatible extension of `tessera.decision/v1`).
    fn emit(
        &mut self,
        record: &DecisionRecord,
        extra: Option<(&'static str, serde_json::Value)>,
    ) -> Result<(), SinkError> {
        self.line.clear();
        match extra {
            None => serde_json::to_writer(&mut self.line, record),
            Some((name, value)) => serde_json::to_value(record).and_then(|mut v| {
                if let Some(obj) = v.as_object_mut() {
                    obj.insert(name.into(), value);
                }
                serde_json::to_writer(&mut self.line, &v)
            }),
        }
        .map_err(SinkError::Serialise)?;
        self.line.push(b'\n');
        let result = match &mut self.output {
            Output::File(file) => file.push_line(&self.line),
            Output::Stdout => {
                self.stdout_pending.extend_from_slice(&self.line);
                Ok(())
            }
            Output::Journald(journal) => journal.send(record, &self.line),
        };
        result.map_err(|source| self.write_error(source))
    }

    /// Writes what [`emit`](Self::emit) queued.
    fn flush_queued(&mut self) -> Result<(), SinkError> {
        let result = match &mut self.output {
            Output::File(file) => file.flush(),
            Output::Stdout if !self.stdout_pending.is_empty() => {
                let mut out = io::stdout().lock();
                let result = out
                    .write_all(&self.stdout_pending)
                    .and_then(|()| out.flush());
                self.stdout_pending.clear();
                result
            }
            Output::Stdout | Output::Journald(_) => Ok(()),
        };
        result.map_err(|source| self.write_error(source))
    }

    fn write_error(&self, source: io::Error) -> SinkError {
        SinkError::Write {
            target: self.describe(),
            source,
        }
    }

    /// The file's path, "stdout" or "journald".
    pub fn describe(&self) -> String {
        match &self.output {
            Output::File(f) => f.path().display().to_string(),
            Output::Stdout => "stdout".to_owned(),
            Output::Journald(_) => "journald".to_owned(),
        }
    }

    pub fn is_stdout(&self) -> bool {
        matches!(self.output, Output::Stdout)
    }

    /// Reopens the file at its path (after an outside log rotation moved it away); a no-op
    /// for stdout and journald.
    pub fn reopen(&mut self) -> Result<(), SinkError> {
        self.pending_records = 0;
        if let Output::File(f) = &mut self.output {
            f.reopen()?;
        }
        Ok(())
    }
}

impl Drop for DecisionSink {
    /// Records queued and never flushed still reach the log.
    fn drop(&mut self) {
        let _ = self.flush_queued();
    }
}
