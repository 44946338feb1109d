//! `cargo xtask bench`: runs the connect-path benchmark (agent/benches/connect.rs) as root.
use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/connect.json")]
    pub json: String,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    crate::setup::run()?;
    crate::setup::cargo(&[
        "bench",
        "--package",
        "tessera-agent",
        "--bench",
        "connect",
        "--",
        "--json",
        &args.json,
    ])
}
