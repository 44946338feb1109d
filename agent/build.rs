//! Builds the kernel programs (`tessera-ebpf`) with nightly and bpf-linker, through aya-build.
//! The object lands in OUT_DIR and is embedded in the agent with `aya::include_bytes_aligned!`.
//! Also generates the SPIFFE Workload API server (tonic/prost) from the vendored
//! `proto/spiffe/workload/workload.proto`, parsed by protox: no system `protoc` needed.
use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.join("proto");
    let proto = proto_dir.join("spiffe/workload/workload.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([&proto], [&proto_dir]).context("parsing workload.proto")?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(descriptors)
        .context("generating the Workload API server")?;

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
