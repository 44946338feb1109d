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
        tessera_agent::testkit::skip("needs root to load eBPF programs and create cgroups");
        return false;
    }
    true
}

/// The decision records of the log at `path` so far. The agent may be writing the last line as
/// it is read: only whole lines count.
pub fn read_decisions(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad decision line {l}: {e}")))
        .collect()
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
    env: Vec<(String, Option<String>)>,
    /// How many `ready` lines the agent log had when the current process was spawned.
    readies: usize,
}

/// The agent logs this once it serves: after the sockets are bound, the programs attached and
/// its state written (the sockets alone appear earlier).
pub const READY_LINE: &str = "tessera_agent::daemon: ready api=";

impl Agent {
    pub fn start(policy_yaml: &str, attach: &Path, extra: &[&str]) -> Self {
        Self::start_env(policy_yaml, attach, extra, &[])
    }

    /// Like [`Agent::start`], with environment changes for the agent: `(name, Some(value))`
    /// sets a variable, `(name, None)` removes it.
    pub fn start_env(
        policy_yaml: &str,
        attach: &Path,
        extra: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, policy_yaml).expect("write policy");
        let api = dir.path().join("workload.sock");
        let admin = dir.path().join("admin.sock");
        let log = dir.path().join("decisions.jsonl");
        let agent_log = dir.path().join("agent.log");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, Option<String>)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        let child = spawn_agent(dir.path(), &policy, attach, &extra, &env, &agent_log);
        let mut agent = Self {
            readies: 0,
            child,
            dir,
            api,
            admin,
            log,
            policy,
            agent_log,
            attach: attach.to_path_buf(),
            extra,
            env,
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
        self.respawn();
        self.wait_ready();
    }

    /// Spawns `tessera run` again with the same settings; a killed agent leaves its sockets
    /// behind, and readiness is their re-creation, so they go first.
    fn respawn(&mut self) {
        self.readies = self.agent_log().matches(READY_LINE).count();
        let _ = std::fs::remove_file(&self.api);
        let _ = std::fs::remove_file(&self.admin);
        self.child = spawn_agent(
            self.dir.path(),
            &self.policy,
            &self.attach,
            &self.extra,
            &self.env,
            &self.agent_log,
        );
    }

    /// `tessera status --json` of this agent.
    pub fn status_json(&self) -> Value {
        let admin = self.admin.to_str().expect("utf-8 path").to_string();
        let (code, out, err) = self.cli(&["status", "--json", "--admin-socket", &admin]);
        assert_eq!(code, 0, "tessera status: {err}");
        serde_json::from_str(&out).expect("status JSON")
    }

    /// Starts `tessera run` again (after it stopped or was killed) and expects it to refuse to
    /// start: its exit status, or a panic when it gets ready instead.
    pub fn restart_refused(&mut self) -> std::process::ExitStatus {
        self.respawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                !(self.api.exists() && self.admin.exists()),
                "the agent started:\n{}",
                self.agent_log()
            );
            assert!(
                Instant::now() < deadline,
                "tessera run neither refused nor started in 30 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
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

    /// Ready is the agent's own `ready` line for this process (the sockets are bound before the
    /// state is written, so their existence alone is not readiness).
    fn wait_ready(&mut self) {
        let agent = self;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(agent.api.exists()
            && agent.admin.exists()
            && agent.agent_log().matches(READY_LINE).count() > agent.readies)
        {
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

    /// The value of one metric series now, as `/metrics` prints it (`name{labels}`; 0 when
    /// absent).
    pub fn metric(&self, series: &str) -> u64 {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "{body}");
        let prefix = format!("{series} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.trim().parse().expect("counter"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All decision records written so far.
    pub fn decisions(&self) -> Vec<Value> {
        read_decisions(&self.log)
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
    env: &[(String, Option<String>)],
    agent_log: &Path,
) -> Child {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(agent_log)
        .expect("agent log");
    let mut cmd = Command::new(TESSERA);
    // `info` unless the test asks for more.
    cmd.env("RUST_LOG", "info");
    for (name, value) in env {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    cmd.arg("run")
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

    /// tests/workload.py run by `program` (a copy of python3, or a wrapper that execs one),
    /// exec'd inside `cgroup` from the start (a shell moves itself there, then execs): the
    /// kernel sees the exec below the attach point, as it sees a service or container start.
    pub fn spawn_in(cgroup: &Path, api: &Path, program: &[&str]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(cgroup)
            .args(program);
        Self::spawn_with(cmd, cgroup, api)
    }

    pub fn spawn_with(mut cmd: Command, cgroup: &Path, api: &Path) -> Self {
        let mut child = cmd
            .arg(workload_script())
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

/// The path of tests/workload.py.
pub fn workload_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workload.py")
}

/// The commands of tests/workload.py beyond the network and Workload API ones.
impl Workload {
    /// setgroups(groups), setresgid(gid), setresuid(uid); "ok" or the errno name.
    pub fn setuid(&mut self, uid: u32, gid: u32) -> String {
        let out = self.send(json!({"op": "setuid", "uid": uid, "gid": gid, "groups": []}));
        out["result"].as_str().unwrap_or("?").to_string()
    }

    /// Forks a child that answers commands too; returns its pid.
    pub fn fork(&mut self) -> u32 {
        let out = self.send(json!({"op": "fork"}));
        out["child"]
            .as_u64()
            .unwrap_or_else(|| panic!("fork failed: {out}")) as u32
    }

    /// One command for a child made by [`Workload::fork`].
    pub fn child(&mut self, pid: u32, cmd: Value) -> Value {
        self.send(json!({"op": "child", "pid": pid, "cmd": cmd}))
    }

    /// TCP connect to 127.0.0.1:`port` from a child: "ok", "EPERM", ...
    pub fn child_connect4(&mut self, pid: u32, port: u16) -> String {
        let out = self.child(
            pid,
            json!({"op": "connect", "family": 4, "host": "127.0.0.1", "port": port}),
        );
        out["result"].as_str().unwrap_or("?").to_string()
    }

    /// Makes the process exec `exe` (None: the same interpreter) running workload.py again;
    /// waits for the new image's ready line (the pid stays).
    pub fn exec(&mut self, exe: Option<&Path>) {
        let mut cmd = json!({"op": "exec"});
        if let Some(exe) = exe {
            cmd["exe"] = json!(exe.to_str().expect("utf-8 path"));
        }
        writeln!(self.stdin, "{cmd}").expect("write workload");
        self.stdin.flush().expect("flush");
        let ready = self.read();
        assert_eq!(ready["ready"], json!(self.pid), "exec failed: {ready}");
    }

    /// An environment variable of the process.
    pub fn env(&mut self, name: &str) -> Option<String> {
        let out = self.send(json!({"op": "env", "name": name}));
        out["value"].as_str().map(str::to_string)
    }

    /// pid, ppid, uid, gid, exe and cgroup as the process sees them.
    pub fn whoami(&mut self) -> Value {
        self.send(json!({"op": "whoami"}))
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

/// Decision records of one process, and connects that wait for theirs.
impl Agent {
    /// The decision records of the process `pid` (by tgid), in log order.
    pub fn decisions_of(&self, pid: u32) -> Vec<Value> {
        self.decisions()
            .into_iter()
            .filter(|d| d["process"]["tgid"] == pid)
            .collect()
    }

    /// Runs `call` (one connect or send to a protected endpoint by process `pid`) and waits
    /// for its decision record. Every earlier protected call of `pid` must have been waited
    /// for the same way, so that the next record is this call's.
    pub fn probe(&self, pid: u32, call: impl FnOnce() -> String) -> (String, Value) {
        let before = self.decisions_of(pid).len();
        let result = call();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(d) = self.decisions_of(pid).into_iter().nth(before) {
                return (result, d);
            }
            assert!(
                Instant::now() < deadline,
                "no decision record for process {pid} ({result}); log:\n{:#?}",
                self.decisions()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Agent::probe`], repeated while the agent has not attested the caller yet (reason
    /// `identity_pending`: the agent attests it after that deny). Returns the settled result,
    /// its record and how many `identity_pending` denies came before it.
    pub fn settled(&self, pid: u32, mut call: impl FnMut() -> String) -> (String, Value, usize) {
        let mut pending = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (result, d) = self.probe(pid, &mut call);
            if d["reason"] != "identity_pending" {
                return (result, d, pending);
            }
            assert_eq!(result, "EPERM", "identity_pending must deny: {d}");
            pending += 1;
            assert!(
                Instant::now() < deadline,
                "process {pid} still identity_pending after {pending} tries: {d}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets processes of other uids reach the Workload API socket (its directory is 0700).
    pub fn open_api_dir(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the agent's directory");
    }
}

/// The Python package `spec` (a pip requirement) is importable by `import` (Python code),
/// installing it with pip if needed; `Err` says why it cannot be, for a skip.
pub fn python_package(import: &str, spec: &str) -> Result<(), String> {
    let importable = || {
        Command::new(real_python())
            .args(["-c", import])
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return Ok(());
    }
    let out = Command::new(real_python())
        .args(["-m", "pip", "install", "-q", spec])
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if importable() {
        Ok(())
    } else {
        Err(format!(
            "{spec} cannot be installed (python3 -m pip install '{spec}'): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The real python3 binary (not a pyenv shim or a symlink), so that copies of it run.
pub fn real_python() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "python3 failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A copy of `real_python()` at `path`, with `extra` bytes appended (so that its SHA-256
/// differs and it still runs); returns the copy's lower-case hex SHA-256.
pub fn python_copy(path: &Path, extra: &[u8]) -> String {
    use sha2::Digest as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut bytes = std::fs::read(real_python()).expect("read python3");
    bytes.extend_from_slice(extra);
    // Through a temporary name: a running binary cannot be rewritten in place (ETXTBSY).
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
    let digest = sha2::Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A policy document: the given `workloads:` and `rules:` entries (YAML, indented by four
/// spaces as list items of `spec`), endpoint `vault` (TCP 127.0.0.1 and ::1, `port`) and
/// endpoint `api` (TCP 127.0.0.1, `api_port`).
pub fn identity_policy(workloads: &str, rules: &str, port: u16, api_port: u16) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: identity-test
spec:
  trustDomain: test.tessera.dev
  mode: enforce
  workloads:
{workloads}
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [{port}]
      protocol: tcp
    - name: api
      kind: api
      addresses: ["127.0.0.1/32"]
      ports: [{api_port}]
      protocol: tcp
  rules:
{rules}
"#
    )
}

/// A new workload process given `pid` (free again after its holder exited), through
/// `/proc/sys/kernel/ns_last_pid`; `None` when other processes of the host keep taking it.
pub fn spawn_on_pid(pid: u32, cgroup: &Path, api: &Path) -> Option<Workload> {
    for _ in 0..200 {
        let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string());
        let w = Workload::spawn(cgroup, api);
        if w.pid == pid {
            return Some(w);
        }
    }
    tessera_agent::testkit::skip_busy(&format!(
        "could not get pid {pid} reused (the machine is too busy)"
    ));
    None
}

/// Runs `rounds` of tests/workload.py's `exit_race` from `w` (callers asking for `audience` and
/// exiting mid-request, a successor forked onto each pid connecting to `port`) and asserts that
/// no successor got in and that no grant is left; returns the op's answer.
pub fn assert_exit_race_leaves_nothing(
    agent: &Agent,
    w: &mut Workload,
    audience: &str,
    port: u16,
    rounds: u64,
) -> Value {
    let out = w.send(json!({
        "op": "exit_race", "audience": audience, "port": port, "rounds": rounds,
        "max_delay_us": 2500,
    }));
    eprintln!("exit race: {out}");
    let reused = out["reused"].as_u64().expect("reused");
    let allowed = out["results"]["ok"].as_u64().unwrap_or(0);
    assert_eq!(
        allowed, 0,
        "{allowed} of {reused} successors on a caller's pid connected with its grant: {out}"
    );
    assert_eq!(
        out["results"]["EPERM"].as_u64().unwrap_or(0),
        reused,
        "{out}"
    );
    // Every caller is gone: so is every grant (the agent withdrew it, or the exit hook did).
    let status = agent.status_json();
    assert_eq!(
        status["grants"]["active"], 0,
        "grants left for callers that exited: {status}"
    );
    if reused < rounds / 2 {
        eprintln!(
            "note: only {reused} of {rounds} pids were reused (the machine is busy); the grant \
             count above still covers every round"
        );
    }
    out
}

/// A TCP server on every address of this host's network namespace (`0.0.0.0`), on a free
/// port: it accepts and drops. Only the tests' own clients reach it (loopback, and the host's
/// end of a veth pair the test created).
pub fn wildcard_tcp_server() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || for _c in l.incoming().flatten() {});
    port
}

/// A network namespace of the test's own, `tessera-<pid>-<n>`, joined to this host by a veth
/// pair on `198.18.<k>.0/24` (RFC 2544's benchmarking range): the host's end is
/// `198.18.<k>.1`, the namespace's `198.18.<k>.2`. Removed on drop (the veth pair with it).
pub struct TestNetns {
    pub name: String,
    /// The host's end of the veth pair (an interface of this host).
    pub host_if: String,
    /// The namespace's end.
    pub peer_if: String,
    /// `198.18.<k>.`: the subnet's first three octets, with the dot.
    pub prefix: String,
}

impl TestNetns {
    pub fn new() -> Self {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("tessera-{pid}-{n}");
        // Interface names have at most 15 bytes.
        let tag = (pid % 100_000) * 10 + n % 10;
        let host_if = format!("tsh{tag}");
        let peer_if = format!("tsn{tag}");
        let prefix = format!("198.18.{}.", 1 + (pid * 7 + n) % 250);
        let ns = Self {
            name,
            host_if,
            peer_if,
            prefix,
        };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.peer_if,
            "netns",
            &ns.name,
        ]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}1/24", ns.prefix),
            "dev",
            &ns.host_if,
        ]);
        ns.ip(&["link", "set", &ns.host_if, "up"]);
        ns.inside(&[
            "addr",
            "add",
            &format!("{}2/24", ns.prefix),
            "dev",
            &ns.peer_if,
        ]);
        ns.inside(&["link", "set", &ns.peer_if, "up"]);
        ns.inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// `198.18.<k>.<last>`.
    pub fn addr(&self, last: u8) -> String {
        format!("{}{last}", self.prefix)
    }

    /// Runs `ip ARGS` on the host.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn inside(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        self.ip(&all);
    }

    /// A command that runs `program` inside the namespace (its network only: the mounts, and
    /// so the cgroup filesystem, stay the host's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// A TCP server inside the namespace on `0.0.0.0:port` that accepts and drops; killed on
    /// drop. Returns once it listens.
    pub fn server(&self, port: u16) -> NetnsServer {
        let script = format!(
            "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('0.0.0.0',{port}))\ns.listen(64)\nprint('up',flush=True)\n\
             while True:\n    c,_=s.accept()\n    c.close()\n"
        );
        let mut child = self
            .command("python3")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the namespace's server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the namespace's server");
        assert_eq!(line.trim(), "up", "the namespace's server did not start");
        NetnsServer { child }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so the host's end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// A server process inside a [`TestNetns`], killed (by pid) on drop.
pub struct NetnsServer {
    child: Child,
}

impl Drop for NetnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- trust bundles: two agents of one trust domain ----

/// The `kid` of a token's header.
pub fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("header")
        .kid
        .expect("kid")
}

/// `tests/spiffe_client.py ARGS` in `cgroup`, configured only by `SPIFFE_ENDPOINT_SOCKET` (the
/// agent's Workload API), stdin and stdout piped; None (said why, for `what`) without py-spiffe.
pub fn spiffe_client(agent: &Agent, cgroup: &Path, args: &[&str], what: &str) -> Option<Child> {
    let ok = Command::new(real_python())
        .args(["-c", "import spiffe"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("{what} not checked: py-spiffe is not installed (python3 -m pip install spiffe)");
        return None;
    }
    let child = Command::new(real_python())
        .env_clear()
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", agent.api.display()),
        )
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/spiffe_client.py"))
        .arg(cgroup)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run py-spiffe");
    Some(child)
}

/// ValidateJWTSVID through `agent`, by py-spiffe (None: py-spiffe is not installed).
pub fn validate_through(agent: &Agent, cgroup: &Path, token: &str) -> Option<Value> {
    let args = ["validate", "vault", "test.tessera.dev", "1"];
    let mut child = spiffe_client(agent, cgroup, &args, "ValidateJWTSVID")?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(token.as_bytes())
        .expect("write token");
    let out = child.wait_with_output().expect("py-spiffe");
    Some(serde_json::from_slice(&out.stdout).expect("client JSON"))
}

/// Waits until `agent`'s JWKS lists `kid`.
pub fn wait_published(agent: &Agent, w: &mut Workload, kid: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, jwks) = w.raw("GET", "/v1/jwks", None);
        if jwks["keys"]
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k["kid"] == kid))
        {
            return jwks;
        }
        assert!(
            Instant::now() < deadline,
            "kid {kid} never published by the other agent: {jwks}\n{}",
            agent.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A JWT's claims, not verified (the tests verify what the agent wrote into them).
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).expect("jwt payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("jwt json")
}

/// Validates an issuance module's real `input` with Python's jsonschema against
/// docs/issuance-input.schema.json (skipped, saying so, without jsonschema).
pub fn check_issuance_input_schema(input: &Value) {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/issuance-input.schema.json");
    let has_jsonschema = Command::new("python3")
        .args(["-c", "import jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_jsonschema {
        tessera_agent::testkit::skip(
            "the Python package jsonschema is missing: the input's schema check did not run",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("input.json");
    std::fs::write(&file, input.to_string()).expect("write input");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1]))\n\
             jsonschema.Draft202012Validator.check_schema(schema)\n\
             jsonschema.Draft202012Validator(schema).validate(json.load(open(sys.argv[2])))",
        ])
        .arg(&schema)
        .arg(&file)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the real input does not match {}: {}\n{input:#}",
        schema.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
