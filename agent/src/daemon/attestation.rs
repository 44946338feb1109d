//! The attestation side of `tessera run`: processes already running are attested at start,
//! every exec the kernel reports (when some workload needs the agent's attestation) and every
//! caller it reported `identity_pending`; identities of processes gone are collected. The
//! work reads /proc and may hash executables: it runs on blocking threads, never on the event
//! loop.

use std::sync::Arc;
use std::time::Duration;

use tessera_common::ProcessEvent;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use crate::identity::attestor::Attestor;
use crate::kernel::RingReader;

/// How often identities of processes that are gone are looked for.
const GC_INTERVAL: Duration = Duration::from_secs(30);
/// Pending callers queued for attestation at most; more are dropped (each denied connect
/// asks again).
const PENDING_QUEUE: usize = 1024;

/// Asks the attestation task to attest a process.
#[derive(Clone)]
pub struct AttestHandle {
    pending: mpsc::Sender<u32>,
}

impl AttestHandle {
    /// The kernel denied `tgid` with `identity_pending`: attest it.
    pub fn pending(&self, tgid: u32) {
        let _ = self.pending.try_send(tgid);
    }
}

/// Attests the processes already in `cgroup` (relative to the cgroup v2 root) or below it:
/// before the agent says it is ready, so that they are recognised from their first connect.
pub async fn scan(attestor: Arc<Attestor>, cgroup: String) {
    let scan = tokio::task::spawn_blocking(move || attestor.scan(&cgroup));
    if let Ok(count) = scan.await {
        info!(count, "running processes attested");
    }
}

/// Starts the task: follows `events` (and the pending callers) until `stop`.
pub fn spawn(
    attestor: Arc<Attestor>,
    mut events: RingReader<ProcessEvent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (AttestHandle, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(PENDING_QUEUE);
    let task = tokio::spawn(async move {
        let mut gc = tokio::time::interval(GC_INTERVAL);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(event) => refresh(&attestor, event.tgid, "exec"),
                    None => break,
                },
                Some(tgid) = rx.recv() => refresh(&attestor, tgid, "identity_pending"),
                _ = gc.tick() => {
                    let attestor = attestor.clone();
                    tokio::task::spawn_blocking(move || attestor.collect_garbage());
                }
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    });
    (AttestHandle { pending: tx }, task)
}

fn refresh(attestor: &Arc<Attestor>, tgid: u32, why: &'static str) {
    let attestor = attestor.clone();
    tokio::task::spawn_blocking(move || attestor.refresh(tgid, why));
}
