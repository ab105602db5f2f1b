//! A way back to kubeadm on kind (3 control-plane nodes), and back again: `spec.handBack:
//! kubeadm` restores kubeadm's kcm static pod on each master, one at a time, the kcm leader's
//! last, and stops and disables our unit there only once kubeadm's kcm answers /healthz.
//! Bad input first: one master whose kept manifest is gone refuses, nothing stopped there, and
//! is handed back once the manifest is there again. Then every master runs kubeadm's kcm, our
//! units are inactive and disabled, the operator's static pods are gone, and kubeadm's kcm
//! leads and works (a Deployment gets its Pods). Throughout: never two masters without a
//! serving kcm (/healthz at 10 Hz, kubeadm's counted), at most 3 s without a working leader.
//! Then the field is removed: the helpers put the operator back, and it adopts kubeadm's kcm
//! again, leaving the cluster as the tests before found it. Runs before the destructive tests.

use std::time::{Duration, Instant};

use e2e::apitier::poll;
use e2e::kind::{await_healthy, client, cr, diagnostics, masters, now_secs, on_node, patch_cr, pods_with_app};
use e2e::leadership::{leaderless, HealthWatch, Watch};
use kcm_operator::api::{Revision, OPERATOR_APP, OPERATOR_MANIFEST};
use kcm_operator::rollout::leader_node;
use node_helper::step::adopted_path;

const MANIFEST_DIR: &str = "/etc/kubernetes/manifests";

fn handed_back(rev: Option<&str>) -> bool {
    rev.and_then(|r| r.parse::<Revision>().ok()).is_some_and(|r| r.hand_back_at().is_some())
}

#[tokio::test]
async fn hand_back_to_kubeadm_and_adopt_again() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    let leader = await_healthy(&c, &masters, 0.0, Duration::from_secs(300)).await.unwrap_or_else(|e| panic!("before the hand back: {e}\n{}", diagnostics()));
    let (k, _) = cr(&c).await.expect("the CR");
    let kept = adopted_path(&k.spec).expect("kubeadm's manifest is kept aside in the kind layout");
    let kubeadm_manifest = k.spec.paths.static_pod_manifest.clone();
    for m in &masters {
        assert!(on_node(m, &format!("test -s {kept} && ! test -e {kubeadm_manifest}")).0, "{m}: kubeadm's manifest kept aside at {kept}");
    }
    let health = HealthWatch::start(&c, &masters).await;
    let watch = Watch::start(&masters);
    // From the watcher's first Lease read: before it, nothing is known.
    poll("the Lease watcher's first read", Duration::from_secs(10), || async { watch.latest().map(|_| ()) }).await.expect("the Lease watcher reads");
    let t0 = now_secs();

    // Bad input: the first follower's kept manifest is gone. The hand back is refused there
    // with the reason, and nothing is stopped: its kcm keeps its MainPID.
    let bad = masters.iter().find(|m| **m != leader).unwrap().clone();
    let aside = format!("{kept}.e2e-aside");
    assert!(on_node(&bad, &format!("mv {kept} {aside}")).0);
    let pid_before = e2e::leadership::unit_facts(&bad).main_pid;
    // A short health timeout: the refused master is tried again 45 s after the refusal.
    patch_cr(&c, &serde_json::json!({"spec": {"handBack": "kubeadm", "kcm": {"healthTimeoutSeconds": 15}}})).await.unwrap();
    let refused = poll("the hand back refused on the master without a kept manifest", Duration::from_secs(120), || async {
        let (_, s) = cr(&c).await?;
        let n = s.nodes.iter().find(|n| n.name == bad)?;
        (handed_back(n.failed_revision.as_deref()) && n.failed_revision == n.target_revision).then(|| n.message.clone().unwrap_or_default())
    })
    .await
    .unwrap_or_else(|| panic!("{bad}: no refusal\n{}", diagnostics()));
    println!("bad input on {bad}: {refused}");
    assert!(refused.contains("no kubeadm manifest kept aside"), "{refused}");
    let pid_after = e2e::leadership::unit_facts(&bad).main_pid;
    assert!(pid_before != 0 && pid_after == pid_before, "{bad}: our kcm kept running (MainPID {pid_before} -> {pid_after})");
    assert!(!on_node(&bad, &format!("test -e {kubeadm_manifest}")).0, "{bad}: nothing written");
    assert!(on_node(&bad, &format!("mv {aside} {kept}")).0);

    // Every master handed back, the leader's last; the CR says HandedBack.
    let t_refused = Instant::now();
    let (worst, log) = health.max_down_during(&masters, Duration::from_secs(420), || async { cr(&c).await.is_some_and(|(k, _)| k.handed_back()) }).await;
    let t1 = now_secs();
    println!("handed back {:.1}s after the kept manifest was put back ({:.1}s in all)", t_refused.elapsed().as_secs_f64(), t1 - t0);
    let (_, s) = cr(&c).await.unwrap();
    let mut order: Vec<(i64, String)> =
        s.nodes.iter().filter_map(|n| Some((n.applied_revision.as_deref()?.parse::<Revision>().ok()?.hand_back_at()?, n.name.clone()))).collect();
    order.sort();
    println!("order: {order:?} (kcm leader before: {leader})");
    assert_eq!(order.len(), 3, "{s:?}");
    assert_eq!(order.last().map(|(_, n)| n.as_str()), Some(leader.as_str()), "the leader's master last: {order:?}");
    assert!(worst <= 1, "hand back: at most one master without a serving kcm: {log}");
    let gaps = leaderless(&watch.lease_all(), &watch.pid_tracks(), t0, t1, true);
    let longest = gaps.iter().map(|(a, b, _)| b - a).fold(0.0, f64::max);
    println!("most masters down at once (/healthz, kubeadm's counted): {worst}; {log}; longest without a working kcm leader {longest:.1}s: {gaps:?}");
    assert!(longest <= 3.0, "leaderless {longest:.1}s > 3s: {gaps:?}");

    // What is left on the masters: kubeadm's kcm static pod, our unit inactive and disabled,
    // no operator static pod.
    for m in &masters {
        let (_, state) = on_node(m, "systemctl is-active kube-controller-manager; systemctl is-enabled kube-controller-manager");
        assert_eq!(state.split_whitespace().collect::<Vec<_>>(), ["inactive", "disabled"], "{m}: our unit: {state}");
        assert!(on_node(m, &format!("test -s {kubeadm_manifest}")).0, "{m}: kubeadm's manifest back");
    }
    let mirrors = poll("kubeadm's kcm pods Running and Ready on every master", Duration::from_secs(60), || async {
        let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), "kube-system")
            .list(&kube::api::ListParams::default().labels("component=kube-controller-manager"))
            .await
            .ok()?;
        (pods.items.iter().filter(|p| e2e::kind::pod_ready(p)).count() == 3).then_some(pods.items.len())
    })
    .await;
    assert!(mirrors.is_some(), "kubeadm's kcm mirror pods\n{}", diagnostics());
    let holder = watch.latest().and_then(|l| l.holder).expect("a kcm leader");
    let holder_node = leader_node(Some(&holder)).unwrap_or_default();
    assert!(!e2e::kind::unit_active(&holder_node), "the leader {holder} is kubeadm's kcm (our unit on {holder_node} is stopped)");
    let ns = "kcm-e2e-handback";
    if let Err(e) = e2e::kind::deployment_gets_pods(&c, ns, Duration::from_secs(60)).await {
        panic!("kubeadm's kcm does not work: {e}\n{}", diagnostics());
    }
    let _ = e2e::kind::kubectl(&["delete", "namespace", ns, "--wait=false"]);
    let gone = poll("the operator's static pods removed", Duration::from_secs(90), || async {
        let left = masters.iter().filter(|m| on_node(m, &format!("test -e {MANIFEST_DIR}/{OPERATOR_MANIFEST}")).0).count();
        (left == 0 && pods_with_app(&c, OPERATOR_APP).await.is_empty()).then_some(())
    })
    .await;
    assert!(gone.is_some(), "operator static pods still there\n{}", diagnostics());
    println!("handed back: kubeadm's kcm on all three ({holder} leads, a Deployment got its Pods), our units inactive and disabled, no operator pod left");

    // And back: without handBack the helpers put the operator's static pods back, and it
    // adopts kubeadm's kcm again, one master at a time.
    let t2 = now_secs();
    patch_cr(&c, &serde_json::json!({"spec": {"handBack": null, "kcm": {"healthTimeoutSeconds": null}}})).await.unwrap();
    let (worst, log) =
        health.max_down_during(&masters, Duration::from_secs(420), || async { await_healthy(&c, &masters, t2, Duration::from_secs(0)).await.is_ok() }).await;
    let t3 = now_secs();
    let gaps = leaderless(&watch.lease_all(), &watch.pid_tracks(), t2, t3, false);
    let longest = gaps.iter().map(|(a, b, _)| b - a).fold(0.0, f64::max);
    println!("adopted again in {:.1}s; most masters down at once: {worst}; {log}; longest Lease gap {longest:.1}s", t3 - t2);
    assert!(worst <= 1, "adopting again: at most one master without a serving kcm: {log}");
    for m in &masters {
        assert!(on_node(m, &format!("test -s {kept} && ! test -e {kubeadm_manifest}")).0, "{m}: kubeadm's manifest kept aside again");
    }
}
