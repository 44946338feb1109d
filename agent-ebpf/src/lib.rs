#![no_std]
// The eBPF programs live in the `tessera` binary (src/main.rs); this library target only exists
// so that agent/build.rs can depend on the crate and be rebuilt when it changes.
