//! The `tessera` command line: one file per subcommand, each with its clap `Args` and a `run`.
pub mod check;
pub mod logs;
