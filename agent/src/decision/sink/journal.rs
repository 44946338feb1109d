//! Decision records to journald through its native protocol: one datagram per record, the
//! JSON line as MESSAGE plus a few fields to filter on (`journalctl TESSERA_VERDICT=deny`).
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use super::super::record::{DecisionRecord, Verdict};
use super::SinkError;

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

#[derive(Debug)]
pub(super) struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    pub(super) fn connect(path: &Path) -> Result<Self, SinkError> {
        let socket = UnixDatagram::unbound().map_err(|source| SinkError::Journal {
            path: path.to_owned(),
            source,
        })?;
        socket.connect(path).map_err(|source| SinkError::Journal {
            path: path.to_owned(),
            source,
        })?;
        Ok(Journal {
            socket,
            path: path.to_owned(),
        })
    }

    pub(super) fn send(&self, record: &DecisionRecord, line: &[u8]) -> io::Result<()> {
        let datagram = encode(record, line);
        let sent = self.socket.send(&datagram)?;
        if sent != datagram.len() {
            return Err(io::Error::other(format!(
                "journald at {} took {sent} of {} bytes",
                self.path.display(),
                datagram.len()
            )));
        }
        Ok(())
    }
}

/// `KEY=value` lines; the JSON line has no raw newline, so no field needs the binary form.
pub(super) fn encode(record: &DecisionRecord, line: &[u8]) -> Vec<u8> {
    let message = line.strip_suffix(b"\n").unwrap_or(line);
    let priority = match record.verdict {
        Verdict::Allow => "6",
        Verdict::Deny => "4",
    };
    let mut out = Vec::with_capacity(message.len() + 256);
    out.extend_from_slice(b"MESSAGE=");
    out.extend_from_slice(message);
    out.push(b'\n');
    let mut field = |k: &str, v: &str| {
        // Values come from the record: keep each on its line whatever it holds.
        let v: String = v.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        out.extend_from_slice(format!("{k}={v}\n").as_bytes());
    };
    field("PRIORITY", priority);
    field("SYSLOG_IDENTIFIER", "tessera-decisions");
    field("TESSERA_DECISION_ID", &record.decision_id);
    field("TESSERA_VERDICT", record.verdict.as_str());
    field("TESSERA_REASON", record.reason.as_str());
    if let Some(endpoint) = &record.destination.endpoint {
        field("TESSERA_ENDPOINT", endpoint);
    }
    if let Some(w) = &record.workload {
        field("TESSERA_WORKLOAD", &w.spiffe_id.to_string());
    }
    out
}
