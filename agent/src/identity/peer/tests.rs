use super::*;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

fn listener() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).expect("bind");
    (dir, path, listener)
}

#[test]
fn the_fd_scan_finds_a_socket_this_process_holds_and_no_other() {
    let me = std::process::id();
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (ia, ib) = (socket_inode(&a).unwrap(), socket_inode(&b).unwrap());
    assert!(holds_socket(me, ia).expect("scan"));
    assert!(holds_socket(me, ib).expect("scan"));
    drop(b);
    assert!(
        !holds_socket(me, ib).expect("scan"),
        "a closed socket is still found"
    );
    // Another process does not hold this process's socket.
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    assert!(!holds_socket(child.id(), ia).expect("scan child"));
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(matches!(
        holds_socket(child.id(), ia),
        Err(PeerError::Exited)
    ));
}

#[test]
fn both_methods_prove_this_process_where_the_kernel_has_them() {
    // The host kernel decides whether SO_PEERPIDFD exists; sock_diag is the fallback's.
    let diag = Method::choose(Some("sock-diag")).expect("the sock_diag proof works here");
    assert_eq!(diag, Method::SockDiag);
    match Method::choose(Some("peer-pidfd")) {
        Ok(m) => assert_eq!(Method::choose(None), Ok(m)),
        Err(why) => {
            eprintln!("no SO_PEERPIDFD here ({}): auto picks sock_diag", why.0);
            assert_eq!(Method::choose(None), Ok(Method::SockDiag));
        }
    }
    assert!(Method::choose(Some("none")).is_err());
    let bad = Method::choose(Some("proc")).expect_err("unknown value");
    assert!(
        bad.0.contains("auto, peer-pidfd, sock-diag, none"),
        "{}",
        bad.0
    );
}

#[test]
fn a_claimed_caller_is_proven_while_it_holds_its_end() {
    let (_dir, path, listener) = listener();
    let client = UnixStream::connect(&path).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let caller = Caller::take(Method::SockDiag, &server);
    let pidfd = caller.proven().expect("proven");
    assert_eq!(
        super::super::attest::pid_of(pidfd).expect("pid"),
        std::process::id()
    );
    // The caller closed its end: nobody to answer. A child that another test of this process
    // forks meanwhile holds a copy of every descriptor until it execs or exits, so the end can
    // outlive `drop` for a moment: wait for the copies to go (a hang guard, not a timing claim).
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match caller.proven() {
            Err(PeerError::Exited) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "still proven after the caller closed its end: {other:?}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_caller_that_exited_is_not_proven() {
    let (_dir, path, listener) = listener();
    // A child that connects, keeps its end open in a grandchild, then exits: the pid that
    // connected is dead while the client end lives on elsewhere.
    let script = format!(
        "import os, socket, sys, time\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect({:?})\n\
         pid = os.fork()\n\
         if pid == 0:\n    time.sleep(30)\n    os._exit(0)\n\
         print(pid, flush=True)\n\
         os._exit(0)\n",
        path.to_str().expect("utf-8")
    );
    let Ok(mut child) = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
    else {
        crate::testkit::skip("python3 is not installed");
        return;
    };
    let (server, _) = listener.accept().expect("accept");
    let caller = Caller::take(Method::SockDiag, &server);
    // One line, not to the end: the grandchild holds the pipe too.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    child.wait().expect("wait");
    let grandchild: i32 = line.trim().parse().expect("grandchild pid");
    let err = caller.proven().expect_err("the connecting process exited");
    assert!(err.is_exited(), "{err}");
    // The grandchild still holds the client end: the connection itself is alive.
    let client = sock_diag::peer_inode(socket_inode(&server).unwrap()).expect("sock_diag");
    let held = client.map(|c| holds_socket(grandchild as u32, c));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(grandchild),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(matches!(held, Some(Ok(true))), "{held:?}");
}
