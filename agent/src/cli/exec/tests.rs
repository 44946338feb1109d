//! Argument parsing, and the bind check against a fake Workload API on a temporary socket.
use std::convert::Infallible;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

use super::*;
use crate::cli::{Cli, Command as Sub};

const TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.e30.c2ln";
const JTI: &str = "0193-exec-jti";

fn parse(argv: &[&str]) -> Result<ExecArgs, clap::Error> {
    let cli = Cli::try_parse_from(std::iter::once("tessera").chain(argv.iter().copied()))?;
    match cli.command {
        Sub::Exec(args) => Ok(args),
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn arguments() {
    let args = parse(&[
        "exec",
        "--audience",
        "vault",
        "--task",
        "job-42",
        "--ttl",
        "5m",
        "--socket",
        "/tmp/w.sock",
        "--",
        "curl",
        "-s",
        "--audience",
        "x",
    ])
    .expect("parses");
    assert_eq!(args.credential.audience, "vault");
    assert_eq!(args.credential.task.as_deref(), Some("job-42"));
    assert_eq!(args.credential.ttl, Some(Duration::from_secs(300)));
    assert_eq!(args.credential.socket, Path::new("/tmp/w.sock"));
    // Everything after `--` is the command's, even what looks like tessera's flags.
    assert_eq!(args.command, ["curl", "-s", "--audience", "x"]);
    assert_eq!(
        args.credential.request(),
        credential::TokenRequest {
            audience: "vault".to_owned(),
            task: Some("job-42".to_owned()),
            ttl_seconds: Some(300),
            scopes: None,
            subject_token: None,
            evidence_tokens: Vec::new(),
        }
    );

    let minimal = parse(&["exec", "--audience", "vault", "--", "true"]).expect("parses");
    assert_eq!(minimal.credential.task, None);
    assert_eq!(minimal.credential.ttl, None);
    assert_eq!(minimal.command, ["true"]);
}

#[test]
fn usage_errors_exit_2() {
    for argv in [
        &["exec", "--audience", "vault"][..],
        &["exec", "--audience", "vault", "--"],
        &["exec", "--", "true"],
        &["exec", "--audience", "vault", "true"],
        &["exec", "--audience", "vault", "--ttl", "soon", "--", "true"],
    ] {
        let err = parse(argv).expect_err(&format!("{argv:?} is a usage error"));
        assert_eq!(err.exit_code(), 2, "{argv:?}: {err}");
    }
}

/// Answers `POST /v1/credentials` with a credential of `bind`, and `DELETE` with its jti;
/// records each request as "METHOD PATH".
async fn fake_workload_api(dir: &Path, bind: &'static str) -> (PathBuf, Arc<Mutex<Vec<String>>>) {
    let socket = dir.join("workload.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let line = format!("{} {}", req.method(), req.uri().path());
                        log.lock().expect("log").push(line.clone());
                        let body = if line == "POST /v1/credentials" {
                            serde_json::json!({
                                "token": TOKEN, "jti": JTI,
                                "spiffe_id": "spiffe://example.org/me", "audience": "vault",
                                "expires_at": "2026-11-23T10:05:00Z", "bind": bind,
                            })
                        } else {
                            serde_json::json!({ "revoked": JTI })
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (socket, seen)
}

fn exec_args(socket: &Path, command: &[&str]) -> ExecArgs {
    let mut argv = vec!["exec", "--audience", "vault", "--socket"];
    let socket = socket.to_str().expect("utf-8 path");
    argv.push(socket);
    argv.push("--");
    argv.extend_from_slice(command);
    parse(&argv).expect("parses")
}

#[tokio::test]
async fn a_process_bound_credential_is_refused_and_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, seen) = fake_workload_api(dir.path(), "process").await;
    let args = exec_args(&socket, &["/bin/true"]);
    let err = prepare(&args).await.err().expect("refused");
    assert_eq!(err.exit_code(), 1);
    let text = err.to_string();
    assert!(text.contains("set `bind: process-tree`"), "{text}");
    assert!(!text.contains(TOKEN));
    assert_eq!(
        *seen.lock().expect("log"),
        [
            "POST /v1/credentials",
            &format!("DELETE /v1/credentials/{JTI}")
        ]
    );
    assert_eq!(run(&args).await, ExitCode::from(1));
}

#[tokio::test]
async fn tree_and_workload_credentials_go_into_the_environment() {
    for bind in ["process-tree", "workload"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, seen) = fake_workload_api(dir.path(), bind).await;
        let args = exec_args(&socket, &["curl", "-s", "http://127.0.0.1:8200/"]);
        let Prepared { command, jti } = prepare(&args).await.expect("accepted");
        assert_eq!(jti, JTI);
        assert_eq!(command.get_program(), "curl");
        let argv: Vec<&OsStr> = command.get_args().collect();
        assert_eq!(argv, ["-s", "http://127.0.0.1:8200/"]);
        let envs: Vec<(&OsStr, Option<&OsStr>)> = command.get_envs().collect();
        assert!(envs.contains(&(OsStr::new(TOKEN_ENV), Some(OsStr::new(TOKEN)))));
        assert!(envs.contains(&(OsStr::new(JTI_ENV), Some(OsStr::new(JTI)))));
        assert_eq!(
            *seen.lock().expect("log"),
            ["POST /v1/credentials"],
            "{bind}"
        );
    }
}

#[tokio::test]
async fn an_agent_that_does_not_say_the_bind_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, _) = fake_workload_api(dir.path(), "").await;
    let err = prepare(&exec_args(&socket, &["/bin/true"]))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ExecError::BindUnknown), "{err}");
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test]
async fn no_agent_is_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = exec_args(&dir.path().join("absent.sock"), &["/bin/true"]);
    let err = prepare(&args).await.err().expect("no agent");
    assert!(matches!(err, ExecError::Credential(_)), "{err}");
    assert_eq!(run(&args).await, ExitCode::from(1));
}

#[tokio::test]
async fn a_missing_command_is_127_and_ends_the_credential() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, seen) = fake_workload_api(dir.path(), "process-tree").await;
    // exec fails (nothing replaces the test process), so `run` returns.
    let missing = dir.path().join("no-such-command");
    let args = exec_args(&socket, &[missing.to_str().expect("utf-8")]);
    assert_eq!(run(&args).await, ExitCode::from(127));
    assert_eq!(
        *seen.lock().expect("log"),
        [
            "POST /v1/credentials",
            &format!("DELETE /v1/credentials/{JTI}")
        ]
    );

    // Present but not executable: 126, as env(1) says.
    let other = tempfile::tempdir().expect("tempdir");
    let (socket, _) = fake_workload_api(other.path(), "workload").await;
    let script = dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\n").expect("write");
    let args = exec_args(&socket, &[script.to_str().expect("utf-8")]);
    assert_eq!(run(&args).await, ExitCode::from(126));
}
