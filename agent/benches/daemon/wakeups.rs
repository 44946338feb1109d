//! The ring buffers' wakeups while the daemon benchmark runs, where the kernel has kprobes.
use std::path::{Path, PathBuf};

/// Counts the ring buffers' wakeups, host-wide: a kprobe on `bpf_ringbuf_notify` (the irq_work
/// a ring buffer wakeup runs; one per wakeup delivered, forced or not) made through tracefs, its
/// hits read from `kprobe_profile`. It is armed by enabling its event in a tracefs instance of
/// its own, so nothing is written to the global trace buffer; removed on drop. Other ring
/// buffers on the host count too (other agents: a few).
pub struct WakeupProbe {
    tracefs: PathBuf,
    event: String,
    instance: PathBuf,
}

impl WakeupProbe {
    /// None when tracefs or kprobes are not there.
    pub fn install() -> Option<Self> {
        let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("kprobe_events").exists())?;
        let event = format!("tessera_bench_wakeup_{}", std::process::id());
        // Appended: opening kprobe_events without O_APPEND deletes every kprobe on the host.
        append(
            &tracefs.join("kprobe_events"),
            &format!("p:{event} bpf_ringbuf_notify\n"),
        )
        .ok()?;
        let instance = tracefs.join("instances").join(&event);
        let probe = WakeupProbe {
            tracefs,
            event,
            instance,
        };
        std::fs::create_dir(&probe.instance).ok()?;
        std::fs::write(probe.enable_file(), "1").ok()?;
        Some(probe)
    }

    fn enable_file(&self) -> PathBuf {
        self.instance
            .join("events/kprobes")
            .join(&self.event)
            .join("enable")
    }

    pub fn count(&self) -> u64 {
        std::fs::read_to_string(self.tracefs.join("kprobe_profile"))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let mut f = l.split_whitespace();
                    (f.next() == Some(self.event.as_str()))
                        .then(|| f.next()?.parse().ok())
                        .flatten()
                })
            })
            .unwrap_or(0)
    }
}

impl Drop for WakeupProbe {
    fn drop(&mut self) {
        let _ = std::fs::write(self.enable_file(), "0");
        let _ = std::fs::remove_dir(&self.instance);
        let _ = append(
            &self.tracefs.join("kprobe_events"),
            &format!("-:{}\n", self.event),
        );
    }
}

fn append(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())
}
