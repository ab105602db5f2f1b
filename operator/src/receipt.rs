//! Times on the observer's own clock. A helper stamps its report (`observedAt`) and a Lease
//! holder its `renewTime` with the clock of the master it runs on; comparing those stamps
//! with the operator's `now` on another master makes clock skew of 15-30 s a stale report or
//! a dead leader that are neither. As client-go's leader election does (its `observedTime`),
//! the operator instead judges a stamp by when *it* saw that stamp change: a report is fresh
//! while its last change was received less than [`crate::api::STALE_AFTER_SECS`] ago on the
//! operator's clock, whatever the writer's clock says.
//!
//! The first sight of a stamp has nothing to compare with; the caller says what it is worth,
//! choosing the safe side for what it decides: a report or kcm's Lease first seen counts from
//! `min(now, stamp)` (a report written an hour ago by a dead helper is not made fresh by an
//! operator's restart, and a writer whose clock runs ahead is not believed beyond now); the
//! operator's own election counts a Lease it first sees from `now` (it waits a whole lease
//! duration before it takes a Lease someone may still hold). Pure.

use std::collections::BTreeMap;

/// The last value seen of each stamp, and when it was received (the observer's clock, in the
/// caller's unit: seconds or milliseconds).
#[derive(Clone, Debug, Default)]
pub struct Receipts {
    seen: BTreeMap<String, (String, i64)>,
}

impl Receipts {
    /// When `value` of `key` was received: when this observer first saw `key` hold it, or
    /// `first_sight` if it has never seen `key` before.
    pub fn received(&mut self, key: &str, value: &str, first_sight: i64, now: i64) -> i64 {
        match self.seen.get(key) {
            Some((v, at)) if v == value => *at,
            Some(_) => {
                self.seen.insert(key.to_string(), (value.to_string(), now));
                now
            }
            None => {
                self.seen.insert(key.to_string(), (value.to_string(), first_sight));
                first_sight
            }
        }
    }

    /// Forgets every key but those `keep` names (a master removed, a report withdrawn).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{REPORT_PERIOD_SECS, STALE_AFTER_SECS};

    #[test]
    fn a_skewed_writer_is_judged_by_when_its_stamps_change() {
        // A helper whose clock runs `skew` seconds off the operator's reports every period.
        for skew in [-25i64, -15, 0, 15, 25, 3600, -3600] {
            let mut r = Receipts::default();
            let start = 1_000_000;
            let mut last = 0;
            for k in 0..10 {
                let now = start + k * REPORT_PERIOD_SECS;
                let stamp = now + skew;
                let first = stamp.min(now);
                last = r.received("m1", &stamp.to_string(), first, now);
                if k > 0 {
                    assert!(now - last <= STALE_AFTER_SECS, "skew {skew}s: a helper reporting every period is fresh at report {k}");
                }
            }
            // It stops reporting: stale after STALE_AFTER_SECS on the operator's clock, skew or not.
            let later = start + 9 * REPORT_PERIOD_SECS + STALE_AFTER_SECS + 1;
            let got = r.received("m1", &(start + 9 * REPORT_PERIOD_SECS + skew).to_string(), 0, later);
            assert_eq!(got, last, "skew {skew}s: the same stamp keeps its receipt");
            assert!(later - got > STALE_AFTER_SECS, "skew {skew}s: a helper that stopped is stale");
        }
    }

    #[test]
    fn first_sight_is_the_callers_choice_and_forgotten_keys_start_again() {
        let mut r = Receipts::default();
        assert_eq!(r.received("m1", "a", 100, 500), 100, "first sight: what the caller says");
        assert_eq!(r.received("m1", "a", 0, 600), 100, "unchanged");
        assert_eq!(r.received("m1", "b", 0, 700), 700, "changed: now");
        r.retain(|k| k != "m1");
        assert_eq!(r.received("m1", "b", 42, 800), 42, "forgotten: first sight again");
    }
}
