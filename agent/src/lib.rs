//! Tessera's agent: policy, identity, credentials, kernel maps and the decision log.
#![forbid(unsafe_code)]

pub mod cli;
pub mod credential;
pub mod daemon;
pub mod decision;
pub mod identity;
pub mod kernel;
pub mod policy;
pub mod telemetry;
