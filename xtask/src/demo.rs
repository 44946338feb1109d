//! `cargo xtask demo`: the agent enforcing policies/demo.yaml on a sandbox cgroup.
//!
//! It starts a loopback "secret store" and `tessera run` attached to `<cgroup2>/tessera-demo`
//! only, then runs three workloads inside the sandbox and prints the decision log as it grows:
//! one that gets a credential and connects, one with no rule that is refused, and the first
//! again after its credential is revoked. Everything it creates is removed on the way out.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cgroup::ScratchCgroup;

/// The demo policy's secret store: `vault` on 127.0.0.1:18200.
const VAULT: &str = "127.0.0.1:18200";

pub fn run() -> Result<()> {
    crate::setup::run()?;
    crate::setup::cargo(&crate::build_args(false))?;
    let root = crate::workspace_root();
    let tessera = root.join("target/debug/tessera");

    let scratch = std::env::temp_dir().join(format!("tessera-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let _scratch_guard = RemoveDir(scratch.clone());
    let api = scratch.join("workload.sock");
    let admin = scratch.join("admin.sock");
    let log = scratch.join("decisions.jsonl");

    let sandbox = ScratchCgroup::create("tessera-demo")?;
    let agent_cg = sandbox.child("agent")?;
    let intruder_cg = sandbox.child("intruder")?;

    serve_secret_store()?;
    banner("starting the agent, attached to the sandbox cgroup only");
    let agent = Guard::spawn(
        Command::new(&tessera)
            .args(["run", "--policy"])
            .arg(root.join("policies/demo.yaml"))
            .arg("--cgroup")
            .arg(sandbox.path())
            .arg("--decision-log")
            .arg(&log)
            .arg("--api-socket")
            .arg(&api)
            .arg("--admin-socket")
            .arg(&admin)
            .arg("--state-dir")
            .arg(scratch.join("state"))
            // Detach when the demo stops it: nothing stays pinned for a cgroup about to go.
            .arg("--fail-open")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
    )?;
    wait_for(&api, &admin, &log)?;
    let _follower = Guard::spawn(
        Command::new(&tessera)
            .args(["logs", "-f", "-o", "compact"])
            .arg(&log),
    )?;

    let script = root.join("xtask/demo/workload.py");
    let mut failures = Vec::new();

    banner("1. `agent` asks the Workload API for a credential for `vault`, then calls it");
    let mut holder = Workload::start(&agent_cg, &script, &api, Some("vault"), true)?;
    let credential = holder.next_line()?;
    println!("   agent: {credential}");
    let jti = json_field(&credential, "jti")
        .context("the agent workload got no credential (see the line above)")?;
    expect(
        &mut failures,
        "agent with a credential",
        &holder.next_line()?,
        "connected",
    );
    pause();

    banner("2. `agent` without a credential, and `intruder` (no rule for vault), call it");
    let mut bare = Workload::start(&agent_cg, &script, &api, None, false)?;
    expect(
        &mut failures,
        "agent without a credential",
        &bare.next_line()?,
        "denied",
    );
    let mut intruder = Workload::start(&intruder_cg, &script, &api, Some("vault"), false)?;
    println!("   intruder: {}", intruder.next_line()?);
    expect(&mut failures, "intruder", &intruder.next_line()?, "denied");
    pause();

    banner(&format!(
        "3. the operator revokes credential {jti}; `agent` calls again"
    ));
    let st = Command::new(&tessera)
        .args(["revoke", "--jti", &jti, "--admin-socket"])
        .arg(&admin)
        .status()?;
    if !st.success() {
        failures.push(format!("tessera revoke exited with {st}"));
    }
    holder.again()?;
    expect(
        &mut failures,
        "agent after revocation",
        &holder.next_line()?,
        "denied",
    );
    pause();

    drop(holder);
    drop(agent);
    banner("done: the agent stopped and detached; the sandbox cgroup is removed");
    if !failures.is_empty() {
        bail!(
            "the demo did not go as expected:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn banner(text: &str) {
    println!("\n== {text}");
}

/// Lets the log follower print the decision that the last step produced.
fn pause() {
    thread::sleep(Duration::from_millis(700));
}

fn expect(failures: &mut Vec<String>, who: &str, line: &str, outcome: &str) {
    println!("   {who}: {line}");
    if json_field(line, "outcome").as_deref() != Some(outcome) {
        failures.push(format!("{who}: expected `{outcome}`, got {line}"));
    }
}

/// A string field of a one-line JSON object (the workload script's output).
fn json_field(line: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\": \"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_string())
}

/// A loopback TCP server that answers every request like a secret store would.
fn serve_secret_store() -> Result<()> {
    let listener = TcpListener::bind(VAULT)
        .with_context(|| format!("binding the demo secret store on {VAULT}: is the port free?"))?;
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\ns3cr3t\n");
        }
    });
    Ok(())
}

fn wait_for(api: &Path, admin: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(api.exists() && admin.exists()) {
        if Instant::now() > deadline {
            bail!("the agent did not open its sockets within 30 s (see its log above)");
        }
        thread::sleep(Duration::from_millis(100));
    }
    if !log.exists() {
        std::fs::File::create(log)?;
    }
    Ok(())
}

/// The workload script, started inside a cgroup of the sandbox.
struct Workload {
    child: Guard,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    fn start(
        cgroup: &Path,
        script: &Path,
        api: &Path,
        audience: Option<&str>,
        keep_open: bool,
    ) -> Result<Self> {
        let mut cmd = Command::new("sh");
        // The shell moves itself into the cgroup, then becomes the workload: the process that
        // asks for the credential and connects is the one the policy sees.
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec python3 "$@""#)
            .arg("sh")
            .arg(cgroup)
            .arg(script)
            .arg("--api")
            .arg(api)
            .arg("--endpoint")
            .arg(VAULT);
        if let Some(aud) = audience {
            cmd.args(["--audience", aud]);
        }
        if keep_open {
            cmd.arg("--again-on-stdin");
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = Guard::spawn(&mut cmd)?;
        let stdin = child.0.stdin.take();
        let stdout = child.0.stdout.take().context("workload stdout")?;
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    fn next_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the workload exited early ({:?})", self.child.0.try_wait());
        }
        Ok(line.trim_end().to_string())
    }

    fn again(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("workload stdin")?;
        stdin.write_all(b"again\n")?;
        stdin.flush()?;
        Ok(())
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped on drop.
struct Guard(Child);

impl Guard {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        cmd.spawn()
            .map(Self)
            .with_context(|| format!("starting {cmd:?}"))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
