//! `cargo xtask image`: the agent's container image, assembled without a container runtime or a
//! base image: a root holding only `/usr/bin/tessera`, the shared libraries ldd names for it and
//! the directories the agent uses, packed as one uncompressed layer into an OCI image layout
//! (`target/image/oci/`, and `target/image/tessera-<version>.oci.tar` for `podman load` /
//! `skopeo copy oci-archive:…`). `deploy/image/Containerfile` builds the same image from
//! `target/image/rootfs` where a runtime is available. Entry point and arguments are the
//! Containerfile's.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Package this binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Where to write rootfs/, oci/ and the .oci.tar. [default: target/image]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

const ENTRYPOINT: &[&str] = &["/usr/bin/tessera"];
const CMD: &[&str] = &["run", "--config", "/etc/tessera/config.yaml"];
/// The directories the agent writes or the DaemonSet mounts over (the root is read-only there).
const DIRS: &[&str] = &[
    "etc/tessera",
    "run/tessera",
    "run/tessera-admin",
    "var/lib/tessera",
    "sys",
    "proc",
    "tmp",
];

pub fn run(args: &ImageArgs) -> Result<()> {
    let root = crate::workspace_root();
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            super::setup::run()?;
            super::setup::cargo(&super::build_args(true))?;
            root.join("target/release/tessera")
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/image"));
    let image = assemble(&binary, &out)?;
    check(&image)?;
    println!(
        "image: {} ({}), OCI archive {}, root for deploy/image/Containerfile {}",
        image.layout.display(),
        image.manifest_digest,
        image.archive.display(),
        image.rootfs.display()
    );
    Ok(())
}

/// What [`assemble`] wrote.
pub struct Image {
    pub rootfs: PathBuf,
    pub layout: PathBuf,
    pub archive: PathBuf,
    pub manifest_digest: String,
}

/// Writes `out/rootfs`, the OCI layout `out/oci` and its archive.
pub fn assemble(binary: &Path, out: &Path) -> Result<Image> {
    let rootfs = out.join("rootfs");
    let layout = out.join("oci");
    for dir in [&rootfs, &layout] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    for dir in DIRS {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    copy_into(&rootfs, "usr/bin/tessera", binary)?;
    for lib in super::kernels::initramfs::shared_libraries(binary)? {
        let rel = lib.to_string_lossy().trim_start_matches('/').to_owned();
        copy_into(&rootfs, &rel, &lib)?;
    }

    // The layer: the root, packed reproducibly.
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_tar = out.join("layer.tar");
    pack(&layer_tar, &rootfs)?;
    let layer = std::fs::read(&layer_tar)?;
    std::fs::remove_file(&layer_tar)?;
    let layer_digest = blob(&blobs, &layer)?;

    let version = env!("CARGO_PKG_VERSION");
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ENTRYPOINT,
            "Cmd": CMD,
            "Env": ["PATH=/usr/bin"],
            "User": "0:0",
            "Labels": {
                "org.opencontainers.image.title": "tessera",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.source": "https://github.com/tessera-dev/tessera",
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = blob(&blobs, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = blob(&blobs, &manifest)?;
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {
                    "org.opencontainers.image.ref.name": version,
                    "io.containerd.image.name": format!("ghcr.io/tessera-dev/tessera:{version}"),
                },
            }],
        }))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = out.join(format!("tessera-{version}.oci.tar"));
    pack(&archive, &layout)?;
    Ok(Image {
        rootfs,
        layout,
        archive,
        manifest_digest,
    })
}

/// Reads the image back from its layout as a runtime would (index → manifest → config and
/// layer, each by digest) and checks it: the entry point is the agent, nothing else executable
/// is in it (no shell), and — as root, in a chroot of the unpacked layer — the agent runs.
pub fn check(image: &Image) -> Result<()> {
    let blobs = image.layout.join("blobs/sha256");
    let read_blob = |digest: &str| -> Result<Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .context("digest without sha256:")?;
        let data = std::fs::read(blobs.join(hex)).with_context(|| format!("blob {digest}"))?;
        ensure!(
            sha256(&data) == digest,
            "blob {digest} does not match its digest"
        );
        Ok(data)
    };
    let index: Value = serde_json::from_slice(&std::fs::read(image.layout.join("index.json"))?)?;
    let manifest: Value = serde_json::from_slice(&read_blob(
        index["manifests"][0]["digest"]
            .as_str()
            .context("index without a manifest")?,
    )?)?;
    let config: Value = serde_json::from_slice(&read_blob(
        manifest["config"]["digest"]
            .as_str()
            .context("manifest without a config")?,
    )?)?;
    ensure!(
        config["config"]["Entrypoint"] == json!(ENTRYPOINT),
        "entry point: {config}"
    );
    ensure!(config["config"]["Cmd"] == json!(CMD), "arguments: {config}");
    let layers = manifest["layers"]
        .as_array()
        .context("manifest without layers")?;
    ensure!(layers.len() == 1, "one layer expected: {manifest}");
    let layer = read_blob(layers[0]["digest"].as_str().context("layer digest")?)?;
    ensure!(
        config["rootfs"]["diff_ids"][0] == json!(sha256(&layer)),
        "diff_id does not match the layer"
    );

    let unpacked = image
        .layout
        .parent()
        .unwrap_or(Path::new("."))
        .join("unpacked");
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)?;
    }
    std::fs::create_dir_all(&unpacked)?;
    let layer_tar = unpacked.with_extension("tar");
    std::fs::write(&layer_tar, &layer)?;
    super::checked(
        Command::new("tar")
            .arg("-xf")
            .arg(&layer_tar)
            .arg("-C")
            .arg(&unpacked),
    )?;
    std::fs::remove_file(&layer_tar)?;
    for shell in ["bin/sh", "usr/bin/sh", "bin/busybox"] {
        ensure!(
            !unpacked.join(shell).exists(),
            "the image has a shell: /{shell}"
        );
    }
    let agent = unpacked.join("usr/bin/tessera");
    ensure!(agent.is_file(), "the image has no /usr/bin/tessera");

    if !super::test::is_root() {
        println!("image: not root: the agent was not run in a chroot of the image");
    } else {
        // The documented use: the entry point with the DaemonSet's arguments. `--version` and
        // `run --help` prove the binary and its libraries load from the image alone.
        let out = Command::new("chroot")
            .arg(&unpacked)
            .args(ENTRYPOINT)
            .arg("--version")
            .output()
            .context("running chroot")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(env!("CARGO_PKG_VERSION")),
            "tessera --version in the image: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("chroot")
            .arg(&unpacked)
            .args(ENTRYPOINT)
            .args(["run", "--help"])
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--config"),
            "tessera run --help in the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&unpacked)?;
    Ok(())
}

/// A tar of `dir`'s contents with fixed owners, order and times: the same files give the same
/// bytes, so the same binary gives the same image digest.
fn pack(tar: &Path, dir: &Path) -> Result<()> {
    super::checked(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "--format=posix",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "-cf",
            ])
            .arg(tar)
            .arg("-C")
            .arg(dir)
            .arg("."),
    )
}

fn copy_into(rootfs: &Path, rel: &str, from: &Path) -> Result<()> {
    let to = rootfs.join(rel);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// Stores `data` under its digest; returns the digest.
fn blob(blobs: &Path, data: &[u8]) -> Result<String> {
    let digest = sha256(data);
    std::fs::write(blobs.join(&digest["sha256:".len()..]), data)?;
    Ok(digest)
}

fn sha256(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
