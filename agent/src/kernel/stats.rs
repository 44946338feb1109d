//! Run-time statistics of the loaded programs (`kernel.bpf_stats_enabled`).

use std::os::fd::OwnedFd;

use aya::{
    Ebpf,
    sys::{Stats, enable_stats},
};

use super::KernelError;

/// One program's counters since it was loaded (while stats were enabled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Instructions the verifier processed when it loaded the program (`verified_insns`,
    /// Linux 5.16 and later; `None` before).
    pub verified_insns: Option<u32>,
}

/// Keeps BPF run-time statistics enabled for every program on the host until dropped.
#[derive(Debug)]
pub struct BpfStatsGuard {
    _fd: OwnedFd,
}

/// Turns on BPF run-time statistics (they cost a little on every program run).
pub fn enable_bpf_stats() -> Result<BpfStatsGuard, KernelError> {
    let fd = enable_stats(Stats::RunTime).map_err(KernelError::Stats)?;
    Ok(BpfStatsGuard { _fd: fd })
}

pub(super) fn collect(ebpf: &Ebpf) -> Result<Vec<ProgramStats>, KernelError> {
    let mut out = Vec::new();
    // The packet-drop programs are loaded only where that fallback is in use.
    for (name, program) in ebpf.programs().filter(|(_, p)| p.fd().is_ok()) {
        let info = program.info().map_err(|source| KernelError::Program {
            program: name.to_owned(),
            source,
        })?;
        out.push(ProgramStats {
            name: name.to_owned(),
            run_count: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            verified_insns: info.verified_instruction_count(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
