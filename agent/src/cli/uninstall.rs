//! `tessera uninstall`: remove the pinned programs, links and maps, ending enforcement.
//!
//! `tessera run` pins its programs in bpffs so that they keep enforcing while the agent is
//! stopped or restarting; this is how to end that for good (stop the agent first).
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::kernel;

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// Only the attach point of this cgroup (as `tessera run --cgroup` named it: a path under
    /// the cgroup v2 mount or relative to it). Default: every attach point.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

pub fn run(args: &UninstallArgs) -> ExitCode {
    let dir = match &args.cgroup {
        None => None,
        Some(cgroup) => match kernel::cgroup2_root() {
            Ok(root) => Some(kernel::pin_dir(&root, &absolute(cgroup, &root))),
            Err(e) => {
                eprintln!("tessera uninstall: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match kernel::uninstall(dir.as_deref()) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing pinned under {}", kernel::PIN_ROOT);
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for dir in removed {
                println!("removed {}", dir.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera uninstall: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The cgroup's path under `root` (it need not exist any more).
fn absolute(cgroup: &Path, root: &Path) -> PathBuf {
    if cgroup.starts_with(root) {
        cgroup.to_path_buf()
    } else {
        root.join(cgroup.strip_prefix("/").unwrap_or(cgroup))
    }
}
