//! Debian kernel packages for the matrix, fetched with a private apt configuration (its own
//! sources.list, lists, cache and status under target/kernels/apt/<release>/) on the mirror the
//! host's apt sources name: nothing is installed, and the host's apt state is not touched.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// One kernel of the matrix: the Debian release that ships it and its image package's name.
pub struct KernelSpec {
    pub version: &'static str,
    pub release: &'static str,
    /// Matches the image package's name (an `apt-cache search --names-only` regex).
    pub package: &'static str,
}

pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        version: "5.10",
        release: "bullseye",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
    },
    KernelSpec {
        version: "6.1",
        release: "bookworm",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
    KernelSpec {
        version: "6.12",
        release: "bookworm",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
    },
];

/// Verifies the Debian archives the private sources.list names.
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A kernel unpacked under target/kernels/<version>/root.
pub struct Unpacked {
    pub package: String,
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    /// The `uname -r` of the kernel (the name of its /lib/modules directory).
    pub release: String,
}

/// The unpacked kernel, from the cache when it is there (`refresh`: fetch again).
pub fn kernel(spec: &KernelSpec, cache: &Path, refresh: bool) -> Result<Unpacked> {
    let dir = cache.join(spec.version);
    let root = dir.join("root");
    let stamp = dir.join("package");
    if !refresh
        && let Ok(package) = std::fs::read_to_string(&stamp)
        && let Ok(found) = unpacked(package.trim(), &root)
    {
        return Ok(found);
    }
    let apt = PrivateApt::new(spec.release, &cache.join("apt").join(spec.release))?;
    apt.update()?;
    let package = apt.newest(spec.package)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("kernels: {}: downloading {package}", spec.version);
    apt.download(&package, &dir)?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                dir.display()
            )
        })?;
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .context("running dpkg-deb (apt-get install dpkg)")?;
    ensure!(st.success(), "dpkg-deb -x {} failed", deb.display());
    // The package is 60-110 MB; what the matrix needs is the unpacked image and modules.
    std::fs::remove_file(&deb)?;
    std::fs::write(&stamp, &package)?;
    unpacked(&package, &root)
}

fn unpacked(package: &str, root: &Path) -> Result<Unpacked> {
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("{package} is not a linux-image package"))?
        .to_owned();
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    ensure!(vmlinuz.is_file(), "{} is missing", vmlinuz.display());
    Ok(Unpacked {
        package: package.to_owned(),
        root: root.to_owned(),
        vmlinuz,
        release,
    })
}

/// apt-get and apt-cache with every piece of state under `dir`.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(release: &str, dir: &Path) -> Result<Self> {
        let (debian, security) = host_mirrors();
        for sub in ["lists/partial", "cache/archives/partial", "parts", "prefs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let sources = format!(
            "deb [signed-by={KEYRING}] {debian} {release} main\n\
             deb [signed-by={KEYRING}] {debian} {release}-updates main\n\
             deb [signed-by={KEYRING}] {security} {release}-security main\n"
        );
        std::fs::write(dir.join("sources.list"), sources)?;
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            format!("-oDir::Etc::SourceParts={d}/parts"),
            format!("-oDir::Etc::PreferencesParts={d}/prefs"),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::State::Status={d}/status"),
            format!("-oDir::Cache={d}/cache"),
            "-oAPT::Architecture=amd64".into(),
            "-oDebug::NoLocking=1".into(),
            // The download goes to a directory that the _apt user cannot write.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    fn run(&self, tool: &str, args: &[&str], cwd: Option<&Path>) -> Result<String> {
        let mut cmd = Command::new(tool);
        cmd.args(self.options()).args(args);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {tool} (apt)"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn update(&self) -> Result<()> {
        self.run("apt-get", &["-qq", "update"], None).map(drop)
    }

    /// The newest package whose name matches `pattern` (by the numbers in its name).
    fn newest(&self, pattern: &str) -> Result<String> {
        let list = self.run("apt-cache", &["search", "--names-only", pattern], None)?;
        list.lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|name| numbers(name))
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "no package matches {pattern} in {} (see its sources.list)",
                    self.dir.display()
                )
            })
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        self.run("apt-get", &["-qq", "download", package], Some(into))
            .map(drop)
    }
}

/// The numbers in a package name, in order: 6.1.0-57 → [6, 1, 0, 57].
fn numbers(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The Debian mirror and the security mirror that the host's apt sources use (deb.debian.org
/// when they name none).
fn host_mirrors() -> (String, String) {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources")),
        );
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_owned));
            } else if line.starts_with("deb ") {
                uris.extend(
                    line.split_whitespace()
                        .skip(1)
                        .find(|w| w.contains("://"))
                        .map(str::to_owned),
                );
            }
        }
    }
    let trimmed = |u: &String| u.trim_end_matches('/').to_owned();
    let debian = uris
        .iter()
        .map(trimmed)
        .find(|u| u.ends_with("/debian"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let security = uris
        .iter()
        .map(trimmed)
        .find(|u| u.ends_with("/debian-security"))
        .unwrap_or_else(|| format!("{debian}-security"));
    (debian, security)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_is_chosen_by_its_numbers() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-42-amd64",
        ];
        assert_eq!(
            names.iter().max_by_key(|n| numbers(n)),
            Some(&"linux-image-6.1.0-57-amd64")
        );
        assert_eq!(
            numbers("linux-image-6.12.118+deb12-amd64"),
            [6, 12, 118, 12, 64]
        );
    }
}
