//! Host facts the loader needs: where cgroup v2, bpffs and tracefs are mounted, cgroup ids,
//! and the boot clock that grant expiries use.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::time::{ClockId, clock_gettime};
use tracing::info;

use super::KernelError;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const BPFFS: &str = "/sys/fs/bpf";
const TRACEFS: &str = "/sys/kernel/tracing";

/// A mount from /proc/self/mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    fs_type: String,
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts).
pub fn cgroup2_root() -> Result<PathBuf, KernelError> {
    mounts()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.point)
        .ok_or(KernelError::NoCgroup2)
}

/// The id the kernel gives the cgroup at `path` (what `bpf_get_current_cgroup_id` returns):
/// its inode number in cgroupfs.
pub fn cgroup_id(path: &Path) -> Result<u64, KernelError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| KernelError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Nanoseconds on CLOCK_BOOTTIME, the clock of `bpf_ktime_get_boot_ns`.
pub fn boot_time_ns() -> u64 {
    // CLOCK_BOOTTIME always exists on Linux; 0 would only make grants look expired.
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// Mounts bpffs and tracefs where they are absent (the process-exit tracepoint needs tracefs).
pub(super) fn ensure_mounted() -> Result<(), KernelError> {
    let mounts = mounts()?;
    for (fs, point) in [("bpf", BPFFS), ("tracefs", TRACEFS)] {
        if mounts
            .iter()
            .any(|m| m.fs_type == fs && m.point == Path::new(point))
        {
            continue;
        }
        mount(Some(fs), point, Some(fs), MsFlags::empty(), None::<&str>).map_err(|source| {
            KernelError::Mount {
                fs,
                path: PathBuf::from(point),
                source,
            }
        })?;
        info!(fs, path = point, "mounted");
    }
    Ok(())
}

fn mounts() -> Result<Vec<Mount>, KernelError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| KernelError::Io {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo lines: `id parent major:minor root point options [optional...] - type ...`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let point = fields.nth(4)?;
            let fs_type = fields.skip_while(|f| *f != "-").nth(1)?;
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(b) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
34 25 0:29 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
35 34 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
36 34 0:31 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
40 30 0:40 / /mnt/with\\040space rw shared:20 - tmpfs tmpfs rw";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mounts = parse_mountinfo(HYBRID);
        let cgroup2 = mounts.iter().find(|m| m.fs_type == "cgroup2");
        assert_eq!(
            cgroup2.map(|m| m.point.as_path()),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let mounts = parse_mountinfo(HYBRID);
        assert!(
            mounts
                .iter()
                .any(|m| m.point == Path::new("/mnt/with space"))
        );
    }

    #[test]
    fn boot_clock_moves_forward() {
        let a = boot_time_ns();
        let b = boot_time_ns();
        assert!(a > 0 && b >= a);
    }
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease` (`6.1.0-37-amd64`).
pub fn kernel_release() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&text)
}

fn parse_release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod release_tests {
    use super::parse_release;

    #[test]
    fn releases_parse_to_major_minor() {
        assert_eq!(parse_release("6.1.0-37-amd64\n"), Some((6, 1)));
        assert_eq!(parse_release("5.10.0-35-amd64"), Some((5, 10)));
        assert_eq!(parse_release("6.18.0"), Some((6, 18)));
        assert_eq!(parse_release("junk"), None);
    }
}
