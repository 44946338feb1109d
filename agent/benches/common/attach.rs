//! For the benchmarks that attach programs themselves (connect, packets): a scratch cgroup,
//! and a program's mean run time from the kernel's statistics.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use tessera_agent::kernel;

use crate::common::mean_run_ns;

/// The mean run time of program `name` between two readings of the programs' statistics.
pub fn per_run(before: &[kernel::ProgramStats], after: &[kernel::ProgramStats], name: &str) -> f64 {
    let find = |s: &[kernel::ProgramStats]| {
        s.iter()
            .find(|p| p.name == name)
            .map(|p| (p.run_count, p.run_time_ns))
            .unwrap_or((0, 0))
    };
    mean_run_ns(find(before), find(after))
}

/// `<cgroup2>/tessera-bench-<pid>`: this process moves in for the measurement and back out;
/// removed on drop.
pub struct BenchCgroup {
    pub path: PathBuf,
    pub rel: String,
    root: PathBuf,
}

impl BenchCgroup {
    pub fn create(root: &Path) -> Result<Self> {
        let rel = format!("/tessera-bench-{}", std::process::id());
        let path = root.join(&rel[1..]);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            rel,
            root: root.to_path_buf(),
        })
    }

    pub fn enter(&self) -> Result<()> {
        std::fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )?;
        Ok(())
    }

    pub fn leave(&self) -> Result<()> {
        std::fs::write(
            self.root.join("cgroup.procs"),
            std::process::id().to_string(),
        )?;
        Ok(())
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = self.leave();
        let _ = std::fs::remove_dir(&self.path);
    }
}
