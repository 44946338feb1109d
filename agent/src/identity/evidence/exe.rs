//! A process's executable: its path and its SHA-256, read through `/proc/PID/exe` itself.
//!
//! Opening `/proc/PID/exe` opens the very file the process runs, in the process's mount
//! namespace, even when it was deleted or replaced since: a path lookup in the agent's
//! namespace could hash another file. Hashes are cached by (device, inode, size, mtime, ctime);
//! ctime is in the key because a file's owner can set its mtime back, but not its ctime.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Executables larger than this are not hashed by default (the hash says `too_large`).
pub const DEFAULT_MAX_HASH_BYTES: u64 = 256 * 1024 * 1024;
/// Cached hashes; beyond it, an arbitrary entry makes room. A host runs far fewer binaries.
const MAX_CACHED: usize = 4096;

/// The SHA-256 of an executable, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ExeHash {
    /// Lower-case hex.
    Sha256 { sha256: String },
    /// Larger than the configured limit: not read, so a huge file cannot stall attestation.
    TooLarge { size: u64, limit: u64 },
    /// It could not be read (a kernel thread has no executable; or permission).
    Unavailable { reason: String },
    /// Not asked for: no workload of the policy selects by `exeSha256`.
    NotComputed,
}

impl ExeHash {
    /// The hex digest, if there is one.
    pub fn sha256(&self) -> Option<&str> {
        match self {
            ExeHash::Sha256 { sha256 } => Some(sha256),
            _ => None,
        }
    }
}

/// Identifies one version of one file: a changed file gets a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Executable hashes by file version, shared by every attestation.
#[derive(Debug)]
pub struct ExeHashCache {
    limit: u64,
    entries: Mutex<HashMap<FileKey, String>>,
}

impl Default for ExeHashCache {
    fn default() -> Self {
        ExeHashCache::new(DEFAULT_MAX_HASH_BYTES)
    }
}

impl ExeHashCache {
    /// `limit`: the largest executable, in bytes, that is hashed.
    pub fn new(limit: u64) -> Self {
        ExeHashCache {
            limit,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// How many hashes are cached.
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every hash (benchmarks measure the cold path with it).
    pub fn clear(&self) {
        if let Ok(mut e) = self.entries.lock() {
            e.clear();
        }
    }

    /// The hash of the file `/proc/<pid>/exe` opens. A process that is gone (or a kernel
    /// thread) has none: the caller's liveness check tells which.
    pub fn hash_of(&self, pid: u32) -> ExeHash {
        let path = PathBuf::from(format!("/proc/{pid}/exe"));
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => return unavailable(&e),
        };
        let before = match file.metadata() {
            Ok(m) => m,
            Err(e) => return unavailable(&e),
        };
        let key = FileKey::of(&before);
        if key.size > self.limit {
            return ExeHash::TooLarge {
                size: key.size,
                limit: self.limit,
            };
        }
        if let Some(hit) = self.entries.lock().ok().and_then(|e| e.get(&key).cloned()) {
            return ExeHash::Sha256 { sha256: hit };
        }
        let sha256 = match hash_file(&mut file, self.limit) {
            Ok(h) => h,
            Err(e) => return unavailable(&e),
        };
        // Cache it only if the file did not change while being read.
        let unchanged = file
            .metadata()
            .is_ok_and(|after| FileKey::of(&after) == key);
        if unchanged && let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_CACHED
                && let Some(evict) = entries.keys().next().copied()
            {
                entries.remove(&evict);
            }
            entries.insert(key, sha256.clone());
        }
        ExeHash::Sha256 { sha256 }
    }
}

/// The executable's path as the process's mount namespace names it (`readlink /proc/PID/exe`),
/// and whether it was deleted since the process started it. `None`: it has none (a kernel
/// thread, or the process is gone) or it may not be read.
pub fn exe_path(pid: u32) -> Option<(String, bool)> {
    let target = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = target.to_string_lossy().into_owned();
    Some(match text.strip_suffix(" (deleted)") {
        Some(path) => (path.to_owned(), true),
        None => (text, false),
    })
}

fn hash_file(file: &mut File, limit: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        // The file grew past the limit while being read.
        if total > limit {
            return Err(io::Error::other("the file grew past the hash size limit"));
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unavailable(e: &io::Error) -> ExeHash {
    ExeHash::Unavailable {
        reason: e.to_string(),
    }
}
