//! Statistics the benchmarks share (each bench includes this file as `mod common`).

/// The mean run time of a program between two readings of its `(run_count, run_time_ns)`
/// counters (the kernel's BPF statistics); NaN when it did not run.
pub fn mean_run_ns(before: (u64, u64), after: (u64, u64)) -> f64 {
    let ((c0, t0), (c1, t1)) = (before, after);
    if c1 > c0 {
        t1.saturating_sub(t0) as f64 / (c1 - c0) as f64
    } else {
        f64::NAN
    }
}

/// The median of the finite values; NaN when there are none.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
