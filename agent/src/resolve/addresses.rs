//! The TTL bookkeeping of one host name: which addresses it has, how long each is kept, and
//! when to ask again. Pure logic: the caller supplies the clock.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// An address is kept at least this long after an answer had it; also the retry delay after a
/// failed lookup or an empty answer.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Answers are asked again when their shortest TTL runs out, but no sooner than this, so a
/// zero TTL cannot make the agent query in a loop, while a name that moves is followed within
/// its TTL plus a second.
pub const MIN_LOOKUP: Duration = Duration::from_secs(1);
/// …and no later than this, so a long TTL does not hide a change for a day.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Addresses kept per host: the first ones of an answer count, and addresses that left the
/// answers give way (soonest expiry first) before their TTL when there are more, so that a DNS
/// server cannot fill the kernel's endpoint map.
pub const MAX_ADDRESSES: usize = 256;

/// The addresses of one host, from its successive answers.
#[derive(Debug)]
pub struct HostAddresses {
    addresses: BTreeMap<IpAddr, Kept>,
    next_lookup: Instant,
    last_lookup_failed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kept {
    /// The last answer that had it, plus its TTL (at least `MIN_REFRESH`).
    until: Instant,
    /// Whether the last successful answer had it.
    in_answer: bool,
}

/// One address as `tessera status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressView {
    pub ip: IpAddr,
    /// Time left until its TTL runs out (zero once past).
    pub ttl_left: Duration,
    pub in_answer: bool,
}

impl HostAddresses {
    /// No addresses yet; the first lookup is due at `now`.
    pub fn new(now: Instant) -> Self {
        HostAddresses {
            addresses: BTreeMap::new(),
            next_lookup: now,
            last_lookup_failed: false,
        }
    }

    pub fn lookup_due(&self, now: Instant) -> bool {
        now >= self.next_lookup
    }

    /// Records a successful answer (`(address, TTL)` per A/AAAA record; may be empty) received
    /// at `now`; returns the addresses that are new. An address missing from the answer is
    /// kept until its old TTL runs out (see `expire`).
    pub fn answered(&mut self, now: Instant, answer: &[(IpAddr, Duration)]) -> Vec<IpAddr> {
        for kept in self.addresses.values_mut() {
            kept.in_answer = false;
        }
        let mut added = Vec::new();
        let mut current = 0;
        for &(ip, ttl) in answer {
            let ip = ip.to_canonical();
            let known_current = self.addresses.get(&ip).is_some_and(|k| k.in_answer);
            if !known_current {
                if current == MAX_ADDRESSES {
                    continue;
                }
                current += 1;
            }
            let until = now + ttl.max(MIN_REFRESH);
            match self.addresses.get_mut(&ip) {
                // The same address twice in one answer: keep the longer TTL.
                Some(kept) if kept.in_answer => kept.until = kept.until.max(until),
                Some(kept) => {
                    *kept = Kept {
                        until,
                        in_answer: true,
                    }
                }
                None => {
                    self.addresses.insert(
                        ip,
                        Kept {
                            until,
                            in_answer: true,
                        },
                    );
                    added.push(ip);
                }
            }
        }
        let shortest = answer.iter().map(|&(_, ttl)| ttl).min();
        let refresh = shortest.map_or(MIN_REFRESH, |ttl| ttl.clamp(MIN_LOOKUP, MAX_REFRESH));
        self.next_lookup = now + refresh;
        self.last_lookup_failed = false;
        added
    }

    /// Takes `saved` (address, TTL left) as the last good answer, as a restarted agent does with
    /// what its predecessor resolved: they stay while lookups fail, and once an answer lacks
    /// one it is kept for what is left of its TTL (at least `MIN_REFRESH`). The first lookup
    /// stays due now.
    pub fn restore(&mut self, now: Instant, saved: &[(IpAddr, Duration)]) {
        for &(ip, ttl_left) in saved.iter().take(MAX_ADDRESSES) {
            self.addresses.insert(
                ip.to_canonical(),
                Kept {
                    until: now + ttl_left.max(MIN_REFRESH),
                    in_answer: true,
                },
            );
        }
    }

    /// Records a failed lookup: every address is kept, and the lookup is retried after
    /// `MIN_REFRESH`.
    pub fn failed(&mut self, now: Instant) {
        self.last_lookup_failed = true;
        self.next_lookup = now + MIN_REFRESH;
    }

    /// Removes and returns the addresses the last successful answer lacked and whose TTL has
    /// run out by `now` (or that exceed `MAX_ADDRESSES`). Nothing expires while lookups fail:
    /// the last good addresses stay.
    pub fn expire(&mut self, now: Instant) -> Vec<IpAddr> {
        if self.last_lookup_failed {
            return Vec::new();
        }
        let mut stale: Vec<(Instant, IpAddr)> = self
            .addresses
            .iter()
            .filter(|(_, kept)| !kept.in_answer)
            .map(|(&ip, kept)| (kept.until, ip))
            .collect();
        stale.sort();
        let over = self.addresses.len().saturating_sub(MAX_ADDRESSES);
        let gone: Vec<IpAddr> = stale
            .iter()
            .enumerate()
            .filter(|&(i, &(until, _))| i < over || until <= now)
            .map(|(_, &(_, ip))| ip)
            .collect();
        for ip in &gone {
            self.addresses.remove(ip);
        }
        gone
    }

    /// When something is due next: a lookup, or an address leaving.
    pub fn next_wake(&self) -> Instant {
        let leaving = self
            .addresses
            .values()
            .filter(|kept| !kept.in_answer && !self.last_lookup_failed)
            .map(|kept| kept.until)
            .min();
        leaving.map_or(self.next_lookup, |t| t.min(self.next_lookup))
    }

    /// The addresses in the last successful answer.
    pub fn current(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .iter()
            .filter(|(_, kept)| kept.in_answer)
            .map(|(&ip, _)| ip)
    }

    pub fn view(&self, now: Instant) -> Vec<AddressView> {
        self.addresses
            .iter()
            .map(|(&ip, kept)| AddressView {
                ip,
                ttl_left: kept.until.saturating_duration_since(now),
                in_answer: kept.in_answer,
            })
            .collect()
    }

    pub fn last_lookup_failed(&self) -> bool {
        self.last_lookup_failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn first_answer_adds_every_address_and_refreshes_at_the_shortest_ttl() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        assert!(h.lookup_due(t0));
        let added = h.answered(t0, &[(ip("10.0.0.1"), secs(60)), (ip("fd00::1"), secs(30))]);
        assert_eq!(added, [ip("10.0.0.1"), ip("fd00::1")]);
        assert_eq!(h.next_wake(), t0 + secs(30));
        assert!(!h.lookup_due(t0 + secs(29)));
        assert!(h.lookup_due(t0 + secs(30)));
        assert_eq!(h.current().count(), 2);
    }

    #[test]
    fn refresh_is_clamped_between_floor_and_ceiling() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.answered(t0, &[(ip("10.0.0.1"), secs(0))]);
        assert_eq!(h.next_wake(), t0 + MIN_LOOKUP);
        // A TTL of 2 s is followed at 2 s, not at the 5 s an address is kept.
        h.answered(t0, &[(ip("10.0.0.1"), secs(2))]);
        assert_eq!(h.next_wake(), t0 + secs(2));
        h.answered(t0, &[(ip("10.0.0.1"), secs(86_400))]);
        assert_eq!(h.next_wake(), t0 + MAX_REFRESH);
        // An empty answer is asked again after the floor.
        h.answered(t0, &[]);
        assert_eq!(h.next_lookup, t0 + MIN_REFRESH);
    }

    #[test]
    fn restored_addresses_are_the_last_good_answer() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.restore(
            t0,
            &[(ip("10.0.0.1"), secs(30)), (ip("::ffff:10.0.0.2"), secs(0))],
        );
        assert!(h.lookup_due(t0));
        assert_eq!(
            h.current().collect::<Vec<_>>(),
            [ip("10.0.0.1"), ip("10.0.0.2")]
        );
        // Lookups fail: both stay.
        h.failed(t0);
        assert!(h.expire(t0 + secs(3600)).is_empty());
        // An answer without them: each goes when what was left of its TTL runs out.
        let t1 = t0 + secs(1);
        h.answered(t1, &[(ip("10.0.0.3"), secs(60))]);
        assert_eq!(h.expire(t0 + MIN_REFRESH), [ip("10.0.0.2")]);
        assert_eq!(h.expire(t0 + secs(30)), [ip("10.0.0.1")]);
    }

    #[test]
    fn a_vanished_address_is_kept_until_its_old_ttl_passes() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.answered(
            t0,
            &[(ip("10.0.0.1"), secs(100)), (ip("10.0.0.2"), secs(10))],
        );
        let t1 = t0 + secs(10);
        let added = h.answered(t1, &[(ip("10.0.0.3"), secs(10))]);
        assert_eq!(added, [ip("10.0.0.3")]);
        // 10.0.0.2's TTL ran out at t1; 10.0.0.1's runs until t0 + 100.
        assert_eq!(h.expire(t1), [ip("10.0.0.2")]);
        assert!(h.expire(t0 + secs(99)).is_empty());
        let t2 = t0 + secs(20);
        h.answered(t2, &[(ip("10.0.0.3"), secs(10))]);
        assert_eq!(h.next_wake(), t2 + secs(10));
        let t3 = t0 + secs(100);
        h.answered(t3, &[(ip("10.0.0.3"), secs(10))]);
        assert_eq!(h.expire(t3), [ip("10.0.0.1")]);
        let view = h.view(t3);
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].ip, ip("10.0.0.3"));
    }

    #[test]
    fn next_wake_is_an_address_leaving_before_the_next_lookup() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.answered(t0, &[(ip("10.0.0.1"), secs(40))]);
        h.answered(t0 + secs(30), &[(ip("10.0.0.2"), secs(60))]);
        assert_eq!(h.next_wake(), t0 + secs(40));
        assert_eq!(h.expire(t0 + secs(40)), [ip("10.0.0.1")]);
        assert_eq!(h.next_wake(), t0 + secs(90));
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_good_addresses() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.answered(t0, &[(ip("10.0.0.1"), secs(5))]);
        h.answered(t0 + secs(5), &[(ip("10.0.0.2"), secs(5))]);
        h.failed(t0 + secs(10));
        assert!(h.last_lookup_failed());
        assert!(h.expire(t0 + secs(1000)).is_empty());
        assert_eq!(h.next_wake(), t0 + secs(10) + MIN_REFRESH);
        assert_eq!(h.current().collect::<Vec<_>>(), [ip("10.0.0.2")]);
        // The next good answer lets the old one go.
        h.answered(t0 + secs(20), &[(ip("10.0.0.2"), secs(5))]);
        assert_eq!(h.expire(t0 + secs(20)), [ip("10.0.0.1")]);
    }

    #[test]
    fn an_address_that_returns_is_current_again_with_its_new_ttl() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.answered(t0, &[(ip("10.0.0.1"), secs(30))]);
        h.answered(t0 + secs(10), &[(ip("10.0.0.2"), secs(30))]);
        let added = h.answered(t0 + secs(20), &[(ip("::ffff:10.0.0.1"), secs(30))]);
        assert!(added.is_empty());
        assert!(h.expire(t0 + secs(45)).contains(&ip("10.0.0.2")));
        assert!(h.expire(t0 + secs(49)).is_empty());
        assert_eq!(h.current().collect::<Vec<_>>(), [ip("10.0.0.1")]);
    }

    #[test]
    fn addresses_are_capped_and_stale_ones_give_way_first() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        let many = |base: u8| -> Vec<(IpAddr, Duration)> {
            (0..=255u8)
                .map(|i| (IpAddr::from([10, base, 0, i]), secs(600)))
                .chain([(ip("10.255.255.255"), secs(600))])
                .collect()
        };
        // The 257th address of one answer is ignored.
        assert_eq!(h.answered(t0, &many(1)).len(), MAX_ADDRESSES);
        assert!(!h.current().any(|a| a == ip("10.255.255.255")));
        // A new answer: the old addresses (TTL left) give way to stay within the cap.
        let added = h.answered(t0 + secs(10), &many(2)[..10]);
        assert_eq!(added.len(), 10);
        assert_eq!(h.expire(t0 + secs(10)).len(), 10);
        assert_eq!(h.view(t0).len(), MAX_ADDRESSES);
        assert_eq!(h.current().count(), 10);
    }

    #[test]
    fn duplicate_records_keep_the_longer_ttl() {
        let t0 = Instant::now();
        let mut h = HostAddresses::new(t0);
        h.answered(
            t0,
            &[(ip("10.0.0.1"), secs(10)), (ip("10.0.0.1"), secs(50))],
        );
        assert_eq!(h.view(t0)[0].ttl_left, secs(50));
    }
}
