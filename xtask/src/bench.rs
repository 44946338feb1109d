//! `cargo xtask bench`: runs the connect-path benchmark (agent/benches/connect.rs) as root, then
//! the attestation benchmark (agent/benches/attest.rs).
use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/connect.json")]
    pub json: String,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    crate::setup::run()?;
    // cargo runs the benchmark in agent/: hand it an absolute path.
    let json = crate::workspace_root().join(&args.json);
    let json = json
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("the --json path is not UTF-8"))?;
    crate::setup::cargo(&[
        "bench",
        "--package",
        "tessera-agent",
        "--bench",
        "connect",
        "--",
        "--json",
        json,
    ])?;
    // Attestation cost per process (agent/benches/attest.rs), beside the connect results.
    let attest_json = crate::workspace_root().join("target/bench/attest.json");
    let attest_json = attest_json
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("the workspace path is not UTF-8"))?;
    crate::setup::cargo(&[
        "bench",
        "--package",
        "tessera-agent",
        "--bench",
        "attest",
        "--",
        "--json",
        attest_json,
    ])
}
