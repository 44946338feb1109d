//! Credentials on kernels without `SO_PEERPIDFD` (Linux before 6.5; issue 9), tested on this host
//! by forcing the fallback (`TESSERA_CALLER_PROOF=sock-diag`): the caller's pid from
//! `SO_PEERCRED`, `pidfd_open`, and proof from `sock_diag` and `/proc/PID/fd` that this very
//! process holds the client end. Against the real kernel: a caller gets a credential and
//! connects; a caller that exits mid-request leaves nothing; a recycled pid never answers for
//! the caller that exited; an API that cannot attest at all answers 503.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};

use support::{Agent, Servers, TestCgroup, Workload, privileged};
use tessera_agent::identity::attest::pidfd_alive;
use tessera_agent::identity::peer::{
    Caller, METHOD_ENV, Method, PeerError, holds_socket, sock_diag, socket_inode,
};

const FORCED: &[(&str, Option<&str>)] = &[(METHOD_ENV, Some("sock-diag"))];

fn agent(cg: &TestCgroup, port: u16, env: &[(&str, Option<&str>)]) -> Agent {
    Agent::start_env(
        &support::standard_policy(&cg.rel, port, port + 1, "enforce"),
        &cg.path,
        // The exit race asks a thousand times as fast as it goes.
        &["--rate-limit", "off"],
        env,
    )
}

#[test]
fn with_the_fallback_forced_a_caller_gets_a_credential_and_connects() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("fallback-token");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let agent = agent(&cg, port, FORCED);
    let line = agent.wait_log("Workload API callers are attested with");
    assert!(line.contains("sock_diag"), "{line}");
    let status = agent.status_json();
    assert_eq!(
        status["workload_api"]["attestation"], "sock-diag",
        "{status}"
    );
    assert_eq!(status["kernel"]["caller_proof"], "sock-diag", "{status}");
    assert!(
        status["kernel"]["release"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{status}"
    );
    let admin = agent.admin.to_str().unwrap().to_string();
    let (_, text, _) = agent.cli(&["status", "--admin-socket", &admin]);
    assert!(text.contains("callers proven:   sock-diag"), "{text}");

    let mut w = Workload::spawn(&app, &agent.api);
    let (r, d, _) = agent.settled(w.pid, || w.connect4(port));
    assert_eq!(r, "EPERM", "{d}");
    assert_eq!(d["reason"], "no_credential", "{d}");
    let jti = w.must_token("vault", Some(60));
    let (r, d) = agent.probe(w.pid, || w.connect4(port));
    assert_eq!(r, "ok", "{d}");
    assert_eq!(d["reason"], "credential_valid", "{d}");
    assert_eq!(d["credential"]["jti"], jti.as_str(), "{d}");
    // DELETE goes through the same proof.
    let (status, body) = w.raw("DELETE", &format!("/v1/credentials/{jti}"), None);
    assert_eq!(status, 200, "{body}");
    let (r, d) = agent.probe(w.pid, || w.connect4(port));
    assert_eq!(r, "EPERM", "{d}");
    w.exit();
}

/// The race of `identity_process`'s `a_caller_exiting_mid_request_leaves_no_grant_for_its_pid`,
/// with the fallback: a caller exits 0 to 2.5 ms after sending its request; a successor is
/// forked onto its pid and connects.
#[test]
fn with_the_fallback_forced_a_caller_exiting_mid_request_leaves_no_grant() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("fallback-race");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let agent = agent(&cg, port, FORCED);
    assert!(
        agent
            .wait_log("Workload API callers are attested with")
            .contains("sock_diag")
    );
    let mut w = Workload::spawn(&app, &agent.api);
    let rounds = 1000;
    support::assert_exit_race_leaves_nothing(&agent, &mut w, "vault", port, rounds);
    // How far the race got: credentials issued to callers that then exited (their grants were
    // withdrawn or removed by the exit hook, as the count above shows).
    let issued = agent.agent_log().matches("credential issued").count();
    eprintln!("{issued} of {rounds} racing callers were issued a credential before exiting");
    let refused = agent
        .agent_log()
        .matches("cannot prove who a caller is")
        .count();
    assert_eq!(
        refused,
        0,
        "the proof itself failed:\n{}",
        agent.agent_log()
    );
    w.exit();
}

/// A python process that connects to `path`, prints its pid, and exits when its stdin closes.
/// With `hold`, it first forks a holder that keeps the client end open for 60 s (killed by the
/// test): `(child, its pid, the holder's pid)`.
fn connector(path: &std::path::Path, hold: bool) -> Option<(Child, u32, Option<i32>)> {
    let script = format!(
        "import os, socket, sys, time\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect({:?})\n\
         holder = 0\n\
         if {}:\n\
         \x20   holder = os.fork()\n\
         \x20   if holder == 0:\n\
         \x20       os.close(0); os.close(1); time.sleep(60); os._exit(0)\n\
         print(os.getpid(), holder, flush=True)\n\
         sys.stdin.read()\n",
        path.to_str().expect("utf-8"),
        if hold { "True" } else { "False" }
    );
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read pid");
    let mut it = line
        .split_whitespace()
        .map(|v| v.parse::<i32>().expect("pid"));
    let pid = it.next().expect("pid") as u32;
    let holder = it.next().filter(|&h| h > 0);
    Some((child, pid, holder))
}

fn end(mut child: Child) {
    drop(child.stdin.take());
    child.wait().expect("wait");
}

/// The caller of a connection exits while another process (its child) keeps the client end
/// open; before the agent opens a pidfd for the pid that connected, a third process gets that
/// pid, and it even holds its own connection to the same socket. The pidfd then names the
/// successor, which does not hold the client end of the caller's connection: the proof
/// refuses (`SO_PEERPIDFD` would name the dead caller).
#[test]
fn a_recycled_pid_never_answers_for_the_caller_that_exited() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let Some((caller, pid, holder)) = connector(&path, true) else {
        tessera_agent::testkit::skip("python3 is not installed");
        return;
    };
    let holder = holder.expect("holder pid");
    let kill_holder = || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    let (stream, _) = listener.accept().expect("accept");
    let early = Caller::take(Method::SockDiag, &stream);
    assert!(early.proven().is_ok(), "the live caller is proven");
    end(caller);

    // The same pid for a successor that connects too.
    let mut successor = None;
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).expect("ns_last_pid");
        let (child, got, _) = connector(&path, false).expect("python3");
        let accepted = listener.accept().expect("accept");
        if got == pid {
            successor = Some((child, accepted.0));
            break;
        }
        end(child);
    }
    let Some((successor, own)) = successor else {
        kill_holder();
        tessera_agent::testkit::skip_busy(&format!(
            "could not get pid {pid} reused (the machine is too busy)"
        ));
        return;
    };

    // The caller's connection is alive (its child holds the client end)...
    let client = sock_diag::peer_inode(socket_inode(&stream).unwrap())
        .unwrap()
        .expect("the holder keeps the client end");
    assert!(holds_socket(holder as u32, client).unwrap());
    // ...and taken now, its caller is the successor's pid: refused.
    let late = Caller::take(Method::SockDiag, &stream);
    let err = late
        .proven()
        .expect_err("a recycled pid answered for the caller");
    assert!(
        matches!(err, PeerError::NotHolder { pid: p } if p == pid),
        "{err}"
    );
    // The successor's pid is live and holds a socket, just not that one: its own connection
    // is proven, with its own pid.
    let own_client = sock_diag::peer_inode(socket_inode(&own).unwrap())
        .unwrap()
        .expect("the successor's end");
    assert!(holds_socket(pid, own_client).unwrap());
    assert!(Caller::take(Method::SockDiag, &own).proven().is_ok());
    // The pidfd taken while the caller lived stays the caller's: it exited.
    assert!(matches!(early.proven(), Err(PeerError::Exited)));
    // SO_PEERPIDFD (where the kernel has it) names the dead caller, not the successor (a
    // kernel with pidfs may still hand out a pidfd for it: one that is never alive).
    if Method::choose(Some("peer-pidfd")).is_ok() {
        match Caller::take(Method::PeerPidfd, &stream).proven() {
            Ok(pidfd) => assert!(!pidfd_alive(pidfd), "SO_PEERPIDFD named a live process"),
            Err(err) => assert!(err.is_exited(), "{err}"),
        }
    }
    // Once nobody holds the client end, the connection has no caller at all.
    kill_holder();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sock_diag::peer_inode(socket_inode(&stream).unwrap())
        .unwrap()
        .is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder did not die"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let err = Caller::take(Method::SockDiag, &stream)
        .proven()
        .map(|_| ())
        .expect_err("no client end");
    assert!(matches!(err, PeerError::Exited), "{err}");
    end(successor);
}

#[test]
fn an_api_that_cannot_attest_answers_503_with_a_reason() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("fallback-503");
    let (app, _) = cg.child("app");
    let servers = Servers::start();
    let port = servers.tcp_port;
    for (value, says) in [
        ("none", "TESSERA_CALLER_PROOF=none"),
        ("bogus", "not one of auto, peer-pidfd, sock-diag, none"),
    ] {
        let agent = agent(&cg, port, &[(METHOD_ENV, Some(value))]);
        agent.wait_log("the Workload API cannot attest callers");
        let status = agent.status_json();
        assert!(status["workload_api"]["attestation"].is_null(), "{status}");
        assert!(
            status["workload_api"]["unavailable"]
                .as_str()
                .is_some_and(|u| u.contains(says)),
            "{status}"
        );
        let mut w = Workload::spawn(&app, &agent.api);
        let (status, body) = w.token("vault", Some(60));
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["reason"], "attestation_unavailable", "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body}");
        let (status, body) = w.raw("DELETE", "/v1/credentials/some-jti", None);
        assert_eq!(status, 503, "{body}");
        // The JWKS needs no caller.
        let (status, _) = w.raw("GET", "/v1/jwks", None);
        assert_eq!(status, 200);
        w.exit();
    }
}

#[test]
fn a_raw_client_over_the_fallback_is_answered() {
    if !privileged() {
        return;
    }
    // The agent's own process asks: no cgroup workload, but the proof must hold and the
    // refusal be the policy's, not the attestation's.
    let cg = TestCgroup::new("fallback-raw");
    let servers = Servers::start();
    let agent = agent(&cg, servers.tcp_port, FORCED);
    let mut s = UnixStream::connect(&agent.api).expect("connect");
    let body = r#"{"audience":"vault"}"#;
    write!(
        s,
        "POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("unknown_workload"), "{answer}");
}

/// `identity_process`'s pid-reuse test through the Workload API with the fallback forced: a
/// holder of a credential exits, a process of another executable gets its pid, and neither its
/// connects nor its own credential requests answer for the holder.
#[test]
fn with_the_fallback_forced_a_recycled_pid_inherits_nothing() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("fallback-reuse");
    let (app, app_rel) = cg.child("app");
    let bin = tempfile::tempdir().expect("tempdir");
    let py = bin.path().join("py-holder");
    support::python_copy(&py, b"");
    let servers = Servers::start();
    let port = servers.tcp_port;
    let workloads = format!(
        "    - name: by-exe\n      match: {{ cgroup: {app_rel}, exe: {} }}\n\
         \x20   - name: plain\n      match: {{ cgroup: {app_rel} }}",
        py.display()
    );
    let rules = "    - name: exe-to-vault\n      workloads: [by-exe]\n      endpoints: [vault]\n      credential: { required: true, maxTtl: 10m, bind: process }";
    let agent = Agent::start_env(
        &support::identity_policy(&workloads, rules, port, support::extra_tcp_server()),
        &cg.path,
        &[],
        FORCED,
    );
    let mut holder = Workload::spawn_in(&app, &agent.api, &[py.to_str().expect("utf-8")]);
    holder.must_token("vault", Some(600));
    let (r, d) = agent.probe(holder.pid, || holder.connect4(port));
    assert_eq!(r, "ok", "{d}");
    assert_eq!(d["workload"]["name"], "by-exe", "{d}");
    let pid = holder.pid;
    holder.exit();

    let Some(mut successor) = support::spawn_on_pid(pid, &app, &agent.api) else {
        return;
    };
    let (r, d) = agent.probe(pid, || successor.connect4(port));
    assert_eq!(
        r, "EPERM",
        "pid {pid} inherited its predecessor's grant: {d}"
    );
    assert!(d["credential"].is_null(), "{d}");
    // Asking for itself, the successor is attested as what it is.
    let (status, body) = successor.token("vault", Some(60));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "workload_not_allowed", "{body}");
    let (r, d, _) = agent.settled(pid, || successor.connect4(port));
    assert_eq!(r, "EPERM", "{d}");
    assert_eq!(d["workload"]["name"], "plain", "{d}");
}
