//! One kernel under qemu TCG: its initramfs (the shared base plus its modules), the boot with a
//! timeout, and the serial console read into an [`Outcome`] (kept in console.log).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::MODULES;
use super::initramfs::{self, Initramfs};
use super::outcome::{Outcome, record};

pub fn boot_one(
    label: &str,
    package: &str,
    vmlinuz: &Path,
    modules: &Path,
    base: &Initramfs,
    dir: &Path,
    timeout: u64,
) -> Result<Outcome> {
    std::fs::create_dir_all(dir)?;
    let mut fs = base.clone();
    match initramfs::modules(modules, MODULES) {
        Ok(list) => {
            for (name, data) in list {
                fs.file(&format!("lib/modules/{name}"), data, false);
            }
        }
        Err(e) => eprintln!("kernels: {label}: {e:#}; booting without modules"),
    }
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, fs.cpio())?;
    let console = dir.join("console.log");
    eprintln!(
        "kernels: {label}: booting {} under qemu TCG (console: {})",
        vmlinuz.display(),
        console.display()
    );
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "2G",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = std::fs::File::create(&console)?;
    let mut outcome = Outcome {
        label: label.to_owned(),
        package: package.to_owned(),
        ..Outcome::default()
    };
    let deadline = started + Duration::from_secs(timeout);
    let mut in_agent_log = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if line.contains("Kernel panic") {
                    outcome.problem = Some(line.trim().to_owned());
                }
                let Some(at) = line.find("KTEST ") else {
                    continue;
                };
                let rest = &line[at + "KTEST ".len()..];
                if rest.ends_with("-BEGIN") {
                    in_agent_log = true;
                } else if rest.ends_with("-END") {
                    in_agent_log = false;
                }
                if in_agent_log {
                    continue;
                }
                record(&mut outcome, rest, started.elapsed());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                outcome.problem = Some(format!(
                    "timed out after {timeout} s (see {})",
                    console.display()
                ));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    outcome.total = started.elapsed();
    if !outcome.summary && outcome.problem.is_none() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut stderr);
        }
        outcome.problem = Some(format!(
            "the VM ended ({status}) before the suite's summary: {} (see {})",
            stderr.trim(),
            console.display()
        ));
    }
    Ok(outcome)
}
