//! Rollout, one master at a time: which node gets the next revision (the kcm leader's
//! node last), when to wait, when to stop. [`decide`] is pure; [`run`] keeps the CR, the
//! masters, their KcmNodes and kcm's Lease in watched stores, writes each master's KcmNode
//! spec (its target revision) and the CR's aggregate status when they change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::watch::{by_name, reflect};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use crate::api::CR_NAME;
use crate::api::{
    KcmNode, KcmNodeSpec, KubeControllerManager, KubeControllerManagerSpec, KubeControllerManagerStatus, KubeconfigMode, NodeStatus, Revision,
    HANDED_BACK_CONDITION, HELPER_APP, HELPER_DAEMONSET, KCM_LEASE, NAMESPACE, OPERATOR_MANAGER, RENEW_REQUESTED_ANNOTATION, RESCUE_APP, STALE_AFTER_SECS,
};
use crate::approver::is_master;
use crate::kube_error::{kube_err, KubeError};
use crate::metrics::{OperatorMetrics, StepResult};
use crate::receipt::Receipts;
use crate::render::spec_revision;

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every master runs the spec's revision with a current certificate.
    Done,
    /// A step is under way (or a master is unhealthy): do nothing now.
    Wait { node: String, why: String },
    /// Give `node` this revision.
    Go { node: String, revision: String, why: String },
    /// `node` failed the spec's revision and was rolled back: stop until the spec changes.
    Stop { node: String, reason: String },
    /// Paused by the spec.
    Paused,
    /// `spec.handBack`: no master runs our kcm any more.
    HandedBack,
    /// `node`'s repair or renewal failed; the next try waits (Degraded `RepairFailed` or
    /// `RenewalFailed`).
    Backoff { node: String, step: BackoffStep, reason: String },
}

/// What kind of step backs off after failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffStep {
    Repair,
    Renewal,
    HandBack,
}

impl BackoffStep {
    /// The reasons of the Progressing and Degraded conditions.
    fn reasons(self) -> (&'static str, &'static str) {
        match self {
            BackoffStep::Repair => ("RepairBackoff", "RepairFailed"),
            BackoffStep::Renewal => ("RenewalBackoff", "RenewalFailed"),
            BackoffStep::HandBack => ("HandBackBackoff", "HandBackFailed"),
        }
    }
}

/// After the failed attempt `attempt` of a renewal, the next waits this long (seconds) from
/// when that attempt was given: one minute, doubled each attempt, at most an hour. The first
/// retry goes at once (when the first attempt was given is not written in its revision).
pub fn renewal_backoff(attempt: u32) -> i64 {
    60i64.saturating_mul(1i64 << attempt.saturating_sub(1).min(6)).min(3600)
}

/// The spec part of a target revision ([`Revision`]), `None` when it does not parse.
pub fn spec_part(revision: &str) -> Option<String> {
    revision.parse::<Revision>().ok().map(|r| r.spec)
}

/// Whether a certificate expiring at `not_after` (unix) is due for renewal under `spec`.
pub fn renewal_due(spec: &KubeControllerManagerSpec, not_after: i64, now: i64) -> bool {
    now >= renew_at(spec, not_after)
}

/// When a certificate expiring at `not_after` is renewed: when the spec's share of its
/// validity remains.
pub fn renew_at(spec: &KubeControllerManagerSpec, not_after: i64) -> i64 {
    let validity = spec.certificate.validity_secs();
    not_after - validity * i64::from(spec.certificate.renew_when_remaining_percent) / 100
}

/// An RFC 3339 time as unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    s.parse::<k8s_openapi::jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The revision `node` should run, or `None` when it runs it already. A certificate
/// capped by the cluster CA's notAfter is not renewed again under that CA (it cannot get
/// longer): see [`ca_expiring`].
fn wanted(spec: &KubeControllerManagerSpec, rev: &str, n: &NodeStatus, ca_not_after: Option<i64>, now: i64) -> Option<(String, String)> {
    // A master handed back runs kubeadm's kcm, not the spec (the hand back was undone).
    let applied = n.applied().filter(|r| r.hand_back_at().is_none()).map(|r| r.spec);
    if applied.as_deref() != Some(rev) {
        return Some((rev.to_string(), format!("runs {}, spec is {rev}", n.applied_revision.as_deref().unwrap_or("nothing of ours"))));
    }
    let not_after = n.not_after.as_deref().and_then(parse_time)?;
    let serial = n.cert_serial.as_deref()?;
    if let Some(at) = n.renew_requested_at.filter(|at| issued_before(n, *at)) {
        return Some((Revision::renew(rev, serial).to_string(), format!("renewal of {serial} requested at {}", crate::pki::rfc3339(at))));
    }
    if capped_by_ca(not_after, ca_not_after) {
        return None;
    }
    renewal_due(spec, not_after, now)
        .then(|| (Revision::renew(rev, serial).to_string(), format!("certificate {serial} expires {}", n.not_after.as_deref().unwrap_or("?"))))
}

/// Whether the master's certificate was issued before `at` (its notBefore is the issue time
/// backdated by the signer's 5 minutes). Unknown (a report without notBefore): no, so a
/// request can never renew in a loop.
pub fn issued_before(n: &NodeStatus, at: i64) -> bool {
    n.not_before.as_deref().and_then(parse_time).is_some_and(|nb| nb + crate::identity::BACKDATE_SECS < at)
}

/// The renew-now requests, by master: the latest of the CR's and each KcmNode's
/// [`crate::api::RENEW_REQUESTED_ANNOTATION`]. A value that is not an RFC 3339 time is
/// ignored and named in the second list (`<object>: <value>`).
pub fn renew_requests(cr: Option<&str>, nodes: &[(String, Option<String>)]) -> (BTreeMap<String, i64>, Vec<String>) {
    let mut bad = Vec::new();
    let mut parse = |what: &str, v: &str| match parse_time(v.trim()) {
        Some(t) => Some(t),
        None => {
            bad.push(format!("{what}: {v:?}"));
            None
        }
    };
    let all = cr.and_then(|v| parse("KubeControllerManager kube-controller-manager", v));
    let mut out = BTreeMap::new();
    for (name, v) in nodes {
        let own = v.as_deref().and_then(|v| parse(&format!("KcmNode {name}"), v));
        if let Some(t) = own.max(all) {
            out.insert(name.clone(), t);
        }
    }
    (out, bad)
}

/// Whether a certificate ending at `not_after` was cut short by the CA's own notAfter
/// (the signer caps validity at it): renewing it again under the same CA gains nothing.
pub fn capped_by_ca(not_after: i64, ca_not_after: Option<i64>) -> bool {
    ca_not_after.is_some_and(|ca| not_after + CA_CAP_SLACK_SECS >= ca)
}

/// The masters whose certificate has been due for longer than half the renewal window and is
/// still not renewed (whatever holds it: a paused spec, a master down, a failed step, a
/// signer that does not answer), with how long; `None` when there are none. Half the window
/// is long past any rollout's pace and leaves the other half before the certificates expire:
/// Degraded `RenewalBlocked` says so while there is still time (for the default year, 36
/// days after due, 36 days before expiry). A certificate capped by the CA is not renewed
/// under that CA and is left to `ClusterCAExpiring`.
pub fn renewal_blocked(spec: &KubeControllerManagerSpec, nodes: &[NodeStatus], ca_not_after: Option<i64>, now: i64) -> Option<String> {
    let validity = spec.certificate.validity_secs();
    let half_window = validity * i64::from(spec.certificate.renew_when_remaining_percent) / 200;
    let blocked: Vec<String> = nodes
        .iter()
        .filter_map(|n| {
            let not_after = n.not_after.as_deref().and_then(parse_time)?;
            let due = renew_at(spec, not_after);
            (!capped_by_ca(not_after, ca_not_after) && now - due > half_window).then(|| {
                format!(
                    "{}: certificate {} due since {} ({}h ago), expires {}",
                    n.name,
                    n.cert_serial.as_deref().unwrap_or("?"),
                    crate::pki::rfc3339(due),
                    (now - due) / 3600,
                    crate::pki::rfc3339(not_after)
                )
            })
        })
        .collect();
    (!blocked.is_empty()).then(|| blocked.join("; "))
}

/// Certificates ending within this many seconds of the leader's belong to its renewal
/// round: a quarter of the renewal window (a rollout issues them minutes apart).
pub fn round_window(spec: &KubeControllerManagerSpec) -> i64 {
    let validity = spec.certificate.validity_secs();
    let window = validity * i64::from(spec.certificate.renew_when_remaining_percent) / 100;
    // Less than half the time from issuance to due: a certificate renewed in this round
    // (ending `validity - window` after the leader's) is never pulled in again.
    (window / 4).min((validity - window) / 2)
}

/// When each master's certificate is renewed (unix seconds), by node name: when the spec's
/// share of its validity remains; none for a certificate capped by the CA (never renewed
/// again under it).
pub fn renewal_schedule(spec: &KubeControllerManagerSpec, nodes: &[NodeStatus], ca_not_after: Option<i64>) -> BTreeMap<String, i64> {
    nodes
        .iter()
        .filter_map(|n| {
            let not_after = n.not_after.as_deref().and_then(parse_time)?;
            (!capped_by_ca(not_after, ca_not_after)).then(|| (n.name.clone(), renew_at(spec, not_after)))
        })
        .collect()
}

/// A certificate ending this close to the CA's notAfter (seconds) counts as capped by it.
pub const CA_CAP_SLACK_SECS: i64 = 60;

/// When the cluster CA has less life left than the spec's validity (so certificates issued
/// now are cut short at its notAfter, and once it is inside the renewal window they cannot
/// be renewed usefully): the message for Degraded/`ClusterCAExpiring`. Certificates are
/// renewed once under it (capped at its notAfter), never in a loop.
pub fn ca_expiring(spec: &KubeControllerManagerSpec, ca_not_after: Option<i64>, now: i64) -> Option<String> {
    let ca = ca_not_after?;
    (ca - now < spec.certificate.validity_secs()).then(|| {
        format!(
            "the cluster CA expires at {}, before the {}s validity the spec asks for: kcm certificates issued under it end then; renew the CA (certificates are renewed once under it, not again)",
            ts(ca),
            spec.certificate.validity_secs()
        )
    })
}

fn ts(t: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(t).map(|t| t.to_string()).unwrap_or_else(|_| t.to_string())
}

/// Whether `n`'s report is recent enough to be believed: its helper looked at the master
/// less than [`STALE_AFTER_SECS`] ago. A report without `observedAt` is unknown.
pub fn fresh(n: &NodeStatus, now: i64) -> bool {
    n.observed_at.as_deref().and_then(parse_time).is_some_and(|t| now - t <= STALE_AFTER_SECS)
}

/// What is wrong with a master that runs our kcm, from its (fresh) report: unhealthy kcm,
/// files that differ from what the helper wrote, an expired certificate.
pub fn problems(n: &NodeStatus, now: i64) -> Vec<String> {
    let mut p = Vec::new();
    if !n.healthy {
        p.push(if n.unit_active { "kcm does not answer /healthz".to_string() } else { "kcm unit is not active".to_string() });
    }
    p.extend(n.drift.iter().cloned());
    if let Some(t) = n.not_after.as_deref().and_then(parse_time).filter(|t| *t <= now) {
        p.push(format!("certificate {} expired at {}", n.cert_serial.as_deref().unwrap_or("?"), ts(t)));
    }
    p
}

/// The revision that repairs a master: the spec's, tagged with when it was given, so a
/// second repair of the same spec is a new target.
pub fn repair_revision(rev: &str, now: i64) -> String {
    Revision::repair(rev, now).to_string()
}

/// When a repair revision was given (unix seconds), `None` for other revisions.
pub fn repair_given_at(revision: &str) -> Option<i64> {
    revision.parse::<Revision>().ok()?.repair_at()
}

/// After a failed repair, the next one waits this long (seconds) past the step's own deadline.
pub const REPAIR_BACKOFF_SECS: i64 = 30;

/// When `n`'s target failed and `given_at` tells when it was given (a repair's or a hand
/// back's time): when it may be tried again, [`REPAIR_BACKOFF_SECS`] past the step's own
/// deadline. `None`: its target did not fail, or is of another kind.
fn retry_after_failure(spec: &KubeControllerManagerSpec, n: &NodeStatus, given_at: impl Fn(&Revision) -> Option<i64>) -> Option<i64> {
    let failed = n.target_revision.is_some() && n.failed_revision == n.target_revision;
    let given = n.target_revision.as_deref().filter(|_| failed)?.parse::<Revision>().ok().as_ref().and_then(given_at)?;
    Some(given + i64::from(spec.kcm.health_timeout_seconds) + REPAIR_BACKOFF_SECS)
}

/// Inputs of [`decide`] besides the spec.
#[derive(Clone, Debug, Default)]
pub struct Facts<'a> {
    /// Names of the selected masters.
    pub masters: &'a [String],
    /// The per-node reports.
    pub status: &'a [NodeStatus],
    /// The node holding kcm's Lease (only while the Lease is live).
    pub leader: Option<&'a str>,
    /// The cluster CA's notAfter (unix), when known.
    pub ca_not_after: Option<i64>,
    pub now: i64,
}

/// How a master counts for availability, from its report (see [`availability_blocker`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serving {
    /// Runs our kcm, and its fresh report says it answers /healthz.
    Up,
    /// Runs our kcm, and its fresh report says it does not answer /healthz: already down.
    Down,
    /// Runs our kcm, but no fresh report: it may be down.
    Unknown,
    /// Runs no kcm of ours (kubeadm's static pod, or none yet): not ours to count.
    Foreign,
}

/// How `n` counts for availability at `now`.
pub fn serving(n: &NodeStatus, now: i64) -> Serving {
    match (n.applied_revision.is_some(), fresh(n, now), n.healthy) {
        (false, _, _) => Serving::Foreign,
        (true, false, _) => Serving::Unknown,
        (true, true, true) => Serving::Up,
        (true, true, false) => Serving::Down,
    }
}

/// The availability rule, the one place every kind of step (spec, renewal, repair) asks:
/// a step may take `next` down unless `next` is down already; then every other selected
/// master that runs our kcm must be up (fresh and healthy). `Some((blocker, why))`: the
/// first other master that is down or unknown, and why `next` waits for it. A master
/// whose kcm is already down is never blocked: repairing it takes nothing down.
pub fn availability_blocker(nodes: &[NodeStatus], next: &NodeStatus, now: i64) -> Option<(String, String)> {
    if serving(next, now) == Serving::Down {
        return None;
    }
    nodes.iter().filter(|n| n.name != next.name).find_map(|n| {
        let state = match serving(n, now) {
            Serving::Down => "is not healthy",
            Serving::Unknown => "has no fresh report",
            Serving::Up | Serving::Foreign => return None,
        };
        Some((n.name.clone(), format!("{} {state}; {} waits", n.name, next.name)))
    })
}

/// A step the operator gave a master whose helper has not reported for this long (seconds)
/// is lost (the master powered off, its helper gone): it no longer holds the one-at-a-time
/// wait, and the master counts as unknown. Longer than any step (certificate wait, kubeadm's
/// kcm going, health timeout), during which a helper does not report.
pub const STEP_LOST_AFTER_SECS: i64 = 900;

/// Whether `n`'s target is under way: given, neither applied nor failed, and not lost (a
/// master that runs our kcm and has not reported for [`STEP_LOST_AFTER_SECS`]). A master
/// with no kcm of ours yet holds the wait however long: its kubeadm kcm may be going.
pub fn under_way(n: &NodeStatus, now: i64) -> Option<&str> {
    let t = n.target_revision.as_deref()?;
    let open = n.applied_revision.as_deref() != Some(t) && n.failed_revision.as_deref() != Some(t);
    let lost = n.applied_revision.is_some() && n.observed_at.as_deref().and_then(parse_time).is_none_or(|o| now - o > STEP_LOST_AFTER_SECS);
    (open && !lost).then_some(t)
}

/// Whether step `revision` takes nothing down: a renewal with the kubeconfig referencing
/// the certificate files (kcm reloads the swapped pair; the spec is the one applied, so
/// unit and kubeconfig stay as they are). Such a step skips the availability wait: a
/// master without a fresh report does not hold the others' renewals.
pub fn restart_free(spec: &KubeControllerManagerSpec, revision: &str) -> bool {
    spec.certificate.kubeconfig_mode == KubeconfigMode::Referenced && revision.parse::<Revision>().is_ok_and(|r| r.renews().is_some())
}

/// What to do with a renewal `wanted` gives a master, after its last attempt.
enum Retry {
    /// No failed attempt of it: the first.
    First,
    /// The last attempt failed and its backoff is over: this revision, this attempt.
    Next(String, u32),
    /// The last attempt failed and its backoff is not over: why, and until when.
    Wait(String),
}

fn retry_renewal(wanted: &str, n: &NodeStatus, now: i64) -> Retry {
    let Ok(want) = wanted.parse::<Revision>() else { return Retry::First };
    let Some(serial) = want.renews() else { return Retry::First };
    let failed = n.target_revision.is_some() && n.failed_revision == n.target_revision;
    let last = n.failed_revision.as_deref().filter(|_| failed).and_then(|r| r.parse::<Revision>().ok());
    let Some((attempt, given)) = last.as_ref().filter(|r| r.spec == want.spec && r.renews() == Some(serial)).and_then(Revision::renewal_attempt) else {
        return Retry::First;
    };
    let retry_at = given.map_or(i64::MIN, |g| g + renewal_backoff(attempt));
    if now < retry_at {
        return Retry::Wait(format!("renewal of {serial} failed (attempt {attempt}): {}; next try at {}", n.message.as_deref().unwrap_or("?"), ts(retry_at)));
    }
    Retry::Next(Revision::renew_retry(&want.spec, serial, attempt + 1, now).to_string(), attempt + 1)
}

/// Decides the next step.
///
/// - One step at a time: while a master applies its target, wait (not for a lost step:
///   [`under_way`]).
/// - A spec revision that failed and was rolled back stops the rollout (repairs too: they
///   would apply the same spec) until the spec changes.
/// - Then repair: a master that runs our kcm and whose fresh report shows a problem
///   (unhealthy, drift, expired certificate) gets a repair step, one at a time: masters
///   whose kcm is down first (they are down already), the kcm leader's master last, then
///   the one with the fewest problems (closest to healthy). A failed repair is retried
///   after a backoff.
/// - Otherwise spec changes and due renewals, the leader's master last.
/// - Every step that takes a master down obeys [`availability_blocker`]: a master whose
///   kcm is up is never taken down (for a spec change, a renewal or a repair of drift) while
///   another master that runs our kcm is down or unknown. A [`restart_free`] renewal takes
///   nothing down and does not wait.
pub fn decide(spec: &KubeControllerManagerSpec, f: &Facts<'_>) -> Decision {
    if spec.paused {
        return Decision::Paused;
    }
    let now = f.now;
    let rev = spec_revision(spec);
    let entry = |name: &str| f.status.iter().find(|n| n.name == name).cloned().unwrap_or_else(|| NodeStatus { name: name.to_string(), ..Default::default() });
    let nodes: Vec<NodeStatus> = f.masters.iter().map(|m| entry(m)).collect();
    let is_leader = |n: &NodeStatus| Some(n.name.as_str()) == f.leader;

    for n in &nodes {
        if let Some(t) = under_way(n, now) {
            return Decision::Wait { node: n.name.clone(), why: format!("applying {t}") };
        }
    }
    if spec.hand_back.is_some() {
        return decide_hand_back(spec, &rev, &nodes, f);
    }

    // The spec's revision failed on a master and was rolled back: it is known bad, so no
    // master gets it, not even as a repair, until the spec changes. (A failed renewal or
    // repair is retried after a backoff: the spec may well be good.)
    for n in &nodes {
        if let Some(t) = n.target_revision.as_deref() {
            let apply = t.parse::<Revision>().is_ok_and(|r| r.step == crate::api::Step::Apply);
            if n.failed_revision.as_deref() == Some(t) && spec_part(t).as_deref() == Some(rev.as_str()) && apply {
                return Decision::Stop { node: n.name.clone(), reason: n.message.clone().unwrap_or_else(|| format!("revision {t} failed")) };
            }
        }
    }

    let mut broken: Vec<(&NodeStatus, Vec<String>)> =
        nodes.iter().filter(|n| matches!(serving(n, now), Serving::Up | Serving::Down)).map(|n| (n, problems(n, now))).filter(|(_, p)| !p.is_empty()).collect();
    broken.sort_by_key(|(n, p)| (serving(n, now) != Serving::Down, is_leader(n), p.len(), n.name.clone()));
    let mut backing_off = None;
    for (n, p) in &broken {
        if let Some(retry_at) = retry_after_failure(spec, n, Revision::repair_at) {
            if now < retry_at {
                backing_off.get_or_insert((
                    n.name.clone(),
                    BackoffStep::Repair,
                    format!("repair failed: {}; next try at {}", n.message.as_deref().unwrap_or("?"), ts(retry_at)),
                ));
                continue;
            }
        }
        // A healthy master with drift waits for the others; the blocker blocks every later
        // (healthy) entry too, so the first blocked one ends the search.
        if let Some((node, why)) = availability_blocker(&nodes, n, now) {
            return match backing_off {
                Some((node, step, reason)) => Decision::Backoff { node, step, reason },
                None => Decision::Wait { node, why },
            };
        }
        return Decision::Go { node: n.name.clone(), revision: repair_revision(&rev, now), why: format!("repair: {}", p.join("; ")) };
    }
    if let Some((node, step, reason)) = backing_off {
        return Decision::Backoff { node, step, reason };
    }

    let mut todo: Vec<(&NodeStatus, String, String)> = Vec::new();
    for n in nodes.iter().filter(|n| fresh(n, now)) {
        let Some((r, why)) = wanted(spec, &rev, n, f.ca_not_after, now) else { continue };
        match retry_renewal(&r, n, now) {
            Retry::First => todo.push((n, r, why)),
            Retry::Next(r, attempt) => todo.push((n, r, format!("{why}; attempt {attempt}, the last one failed: {}", n.message.as_deref().unwrap_or("?")))),
            Retry::Wait(reason) => {
                backing_off.get_or_insert((n.name.clone(), BackoffStep::Renewal, reason));
            }
        }
    }
    let backoff_or = |d: Decision| match &backing_off {
        Some((node, step, reason)) => Decision::Backoff { node: node.clone(), step: *step, reason: reason.clone() },
        None => d,
    };
    // The leader's node goes last; otherwise by name, for a predictable order.
    todo.sort_by_key(|(n, _, _)| (is_leader(n), n.name.clone()));
    let Some((mut next, mut revision, mut why)) = todo.into_iter().next() else { return backoff_or(Decision::Done) };
    // The leader's renewal is due before the others': first renew, early, the followers whose
    // certificates are of the same round (ending at most a round window after the leader's),
    // so the leader's master still goes last. A follower renewed since is not pulled again.
    // Only a renewal the schedule makes due pulls the round in: one asked for (renew now)
    // renews each master asked once, and would otherwise pull the followers it just renewed
    // (their new certificates end minutes after the leader's) again and again.
    let leader_not_after = next.not_after.as_deref().and_then(parse_time).filter(|t| renewal_due(spec, *t, now));
    let renewal = revision.parse::<Revision>().is_ok_and(|r| r.renews().is_some());
    if let (true, true, Some(leader_not_after)) = (is_leader(next), renewal, leader_not_after) {
        let early = nodes
            .iter()
            .filter(|n| !is_leader(n) && fresh(n, now) && n.applied_revision.as_deref().and_then(spec_part).as_deref() == Some(rev.as_str()))
            // One whose renewal failed is retried on its own schedule, not pulled early.
            .filter(|n| n.failed_revision.as_deref().and_then(|r| r.parse::<Revision>().ok()).is_none_or(|r| r.renews().is_none()))
            .filter_map(|n| {
                let not_after = n.not_after.as_deref().and_then(parse_time)?;
                let serial = n.cert_serial.as_deref()?;
                let at = renew_at(spec, not_after);
                (!capped_by_ca(not_after, f.ca_not_after) && not_after <= leader_not_after + round_window(spec)).then_some((at, n, serial))
            })
            .min_by_key(|(at, n, _)| (*at, n.name.clone()));
        if let Some((at, n, serial)) = early {
            next = n;
            revision = Revision::renew(&rev, serial).to_string();
            why = format!("certificate {serial} renewed {}s early, in the leader's round, before the leader's", (at - now).max(0));
        }
    }
    if let Some((node, why)) = availability_blocker(&nodes, next, now).filter(|_| !restart_free(spec, &revision)) {
        return backoff_or(Decision::Wait { node, why });
    }
    Decision::Go { node: next.name.clone(), revision, why }
}

/// Whether master `n` runs our kcm and is not handed back: it has applied a revision of
/// ours, and not a hand back.
pub fn runs_ours(n: &NodeStatus) -> bool {
    n.applied().is_some_and(|r| r.hand_back_at().is_none())
}

/// `spec.handBack` (after any step under way has ended): each master that runs our kcm gets
/// a hand-back step, one at a time, the kcm leader's master last. A follower's hand back
/// takes nothing down (kubeadm's kcm serves before ours stops), so it does not wait for the
/// others' health; the leader's stops ours first (to hand its Lease off) and obeys
/// [`availability_blocker`]. A master without a fresh report is passed over (no helper there to act) and
/// holds the end. A failed hand back (refused, or kubeadm's kcm never healthy: ours kept)
/// is tried again after the repair backoff, and the leader's master waits for it. Renewals and repairs do not run.
fn decide_hand_back(spec: &KubeControllerManagerSpec, rev: &str, nodes: &[NodeStatus], f: &Facts<'_>) -> Decision {
    let now = f.now;
    let mut todo: Vec<&NodeStatus> = nodes.iter().filter(|n| runs_ours(n)).collect();
    todo.sort_by_key(|n| (Some(n.name.as_str()) == f.leader, n.name.clone()));
    let mut held = None;
    for n in todo {
        if !fresh(n, now) {
            held.get_or_insert_with(|| Decision::Wait {
                node: n.name.clone(),
                why: format!("{} has no fresh report: its hand back waits for its helper", n.name),
            });
            continue;
        }
        if let Some(retry_at) = retry_after_failure(spec, n, Revision::hand_back_at) {
            if now < retry_at {
                let reason = format!("hand back failed: {}; next try at {}", n.message.as_deref().unwrap_or("?"), ts(retry_at));
                if !matches!(held, Some(Decision::Backoff { .. })) {
                    held = Some(Decision::Backoff { node: n.name.clone(), step: BackoffStep::HandBack, reason });
                }
                continue;
            }
        }
        // The leader's master goes last: after a follower whose hand back failed, too.
        if Some(n.name.as_str()) == f.leader && matches!(held, Some(Decision::Backoff { .. })) {
            break;
        }
        // The leader's master stops our kcm before kubeadm's serves (its Lease handed off):
        // only while every other master serves.
        if let Some((node, why)) = availability_blocker(nodes, n, now).filter(|_| Some(n.name.as_str()) == f.leader) {
            return Decision::Wait { node, why };
        }
        return Decision::Go { node: n.name.clone(), revision: Revision::hand_back(rev, now).to_string(), why: "spec.handBack: kubeadm".to_string() };
    }
    held.unwrap_or(Decision::HandedBack)
}

/// The KcmNodes (`ours`) whose Node no longer exists (`nodes`: every Node's name). No Node
/// at all is a view that cannot be true (this operator runs on one): none then.
pub fn gone_masters(ours: &[String], nodes: &[String]) -> Vec<String> {
    if nodes.is_empty() {
        return Vec::new();
    }
    ours.iter().filter(|k| !nodes.contains(k)).cloned().collect()
}

/// Each report's `observedAt` and kcm's Lease's `renewTime` as received on this operator's
/// clock ([`crate::receipt`]): what freshness and the leader's liveness are judged by, so a
/// master whose clock is off by 15-30 s is neither stale nor leaderless. A stamp first seen
/// counts from the earlier of itself and now. Returns the Lease as received. `now_ms`: unix
/// milliseconds (a receipt is as precise as the stamp it stands for).
pub fn on_observer_clock(
    receipts: &mut Receipts,
    entries: &mut [NodeStatus],
    lease: Option<&k8s_openapi::api::coordination::v1::LeaseSpec>,
    now_ms: i64,
) -> Option<k8s_openapi::api::coordination::v1::LeaseSpec> {
    use k8s_openapi::jiff::Timestamp;
    for n in entries.iter_mut() {
        let Some(stamp) = n.report.observed_at.clone() else { continue };
        let Ok(t) = stamp.parse::<Timestamp>() else { continue };
        let got = receipts.received(&format!("report/{}", n.name), &stamp, t.as_millisecond().min(now_ms), now_ms);
        n.report.observed_at = Timestamp::from_millisecond(got).ok().map(|t| t.to_string());
    }
    let lease = lease.map(|l| {
        let mut l = l.clone();
        if let Some(renewed) = l.renew_time.as_ref().or(l.acquire_time.as_ref()).map(|t| t.0) {
            let value = format!("{}/{renewed}", l.holder_identity.as_deref().unwrap_or(""));
            let got = receipts.received("lease", &value, renewed.as_millisecond().min(now_ms), now_ms);
            l.renew_time = Timestamp::from_millisecond(got).ok().map(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime);
        }
        l
    });
    receipts.retain(|k| k == "lease" || k.strip_prefix("report/").is_some_and(|m| entries.iter().any(|n| n.name == m)));
    lease
}

/// The node holding kcm's Lease, while the Lease is live: a holder whose
/// `renewTime + leaseDurationSeconds` has passed leads nothing.
pub fn live_leader(lease: Option<&k8s_openapi::api::coordination::v1::LeaseSpec>, now: i64) -> Option<String> {
    let l = lease?;
    let expires = lease_expiry(l)?;
    (now <= expires).then(|| leader_node(l.holder_identity.as_deref())).flatten()
}

/// When a Lease expires unless renewed (unix seconds).
pub fn lease_expiry(l: &k8s_openapi::api::coordination::v1::LeaseSpec) -> Option<i64> {
    let renewed = l.renew_time.as_ref().or(l.acquire_time.as_ref())?.0.as_second();
    Some(renewed + i64::from(l.lease_duration_seconds.unwrap_or(15)))
}

/// Whether kcm's Lease `holder` (`<hostname>_<uuid>`) is the kcm of master `node`, whose
/// kernel hostname is `hostname` (as its helper reports it): kcm names itself by its
/// hostname, which may differ from the Node name (`--hostname-override`, an FQDN, upper case).
pub fn holder_is(holder: Option<&str>, node: &str, hostname: Option<&str>) -> bool {
    leader_node(holder).is_some_and(|h| h == node || hostname.is_some_and(|x| x.eq_ignore_ascii_case(&h)))
}

/// The master kcm's Lease holder host `h` is: the one of that name, or the one whose helper
/// reports that hostname; `h` itself when none does.
pub fn master_of(h: &str, nodes: &[NodeStatus]) -> String {
    nodes
        .iter()
        .find(|n| n.name == h)
        .or_else(|| nodes.iter().find(|n| n.hostname.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(h))))
        .map_or_else(|| h.to_string(), |n| n.name.clone())
}

/// Holder of kcm's Lease, as a host name (`<hostname>_<uuid>` → hostname).
pub fn leader_node(holder: Option<&str>) -> Option<String> {
    let h = holder?.trim();
    let node = h.split_once('_').map_or(h, |(n, _)| n);
    (!node.is_empty()).then(|| node.to_string())
}

/// Sets `type` in `conds`, keeping lastTransitionTime when the status did not change.
pub fn set_condition(conds: &mut Vec<Condition>, type_: &str, status: bool, reason: &str, message: &str, generation: Option<i64>, now: Time) {
    let status = if status { "True" } else { "False" }.to_string();
    let last = conds.iter().find(|c| c.type_ == type_).filter(|c| c.status == status).map(|c| c.last_transition_time.clone()).unwrap_or(now);
    let cond =
        Condition { type_: type_.into(), status, reason: reason.into(), message: message.into(), observed_generation: generation, last_transition_time: last };
    // In place: an unchanged condition leaves the list equal, so no status write is needed.
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => *c = cond,
        None => conds.push(cond),
    }
}

/// A rollout step seen ending: `node`'s KcmNode reports its target revision applied or
/// failed.
#[derive(Clone, Debug, PartialEq)]
pub struct StepEnd {
    pub node: String,
    pub revision: String,
    pub result: StepResult,
    /// Since the operator gave the target, when this process gave it.
    pub took: Option<std::time::Duration>,
}

/// The steps under way, in memory, to count each one once when it ends and time it: a
/// step is counted when its end is seen after it was given ([`StepTracker::given`]) or seen
/// under way; one that ended before this process looked is not counted.
#[derive(Debug, Default)]
pub struct StepTracker {
    /// By node: the target revision under way, and when this process gave it.
    under_way: BTreeMap<String, (String, Option<Instant>)>,
}

impl StepTracker {
    /// The operator gave `node` the target `revision` at `at`.
    pub fn given(&mut self, node: &str, revision: &str, at: Instant) {
        self.under_way.insert(node.to_string(), (revision.to_string(), Some(at)));
    }

    /// One look at the KcmNodes (one entry per master): the steps that ended since the last.
    pub fn observe(&mut self, entries: &[NodeStatus], now: Instant) -> Vec<StepEnd> {
        self.under_way.retain(|node, _| entries.iter().any(|n| &n.name == node));
        let mut ended = Vec::new();
        for n in entries {
            let Some(target) = n.target_revision.as_deref() else { continue };
            let result = if n.applied_revision.as_deref() == Some(target) {
                Some(StepResult::Applied)
            } else if n.failed_revision.as_deref() == Some(target) {
                Some(StepResult::Failed)
            } else {
                None
            };
            match (result, self.under_way.get(&n.name)) {
                (Some(result), Some((revision, given))) if revision == target => {
                    ended.push(StepEnd { node: n.name.clone(), revision: revision.clone(), result, took: given.map(|g| now.saturating_duration_since(g)) });
                    self.under_way.remove(&n.name);
                }
                // Ended before this process saw it under way, or a target just given that
                // the watch has not brought yet: nothing to count now.
                (Some(_), _) => {}
                (None, Some((revision, _))) if revision == target => {}
                (None, _) => {
                    self.under_way.insert(n.name.clone(), (target.to_string(), None));
                }
            }
        }
        ended
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Kube(#[from] KubeError),
}

struct Ctx {
    client: kube::Client,
    /// The cluster CA file (a bundle may hold several CAs: its PEM seeds `kube-root-ca.crt`
    /// when no kcm has published it) and the key the signer signs with (the notAfter of its
    /// certificate caps renewals).
    ca_cert: std::path::PathBuf,
    ca_key: std::path::PathBuf,
    stores: Stores,
    metrics: OperatorMetrics,
    steps: std::sync::Mutex<StepTracker>,
    /// When the reports and kcm's Lease were received, on this operator's clock.
    receipts: std::sync::Mutex<Receipts>,
    /// Renew-now values that do not parse and were told in an Event already.
    announced: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// What the operator knows of the cluster, kept current by watches: a reconcile reads only
/// these, and calls the API only to change something.
#[derive(Clone)]
pub struct Stores {
    pub kcm: Store<KubeControllerManager>,
    pub kcm_nodes: Store<KcmNode>,
    pub nodes: Store<Node>,
    /// kcm's Lease only.
    pub kcm_lease: Store<Lease>,
    /// Helper and rescue pods in [`NAMESPACE`].
    pub helper_pods: Store<Pod>,
    /// The helper DaemonSet only.
    pub helper_ds: Store<DaemonSet>,
    /// `kube-root-ca.crt` in [`NAMESPACE`] only.
    pub root_ca: Store<ConfigMap>,
}

impl Stores {
    /// The stores, and the watches that fill them (run them while the stores are used).
    pub fn watch(client: &kube::Client, wake: Arc<Notify>) -> (Self, Vec<futures::future::BoxFuture<'static, ()>>) {
        let (kcm, a) = reflect(Api::all(client.clone()), by_name(CR_NAME), wake.clone());
        let (kcm_nodes, b) = reflect(Api::all(client.clone()), watcher::Config::default(), wake.clone());
        let (nodes, c) = reflect(Api::all(client.clone()), watcher::Config::default(), wake.clone());
        let (kcm_lease, d) = reflect(Api::namespaced(client.clone(), KCM_LEASE.0), by_name(KCM_LEASE.1), wake.clone());
        let helpers = watcher::Config::default().labels(&format!("app.kubernetes.io/name in ({HELPER_APP},{RESCUE_APP})"));
        let (helper_pods, e) = reflect(Api::namespaced(client.clone(), NAMESPACE), helpers, wake.clone());
        let (helper_ds, f) = reflect(Api::namespaced(client.clone(), NAMESPACE), by_name(HELPER_DAEMONSET), wake.clone());
        let (root_ca, g) = reflect(Api::namespaced(client.clone(), NAMESPACE), by_name(crate::rescue::ROOT_CA_CONFIGMAP), wake);
        (Self { kcm, kcm_nodes, nodes, kcm_lease, helper_pods, helper_ds, root_ca }, vec![a, b, c, d, e, f, g])
    }

    async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.kcm.wait_until_ready().await?;
        self.kcm_nodes.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.kcm_lease.wait_until_ready().await?;
        self.helper_pods.wait_until_ready().await?;
        self.helper_ds.wait_until_ready().await?;
        self.root_ca.wait_until_ready().await
    }
}

/// The CR's aggregate status from the per-node reports (pure): READY counts only fresh
/// healthy reports; Available is True while at least one master is healthy; Degraded names
/// the most urgent reason.
/// What else the Degraded condition may have to say, besides the decision.
#[derive(Clone, Debug, Default)]
pub struct Warnings<'a> {
    /// [`ca_expiring`]'s message.
    pub ca_expiring: Option<&'a str>,
    /// [`renewal_blocked`]'s message.
    pub renewal_blocked: Option<&'a str>,
    /// Renew-now annotations that do not parse ([`renew_requests`]).
    pub bad_renew_requests: &'a [String],
}

pub fn aggregate(
    masters: &[String],
    nodes: &[NodeStatus],
    decision: &Decision,
    warnings: &Warnings<'_>,
    now: i64,
) -> (usize, Vec<(&'static str, bool, String, String)>) {
    let healthy = masters.iter().filter(|m| nodes.iter().any(|n| &n.name == *m && n.healthy && fresh(n, now))).count();
    let available = healthy > 0;
    let mut conds = Vec::new();
    conds.push((
        "Available",
        available,
        if available { "MastersHealthy" } else { "NoHealthyMaster" }.to_string(),
        format!("{healthy}/{} masters run a healthy kube-controller-manager (fresh reports)", masters.len()),
    ));
    let (progressing, preason, pmsg) = match decision {
        Decision::Go { node, revision, .. } => (true, "RollingOut", format!("{node} gets {revision}")),
        Decision::Wait { node, why } => (true, "Waiting", format!("{node}: {why}")),
        Decision::Backoff { node, step, reason } => (true, step.reasons().0, format!("{node}: {reason}")),
        Decision::Done => (false, "UpToDate", "every master runs the spec".to_string()),
        Decision::Paused => (false, "Paused", "spec.paused is true".to_string()),
        Decision::HandedBack => (false, "HandedBack", "spec.handBack: every master runs kubeadm's kcm".to_string()),
        Decision::Stop { node, .. } => (false, "Stopped", format!("stopped at {node}")),
    };
    conds.push(("Progressing", progressing, preason.to_string(), pmsg));
    let pod_errors: Vec<String> =
        masters.iter().filter_map(|m| nodes.iter().find(|n| &n.name == m).and_then(|n| n.operator_pod_error.as_ref().map(|e| format!("{m}: {e}")))).collect();
    let (degraded, dreason, dmsg) = match decision {
        Decision::Stop { node, reason } => (true, "RolloutFailed", format!("{node}: {reason}")),
        Decision::Backoff { node, step, reason } => (true, step.reasons().1, format!("{node}: {reason}")),
        _ if warnings.renewal_blocked.is_some() => {
            (true, "RenewalBlocked", format!("{} (Progressing says what holds it)", warnings.renewal_blocked.unwrap_or_default()))
        }
        _ if !warnings.bad_renew_requests.is_empty() => (
            true,
            "RenewRequestInvalid",
            format!("{} is not an RFC 3339 time: ignored", warnings.bad_renew_requests.join(", ")) + &format!(" ({RENEW_REQUESTED_ANNOTATION})"),
        ),
        _ if !pod_errors.is_empty() => (true, "OperatorPodNotPlaced", pod_errors.join("; ")),
        _ => match warnings.ca_expiring {
            Some(m) => (true, "ClusterCAExpiring", m.to_string()),
            None => (false, "AsExpected", String::new()),
        },
    };
    conds.push(("Degraded", degraded, dreason.to_string(), dmsg));
    let handed_back = *decision == Decision::HandedBack;
    conds.push((
        HANDED_BACK_CONDITION,
        handed_back,
        if handed_back { "HandedBack" } else { "NotHandedBack" }.to_string(),
        if handed_back {
            "kubeadm's kcm static pod runs on every master, our units are stopped and disabled; the helpers remove the operator's static pods (README: Uninstall)"
                .to_string()
        } else {
            String::new()
        },
    ));
    (healthy, conds)
}

/// The CA file as it is, and the notAfter of the certificate the signer signs with (the
/// one of its key, in a bundle of several).
fn read_ca(path: &std::path::Path, key_path: &std::path::Path) -> Option<(String, i64)> {
    let read =
        |p: &std::path::Path, what: &str| std::fs::read_to_string(p).map_err(|e| tracing::warn!("reading the cluster CA's {what} {}: {e}", p.display())).ok();
    let pem = read(path, "certificate")?;
    let key = crate::pki::key_from_pem(&read(key_path, "key")?, "cluster CA key").map_err(|e| tracing::warn!("{e}")).ok()?;
    let (_, info) = crate::pki::signing_cert(&pem, &key, "cluster CA").map_err(|e| tracing::warn!("{e}")).ok()?;
    Some((pem, info.not_after))
}

/// One look at the stores: rescue, decide, write what changed (KcmNode specs, the CR's
/// status). Returns when to look again at the latest.
async fn reconcile(ctx: &Ctx) -> Result<Duration, RolloutError> {
    let Some(kcm) = ctx.stores.kcm.get(&ObjectRef::new(CR_NAME)) else {
        return Ok(Duration::from_secs(crate::api::REPORT_PERIOD_SECS as u64));
    };
    let spec = &kcm.spec;
    let mut masters: Vec<String> = ctx.stores.nodes.state().iter().filter(|n| is_master(n, &spec.master_selector)).map(|n| n.name_any()).collect();
    masters.sort();
    let lease = ctx.stores.kcm_lease.get(&ObjectRef::new(KCM_LEASE.1).within(KCM_LEASE.0));
    let now = k8s_openapi::jiff::Timestamp::now();
    let ca = read_ca(&ctx.ca_cert, &ctx.ca_key);

    // Every master needs a running helper, also when no kcm (DaemonSet controller) runs.
    let pods = ctx.stores.helper_pods.state();
    let ds = ctx.stores.helper_ds.state().first().cloned();
    let root_ca_missing = ctx.stores.root_ca.state().is_empty();
    match crate::rescue::run_once(&ctx.client, &masters, &pods, ds.as_deref(), root_ca_missing, ca.as_ref().map(|(pem, _)| pem.as_str()), now.as_second()).await
    {
        Ok(done) => {
            for d in done {
                tracing::info!("rescue: {d}");
                publish(ctx, &kcm, None, EventType::Normal, "Rescue", &d).await;
            }
        }
        Err(e) => {
            tracing::warn!("rescue: {e}");
            ctx.metrics.reconcile_errors.inc(&["rescue"]);
        }
    }

    let owner = kcm.controller_owner_ref(&()).expect("a KubeControllerManager from the API has a uid");
    let is_ours = |n: &KcmNode| n.owner_references().iter().any(|o| o.uid == owner.uid);
    let kcm_nodes: BTreeMap<String, Arc<KcmNode>> = ctx.stores.kcm_nodes.state().into_iter().map(|n| (n.name_any(), n)).collect();
    // Only this KubeControllerManager's KcmNodes count (one left by a deleted CR is replaced).
    let mut entries: Vec<NodeStatus> = masters
        .iter()
        .map(|m| kcm_nodes.get(m).filter(|n| is_ours(n)).map_or_else(|| NodeStatus { name: m.clone(), ..Default::default() }, |n| NodeStatus::of(n)))
        .collect();
    let annotation = |m: &kube::api::ObjectMeta| m.annotations.as_ref().and_then(|a| a.get(RENEW_REQUESTED_ANNOTATION)).cloned();
    let (requests, bad_requests) = renew_requests(
        annotation(&kcm.metadata).as_deref(),
        &masters.iter().map(|m| (m.clone(), kcm_nodes.get(m).and_then(|n| annotation(&n.metadata)))).collect::<Vec<_>>(),
    );
    for n in entries.iter_mut() {
        n.renew_requested_at = requests.get(&n.name).copied();
    }
    let lease_spec = {
        let mut receipts = ctx.receipts.lock().unwrap_or_else(|p| p.into_inner());
        on_observer_clock(&mut receipts, &mut entries, lease.as_ref().and_then(|l| l.spec.as_ref()), now.as_millisecond())
    };
    let leader = live_leader(lease_spec.as_ref(), now.as_second()).map(|h| master_of(&h, &entries));
    let status = kcm.status.clone().unwrap_or_default();
    let ca_not_after = ca.as_ref().map(|(_, t)| *t);
    let facts = Facts { masters: &masters, status: &entries, leader: leader.as_deref(), ca_not_after, now: now.as_second() };
    let decision = decide(spec, &facts);
    let ended = ctx.steps.lock().unwrap_or_else(|p| p.into_inner()).observe(&entries, Instant::now());
    for e in ended {
        ctx.metrics.step_ended(&e.revision, e.result, e.took);
    }

    // Targets: every master keeps its current target; the one whose turn it is gets the new one.
    let mut targets: BTreeMap<String, Option<String>> = entries.iter().map(|n| (n.name.clone(), n.target_revision.clone())).collect();
    if let Decision::Go { node, revision, why } = &decision {
        targets.insert(node.clone(), Some(revision.clone()));
        let note = format!("{node}: revision {revision} ({why})");
        tracing::info!("rollout: {note}");
        publish(ctx, &kcm, kcm_nodes.get(node).map(|n| &**n), EventType::Normal, "RolloutStep", &note).await;
    }
    let was_degraded = |reason: &str| status.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == reason);
    if let Decision::Stop { node, reason } = &decision {
        if !was_degraded("RolloutFailed") {
            publish(ctx, &kcm, kcm_nodes.get(node).map(|n| &**n), EventType::Warning, "RolloutStopped", &format!("{node}: {reason}")).await;
        }
    }
    if let Decision::Backoff { node, step, reason } = &decision {
        let failed = step.reasons().1;
        if !was_degraded(failed) {
            publish(ctx, &kcm, kcm_nodes.get(node).map(|n| &**n), EventType::Warning, failed, &format!("{node}: {reason}")).await;
        }
    }
    // A renew-now value that does not parse: one Event per value (the condition says it too).
    let unannounced: Vec<String> = {
        let mut announced = ctx.announced.lock().unwrap_or_else(|p| p.into_inner());
        announced.retain(|b| bad_requests.contains(b));
        bad_requests.iter().filter(|b| announced.insert((*b).clone())).cloned().collect()
    };
    for b in unannounced {
        publish(ctx, &kcm, None, EventType::Warning, "RenewRequestInvalid", &format!("{b} is not an RFC 3339 time ({RENEW_REQUESTED_ANNOTATION}): ignored"))
            .await;
    }

    // Each master's KcmNode spec: written only when it differs from what is there.
    let renewals = renewal_schedule(spec, &entries, ca_not_after);
    let kcm_nodes_api: Api<KcmNode> = Api::all(ctx.client.clone());
    let mut aggregate_entries = Vec::new();
    for (name, target) in &targets {
        let want = KcmNodeSpec { target_revision: target.as_deref().and_then(|t| t.parse::<Revision>().ok()), renew_at: renewals.get(name).map(|t| ts(*t)) };
        let current = kcm_nodes.get(name);
        let owned = current.is_some_and(|n| is_ours(n));
        if let Some(stale) = current.filter(|_| !owned) {
            // Left by a deleted KubeControllerManager (no garbage collector runs without kcm):
            // its status describes another install. Replaced by a fresh one.
            let dp =
                kube::api::DeleteParams { preconditions: Some(kube::api::Preconditions { uid: stale.uid(), resource_version: None }), ..Default::default() };
            match kcm_nodes_api.delete(name, &dp).await {
                Ok(_) => tracing::info!("KcmNode {name} belonged to another KubeControllerManager: deleted, to be made anew"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(kube_err(format!("deleting the stale KcmNode {name}"))(e).into()),
            }
            continue;
        }
        if current.map(|n| &n.spec) != Some(&want) {
            let mut obj = KcmNode::new(name, want.clone());
            obj.metadata.owner_references = Some(vec![owner.clone()]);
            let body = serde_json::to_value(&obj).expect("a KcmNode serializes");
            kcm_nodes_api
                .patch(name, &PatchParams::apply(OPERATOR_MANAGER).force(), &Patch::Apply(body))
                .await
                .map_err(kube_err(format!("writing KcmNode {name}")))?;
        }
        let mut entry = entries.iter().find(|n| &n.name == name).cloned().unwrap_or_default();
        entry.target_revision = want.target_revision.as_ref().map(Revision::to_string);
        entry.renew_at = want.renew_at;
        aggregate_entries.push(entry);
    }

    // A master whose Node was deleted: its KcmNode goes with it (READY and the rollout count
    // only the masters that exist; nothing waits on it). A Node still there but no longer
    // selected keeps its KcmNode: its kcm may still run there.
    let node_names: Vec<String> = ctx.stores.nodes.state().iter().map(|n| n.name_any()).collect();
    let ours: Vec<String> = kcm_nodes.values().filter(|n| is_ours(n)).map(|n| n.name_any()).collect();
    for name in gone_masters(&ours, &node_names) {
        let dp = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions { uid: kcm_nodes.get(&name).and_then(|n| n.uid()), resource_version: None }),
            ..Default::default()
        };
        match kcm_nodes_api.delete(&name, &dp).await {
            Ok(_) => publish(ctx, &kcm, None, EventType::Normal, "MasterRemoved", &format!("Node {name} is gone: its KcmNode was deleted")).await,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(kube_err(format!("deleting the KcmNode of the deleted Node {name}"))(e).into()),
        }
    }

    if let Decision::Go { node, revision, .. } = &decision {
        ctx.steps.lock().unwrap_or_else(|p| p.into_inner()).given(node, revision, Instant::now());
    }

    let ca_message = ca_expiring(spec, ca_not_after, now.as_second());
    // Handing back, nothing is renewed: not a blocked renewal.
    let blocked = renewal_blocked(spec, &entries, ca_not_after, now.as_second()).filter(|_| spec.hand_back.is_none());
    let warnings = Warnings { ca_expiring: ca_message.as_deref(), renewal_blocked: blocked.as_deref(), bad_renew_requests: &bad_requests };
    let (healthy, wanted_conds) = aggregate(&masters, &entries, &decision, &warnings, now.as_second());
    ctx.metrics.masters(&entries, &renewals, now.as_second());
    ctx.metrics.kcm_leader_present.set_bool(&[], leader.is_some());
    ctx.metrics.conditions(wanted_conds.iter().map(|(t, v, _, _)| (*t, *v)));
    let gen = kcm.meta().generation;
    let mut conds = status.conditions.clone();
    for (type_, value, reason, message) in &wanted_conds {
        set_condition(&mut conds, type_, *value, reason, message, gen, Time(now));
    }
    let want = KubeControllerManagerStatus {
        observed_generation: gen,
        // Left out when unknown: server-side apply then removes what this manager set before.
        leader: leader.clone(),
        ready: Some(format!("{healthy}/{}", masters.len())),
        expires: entries.iter().filter_map(|n| n.not_after.clone()).min(),
        next_renewal: masters.iter().filter_map(|m| renewals.get(m)).min().map(|t| ts(*t)),
        nodes: aggregate_entries,
        conditions: conds,
    };
    if kcm.status.as_ref() != Some(&want) {
        let body = json!({"apiVersion": KubeControllerManager::api_version(&()), "kind": KubeControllerManager::kind(&()), "metadata": {"name": CR_NAME}, "status": want});
        Api::<KubeControllerManager>::all(ctx.client.clone())
            .patch_status(CR_NAME, &PatchParams::apply(OPERATOR_MANAGER).force(), &Patch::Apply(body))
            .await
            .map_err(kube_err("writing status"))?;
    }

    // Look again at the nearest deadline: soon while a rollout moves; when the Lease would
    // expire (so LEADER empties on time); at the latest after one report period, so stale
    // reports and missing helpers are seen. Changes wake the loop earlier.
    let next = match decision {
        Decision::Go { .. } | Decision::Wait { .. } => 3,
        Decision::Stop { .. } | Decision::Paused | Decision::Backoff { .. } | Decision::Done | Decision::HandedBack => crate::api::REPORT_PERIOD_SECS,
    };
    let until_lease = lease_spec.as_ref().and_then(lease_expiry).filter(|_| leader.is_some()).map(|t| t + 1 - now.as_second());
    let secs = until_lease.map_or(next, |u| u.clamp(1, next));
    Ok(Duration::from_secs(secs as u64))
}

/// One Event per step (see [`crate::events`]): regarding the master's KcmNode when it is
/// about one master, related to the CR; regarding the CR otherwise.
async fn publish(ctx: &Ctx, kcm: &KubeControllerManager, node: Option<&KcmNode>, type_: EventType, reason: &str, note: &str) {
    let (regarding, secondary) = match node {
        Some(n) => (n.object_ref(&()), Some(kcm.object_ref(&()))),
        None => (kcm.object_ref(&()), None),
    };
    crate::events::publish(&ctx.client, &regarding, secondary, type_, "Rollout", reason, note).await;
}

/// Runs the rollout until a watch ends: looks at the stores whenever something changes
/// (or a deadline comes), never polls the API. `ca_cert`, `ca_key`: the cluster CA the
/// signer uses; `metrics`: where the per-master series, the conditions and the steps are
/// exported.
pub async fn run(client: kube::Client, ca_cert: std::path::PathBuf, ca_key: std::path::PathBuf, metrics: OperatorMetrics) {
    let wake = Arc::new(Notify::new());
    let (stores, watches) = Stores::watch(&client, wake.clone());
    let ctx = Ctx { client, ca_cert, ca_key, stores, metrics, steps: Default::default(), receipts: Default::default(), announced: Default::default() };
    let control = async {
        if ctx.stores.ready().await.is_err() {
            return;
        }
        loop {
            let again = match reconcile(&ctx).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("rollout: {e}");
                    ctx.metrics.reconcile_errors.inc(&["rollout"]);
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(again) => {}
            }
            // Let a burst of changes (a report and the Lease together) settle into one look.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = futures::future::join_all(watches) => tracing::warn!("rollout: a watch ended"),
        _ = control => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KcmNodeStatus;

    fn spec() -> KubeControllerManagerSpec {
        serde_json::from_value(json!({"apiserverUrl": "https://10.0.0.10:6443"})).unwrap()
    }
    fn masters() -> Vec<String> {
        vec!["m1".into(), "m2".into(), "m3".into()]
    }
    const NOW: i64 = 1_800_000_000; // 2027-01-15
    fn at(t: i64) -> String {
        k8s_openapi::jiff::Timestamp::from_second(t).unwrap().to_string()
    }
    fn done(name: &str, rev: &str) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            target_revision: Some(rev.into()),
            renew_at: None,
            report: KcmNodeStatus {
                applied_revision: Some(rev.into()),
                healthy: true,
                unit_active: true,
                cert_serial: Some("AA".into()),
                not_after: Some("2030-01-01T00:00:00Z".into()),
                observed_at: Some(at(NOW - 2)),
                ..Default::default()
            },
            renew_requested_at: None,
        }
    }
    fn reported(name: &str) -> NodeStatus {
        NodeStatus { name: name.into(), report: KcmNodeStatus { observed_at: Some(at(NOW - 1)), ..Default::default() }, ..Default::default() }
    }
    fn run(s: &KubeControllerManagerSpec, st: &[NodeStatus], leader: Option<&str>) -> Decision {
        decide(s, &Facts { masters: &masters(), status: st, leader, ca_not_after: None, now: NOW })
    }

    #[test]
    fn fresh_cluster_starts_with_a_follower_and_leader_goes_last() {
        let s = spec();
        let rev = spec_revision(&s);
        let all = [reported("m1"), reported("m2"), reported("m3")];
        let d = run(&s, &all, Some("m1"));
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m2" && *revision == rev), "{d:?}");
        let st = vec![reported("m1"), done("m2", &rev), done("m3", &rev)];
        assert!(matches!(run(&s, &st, Some("m1")), Decision::Go { node, .. } if node == "m1"));
        let st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        assert_eq!(run(&s, &st, Some("m1")), Decision::Done);
    }

    #[test]
    fn hand_back_goes_one_master_at_a_time_leader_last_and_ends_handed_back() {
        let mut s = spec();
        s.hand_back = Some(crate::api::HandBack::Kubeadm);
        let rev = spec_revision(&s);
        assert_eq!(rev, spec_revision(&spec()), "handing back is not a new spec revision");
        let handed = |name: &str, at: i64| {
            let r = Revision::hand_back(&rev, at).to_string();
            let mut n = done(name, &r);
            n.report.unit_active = false;
            n
        };
        // Followers first, by name, whatever their health: a hand back takes nothing down.
        let mut sick = done("m2", &rev);
        sick.report.healthy = false;
        let st = vec![done("m1", &rev), sick.clone(), done("m3", &rev)];
        let d = run(&s, &st, Some("m1"));
        assert!(
            matches!(&d, Decision::Go { node, revision, .. } if node == "m2" && revision.parse::<Revision>().unwrap().hand_back_at() == Some(NOW)),
            "{d:?}"
        );
        // A step under way (the one just given) holds the next.
        let mut going = done("m2", &rev);
        going.target_revision = Some(Revision::hand_back(&rev, NOW).to_string());
        assert!(matches!(run(&s, &[done("m1", &rev), going, done("m3", &rev)], Some("m1")), Decision::Wait { node, .. } if node == "m2"));
        let st = vec![done("m1", &rev), handed("m2", NOW - 60), done("m3", &rev)];
        assert!(matches!(run(&s, &st, Some("m1")), Decision::Go { node, .. } if node == "m3"));
        let st = vec![done("m1", &rev), handed("m2", NOW - 60), handed("m3", NOW - 30)];
        assert!(matches!(run(&s, &st, Some("m1")), Decision::Go { node, .. } if node == "m1"), "the leader's master last");
        let mut down = handed("m3", NOW - 30);
        down.report.healthy = false;
        let st = vec![done("m1", &rev), handed("m2", NOW - 60), down];
        assert!(
            matches!(run(&s, &st, Some("m1")), Decision::Wait { node, .. } if node == "m3"),
            "the leader's master stops ours first: only while the others serve"
        );
        // Never adopted (no kcm of ours there): nothing to hand back.
        let st = vec![reported("m1"), handed("m2", NOW - 60), handed("m3", NOW - 30)];
        assert_eq!(run(&s, &st, Some("m1")), Decision::HandedBack);
        // No renewal, no repair while handing back: an expired certificate is handed back too.
        let mut expired = done("m1", &rev);
        expired.report.not_after = Some(at(NOW - 10));
        let st = vec![expired, handed("m2", NOW - 60), handed("m3", NOW - 30)];
        assert!(matches!(run(&s, &st, None), Decision::Go { node, revision, .. } if node == "m1" && revision.contains("/hand-back-")));
        // Undone (handBack removed): a master handed back gets the spec again (adopted anew).
        let st = vec![handed("m1", NOW - 90), handed("m2", NOW - 60), handed("m3", NOW - 30)];
        assert!(matches!(run(&spec(), &st, Some("m1")), Decision::Go { node, revision, .. } if node == "m2" && *revision == rev));
    }

    #[test]
    fn a_failed_hand_back_is_retried_after_the_backoff_and_a_stale_master_holds_the_end() {
        let mut s = spec();
        s.hand_back = Some(crate::api::HandBack::Kubeadm);
        let rev = spec_revision(&s);
        let mut refused = done("m2", &rev);
        let given = NOW - 5;
        refused.target_revision = Some(Revision::hand_back(&rev, given).to_string());
        refused.report.failed_revision = refused.target_revision.clone();
        refused.report.message = Some("no kubeadm manifest kept aside".into());
        // The others go meanwhile; the refused one backs off.
        let d = run(&s, &[done("m1", &rev), refused.clone(), done("m3", &rev)], Some("m1"));
        assert!(matches!(&d, Decision::Go { node, .. } if node == "m3"), "{d:?}");
        let handed = |name: &str| {
            let mut n = done(name, &Revision::hand_back(&rev, NOW - 100).to_string());
            n.report.unit_active = false;
            n
        };
        let d = run(&s, &[done("m1", &rev), refused.clone(), handed("m3")], Some("m1"));
        assert!(matches!(&d, Decision::Backoff { node, .. } if node == "m2"), "the leader's master waits for the follower's retry: {d:?}");
        let d = run(&s, &[handed("m1"), refused.clone(), handed("m3")], None);
        assert!(matches!(&d, Decision::Backoff { node, step: BackoffStep::HandBack, reason } if node == "m2" && reason.contains("kept aside")), "{d:?}");
        let mut st = vec![handed("m1"), refused, handed("m3")];
        for n in st.iter_mut() {
            n.report.observed_at = Some(at(given + 599));
        }
        let later = decide(&s, &Facts { masters: &masters(), status: &st, leader: None, ca_not_after: None, now: given + 600 });
        assert!(
            matches!(&later, Decision::Go { node, revision, .. } if node == "m2" && revision.ends_with(&format!("hand-back-{}", given + 600))),
            "{later:?}"
        );
        // A master whose helper does not report cannot be handed back: it holds the end.
        let mut stale = done("m2", &rev);
        stale.report.observed_at = Some(at(NOW - 120));
        let d = run(&s, &[handed("m1"), stale, handed("m3")], None);
        assert!(matches!(&d, Decision::Wait { node, .. } if node == "m2"), "{d:?}");
        let (_, conds) = aggregate(&masters(), &[], &d, &Warnings::default(), NOW);
        assert!(conds.iter().any(|(t, v, _, _)| *t == HANDED_BACK_CONDITION && !*v));
        let (_, conds) = aggregate(&masters(), &[], &Decision::HandedBack, &Warnings::default(), NOW);
        assert!(conds.iter().any(|(t, v, r, _)| *t == HANDED_BACK_CONDITION && *v && r == "HandedBack"), "{conds:?}");
    }

    #[test]
    fn renew_now_renews_each_master_issued_before_the_request_once_leader_last() {
        let s = spec();
        let rev = spec_revision(&s);
        let issued = |n: &mut NodeStatus, t: i64, serial: &str| {
            n.report.not_before = Some(at(t - 300));
            n.report.not_after = Some(at(t + 8760 * 3600));
            n.report.cert_serial = Some(serial.into());
        };
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        for n in st.iter_mut() {
            issued(n, NOW - 3600, "AA");
            n.renew_requested_at = Some(NOW - 60);
        }
        // The leader (m2) last: m1, then m3, then m2, each once.
        let mut order = Vec::new();
        for _ in 0..4 {
            match run(&s, &st, Some("m2")) {
                Decision::Go { node, revision, why } => {
                    assert_eq!(revision, Revision::renew(&rev, "AA").to_string(), "{why}");
                    assert!(why.contains("requested at"), "{why}");
                    let n = st.iter_mut().find(|n| n.name == node).unwrap();
                    issued(n, NOW - 30, "BB");
                    order.push(node);
                }
                Decision::Done => break,
                other => panic!("{other:?} after {order:?}"),
            }
        }
        assert_eq!(order, ["m1", "m3", "m2"]);
        // A certificate issued after the request, or one whose issue time is not reported: nothing.
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        for n in st.iter_mut() {
            issued(n, NOW - 30, "AA");
            n.renew_requested_at = Some(NOW - 60);
        }
        st[0].report.not_before = None;
        assert_eq!(run(&s, &st, Some("m2")), Decision::Done);
    }

    #[test]
    fn renew_requests_take_the_latest_of_the_cr_and_the_node_and_name_bad_values() {
        let nodes = vec![("m1".to_string(), None), ("m2".to_string(), Some("2027-01-02T00:00:00Z".to_string())), ("m3".to_string(), Some("soon".to_string()))];
        let (got, bad) = renew_requests(Some("2027-01-01T00:00:00Z"), &nodes);
        let t = |s: &str| parse_time(s).unwrap();
        assert_eq!(got.get("m1"), Some(&t("2027-01-01T00:00:00Z")), "the CR's, for every master");
        assert_eq!(got.get("m2"), Some(&t("2027-01-02T00:00:00Z")), "the node's, later");
        assert_eq!(got.get("m3"), Some(&t("2027-01-01T00:00:00Z")), "a bad node value leaves the CR's");
        assert_eq!(bad, ["KcmNode m3: \"soon\""]);
        let (got, bad) = renew_requests(Some("yesterday"), &nodes[..1]);
        assert!(got.is_empty() && bad == ["KubeControllerManager kube-controller-manager: \"yesterday\""], "{got:?} {bad:?}");
        let mut st = vec![done("m1", "r")];
        st[0].report.operator_pod_error = None;
        let (_, conds) = aggregate(&["m1".to_string()], &st, &Decision::Done, &Warnings { bad_renew_requests: &bad, ..Default::default() }, NOW);
        assert!(conds.iter().any(|(t, v, r, m)| *t == "Degraded" && *v && r == "RenewRequestInvalid" && m.contains("yesterday")), "{conds:?}");
    }

    #[test]
    fn only_the_kcm_nodes_of_deleted_nodes_are_gone() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(gone_masters(&names(&["m1", "m2", "m4"]), &names(&["m1", "m2", "m3", "w1"])), names(&["m4"]));
        assert!(gone_masters(&names(&["m1"]), &names(&["m1"])).is_empty());
        assert!(gone_masters(&names(&["m1"]), &[]).is_empty(), "no Node at all is never believed");
    }

    #[test]
    fn no_step_for_a_master_without_a_reporting_helper() {
        let s = spec();
        // Only m3's helper reports: m3 goes first, m1 and m2 wait for theirs.
        let d = run(&s, &[reported("m3")], None);
        assert!(matches!(&d, Decision::Go { node, .. } if node == "m3"), "{d:?}");
        assert_eq!(run(&s, &[], None), Decision::Done);
    }

    #[test]
    fn one_at_a_time_waits_for_the_step_under_way() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut m2 = done("m2", "old");
        m2.target_revision = Some(rev.clone());
        let d = run(&s, &[m2], None);
        assert!(matches!(&d, Decision::Wait { node, .. } if node == "m2"), "{d:?}");
    }

    #[test]
    fn a_healthy_master_is_never_taken_down_while_another_is_unhealthy_or_unknown() {
        let mut s = spec();
        let rev = spec_revision(&s);
        let mut st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        s.kcm.verbosity = 4; // a spec change for everyone
                             // m1's helper has not reported for a minute: nobody is taken down.
        st[0].observed_at = Some(at(NOW - 60));
        let d = run(&s, &st, None);
        assert!(matches!(&d, Decision::Wait { node, why } if node == "m1" && why.contains("no fresh report")), "{d:?}");
    }

    #[test]
    fn an_unhealthy_master_is_repaired_not_waited_for() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        st[0].healthy = false;
        let d = run(&s, &st, Some("m2"));
        assert_eq!(d, Decision::Go { node: "m1".into(), revision: repair_revision(&rev, NOW), why: "repair: kcm does not answer /healthz".into() });
    }

    #[test]
    fn every_master_down_repairs_one_at_a_time_closest_to_healthy_first() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        for n in &mut st {
            n.healthy = false;
            n.unit_active = false;
        }
        st[0].drift = vec!["/etc/kubernetes/kcm/kcm.pem: missing".into()];
        st[1].not_after = Some(at(NOW - 10)); // expired
                                              // m3 has one problem, m1 and m2 two each.
        let d = run(&s, &st, None);
        assert!(matches!(&d, Decision::Go { node, why, .. } if node == "m3" && why.contains("not active")), "{d:?}");
        // While m3's repair runs, nothing else moves.
        st[2].target_revision = Some(repair_revision(&rev, NOW));
        assert!(matches!(run(&s, &st, None), Decision::Wait { node, .. } if node == "m3"));
        // m3 repaired: next m1 (by name among equals), never two at once.
        st[2] = done("m3", &repair_revision(&rev, NOW));
        let d = run(&s, &st, None);
        assert!(matches!(&d, Decision::Go { node, why, .. } if node == "m1" && why.contains("missing")), "{d:?}");
    }

    #[test]
    fn expired_or_drifted_counts_as_due_now() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        st[1].not_after = Some(at(NOW - 1));
        let d = run(&s, &st, None);
        assert!(matches!(&d, Decision::Go { node, revision, why } if node == "m2" && revision.contains("/repair-") && why.contains("expired")), "{d:?}");
        let mut st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        st[2].drift = vec!["/etc/kubernetes/kcm/kube-controller-manager.pem: changed".into()];
        assert!(matches!(run(&s, &st, None), Decision::Go { node, .. } if node == "m3"));
    }

    /// What one master can be, for the exhaustive check of [`decide`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Case {
        /// Runs the spec's revision, healthy.
        Current,
        /// Runs an older spec, healthy: wants the spec.
        Old,
        /// Runs the spec's revision, kcm down.
        Down,
        /// Ran our kcm; its helper has not reported for 10 minutes.
        Stale,
        /// No KcmNode status at all.
        NoReport,
        /// Its helper reports; no kcm of ours yet (kubeadm's, or none).
        Foreign,
        /// Healthy, but a file drifted.
        Drifted,
        /// Healthy by /healthz, but its certificate expired.
        Expired,
        /// Healthy, its certificate due for renewal (not expired).
        Due,
        /// Its step was given an hour ago and its helper has not reported since (powered off).
        LostStep,
        /// Healthy, its certificate due, the renewal's first attempt failed (rolled back).
        FailedRenewal,
        /// A step under way.
        UnderWay,
        /// The spec's revision failed here and was rolled back (healthy again).
        FailedSpec,
        /// Down, and its last repair failed 10 s ago: backing off.
        FailedRepair,
    }
    const CASES: [Case; 14] = [
        Case::FailedRenewal,
        Case::Due,
        Case::LostStep,
        Case::Current,
        Case::Old,
        Case::Down,
        Case::Stale,
        Case::NoReport,
        Case::Foreign,
        Case::Drifted,
        Case::Expired,
        Case::UnderWay,
        Case::FailedSpec,
        Case::FailedRepair,
    ];

    fn master(name: &str, c: Case, rev: &str) -> NodeStatus {
        let mut n = done(name, rev);
        match c {
            Case::Current => {}
            Case::Old => n = done(name, "old"),
            Case::Down => (n.healthy, n.unit_active) = (false, false),
            Case::Stale => n.observed_at = Some(at(NOW - 600)),
            Case::NoReport => n = NodeStatus { name: name.into(), ..Default::default() },
            Case::Foreign => n = reported(name),
            Case::Drifted => n.drift = vec!["/etc/kubernetes/kcm/kcm.pem: changed since the helper wrote it".into()],
            Case::Expired => n.not_after = Some(at(NOW - 10)),
            Case::Due => n.not_after = Some(at(NOW + 3600)),
            Case::FailedRenewal => {
                n.not_after = Some(at(NOW + 3600));
                let r = Revision::renew(rev, "AA").to_string();
                n.target_revision = Some(r.clone());
                n.failed_revision = Some(r);
            }
            Case::LostStep => {
                n = done(name, "old");
                n.target_revision = Some(rev.into());
                n.observed_at = Some(at(NOW - 3600));
            }
            Case::UnderWay => {
                n = done(name, "old");
                n.target_revision = Some(rev.into());
            }
            Case::FailedSpec => {
                n = done(name, "old");
                n.target_revision = Some(rev.into());
                n.failed_revision = Some(rev.into());
            }
            Case::FailedRepair => {
                let r = repair_revision(rev, NOW - 10);
                (n.healthy, n.unit_active) = (false, true);
                n.target_revision = Some(r.clone());
                n.failed_revision = Some(r);
            }
        }
        n
    }

    /// Every combination of `count` masters over [`CASES`], with each choice of leader
    /// (none, or any master): `check` gets the masters, their states, the leader, and the decision.
    type Check<'a> = dyn FnMut(&[NodeStatus], &[Case], Option<&str>, &Decision) + 'a;

    fn every_cluster(count: usize, check: &mut Check<'_>) -> usize {
        every_cluster_of(&spec(), count, check)
    }

    fn every_cluster_of(s: &KubeControllerManagerSpec, count: usize, check: &mut Check<'_>) -> usize {
        let rev = spec_revision(s);
        let names: Vec<String> = (1..=count).map(|i| format!("m{i}")).collect();
        let mut seen = 0;
        for code in 0..CASES.len().pow(count as u32) {
            let cases: Vec<Case> = (0..count).map(|i| CASES[code / CASES.len().pow(i as u32) % CASES.len()]).collect();
            let st: Vec<NodeStatus> = names.iter().zip(&cases).map(|(n, c)| master(n, *c, &rev)).collect();
            for leader in std::iter::once(None).chain(names.iter().map(|n| Some(n.as_str()))) {
                let d = decide(s, &Facts { masters: &names, status: &st, leader, ca_not_after: None, now: NOW });
                check(&st, &cases, leader, &d);
                seen += 1;
            }
        }
        seen
    }

    /// The class of work a master is in when a step may go to it (the leader's master is
    /// last within its class): 0 a repair of a master that is down, 1 a repair of a healthy
    /// one (drift, expiry), 2 a spec change or renewal. `None`: nothing to give it now.
    fn class(s: &KubeControllerManagerSpec, n: &NodeStatus, c: Case) -> Option<u8> {
        let rev = spec_revision(s);
        match (serving(n, NOW), problems(n, NOW).is_empty()) {
            _ if c == Case::FailedRepair => None, // backing off
            (Serving::Down, false) => Some(0),
            (Serving::Up, false) => Some(1),
            _ if fresh(n, NOW) && wanted(s, &rev, n, None, NOW).is_some() => Some(2),
            _ => None,
        }
    }

    #[test]
    fn every_cluster_of_3_and_4_masters_hands_back_one_at_a_time_leader_last() {
        let mut s = spec();
        s.hand_back = Some(crate::api::HandBack::Kubeadm);
        for count in [3, 4] {
            let mut violations: Vec<String> = Vec::new();
            let seen = every_cluster_of(&s, count, &mut |st, cases, leader, d| {
                let mut bad = |what: &str| {
                    if violations.len() < 20 {
                        violations.push(format!("{what}: {cases:?} leader {leader:?} -> {d:?}"));
                    }
                };
                let ours: Vec<&NodeStatus> = st.iter().filter(|n| runs_ours(n)).collect();
                if cases.contains(&Case::UnderWay) && matches!(d, Decision::Go { .. }) {
                    bad("a step given while one is under way");
                }
                if matches!(d, Decision::Stop { .. }) {
                    bad("a hand back never stops: it retries");
                }
                if (*d == Decision::HandedBack) != (ours.is_empty() && !cases.contains(&Case::UnderWay)) {
                    bad("HandedBack exactly when no master runs our kcm");
                }
                let Decision::Go { node, revision, .. } = d else { return };
                let n = st.iter().find(|n| &n.name == node).unwrap();
                if !revision.parse::<Revision>().is_ok_and(|r| r.hand_back_at() == Some(NOW)) {
                    bad("only hand-back steps");
                }
                if !runs_ours(n) || !fresh(n, NOW) {
                    bad("a hand back for a master without our kcm or without a fresh report");
                }
                if Some(node.as_str()) == leader {
                    // Last: no other master could have gone instead (fresh, ours, not backing off).
                    let other = st.iter().zip(cases).any(|(o, c)| &o.name != node && runs_ours(o) && fresh(o, NOW) && *c != Case::FailedRepair);
                    if other {
                        bad("the leader's master before a follower that could go");
                    }
                    // (A leader's master whose kcm is down already takes nothing down.)
                    if serving(n, NOW) != Serving::Down && st.iter().any(|o| &o.name != node && matches!(serving(o, NOW), Serving::Down | Serving::Unknown)) {
                        bad("the leader's kcm stopped while another master does not serve");
                    }
                }
            });
            assert!(
                violations.is_empty(),
                "{} of {seen} hand-back decisions for {count} masters break an invariant:\n{}",
                violations.len(),
                violations.join("\n")
            );
            println!("{count} masters, handing back: {seen} decisions checked");
        }
    }

    #[test]
    fn every_cluster_of_3_and_4_masters_keeps_the_availability_invariants() {
        let s = spec();
        for count in [3, 4] {
            let mut violations: Vec<String> = Vec::new();
            let seen = every_cluster(count, &mut |st, cases, leader, d| {
                let mut bad = |what: &str| {
                    if violations.len() < 20 {
                        violations.push(format!("{what}: {cases:?} leader {leader:?} -> {d:?}"));
                    }
                };
                let under_way = cases.contains(&Case::UnderWay);
                // Only a failed spec apply stops the rollout; a failed renewal is retried.
                if matches!(d, Decision::Stop { .. }) && !cases.contains(&Case::FailedSpec) {
                    bad("a stop without a failed spec apply");
                }
                // A lost step holds nothing: the wait it would cause names it "applying".
                if let Decision::Wait { node, why } = d {
                    if why.starts_with("applying") && st.iter().zip(cases).any(|(n, c)| &n.name == node && *c == Case::LostStep) {
                        bad("a lost step holds the one-at-a-time wait");
                    }
                }
                let stop = cases.contains(&Case::FailedSpec);
                if under_way && !matches!(d, Decision::Wait { .. }) {
                    bad("no step while another is under way");
                }
                if let Decision::Go { node, revision, .. } = d {
                    let i = st.iter().position(|n| &n.name == node).expect("a master");
                    let next = &st[i];
                    if !fresh(next, NOW) {
                        bad("a step for a master without a fresh report");
                    }
                    // Never a master that is up taken down while another is down or unknown
                    // (a restart-free renewal takes nothing down).
                    if serving(next, NOW) != Serving::Down
                        && !restart_free(&s, revision)
                        && st.iter().any(|o| o.name != next.name && matches!(serving(o, NOW), Serving::Down | Serving::Unknown))
                    {
                        bad("a master taken down while another is down or unknown");
                    }
                    // The leader's master last within its class of work.
                    if leader == Some(node.as_str()) {
                        let mine = class(&s, next, cases[i]);
                        if st.iter().zip(cases).any(|(o, c)| o.name != next.name && class(&s, o, *c).is_some() && class(&s, o, *c) == mine) {
                            bad("the leader's master before a follower with the same work");
                        }
                    }
                }
                // A master that is down can always be repaired (unless a step is under way,
                // or the spec is known bad and stops everything).
                let repairable = st.iter().zip(cases).any(|(n, c)| serving(n, NOW) == Serving::Down && *c != Case::FailedRepair);
                if repairable && !under_way && !stop {
                    let to_down = matches!(d, Decision::Go { node, revision, .. }
                        if revision.contains("/repair-") && st.iter().any(|n| &n.name == node && serving(n, NOW) == Serving::Down));
                    if !to_down {
                        bad("a master that is down is not repaired");
                    }
                }
            });
            assert_eq!(seen, CASES.len().pow(count as u32) * (count + 1));
            assert!(violations.is_empty(), "{count} masters, {seen} clusters checked:\n{}", violations.join("\n"));
        }
    }

    #[test]
    fn a_failed_renewal_is_retried_with_a_growing_backoff_and_stops_nothing() {
        let s = spec();
        let rev = spec_revision(&s);
        // m1's first renewal attempt failed (its CSR was never decided): retried at once, as
        // attempt 2; the others are untouched.
        let mut st = vec![master("m1", Case::FailedRenewal, &rev), master("m2", Case::Current, &rev), master("m3", Case::Current, &rev)];
        st[0].message = Some("CSR kcm-m1-0a0b0c0d: no certificate within 120s".into());
        let d = run(&s, &st, Some("m3"));
        let second = Revision::renew_retry(&rev, "AA", 2, NOW).to_string();
        assert!(matches!(&d, Decision::Go { node, revision, why } if node == "m1" && *revision == second && why.contains("attempt 2")), "{d:?}");
        // Attempt 2 failed too: attempt 3 waits renewal_backoff(2) from when 2 was given.
        let given = NOW - 30;
        let failed = Revision::renew_retry(&rev, "AA", 2, given).to_string();
        (st[0].target_revision, st[0].failed_revision) = (Some(failed.clone()), Some(failed));
        let d = run(&s, &st, Some("m3"));
        assert!(
            matches!(&d, Decision::Backoff { node, step: BackoffStep::Renewal, reason } if node == "m1" && reason.contains("attempt 2") && reason.contains("no certificate")),
            "{d:?}"
        );
        let (_, conds) = aggregate(&masters(), &st, &d, &Warnings::default(), NOW);
        assert!(conds.iter().any(|(t, on, reason, _)| *t == "Degraded" && *on && reason == "RenewalFailed"), "{conds:?}");
        let later = given + renewal_backoff(2);
        for n in &mut st {
            n.observed_at = Some(at(later - 1));
        }
        let d = decide(&s, &Facts { masters: &masters(), status: &st, leader: Some("m3"), ca_not_after: None, now: later });
        let third = Revision::renew_retry(&rev, "AA", 3, later).to_string();
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m1" && *revision == third), "{d:?}");
        // While m1 backs off, another master's due renewal goes on.
        st[1].not_after = Some(at(NOW + 3600));
        for n in &mut st {
            n.observed_at = Some(at(NOW - 1));
        }
        let d = run(&s, &st, Some("m3"));
        assert!(matches!(&d, Decision::Go { node, .. } if node == "m2"), "{d:?}");
        assert_eq!((renewal_backoff(1), renewal_backoff(2), renewal_backoff(3), renewal_backoff(40)), (60, 120, 240, 3600));
    }

    #[test]
    fn a_restart_free_renewal_does_not_wait_for_a_master_without_a_report() {
        let mut s = spec();
        let rev = spec_revision(&s);
        // m3 powered off (its report an hour old, a step lost on it); m1's certificate is due.
        let st = vec![master("m1", Case::Due, &rev), master("m2", Case::Current, &rev), master("m3", Case::LostStep, &rev)];
        let d = run(&s, &st, Some("m2"));
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m1" && *revision == Revision::renew(&rev, "AA").to_string()), "{d:?}");
        // With the certificate embedded, a renewal restarts kcm: it waits for m3.
        s.certificate.kubeconfig_mode = KubeconfigMode::Embedded;
        let rev = spec_revision(&s);
        let st = vec![master("m1", Case::Due, &rev), master("m2", Case::Current, &rev), master("m3", Case::LostStep, &rev)];
        assert!(matches!(run(&s, &st, Some("m2")), Decision::Wait { node, why } if node == "m3" && why.contains("no fresh report")));
        // A step given a minute ago to a master that has not reported since is still under way.
        let mut m3 = master("m3", Case::LostStep, &rev);
        m3.observed_at = Some(at(NOW - 60));
        let st = vec![master("m1", Case::Due, &rev), master("m2", Case::Current, &rev), m3];
        assert!(matches!(run(&s, &st, Some("m2")), Decision::Wait { node, why } if node == "m3" && why.starts_with("applying")));
    }

    #[test]
    fn a_drifted_healthy_master_waits_while_another_is_down() {
        let s = spec();
        let rev = spec_revision(&s);
        // m1 healthy with drift, m2 down: m2 is repaired first, m1 waits for it.
        let st = vec![master("m1", Case::Drifted, &rev), master("m2", Case::Down, &rev), master("m3", Case::Current, &rev)];
        let d = run(&s, &st, Some("m3"));
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m2" && revision.contains("/repair-")), "{d:?}");
        // m2's repair is backing off: m1 still waits (Backoff reported, not a Go).
        let st = vec![master("m1", Case::Drifted, &rev), master("m2", Case::FailedRepair, &rev), master("m3", Case::Current, &rev)];
        assert!(matches!(run(&s, &st, None), Decision::Backoff { node, .. } if node == "m2"));
        // m2 repaired: now m1.
        let st = vec![master("m1", Case::Drifted, &rev), master("m2", Case::Current, &rev), master("m3", Case::Current, &rev)];
        assert!(matches!(run(&s, &st, None), Decision::Go { node, .. } if node == "m1"));
        // m2 unknown: m1's drift waits too.
        let st = vec![master("m1", Case::Drifted, &rev), master("m2", Case::Stale, &rev), master("m3", Case::Current, &rev)];
        assert!(matches!(run(&s, &st, None), Decision::Wait { node, why } if node == "m2" && why.contains("no fresh report")));
    }

    #[test]
    fn a_failed_repair_backs_off_then_retries() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        let given = repair_revision(&rev, NOW - 100);
        st[0].healthy = false;
        st[0].target_revision = Some(given.clone());
        st[0].failed_revision = Some(given.clone());
        st[0].message = Some("healthz never came".into());
        assert!(matches!(run(&s, &st, None), Decision::Backoff { node, .. } if node == "m1"));
        let later = NOW - 100 + i64::from(s.kcm.health_timeout_seconds) + REPAIR_BACKOFF_SECS;
        st[0].observed_at = Some(at(later - 1)); // the helper keeps reporting
        let d = decide(&s, &Facts { masters: &masters(), status: &st, leader: None, ca_not_after: None, now: later });
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m1" && *revision == repair_revision(&rev, later)), "{d:?}");
    }

    #[test]
    fn a_failed_step_stops_the_rollout_until_the_spec_changes() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut m2 = done("m2", "old");
        m2.target_revision = Some(rev.clone());
        m2.failed_revision = Some(rev.clone());
        m2.message = Some("healthz never came".into());
        let st = vec![reported("m1"), m2.clone(), reported("m3")];
        assert_eq!(run(&s, &st, None), Decision::Stop { node: "m2".into(), reason: "healthz never came".into() });
        // Rolled back but not healthy yet: still a stop, not a repair with the bad spec.
        let mut st2 = st.clone();
        st2[1].healthy = false;
        assert!(matches!(run(&s, &st2, None), Decision::Stop { .. }));
        let mut changed = s.clone();
        changed.kcm.verbosity = 3;
        assert!(matches!(run(&changed, &st, None), Decision::Go { .. }));
    }

    #[test]
    fn renewal_names_the_expiring_certificate() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        // m3's certificate has less than 20% of a year left.
        st[2].not_after = Some(at(NOW + 30 * 86400));
        st[2].cert_serial = Some("C3".into());
        let d = run(&s, &st, Some("m1"));
        assert_eq!(
            d,
            Decision::Go {
                node: "m3".into(),
                revision: format!("{rev}/renew-C3"),
                why: format!("certificate C3 expires {}", st[2].not_after.clone().unwrap())
            }
        );
        // After the renewal the node is done: its spec part matches and the new cert is fresh.
        st[2] = done("m3", &format!("{rev}/renew-C3"));
        assert_eq!(run(&s, &st, Some("m1")), Decision::Done);
    }

    #[test]
    fn the_leader_renews_last_even_when_its_certificate_is_due_first() {
        let mut s = spec();
        s.certificate.validity_minutes = Some(10);
        s.certificate.renew_when_remaining_percent = 90;
        let rev = spec_revision(&s);
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        // Issued 10 s apart in a rollout: m1 (the leader) first, so it is due first.
        for (i, n) in st.iter_mut().enumerate() {
            n.not_after = Some(at(NOW + 540 + 10 * i as i64));
            n.cert_serial = Some(format!("C{i}"));
        }
        let d = run(&s, &st, Some("m1"));
        assert!(matches!(&d, Decision::Go { node, revision, why } if node == "m2" && revision.ends_with("/renew-C1") && why.contains("early")), "{d:?}");
        st[1] = done("m2", &format!("{rev}/renew-C1"));
        st[1].not_after = Some(at(NOW + 600));
        let d = run(&s, &st, Some("m1"));
        assert!(matches!(&d, Decision::Go { node, .. } if node == "m3"), "{d:?}");
        st[2] = done("m3", &format!("{rev}/renew-C2"));
        st[2].not_after = Some(at(NOW + 600));
        let d = run(&s, &st, Some("m1"));
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m1" && revision.ends_with("/renew-C0")), "{d:?}");
        // A follower far from due is not pulled in: the leader goes alone.
        st[1].not_after = Some(at(NOW + 600 * 10));
        st[2].not_after = Some(at(NOW + 600 * 10));
        let mut yearly = s.clone();
        yearly.certificate.validity_minutes = None;
        let d = run(&s, &st, Some("m1"));
        assert!(matches!(&d, Decision::Go { node, .. } if node == "m1"), "{d:?}");
        assert_eq!(round_window(&s), 30, "10 min, 90%: half of the 60 s from issuance to due");
        assert_eq!(round_window(&yearly), 8760 * 3600 * 10 / 100 / 2, "a year at 90%: half of the 10% before due");
        assert_eq!(round_window(&spec()), 8760 * 3600 * 20 / 100 / 4, "the default, a year at 20%: a quarter of the window (18 days)");
    }

    #[test]
    fn a_certificate_capped_by_an_expiring_ca_is_renewed_once_not_in_a_loop() {
        let s = spec();
        let rev = spec_revision(&s);
        let ca = NOW + 20 * 86400; // the CA ends inside the renewal window
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        st[0].not_after = Some(at(NOW + 10 * 86400)); // issued before, ends before the CA: due
        let facts = |st: &[NodeStatus]| decide(&s, &Facts { masters: &masters(), status: st, leader: None, ca_not_after: Some(ca), now: NOW }.clone());
        let st_owned = st.clone();
        assert!(matches!(facts(&st_owned), Decision::Go { node, revision, .. } if node == "m1" && revision.contains("/renew-")));
        // Renewed: the signer capped it at the CA's notAfter. Due again by the window, but not renewed again.
        st[0] = done("m1", &format!("{rev}/renew-AA"));
        st[0].not_after = Some(at(ca));
        for n in &mut st[1..] {
            n.not_after = Some(at(ca));
        }
        assert_eq!(facts(&st), Decision::Done);
        let msg = ca_expiring(&s, Some(ca), NOW).expect("reported");
        assert!(msg.contains("cluster CA expires"), "{msg}");
        assert_eq!(ca_expiring(&s, Some(NOW + 5 * 365 * 86400), NOW), None);
        // A CA with less life left than the validity, even outside the renewal window: reported.
        assert!(ca_expiring(&s, Some(NOW + 200 * 86400), NOW).is_some());
        assert_eq!(ca_expiring(&s, Some(NOW + 366 * 86400), NOW), None);
        let (_, conds) = aggregate(&masters(), &st, &Decision::Done, &Warnings { ca_expiring: Some(&msg), ..Default::default() }, NOW);
        assert!(conds.iter().any(|(t, v, r, _)| *t == "Degraded" && *v && r == "ClusterCAExpiring"), "{conds:?}");
    }

    #[test]
    fn renewal_schedule_for_drills_and_for_years() {
        // 10-minute certificates renewed when 90% remains: one minute after issuance.
        let mut s = spec();
        s.certificate.validity_minutes = Some(10);
        s.certificate.renew_when_remaining_percent = 90;
        assert_eq!(s.certificate.validity_secs(), 600);
        let mut n = done("m1", "r");
        n.not_after = Some(at(NOW + 600));
        assert_eq!(renewal_schedule(&s, &[n.clone()], None)["m1"], NOW + 60);
        assert!(!renewal_due(&s, NOW + 600, NOW + 59) && renewal_due(&s, NOW + 600, NOW + 60));
        // The default: a year, renewed when 20% remains (73 days before notAfter).
        let y = spec();
        assert_eq!(y.certificate.validity_secs(), 8760 * 3600);
        assert_eq!(renew_at(&y, NOW + 365 * 86400), NOW + 365 * 86400 - 73 * 86400);
        // Capped by the CA: never scheduled again under it.
        assert!(renewal_schedule(&s, &[n], Some(NOW + 600)).is_empty());
    }

    #[test]
    fn ready_counts_only_fresh_healthy_reports() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        st[0].observed_at = Some(at(NOW - STALE_AFTER_SECS - 1));
        st[1].observed_at = None; // the helper stopped
        let (healthy, conds) = aggregate(&masters(), &st, &Decision::Done, &Warnings::default(), NOW);
        assert_eq!(healthy, 1);
        assert!(conds.iter().any(|(t, v, _, _)| *t == "Available" && *v));
        st[2].healthy = false;
        let (healthy, conds) = aggregate(&masters(), &st, &Decision::Done, &Warnings::default(), NOW);
        assert_eq!(healthy, 0);
        assert!(conds.iter().any(|(t, v, r, _)| *t == "Available" && !*v && r == "NoHealthyMaster"), "{conds:?}");
    }

    #[test]
    fn a_renewal_held_past_half_its_window_is_degraded_renewal_blocked() {
        let s = spec(); // one year, renewed when 20% remains: due 73 days before expiry
        let rev = spec_revision(&s);
        let day = 86_400;
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        for (n, days_left) in st.iter_mut().zip([300, 40, 300]) {
            n.report.not_after = Some(at(NOW + days_left * day));
        }
        // m2: due 33 days ago (73 - 40), less than half the window (36.5 days): not yet.
        assert_eq!(renewal_blocked(&s, &st, None, NOW), None);
        st[1].report.not_after = Some(at(NOW + 30 * day)); // due 43 days ago
        let msg = renewal_blocked(&s, &st, None, NOW).expect("blocked");
        assert!(msg.starts_with("m2: certificate AA due since") && msg.contains("1032h ago"), "{msg}");
        let d = Decision::Wait { node: "m1".into(), why: "m1 is unhealthy".into() };
        let (_, conds) = aggregate(&masters(), &st, &d, &Warnings { renewal_blocked: Some(&msg), ..Default::default() }, NOW);
        assert!(conds.iter().any(|(t, v, r, m)| *t == "Degraded" && *v && r == "RenewalBlocked" && m.contains("m2:")), "{conds:?}");
        // A certificate the CA cut short is ClusterCAExpiring's, not this.
        assert_eq!(renewal_blocked(&s, &st, Some(NOW + 30 * day), NOW), None);
    }

    #[test]
    fn operator_pod_not_placed_is_degraded() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        st[1].operator_pod_error = Some("kubelet has no staticPodPath".into());
        let (_, conds) = aggregate(&masters(), &st, &Decision::Done, &Warnings::default(), NOW);
        assert!(conds.iter().any(|(t, v, r, m)| *t == "Degraded" && *v && r == "OperatorPodNotPlaced" && m.contains("m2: kubelet")), "{conds:?}");
    }

    #[test]
    fn a_master_whose_clock_is_off_by_up_to_25s_is_neither_stale_nor_leaderless() {
        let s = spec();
        let rev = spec_revision(&s);
        let lease = |renewed: i64| k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("m2_4f1c".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        };
        for skew in [-25i64, -20, 20, 25] {
            let mut r = Receipts::default();
            // m2 (which leads) stamps its report and kcm's Lease with a clock `skew` s off;
            // it reports every 10 s and its kcm renews every 2 s.
            let mut seen = Vec::new();
            for k in 0..=5 {
                let now = NOW + k * 10;
                let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
                for n in st.iter_mut() {
                    n.report.observed_at = Some(at(now - 2 + if n.name == "m2" { skew } else { 0 }));
                }
                let l = on_observer_clock(&mut r, &mut st, Some(&lease(now - 1 + skew)), now * 1000);
                let fresh_all = st.iter().all(|n| fresh(n, now));
                let leader = live_leader(l.as_ref(), now);
                let facts = Facts { masters: &masters(), status: &st, leader: leader.as_deref(), ca_not_after: None, now };
                seen.push((k, fresh_all, leader.clone(), decide(&s, &facts)));
            }
            // The first look has only the stamps themselves; from the second on, the receipts.
            for (k, fresh_all, leader, decision) in seen.iter().skip(1) {
                assert!(*fresh_all, "skew {skew}s, look {k}: every report fresh: {seen:?}");
                assert_eq!(leader.as_deref(), Some("m2"), "skew {skew}s, look {k}: the leader is live");
                assert_eq!(*decision, Decision::Done, "skew {skew}s, look {k}");
            }
            if skew > 0 {
                assert!(seen[0].1 && seen[0].2.is_some(), "a clock ahead is never believed beyond now, and never stale: {seen:?}");
            }
        }
        // A report that stops is stale STALE_AFTER_SECS after it was last received, skew or not.
        let mut r = Receipts::default();
        let mut st = vec![done("m1", &rev)];
        st[0].report.observed_at = Some(at(NOW + 25));
        on_observer_clock(&mut r, &mut st, None, NOW * 1000);
        let mut later = vec![done("m1", &rev)];
        later[0].report.observed_at = Some(at(NOW + 25));
        on_observer_clock(&mut r, &mut later, None, (NOW + STALE_AFTER_SECS + 1) * 1000);
        assert!(!fresh(&later[0], NOW + STALE_AFTER_SECS + 1), "a helper ahead by 25 s that stopped is stale on time");
        // A report from an hour ago first seen (an operator just started) stays stale.
        let mut old = vec![done("m1", &rev)];
        old[0].report.observed_at = Some(at(NOW - 3600));
        on_observer_clock(&mut Receipts::default(), &mut old, None, NOW * 1000);
        assert!(!fresh(&old[0], NOW), "an old report is not made fresh by a restart");
    }

    #[test]
    fn leader_is_empty_once_the_lease_expired() {
        let lease = |renewed: i64| k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("m2_4f1c".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        };
        assert_eq!(live_leader(Some(&lease(NOW - 5)), NOW), Some("m2".into()));
        assert_eq!(live_leader(Some(&lease(NOW - 16)), NOW), None);
        assert_eq!(live_leader(None, NOW), None);
    }

    #[test]
    fn each_step_is_counted_once_when_it_ends_and_timed_from_when_it_was_given() {
        let mut t = StepTracker::default();
        let t0 = Instant::now();
        let renew = "abc/renew-0A".to_string();
        let mut m1 = done("m1", "abc");
        // Given at t0; the watch still shows the step before (applied): nothing yet.
        t.given("m1", &renew, t0);
        assert!(t.observe(&[m1.clone()], t0 + Duration::from_secs(1)).is_empty());
        // Under way, then applied.
        m1.target_revision = Some(renew.clone());
        assert!(t.observe(&[m1.clone()], t0 + Duration::from_secs(2)).is_empty());
        m1.applied_revision = Some(renew.clone());
        let ended = t.observe(&[m1.clone()], t0 + Duration::from_secs(40));
        assert_eq!(ended, [StepEnd { node: "m1".into(), revision: renew.clone(), result: StepResult::Applied, took: Some(Duration::from_secs(40)) }]);
        // Seen again: not counted twice.
        assert!(t.observe(&[m1.clone()], t0 + Duration::from_secs(50)).is_empty());

        // A step found under way (given by an earlier leader) counts, without a duration.
        let mut m2 = done("m2", "abc");
        m2.target_revision = Some("def".into());
        assert!(t.observe(&[m1.clone(), m2.clone()], t0).is_empty());
        m2.failed_revision = Some("def".into());
        let ended = t.observe(&[m1.clone(), m2.clone()], t0 + Duration::from_secs(5));
        assert_eq!(ended, [StepEnd { node: "m2".into(), revision: "def".into(), result: StepResult::Failed, took: None }]);

        // A step that ended before this process looked is not counted; a master that left is forgotten.
        let mut fresh_tracker = StepTracker::default();
        assert!(fresh_tracker.observe(&[m1.clone(), m2.clone()], t0).is_empty());
        t.given("m3", "abc", t0);
        t.observe(&[m1], t0);
        assert!(t.under_way.is_empty(), "{:?}", t.under_way);
    }

    #[test]
    fn paused_does_nothing() {
        let mut s = spec();
        s.paused = true;
        assert_eq!(run(&s, &[], None), Decision::Paused);
    }

    #[test]
    fn leader_from_lease_holder() {
        // kcm names itself by its hostname; a master whose hostname is not its Node name is
        // found through the hostname its helper reports (any case).
        let mut st = vec![done("m1", "r"), done("m2", "r")];
        st[1].report.hostname = Some("Master2.example.com".into());
        assert_eq!(master_of("master2.example.com", &st), "m2");
        assert_eq!(master_of("m1", &st), "m1");
        assert_eq!(master_of("elsewhere", &st), "elsewhere", "no master of that name: the name itself");
        assert!(holder_is(Some("MASTER2.example.com_4f1c"), "m2", Some("master2.example.com")));
        assert!(holder_is(Some("m2_4f1c"), "m2", Some("master2.example.com")), "the Node name still counts");
        assert!(!holder_is(Some("m1_4f1c"), "m2", Some("master2.example.com")));
        assert!(!holder_is(None, "m2", None));
        assert_eq!(leader_node(Some("kcm-control-plane2_4f1c-88")), Some("kcm-control-plane2".into()));
        assert_eq!(leader_node(Some("m1")), Some("m1".into()));
        assert_eq!(leader_node(Some("")), None);
        assert_eq!(leader_node(None), None);
    }

    #[test]
    fn conditions_keep_transition_time_when_unchanged() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(100).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(200).unwrap());
        let mut c = Vec::new();
        set_condition(&mut c, "Available", true, "A", "", Some(1), t0.clone());
        set_condition(&mut c, "Available", true, "A", "", Some(2), t1.clone());
        assert_eq!(c[0].last_transition_time, t0);
        assert_eq!(c[0].observed_generation, Some(2));
        set_condition(&mut c, "Available", false, "B", "", Some(2), t1.clone());
        assert_eq!(c[0].last_transition_time, t1);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn setting_the_same_conditions_again_changes_nothing() {
        // The status is written only when it differs: re-setting unchanged conditions, in
        // any order, at a later time, must leave the list equal (order included).
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(100).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(200).unwrap());
        let mut c = Vec::new();
        for (t, v, r) in [("Available", true, "A"), ("Progressing", false, "P"), ("Degraded", false, "D")] {
            set_condition(&mut c, t, v, r, "m", Some(1), t0.clone());
        }
        let before = c.clone();
        for (t, v, r) in [("Degraded", false, "D"), ("Available", true, "A"), ("Progressing", false, "P")] {
            set_condition(&mut c, t, v, r, "m", Some(1), t1.clone());
        }
        assert_eq!(c, before);
    }
}
