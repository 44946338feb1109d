//! The harness: a scratch cgroup (`<cgroup2>/<name>`, with the children the policy names and a
//! sibling `<name>-outside`), loopback servers, a private `tessera run` attached to the scratch
//! cgroup only, and one actor process per attempt. Everything is removed on drop.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::debug;

use super::SelftestError;
use super::actor::{ActorReport, ActorRequest, NETNS_READY, Role};
use super::catalog::{Attempt, Place};
use super::policy::policy_yaml;
use super::report::AttemptResult;
use super::veth::{Veth, VethNames};

mod dns;
mod fixtures;

pub use dns::{HOSTNAME, HOSTNAME_ADDR};

use fixtures::{AgentChild, KillOnDrop, ScratchCgroups, ScratchDir, start_servers};

/// The hidden subcommand that runs an actor.
pub const ACTOR_SUBCOMMAND: &str = "selftest-actor";

/// How long one actor may take before it is killed (it normally takes milliseconds).
const ACTOR_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a decision record (the agent polls its ring buffer every 50 ms).
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);

pub struct HarnessConfig {
    /// The `tessera` binary (the agent and the actors).
    pub exe: PathBuf,
    /// The scratch cgroup's directory name under the cgroup v2 root, e.g.
    /// `tessera-selftest-<pid>`.
    pub cgroup_name: String,
    /// Set by a Ctrl-C handler: stop before the next attempt.
    pub interrupted: Option<Arc<AtomicBool>>,
}

pub struct Harness {
    cfg: HarnessConfig,
    /// Held for its drop, declared before `cgroups`: the agent stops before the cgroups go.
    _agent: AgentChild,
    cgroups: ScratchCgroups,
    dir: ScratchDir,
    port: u16,
    /// TCP and UDP on 127.0.0.1 that no endpoint covers.
    unlisted_port: u16,
    veth: VethNames,
}

impl Harness {
    /// Sets everything up; on error, what was set up is removed again.
    pub fn start(cfg: HarnessConfig) -> Result<Self, SelftestError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(SelftestError::NotRoot);
        }
        let root = crate::kernel::cgroup2_root().map_err(SelftestError::Cgroup2)?;
        let cgroups = ScratchCgroups::create(&root, &cfg.cgroup_name)?;
        let dir = ScratchDir::create(&cfg.cgroup_name)?;
        let port = start_servers().map_err(SelftestError::Servers)?;
        let unlisted_port = start_servers().map_err(SelftestError::Servers)?;
        let veth = VethNames::pick();
        let dns_port = dns::start().map_err(SelftestError::Servers)?;
        fixtures::listen_at(HOSTNAME_ADDR, port);
        let policy = dir.path.join("policy.yaml");
        std::fs::write(
            &policy,
            policy_yaml(&cgroups.rel, port, veth.host_addr, HOSTNAME),
        )
        .map_err(SelftestError::io("cannot write", &policy))?;
        let dns_server = format!("127.0.0.1:{dns_port}");
        let agent = AgentChild::start(&cfg.exe, &policy, &cgroups.path, &dir.path, &dns_server)?;
        Ok(Self {
            cfg,
            _agent: agent,
            cgroups,
            dir,
            port,
            unlisted_port,
            veth,
        })
    }

    /// The scratch cgroup (the agent's attach point).
    pub fn cgroup(&self) -> &Path {
        &self.cgroups.path
    }

    pub fn decision_log(&self) -> PathBuf {
        self.dir.path.join("decisions.jsonl")
    }

    fn interrupted(&self) -> bool {
        self.cfg
            .interrupted
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Runs `attempts` in order; without `keep_going`, stops at the first failure (the rest are
    /// reported as not run).
    pub fn run_all(
        &self,
        attempts: &[Attempt],
        keep_going: bool,
        mut progress: impl FnMut(&AttemptResult),
    ) -> Result<Vec<AttemptResult>, SelftestError> {
        let mut results = Vec::new();
        let mut stop: Option<&str> = None;
        for &attempt in attempts {
            if let Some(why) = stop {
                results.push(AttemptResult::not_run(attempt, why));
                continue;
            }
            if self.interrupted() {
                return Err(SelftestError::Interrupted);
            }
            let result = self.run(attempt)?;
            progress(&result);
            if result.status == super::Status::Fail && !keep_going {
                stop = Some("an earlier attempt failed (use --keep-going to run every attempt)");
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Runs one attempt in a new actor and judges it.
    pub fn run(&self, attempt: Attempt) -> Result<AttemptResult, SelftestError> {
        let place = match attempt.place() {
            Place::App => "app",
            Place::Team => "team",
            Place::Uid => "uid",
            Place::Locked => "locked",
            Place::Nobody => "nobody",
        };
        let move_to = match attempt {
            Attempt::CgroupMoveOtherWorkload => Some(self.cgroups.path.join("other")),
            Attempt::CgroupMoveNoWorkload => Some(self.cgroups.path.join("nobody")),
            Attempt::CgroupMoveOutside => Some(self.cgroups.outside.clone()),
            _ => None,
        };
        if attempt == Attempt::HostnameEndpoint
            && let Err(why) = self.wait_resolved()
        {
            let report = ActorReport {
                result: format!("setup: {why}"),
                ..ActorReport::default()
            };
            return Ok(AttemptResult::judge(attempt, report, &[]));
        }
        let names = match attempt {
            Attempt::NetnsVeth => Some(self.veth.clone()),
            // A new address of this host that no endpoint names.
            Attempt::TcpConnectHostAddress => Some(VethNames::pick()),
            _ => None,
        };
        let veth = if let Some(names) = names {
            match Veth::create(&names, self.port) {
                Ok(v) => Some(v),
                Err(why) => {
                    let report = ActorReport {
                        result: "skipped".to_owned(),
                        skipped: Some(format!("no veth pair: {why}")),
                        ..ActorReport::default()
                    };
                    return Ok(AttemptResult::judge(attempt, report, &[]));
                }
            }
        } else {
            None
        };
        if attempt == Attempt::TcpConnectHostAddress
            && let Some(v) = &veth
            && let Err(why) = self.wait_local(v.plan.host_addr)
        {
            let report = ActorReport {
                result: format!("setup: {why}"),
                ..ActorReport::default()
            };
            return Ok(AttemptResult::judge(attempt, report, &[]));
        }
        let req = ActorRequest {
            role: Role::Attempt(attempt),
            cgroup: Some(self.cgroups.path.join(place)),
            api: self.dir.path.join("workload.sock"),
            admin: self.dir.path.join("admin.sock"),
            port: self.port,
            unlisted_port: self.unlisted_port,
            move_to,
            veth: veth.as_ref().map(|v| v.plan.clone()),
            carried_steps: Vec::new(),
        };
        let report = self.run_actor(attempt, &req, veth.as_ref())?;
        debug!(attempt = %attempt, result = %report.result, tgid = report.tgid, "actor done");
        let records = if report.skipped.is_some() {
            Vec::new()
        } else {
            self.records_for(attempt, report.tgid)
        };
        Ok(AttemptResult::judge(attempt, report, &records))
    }

    fn run_actor(
        &self,
        attempt: Attempt,
        req: &ActorRequest,
        veth: Option<&Veth>,
    ) -> Result<ActorReport, SelftestError> {
        let spawn_err = |source| SelftestError::Actor {
            attempt: attempt.name(),
            source,
        };
        let json = serde_json::to_string(req).map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let mut child = Command::new(&self.cfg.exe)
            .arg(ACTOR_SUBCOMMAND)
            .arg(json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let guard = KillOnDrop(child.id());
        let mut stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel::<String>();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = Instant::now() + ACTOR_TIMEOUT;
        let mut report = None;
        while report.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(pid) = v.get(NETNS_READY).and_then(Value::as_u64) {
                let answer = match veth.map(|v| v.give_peer_to(pid as u32)) {
                    Some(Ok(())) => "go".to_owned(),
                    Some(Err(e)) => e,
                    None => "no veth".to_owned(),
                };
                if let Some(stdin) = stdin.as_mut() {
                    let _ = writeln!(stdin, "{answer}");
                    let _ = stdin.flush();
                }
                continue;
            }
            report = serde_json::from_value::<ActorReport>(v).ok();
        }
        drop(stdin);
        drop(guard);
        let out = child.wait_with_output().map_err(spawn_err)?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Ok(report.unwrap_or_else(|| ActorReport {
            result: format!("setup: the actor gave no report ({}): {stderr}", out.status),
            tgid: 0,
            ..ActorReport::default()
        }))
    }

    /// The records of process `tgid` for the protected port; waits for the expected one.
    fn records_for(&self, attempt: Attempt, tgid: u32) -> Vec<Value> {
        let expected = attempt.expected().record;
        let port = attempt.record_port(self.port, self.unlisted_port);
        let deadline = Instant::now() + RECORD_TIMEOUT;
        loop {
            let records: Vec<Value> = self
                .read_log()
                .into_iter()
                .filter(|r| r["process"]["tgid"] == tgid && r["destination"]["port"] == port)
                .collect();
            let found = expected.is_none_or(|e| {
                records.iter().any(|r| {
                    r["verdict"] == e.verdict && r["reason"] == e.reason && r["hook"] == e.hook
                })
            });
            if found || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the agent reports [`HOSTNAME`] resolved to [`HOSTNAME_ADDR`]
    /// (`tessera status --json`).
    fn wait_resolved(&self) -> Result<(), String> {
        self.wait_status(
            &format!("the agent never resolved {HOSTNAME}"),
            "hosts",
            |status| {
                status["hosts"].as_array().is_some_and(|hosts| {
                    hosts.iter().any(|h| {
                        h["host"] == HOSTNAME
                            && h["addresses"].as_array().is_some_and(|a| {
                                a.iter().any(|a| a["ip"] == HOSTNAME_ADDR.to_string())
                            })
                    })
                })
            },
        )
    }

    /// Waits until the agent follows `addr`, a new address of this host, into its local
    /// endpoints (`tessera status`: `local_addresses`).
    fn wait_local(&self, addr: std::net::Ipv4Addr) -> Result<(), String> {
        let addr = addr.to_string();
        self.wait_status(
            &format!("the agent never protected the host address {addr}"),
            "local_addresses",
            |status| {
                status["local_addresses"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|a| *a == addr))
            },
        )
    }

    /// Polls `tessera status --json` until `done` holds for it (30 s at most); the error is
    /// `what` with the last `field` seen.
    fn wait_status(
        &self,
        what: &str,
        field: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = Command::new(&self.cfg.exe)
                .args(["status", "--json", "--admin-socket"])
                .arg(self.dir.path.join("admin.sock"))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("tessera status: {e}"))?;
            let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if done(&status) {
                return Ok(());
            }
            last = status[field].to_string();
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("{what}: {field} {last}"))
    }

    fn read_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.decision_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
