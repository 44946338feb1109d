//! The harness's fixtures: loopback servers, the scratch cgroups and directory, the agent
//! child, each removed (or stopped) on drop.

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::warn;

use super::super::SelftestError;
use super::super::policy::CHILDREN;

/// Kills an actor that outlived its timeout (by pid; it is our child).
pub(super) struct KillOnDrop(pub(super) u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        // Harmless when it already exited: we have not reaped it yet, so the pid is still ours.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// TCP on 127.0.0.1 and ::1 and UDP on both, on one port number; returns the port.
pub(super) fn start_servers() -> std::io::Result<u16> {
    let mut last = None;
    for _ in 0..50 {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = v4.local_addr()?.port();
        let bound = (|| {
            Ok::<_, std::io::Error>((
                TcpListener::bind((Ipv6Addr::LOCALHOST, port))?,
                UdpSocket::bind((Ipv4Addr::LOCALHOST, port))?,
                UdpSocket::bind((Ipv6Addr::LOCALHOST, port))?,
            ))
        })();
        let (v6, u4, u6) = match bound {
            Ok(b) => b,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        for l in [v4, v6] {
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    // Held open until the client's end goes: an attempt that writes on an open
                    // connection sees what the agent does to it, not a peer that left.
                    std::thread::spawn(move || {
                        let _ = c.write_all(b"hello\n");
                        let mut buf = [0u8; 512];
                        while matches!(std::io::Read::read(&mut c, &mut buf), Ok(n) if n > 0) {}
                    });
                }
            });
        }
        for u in [u4, u6] {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while u.recv_from(&mut buf).is_ok() {}
            });
        }
        return Ok(port);
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// A TCP listener at `addr:port` that accepts and drops (best effort: the attempt that needs
/// it fails visibly when it is missing).
pub(super) fn listen_at(addr: Ipv4Addr, port: u16) {
    if let Ok(l) = TcpListener::bind((addr, port)) {
        std::thread::spawn(move || for _c in l.incoming().flatten() {});
    }
}

/// The scratch cgroup, its children, and the sibling outside it.
pub(super) struct ScratchCgroups {
    pub(super) path: PathBuf,
    /// Relative to the cgroup v2 root, as the policy names it.
    pub(super) rel: String,
    pub(super) outside: PathBuf,
}

impl ScratchCgroups {
    pub(super) fn create(root: &Path, name: &str) -> Result<Self, SelftestError> {
        let path = root.join(name);
        let outside = root.join(format!("{name}-outside"));
        let me = Self {
            rel: format!("/{name}"),
            path,
            outside,
        };
        for dir in CHILDREN
            .iter()
            .map(|c| me.path.join(c))
            .chain([me.outside.clone()])
        {
            std::fs::create_dir_all(&dir).map_err(SelftestError::io("cannot create", dir))?;
        }
        Ok(me)
    }
}

impl Drop for ScratchCgroups {
    fn drop(&mut self) {
        let dirs: Vec<PathBuf> = CHILDREN
            .iter()
            .map(|c| self.path.join(c))
            .chain([self.path.clone(), self.outside.clone()])
            .collect();
        for dir in &dirs {
            remove_cgroup(dir);
        }
    }
}

/// Kills what is left in one of our cgroups (only our actors can be there) and removes it.
fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            warn!(pid, cgroup = %dir.display(), "killing a leftover self-test process");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    warn!(cgroup = %dir.display(), "could not remove a self-test cgroup");
}

/// A private directory for the policy, sockets, state and logs (0700); removed on drop.
pub(super) struct ScratchDir {
    pub(super) path: PathBuf,
}

impl ScratchDir {
    pub(super) fn create(name: &str) -> Result<Self, SelftestError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(SelftestError::io("cannot create", &path))?;
        Ok(Self { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `tessera run` attached to the scratch cgroup; SIGTERM (it detaches) then wait, on drop.
pub(super) struct AgentChild {
    child: Child,
    /// The agent's bpffs directory for this attach point, removed after it stopped in case
    /// anything was left pinned.
    pins: PathBuf,
}

/// Where the agent pins its programs, one directory per attach point.
const PIN_ROOT: &str = "/sys/fs/bpf/tessera";

impl AgentChild {
    pub(super) fn start(
        exe: &Path,
        policy: &Path,
        cgroup: &Path,
        dir: &Path,
        dns_server: &str,
    ) -> Result<Self, SelftestError> {
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)
            .map_err(SelftestError::io("cannot create", &log_path))?;
        let mut cmd = Command::new(exe);
        // The operator's TESSERA_* settings (a mode, a config file, allow aggregation) must not
        // change what the self-test observes.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TESSERA_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            // Detach on stop (nothing stays pinned for a cgroup that is about to go), and no
            // metrics listener that would clash with the host's agent.
            .env("TESSERA_FAIL_OPEN", "true")
            .env("TESSERA_METRICS_ADDR", "off")
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--api-socket")
            .arg(dir.join("workload.sock"))
            .arg("--admin-socket")
            .arg(dir.join("admin.sock"))
            .arg("--decision-log")
            .arg(dir.join("decisions.jsonl"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--dns-server")
            .arg(dns_server)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| SelftestError::AgentSpawn {
                path: exe.to_owned(),
                source,
            })?;
        let pins = cgroup
            .file_name()
            .map(|n| Path::new(PIN_ROOT).join(n))
            .unwrap_or_default();
        let mut agent = Self { child, pins };
        // Loading the programs takes tens of seconds on older kernels under emulation (6.1 under
        // qemu TCG: 11 s on a quiet machine, 44 s on a busy one): wait long, fail only on a hang.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(dir.join("workload.sock").exists() && dir.join("admin.sock").exists()) {
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(SelftestError::AgentExited(status, log()));
            }
            if Instant::now() > deadline {
                return Err(SelftestError::AgentTimeout(log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        self.stop();
        if self.pins.starts_with(PIN_ROOT) && self.pins != Path::new(PIN_ROOT) {
            let _ = std::fs::remove_dir_all(&self.pins);
        }
    }
}

impl AgentChild {
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
