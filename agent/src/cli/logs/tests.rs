use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use super::*;
use crate::decision::test_support::example_record;

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    logs: LogsArgs,
}

fn args(argv: &[&str]) -> LogsArgs {
    let mut full = vec!["tessera-logs"];
    full.extend_from_slice(argv);
    TestCli::try_parse_from(full).unwrap().logs
}

fn line_of(edit: impl FnOnce(&mut DecisionRecord)) -> String {
    let mut record = example_record();
    edit(&mut record);
    record.to_json_line().unwrap()
}

/// A deny for vault, an allow for vault, a deny for another endpoint by another workload.
fn sample_lines() -> [String; 3] {
    [
        line_of(|_| {}),
        line_of(|r| {
            r.verdict = Verdict::Allow;
            r.reason = Reason::CredentialValid;
        }),
        line_of(|r| {
            r.reason = Reason::WorkloadNotAllowed;
            r.destination.endpoint = Some("openai".to_owned());
            r.workload = None;
        }),
    ]
}

fn run_once(args: &LogsArgs) -> (Result<(), LogsError>, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = read_log(args, &mut out, &mut err, false, &|| true);
    (
        result,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn write_log(dir: &Path, lines: &[&str]) -> String {
    let path = dir.join("decisions.jsonl");
    fs::write(
        &path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn parses_the_documented_flags() {
    let a = args(&[
        "-f",
        "--verdict",
        "deny",
        "--reason",
        "no_credential",
        "--workload",
        "agent",
        "--endpoint",
        "vault",
        "-o",
        "compact",
        "/tmp/x.jsonl",
    ]);
    assert!(a.follow);
    assert_eq!(a.verdict, Some(Verdict::Deny));
    assert_eq!(a.reason, Some(Reason::NoCredential));
    assert_eq!(a.workload.as_deref(), Some("agent"));
    assert_eq!(a.endpoint.as_deref(), Some("vault"));
    assert_eq!(a.output, OutputFormat::Compact);
    assert_eq!(a.file, Path::new("/tmp/x.jsonl"));

    let defaults = args(&[]);
    assert!(!defaults.follow);
    assert_eq!(defaults.output, OutputFormat::Json);
    assert_eq!(defaults.file, Path::new(DEFAULT_DECISION_LOG));

    let bad = TestCli::try_parse_from(["tessera-logs", "--reason", "unknown"]);
    let message = bad.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("credential_expired"), "{message}");
}

#[test]
fn json_prints_matching_lines_as_they_are_and_warns_about_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let [deny, allow, other] = sample_lines();
    let file = write_log(dir.path(), &[&deny, &allow, "{not json", "", &other]);

    let (result, out, err) = run_once(&args(&[&file]));
    result.unwrap();
    assert_eq!(out, format!("{deny}\n{allow}\n{other}\n"));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("warning: {file}:3: not a decision record")),
        "{err}"
    );

    let (_, out, _) = run_once(&args(&["--verdict", "deny", &file]));
    assert_eq!(out, format!("{deny}\n{other}\n"));
    let (_, out, _) = run_once(&args(&["--reason", "workload_not_allowed", &file]));
    assert_eq!(out, format!("{other}\n"));
    let (_, out, _) = run_once(&args(&[
        "--workload",
        "spiffe://example.org/agents/payments",
        &file,
    ]));
    assert_eq!(out, format!("{deny}\n{allow}\n"));
    let (_, out, _) = run_once(&args(&["--endpoint", "openai", "--verdict", "deny", &file]));
    assert_eq!(out, format!("{other}\n"));
}

#[test]
fn compact_output_and_a_last_line_without_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    fs::write(&path, example_record().to_json_line().unwrap()).unwrap();
    let (result, out, _) = run_once(&args(&["-o", "compact", &path.display().to_string()]));
    result.unwrap();
    assert_eq!(out, format!("{}\n", format_compact(&example_record())));
}

#[test]
fn missing_file_is_an_error_unless_following() {
    let (result, _, _) = run_once(&args(&["/nonexistent/tessera/decisions.jsonl"]));
    let err = result.unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/tessera/decisions.jsonl"),
        "{err}"
    );
}

/// A `Write` the test can read while `read_log` writes to it from another thread.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SharedBuffer {
    /// Waits (at most 5 s) until the output has `lines` lines, and returns them.
    fn wait_for_lines(&self, lines: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            let got: Vec<String> = text.lines().map(str::to_owned).collect();
            if got.len() >= lines {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {lines} lines, got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn follow_picks_up_appended_lines_and_survives_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let [deny, allow, other] = sample_lines();
    let file = write_log(dir.path(), &[&deny]);
    let follow_args = args(&["-f", &file]);
    let out = SharedBuffer::default();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (out, stop) = (out.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut writer = out;
            read_log(&follow_args, &mut writer, &mut io::sink(), false, &|| {
                stop.load(Ordering::Relaxed)
            })
        })
    };
    assert_eq!(out.wait_for_lines(1), std::slice::from_ref(&deny));

    let mut f = OpenOptions::new().append(true).open(&file).unwrap();
    writeln!(f, "{allow}").unwrap();
    assert_eq!(out.wait_for_lines(2), [deny.clone(), allow.clone()]);

    // Truncated (as `logrotate copytruncate` does), then written again.
    fs::write(&file, format!("{other}\n")).unwrap();
    assert_eq!(out.wait_for_lines(3), [deny, allow, other]);

    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap().unwrap();
}
