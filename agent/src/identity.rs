//! Attestation: a process (by pidfd) to its evidence and workload; SPIFFE IDs.
pub mod attest;
pub mod attestor;
pub mod evidence;
pub mod k8s;
pub mod peer;
pub mod selectors;
pub mod spiffe;
