//! When the helper answers `/readyz` with 200: its watches are synced, and its loop turns
//! (a look ended within three report periods, or one is under way and has not taken
//! longer than a step may), or it stands by for the host lock another helper of this
//! master holds. A helper standing by is ready to take over: the operator deletes the
//! rescue pod holding the lock only once the DaemonSet's helper is Ready, so standing by
//! must count as ready, or neither would ever give way.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kcm_operator::api::REPORT_PERIOD_SECS;

/// A look that ended longer ago than this leaves the helper not ready.
pub const TICK_STALE_AFTER: Duration = Duration::from_secs(3 * REPORT_PERIOD_SECS as u64);
/// A look under way for longer than this (a step waits for its certificate and for kcm's
/// health, and has the pod's whole termination grace period to finish) leaves it not ready.
pub const TICK_UNDER_WAY_AT_MOST: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct State {
    synced: bool,
    standing_by: bool,
    started: Option<Instant>,
    ended: Option<Instant>,
}

/// Shared between the run loop (which records) and the HTTP server (which asks).
#[derive(Debug, Default)]
pub struct Readiness(Mutex<State>);

impl Readiness {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The watches (CR, KcmNode, Node) have their first full list.
    pub fn synced(&self) {
        self.state().synced = true;
    }
    /// Waiting for the host lock (`true`) or holding it (`false`).
    pub fn standing_by(&self, waiting: bool) {
        self.state().standing_by = waiting;
    }
    pub fn tick_started(&self, at: Instant) {
        self.state().started = Some(at);
    }
    pub fn tick_ended(&self, at: Instant) {
        self.state().ended = Some(at);
    }
    pub fn ready_at(&self, now: Instant) -> bool {
        let s = self.state();
        let under_way = match (s.started, s.ended) {
            (Some(started), ended) if ended.is_none_or(|e| e < started) => Some(started),
            _ => None,
        };
        let turning = match under_way {
            Some(started) => now.saturating_duration_since(started) <= TICK_UNDER_WAY_AT_MOST,
            None => s.ended.is_some_and(|e| now.saturating_duration_since(e) <= TICK_STALE_AFTER),
        };
        s.synced && (s.standing_by || turning)
    }
    pub fn ready(&self) -> bool {
        self.ready_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_synced_while_the_loop_turns_or_it_stands_by() {
        let r = Readiness::default();
        let t0 = Instant::now();
        assert!(!r.ready_at(t0), "nothing yet");
        r.standing_by(true);
        assert!(!r.ready_at(t0), "standing by, watches not synced");
        r.synced();
        assert!(r.ready_at(t0), "synced, standing by for the host lock");
        r.standing_by(false);
        assert!(!r.ready_at(t0), "holds the lock, no look yet");
        r.tick_started(t0);
        assert!(r.ready_at(t0 + Duration::from_secs(300)), "a long step under way");
        assert!(!r.ready_at(t0 + TICK_UNDER_WAY_AT_MOST + Duration::from_secs(1)), "a look stuck past any step");
        let t1 = t0 + Duration::from_secs(1);
        r.tick_ended(t1);
        assert!(r.ready_at(t1 + TICK_STALE_AFTER));
        assert!(!r.ready_at(t1 + TICK_STALE_AFTER + Duration::from_secs(1)), "no look for three report periods");
    }
}
