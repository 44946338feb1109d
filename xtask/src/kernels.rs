//! `cargo xtask kernels [VERSION...]`: the kernel matrix. Boots each Debian kernel (5.10 from
//! bullseye, 6.1 and 6.12 from bookworm; fetched into target/kernels/, never installed) under
//! qemu TCG with an initramfs of busybox, the release `tessera` and a static probe, runs
//! xtask/kernels/suite.sh inside, and prints one line per kernel from the suite's
//! `KTEST` console lines. Exits non-zero when any kernel fails a check.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

mod debian;
pub mod initramfs;
mod outcome;
mod qemu;

use initramfs::Initramfs;
use outcome::Outcome;
use qemu::boot_one;

#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Kernels to boot (default: 5.10 6.1 6.12); `host` boots /boot/vmlinuz-$(uname -r) when
    /// the host has one.
    pub versions: Vec<String>,
    /// Longest time one kernel's VM may run, in seconds (under TCG loading the programs on an
    /// old kernel takes about a minute).
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Fetch the kernel packages again (the newest of each line) instead of using the cache.
    #[arg(long)]
    pub refresh: bool,
}

/// Modules the suite needs that Debian builds as modules: veth (the self-test's netns attempt)
/// and unix_diag (peer-socket lookups of the Workload API's attestation without SO_PEERPIDFD),
/// tcp_diag and udp_diag (the agent finds and ends connections whose credential ended over
/// inet sock_diag; a real system loads them on demand, the VM has no modprobe).
const MODULES: &[&str] = &["veth", "unix_diag", "tcp_diag", "udp_diag"];

/// Kernel options the agent needs built in (`=y`): a `=m` or a missing one is reported before
/// the kernel is booted.
const REQUIRED_CONFIG: &[&str] = &[
    "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_JIT",
    "CONFIG_CGROUPS",
    "CONFIG_CGROUP_BPF",
    "CONFIG_BPF_EVENTS",
    "CONFIG_TRACEPOINTS",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_IPV6",
    "CONFIG_UNIX",
    "CONFIG_NET_NS",
];

const INIT: &str = include_str!("../kernels/init");
const SUITE: &str = include_str!("../kernels/suite.sh");
const PROBE_C: &str = "xtask/kernels/probe.c";

/// The policy the suite enforces (ports and names as suite.sh uses them).
const POLICY: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: kernels
spec:
  trustDomain: kernels.tessera.dev
  mode: enforce
  workloads:
    - name: app
      spiffeId: spiffe://kernels.tessera.dev/app
      match:
        cgroup: /tessera-vm/app
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [8200]
      protocol: tcp
    - name: dns
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [8200]
      protocol: udp
    - name: tree
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [8201]
      protocol: tcp
    - name: shared
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [8202]
      protocol: tcp
  rules:
    - name: app-to-vault
      workloads: [app]
      endpoints: [vault, dns]
      credential: { required: true, maxTtl: 10m, bind: process }
    - name: app-to-tree
      workloads: [app]
      endpoints: [tree]
      credential: { required: true, maxTtl: 10m, bind: process-tree }
    - name: app-to-shared
      workloads: [app]
      endpoints: [shared]
      credential: { required: true, maxTtl: 10m, bind: workload }
"#;

pub fn run(args: &KernelsArgs) -> Result<()> {
    let root = crate::workspace_root();
    let versions: Vec<String> = if args.versions.is_empty() {
        debian::MATRIX
            .iter()
            .map(|k| k.version.to_owned())
            .collect()
    } else {
        args.versions.clone()
    };
    for v in &versions {
        ensure!(
            v == "host" || debian::MATRIX.iter().any(|k| k.version == *v),
            "unknown kernel {v}: choose from {} or host",
            debian::MATRIX
                .iter()
                .map(|k| k.version)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    ensure_host_packages()?;
    crate::setup::run()?;
    crate::setup::cargo(&["build", "--release", "--package", "tessera-agent", "--bins"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let cache = target.join("kernels");
    std::fs::create_dir_all(&cache)?;
    let tessera = target.join("release/tessera");
    check_policy(&tessera, &cache)?;
    let probe = build_probe(&root, &cache)?;
    let base = base_initramfs(&tessera, &probe)?;

    let mut outcomes = Vec::new();
    for version in &versions {
        let outcome = if version == "host" {
            match host_kernel() {
                Some((vmlinuz, modules)) => {
                    let release = uname_r();
                    boot_one(
                        &format!("host {release}"),
                        &format!("/boot/vmlinuz-{release}"),
                        &vmlinuz,
                        &modules,
                        &base,
                        &cache.join("host"),
                        args.timeout,
                    )?
                }
                None => {
                    println!(
                        "kernel host ({}): not booted: no /boot/vmlinuz-{0} on this host; the \
                         host kernel is covered by `cargo xtask test`",
                        uname_r()
                    );
                    continue;
                }
            }
        } else {
            let spec = debian::MATRIX
                .iter()
                .find(|k| k.version == *version)
                .context("checked above")?;
            let kernel = debian::kernel(spec, &cache, args.refresh)?;
            let config = kernel.root.join(format!("boot/config-{}", kernel.release));
            if let Err(e) = check_config(&config) {
                let outcome = Outcome {
                    label: spec.version.to_owned(),
                    package: kernel.package.clone(),
                    problem: Some(format!("{e:#}")),
                    ..Outcome::default()
                };
                println!("{}", outcome.line());
                outcomes.push(outcome);
                continue;
            }
            let modules = kernel.root.join("lib/modules").join(&kernel.release);
            boot_one(
                spec.version,
                &kernel.package,
                &kernel.vmlinuz,
                &modules,
                &base,
                &cache.join(spec.version),
                args.timeout,
            )?
        };
        outcomes.push(outcome);
    }
    println!();
    for o in &outcomes {
        for f in &o.failed {
            println!("  {} FAIL {f}", o.label);
        }
        if !o.verifier.is_empty() {
            let counts: Vec<String> = o
                .verifier
                .iter()
                .map(|(p, n)| format!("{} {n}", p.trim_start_matches("tessera_")))
                .collect();
            println!("  {} verifier instructions: {}", o.label, counts.join(", "));
        }
        println!("{}", o.line());
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the suite failed on kernel(s) {}", failed.join(", "));
    }
    Ok(())
}

/// busybox-static, qemu-system-x86 and a C compiler with a static libc: installed when missing.
fn ensure_host_packages() -> Result<()> {
    let mut missing = Vec::new();
    if !is_static(Path::new("/bin/busybox")) {
        missing.push("busybox-static");
    }
    if !on_path("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !on_path("cc") {
        missing.push("gcc");
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        missing.push("libc6-dev");
    }
    if !on_path("xz") {
        missing.push("xz-utils");
    }
    if !Path::new(debian::KEYRING).exists() {
        missing.push("debian-archive-keyring");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("kernels: installing {}", missing.join(" "));
    let st = Command::new("apt-get")
        .args(["-qq", "update"])
        .status()
        .context("running apt-get")?;
    ensure!(st.success(), "apt-get update failed");
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .status()
        .context("running apt-get")?;
    ensure!(
        st.success(),
        "apt-get install {} failed: install them by hand",
        missing.join(" ")
    );
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A static executable: ldd refuses it.
fn is_static(exe: &Path) -> bool {
    exe.is_file()
        && Command::new("ldd")
            .arg(exe)
            .output()
            .is_ok_and(|o| !o.status.success())
}

fn uname_r() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn host_kernel() -> Option<(PathBuf, PathBuf)> {
    let release = uname_r();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    vmlinuz
        .is_file()
        .then(|| (vmlinuz, PathBuf::from(format!("/lib/modules/{release}"))))
}

/// Every option of [`REQUIRED_CONFIG`] is `=y` in the kernel's /boot/config-*.
fn check_config(config: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or("not set")
    };
    let wrong: Vec<String> = REQUIRED_CONFIG
        .iter()
        .filter(|name| value(name) != "y")
        .map(|name| format!("{name}={}", value(name)))
        .collect();
    ensure!(
        wrong.is_empty(),
        "{}: the agent needs these built in: {} (a module must be added to MODULES and loaded by /init)",
        config.display(),
        wrong.join(", ")
    );
    Ok(())
}

/// The suite's policy must be valid for this build (else every kernel would fail alike).
fn check_policy(tessera: &Path, cache: &Path) -> Result<()> {
    let policy = cache.join("kernels.yaml");
    std::fs::write(&policy, POLICY)?;
    let out = Command::new(tessera)
        .arg("check")
        .arg(&policy)
        .output()
        .with_context(|| format!("running {} check", tessera.display()))?;
    ensure!(
        out.status.success(),
        "the suite's policy is refused by tessera check: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn build_probe(root: &Path, cache: &Path) -> Result<PathBuf> {
    let probe = cache.join("probe");
    let st = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&probe)
        .arg(root.join(PROBE_C))
        .status()
        .context("running cc")?;
    ensure!(st.success(), "cc -static {PROBE_C} failed");
    Ok(probe)
}

/// Everything but the kernel's modules.
fn base_initramfs(tessera: &Path, probe: &Path) -> Result<Initramfs> {
    let mut fs = Initramfs::new();
    fs.file("init", INIT.as_bytes().to_vec(), true);
    fs.file("suite.sh", SUITE.as_bytes().to_vec(), false);
    fs.copy("bin/busybox", Path::new("/bin/busybox"), true)?;
    fs.symlink("bin/sh", "busybox");
    fs.executable("bin/tessera", tessera)?;
    fs.copy("bin/probe", probe, true)?;
    // The self-test's netns attempt runs `ip link add ... type veth` (busybox's ip cannot).
    match ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    {
        Some(ip) => fs.executable("usr/sbin/ip", ip)?,
        None => eprintln!(
            "kernels: no iproute2 `ip` on the host: the self-test's netns attempt cannot run"
        ),
    }
    fs.file(
        "etc/tessera/kernels.yaml",
        POLICY.as_bytes().to_vec(),
        false,
    );
    fs.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
        false,
    );
    fs.file(
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        false,
    );
    fs.file(
        "etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        false,
    );
    fs.file("etc/resolv.conf", b"nameserver 127.0.0.1\n".to_vec(), false);
    Ok(fs)
}
