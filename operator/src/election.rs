//! Leader election among the operator replicas on Lease `kcm-operator/kcm-operator`
//! (coordination.k8s.io/v1), the way client-go's leaderelection does it: only the holder
//! writes; every write is a replace carrying the resourceVersion that was read, so of two
//! replicas racing for an expired lease exactly one wins (the other gets 409 Conflict).
//!
//! Timing (defaults): lease 15 s, renew every 2 s, retry every 2 s, renew deadline 10 s.
//! A leader that has not renewed successfully within the renew deadline (measured from
//! when its last successful request was *sent*, on its own monotonic clock) considers the
//! lease lost, while the others only take over 15 s after the renewTime it wrote: the 5 s
//! margin covers clock skew between masters. Expiry is judged from the Lease's renewTime
//! and the wall clock, so the masters' clocks must agree to within a few seconds (NTP).
//!
//! Usage (see main.rs): `acquire().await` → start the leader's work → `select!` it against
//! `keep().await`, which resolves only when leadership is lost → on shutdown `release()`,
//! so that a follower takes over within one retry period instead of the lease duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;

use crate::api::NAMESPACE;

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("Lease {namespace}/{name}: {source}")]
    Kube { namespace: String, name: String, source: kube::Error },
}
pub type Result<T, E = ElectionError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's holderIdentity; must be unique among the replicas.
    pub identity: String,
    /// leaseDurationSeconds written on the Lease.
    pub lease_duration: Duration,
    /// The leader gives up when it could not renew for this long (< lease_duration).
    pub renew_deadline: Duration,
    /// How often the leader renews.
    pub renew_period: Duration,
    /// How often a follower looks at the Lease.
    pub retry_period: Duration,
}

impl ElectionConfig {
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            namespace: NAMESPACE.into(),
            name: crate::api::OPERATOR_LEASE.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_period: Duration::from_secs(2),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A holder identity unique to this process: `<hostname>_<8 hex>`. The suffix keeps two
/// processes on one host (say a restarted operator, or the Deployment and the static pod
/// side by side) from both believing they hold the lease; the prefix says which master.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    let mut r = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut r);
    format!("{host}_{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// What to do, given the Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (absent, released or expired): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live lease: look again after `wait`.
    Follow { holder: String, wait: Duration },
}

/// When the lease held per `spec` expires (unix milliseconds), if anyone holds it.
pub fn expires_at_ms(spec: &LeaseSpec) -> Option<i64> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let last = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    Some(last.0.as_millisecond() + secs * 1000)
}

/// The Lease as this replica received it ([`crate::receipt`]): its `renewTime` replaced by
/// when this replica saw the holder's last renewal, on its own clock, as client-go's
/// `observedTime`. A Lease first seen counts from now: a replica that just started waits a
/// whole lease duration before it takes a Lease someone may still hold, and a holder whose
/// clock runs behind is not taken for dead.
pub fn as_received(receipts: &mut crate::receipt::Receipts, spec: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    let mut s = spec.clone();
    if let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        let value = format!("{}/{}", spec.holder_identity.as_deref().unwrap_or(""), renewed.0);
        let got = receipts.received("lease", &value, now.as_millisecond(), now.as_millisecond());
        s.renew_time = Timestamp::from_millisecond(got).ok().map(MicroTime);
    }
    s
}

/// The election's one decision. `spec` is the Lease's spec (None: no Lease yet).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp, retry: Duration) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    match expires_at_ms(spec) {
        Some(exp) if exp > now.as_millisecond() => {
            let left = Duration::from_millis((exp - now.as_millisecond()) as u64);
            // Look again after the retry period, or right after expiry if that is sooner.
            Decision::Follow { holder, wait: retry.min(left + Duration::from_millis(50)) }
        }
        _ => Decision::Acquire,
    }
}

/// The spec to write when taking or renewing the lease.
pub fn next_spec(old: Option<&LeaseSpec>, decision: &Decision, me: &str, now: Timestamp, lease_duration: Duration) -> Option<LeaseSpec> {
    let t = Some(MicroTime(now));
    let dur = Some(lease_duration.as_secs().clamp(1, i32::MAX as u64) as i32);
    match decision {
        Decision::Follow { .. } => None,
        Decision::Renew => {
            let mut s = old.cloned().unwrap_or_default();
            s.renew_time = t;
            s.lease_duration_seconds = dur;
            Some(s)
        }
        Decision::Acquire => {
            // A new leader is a transition (also after a release), as client-go counts them;
            // creating the Lease is not.
            let transitions = old.map_or(0, |o| o.lease_transitions.unwrap_or(0) + i32::from(o.holder_identity.as_deref() != Some(me)));
            Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                acquire_time: t.clone(),
                renew_time: t,
                lease_duration_seconds: dur,
                lease_transitions: Some(transitions),
                ..Default::default()
            })
        }
    }
}

/// The spec that releases a lease we hold: no holder, and already expired for anyone
/// reading it with an older client (leaseDurationSeconds 1).
pub fn released_spec(old: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        acquire_time: old.acquire_time.clone(),
        lease_transitions: old.lease_transitions,
        ..Default::default()
    }
}

/// Result of one look at (and possibly one write of) the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold it now (acquired or renewed).
    Leading,
    /// Someone else holds it.
    Following { holder: String, wait: Duration },
    /// Our write lost a race (409): look again.
    Conflict,
}

/// Why leadership ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another replica holds the Lease.
    TakenBy(String),
    /// No successful renewal within the renew deadline.
    RenewDeadline(Duration),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::TakenBy(h) => write!(f, "the lease is now held by {h}"),
            Lost::RenewDeadline(d) => write!(f, "could not renew the lease within {}s", d.as_secs()),
        }
    }
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    cfg: ElectionConfig,
    /// When the Lease's renewals were seen, on this replica's clock.
    receipts: std::sync::Mutex<crate::receipt::Receipts>,
}

impl Elector {
    pub fn new(client: kube::Client, cfg: ElectionConfig) -> Self {
        Self { api: Api::namespaced(client, &cfg.namespace), cfg, receipts: Default::default() }
    }

    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    fn err(&self) -> impl FnOnce(kube::Error) -> ElectionError + '_ {
        move |source| ElectionError::Kube { namespace: self.cfg.namespace.clone(), name: self.cfg.name.clone(), source }
    }

    /// Reads the Lease, decides, and writes it if we take or renew it.
    pub async fn try_once(&self) -> Result<Attempt> {
        let current = self.api.get_opt(&self.cfg.name).await.map_err(self.err())?;
        let now = Timestamp::now();
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let received = spec.map(|s| as_received(&mut self.receipts.lock().unwrap_or_else(|p| p.into_inner()), s, now));
        let decision = decide(received.as_ref(), &self.cfg.identity, now, self.cfg.retry_period);
        let Some(new_spec) = next_spec(spec, &decision, &self.cfg.identity, now, self.cfg.lease_duration) else {
            let Decision::Follow { holder, wait } = decision else { unreachable!() };
            return Ok(Attempt::Following { holder, wait });
        };
        let written = match current {
            Some(mut lease) => {
                // resourceVersion from the read: the replace fails with 409 if anyone wrote since.
                lease.spec = Some(new_spec);
                self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.cfg.name.clone()), namespace: Some(self.cfg.namespace.clone()), ..Default::default() },
                    spec: Some(new_spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(self.err()(e)),
        }
    }

    /// Resolves once this replica holds the lease; API errors are logged and retried.
    pub async fn acquire(&self) {
        let mut following: Option<String> = None;
        // An apiserver that does not answer fails every retry: said once, and its end once.
        let mut reach = crate::reach::Reach::default();
        loop {
            let attempt = self.try_once().await;
            match reach.observe(&attempt.as_ref().map(|_| ()).map_err(|e| crate::reach::chain(e))) {
                Some(crate::reach::Change::Lost(why)) => {
                    tracing::warn!("leader election: {why} (retried every {}s, logged once)", self.cfg.retry_period.as_secs())
                }
                Some(crate::reach::Change::Back { failures }) => tracing::info!("leader election: the Lease answers again after {failures} failed tries"),
                None => {}
            }
            let wait = match attempt {
                Ok(Attempt::Leading) => {
                    tracing::info!(identity = %self.cfg.identity, "acquired Lease {}/{}", self.cfg.namespace, self.cfg.name);
                    return;
                }
                Ok(Attempt::Following { holder, wait }) => {
                    if following.as_ref() != Some(&holder) {
                        tracing::info!(%holder, "following: Lease {}/{} is held by {holder}", self.cfg.namespace, self.cfg.name);
                        following = Some(holder);
                    }
                    wait
                }
                Ok(Attempt::Conflict) => Duration::from_millis(100),
                Err(_) => self.cfg.retry_period,
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Keeps renewing the lease we hold; resolves only when it is lost. Call right after
    /// [`Self::acquire`]: the renew deadline counts from now.
    pub async fn keep(&self) -> Lost {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew_period).await;
            let deadline = last_ok + self.cfg.renew_deadline;
            loop {
                let sent = Instant::now();
                match tokio::time::timeout_at(deadline, self.try_once()).await {
                    Ok(Ok(Attempt::Leading)) => {
                        last_ok = sent;
                        break;
                    }
                    Ok(Ok(Attempt::Following { holder, .. })) => return Lost::TakenBy(holder),
                    Ok(Ok(Attempt::Conflict)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Ok(Err(e)) => {
                        tracing::warn!("renewing the lease: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(_) => return Lost::RenewDeadline(self.cfg.renew_deadline),
                }
                if Instant::now() >= deadline {
                    return Lost::RenewDeadline(self.cfg.renew_deadline);
                }
            }
        }
    }

    /// Gives the lease up if we hold it, so a follower takes over at its next retry.
    pub async fn release(&self) -> Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await.map_err(self.err())? else { return Ok(false) };
        let Some(spec) = lease.spec.as_ref() else { return Ok(false) };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(released_spec(spec, Timestamp::now()));
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err()(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_secs(2);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn held(holder: &str, renewed: i64, dur: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            acquire_time: Some(MicroTime(at(renewed - 100))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(dur),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn no_lease_or_no_holder_is_acquired() {
        assert_eq!(decide(None, "a", at(1000), RETRY), Decision::Acquire);
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", at(1000), RETRY), Decision::Acquire);
        let mut released = held("b", 1000, 15);
        released.holder_identity = Some(String::new());
        assert_eq!(decide(Some(&released), "a", at(1000), RETRY), Decision::Acquire);
        let released = released_spec(&held("b", 990, 15), at(1000));
        assert_eq!(decide(Some(&released), "a", at(1000), RETRY), Decision::Acquire);
    }

    #[test]
    fn a_holder_whose_clock_is_off_is_judged_by_when_its_renewals_are_seen() {
        for skew in [-25i64, 25, -3600] {
            let mut r = crate::receipt::Receipts::default();
            // b renews every 2 s, stamping its own clock; a looks every 2 s.
            for k in 0..10 {
                let now = 1000 + 2 * k;
                let s = held("b", now + skew, 15);
                let d = decide(Some(&as_received(&mut r, &s, at(now))), "a", at(now), RETRY);
                assert!(matches!(d, Decision::Follow { .. }), "skew {skew}s, look {k}: a live holder is followed, not taken over: {d:?}");
            }
            // b stops renewing at 1018: a takes the Lease a lease duration after it last saw a renewal.
            let last = held("b", 1018 + skew, 15);
            let d = decide(Some(&as_received(&mut r, &last, at(1032))), "a", at(1032), RETRY);
            assert!(matches!(d, Decision::Follow { .. }), "skew {skew}s: still within the lease: {d:?}");
            assert_eq!(decide(Some(&as_received(&mut r, &last, at(1034))), "a", at(1034), RETRY), Decision::Acquire, "skew {skew}s: expired");
        }
        // A Lease first seen counts from now: a replica that just started waits it out.
        let mut r = crate::receipt::Receipts::default();
        let old = held("b", 0, 15);
        assert!(matches!(decide(Some(&as_received(&mut r, &old, at(5000))), "a", at(5000), RETRY), Decision::Follow { .. }));
        assert_eq!(decide(Some(&as_received(&mut r, &old, at(5016))), "a", at(5016), RETRY), Decision::Acquire);
    }

    #[test]
    fn own_lease_is_renewed_even_when_expired() {
        assert_eq!(decide(Some(&held("a", 1000, 15)), "a", at(1005), RETRY), Decision::Renew);
        assert_eq!(decide(Some(&held("a", 1000, 15)), "a", at(5000), RETRY), Decision::Renew);
    }

    #[test]
    fn live_lease_of_another_is_followed_until_it_expires() {
        let s = held("b", 1000, 15);
        assert_eq!(decide(Some(&s), "a", at(1000), RETRY), Decision::Follow { holder: "b".into(), wait: RETRY });
        // One second left: look again just after expiry, not after the full retry period.
        assert_eq!(decide(Some(&s), "a", at(1014), RETRY), Decision::Follow { holder: "b".into(), wait: Duration::from_millis(1050) });
        assert_eq!(decide(Some(&s), "a", at(1015), RETRY), Decision::Acquire);
        assert_eq!(decide(Some(&s), "a", at(2000), RETRY), Decision::Acquire);
        // Without renewTime the acquireTime counts; without either the lease is stale.
        let mut s2 = s.clone();
        s2.renew_time = None;
        assert_eq!(decide(Some(&s2), "a", at(1000), RETRY), Decision::Acquire, "acquired at 900, expired at 915");
        s2.acquire_time = None;
        assert_eq!(decide(Some(&s2), "a", at(0), RETRY), Decision::Acquire);
    }

    #[test]
    fn sub_second_expiry() {
        let mut s = held("b", 1000, 15);
        s.renew_time = Some(MicroTime(Timestamp::from_millisecond(1_000_500).unwrap()));
        let now = Timestamp::from_millisecond(1_015_400).unwrap();
        assert_eq!(decide(Some(&s), "a", now, RETRY), Decision::Follow { holder: "b".into(), wait: Duration::from_millis(150) });
    }

    #[test]
    fn acquiring_counts_a_transition_when_the_holder_changes() {
        let now = at(2000);
        let d = Duration::from_secs(15);
        let s = next_spec(Some(&held("b", 1000, 15)), &Decision::Acquire, "a", now, d).unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.renew_time, Some(MicroTime(now)));
        assert_eq!(s.lease_duration_seconds, Some(15));
        let released = released_spec(&held("b", 1000, 15), at(1500));
        assert_eq!(next_spec(Some(&released), &Decision::Acquire, "a", now, d).unwrap().lease_transitions, Some(4), "after a release");
        assert_eq!(next_spec(Some(&held("a", 1000, 15)), &Decision::Acquire, "a", now, d).unwrap().lease_transitions, Some(3), "same holder");
        assert_eq!(next_spec(None, &Decision::Acquire, "a", now, d).unwrap().lease_transitions, Some(0));
    }

    #[test]
    fn renewing_moves_only_renew_time() {
        let old = held("a", 1000, 15);
        let s = next_spec(Some(&old), &Decision::Renew, "a", at(1002), Duration::from_secs(15)).unwrap();
        assert_eq!(s.renew_time, Some(MicroTime(at(1002))));
        assert_eq!((&s.acquire_time, s.lease_transitions, &s.holder_identity), (&old.acquire_time, old.lease_transitions, &old.holder_identity));
        assert_eq!(next_spec(Some(&old), &Decision::Follow { holder: "b".into(), wait: RETRY }, "a", at(1), RETRY), None);
    }

    #[test]
    fn release_leaves_no_holder_and_a_one_second_lease() {
        let r = released_spec(&held("a", 1000, 15), at(1001));
        assert_eq!(r.holder_identity, None);
        assert_eq!(r.lease_duration_seconds, Some(1));
        assert_eq!(expires_at_ms(&r), None);
        assert_eq!(r.lease_transitions, Some(3));
    }

    #[test]
    fn renew_deadline_is_shorter_than_the_lease() {
        let c = ElectionConfig::new("x");
        assert!(c.renew_deadline + Duration::from_secs(3) < c.lease_duration, "margin for clock skew");
        assert!(c.renew_period < c.renew_deadline);
        assert_eq!((c.namespace.as_str(), c.name.as_str()), (NAMESPACE, crate::api::OPERATOR_LEASE));
    }

    #[test]
    fn default_identity_is_host_and_unique_suffix() {
        let (a, b) = (default_identity(), default_identity());
        assert_ne!(a, b);
        let (host, suffix) = a.rsplit_once('_').unwrap();
        assert!(!host.is_empty() && suffix.len() == 8);
    }
}
