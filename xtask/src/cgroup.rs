//! Scratch cgroups for the demo and the benchmark: created under the cgroup v2 root, removed on
//! drop (processes still inside are moved back to the root first).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// The cgroup v2 mount point, from /proc/self/mountinfo (never assumed).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount_point) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount_point));
        }
    }
    bail!("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
}

pub struct ScratchCgroup {
    path: PathBuf,
    root: PathBuf,
}

impl ScratchCgroup {
    /// Creates `<root>/<relative>`; refuses to reuse a cgroup that already has processes.
    pub fn create(relative: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let path = root.join(relative.trim_start_matches('/'));
        if path.exists() {
            let leftover = Self {
                path: path.clone(),
                root: root.clone(),
            };
            leftover.remove_tree().with_context(|| {
                format!(
                    "{} exists from an earlier run and cannot be removed",
                    path.display()
                )
            })?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, root })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a child cgroup (removed with its parent).
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let child = self.path.join(name);
        std::fs::create_dir_all(&child).with_context(|| format!("creating {}", child.display()))?;
        Ok(child)
    }

    fn remove_tree(&self) -> Result<()> {
        remove_recursive(&self.path, &self.root)
    }
}

fn remove_recursive(dir: &Path, root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_recursive(&entry.path(), root)?;
        }
    }
    // Move anything still inside back to the root so that rmdir can succeed.
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(root.join("cgroup.procs"), pid);
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_tree() {
            eprintln!("warning: {e:#}");
        }
    }
}
