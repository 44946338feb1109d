//! The resolved addresses, saved in the state directory (`resolved-hosts.json`) whenever they
//! change, so that a restarted agent protects them from its first instant instead of from its
//! first DNS answer (which may be seconds away, or never while DNS is down).
//!
//! ```json
//! {"hosts": {"vault.example": [{"ip": "10.0.0.7", "expires_unix_ms": 1764770000000}]}}
//! ```
//! `expires_unix_ms` is when the address's TTL runs out (wall clock): a restored address is
//! the last good answer, kept while lookups fail, then for what is left of its TTL.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::warn;

pub const FILE: &str = "resolved-hosts.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub hosts: BTreeMap<String, Vec<SavedAddress>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAddress {
    pub ip: IpAddr,
    pub expires_unix_ms: u64,
}

impl Saved {
    /// Reads `<state_dir>/resolved-hosts.json`; nothing when it is absent, and nothing (with a
    /// warning) when it cannot be read.
    pub fn load(state_dir: &Path) -> Saved {
        let path = state_dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Saved::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the saved host addresses");
                return Saved::default();
            }
        };
        serde_json::from_slice(&text).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "the saved host addresses are not valid: ignored");
            Saved::default()
        })
    }

    /// `host`'s addresses with their TTL left at `now` (zero once past).
    pub fn addresses(&self, host: &str, now: SystemTime) -> Vec<(IpAddr, Duration)> {
        let now_ms = unix_ms(now);
        self.hosts
            .get(host)
            .map(|list| {
                list.iter()
                    .map(|a| {
                        let left = a.expires_unix_ms.saturating_sub(now_ms);
                        (a.ip, Duration::from_millis(left))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes it to `<state_dir>/resolved-hosts.json` (0600, replaced in one rename).
    pub fn store(&self, state_dir: &Path) {
        let path = state_dir.join(FILE);
        let result = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|body| crate::files::replace_private(&path, &body));
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "cannot save the resolved host addresses");
        }
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_addresses_round_trip_with_their_ttl_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Saved::load(dir.path()), Saved::default());
        let now = SystemTime::now();
        let mut saved = Saved::default();
        saved.hosts.insert(
            "vault.example".into(),
            vec![
                SavedAddress {
                    ip: "10.0.0.7".parse().expect("ip"),
                    expires_unix_ms: unix_ms(now) + 30_000,
                },
                SavedAddress {
                    ip: "fd00::7".parse().expect("ip"),
                    expires_unix_ms: unix_ms(now) - 1,
                },
            ],
        );
        saved.store(dir.path());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(FILE))
                .expect("file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let back = Saved::load(dir.path());
        assert_eq!(back, saved);
        let addrs = back.addresses("vault.example", now);
        assert_eq!(addrs[0].0, "10.0.0.7".parse::<IpAddr>().expect("ip"));
        assert!(addrs[0].1 <= Duration::from_secs(30) && addrs[0].1 > Duration::from_secs(29));
        assert_eq!(addrs[1].1, Duration::ZERO);
        assert!(back.addresses("other.example", now).is_empty());
        std::fs::write(dir.path().join(FILE), b"{not json").expect("write");
        assert_eq!(Saved::load(dir.path()), Saved::default());
    }
}
