//! Attestation: a process (by pidfd) to its evidence and workload; SPIFFE IDs.
pub mod attest;
pub mod spiffe;
