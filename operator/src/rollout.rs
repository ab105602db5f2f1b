//! Rollout, one master at a time: which node gets the next revision (the kcm leader's
//! node last), when to wait, when to stop. [`decide`] is pure; [`run`] reads the CR,
//! the masters and kcm's Lease, writes the target revision and the status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::{KubeControllerManager, KubeControllerManagerSpec, NodeStatus, KCM_LEASE, OPERATOR_MANAGER};
use crate::approver::{is_master, CR_NAME};
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
}

/// The spec part of a target revision (`<spec>` or `<spec>/renew-<serial>`).
pub fn spec_part(revision: &str) -> &str {
    revision.split_once('/').map_or(revision, |(s, _)| s)
}

/// Whether a certificate expiring at `not_after` (unix) is due for renewal under `spec`.
pub fn renewal_due(spec: &KubeControllerManagerSpec, not_after: i64, now: i64) -> bool {
    now >= renew_at(spec, not_after)
}

/// When a certificate expiring at `not_after` is renewed: when the spec's share of its
/// validity remains.
pub fn renew_at(spec: &KubeControllerManagerSpec, not_after: i64) -> i64 {
    let validity = i64::from(spec.certificate.validity_hours) * 3600;
    not_after - validity * i64::from(spec.certificate.renew_when_remaining_percent) / 100
}

fn parse_time(s: &str) -> Option<i64> {
    s.parse::<k8s_openapi::jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The revision `node` should run, or `None` when it runs it already.
fn wanted(spec: &KubeControllerManagerSpec, rev: &str, n: &NodeStatus, now: i64) -> Option<(String, String)> {
    let applied = n.applied_revision.as_deref().map(spec_part);
    if applied != Some(rev) {
        return Some((rev.to_string(), format!("runs {}, spec is {rev}", n.applied_revision.as_deref().unwrap_or("nothing of ours"))));
    }
    let not_after = n.not_after.as_deref().and_then(parse_time)?;
    let serial = n.cert_serial.as_deref()?;
    renewal_due(spec, not_after, now).then(|| (format!("{rev}/renew-{serial}"), format!("certificate {serial} expires {}", n.not_after.as_deref().unwrap_or("?"))))
}

/// Decides the next step. `masters`: names of the selected masters; `status`: the per-node
/// entries; `leader`: the node holding kcm's Lease.
pub fn decide(spec: &KubeControllerManagerSpec, masters: &[String], status: &[NodeStatus], leader: Option<&str>, now: i64) -> Decision {
    if spec.paused {
        return Decision::Paused;
    }
    let rev = spec_revision(spec);
    let entry = |name: &str| status.iter().find(|n| n.name == name).cloned().unwrap_or_else(|| NodeStatus { name: name.to_string(), ..Default::default() });
    let nodes: Vec<NodeStatus> = masters.iter().map(|m| entry(m)).collect();

    for n in &nodes {
        if let Some(t) = n.target_revision.as_deref() {
            if n.failed_revision.as_deref() == Some(t) && spec_part(t) == rev {
                return Decision::Stop { node: n.name.clone(), reason: n.message.clone().unwrap_or_else(|| format!("revision {t} failed")) };
            }
            if n.applied_revision.as_deref() != Some(t) && n.failed_revision.as_deref() != Some(t) {
                return Decision::Wait { node: n.name.clone(), why: format!("applying {t}") };
            }
        }
    }
    let mut todo: Vec<(&NodeStatus, String, String)> = nodes.iter().filter_map(|n| wanted(spec, &rev, n, now).map(|(r, why)| (n, r, why))).collect();
    // The leader's node goes last; otherwise by name, for a predictable order.
    todo.sort_by_key(|(n, _, _)| (Some(n.name.as_str()) == leader, n.name.clone()));
    let Some((next, revision, why)) = todo.into_iter().next() else { return Decision::Done };
    // Never two masters without kcm: every other master that runs our kcm must be healthy.
    if let Some(down) = nodes.iter().find(|n| n.name != next.name && n.applied_revision.is_some() && !n.healthy) {
        return Decision::Wait { node: down.name.clone(), why: format!("{} is not healthy; {} waits", down.name, next.name) };
    }
    Decision::Go { node: next.name.clone(), revision, why }
}

/// Holder of kcm's Lease, as a node name (`<hostname>_<uuid>` → hostname).
pub fn leader_node(holder: Option<&str>) -> Option<String> {
    let h = holder?.trim();
    let node = h.split_once('_').map_or(h, |(n, _)| n);
    (!node.is_empty()).then(|| node.to_string())
}

/// Sets `type` in `conds`, keeping lastTransitionTime when the status did not change.
pub fn set_condition(conds: &mut Vec<Condition>, type_: &str, status: bool, reason: &str, message: &str, generation: Option<i64>, now: Time) {
    let status = if status { "True" } else { "False" }.to_string();
    let last = conds.iter().find(|c| c.type_ == type_).filter(|c| c.status == status).map(|c| c.last_transition_time.clone()).unwrap_or(now);
    conds.retain(|c| c.type_ != type_);
    conds.push(Condition { type_: type_.into(), status, reason: reason.into(), message: message.into(), observed_generation: generation, last_transition_time: last });
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> RolloutError {
    let what = what.into();
    move |source| RolloutError::Kube { what, source }
}

struct Ctx {
    client: kube::Client,
    recorder: Recorder,
}

async fn reconcile(kcm: Arc<KubeControllerManager>, ctx: Arc<Ctx>) -> Result<Action, RolloutError> {
    let spec = &kcm.spec;
    let api: Api<KubeControllerManager> = Api::all(ctx.client.clone());
    let nodes = Api::<Node>::all(ctx.client.clone()).list(&ListParams::default()).await.map_err(kube_err("listing nodes"))?;
    let mut masters: Vec<String> = nodes.items.iter().filter(|n| is_master(n, &spec.master_selector)).map(|n| n.name_any()).collect();
    masters.sort();
    let lease = Api::<Lease>::namespaced(ctx.client.clone(), KCM_LEASE.0).get_opt(KCM_LEASE.1).await.map_err(kube_err("reading kcm's Lease"))?;
    let leader = leader_node(lease.as_ref().and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.as_deref()));
    let status = kcm.status.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let decision = decide(spec, &masters, &status.nodes, leader.as_deref(), now.as_second());

    // Targets: keep every master's current target, set the new one.
    let mut targets: BTreeMap<String, Option<String>> = masters.iter().map(|m| (m.clone(), status.nodes.iter().find(|n| &n.name == m).and_then(|n| n.target_revision.clone()))).collect();
    if let Decision::Go { node, revision, why } = &decision {
        targets.insert(node.clone(), Some(revision.clone()));
        let note = format!("{node}: revision {revision} ({why})");
        tracing::info!("rollout: {note}");
        publish(&ctx, &kcm, EventType::Normal, "RolloutStep", &note).await;
    }
    if let Decision::Stop { node, reason } = &decision {
        if !status.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True") {
            publish(&ctx, &kcm, EventType::Warning, "RolloutStopped", &format!("{node}: {reason}")).await;
        }
    }

    let healthy = masters.iter().filter(|m| status.nodes.iter().any(|n| &n.name == *m && n.healthy)).count();
    let expires = status.nodes.iter().filter(|n| masters.contains(&n.name)).filter_map(|n| n.not_after.clone()).min();
    let gen = kcm.meta().generation;
    let time = Time(now);
    let mut conds = status.conditions.clone();
    let all = !masters.is_empty() && healthy == masters.len();
    set_condition(&mut conds, "Available", all, if all { "AllMastersHealthy" } else { "MastersUnhealthy" }, &format!("{healthy}/{} masters run a healthy kube-controller-manager", masters.len()), gen, time.clone());
    let (progressing, preason, pmsg) = match &decision {
        Decision::Go { node, revision, .. } => (true, "RollingOut", format!("{node} gets {revision}")),
        Decision::Wait { node, why } => (true, "Waiting", format!("{node}: {why}")),
        Decision::Done => (false, "UpToDate", "every master runs the spec".to_string()),
        Decision::Paused => (false, "Paused", "spec.paused is true".to_string()),
        Decision::Stop { node, .. } => (false, "Stopped", format!("stopped at {node}")),
    };
    set_condition(&mut conds, "Progressing", progressing, preason, &pmsg, gen, time.clone());
    let (degraded, dreason, dmsg) = match &decision {
        Decision::Stop { node, reason } => (true, "RolloutFailed", format!("{node}: {reason}")),
        _ => (false, "AsExpected", String::new()),
    };
    set_condition(&mut conds, "Degraded", degraded, dreason, &dmsg, gen, time);

    let node_entries: Vec<serde_json::Value> = targets
        .iter()
        .map(|(name, t)| match t {
            Some(t) => json!({"name": name, "targetRevision": t}),
            None => json!({"name": name}),
        })
        .collect();
    let mut st = json!({
        "observedGeneration": gen,
        "ready": format!("{healthy}/{}", masters.len()),
        "nodes": node_entries,
        "conditions": conds,
    });
    if let Some(l) = &leader {
        st["leader"] = json!(l);
    }
    if let Some(e) = &expires {
        st["expires"] = json!(e);
    }
    let body = json!({"apiVersion": "kcm.kcm-operator.io/v1alpha1", "kind": "KubeControllerManager", "metadata": {"name": CR_NAME}, "status": st});
    api.patch_status(CR_NAME, &PatchParams::apply(OPERATOR_MANAGER).force(), &Patch::Apply(body)).await.map_err(kube_err("writing status"))?;

    // Requeue from the nearest deadline: soon while a rollout moves, else at the next renewal.
    let next = match decision {
        Decision::Go { .. } | Decision::Wait { .. } => Duration::from_secs(3),
        Decision::Stop { .. } | Decision::Paused => Duration::from_secs(30),
        Decision::Done => {
            let soonest = status.nodes.iter().filter_map(|n| n.not_after.as_deref().and_then(parse_time)).map(|t| renew_at(spec, t)).min();
            let secs = soonest.map_or(300, |t| (t - now.as_second()).clamp(10, 300));
            Duration::from_secs(secs as u64)
        }
    };
    Ok(Action::requeue(next))
}

async fn publish(ctx: &Ctx, kcm: &KubeControllerManager, type_: EventType, reason: &str, note: &str) {
    let ev = Event { type_, reason: reason.into(), note: Some(note.into()), action: "Rollout".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &kcm.object_ref(&())).await {
        tracing::warn!("event {reason}: {e}");
    }
}

fn error_policy(_: Arc<KubeControllerManager>, err: &RolloutError, _: Arc<Ctx>) -> Action {
    tracing::error!("rollout: {err}");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the rollout controller until the stream ends.
pub async fn run(client: kube::Client) {
    let api: Api<KubeControllerManager> = Api::all(client.clone());
    let recorder = Recorder::new(client.clone(), Reporter { controller: OPERATOR_MANAGER.into(), instance: None });
    // kcm's Lease too: status.leader follows a failover at once, not at the next requeue.
    let leases = Api::<Lease>::namespaced(client.clone(), KCM_LEASE.0);
    Controller::new(api, watcher::Config::default().fields(&format!("metadata.name={CR_NAME}")))
        .watches(leases, watcher::Config::default().fields(&format!("metadata.name={}", KCM_LEASE.1)), |_| Some(ObjectRef::new(CR_NAME)))
        .run(reconcile, error_policy, Arc::new(Ctx { client, recorder }))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("rollout: {e}");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KubeControllerManagerSpec {
        serde_json::from_value(json!({"apiserverUrl": "https://10.0.0.10:6443"})).unwrap()
    }
    fn masters() -> Vec<String> {
        vec!["m1".into(), "m2".into(), "m3".into()]
    }
    fn done(name: &str, rev: &str) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            target_revision: Some(rev.into()),
            applied_revision: Some(rev.into()),
            healthy: true,
            unit_active: true,
            cert_serial: Some("AA".into()),
            not_after: Some("2030-01-01T00:00:00Z".into()),
            ..Default::default()
        }
    }
    const NOW: i64 = 1_800_000_000; // 2027-01-15

    #[test]
    fn fresh_cluster_starts_with_a_follower_and_leader_goes_last() {
        let s = spec();
        let rev = spec_revision(&s);
        let d = decide(&s, &masters(), &[], Some("m1"), NOW);
        assert!(matches!(&d, Decision::Go { node, revision, .. } if node == "m2" && *revision == rev), "{d:?}");
        let st = vec![done("m2", &rev), done("m3", &rev)];
        assert!(matches!(decide(&s, &masters(), &st, Some("m1"), NOW), Decision::Go { node, .. } if node == "m1"));
        let st = vec![done("m1", &rev), done("m2", &rev), done("m3", &rev)];
        assert_eq!(decide(&s, &masters(), &st, Some("m1"), NOW), Decision::Done);
    }

    #[test]
    fn one_at_a_time_waits_for_the_step_under_way() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut m2 = done("m2", "old");
        m2.target_revision = Some(rev.clone());
        let d = decide(&s, &masters(), &[m2], None, NOW);
        assert!(matches!(&d, Decision::Wait { node, .. } if node == "m2"), "{d:?}");
    }

    #[test]
    fn an_unhealthy_master_holds_the_rollout() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut m1 = done("m1", &rev);
        m1.healthy = false;
        let d = decide(&s, &masters(), &[m1], None, NOW);
        assert!(matches!(&d, Decision::Wait { node, .. } if node == "m1"), "{d:?}");
    }

    #[test]
    fn a_failed_step_stops_the_rollout_until_the_spec_changes() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut m2 = done("m2", "old");
        m2.target_revision = Some(rev.clone());
        m2.failed_revision = Some(rev.clone());
        m2.message = Some("healthz never came".into());
        assert_eq!(decide(&s, &masters(), &[m2.clone()], None, NOW), Decision::Stop { node: "m2".into(), reason: "healthz never came".into() });
        let mut changed = s.clone();
        changed.kcm.verbosity = 3;
        assert!(matches!(decide(&changed, &masters(), &[m2], None, NOW), Decision::Go { .. }));
    }

    #[test]
    fn renewal_names_the_expiring_certificate() {
        let s = spec();
        let rev = spec_revision(&s);
        let mut st: Vec<NodeStatus> = ["m1", "m2", "m3"].iter().map(|n| done(n, &rev)).collect();
        // m3's certificate has less than 20% of a year left.
        st[2].not_after = Some(k8s_openapi::jiff::Timestamp::from_second(NOW + 30 * 86400).unwrap().to_string());
        st[2].cert_serial = Some("C3".into());
        let d = decide(&s, &masters(), &st, Some("m1"), NOW);
        assert_eq!(d, Decision::Go { node: "m3".into(), revision: format!("{rev}/renew-C3"), why: format!("certificate C3 expires {}", st[2].not_after.clone().unwrap()) });
        // After the renewal the node is done: its spec part matches and the new cert is fresh.
        st[2] = done("m3", &format!("{rev}/renew-C3"));
        assert_eq!(decide(&s, &masters(), &st, Some("m1"), NOW), Decision::Done);
    }

    #[test]
    fn paused_does_nothing() {
        let mut s = spec();
        s.paused = true;
        assert_eq!(decide(&s, &masters(), &[], None, NOW), Decision::Paused);
    }

    #[test]
    fn leader_from_lease_holder() {
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
}
