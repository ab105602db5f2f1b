//! Row 2 (key `rotation`), on kind: a full 3-master rotation, [`REPS`] times each way, its
//! time without a working leader (e2e::leadership::leaderless: no holder, an expired Lease, or
//! a holder whose kcm process is gone) and its wall time:
//! - ours restart-free (kubeconfigMode Referenced) and ours embedded (Embedded): the renewal
//!   drill (10-minute certificates renewed when 90% remains, a round every minute or so),
//!   each round the operator's renewal steps of all masters, from the first step's target to
//!   the last one's applied;
//! - the seed's loop: `systemctl daemon-reload && enable && restart` on every master in turn,
//!   back to back, as its `for master_ip in ...` loop over ssh does (the new files are assumed
//!   copied already: that is the loop's restart part, the part that costs leadership);
//! - kubeadm-style: `kubeadm certs renew controller-manager.conf`, then kcm restarted, one
//!   master at a time, waiting for its /healthz before the next (systemd stands in for the
//!   kubelet restarting a static pod: the same SIGTERM and start);
//!   both baselines from the first command to a working leader with kcm running on every master.
//!
//! The baselines run plain kcm on the same cluster: the operator paused and a fake
//! kube-controller-manager process planted on every master, so the helpers' fence cannot
//! release the Lease.

use std::time::{Duration, Instant};

use kcm_operator::api::{KcmNode, Revision};
use kube::api::{Api, ListParams};

use super::{Row, Series, Summary};
use crate::kind::{await_healthy, client, masters, now_secs, on_node, patch_cr};
use crate::leadership::{drill_patch, leaderless, restore_patch, PatchGuard, Planted, Watch, DRILL_MINUTES, DRILL_PERCENT, SEED_RESTART};

pub const REPS: usize = 5;
const HEALTHY_WITHIN: Duration = Duration::from_secs(240);
const KUBEADM_RENEW: &str = "kubeadm certs renew controller-manager.conf";
/// kcm's /healthz on its secure port (the CR's default, as manifests/kind has it), at the
/// address the unit binds it to.
const KCM_HEALTHZ: &str =
    r#"ip=$(systemctl cat kube-controller-manager | grep -o "bind-address=[^ ]*" | head -n1 | cut -d= -f2); curl -sk --max-time 2 "https://$ip:10252/healthz""#;
/// The watchers' resolution: a restart-free round must show no more than this.
const RESTART_FREE_GOAL_SECS: f64 = 0.5;
const EMBEDDED_GOAL_SECS: f64 = 3.0;

/// One renewal step of a master as its KcmNode showed it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSeen {
    pub node: String,
    pub revision: String,
    /// When the renew revision was first seen as the target.
    pub start: f64,
    /// When the helper's status first showed it applied.
    pub end: Option<f64>,
}

/// Feeds one look at a master's KcmNode (its target and applied revisions at `t`) into `steps`.
/// Only renewal steps (`<spec>/renew-<serial>`) count; one applied before it was ever seen as
/// the target starts at `prev_t`, the look before.
pub fn observe(steps: &mut Vec<StepSeen>, node: &str, target: Option<&str>, applied: Option<&str>, t: f64, prev_t: f64) {
    let renews = |r: &str| r.parse::<Revision>().ok().is_some_and(|r| r.renews().is_some());
    for rev in [target, applied] {
        let Some(rev) = rev.filter(|r| renews(r)) else { continue };
        let i = match steps.iter().position(|s| s.node == node && s.revision == rev) {
            Some(i) => i,
            None => {
                let start = if applied == Some(rev) { prev_t } else { t };
                steps.push(StepSeen { node: node.into(), revision: rev.into(), start, end: None });
                steps.len() - 1
            }
        };
        if applied == Some(rev) && steps[i].end.is_none() {
            steps[i].end = Some(t);
        }
    }
}

/// The complete rounds: round k is the k-th completed renewal of every master, as (first
/// start, last end), in order.
pub fn rounds(steps: &[StepSeen], masters: &[String]) -> Vec<(f64, f64)> {
    let per: Vec<Vec<&StepSeen>> = masters
        .iter()
        .map(|m| {
            let mut v: Vec<&StepSeen> = steps.iter().filter(|s| &s.node == m && s.end.is_some()).collect();
            v.sort_by(|a, b| a.start.total_cmp(&b.start));
            v
        })
        .collect();
    let n = per.iter().map(Vec::len).min().unwrap_or(0);
    (0..n)
        .map(|k| {
            let start = per.iter().map(|v| v[k].start).fold(f64::INFINITY, f64::min);
            let end = per.iter().filter_map(|v| v[k].end).fold(f64::NEG_INFINITY, f64::max);
            (start, end)
        })
        .collect()
}

/// (time without a working leader, wall time) of each repetition.
#[derive(Default)]
struct Figures {
    leaderless: Vec<f64>,
    wall: Vec<f64>,
}

impl Figures {
    fn push(&mut self, watch: &Watch, from: f64, to: f64, who: &str) {
        let gap = watch.leaderless_secs(from, to);
        eprintln!("[bench] rotation {who}: {:.2}s without a working leader, {:.1}s wall", gap, to - from);
        self.leaderless.push(gap);
        self.wall.push(to - from);
    }
}

/// Ours in `mode`: the drill, [`REPS`] renewal rounds after the switch.
async fn ours(c: &kube::Client, masters: &[String], watch: &Watch, mode: &str) -> Result<Figures, String> {
    let api = Api::<KcmNode>::all(c.clone());
    patch_cr(c, &drill_patch(mode)).await?;
    let t_patch = now_secs();
    let mut steps: Vec<StepSeen> = Vec::new();
    let mut prev_t = t_patch;
    let deadline = Instant::now() + Duration::from_secs(120 + 100 * REPS as u64);
    let done = loop {
        if Instant::now() > deadline {
            return Err(format!("{mode}: {} complete renewal rounds within the deadline, {REPS} wanted; steps seen: {steps:?}", rounds(&steps, masters).len()));
        }
        if let Ok(list) = api.list(&ListParams::default()).await {
            let t = now_secs();
            for k in &list.items {
                let name = k.metadata.name.clone().unwrap_or_default();
                let target = k.spec.target_revision.as_ref().map(|r| r.to_string());
                let applied = k.status.as_ref().and_then(|s| s.applied_revision.clone());
                observe(&mut steps, &name, target.as_deref(), applied.as_deref(), t, prev_t);
            }
            prev_t = t;
        }
        let rs: Vec<(f64, f64)> = rounds(&steps, masters).into_iter().filter(|(s, _)| *s > t_patch).collect();
        if rs.len() >= REPS {
            break rs;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut f = Figures::default();
    for (from, to) in done.into_iter().take(REPS) {
        f.push(watch, from, to, mode);
    }
    Ok(f)
}

/// The first moment after `after` from which a working leader is back and every master's kcm
/// runs (MainPID non-zero), held for 2 s; waits up to 90 s.
async fn settled(watch: &Watch, masters: &[String], from: f64, after: f64) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = now_secs();
        let gaps = leaderless(&watch.lease_all(), &watch.pid_tracks(), from, now, true);
        let open = gaps.last().is_some_and(|g| g.2.contains("still at the end"));
        let pids = watch.pid_tracks();
        let running = masters.iter().all(|m| pids.get(m).and_then(|t| t.at(now)).is_some_and(|p| p != 0));
        if !open && running {
            let last_gap = gaps.last().map(|g| g.1).unwrap_or(after);
            let last_start =
                masters.iter().filter_map(|m| pids.get(m)?.changes.iter().rev().find(|(t, p)| *t > from && *p != 0).map(|(t, _)| *t)).fold(after, f64::max);
            let end = last_gap.max(last_start).max(after);
            if now - end >= 2.0 {
                return Ok(end);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no working leader with kcm on every master within 90s: {gaps:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn run_on(node: &str, cmd: &str) -> Result<String, String> {
    match on_node(node, cmd) {
        (true, out) => Ok(out),
        (false, out) => Err(format!("`{cmd}` on {node}: {out}")),
    }
}

async fn seed_loop(masters: &[String], watch: &Watch) -> Result<(f64, f64), String> {
    let t0 = now_secs();
    for m in masters {
        run_on(m, SEED_RESTART)?;
    }
    Ok((t0, settled(watch, masters, t0, now_secs()).await?))
}

async fn kubeadm_style(masters: &[String], watch: &Watch) -> Result<(f64, f64), String> {
    let t0 = now_secs();
    for m in masters {
        run_on(m, KUBEADM_RENEW)?;
        run_on(m, "systemctl restart kube-controller-manager")?;
        let ok = crate::apitier::poll("kcm /healthz", Duration::from_secs(60), || async { (on_node(m, KCM_HEALTHZ).1.trim() == "ok").then_some(()) }).await;
        ok.ok_or_else(|| format!("kcm on {m} not healthy within 60s of its restart"))?;
    }
    Ok((t0, settled(watch, masters, t0, now_secs()).await?))
}

pub async fn run() -> Vec<Row> {
    match measure().await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed(2, "rotation", "full 3-master rotation", e)],
    }
}

async fn measure() -> Result<Vec<Row>, String> {
    let c = client().await;
    let masters = masters(&c).await;
    let watch = Watch::start(&masters);
    await_healthy(&c, &masters, 0.0, HEALTHY_WITHIN).await?;

    // Baselines first, on the yearly Referenced spec `up` applied.
    let mut pause = PatchGuard { patch: None };
    pause.arm(serde_json::json!({"spec": {"paused": false}}));
    patch_cr(&c, &serde_json::json!({"spec": {"paused": true}})).await?;
    let mut planted = Planted::default();
    for m in &masters {
        planted.plant(m);
    }
    let (mut seed, mut kubeadm) = (Figures::default(), Figures::default());
    let mut since = 0.0;
    for _ in 0..REPS {
        await_healthy(&c, &masters, since, HEALTHY_WITHIN).await?;
        let (a, b) = seed_loop(&masters, &watch).await?;
        seed.push(&watch, a, b, "seed loop");
        since = b;
    }
    for _ in 0..REPS {
        await_healthy(&c, &masters, since, HEALTHY_WITHIN).await?;
        let (a, b) = kubeadm_style(&masters, &watch).await?;
        kubeadm.push(&watch, a, b, "kubeadm-style");
        since = b;
    }
    planted.remove_all();
    await_healthy(&c, &masters, since, HEALTHY_WITHIN).await?;
    patch_cr(&c, &serde_json::json!({"spec": {"paused": false}})).await?;
    pause.disarm();

    // Ours: the drill, restart-free then embedded; the spec restored afterwards.
    let mut spec = PatchGuard { patch: None };
    spec.arm(restore_patch());
    let referenced = ours(&c, &masters, &watch, "Referenced").await?;
    let embedded = ours(&c, &masters, &watch, "Embedded").await?;
    patch_cr(&c, &restore_patch()).await?;
    spec.disarm();
    await_healthy(&c, &masters, now_secs(), HEALTHY_WITHIN).await?;

    let base = |leaderless: bool| {
        let pick = |x: &Figures| if leaderless { x.leaderless.clone() } else { x.wall.clone() };
        [Series::new("seed's loop", pick(&seed)), Series::new("kubeadm-style", pick(&kubeadm))]
    };
    let note = format!(
        "ours: the drill ({DRILL_MINUTES}-minute certificates renewed when {DRILL_PERCENT}% remains), {REPS} renewal rounds after the switch to the mode, each from the first master's renew target to the last one's applied status (KcmNodes read at 4 Hz); \
         seed's loop: `{SEED_RESTART}` on each master back to back; kubeadm-style: `{KUBEADM_RENEW}` then `systemctl restart kube-controller-manager` per master, waiting for its /healthz; \
         both baselines on the same cluster with the operator paused and a fake kcm process on every master (plain kcm: no fence), from the first command until a working leader and kcm on every master. \
         Leadership: kcm's Lease at 20 Hz and each master's MainPID at 10 Hz (e2e::leadership)"
    );
    let mut rows = Vec::new();
    for (name, f, goal) in [("restart-free (Referenced)", &referenced, RESTART_FREE_GOAL_SECS), ("embedded (Embedded)", &embedded, EMBEDDED_GOAL_SECS)] {
        let mut r = Row::new(
            2,
            "rotation",
            &format!("full rotation, time without a working leader: ours {name}"),
            "s",
            Summary::MedianWorst,
            Series::new("ours", f.leaderless.clone()),
        )
        .goal(&if goal < 1.0 { "0 s (watchers' resolution 0.5 s)".to_string() } else { format!("<= {goal} s") }, move |r| r.ours.worst().map(|w| w <= goal))
        .note(note.clone());
        for b in base(true) {
            r = r.baseline(b);
        }
        rows.push(r);
        let mut r = Row::new(2, "rotation", &format!("full rotation, wall time: ours {name}"), "s", Summary::MedianWorst, Series::new("ours", f.wall.clone()))
            .note(note.clone());
        for b in base(false) {
            r = r.baseline(b);
        }
        rows.push(r);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_rounds() {
        let ms: Vec<String> = vec!["a".into(), "b".into()];
        let mut s = Vec::new();
        let r1 = "0123456789/renew-0a";
        let r2 = "0123456789/renew-0b";
        // a: target at 10, applied at 12; b: target at 13, applied at 15 (round 1).
        observe(&mut s, "a", Some("0123456789"), Some("0123456789"), 9.0, 8.0);
        assert!(s.is_empty(), "a spec revision is no renewal");
        observe(&mut s, "a", Some(r1), Some("0123456789"), 10.0, 9.0);
        observe(&mut s, "a", Some(r1), Some(r1), 12.0, 10.0);
        observe(&mut s, "b", Some(r2), None, 13.0, 12.0);
        assert_eq!(rounds(&s, &ms), vec![], "b not done yet");
        observe(&mut s, "b", Some(r2), Some(r2), 15.0, 13.0);
        observe(&mut s, "b", Some(r2), Some(r2), 16.0, 15.0);
        assert_eq!(rounds(&s, &ms), vec![(10.0, 15.0)]);
        // a's next renewal applied between two looks: it starts at the look before.
        observe(&mut s, "a", Some("0123456789/renew-0c"), Some("0123456789/renew-0c"), 80.0, 79.0);
        assert_eq!(s.last().map(|x| (x.start, x.end)), Some((79.0, Some(80.0))));
        assert_eq!(rounds(&s, &ms).len(), 1, "b has not renewed again");
    }
}
