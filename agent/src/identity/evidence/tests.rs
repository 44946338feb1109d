use super::*;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};

use sha2::{Digest as _, Sha256};

/// A child killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn spawn(cmd: &mut Command) -> Sleeper {
        Sleeper(cmd.stdin(Stdio::null()).spawn().expect("spawn"))
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `pid` has executed `comm`: spawn returns once exec is under way, but the kernel
/// renames the task a little later (and setpriv execs its command after changing ids).
fn wait_for_comm(pid: u32, comm: &str) {
    for _ in 0..10_000 {
        let now = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if now.trim_end() == comm {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("process {pid} never became {comm}");
}

fn sha256_file(path: &str) -> String {
    exe::hex(&Sha256::digest(fs::read(path).expect("read exe")))
}

#[test]
fn status_lines() {
    let status =
        "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t10\t11\t12\t13\nGroups:\t4 24 27 \n";
    assert_eq!(
        ids(status, "Uid:"),
        Some(Ids {
            real: 1000,
            effective: 1001
        })
    );
    assert_eq!(
        ids(status, "Gid:"),
        Some(Ids {
            real: 10,
            effective: 11
        })
    );
    assert_eq!(groups(status), Some(vec![4, 24, 27]));
    assert_eq!(groups("Groups:\t\n"), Some(vec![]));
    assert_eq!(groups("Groups:\tx\n"), None);
    assert_eq!(ids("Uid:\t1\n", "Uid:"), None);
}

#[test]
fn reads_this_process() {
    // The test binary is large and unoptimised sha2 slow: children check the hash itself.
    let reader = EvidenceReader::new(1024 * 1024);
    let ev = reader
        .read_pid(std::process::id())
        .expect("evidence of self");
    assert_eq!(ev.pid, std::process::id());
    assert_eq!(ev.uid.real, nix::unistd::getuid().as_raw());
    assert_eq!(ev.uid.effective, nix::unistd::geteuid().as_raw());
    assert_eq!(ev.gid.real, nix::unistd::getgid().as_raw());
    let own = fs::read_to_string("/proc/self/cgroup").expect("cgroup");
    assert!(own.lines().any(|l| l == format!("0::{}", ev.cgroup)));
    let exe = ev.exe.expect("exe");
    let own_exe = std::env::current_exe().expect("current_exe");
    assert_eq!(Path::new(&exe.path), own_exe);
    assert!(!exe.deleted);
    let size = fs::metadata(&exe.path).expect("stat").len();
    assert_eq!(
        exe.hash,
        ExeHash::TooLarge {
            size,
            limit: 1024 * 1024
        }
    );
}

#[test]
fn reads_a_child_and_caches_its_hash() {
    let child = Sleeper::spawn(Command::new("sleep").arg("300"));
    wait_for_comm(child.pid(), "sleep");
    let reader = EvidenceReader::default();
    let pidfd = open_pidfd(child.pid()).expect("pidfd");
    let first = reader.read(&pidfd).expect("evidence");
    assert_eq!(first.pid, child.pid());
    assert_eq!(first.comm, "sleep");
    let exe = first.exe.clone().expect("exe");
    assert_eq!(exe.hash.sha256(), Some(sha256_file(&exe.path).as_str()));
    assert_eq!(reader.exe_hashes().len(), 1);
    let again = reader.read(&pidfd).expect("evidence again");
    assert_eq!(again, first);
    assert_eq!(
        reader.exe_hashes().len(),
        1,
        "the second read hits the cache"
    );
}

#[test]
fn hash_is_of_the_running_file_even_after_it_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("prog");
    fs::copy("/bin/sleep", &bin).expect("copy sleep");
    let original = sha256_file(bin.to_str().expect("utf-8"));
    let child = Sleeper::spawn(Command::new(&bin).arg("300"));
    wait_for_comm(child.pid(), "prog");
    // Replace the path with another file: a path lookup would now hash the wrong one.
    fs::remove_file(&bin).expect("unlink");
    let mut f = fs::File::create(&bin).expect("create");
    f.write_all(b"#!/bin/sh\nexit 0\n").expect("write");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
    let ev = EvidenceReader::default()
        .read_pid(child.pid())
        .expect("evidence");
    let exe = ev.exe.expect("exe");
    assert!(exe.deleted, "{exe:?}");
    assert_eq!(Path::new(&exe.path), bin);
    assert_eq!(exe.hash.sha256(), Some(original.as_str()));
}

#[test]
fn large_executables_are_not_hashed() {
    let child = Sleeper::spawn(Command::new("sleep").arg("300"));
    let reader = EvidenceReader::new(1024);
    let ev = reader.read_pid(child.pid()).expect("evidence");
    let size = fs::metadata(format!("/proc/{}/exe", child.pid()))
        .expect("stat")
        .len();
    assert_eq!(
        ev.exe.expect("exe").hash,
        ExeHash::TooLarge { size, limit: 1024 }
    );
    assert!(reader.exe_hashes().is_empty());
}

#[test]
fn other_ids_and_groups() {
    if !nix::unistd::Uid::effective().is_root() {
        crate::testkit::skip("needs root to start a process as another user");
        return;
    }
    // setpriv execs sleep in the same process; std cannot set groups on stable.
    if Command::new("setpriv").arg("--version").output().is_err() {
        crate::testkit::skip("setpriv (util-linux) is not installed");
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65533",
        "--groups=4242,4343",
        "sleep",
        "300",
    ]);
    let child = Sleeper::spawn(&mut cmd);
    wait_for_comm(child.pid(), "sleep");
    let ev = EvidenceReader::default()
        .read_pid(child.pid())
        .expect("evidence");
    assert_eq!(
        ev.uid,
        Ids {
            real: 65534,
            effective: 65534
        }
    );
    assert_eq!(
        ev.gid,
        Ids {
            real: 65533,
            effective: 65533
        }
    );
    assert_eq!(ev.groups, vec![4242, 4343]);
}

#[test]
fn exited_and_missing_processes() {
    let mut child = Command::new("true").spawn().expect("spawn");
    let pid = child.id();
    let pidfd = open_pidfd(pid).expect("pidfd");
    child.wait().expect("wait");
    let err = EvidenceReader::default().read(&pidfd).expect_err("exited");
    assert!(
        matches!(err, EvidenceError::Attest(AttestError::Exited)),
        "{err}"
    );
    // Reaped: the pid names nothing now (unless reused, which a test cannot rule out).
    if let Err(e) = open_pidfd(pid) {
        assert!(matches!(e, EvidenceError::NoSuchProcess { .. }), "{e}");
    }
}
