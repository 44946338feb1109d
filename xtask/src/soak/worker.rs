//! `xtask soak-worker`: one process of a soak workload. It connects (TCP and UDP, IPv4, IPv6
//! and v4-mapped) to the soak's endpoints, asks for and ends credentials, forks children that
//! do the same and execs itself, and checks every verdict the kernel gives against its model.
//! Its totals go to stdout as one `stats ...` line; wrong verdicts to stderr.
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::model::{Cred, Model, Rng, TARGETS, Target, Valid, now_ms, parse_rfc3339};

#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    /// The Workload API socket.
    #[arg(long)]
    api: PathBuf,
    /// Ports of vault, tree, shared, open, closed and an unprotected one, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    /// Connects to make (this process and its children together).
    #[arg(long)]
    connects: u64,
    #[arg(long)]
    seed: u64,
    /// 0 for a workload's first process; children are 1, their children 2.
    #[arg(long, default_value_t = 0)]
    depth: u32,
    /// Wait for a line on stdin before starting (the orchestrator moves the process into its
    /// cgroup first).
    #[arg(long)]
    wait: bool,
    /// The model and totals carried over an exec or a fork.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    stats: Option<String>,
}

/// What a process did and found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub connects: u64,
    pub checked: u64,
    pub wrong: u64,
    pub allowed: u64,
    pub issued: u64,
    pub ended: u64,
    pub expired_waits: u64,
    pub forks: u64,
    pub execs: u64,
    pub api_errors: u64,
}

impl Stats {
    const FIELDS: usize = 10;

    fn values(&self) -> [u64; Self::FIELDS] {
        [
            self.connects,
            self.checked,
            self.wrong,
            self.allowed,
            self.issued,
            self.ended,
            self.expired_waits,
            self.forks,
            self.execs,
            self.api_errors,
        ]
    }

    pub fn encode(&self) -> String {
        self.values().map(|v| v.to_string()).join(",")
    }

    pub fn decode(text: &str) -> Option<Stats> {
        let v: Vec<u64> = text
            .split(',')
            .map(|s| s.parse().ok())
            .collect::<Option<_>>()?;
        let [
            connects,
            checked,
            wrong,
            allowed,
            issued,
            ended,
            expired_waits,
            forks,
            execs,
            api_errors,
        ] = v.try_into().ok()?;
        Some(Stats {
            connects,
            checked,
            wrong,
            allowed,
            issued,
            ended,
            expired_waits,
            forks,
            execs,
            api_errors,
        })
    }

    pub fn add(&mut self, o: &Stats) {
        self.connects += o.connects;
        self.checked += o.checked;
        self.wrong += o.wrong;
        self.allowed += o.allowed;
        self.issued += o.issued;
        self.ended += o.ended;
        self.expired_waits += o.expired_waits;
        self.forks += o.forks;
        self.execs += o.execs;
        self.api_errors += o.api_errors;
    }
}

/// Wrong verdicts printed per process, at most.
const REPORT_WRONG: u64 = 20;

pub fn run(args: &WorkerArgs) -> Result<()> {
    if args.ports.len() != TARGETS.len() {
        bail!("--ports needs {} ports", TARGETS.len());
    }
    if args.wait {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
    }
    let mut model = match &args.model {
        Some(m) => Model::decode(m).context("bad --model")?,
        None => Model::default(),
    };
    let mut stats = match &args.stats {
        Some(s) => Stats::decode(s).context("bad --stats")?,
        None => Stats::default(),
    };
    let mut rng = Rng(args.seed | 1);
    while stats.connects < args.connects {
        let roll = rng.below(10_000);
        match roll {
            0..120 => issue(args, &mut model, &mut stats, Target::Vault, &mut rng),
            120..200 => issue(args, &mut model, &mut stats, Target::Tree, &mut rng),
            200..260 if args.depth == 0 => {
                issue(args, &mut model, &mut stats, Target::Shared, &mut rng);
            }
            260..360 => end(args, &mut model, &mut stats, &mut rng),
            360..365 if args.depth < 2 => fork(args, &model, &mut stats, &mut rng)?,
            365..367 if rng.below(2) == 0 => {
                // An exec keeps the pid: this image's `bind: process` grants end there.
                stats.execs += 1;
                model.exec();
                let mut next = args.clone();
                next.seed = rng.next();
                next.wait = false;
                next.model = Some(model.encode());
                next.stats = Some(stats.encode());
                let err = Command::new(std::env::current_exe()?)
                    .args(worker_argv(&next))
                    .exec();
                bail!("exec failed: {err}");
            }
            _ => connect(args, &model, &mut stats, &mut rng),
        }
    }
    println!("stats {}", stats.encode());
    Ok(())
}

fn worker_argv(a: &WorkerArgs) -> Vec<String> {
    let mut v = vec![
        "soak-worker".to_owned(),
        "--api".to_owned(),
        a.api.display().to_string(),
        "--ports".to_owned(),
        a.ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--connects".to_owned(),
        a.connects.to_string(),
        "--seed".to_owned(),
        a.seed.to_string(),
        "--depth".to_owned(),
        a.depth.to_string(),
    ];
    if a.wait {
        v.push("--wait".to_owned());
    }
    // `--model=` form: a model line may start with `-` (no credential), which clap would
    // take for a flag.
    if let Some(m) = &a.model {
        v.push(format!("--model={m}"));
    }
    if let Some(s) = &a.stats {
        v.push(format!("--stats={s}"));
    }
    v
}

/// A connect to a random endpoint over a random family and protocol, checked.
fn connect(args: &WorkerArgs, model: &Model, stats: &mut Stats, rng: &mut Rng) {
    let i = rng.below(TARGETS.len() as u64) as usize;
    let target = TARGETS[i];
    let port = args.ports[i];
    let addr = match rng.below(10) {
        0..7 => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        7..9 => SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        _ => SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port)),
    };
    let tcp = rng.below(8) == 0;
    let expected = loop {
        match model.allowed(target, now_ms()) {
            Valid::Yes => break true,
            Valid::No => break false,
            Valid::WaitMs(ms) => {
                stats.expired_waits += 1;
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    };
    let allowed = if tcp {
        tcp_connect(addr)
    } else {
        udp_connect(addr)
    };
    stats.connects += 1;
    stats.checked += 1;
    stats.allowed += u64::from(allowed);
    if allowed != expected {
        stats.wrong += 1;
        if stats.wrong <= REPORT_WRONG {
            eprintln!(
                "WRONG pid {} {} {addr} ({}): {} but the model says {} (model {})",
                std::process::id(),
                if tcp { "tcp" } else { "udp" },
                target.audience(),
                if allowed { "allowed" } else { "denied" },
                if expected { "allow" } else { "deny" },
                model.encode()
            );
        }
    }
}

/// Whether the kernel let the connect through (anything but EPERM: a refused TCP connect to a
/// port nobody listens on was allowed).
fn tcp_connect(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc_eperm()),
    }
}

fn udp_connect(addr: SocketAddr) -> bool {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(socket) = UdpSocket::bind(local) else {
        return true;
    };
    match socket.connect(addr) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() != Some(libc_eperm()),
    }
}

const fn libc_eperm() -> i32 {
    1
}

/// Asks for a credential for `target` with a TTL of 1 to 3 s.
fn issue(args: &WorkerArgs, model: &mut Model, stats: &mut Stats, target: Target, rng: &mut Rng) {
    let ttl = 1 + rng.below(3);
    let body = format!(
        r#"{{"audience":"{}","ttl_seconds":{ttl}}}"#,
        target.audience()
    );
    let Some((200, answer)) = http(&args.api, "POST", "/v1/credentials", &body) else {
        stats.api_errors += 1;
        return;
    };
    let (Some(jti), Some(exp)) = (
        json_string(&answer, "jti"),
        json_string(&answer, "expires_at").and_then(|t| parse_rfc3339(&t)),
    ) else {
        stats.api_errors += 1;
        return;
    };
    stats.issued += 1;
    let cred = Some(Cred {
        jti,
        exp,
        revoked: false,
    });
    match target {
        Target::Vault => model.vault = cred,
        Target::Tree => {
            model.tree = cred;
            model.tree_own = true;
        }
        Target::Shared => model.shared = cred,
        _ => {}
    }
}

/// Ends one of the credentials this process may end (`DELETE`): its own vault or tree one,
/// or (the workload's first process) the workload's.
fn end(args: &WorkerArgs, model: &mut Model, stats: &mut Stats, rng: &mut Rng) {
    let slot = match rng.below(3) {
        0 => &mut model.vault,
        1 if model.tree_own => &mut model.tree,
        2 if args.depth == 0 => &mut model.shared,
        _ => return,
    };
    let Some(cred) = slot.as_mut() else {
        return;
    };
    match http(
        &args.api,
        "DELETE",
        &format!("/v1/credentials/{}", cred.jti),
        "",
    ) {
        Some((200, _)) => {
            cred.revoked = true;
            stats.ended += 1;
        }
        // An expired credential may be pruned from the registry already.
        Some((404, _)) if cred.exp * 1000 <= now_ms() => cred.revoked = true,
        _ => stats.api_errors += 1,
    }
}

/// Forks (and execs) a child that does a few hundred connects with a copy of the tree grant,
/// and waits for it.
fn fork(args: &WorkerArgs, model: &Model, stats: &mut Stats, rng: &mut Rng) -> Result<()> {
    let mut child_args = args.clone();
    child_args.connects = 100 + rng.below(900);
    child_args.seed = rng.next();
    child_args.depth = args.depth + 1;
    child_args.wait = false;
    child_args.model = Some(model.forked().encode());
    child_args.stats = None;
    let out = Command::new(std::env::current_exe()?)
        .args(worker_argv(&child_args))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .output()
        .context("running a child worker")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let child = text
        .lines()
        .find_map(|l| l.strip_prefix("stats "))
        .and_then(Stats::decode)
        .with_context(|| format!("a child worker ended without its stats ({})", out.status))?;
    stats.forks += 1;
    stats.add(&child);
    Ok(())
}

/// One HTTP/1.1 request on the Workload API: (status, body).
fn http(socket: &Path, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut conn = UnixStream::connect(socket).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The string value of `"key":"..."` in a flat JSON object without escapes in that value.
fn json_string(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = &json[at..];
    Some(rest[..rest.find('"')?].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_round_trip_and_json_fields_are_found() {
        let s = Stats {
            connects: 1,
            checked: 2,
            wrong: 3,
            allowed: 4,
            issued: 5,
            ended: 6,
            expired_waits: 7,
            forks: 8,
            execs: 9,
            api_errors: 10,
        };
        assert_eq!(
            Stats::decode(&s.encode()).map(|d| d.values()),
            Some(s.values())
        );
        let body = r#"{"token":"x.y.z","jti":"0193-ab","expires_at":"2026-12-03T18:20:00Z"}"#;
        assert_eq!(json_string(body, "jti").as_deref(), Some("0193-ab"));
        assert_eq!(json_string(body, "bind"), None);
    }
}
