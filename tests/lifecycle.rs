//! Daemon life against the real kernel: enforcement pinned in bpffs outlives the agent (SIGKILL,
//! SIGTERM), a restarted agent adopts it and reads the decisions made while it was away,
//! `--fail-open` and `tessera uninstall` end it, and reloads swap policies atomically.
//!
//! Each test creates its own cgroup and attaches a real `tessera run` to it only; the Agent
//! fixture uninstalls what it pinned.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

mod support;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{
    Agent, Servers, TestCgroup, Workload, extra_tcp_server, privileged, standard_policy,
};

struct Setup {
    agent: Agent,
    cg: TestCgroup,
    app: PathBuf,
    other: PathBuf,
    port: u16,
    api_port: u16,
}

fn setup(name: &str, extra: &[&str]) -> Setup {
    let cg = TestCgroup::new(name);
    let (app, _) = cg.child("app");
    let (other, _) = cg.child("other");
    let servers = Servers::start();
    let api_port = extra_tcp_server();
    let policy = standard_policy(&cg.rel, servers.tcp_port, api_port, "enforce");
    let agent = Agent::start(&policy, &cg.path, extra);
    Setup {
        agent,
        cg,
        app,
        other,
        port: servers.tcp_port,
        api_port,
    }
}

/// The standard policy plus a rule letting `other` reach `api` without a credential (appended:
/// the positions of the workloads and endpoints, and so the grants, stay).
fn policy_b(s: &Setup) -> String {
    standard_policy(&s.cg.rel, s.port, s.api_port, "enforce")
        + "    - name: other-to-api\n      workloads: [other]\n      endpoints: [api]\n"
}

fn policy_a(s: &Setup) -> String {
    standard_policy(&s.cg.rel, s.port, s.api_port, "enforce")
}

/// Replaces the policy file in one step (the agent also watches it: never a half-written file).
fn write_policy(agent: &Agent, text: &str) {
    let tmp = agent.policy.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write policy");
    std::fs::rename(&tmp, &agent.policy).expect("rename policy");
}

/// Whether `check` holds within a few seconds. The kernel frees an unpinned link from a work
/// queue: detaching completes just after the unpin, not with it.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The bpffs directory of the test's attach point.
fn pin_dir(cg: &TestCgroup) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/tessera").join(cg.rel.trim_start_matches('/'))
}

/// A workload connecting in a loop from its own thread; results in order.
struct Loop {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<String>>>,
    handle: Option<thread::JoinHandle<Workload>>,
}

impl Loop {
    fn start(mut w: Workload, port: u16) -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let handle = {
            let (stop, results) = (stop.clone(), results.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = w.connect4(port);
                    results.lock().unwrap().push(r);
                    // Paced so that the agent keeps up and the ring buffer never fills.
                    thread::sleep(Duration::from_millis(1));
                }
                w
            })
        };
        Loop {
            stop,
            results,
            handle: Some(handle),
        }
    }

    fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    /// Waits until the loop has made `more` further attempts.
    fn advance(&self, more: usize) {
        let target = self.count() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count() < target {
            assert!(Instant::now() < deadline, "the connect loop is stuck");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(mut self) -> (Vec<String>, Workload) {
        self.stop.store(true, Ordering::Relaxed);
        let w = self.handle.take().unwrap().join().expect("loop thread");
        let results = self.results.lock().unwrap().clone();
        (results, w)
    }
}

fn by_pid(decisions: &[Value], pid: u32) -> Vec<Value> {
    decisions
        .iter()
        .filter(|d| d["process"]["tgid"] == pid)
        .cloned()
        .collect()
}

/// Waits until the decision log has `n` records for `pid`.
fn wait_records(agent: &Agent, pid: u32, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let records = by_pid(&agent.decisions(), pid);
        if records.len() >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} decision records for pid {pid}",
            records.len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigkill_never_lapses_enforcement_and_the_restart_adopts_it() {
    if !privileged() {
        return;
    }
    let mut s = setup("sigkill", &[]);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    let jti = holder.must_token("vault", Some(600));
    assert_eq!(holder.connect4(s.port), "ok");
    let intruder = Loop::start(Workload::spawn(&s.other, &s.agent.api), s.port);
    let bare = Loop::start(Workload::spawn(&s.app, &s.agent.api), s.port);
    intruder.advance(5);

    s.agent.kill();
    let at_kill = (intruder.count(), bare.count());
    // The loops keep connecting while no agent runs.
    intruder.advance(20);
    bare.advance(20);
    assert_eq!(
        holder.connect4(s.port),
        "ok",
        "a grant must stay valid while the agent is gone"
    );
    let in_gap = (intruder.count() - at_kill.0, bare.count() - at_kill.1);
    assert!(pin_dir(&s.cg).exists(), "the pins went with the agent");

    s.agent.restart();
    s.agent.wait_log("adopted the pinned program set");
    intruder.advance(5);
    let (intruder_results, _i) = intruder.finish();
    let (bare_results, _b) = bare.finish();
    assert!(
        intruder_results.iter().all(|r| r == "EPERM"),
        "an unauthorised connect went through: {intruder_results:?}"
    );
    assert!(
        bare_results.iter().all(|r| r == "EPERM"),
        "a connect without a credential went through: {bare_results:?}"
    );
    assert!(in_gap.0 >= 20 && in_gap.1 >= 20);

    // Every decision, those made while no agent ran included, reaches the log; except that
    // the killed agent may have taken one event off the ring buffer and died before writing it.
    let records = wait_records(&s.agent, _i.pid, intruder_results.len() - 1);
    assert!(
        records
            .iter()
            .all(|d| d["verdict"] == "deny" && d["reason"] == "workload_not_allowed")
    );
    wait_records(&s.agent, _b.pid, bare_results.len() - 1);

    // The adopted grant still opens the endpoint, and the new agent explains it.
    assert_eq!(holder.connect4(s.port), "ok");
    let valid = wait_records(&s.agent, holder.pid, 3);
    assert!(
        valid.iter().all(|d| d["reason"] == "credential_valid"),
        "{valid:#?}"
    );
    let last = valid.last().unwrap();
    assert_eq!(last["credential"]["jti"], jti.as_str(), "{last:#}");
}

#[test]
fn a_restart_with_a_new_revision_swaps_and_explains_the_old_events() {
    if !privileged() {
        return;
    }
    let mut s = setup("restart-swap", &[]);
    let mut other = Workload::spawn(&s.other, &s.agent.api);
    assert_eq!(other.connect4(s.api_port), "EPERM");
    let old_revision = s
        .agent
        .wait_decision("first deny", |d| d["process"]["tgid"] == other.pid)["policy"]["revision"]
        .clone();
    s.agent.kill();
    // While the agent is away: the old policy decides, and the event waits in the ring buffer.
    assert_eq!(other.connect4(s.api_port), "EPERM");
    write_policy(&s.agent, &policy_b(&s));
    s.agent.restart();
    s.agent.wait_log("replaced the pinned program set");
    assert_eq!(other.connect4(s.api_port), "ok", "the new policy enforces");

    let records = wait_records(&s.agent, other.pid, 3);
    assert_eq!(records[1]["verdict"], "deny");
    assert_eq!(
        records[1]["policy"]["revision"], old_revision,
        "a decision of the old program set is explained with the old policy"
    );
    assert_eq!(records[2]["verdict"], "allow");
    assert_eq!(records[2]["policy"]["rule"], "other-to-api");
    assert_ne!(records[2]["policy"]["revision"], old_revision);
}

#[test]
fn sigterm_keeps_enforcing_and_uninstall_removes_the_pins() {
    if !privileged() {
        return;
    }
    let mut s = setup("uninstall", &[]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    assert!(pin_dir(&s.cg).exists(), "nothing pinned");
    assert!(
        s.agent.stop(),
        "tessera run did not exit cleanly on SIGTERM"
    );
    assert_eq!(
        w.connect4(s.port),
        "EPERM",
        "enforcement stopped with the agent"
    );
    let (code, out, err) = s.agent.uninstall();
    assert_eq!(code, 0, "tessera uninstall: {out} {err}");
    assert!(out.contains("removed"), "{out}");
    assert!(!pin_dir(&s.cg).exists(), "the pins are still there");
    assert!(
        eventually(|| w.connect4(s.port) == "ok"),
        "uninstall must end enforcement"
    );
    // Nothing left to remove is not an error.
    let (code, out, _) = s.agent.uninstall();
    assert_eq!(code, 0);
    assert!(out.contains("nothing pinned"), "{out}");
}

#[test]
fn fail_open_detaches_and_unpins_on_sigterm() {
    if !privileged() {
        return;
    }
    let mut s = setup("fail-open", &["--fail-open"]);
    let mut w = Workload::spawn(&s.app, &s.agent.api);
    assert_eq!(w.connect4(s.port), "EPERM");
    assert!(
        s.agent.stop(),
        "tessera run did not exit cleanly on SIGTERM"
    );
    assert!(
        eventually(|| w.connect4(s.port) == "ok"),
        "--fail-open must detach"
    );
    assert!(!pin_dir(&s.cg).exists(), "--fail-open left pins behind");
}

#[test]
fn reload_under_load_never_gives_a_wrong_verdict() {
    if !privileged() {
        return;
    }
    let s = setup("reload", &[]);
    let mut holder = Workload::spawn(&s.app, &s.agent.api);
    holder.must_token("vault", Some(600));
    let holder = Loop::start(holder, s.port);
    let bare = Loop::start(Workload::spawn(&s.app, &s.agent.api), s.port);
    let other = Loop::start(Workload::spawn(&s.other, &s.agent.api), s.api_port);
    holder.advance(3);

    let reloads = 12;
    for i in 0..reloads {
        let policy = if i % 2 == 0 {
            policy_b(&s)
        } else {
            policy_a(&s)
        };
        write_policy(&s.agent, &policy);
        s.agent.signal(Signal::SIGHUP);
        // The next reload once this one is enforcing (SIGHUP or the file watch, whichever first).
        let deadline = Instant::now() + Duration::from_secs(15);
        while s
            .agent
            .agent_log()
            .matches("reload: new policy enforcing")
            .count()
            <= i
        {
            assert!(
                Instant::now() < deadline,
                "reload {i} not applied:\n{}",
                s.agent.agent_log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        other.advance(2);
    }
    assert!(!s.agent.agent_log().contains("reload refused"));

    // A bad policy is refused, with its reason, and the last good one (A) keeps enforcing.
    write_policy(
        &s.agent,
        &policy_a(&s).replace("workloads: [app]", "workloads: [nobody]"),
    );
    s.agent.signal(Signal::SIGHUP);
    let refused = s.agent.wait_log("reload refused");
    assert!(refused.contains("nobody"), "no reason given: {refused}");
    other.advance(3);
    holder.advance(3);

    let (holder_results, h) = holder.finish();
    let (bare_results, b) = bare.finish();
    let (other_results, o) = other.finish();
    assert!(
        holder_results.iter().all(|r| r == "ok"),
        "a valid credential was refused during a reload: {holder_results:?}"
    );
    assert!(
        bare_results.iter().all(|r| r == "EPERM"),
        "a connect without a credential went through during a reload: {bare_results:?}"
    );
    // `other` → api: denied by A, allowed by B. Every decision must match the policy that
    // made it. (While a swap attaches the new set before detaching the old, a connect runs
    // both and is refused when either refuses: it may have two records, one per policy.)
    let records = wait_records(&s.agent, o.pid, other_results.len());
    let revision_a = records[0]["policy"]["revision"].clone();
    assert_eq!(records[0]["verdict"], "deny");
    let mut allows = 0;
    for record in &records {
        if record["verdict"] == "allow" {
            allows += 1;
            assert_eq!(record["policy"]["rule"], "other-to-api", "{record:#}");
            assert_ne!(record["policy"]["revision"], revision_a, "{record:#}");
        } else {
            assert_eq!(record["reason"], "workload_not_allowed", "{record:#}");
            assert_eq!(record["policy"]["revision"], revision_a, "{record:#}");
        }
    }
    let oks = other_results.iter().filter(|r| *r == "ok").count();
    assert!(
        oks > 0 && oks <= allows,
        "{oks} connects went through, {allows} allowed"
    );
    assert!(
        other_results.iter().all(|r| r == "ok" || r == "EPERM"),
        "{other_results:?}"
    );
    // The last good policy (A) is enforcing after the refused reload.
    let tail = &records[records.len() - 3..];
    assert!(tail.iter().all(|d| d["verdict"] == "deny"), "{tail:#?}");
    assert!(tail.iter().all(|d| d["policy"]["revision"] == revision_a));
    wait_records(&s.agent, h.pid, holder_results.len());
    wait_records(&s.agent, b.pid, bare_results.len());
}

/// Pins a new, empty BPF hash map at `path` with the given key and value sizes, as another
/// build of the agent would have pinned its own layout.
fn pin_hash_map(path: &std::path::Path, key_size: u32, value_size: u32) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    // The leading fields of `union bpf_attr` for each command; the kernel zero-fills the rest.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max_entries: 16,
        map_flags: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<MapCreate>()` bytes of a live, initialised struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const create,
            std::mem::size_of::<MapCreate>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let pin = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: as above; `name` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &raw const pin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is the map's descriptor, owned here; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// An agent of this build started over pins that another build laid out otherwise (here: a
/// `PROCESS_GRANTS` with the 256-byte values before `ProcessGrants::owner`) refuses to start with
/// what to do, instead of a verifier log; the pinned programs keep enforcing meanwhile.
#[test]
fn pins_of_another_layout_are_refused_with_what_to_do_and_keep_enforcing() {
    if !privileged() {
        return;
    }
    let s = setup("layout", &[]);
    let mut agent = s.agent;
    let mut w = Workload::spawn(&s.app, &agent.api);
    assert_eq!(w.connect4(s.port), "EPERM");
    agent.kill();
    let maps = tessera_agent::kernel::pin_dir(&support::cgroup2_root(), &s.cg.path).join("maps");
    let grants = maps.join("PROCESS_GRANTS");
    assert!(grants.exists(), "{}", grants.display());
    std::fs::remove_file(&grants).unwrap();
    pin_hash_map(&grants, 4, 256);

    let status = agent.restart_refused();
    assert!(!status.success(), "{status}");
    let log = agent.agent_log();
    assert!(
        log.contains("were made by another version of Tessera (PROCESS_GRANTS has 4-byte keys and 256-byte values"),
        "{log}"
    );
    assert!(log.contains("tessera uninstall --cgroup"), "{log}");
    assert!(!log.contains("Verifier output"), "{log}");
    // Nothing was detached: the programs pinned before still refuse the connect.
    assert_eq!(w.connect4(s.port), "EPERM");
    w.exit();
}
