//! A helper killed in the middle of a step (crash-safe steps), on kind (3 control-plane
//! nodes), on the cluster kind_rescue.rs leaves: our kcm 3/3 under systemd.
//!
//! Five times, on one master each: the helper is told (the test hook file
//! `/run/kcm-node-helper.crash-at`, see node-helper/src/journal.rs) to SIGKILL itself at one
//! point of a step, and the step is started by deleting that master's kcm certificate (drift:
//! the operator gives the master a repair step, which gets a new key and certificate):
//! - `key-written` on a follower: after the new key is written, before the certificate;
//! - `unit-stopped` on the leader: after `systemctl stop`, before the Lease hand-off and start;
//! - `unit-written` on the other follower: after every file is written, before the restart;
//! - `step-applied`: after the step ended healthy (journal marked applied), before the report;
//! - `step-reported`: after the report, before the journal is removed.
//!
//! Each time: the helper container restarts (the kill happened), the new helper resumes the
//! journaled step (or, past its end, only reports it), and the master ends healthy with the
//! step applied; kcm was started exactly once for the step (systemd's journal: a finished
//! step is never redone); its key, certificate and kubeconfig belong together and kcm serves
//! that certificate; exactly one certificate was issued for the step; kubeadm's manifest stays
//! moved aside; the journal goes and no `.prev` file is left.
//!
//! Then a drift repair while another master is down: with the CR paused, kcm is stopped on one
//! follower and the certificate of the other is deleted; unpaused, the down master is repaired
//! first and the drifted one only after.
//!
//! Last, a journal that does not parse: reported on the KcmNode, the file left as it was.
//!
//! Throughout, kcm's `/healthz` on every master is probed at 10 Hz ([`HealthWatch`]): a master
//! counts as up only while its kcm answers; the most masters down at once is asserted to be 1.

use std::time::{Duration, Instant};

use e2e::kind::{all_healthy, client, cr, diagnostics, helper_restarts, masters, now_secs, on_node, patch_cr};
use e2e::leadership::{HealthWatch, PatchGuard};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kcm_operator::api::{KcmNode, CSR_NODE_LABEL, CSR_REVISION_ANNOTATION, SIGNER_NAME};
use kcm_operator::pki::{self, CertInfo};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use e2e::kind::{Disarm, CRASH_AT};
const JOURNAL: &str = node_helper::journal::DEFAULT_PATH;

async fn wait_all_healthy(c: &kube::Client, masters: &[String], within: Duration, what: &str) -> String {
    e2e::kind::await_healthy(c, masters, 0.0, within).await.unwrap_or_else(|why| panic!("{what}: {why}\n{}", diagnostics()))
}

fn read_on(node: &str, path: &str) -> String {
    let (ok, out) = on_node(node, &format!("cat {path}"));
    assert!(ok, "reading {path} on {node}: {out}");
    out
}

/// Kills the helper on `target` at `point` of a repair step, and checks how the step ends.
async fn crash_at(c: &kube::Client, masters: &[String], health: &HealthWatch, target: &str, point: &str) {
    let (kcm, _) = cr(c).await.expect("the CR");
    let paths = kcm.spec.paths.clone();
    let kcm_nodes = Api::<KcmNode>::all(c.clone());
    // The step this kill interrupts is a new repair: what was applied before does not count.
    let applied_before = kcm_nodes.get(target).await.expect("the target's KcmNode").status.and_then(|s| s.applied_revision);
    let restarts_before = helper_restarts(c, target).await;
    let _disarm = Disarm(vec![target.to_string()]);
    let from = now_secs();
    let (ok, out) = on_node(target, &format!("date +%s && echo {point} > {CRASH_AT} && rm -f {}", paths.cert));
    assert!(ok, "arming {point} on {target}: {out}");
    let node_t0: u64 = out.trim().parse().unwrap_or_else(|_| panic!("the node's clock on {target}: {out:?}"));
    let t0 = Instant::now();
    let mut applied = None;
    while t0.elapsed() < Duration::from_secs(300) {
        let sample = Instant::now();
        health.assert_fresh(point, masters);
        let (down, at, who) = health.most_down(from, now_secs());
        assert!(down <= 1, "{point}: {down} masters without a kcm answering /healthz at once (+{:.1}s: {who:?})\n{}", at - from, diagnostics());
        // Done: the helper was killed and restarted, and its KcmNode shows a new repair applied.
        let me = kcm_nodes.get(target).await.ok();
        let (target_rev, st) =
            (me.as_ref().and_then(|n| n.spec.target_revision.as_ref().map(|r| r.to_string())), me.and_then(|n| n.status).unwrap_or_default());
        let done = target_rev.as_deref().is_some_and(|t| t.contains("/repair-"))
            && st.applied_revision == target_rev
            && st.applied_revision != applied_before
            && st.healthy
            && helper_restarts(c, target).await > restarts_before;
        if done && all_healthy(c, masters, now_secs() - 25.0).await.is_ok() {
            applied = st.applied_revision.clone();
            break;
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(sample.elapsed())).await;
    }
    let revision = applied.unwrap_or_else(|| panic!("{point}: the repair of {target} did not end healthy within 300s\n{}", diagnostics()));
    let took = t0.elapsed().as_secs_f64();
    let restarts = helper_restarts(c, target).await - restarts_before;
    let (down, _, _) = health.most_down(from, now_secs());
    println!("{point} on {target}: helper killed ({restarts} container restart), step {revision} applied and 3/3 healthy after {took:.1}s; most masters down at once (/healthz): {down}");
    assert_eq!(restarts, 1, "{point}: the helper on {target} was killed once (container restarts)");
    // Never two at once. That the repair took this kcm down (once) is the journal's start
    // count below: a restart can be shorter than the watchers' 100 ms (kcm serves ~30 ms
    // after it starts), so /healthz may not see it (ci13: 0).
    assert!(down <= 1, "{point}: {down} masters without kcm at once during the repair of {target}");
    // kcm was started once for the step: a resumed step restarts it once, a finished one is
    // never redone (systemd's journal on the node, since the step was armed). Starts systemd
    // made itself (Restart=on-failure: "Scheduled restart job") are not the step's: kcm whose
    // certificate file was deleted may exit by itself before the repair.
    let unit = std::path::Path::new(&paths.unit).file_name().and_then(|n| n.to_str()).expect("unit file name").to_string();
    let (_, journal) = on_node(target, &format!("journalctl -u {unit} -o cat --no-pager --since @{node_t0} || true"));
    let starts = journal.lines().filter(|l| l.starts_with("Started ")).count();
    let by_systemd = journal.lines().filter(|l| l.contains("Scheduled restart job")).count();
    println!("{point}: kcm on {target} started {starts} times since the step was armed, {by_systemd} of them by systemd's Restart=");
    if starts - by_systemd.min(starts) != 1 {
        let starts_only: Vec<&str> = journal.lines().filter(|l| !l.starts_with('I') && !l.starts_with('E') && !l.starts_with('W')).collect();
        panic!(
            "{point}: kcm on {target} started {starts} times for the step ({by_systemd} by systemd):\n{}\nhelper logs:\n{}\n{}",
            starts_only.join("\n"),
            e2e::kind::helper_logs(c, target).await,
            diagnostics()
        );
    }
    assert!(!on_node(target, &format!("test -e {CRASH_AT}")).0, "{point}: the hook fired and removed itself");

    // The master's files belong together, and kcm serves the certificate on disk.
    let cert = CertInfo::from_pem(read_on(target, &paths.cert).as_bytes(), "certificate on disk").expect("a certificate");
    let key = pki::key_from_pem(&read_on(target, &paths.key), "key on disk").expect("a key");
    assert!(cert.matches_key(&key), "{point}: key and certificate on {target} belong together");
    let kubeconfig = read_on(target, &paths.kubeconfig);
    assert!(kubeconfig.contains(&paths.cert) && kubeconfig.contains(&paths.key), "{point}: the kubeconfig on {target} names the cert and key files");
    let (_, s) = cr(c).await.expect("the CR");
    let n = s.nodes.iter().find(|n| n.name == target).expect("status entry");
    assert_eq!(
        n.cert_serial.as_deref().map(str::to_ascii_lowercase),
        Some(cert.serial_hex.to_ascii_lowercase()),
        "{point}: kcm on {target} runs (and was probed serving) the certificate on disk"
    );
    // Exactly one certificate was issued for the step: the resumed step reused its request.
    let lp = ListParams::default().labels(&format!("{CSR_NODE_LABEL}={target}"));
    let csrs = Api::<CertificateSigningRequest>::all(c.clone()).list(&lp).await.unwrap();
    let issued: Vec<String> = csrs
        .items
        .iter()
        .filter(|x| x.spec.signer_name == SIGNER_NAME && x.annotations().get(CSR_REVISION_ANNOTATION) == Some(&revision))
        .filter(|x| x.status.as_ref().and_then(|s| s.certificate.as_ref()).is_some())
        .map(|x| x.name_any())
        .collect();
    assert_eq!(issued.len(), 1, "{point}: certificates issued to {target} for {revision}: {issued:?}");
    // kubeadm's manifest is where adoption put it; nothing of the step is left over.
    assert!(!on_node(target, &format!("test -e {}", paths.static_pod_manifest)).0, "{point}: kubeadm's kcm manifest stays moved aside on {target}");
    let adopted = node_helper::step::adopted_path(&kcm.spec).unwrap();
    assert!(on_node(target, &format!("test -s {adopted}")).0, "{point}: kubeadm's manifest kept at {adopted} on {target}");
    // The journal goes once the report is in the API (just after it): bounded wait.
    let journal_gone = Instant::now();
    while on_node(target, &format!("test -e {JOURNAL}")).0 {
        let (_, j) = on_node(target, &format!("cat {JOURNAL}"));
        assert!(journal_gone.elapsed() < Duration::from_secs(30), "{point}: the journal on {target} outlived its reported step by 30s:\n{j}");
        assert!(
            !j.contains("PRIVATE KEY") || !j.contains(&format!("\"{revision}\"")),
            "{point}: the journal of the applied step {revision} still holds its key:\n{j}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let prevs = on_node(target, &format!("ls {0}.prev {1}.prev {2}.prev {3}.prev 2>/dev/null", paths.key, paths.cert, paths.kubeconfig, paths.unit)).1;
    assert!(prevs.trim().is_empty(), "{point}: .prev files left on {target}: {prevs}");
}

/// A drift repair while another master is down: the CR paused, kcm stopped on `down`, the
/// certificate deleted on `drifted`; unpaused: `down` is repaired first, `drifted` after.
async fn drift_while_down(c: &kube::Client, masters: &[String], health: &HealthWatch, down: &str, drifted: &str) {
    let (kcm, _) = cr(c).await.expect("the CR");
    let kcm_nodes = Api::<KcmNode>::all(c.clone());
    let mut unpause = PatchGuard { patch: None };
    unpause.arm(serde_json::json!({"spec": {"paused": false}}));
    patch_cr(c, &serde_json::json!({"spec": {"paused": true}})).await.expect("pausing the CR");
    let (ok, out) = on_node(down, "systemctl stop kube-controller-manager");
    assert!(ok, "stopping kcm on {down}: {out}");
    let (ok, out) = on_node(drifted, &format!("rm -f {}", kcm.spec.paths.cert));
    assert!(ok, "deleting the certificate on {drifted}: {out}");
    // Both reported (paused: the helpers report, no step is given).
    let t0 = Instant::now();
    loop {
        let st = |n: Option<KcmNode>| n.and_then(|n| n.status).unwrap_or_default();
        let (d, x) = (st(kcm_nodes.get(down).await.ok()), st(kcm_nodes.get(drifted).await.ok()));
        if !d.healthy && !x.drift.is_empty() && x.healthy {
            println!("drift while down: {down} reports kcm down, {drifted} healthy with drift {:?} after {:.1}s (paused)", x.drift, t0.elapsed().as_secs_f64());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "reports of {down} (healthy {}) and {drifted} (drift {:?}) within 90s\n{}",
            d.healthy,
            x.drift,
            diagnostics()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let repair_of = |n: &KcmNode| n.spec.target_revision.as_ref().map(|r| r.to_string()).filter(|r| r.contains("/repair-"));
    let applied = |n: &KcmNode| n.status.as_ref().and_then(|s| s.applied_revision.clone());
    let target = |n: &KcmNode| n.spec.target_revision.as_ref().map(|r| r.to_string());
    let before_down = kcm_nodes.get(down).await.ok().and_then(|n| applied(&n));
    let before_drifted = kcm_nodes.get(drifted).await.ok().and_then(|n| applied(&n));
    let target_before = kcm_nodes.get(drifted).await.ok().and_then(|n| target(&n));
    let from = now_secs();
    patch_cr(c, &serde_json::json!({"spec": {"paused": false}})).await.expect("unpausing the CR");
    unpause.disarm();
    let mut down_done: Option<f64> = None;
    let t0 = Instant::now();
    loop {
        health.assert_fresh("drift while down", masters);
        let (most, at, who) = health.most_down(from, now_secs());
        assert!(most <= 1, "drift while down: {most} masters without a kcm answering /healthz at once (+{:.1}s: {who:?})\n{}", at - from, diagnostics());
        // The drifted one first: when its repair is seen given, the down one's end (which
        // came before it) is in the read after.
        let x = kcm_nodes.get(drifted).await.expect("KcmNode");
        let d = kcm_nodes.get(down).await.expect("KcmNode");
        let d_done = repair_of(&d).is_some_and(|r| Some(&r) == applied(&d).as_ref() && applied(&d) != before_down);
        // The drifted master's repair is given only once the down one's has ended.
        if repair_of(&x).is_some() && target(&x) != target_before {
            assert!(down_done.is_some() || d_done, "drift while down: {drifted} was given its repair before {down}'s ended: {down} {:?}", d.status);
        }
        if d_done {
            down_done.get_or_insert(now_secs());
        }
        let x_done = repair_of(&x).is_some_and(|r| Some(&r) == applied(&x).as_ref() && applied(&x) != before_drifted);
        if d_done && x_done && all_healthy(c, masters, from).await.is_ok() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "drift while down: both repairs within 240s\n{}", diagnostics());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (most, _, _) = health.most_down(from, now_secs());
    println!(
        "drift while down: {down} repaired first (+{:.1}s), then {drifted}; 3/3 healthy after {:.1}s; most masters down at once (/healthz): {most}",
        down_done.unwrap_or(from) - from,
        now_secs() - from
    );
    assert_eq!(most, 1, "drift while down: {down} was down; nothing else went down with it");
}

/// A journal that does not parse is reported on the KcmNode, left as it is, and no step runs
/// until it is moved aside.
async fn bad_journal(c: &kube::Client, masters: &[String], node: &str) {
    let kcm_nodes = Api::<KcmNode>::all(c.clone());
    let garbage = "{not a journal";
    let (ok, out) = on_node(node, &format!("printf '%s' '{garbage}' > {JOURNAL}"));
    assert!(ok, "writing a bad journal on {node}: {out}");
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            on_node(&self.0, &format!("rm -f {JOURNAL}"));
        }
    }
    let _remove = Remove(node.to_string());
    let t0 = Instant::now();
    let message = loop {
        let m = kcm_nodes.get(node).await.ok().and_then(|n| n.status).and_then(|s| s.message).unwrap_or_default();
        if m.contains("does not parse") {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "bad journal: {node}'s KcmNode never said so within 60s (message {m:?})\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(read_on(node, JOURNAL), garbage, "bad journal: the file on {node} is left as it was");
    println!("bad journal on {node}: reported after {:.1}s: {message}", t0.elapsed().as_secs_f64());
    drop(_remove);
    wait_all_healthy(c, masters, Duration::from_secs(60), "after the bad journal was removed").await;
}

#[tokio::test]
async fn a_helper_killed_mid_step_resumes_it() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    let leader = wait_all_healthy(&c, &masters, Duration::from_secs(180), "before the kills").await;
    let health = HealthWatch::start(&c, &masters).await;
    let followers: Vec<String> = masters.iter().filter(|m| **m != leader).cloned().collect();
    crash_at(&c, &masters, &health, &followers[0], "key-written").await;
    let leader = wait_all_healthy(&c, &masters, Duration::from_secs(120), "after key-written").await;
    crash_at(&c, &masters, &health, &leader, "unit-stopped").await;
    wait_all_healthy(&c, &masters, Duration::from_secs(120), "after unit-stopped").await;
    crash_at(&c, &masters, &health, &followers[1], "unit-written").await;
    wait_all_healthy(&c, &masters, Duration::from_secs(120), "after unit-written").await;
    crash_at(&c, &masters, &health, &followers[0], "step-applied").await;
    wait_all_healthy(&c, &masters, Duration::from_secs(120), "after step-applied").await;
    crash_at(&c, &masters, &health, &followers[1], "step-reported").await;
    let leader = wait_all_healthy(&c, &masters, Duration::from_secs(120), "after the kills").await;
    // The drifted master sorts first by name: the old rule (fewest problems, then name) took it
    // down while the other was down.
    let mut followers: Vec<String> = masters.iter().filter(|m| **m != leader).cloned().collect();
    followers.sort();
    drift_while_down(&c, &masters, &health, &followers[1], &followers[0]).await;
    wait_all_healthy(&c, &masters, Duration::from_secs(120), "after the drift repair").await;
    bad_journal(&c, &masters, &followers[0]).await;
}
