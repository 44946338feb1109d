use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::*;
use crate::decision::test_support::example_record;
use crate::decision::{LogFollower, LogLine, Reason};

fn deny_record() -> DecisionRecord {
    let mut r = example_record();
    r.verdict = Verdict::Deny;
    r.reason = Reason::NoCredential;
    r
}

fn allow_record() -> DecisionRecord {
    let mut r = example_record();
    r.verdict = Verdict::Allow;
    r.reason = Reason::CredentialValid;
    r
}

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
    assert!(sink.is_stdout());
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

fn line_len() -> u64 {
    serde_json::to_vec(&example_record()).unwrap().len() as u64 + 1
}

#[test]
fn rotates_by_size_and_keeps_n_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let options = SinkOptions {
        max_size: line_len() * 2,
        keep: 2,
        ..SinkOptions::default()
    };
    let mut sink = DecisionSink::open_with(&path, &options).unwrap();
    for _ in 0..7 {
        sink.write(&example_record()).unwrap();
    }
    // 7 lines, 2 a file: FILE has 1, FILE.1 and FILE.2 have 2 each, the oldest 2 are gone.
    let count = |p: &Path| fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(count(&path), 1);
    assert_eq!(count(&dir.path().join("decisions.jsonl.1")), 2);
    assert_eq!(count(&dir.path().join("decisions.jsonl.2")), 2);
    assert!(!dir.path().join("decisions.jsonl.3").exists());
    // A line larger than max_size still goes in (alone in its file).
    let tiny = SinkOptions {
        max_size: 10,
        keep: 1,
        ..SinkOptions::default()
    };
    let mut sink = DecisionSink::open_with(&path, &tiny).unwrap();
    sink.write(&example_record()).unwrap();
    sink.write(&example_record()).unwrap();
    assert_eq!(count(&path), 1);
    assert_eq!(count(&dir.path().join("decisions.jsonl.1")), 1);
    // keep went from 2 to 1: the extra old file is removed.
    assert!(!dir.path().join("decisions.jsonl.2").exists());
}

#[test]
fn batched_records_are_written_at_the_flush_in_order_and_rotated_alike() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let options = SinkOptions {
        max_size: line_len() * 2,
        keep: 5,
        ..SinkOptions::default()
    };
    let mut sink = DecisionSink::open_with(&path, &options).unwrap();
    let count = |p: &Path| {
        fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let mut ports = Vec::new();
    for port in 1..=5u16 {
        let mut r = example_record();
        r.destination.port = port;
        sink.write_batched(&r).unwrap();
        ports.push(port);
    }
    // Rotation wrote what was queued for the files rotated away; the last line waits.
    assert_eq!(count(&path), 0, "the current file's line is still queued");
    assert_eq!(count(&dir.path().join("decisions.jsonl.1")), 2);
    assert_eq!(count(&dir.path().join("decisions.jsonl.2")), 2);
    sink.flush_batch().unwrap();
    assert_eq!(count(&path), 1);
    // A record written the unbatched way after batched ones comes after them.
    let mut lost = deny_record();
    lost.destination.port = 6;
    sink.write_lost(
        &lost,
        &Lost {
            count: 2,
            first_ts: "2026-01-01T00:00:00Z".into(),
            last_ts: "2026-01-01T00:00:01Z".into(),
        },
    )
    .unwrap();
    ports.push(6);
    // Queued and never flushed: dropping the sink still writes it.
    let mut last = example_record();
    last.destination.port = 7;
    sink.write_batched(&last).unwrap();
    drop(sink);
    ports.push(7);
    // Oldest file first: every record once, in order, across the rotated files.
    let mut seen = Vec::new();
    for name in [
        "decisions.jsonl.4",
        "decisions.jsonl.3",
        "decisions.jsonl.2",
        "decisions.jsonl.1",
        "decisions.jsonl",
    ] {
        let Ok(text) = fs::read_to_string(dir.path().join(name)) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() <= 2, "{name} holds {} lines", lines.len());
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seen.push(v["destination"]["port"].as_u64().unwrap() as u16);
        }
    }
    assert_eq!(seen, ports);
}

#[test]
fn a_failed_batch_reports_how_many_records_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let mut sink = DecisionSink::open(&path).unwrap();
    for _ in 0..3 {
        sink.write_batched(&example_record()).unwrap();
    }
    // The file now refuses writes: its descriptor is replaced by a read-only one.
    if let Output::File(file) = &mut sink.output {
        file.replace_file_for_test(fs::File::open(&path).unwrap());
    }
    let err = sink.flush_batch().unwrap_err();
    assert_eq!(err.records, 3, "{err}");
    // Nothing is left queued to be counted twice.
    sink.flush_batch().unwrap();
}

#[test]
fn rotates_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let options = SinkOptions {
        max_size: 0,
        max_age: Some(Duration::from_secs(3600)),
        keep: 3,
        aggregate_allows: None,
    };
    let mut sink = DecisionSink::open_with(&path, &options).unwrap();
    sink.write(&example_record()).unwrap();
    sink.write(&example_record()).unwrap();
    assert!(!dir.path().join("decisions.jsonl.1").exists());
    let Output::File(f) = &mut sink.output else {
        panic!("a file sink")
    };
    f.backdate(Duration::from_secs(3601));
    sink.write(&example_record()).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 1);
    let old = fs::read_to_string(dir.path().join("decisions.jsonl.1")).unwrap();
    assert_eq!(old.lines().count(), 2);
}

#[test]
fn follower_keeps_up_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let options = SinkOptions {
        max_size: line_len() * 3,
        keep: 2,
        ..SinkOptions::default()
    };
    let mut sink = DecisionSink::open_with(&path, &options).unwrap();
    let mut follower = LogFollower::waiting_for(&path);
    let mut seen = Vec::new();
    for i in 0..10u32 {
        let mut r = example_record();
        r.decision_id = format!("id-{i}");
        sink.write(&r).unwrap();
        // Poll after each write: every rotation happens while the follower is on the file.
        let _ = follower
            .read_available(&mut |line: LogLine| {
                let r: DecisionRecord = serde_json::from_str(&line.text).unwrap();
                seen.push(r.decision_id);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
    }
    let expected: Vec<String> = (0..10).map(|i| format!("id-{i}")).collect();
    assert_eq!(seen, expected);
    assert!(dir.path().join("decisions.jsonl.2").exists());
}

#[test]
fn allows_aggregate_denies_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let options = SinkOptions {
        aggregate_allows: Some(Duration::from_secs(3600)),
        ..SinkOptions::default()
    };
    let mut sink = DecisionSink::open_with(&path, &options).unwrap();
    for _ in 0..5 {
        sink.write(&allow_record()).unwrap();
    }
    sink.write(&deny_record()).unwrap();
    sink.write(&deny_record()).unwrap();
    let mut other = allow_record();
    other.destination.endpoint = Some("another".into());
    sink.write(&other).unwrap();
    // The interval has not ended: only the denies are written, each on its own.
    sink.flush_due().unwrap();
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let now = lines(&path);
    assert_eq!(now.len(), 2);
    assert!(
        now.iter()
            .all(|r| r["verdict"] == "deny" && r.get("aggregate").is_none())
    );
    sink.flush_all().unwrap();
    let all = lines(&path);
    assert_eq!(all.len(), 4);
    assert_eq!(all[2]["verdict"], "allow");
    assert_eq!(all[2]["aggregate"]["count"], 5);
    assert_eq!(all[2]["aggregate"]["interval_seconds"], 3600);
    assert_eq!(all[3]["destination"]["endpoint"], "another");
    assert_eq!(all[3]["aggregate"]["count"], 1);
    // Still a valid v1 record for readers that do not know the field.
    let back: DecisionRecord = serde_json::from_value(all[2].clone()).unwrap();
    assert_eq!(back, allow_record());
}

#[test]
fn journald_datagram_has_the_record_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("journal.sock");
    let server = UnixDatagram::bind(&socket_path).unwrap();
    let mut sink = DecisionSink::journald_at(&socket_path).unwrap();
    assert_eq!(sink.describe(), "journald");
    sink.write(&deny_record()).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = server.recv(&mut buf).unwrap();
    let text = String::from_utf8(buf[..n].to_vec()).unwrap();
    let message = text
        .lines()
        .find_map(|l| l.strip_prefix("MESSAGE="))
        .unwrap();
    let back: DecisionRecord = serde_json::from_str(message).unwrap();
    assert_eq!(back, deny_record());
    assert!(text.contains("\nPRIORITY=4\n"), "{text}");
    assert!(text.contains("\nTESSERA_VERDICT=deny\n"), "{text}");
    assert!(
        text.contains("\nSYSLOG_IDENTIFIER=tessera-decisions\n"),
        "{text}"
    );

    let err = DecisionSink::journald_at(&dir.path().join("absent.sock")).unwrap_err();
    assert!(matches!(err, SinkError::Journal { .. }), "{err}");
}
