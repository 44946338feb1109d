//! `tessera crds`: the CustomResourceDefinitions of `TesseraPolicy` and
//! `TesseraNamespacedPolicy`, generated from the policy types (`cargo xtask crds` writes them
//! under deploy/).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy::crd;

/// Print (or write) the CRDs of the policy custom resources.
#[derive(Debug, Clone, clap::Args)]
pub struct CrdsArgs {
    /// Write the YAML into this file instead of stdout; repeatable.
    #[arg(long = "out", value_name = "FILE")]
    pub out: Vec<PathBuf>,
}

pub fn run(args: &CrdsArgs) -> ExitCode {
    let yaml = crd::definitions_yaml();
    if args.out.is_empty() {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    for file in &args.out {
        if let Err(e) = std::fs::write(file, &yaml) {
            eprintln!("{}: cannot write the CRDs: {e}", file.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", file.display());
    }
    ExitCode::SUCCESS
}
