//! The matrix VM's initramfs: an uncompressed cpio archive (newc format, as the kernel reads
//! it), with busybox, the release `tessera`, the static `probe`, their shared libraries (from
//! ldd), the kernel's modules that the suite needs, /init and the suite.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// What an archive entry is.
#[derive(Clone)]
enum Node {
    Dir,
    File { data: Vec<u8>, exec: bool },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// Entries by path (without the leading `/`); parents are added as directories.
#[derive(Clone, Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

impl Initramfs {
    pub fn new() -> Self {
        let mut fs = Self::default();
        for dir in [
            "bin", "dev", "etc", "lib", "proc", "run", "sys", "tmp", "var/lib", "var/log",
        ] {
            fs.dir(dir);
        }
        // The kernel opens /dev/console for /init's stdio before anything is mounted.
        fs.insert("dev/console", Node::CharDev { major: 5, minor: 1 });
        fs.insert("dev/null", Node::CharDev { major: 1, minor: 3 });
        fs
    }

    fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.nodes
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            parent = p.parent();
        }
        self.nodes.insert(path, node);
    }

    pub fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, exec: bool) {
        self.insert(path, Node::File { data, exec });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_owned()));
    }

    /// Copies the host file `from` (symlinks followed) to `path`.
    pub fn copy(&mut self, path: &str, from: &Path, exec: bool) -> Result<()> {
        let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.file(path, data, exec);
        Ok(())
    }

    /// Copies the host executable `from` to `path`, with the shared libraries ldd names at
    /// the paths the dynamic loader looks for them.
    pub fn executable(&mut self, path: &str, from: &Path) -> Result<()> {
        self.copy(path, from, true)?;
        for lib in shared_libraries(from)? {
            let at = lib.to_string_lossy().into_owned();
            self.copy(&at, &lib, true)?;
        }
        Ok(())
    }

    /// The archive, in newc format.
    pub fn cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir => (0o040_755, &[], (0, 0)),
                Node::File { data, exec } => {
                    (if *exec { 0o100_755 } else { 0o100_644 }, data, (0, 0))
                }
                Node::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
                Node::CharDev { major, minor } => (0o020_600, &[], (*major, *minor)),
            };
            header(&mut out, ino, mode, data.len(), rdev, path);
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        header(&mut out, 0, 0, 0, (0, 0), "TRAILER!!!");
        out
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(size).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The libraries (and the loader) that ldd lists for `exe`; none for a static executable.
pub fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd (apt-get install libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd says "not a dynamic executable" (exit 1) for a static binary.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("{}: {}", exe.display(), line.trim());
        }
    }
    Ok(libs)
}

/// The kernel modules `names` (e.g. `veth`) with everything they depend on, in load order,
/// decompressed: (file name, contents). `modules` is the kernel's /lib/modules/<release>.
pub fn modules(modules: &Path, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = BTreeMap::new();
    index(modules, &mut files)?;
    let mut ordered = Vec::new();
    for name in names {
        add_module(name, &files, &mut ordered)?;
    }
    Ok(ordered)
}

fn index(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index(&path, files)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
            && let Some(module) = [".ko", ".ko.xz", ".ko.zst"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
        {
            files.insert(module.replace('-', "_"), path.clone());
        }
    }
    Ok(())
}

fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    ordered: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if ordered
        .iter()
        .any(|(n, _)| n.ends_with(&format!("-{name}.ko")))
    {
        return Ok(());
    }
    let path = files
        .get(&name)
        .with_context(|| format!("module {name} is not in this kernel's package"))?;
    let data = decompress(path)?;
    for dep in depends(&data) {
        add_module(&dep, files, ordered)?;
    }
    let file = format!("{:02}-{name}.ko", ordered.len());
    ordered.push((file, data));
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {name} (apt-get install xz-utils zstd)"))?;
    ensure!(out.status.success(), "{tool} -dc {name} failed");
    Ok(out.stdout)
}

/// The `depends=` of a module's .modinfo section.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut fs = Initramfs::default();
        fs.file("init", b"#!/bin/sh\n".to_vec(), true);
        let cpio = fs.cpio();
        assert!(cpio.starts_with(b"070701"));
        assert_eq!(cpio.len() % 4, 0);
        let trailer = cpio.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }

    #[test]
    fn depends_reads_the_modinfo_field() {
        let info = b"\0license=GPL\0depends=nf_conntrack,libcrc32c\0vermagic=6.1\0";
        assert_eq!(depends(info), ["nf_conntrack", "libcrc32c"]);
        assert!(depends(b"\0depends=\0").is_empty());
    }
}
