//! systemd integration for `Type=notify` units: READY=1 once the agent serves, STOPPING=1 on
//! the way out, and watchdog pings from the event loop. Every call is a no-op outside systemd
//! (no `NOTIFY_SOCKET`), so the daemon calls them unconditionally.
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Programs attached and the Workload API listening.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// "I am alive": sent from the event loop, so a stuck loop lets systemd restart the agent.
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to ping: half of `WatchdogSec`, or `None` when the unit has no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Run under systemd with journald capturing stderr (`JOURNAL_STREAM` set).
pub fn journald_stderr() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

fn notify(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(?states, "told systemd"),
        Err(e) => warn!(error = %e, "cannot notify systemd"),
    }
}
