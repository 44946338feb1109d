use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::*;

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Every available line as (number, text).
fn poll(follower: &mut LogFollower) -> Vec<(u64, String)> {
    let mut lines = Vec::new();
    let flow = follower
        .read_available(&mut |l| {
            lines.push((l.number, l.text));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(flow.is_continue());
    lines
}

fn numbered(items: &[(u64, &str)]) -> Vec<(u64, String)> {
    items.iter().map(|(n, t)| (*n, (*t).to_owned())).collect()
}

#[test]
fn reads_lines_then_appended_ones_keeping_partial_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    append(&path, "one\ntwo\nthr");
    let mut f = LogFollower::open(&path).unwrap();
    assert_eq!(poll(&mut f), numbered(&[(1, "one"), (2, "two")]));
    assert_eq!(poll(&mut f), vec![]);
    append(&path, "ee\nfour\n");
    assert_eq!(poll(&mut f), numbered(&[(3, "three"), (4, "four")]));
    append(&path, "tail");
    assert_eq!(poll(&mut f), vec![]);
    assert_eq!(
        f.finish(),
        Some(LogLine {
            number: 5,
            text: "tail".to_owned()
        })
    );
    assert_eq!(f.finish(), None);
}

#[test]
fn truncation_restarts_from_the_top() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    append(&path, "a-long-first-line\nsecond\n");
    let mut f = LogFollower::open(&path).unwrap();
    assert_eq!(poll(&mut f).len(), 2);
    fs::write(&path, "new\n").unwrap();
    assert_eq!(poll(&mut f), numbered(&[(1, "new")]));
}

#[test]
fn replaced_file_is_drained_then_the_new_one_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    append(&path, "old-1\n");
    let mut f = LogFollower::open(&path).unwrap();
    assert_eq!(poll(&mut f), numbered(&[(1, "old-1")]));
    // A writer still holding the old file adds a line, then rotation moves it away.
    append(&path, "old-2\n");
    fs::rename(&path, dir.path().join("d.jsonl.1")).unwrap();
    append(&path, "new-1\n");
    assert_eq!(poll(&mut f), numbered(&[(2, "old-2"), (1, "new-1")]));
}

#[test]
fn waits_for_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    assert!(matches!(
        LogFollower::open(&path),
        Err(FollowError::Open { .. })
    ));
    let mut f = LogFollower::waiting_for(&path);
    assert_eq!(poll(&mut f), vec![]);
    append(&path, "first\n");
    assert_eq!(poll(&mut f), numbered(&[(1, "first")]));
}

#[test]
fn break_resumes_at_the_next_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    append(&path, "1\n2\n3\n");
    let mut f = LogFollower::open(&path).unwrap();
    let mut seen = Vec::new();
    let flow = f
        .read_available(&mut |l| {
            seen.push(l.text);
            if seen.len() == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert!(flow.is_break());
    assert_eq!(seen, ["1"]);
    assert_eq!(poll(&mut f), numbered(&[(2, "2"), (3, "3")]));
}

/// A follower polling on its own thread sees lines appended after it started, and after the
/// file was truncated, within a bounded wait.
#[test]
fn follows_from_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    append(&path, "before\n");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let thread = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = LogFollower::open(&path).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = f
                    .read_available(&mut |l| {
                        let _ = tx.send(l.text);
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let next = || rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(next(), "before");
    append(&path, "after\n");
    assert_eq!(next(), "after");
    fs::write(&path, "").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    append(&path, "x\n");
    assert_eq!(next(), "x");
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
}
