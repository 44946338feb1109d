//! Mapping a process's attested [`Evidence`] to a workload, with every selector (the kernel
//! checks only `cgroup` and `uid`; [`PolicySet::match_workload`] is its order).

use super::{PolicySet, Workload, WorkloadId, index_u32};
use crate::identity::evidence::Evidence;
use crate::identity::selectors::most_specific;

impl PolicySet {
    /// The workload a process maps to: of the workloads whose every selector holds for `ev`,
    /// the most specific ([`Selectors::specificity`](crate::identity::selectors::Selectors::specificity));
    /// validation refuses two that could tie, so the first listed wins only in theory. For
    /// policies of `cgroup` and `uid` selectors only, the same answer as
    /// [`match_workload`](PolicySet::match_workload).
    pub fn match_evidence(&self, ev: &Evidence) -> Option<WorkloadId> {
        most_specific(self.workloads.iter().map(|w| &w.selectors), ev)
            .map(|i| WorkloadId(index_u32(i)))
    }

    /// Whether an exec could change the workload `ev`'s process maps to: some workload with
    /// an `exe` or `exeSha256` selector has every other selector holding for `ev`.
    pub fn depends_on_exe(&self, ev: &Evidence) -> bool {
        self.workloads
            .iter()
            .any(|w| w.uses_exe() && w.selectors.matches_but_exe(ev))
    }
}

impl Workload {
    /// Whether it uses a selector other than `cgroup` and `uid` (those the kernel checks
    /// itself at connect time): its processes must be attested in user space.
    pub fn needs_attestation(&self) -> bool {
        self.selectors.needs_attestation()
    }

    /// Whether it selects by executable (`exe` or `exeSha256`).
    pub fn uses_exe(&self) -> bool {
        self.selectors.uses_exe()
    }
}

#[cfg(test)]
mod tests;
