//! Tessera's agent: policy, identity, credentials, kernel maps and the decision log.
// deny, not forbid: selftest/syscalls.rs (io_uring submissions, fork) alone allows it.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod credential;
pub mod daemon;
pub mod decision;
pub mod files;
pub mod identity;
pub mod k8s_policies;
pub mod kernel;
pub mod located;
pub mod metrics;
pub mod policy;
pub mod resolve;
pub mod selftest;
pub mod telemetry;
#[doc(hidden)]
pub mod testkit;
