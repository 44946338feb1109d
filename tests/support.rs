//! Fixtures for the privileged integration tests: a cgroup of the test's own, loopback servers,
//! the real `tessera run` attached to that cgroup, and scriptable workloads inside it.
//! Every fixture cleans up on drop: processes are killed by pid, cgroups removed.
#![allow(
    dead_code,
    reason = "each test file uses a different subset of the fixtures"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// Returns false (and says why) when the test cannot run here.
pub fn privileged() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to load eBPF programs and create cgroups");
        return false;
    }
    true
}

pub fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next() != Some("cgroup2") {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("no cgroup v2 hierarchy mounted")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `<cgroup2>/tessera-test-<pid>-<n>-<name>`, removed (with its children) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    /// Relative to the cgroup v2 root, as a policy names it.
    pub rel: String,
    root: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let root = cgroup2_root();
        let rel = format!(
            "/tessera-test-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = root.join(&rel[1..]);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path, rel, root }
    }

    /// A child cgroup; returns (filesystem path, path relative to the root).
    pub fn child(&self, name: &str) -> (PathBuf, String) {
        let path = self.path.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        (path, format!("{}/{name}", self.rel))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        fn remove(dir: &Path, root: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        remove(&e.path(), root);
                    }
                }
            }
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = std::fs::write(root.join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.path, &self.root);
    }
}

/// Loopback servers that accept and drop: TCP on 127.0.0.1 and ::1 and UDP on 127.0.0.1 and ::1,
/// all on one port number where the kernel allows it.
pub struct Servers {
    pub tcp_port: u16,
    pub udp_port: u16,
}

impl Servers {
    pub fn start() -> Self {
        for _ in 0..50 {
            let v4 = TcpListener::bind("127.0.0.1:0").expect("bind tcp4");
            let port = v4.local_addr().expect("addr").port();
            let Ok(v6) = TcpListener::bind(("::1", port)) else {
                continue;
            };
            let Ok(u4) = UdpSocket::bind(("127.0.0.1", port)) else {
                continue;
            };
            let Ok(u6) = UdpSocket::bind(("::1", port)) else {
                continue;
            };
            for l in [v4, v6] {
                thread::spawn(move || {
                    for mut c in l.incoming().flatten() {
                        let _ = c.write_all(b"hello\n");
                    }
                });
            }
            for u in [u4, u6] {
                thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while u.recv_from(&mut buf).is_ok() {}
                });
            }
            return Self {
                tcp_port: port,
                udp_port: port,
            };
        }
        panic!("no free port for the loopback servers");
    }
}

/// Another free loopback TCP port with a listener behind it.
pub fn extra_tcp_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || for _c in l.incoming().flatten() {});
    port
}

/// `tessera run` attached to one test cgroup, with its own sockets, state and decision log.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub api: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
    /// The policy file `tessera run --policy` reads (rewrite it to reload).
    pub policy: PathBuf,
    /// The agent's stderr (its operational log), across restarts.
    pub agent_log: PathBuf,
    attach: PathBuf,
    extra: Vec<String>,
}

impl Agent {
    pub fn start(policy_yaml: &str, attach: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, policy_yaml).expect("write policy");
        let api = dir.path().join("workload.sock");
        let admin = dir.path().join("admin.sock");
        let log = dir.path().join("decisions.jsonl");
        let agent_log = dir.path().join("agent.log");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn_agent(dir.path(), &policy, attach, &extra, &agent_log);
        let mut agent = Self {
            child,
            dir,
            api,
            admin,
            log,
            policy,
            agent_log,
            attach: attach.to_path_buf(),
            extra,
        };
        agent.wait_ready();
        agent
    }

    /// Starts `tessera run` again with the same settings, state and decision log (after it
    /// stopped or was killed).
    pub fn restart(&mut self) {
        assert!(
            !matches!(self.child.try_wait(), Ok(None)),
            "the agent is still running"
        );
        // A killed agent leaves its sockets behind; readiness is their re-creation.
        let _ = std::fs::remove_file(&self.api);
        let _ = std::fs::remove_file(&self.admin);
        self.child = spawn_agent(
            self.dir.path(),
            &self.policy,
            &self.attach,
            &self.extra,
            &self.agent_log,
        );
        self.wait_ready();
    }

    /// SIGKILL, then wait: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the agent");
    }

    /// The agent's operational log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    /// Waits until the agent's log has a line containing `what`; panics with the log if not.
    pub fn wait_log(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.agent_log();
            if let Some(line) = log.lines().find(|l| l.contains(what)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the agent's log:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tessera uninstall --cgroup <attach point>`: removes what this agent pinned.
    pub fn uninstall(&self) -> (i32, String, String) {
        let attach = self.attach.to_str().expect("utf-8 path").to_string();
        self.cli(&["uninstall", "--cgroup", &attach])
    }

    fn wait_ready(&mut self) {
        let agent = self;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(agent.api.exists() && agent.admin.exists()) {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("tessera run exited before it was ready: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "tessera run not ready within 30 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where this agent serves /metrics, /healthz and /readyz (start it with
    /// `--metrics-addr 127.0.0.1:0` in `extra`), from `tessera status --json`.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let admin = self.admin.to_str().expect("utf-8 path").to_string();
        let (code, out, err) = self.cli(&["status", "--json", "--admin-socket", &admin]);
        assert_eq!(code, 0, "tessera status: {err}");
        let status: Value = serde_json::from_str(&out).expect("status JSON");
        status["metrics"]["listen"]
            .as_str()
            .unwrap_or_else(|| panic!("metrics are off: {status}"))
            .parse()
            .expect("metrics address")
    }

    /// `GET path` from the metrics listener: (HTTP status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::Read as _;
        let mut stream = std::net::TcpStream::connect(self.metrics_addr()).expect("connect");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All decision records written so far.
    pub fn decisions(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad decision line {l}: {e}"))
            })
            .collect()
    }

    /// Waits for a decision record matching `pred`; panics with the log when none comes.
    pub fn wait_decision(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(d) = self.decisions().into_iter().find(|d| pred(d)) {
                return d;
            }
            if Instant::now() > deadline {
                panic!(
                    "no decision record for {what}; log:\n{:#?}",
                    self.decisions()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tessera <args>` as a separate process, returning (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(TESSERA)
            .args(args)
            .output()
            .expect("run tessera");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// SIGTERM, then wait; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
        // The programs are pinned and outlive the agent: never leave them behind.
        let (code, out, err) = self.uninstall();
        if code != 0 {
            eprintln!("tessera uninstall failed ({code}): {out} {err}");
        }
        if thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent_log());
        }
    }
}

fn spawn_agent(
    dir: &Path,
    policy: &Path,
    attach: &Path,
    extra: &[String],
    agent_log: &Path,
) -> Child {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(agent_log)
        .expect("agent log");
    Command::new(TESSERA)
        .arg("run")
        .arg("--policy")
        .arg(policy)
        .arg("--cgroup")
        .arg(attach)
        .arg("--api-socket")
        .arg(dir.join("workload.sock"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .arg("--decision-log")
        .arg(dir.join("decisions.jsonl"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        // Tests run agents in parallel: no shared metrics port.
        .arg("--metrics-addr")
        .arg("off")
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn tessera run")
}

/// tests/workload.py inside a cgroup: a process that asks for credentials and connects.
pub struct Workload {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Workload {
    pub fn spawn(cgroup: &Path, api: &Path) -> Self {
        Self::spawn_with(Command::new("python3"), cgroup, api)
    }

    pub fn spawn_with(mut cmd: Command, cgroup: &Path, api: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workload.py");
        let mut child = cmd
            .arg(script)
            .arg(cgroup)
            .arg(api)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3 workload");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut w = Self {
            pid: child.id(),
            child,
            stdin,
            stdout,
        };
        let ready = w.read();
        assert_eq!(
            ready["ready"],
            json!(w.pid),
            "workload did not start: {ready}"
        );
        w
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).expect("read workload");
        assert!(n > 0, "workload {} exited", self.pid);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("workload said {line:?}: {e}"))
    }

    pub fn send(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").expect("write workload");
        self.stdin.flush().expect("flush");
        self.read()
    }

    /// POST /v1/credentials; returns (HTTP status, body).
    pub fn token(&mut self, audience: &str, ttl_seconds: Option<u64>) -> (u16, Value) {
        let mut cmd = json!({"op": "token", "audience": audience, "task": "test"});
        if let Some(ttl) = ttl_seconds {
            cmd["ttl_seconds"] = json!(ttl);
        }
        let out = self.send(cmd);
        (
            out["status"].as_u64().unwrap_or(0) as u16,
            out["body"].clone(),
        )
    }

    /// A token that must be granted; returns its jti.
    pub fn must_token(&mut self, audience: &str, ttl_seconds: Option<u64>) -> String {
        let (status, body) = self.token(audience, ttl_seconds);
        assert_eq!(status, 200, "credential refused: {body}");
        body["jti"].as_str().expect("jti").to_string()
    }

    pub fn raw(&mut self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let out = self.send(json!({"op": "raw", "method": method, "path": path, "body": body}));
        (
            out["status"].as_u64().unwrap_or(0) as u16,
            out["body"].clone(),
        )
    }

    /// "ok", "EPERM", ...
    pub fn net(&mut self, op: &str, family: u8, host: &str, port: u16) -> String {
        let out = self.send(json!({"op": op, "family": family, "host": host, "port": port}));
        out["result"].as_str().unwrap_or("?").to_string()
    }

    pub fn connect4(&mut self, port: u16) -> String {
        self.net("connect", 4, "127.0.0.1", port)
    }

    /// Ends the process and waits for it.
    pub fn exit(mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "exit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A policy with one workload (`app`, by cgroup) allowed to `vault` on 127.0.0.1 and ::1 at
/// `port` (tcp) and `dns` (udp), plus `other` (no rule) and `api` (a second endpoint).
pub fn standard_policy(cgroup_rel: &str, port: u16, other_port: u16, mode: &str) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: test
spec:
  trustDomain: test.tessera.dev
  mode: {mode}
  workloads:
    - name: app
      match:
        cgroup: {cgroup_rel}/app
    - name: other
      match:
        cgroup: {cgroup_rel}/other
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [{port}]
      protocol: tcp
    - name: dns
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [{port}]
      protocol: udp
    - name: api
      kind: api
      addresses: ["127.0.0.0/8"]
      ports: [{other_port}]
  rules:
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault, dns]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
    - name: app-to-api
      workloads: [app]
      endpoints: [api]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
"#
    )
}
