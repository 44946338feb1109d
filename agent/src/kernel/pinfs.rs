//! The bpffs side of pinning: where an attach point's pins live, how a cgroup path or revision
//! becomes one bpffs name, the program sets found there, and removing them.

use std::path::{Path, PathBuf};

use aya::programs::{
    links::{FdLink, PinnedLink},
    loaded_links,
};
use tracing::warn;

use super::KernelError;
use super::pin::{LINK_COUNT, PACKET_DROP_LINK_COUNT};

/// Where every attach point's directory lives.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tessera";

/// A program set found in an attach point's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SetDir {
    pub(super) path: PathBuf,
    pub(super) generation: u32,
    pub(super) revision: String,
    pub(super) complete: bool,
    /// Its links include the packet-drop programs'.
    pub(super) packet_drop: bool,
}

/// The bpffs directory of the attach point `cgroup` (a directory under `cgroup_root`).
pub fn pin_dir(cgroup_root: &Path, cgroup: &Path) -> PathBuf {
    let relative = cgroup.strip_prefix(cgroup_root).unwrap_or(cgroup);
    Path::new(PIN_ROOT).join(escape(&relative.to_string_lossy()))
}

/// A path or revision as one bpffs name: `[A-Za-z0-9_-]` kept, everything else `%XX` (bpffs
/// refuses dots in names). The root cgroup is `%2F`.
pub fn escape(text: &str) -> String {
    let trimmed = text.trim_matches('/');
    if trimmed.is_empty() {
        return "%2F".to_owned();
    }
    let mut out = String::with_capacity(trimmed.len());
    for byte in trimmed.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn unescape(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = name
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the pins (and so the links: enforcement stops) of one attach point, or of all of
/// them; returns the directories removed.
pub fn uninstall(dir: Option<&Path>) -> Result<Vec<PathBuf>, KernelError> {
    let root = Path::new(PIN_ROOT);
    let dirs = match dir {
        Some(dir) => vec![dir.to_path_buf()],
        None => match std::fs::read_dir(root) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(KernelError::Io {
                    path: root.to_path_buf(),
                    source,
                });
            }
        },
    };
    let mut removed = Vec::new();
    for dir in dirs {
        let links: Vec<u32> = list_sets(&dir)?
            .iter()
            .flat_map(|set| link_ids(&set.path))
            .collect();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(KernelError::Io { path: dir, source }),
        }
        wait_released(&links);
    }
    // Gone when it was the last attach point (fails harmlessly otherwise).
    let _ = std::fs::remove_dir(root);
    Ok(removed)
}

/// The program sets in an attach point's directory, by their `g<gen>-<revision>` names.
pub(super) fn list_sets(dir: &Path) -> Result<Vec<SetDir>, KernelError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KernelError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut sets = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((generation, revision)) = parse_set_name(&name) else {
            continue;
        };
        let links = std::fs::read_dir(entry.path())
            .map(|e| {
                e.flatten()
                    .filter(|f| f.file_name().to_string_lossy().starts_with("link-"))
                    .count()
            })
            .unwrap_or(0);
        sets.push(SetDir {
            path: entry.path(),
            generation,
            revision,
            complete: links == LINK_COUNT || links == PACKET_DROP_LINK_COUNT,
            packet_drop: links == PACKET_DROP_LINK_COUNT,
        });
    }
    sets.sort_by_key(|s| s.generation);
    Ok(sets)
}

pub(super) fn parse_set_name(name: &str) -> Option<(u32, String)> {
    let rest = name.strip_prefix('g')?;
    let (generation, revision) = rest.split_once('-')?;
    Some((generation.parse().ok()?, unescape(revision)))
}

/// Unpins a set (its links go with their last reference) and waits until they are released.
pub(super) fn remove_set(path: &Path) -> Result<(), KernelError> {
    let links = link_ids(path);
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KernelError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    wait_released(&links);
    Ok(())
}

/// The kernel ids of the links pinned in a set directory.
fn link_ids(set: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(set) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link-"))
        .filter_map(|e| PinnedLink::from_pin(e.path()).ok())
        .filter_map(|pinned| FdLink::from(pinned).info().ok().map(|i| i.id()))
        .collect()
}

/// The kernel frees an unpinned link asynchronously (after an RCU grace period and from a
/// work queue); until then its program still runs. Waits (a bounded while) until none of
/// `ids` is loaded, so that "removed" means "no longer enforcing".
fn wait_released(ids: &[u32]) {
    if ids.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let live = loaded_links()
            .filter_map(Result::ok)
            .any(|l| ids.contains(&l.id()));
        if !live {
            return;
        }
        if std::time::Instant::now() > deadline {
            warn!(links = ?ids, "unpinned links are still attached after 5 s");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_escape_to_one_name_and_back() {
        let dir = pin_dir(
            Path::new("/sys/fs/cgroup"),
            Path::new("/sys/fs/cgroup/tessera-test-1/app.slice"),
        );
        assert_eq!(
            dir,
            Path::new("/sys/fs/bpf/tessera/tessera-test-1%2Fapp%2Eslice")
        );
        assert_eq!(
            unescape("tessera-test-1%2Fapp%2Eslice"),
            "tessera-test-1/app.slice"
        );
        assert_eq!(escape("/"), "%2F");
    }

    #[test]
    fn set_names_carry_generation_and_revision() {
        let name = format!("g{:010}-{}", 42, escape("sha256:ab.c"));
        assert!(!name.contains('.') && !name.contains(':'));
        assert_eq!(parse_set_name(&name), Some((42, "sha256:ab.c".to_owned())));
        assert_eq!(parse_set_name("maps"), None);
    }
}
