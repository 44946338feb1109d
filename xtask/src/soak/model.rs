//! What the soak's policy says about one process: the credentials it holds and the verdict the
//! kernel owes each connect. State crosses execs and forks as a line of text.
use std::time::{SystemTime, UNIX_EPOCH};

/// The soak policy's endpoints, in the order of `--ports`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `bind: process`: the process that asked, until its next exec.
    Vault,
    /// `bind: process-tree`: the process that asked and the children it forks after.
    Tree,
    /// `bind: workload`: every process of the workload.
    Shared,
    /// Allowlisted: no credential needed.
    Open,
    /// No rule for the workload.
    Closed,
    /// No endpoint: not protected.
    Unprotected,
}

pub const TARGETS: [Target; 6] = [
    Target::Vault,
    Target::Tree,
    Target::Shared,
    Target::Open,
    Target::Closed,
    Target::Unprotected,
];

impl Target {
    pub fn audience(self) -> &'static str {
        match self {
            Target::Vault => "vault",
            Target::Tree => "tree",
            Target::Shared => "shared",
            Target::Open => "open",
            Target::Closed => "closed",
            Target::Unprotected => "none",
        }
    }
}

/// A credential as the model knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cred {
    pub jti: String,
    /// `exp` (Unix seconds): the kernel grant ends on that second.
    pub exp: u64,
    pub revoked: bool,
}

/// How close to an expiry a verdict may go either way (the kernel's boot clock against the
/// wall clock, and the time between reading the clock and the connect).
pub const EXPIRY_GUARD_MS: u64 = 150;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Valid {
    Yes,
    No,
    /// Within the guard of its expiry: wait this long and ask again.
    WaitMs(u64),
}

impl Cred {
    pub fn valid(&self, now_ms: u64) -> Valid {
        let end = self.exp * 1000;
        if self.revoked || now_ms >= end + EXPIRY_GUARD_MS {
            Valid::No
        } else if now_ms + EXPIRY_GUARD_MS <= end {
            Valid::Yes
        } else {
            Valid::WaitMs(end + EXPIRY_GUARD_MS - now_ms)
        }
    }
}

/// One process's credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// Its own `bind: process` credential (this image's).
    pub vault: Option<Cred>,
    /// Its `bind: process-tree` grant: its own (`tree_own`) or its parent's copy.
    pub tree: Option<Cred>,
    pub tree_own: bool,
    /// The workload's current `bind: workload` credential.
    pub shared: Option<Cred>,
}

impl Model {
    /// Whether a connect to `target` must be allowed now.
    pub fn allowed(&self, target: Target, now_ms: u64) -> Valid {
        let held = |c: &Option<Cred>| c.as_ref().map_or(Valid::No, |c| c.valid(now_ms));
        match target {
            Target::Vault => held(&self.vault),
            Target::Tree => held(&self.tree),
            Target::Shared => held(&self.shared),
            Target::Open | Target::Unprotected => Valid::Yes,
            Target::Closed => Valid::No,
        }
    }

    /// After an exec: `bind: process` grants end, the tree's stays.
    pub fn exec(&mut self) {
        self.vault = None;
    }

    /// What a child forked now holds: a copy of the tree grant, the workload's.
    pub fn forked(&self) -> Model {
        Model {
            vault: None,
            tree: self.tree.clone(),
            tree_own: false,
            shared: self.shared.clone(),
        }
    }

    pub fn encode(&self) -> String {
        let one = |c: &Option<Cred>| match c {
            Some(c) => format!("{},{},{}", c.jti, c.exp, u8::from(c.revoked)),
            None => "-".to_owned(),
        };
        format!(
            "{};{};{};{}",
            one(&self.vault),
            one(&self.tree),
            u8::from(self.tree_own),
            one(&self.shared)
        )
    }

    pub fn decode(text: &str) -> Option<Model> {
        let one = |s: &str| -> Option<Option<Cred>> {
            if s == "-" {
                return Some(None);
            }
            let mut parts = s.split(',');
            let jti = parts.next()?.to_owned();
            let exp = parts.next()?.parse().ok()?;
            let revoked = parts.next()? == "1";
            Some(Some(Cred { jti, exp, revoked }))
        };
        let mut parts = text.split(';');
        Some(Model {
            vault: one(parts.next()?)?,
            tree: one(parts.next()?)?,
            tree_own: parts.next()? == "1",
            shared: one(parts.next()?)?,
        })
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix seconds of an RFC 3339 UTC time as the agent writes it (`2026-12-03T18:20:00Z`, a
/// fraction ignored).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(str::parse::<i64>);
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// A small, seedable generator (xorshift64*): the same seed replays the same run.
#[derive(Clone, Copy, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_the_state_line_round_trip() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-12-03T18:20:00Z"), Some(1_796_322_000));
        assert_eq!(parse_rfc3339("2000-02-29T12:00:01.5Z"), Some(951_825_601));
        let m = Model {
            vault: None,
            tree: Some(Cred {
                jti: "a-b".into(),
                exp: 9,
                revoked: true,
            }),
            tree_own: true,
            shared: Some(Cred {
                jti: "c".into(),
                exp: 10,
                revoked: false,
            }),
        };
        assert_eq!(Model::decode(&m.encode()), Some(m));
    }

    #[test]
    fn verdicts_follow_expiry_with_a_guard() {
        let c = Cred {
            jti: "x".into(),
            exp: 10,
            revoked: false,
        };
        assert_eq!(c.valid(9_000), Valid::Yes);
        assert_eq!(c.valid(9_900), Valid::WaitMs(250));
        assert_eq!(c.valid(10_150), Valid::No);
        let revoked = Cred { revoked: true, ..c };
        assert_eq!(revoked.valid(0), Valid::No);
    }
}
