//! Row 3 (key `leader-loss`), on kind: `kill -9` of the kcm leader's process, [`REPS`] times;
//! the time from the kill to a new holder of kcm's Lease (its acquireTime), ours (the helper's
//! fence releases the dead leader's Lease) next to plain kcm (the followers wait the Lease
//! out). Plain kcm on the same cluster: the operator paused and a fake kube-controller-manager
//! process planted on every master, so no fence may release (as in kind_rotation's baseline).

use std::time::Duration;

use super::{Row, Series, Summary};
use crate::kind::{await_healthy, client, masters, now_secs, on_node};
use crate::leadership::{acquired_at, wait_new_holder, PatchGuard, Planted, Watch};
use kcm_operator::rollout::leader_node;

pub const REPS: usize = 5;
const HEALTHY_WITHIN: Duration = Duration::from_secs(180);
/// The README's claim for a leader crash with the fence.
const GOAL_SECS: f64 = 3.0;

pub async fn run() -> Vec<Row> {
    match measure().await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed(3, "leader-loss", "kill -9 of the leader's kcm: time to a new holder", e)],
    }
}

/// Kills the leader's kcm; (seconds to a new holder, seconds without a working leader until then).
async fn kill_leader(watch: &Watch) -> Result<(f64, f64), String> {
    let old = watch.latest().and_then(|s| s.holder).ok_or("kcm's Lease has no holder")?;
    let node = leader_node(Some(&old)).ok_or_else(|| format!("holder {old} names no node"))?;
    let (_, pid) = on_node(&node, "systemctl show -p MainPID --value kube-controller-manager");
    let pid: u32 = pid.trim().parse().ok().filter(|p| *p != 0).ok_or_else(|| format!("no kcm MainPID on {node}: {pid:?}"))?;
    let t = now_secs();
    let (ok, out) = on_node(&node, &format!("kill -9 {pid}"));
    if !ok {
        return Err(format!("kill -9 {pid} on {node}: {out}"));
    }
    let new = wait_new_holder(watch, t, Some(&old), Duration::from_secs(60)).await.ok_or_else(|| format!("no new holder within 60s of killing {old}"))?;
    let took = acquired_at(&new, t) - t;
    Ok((took, watch.leaderless_secs(t, new.t)))
}

/// [`REPS`] kills, each once all is healthy again: (times to a new holder, times without a
/// working leader), and when the last kill was.
async fn kills(c: &kube::Client, masters: &[String], watch: &Watch, mut since: f64, who: &str) -> Result<((Vec<f64>, Vec<f64>), f64), String> {
    let mut got = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        await_healthy(c, masters, since, HEALTHY_WITHIN).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (took, gap) = kill_leader(watch).await?;
        eprintln!("[bench] leader-loss {who}: new holder after {took:.2}s, {gap:.2}s without a working leader");
        got.0.push(took);
        got.1.push(gap);
        since = now_secs();
    }
    Ok((got, since))
}

async fn measure() -> Result<Vec<Row>, String> {
    let c = client().await;
    let masters = masters(&c).await;
    let watch = Watch::start(&masters);
    let (ours, since) = kills(&c, &masters, &watch, 0.0, "ours").await?;
    await_healthy(&c, &masters, since, HEALTHY_WITHIN).await?;

    // Plain kcm: paused (no repair step) and a fake kcm on every master (no fence release).
    let mut pause = PatchGuard { patch: None };
    pause.arm(serde_json::json!({"spec": {"paused": false}}));
    crate::kind::patch_cr(&c, &serde_json::json!({"spec": {"paused": true}})).await?;
    let mut planted = Planted::default();
    for m in &masters {
        planted.plant(m);
    }
    let (plain, since) = kills(&c, &masters, &watch, since, "plain kcm").await?;
    planted.remove_all();
    await_healthy(&c, &masters, since, HEALTHY_WITHIN).await?;
    crate::kind::patch_cr(&c, &serde_json::json!({"spec": {"paused": false}})).await?;
    pause.disarm();

    let note = format!(
        "kcm's Lease read at 20 Hz; {REPS} kills each; from `kill -9` of the leader's MainPID to the new holder's acquireTime; systemd restarts the killed kcm after RestartSec=5. \
         Baseline on the same cluster: the operator paused and a fake kube-controller-manager process on every master, so the helper's fence cannot release: plain kcm"
    );
    Ok(vec![
        Row::new(3, "leader-loss", "kill -9 of the leader's kcm: time to a new holder", "s", Summary::MedianWorst, Series::new("ours (fence)", ours.0))
            .baseline(Series::new("plain kcm", plain.0))
            .goal(&format!("<= {GOAL_SECS} s"), |r| r.ours.worst().map(|w| w <= GOAL_SECS))
            .note(note),
        Row::new(
            3,
            "leader-loss",
            "kill -9 of the leader's kcm: time without a working leader",
            "s",
            Summary::MedianWorst,
            Series::new("ours (fence)", ours.1),
        )
        .baseline(Series::new("plain kcm", plain.1))
        .note("no holder, an expired Lease, or a holder whose kcm process is gone (e2e::leadership::leaderless), from the kill to the new holder"),
    ])
}
