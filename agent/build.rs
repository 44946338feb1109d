//! Builds the kernel programs (`tessera-ebpf`) with nightly and bpf-linker, through aya-build.
//! The object lands in OUT_DIR and is embedded in the agent with `aya::include_bytes_aligned!`.
use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../agent-ebpf");
    let root_dir = root_dir
        .to_str()
        .context("the path of agent-ebpf is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "tessera-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` (nightly rust-src, bpf-linker)",
    )
}
