//! Decision events from the kernel's `EVENTS` ring buffer (and process events from
//! `PROCESS_EVENTS`), read asynchronously.

use std::mem::{offset_of, size_of};

use aya::maps::{MapData, RingBuf};
use tessera_common::DecisionEvent;
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// How long an event submitted without a wakeup may wait in the ring buffer.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Reads `DecisionEvent`s as the kernel submits them.
pub type EventReader = RingReader<DecisionEvent>;

/// Reads one kind of record from a ring buffer as the kernel submits them.
pub struct RingReader<T> {
    state: State,
    decode: fn(&[u8]) -> Option<T>,
}

enum State {
    /// Registered with tokio's reactor on first use, so the reader can be made outside a runtime.
    Idle(RingBuf<MapData>),
    Polling(AsyncFd<RingBuf<MapData>>),
    Failed,
}

impl<T> RingReader<T> {
    pub(super) fn new(ring: RingBuf<MapData>, decode: fn(&[u8]) -> Option<T>) -> Self {
        RingReader {
            state: State::Idle(ring),
            decode,
        }
    }

    /// The next event; waits until one arrives. `None` when the ring buffer cannot be polled
    /// (must be called inside a tokio runtime).
    pub async fn next(&mut self) -> Option<T> {
        if let State::Idle(_) = self.state {
            let State::Idle(ring) = std::mem::replace(&mut self.state, State::Failed) else {
                return None;
            };
            match register(ring) {
                Ok(fd) => self.state = State::Polling(fd),
                Err(error) => {
                    warn!(error = %error, "polling the decision ring buffer failed");
                    return None;
                }
            }
        }
        loop {
            if let Some(event) = self.try_next() {
                return Some(event);
            }
            let State::Polling(fd) = &mut self.state else {
                return None;
            };
            // The kernel submits most events without a wakeup (a wakeup per event costs the
            // connect path microseconds on a VM); it wakes us once a backlog builds up, and the
            // timer picks up the rest.
            match tokio::time::timeout(POLL_INTERVAL, fd.readable_mut()).await {
                Err(_elapsed) => {}
                Ok(Ok(mut guard)) => guard.clear_ready(),
                Ok(Err(error)) => {
                    warn!(error = %error, "polling the decision ring buffer failed");
                    return None;
                }
            }
        }
    }

    /// An event already in the ring buffer, without waiting.
    pub fn try_next(&mut self) -> Option<T> {
        let ring = match &mut self.state {
            State::Idle(ring) => ring,
            State::Polling(fd) => fd.get_mut(),
            State::Failed => return None,
        };
        while let Some(item) = ring.next() {
            if let Some(event) = (self.decode)(&item) {
                return Some(event);
            }
        }
        None
    }
}

/// Registers the ring buffer with tokio's reactor.
#[expect(
    deprecated,
    reason = "AsyncFd::register is unsafe and the agent forbids unsafe; the RingBuf owns its \
              fd for as long as the AsyncFd holds it, which is what register requires"
)]
fn register(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    AsyncFd::new(ring)
}

/// Copies an event out of the ring buffer's bytes, field by field at the offsets of the
/// `#[repr(C)]` struct (the agent forbids `unsafe`, so no pointer cast).
pub fn decode(bytes: &[u8]) -> Option<DecisionEvent> {
    if bytes.len() < size_of::<DecisionEvent>() {
        return None;
    }
    macro_rules! field {
        ($name:ident: $t:ty) => {{
            const AT: usize = offset_of!(DecisionEvent, $name);
            <$t>::from_ne_bytes(bytes[AT..AT + size_of::<$t>()].try_into().ok()?)
        }};
    }
    macro_rules! array {
        ($name:ident) => {{
            const AT: usize = offset_of!(DecisionEvent, $name);
            bytes[AT..AT + 16].try_into().ok()?
        }};
    }
    Some(DecisionEvent {
        timestamp_ns: field!(timestamp_ns: u64),
        cgroup_id: field!(cgroup_id: u64),
        credential_id: field!(credential_id: u64),
        socket_cookie: field!(socket_cookie: u64),
        pid: field!(pid: u32),
        tgid: field!(tgid: u32),
        uid: field!(uid: u32),
        gid: field!(gid: u32),
        creator_tgid: field!(creator_tgid: u32),
        endpoint_id: field!(endpoint_id: u32),
        workload_id: field!(workload_id: u32),
        rule_id: field!(rule_id: u32),
        policy_generation: field!(policy_generation: u32),
        port: field!(port: u16),
        hook: field!(hook: u8),
        protocol: field!(protocol: u8),
        verdict: field!(verdict: u8),
        reason: field!(reason: u8),
        enforced: field!(enforced: u8),
        family: field!(family: u8),
        addr: array!(addr),
        comm: array!(comm),
        original: field!(original: u8),
        _pad: [0; 3],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes each field at its offset, as the kernel's struct layout does.
    fn encode(ev: &DecisionEvent) -> Vec<u8> {
        let mut b = vec![0u8; size_of::<DecisionEvent>()];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(DecisionEvent, timestamp_ns),
            &ev.timestamp_ns.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, cgroup_id),
            &ev.cgroup_id.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, credential_id),
            &ev.credential_id.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, socket_cookie),
            &ev.socket_cookie.to_ne_bytes(),
        );
        put(offset_of!(DecisionEvent, pid), &ev.pid.to_ne_bytes());
        put(offset_of!(DecisionEvent, tgid), &ev.tgid.to_ne_bytes());
        put(offset_of!(DecisionEvent, uid), &ev.uid.to_ne_bytes());
        put(offset_of!(DecisionEvent, gid), &ev.gid.to_ne_bytes());
        put(
            offset_of!(DecisionEvent, creator_tgid),
            &ev.creator_tgid.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, endpoint_id),
            &ev.endpoint_id.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, workload_id),
            &ev.workload_id.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, rule_id),
            &ev.rule_id.to_ne_bytes(),
        );
        put(
            offset_of!(DecisionEvent, policy_generation),
            &ev.policy_generation.to_ne_bytes(),
        );
        put(offset_of!(DecisionEvent, port), &ev.port.to_ne_bytes());
        put(offset_of!(DecisionEvent, hook), &[ev.hook]);
        put(offset_of!(DecisionEvent, protocol), &[ev.protocol]);
        put(offset_of!(DecisionEvent, verdict), &[ev.verdict]);
        put(offset_of!(DecisionEvent, reason), &[ev.reason]);
        put(offset_of!(DecisionEvent, enforced), &[ev.enforced]);
        put(offset_of!(DecisionEvent, family), &[ev.family]);
        put(offset_of!(DecisionEvent, addr), &ev.addr);
        put(offset_of!(DecisionEvent, comm), &ev.comm);
        put(offset_of!(DecisionEvent, original), &[ev.original]);
        b
    }

    #[test]
    fn decode_reads_every_field_at_its_offset() {
        let ev = DecisionEvent {
            timestamp_ns: 1,
            cgroup_id: 2,
            credential_id: 3,
            socket_cookie: 4,
            pid: 5,
            tgid: 6,
            uid: 7,
            gid: 8,
            creator_tgid: 9,
            endpoint_id: 10,
            workload_id: 11,
            rule_id: 12,
            policy_generation: 13,
            port: 14,
            hook: 15,
            protocol: 16,
            verdict: 17,
            reason: 18,
            enforced: 19,
            family: 20,
            addr: [21; 16],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            original: 22,
            _pad: [0; 3],
        };
        assert_eq!(decode(&encode(&ev)), Some(ev));
    }

    #[test]
    fn decode_refuses_short_input() {
        assert_eq!(decode(&[0u8; 8]), None);
    }
}
