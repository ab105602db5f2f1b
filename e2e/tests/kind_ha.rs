//! The seed's section 2 on kind (3 control-plane nodes), from `kubectl apply -k manifests/kind/`:
//! adoption under faults first (a first step on a kubeadm master that fails health is rolled
//! back to kubeadm's kcm; a helper SIGKILLed right after moving kubeadm's static pod aside is
//! succeeded by one that finishes the step); the operator rolls kcm out under systemd on every
//! master one at a time (kubeadm's kcm static pod adopted), with certificates issued through
//! the CSR API, never two masters without a kcm answering /healthz (kubeadm's counted while
//! it serves; [`HealthWatch`], 10 Hz); then the seed's
//! checks (2.1-2.5), failover, a flag change rolled out with never two masters down (the
//! leading operator replica SIGTERMed mid-rollout, another finishes it), and a bad spec
//! rolled back on the first node while the other two keep running.
//!
//! One test, in phases, because every phase builds on the cluster state the one before left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::apitier::poll;
use e2e::kind::{client, diagnostics, kubectl, on_node};
use e2e::leadership::HealthWatch;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kcm_operator::api::CR_NAME;
use kcm_operator::api::{KubeControllerManager, KubeControllerManagerStatus, CONTROL_PLANE_LABEL, CSR_NODE_LABEL, KCM_USER, SIGNER_NAME};
use kcm_operator::pki::NodeIdentity;
use kcm_operator::render::spec_revision;
use kcm_operator::rollout::{leader_node, spec_part};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

async fn status(c: &kube::Client) -> (KubeControllerManager, KubeControllerManagerStatus) {
    let k = Api::<KubeControllerManager>::all(c.clone()).get(CR_NAME).await.expect("CR");
    let s = k.status.clone().unwrap_or_default();
    (k, s)
}

/// Waits until every master runs the spec's current revision, healthy.
async fn rolled_out(c: &kube::Client, masters: &[String], within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    let ok = poll(what, within, || async {
        let (k, s) = status(c).await;
        let rev = spec_revision(&k.spec);
        // The operator has seen this spec (its conditions are this spec's), and every master runs it.
        let seen = s.observed_generation.is_some() && s.observed_generation == k.metadata.generation;
        let all = masters
            .iter()
            .all(|m| s.nodes.iter().any(|n| &n.name == m && n.healthy && n.applied_revision.as_deref().and_then(spec_part).as_deref() == Some(rev.as_str())));
        (seen && all).then_some(())
    })
    .await;
    if ok.is_none() {
        panic!("{what}: not done within {within:?}\n{}", diagnostics());
    }
    t0.elapsed()
}

async fn kcm_leader(c: &kube::Client) -> Option<String> {
    let l = Api::<Lease>::namespaced(c.clone(), "kube-system").get("kube-controller-manager").await.ok()?;
    leader_node(l.spec?.holder_identity.as_deref())
}

fn unit_active(node: &str) -> bool {
    on_node(node, "systemctl is-active kube-controller-manager").1.trim() == "active"
}

#[tokio::test]
async fn ha_kcm_on_three_masters() {
    let c = client().await;
    let nodes = Api::<Node>::all(c.clone()).list(&ListParams::default().labels(CONTROL_PLANE_LABEL)).await.unwrap();
    let mut masters: Vec<String> = nodes.items.iter().map(|n| n.metadata.name.clone().unwrap()).collect();
    masters.sort();
    assert_eq!(masters.len(), 3, "three control-plane nodes");
    let leader_before = kcm_leader(&c).await;
    println!("masters {masters:?}; kcm leader before: {leader_before:?}");

    // Phase 0: adoption under faults. The CR is made before the install, paused, with a flag
    // kcm accepts but cannot run with (a lease shorter than the renew deadline); `kubectl
    // apply -k` then sets what its file has and keeps the rest.
    let (ok, out) = kubectl(&["apply", "-f", "manifests/base/crd.yaml"]);
    assert!(ok, "the CRDs: {out}");
    let (ok, out) = kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/kubecontrollermanagers.kcm.kcm-operator.io",
        "crd/kcmnodes.kcm.kcm-operator.io",
    ]);
    assert!(ok, "the CRDs established: {out}");
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/kind/kubecontrollermanager.yaml")).expect("manifests/kind's CR");
    let mut bad: KubeControllerManager = serde_yaml::from_str(&file).expect("manifests/kind's CR parses");
    bad.spec.paused = true;
    bad.spec.kcm.health_timeout_seconds = 20;
    bad.spec.kcm.extra_args.insert("leader-elect-lease-duration".into(), "1s".into());
    Api::<KubeControllerManager>::all(c.clone()).create(&PostParams::default(), &bad).await.expect("creating the CR (a fresh cluster)");
    let (ok, out) = e2e::kind::apply_kustomization("manifests/kind/");
    assert!(ok, "kubectl apply -k manifests/kind/:\n{out}");
    let health = HealthWatch::start(&c, &masters).await;
    let unpause = serde_json::json!({"spec": {"paused": false}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&unpause)).await.unwrap();
    // Done when a master reports its target failed (rolled back) and the CR says Degraded.
    let (worst, log) = health
        .max_down_during(&masters, Duration::from_secs(300), || async {
            let (_, s) = status(&c).await;
            s.nodes.iter().any(|n| n.failed_revision.is_some() && n.failed_revision == n.target_revision)
                && s.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True")
        })
        .await;
    let (k, s) = status(&c).await;
    let failed: Vec<_> = s.nodes.iter().filter(|n| n.failed_revision.is_some() && n.failed_revision == n.target_revision).collect();
    assert_eq!(failed.len(), 1, "adoption: exactly one master tried the unhealthy spec: {:?}", s.nodes);
    let first = failed[0].name.clone();
    println!(
        "phase 0: the first step, on kubeadm's master {first}, failed health and was rolled back: {:?}; most masters down at once: {worst}; {log}",
        failed[0].message
    );
    assert_eq!(worst, 1, "adoption: one master at a time without a serving kcm (0: the watch missed the outage): {log}\n{}", diagnostics());
    // kubeadm's kcm is back on that master: its manifest where kubeadm put it, its kcm serving,
    // our unit stopped and disabled (it was not running before the step).
    let manifest = k.spec.paths.static_pod_manifest.clone();
    assert!(on_node(&first, &format!("test -s {manifest}")).0, "adoption: kubeadm's manifest back at {manifest} on {first}");
    assert!(!unit_active(&first), "adoption: our unit on {first} is stopped after the rollback");
    let back = poll("kubeadm's kcm serving again", Duration::from_secs(120), || async { health.up(&first).then_some(()) }).await;
    assert!(back.is_some(), "adoption: kubeadm's kcm on {first} answers /healthz again after the rollback\n{}", diagnostics());
    let from = e2e::kind::now_secs();
    // Each master in the state of its latest probe.
    let (n, _, who) = health.most_down(from, from);
    assert_eq!(n, 0, "phase 0: every master serves kcm after the rollback: {who:?}");

    // Phase 1: the spec fixed, the rollout from kubeadm's kcm to ours, one master at a time,
    // leader last. The helper on `first` (it goes first again, by the same rule) is armed to
    // SIGKILL itself right after it moved kubeadm's static pod aside; its successor finishes
    // the step. Only that one is armed: whichever of its steps adopts, the hook fires once.
    let _disarm = e2e::kind::Disarm(vec![first.clone()]);
    let restarts_before = e2e::kind::helper_restarts(&c, &first).await;
    let (ok, out) = on_node(&first, &format!("echo static-pod-moved > {}", e2e::kind::CRASH_AT));
    assert!(ok, "arming static-pod-moved on {first}: {out}");
    let fix = serde_json::json!({"spec": {"kcm": {"healthTimeoutSeconds": null, "extraArgs": {"leader-elect-lease-duration": null}}}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&fix)).await.unwrap();
    let (worst, log) = health
        .max_down_during(&masters, Duration::from_secs(600), || async {
            let (k, s) = status(&c).await;
            let rev = spec_revision(&k.spec);
            masters.iter().all(|m| {
                s.nodes.iter().any(|n| &n.name == m && n.healthy && n.applied_revision.as_deref().and_then(spec_part).as_deref() == Some(rev.as_str()))
            })
        })
        .await;
    let restarts = e2e::kind::helper_restarts(&c, &first).await - restarts_before;
    println!("phase 1: rolled out; the helper on {first} killed right after moving kubeadm's static pod aside ({restarts} container restart); most masters down at once (/healthz, kubeadm's kcm counted while it serves): {worst}; {log}");
    assert!(!on_node(&first, &format!("test -e {}", e2e::kind::CRASH_AT)).0, "adoption: the hook on {first} fired");
    assert_eq!(restarts, 1, "adoption: the helper on {first} was killed once");
    assert_eq!(worst, 1, "adoption: one master at a time without a serving kcm (0: the watch missed the outage): {log}\n{}", diagnostics());
    let (k, s) = status(&c).await;
    assert_eq!(s.ready.as_deref(), Some("3/3"), "{s:?}");
    let kcm_paths = k.spec.paths.clone();

    // Seed 2.1/2.2: the unit is active under systemd on every master, started from our files.
    for node in &nodes.items {
        let name = node.metadata.name.clone().unwrap();
        let ip = NodeIdentity::from_node(node).unwrap().primary_ip().to_string();
        assert!(unit_active(&name), "kube-controller-manager.service active on {name}");
        let (_, unit) = on_node(&name, &format!("cat {}", kcm_paths.unit));
        assert!(unit.contains(&format!("--bind-address={ip} ")) && unit.contains("--secure-port=10252 "), "unit on {name}:\n{unit}");
        let (_, mode) = on_node(&name, &format!("stat -c %a {}", kcm_paths.key));
        assert_eq!(mode.trim(), "600", "key mode on {name}");
        let (ok, out) = on_node(&name, &format!("grep -c certificate-authority-data {}", kcm_paths.kubeconfig));
        assert!(ok && out.trim() == "1", "kubeconfig on {name} embeds the CA: {out}");
        let (ok, _) = on_node(&name, &format!("test -e {}", kcm_paths.static_pod_manifest));
        assert!(!ok, "kubeadm's kcm static pod manifest is moved aside on {name}");
        let (_, who) = on_node(&name, &format!("kubectl --kubeconfig {} auth whoami -o jsonpath='{{.status.userInfo.username}}'", kcm_paths.kubeconfig));
        assert_eq!(who.trim(), KCM_USER, "the written kubeconfig on {name}");
        let entry = s.nodes.iter().find(|n| n.name == name).unwrap();
        println!("{name}: serial {:?} notAfter {:?} kcm {:?} warnings {:?}", entry.cert_serial, entry.not_after, entry.kcm_version, entry.warnings);
    }
    let mirror = Api::<Pod>::namespaced(c.clone(), "kube-system").list(&ListParams::default().labels("component=kube-controller-manager")).await.unwrap();
    assert!(mirror.items.is_empty(), "kubeadm's kcm pods are gone: {:?}", mirror.items.iter().map(|p| p.metadata.name.clone()).collect::<Vec<_>>());
    let csrs = Api::<CertificateSigningRequest>::all(c.clone()).list(&ListParams::default()).await.unwrap();
    for m in &masters {
        assert!(
            csrs.items.iter().any(|x| x.spec.signer_name == SIGNER_NAME
                && x.metadata.labels.as_ref().and_then(|l| l.get(CSR_NODE_LABEL)) == Some(m)
                && x.status.as_ref().is_some_and(|st| st.certificate.is_some() && st.conditions.iter().flatten().any(|c| c.type_ == "Approved"))),
            "an Approved and Issued CSR for {m}"
        );
    }

    // Seed 2.3: metrics on the secure port with the admin's client certificate; refused without.
    let (_, ca) = on_node(&masters[0], &format!("cat {}", kcm_paths.ca_cert));
    for node in &nodes.items {
        let ip = NodeIdentity::from_node(node).unwrap().primary_ip().to_string();
        if let Err(e) = e2e::kind::metrics_with_admin_cert(&ip, 10252, &ca) {
            panic!("seed 2.3: {e}");
        }
    }
    println!("seed 2.3: metrics served with the admin cert, refused without, on all three masters");

    // Seed 2.4: per-controller ServiceAccounts, and a Deployment gets its ReplicaSet and Pods.
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), "kube-system").list(&ListParams::default()).await.unwrap();
    assert!(sas.items.iter().any(|s| s.metadata.name.as_deref() == Some("deployment-controller")), "deployment-controller SA");
    let (ok, out) = kubectl(&["get", "clusterrolebinding", "system:controller:deployment-controller", "-o", "jsonpath={.subjects[0].name}"]);
    assert!(ok && out.trim() == "deployment-controller", "{out}");
    let ns = "kcm-e2e-deploy";
    if let Err(e) = e2e::kind::deployment_gets_pods(&c, ns, Duration::from_secs(60)).await {
        panic!("seed 2.4: {e}: not from our kcm\n{}", diagnostics());
    }
    let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
    println!("seed 2.4: deployment-controller SA bound; a Deployment got its ReplicaSet and Pods");

    // kubeadm's flags kept through adoption: a Node made after it gets spec.podCIDR from
    // --cluster-cidr (kind's podSubnet), which only a kcm with --allocate-node-cidrs gives.
    // No kubelet behind it: node IPAM allocates for the object; it is deleted at once.
    let nodes_api = Api::<Node>::all(c.clone());
    let fake = format!("kcm-e2e-podcidr-{}", std::process::id());
    let body: Node = serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": fake}})).unwrap();
    nodes_api.create(&PostParams::default(), &body).await.unwrap();
    let t0 = Instant::now();
    let cidr = poll("spec.podCIDR on a new Node", Duration::from_secs(60), || async { nodes_api.get(&fake).await.ok()?.spec?.pod_cidr }).await;
    let _ = nodes_api.delete(&fake, &Default::default()).await;
    let cidr = cidr.unwrap_or_else(|| panic!("a Node made after adoption got no spec.podCIDR in 60s: --allocate-node-cidrs dropped?\n{}", diagnostics()));
    assert!(cidr.starts_with("10.244."), "podCIDR {cidr} from kind's podSubnet 10.244.0.0/16");
    println!("kubeadm's flags kept: a Node made after adoption got podCIDR {cidr} in {:.1}s", t0.elapsed().as_secs_f64());

    // kubeadm writes its kcm manifest again (as `kubeadm upgrade` does) on a follower's master:
    // drift, and its repair adopts it again (moved aside, our kcm restarted), never two masters
    // without a serving kcm.
    let leader = kcm_leader(&c).await.expect("kcm Lease holder");
    let again = masters.iter().find(|m| **m != leader).unwrap().clone();
    let kept = node_helper::step::adopted_path(&k.spec).expect("kubeadm's manifest is kept aside");
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(on_node(&again, &format!("cp {kept} {}", kcm_paths.static_pod_manifest)).0, "writing kubeadm's manifest again on {again}");
    let (worst, log) = health
        .max_down_during(&masters, Duration::from_secs(180), || async {
            let (_, s) = status(&c).await;
            let repaired = s.nodes.iter().any(|n| {
                n.name == again
                    && n.healthy
                    && n.drift.is_empty()
                    && n.applied_revision.as_deref().and_then(kcm_operator::rollout::repair_given_at).is_some_and(|at| at >= since)
            });
            repaired && !on_node(&again, &format!("test -e {}", kcm_paths.static_pod_manifest)).0
        })
        .await;
    assert!(
        !on_node(&again, &format!("test -e {}", kcm_paths.static_pod_manifest)).0 && on_node(&again, &format!("test -s {kept}")).0,
        "kubeadm's manifest moved aside again on {again}: {log}\n{}",
        diagnostics()
    );
    assert!(worst <= 1, "kubeadm's manifest written again: at most one master without a serving kcm: {log}");
    rolled_out(&c, &masters, Duration::from_secs(60), "all healthy after the manifest was adopted again").await;
    println!("kubeadm's manifest written again on {again}: drift, adopted again by a repair; most masters down at once (/healthz): {worst}; {log}");

    // Seed 2.5: one leader among the three, the same in the CR's status.
    let leader = kcm_leader(&c).await.expect("kcm Lease holder");
    assert!(masters.contains(&leader), "leader {leader} is a master");
    let shown = poll("status.leader matches the Lease", Duration::from_secs(30), || async {
        let (_, s) = status(&c).await;
        (s.leader.as_deref() == Some(leader.as_str())).then_some(())
    })
    .await;
    assert!(shown.is_some(), "status.leader != {leader}");
    println!("seed 2.5: leader {leader}");

    // Failover: stop kcm on the leader's node; another kcm process takes the Lease. That is
    // a follower on another master, or the leader's own master again: its helper repairs the
    // stopped unit within a second, and the restarted kcm races the followers for the Lease
    // the fence released (CI saw it win). Either way the cluster has a leader again soon.
    let old_holder = e2e::kind::kcm_lease(&c).await.and_then(|l| l.holder).expect("kcm Lease holder");
    let t0 = Instant::now();
    assert!(on_node(&leader, "systemctl stop kube-controller-manager").0);
    let new =
        poll("a new kcm leader", Duration::from_secs(60), || async { e2e::kind::kcm_lease(&c).await.and_then(|l| l.holder).filter(|h| *h != old_holder) })
            .await;
    let gap = t0.elapsed();
    let new = new.unwrap_or_else(|| panic!("no new kcm leader within 60s after stopping kcm on {leader} (holder was {old_holder})\n{}", diagnostics()));
    println!("failover: {old_holder} -> {new} in {:.1}s after systemctl stop", gap.as_secs_f64());
    // The helper may have repaired the unit already; starting an active unit is a no-op.
    assert!(on_node(&leader, "systemctl start kube-controller-manager").0);
    rolled_out(&c, &masters, Duration::from_secs(120), "all healthy again after failover").await;

    // A flag change rolls out node by node, leader last, never two masters down at once.
    let leader = kcm_leader(&c).await.expect("leader");
    // A value the spec does not have yet, so the change is real on a re-run too.
    let gc = if k.spec.kcm.extra_args.get("concurrent-gc-syncs").map(String::as_str) == Some("20") { "21" } else { "20" };
    let patch = serde_json::json!({"spec": {"kcm": {"extraArgs": {"concurrent-gc-syncs": gc}}}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let applied_at = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, Duration>::new()));
    let t0 = Instant::now();
    // Mid-rollout, once the first master is done, the leading operator's process gets
    // SIGTERM (the operator is a static pod: deleting its mirror pod would not stop it): it
    // releases the operator's Lease, another replica takes it over and finishes the rollout.
    let killed = std::sync::Arc::new(std::sync::Mutex::new(None::<(String, String)>));
    // kcm's Lease as last seen: (holder identity, renewTime); and the leaderless gap at a hand-off,
    // from the old holder's last renewal to the new holder's acquisition.
    let lease_seen =
        std::sync::Arc::new(std::sync::Mutex::new((None::<String>, None::<k8s_openapi::jiff::Timestamp>, Vec::<String>::new(), Vec::<f64>::new())));
    let (worst, log) = health
        .max_down_during(&masters, Duration::from_secs(600), || {
            let c = c.clone();
            let masters = masters.clone();
            let applied_at = applied_at.clone();
            let killed = killed.clone();
            let lease_seen = lease_seen.clone();
            async move {
                if let Ok(l) = Api::<Lease>::namespaced(c.clone(), "kube-system").get("kube-controller-manager").await {
                    let spec = l.spec.unwrap_or_default();
                    // The full identity (`<host>_<uuid>`): a restarted kcm on the same master is a new holder.
                    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
                    let mut seen = lease_seen.lock().unwrap();
                    if holder.is_some() && seen.0.is_some() && holder != seen.0 {
                        if let (Some(last), Some(acq)) = (seen.1, spec.acquire_time.as_ref().map(|t| t.0)) {
                            let gap = acq.duration_since(last).as_secs_f64();
                            let line = format!("{} -> {}: {gap:.1}s without a leader", seen.0.clone().unwrap_or_default(), holder.clone().unwrap_or_default());
                            seen.2.push(line);
                            seen.3.push(gap);
                        }
                    }
                    if holder.is_some() {
                        seen.0 = holder;
                        seen.1 = spec.renew_time.map(|t| t.0);
                    }
                }
                let (k, s) = status(&c).await;
                let rev = spec_revision(&k.spec);
                // Read before the locks below (no lock is held across an await).
                let operator_holder = e2e::kind::operator_lease(&c).await.and_then(|l| l.holder);
                let mut at = applied_at.lock().unwrap();
                for n in &s.nodes {
                    if n.healthy && n.applied_revision.as_deref().and_then(spec_part).as_deref() == Some(rev.as_str()) {
                        at.entry(n.name.clone()).or_insert(t0.elapsed());
                    }
                }
                let mut killed = killed.lock().unwrap();
                if !at.is_empty() && at.len() < masters.len() && killed.is_none() {
                    let holder = operator_holder.unwrap_or_else(|| panic!("no operator Lease holder mid-rollout\n{}", diagnostics()));
                    let node = leader_node(Some(&holder)).unwrap_or_default();
                    let (ok, out) = on_node(&node, "pkill -TERM -x kcm-operator");
                    assert!(ok, "SIGTERM to the leading operator on {node}: {out}");
                    let note = format!("{holder} on {node} got SIGTERM at +{:.1}s with {:?} done", t0.elapsed().as_secs_f64(), at.keys().collect::<Vec<_>>());
                    *killed = Some((holder, note));
                }
                masters.iter().all(|m| at.contains_key(m))
            }
        })
        .await;
    let killed = killed.lock().unwrap().clone();
    let operator_holder = e2e::kind::operator_lease(&c).await.and_then(|l| l.holder);
    println!("operator takeover: {:?}; operator Lease now held by {operator_holder:?}", killed.as_ref().map(|k| &k.1));
    let (_, _, handoffs, gaps) = lease_seen.lock().unwrap().clone();
    println!("kcm leader hand-offs during the rollout: {handoffs:?}");
    // Restarting the leader's kcm hands the Lease to a follower without waiting out the
    // 15 s lease: the helper releases it once the old kcm is confirmed down.
    assert!(!gaps.is_empty(), "restarting the leader's node moved the kcm Lease");
    assert!(gaps.iter().all(|g| *g < 10.0), "leaderless gaps at hand-off: {handoffs:?}");
    let (killed_holder, _) = killed.expect("the leading operator got SIGTERM mid-rollout");
    assert!(operator_holder.is_some_and(|h| h != killed_holder), "another operator replica took the Lease over from {killed_holder}\n{}", diagnostics());
    let applied_at = applied_at.lock().unwrap().clone();
    println!("flag change: applied at {applied_at:?}; leader {leader}; most masters down at once (/healthz): {worst}; {log}");
    assert_eq!(worst, 1, "one master at a time without kcm (0: the watch missed the outage): {log}");
    let at_leader = applied_at[&leader];
    assert!(applied_at.iter().all(|(n, t)| *n == leader || *t < at_leader), "the leader's node goes last: {applied_at:?}");
    for m in &masters {
        let (_, unit) = on_node(m, &format!("cat {}", kcm_paths.unit));
        assert!(unit.contains(&format!("--concurrent-gc-syncs={gc} ")), "new flag on {m}");
    }
    // One RolloutStep Event per master, regarding its KcmNode, naming the node and the revision.
    let rev = spec_revision(&Api::<KubeControllerManager>::all(c.clone()).get(CR_NAME).await.unwrap().spec);
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(c.clone()).list(&ListParams::default().fields("reason=RolloutStep")).await.unwrap();
    let steps: BTreeMap<String, String> = events
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("KcmNode"))
        .filter_map(|e| Some((e.regarding.as_ref()?.name.clone()?, e.note.clone()?)))
        .filter(|(_, note)| note.contains(&rev))
        .collect();
    println!("RolloutStep events for revision {rev}: {steps:?}");
    for m in &masters {
        assert!(
            steps.get(m).is_some_and(|note| note.starts_with(&format!("{m}: "))),
            "a RolloutStep Event regarding KcmNode {m} names it and {rev}: {steps:?}"
        );
    }

    // Bad input: a kcm binary that does not exist. The first node fails before touching
    // anything, the rollout stops Degraded, the other masters keep running, a leader remains.
    let patch = serde_json::json!({"spec": {"kcm": {"binaryPath": "/opt/k8s/bin/no-such-kcm"}}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let degraded = poll("Degraded=True", Duration::from_secs(120), || async {
        let (_, s) = status(&c).await;
        s.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True").map(|c| c.message.clone())
    })
    .await;
    let msg = degraded.unwrap_or_else(|| panic!("no Degraded condition\n{}", diagnostics()));
    println!("bad binary: Degraded: {msg}");
    assert!(msg.contains("no-such-kcm"), "{msg}");
    for m in &masters {
        assert!(unit_active(m), "kcm still active on {m}");
    }
    assert!(kcm_leader(&c).await.is_some(), "a leader remains");
    // Step Events regard the masters' KcmNodes (one per step, see operator/src/events.rs).
    let (ok, events) = kubectl(&["get", "events", "-A", "--field-selector", "involvedObject.kind=KcmNode", "-o", "jsonpath={.items[*].reason}"]);
    assert!(ok && events.contains("RolloutStopped") && events.contains("RolloutStep"), "events: {events}");
    // Put it right: the rollout resumes and completes.
    let patch = serde_json::json!({"spec": {"kcm": {"binaryPath": "/opt/k8s/bin/kube-controller-manager"}}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let took = rolled_out(&c, &masters, Duration::from_secs(300), "recovery after the bad binary").await;
    println!("recovered in {:.0}s", took.as_secs_f64());

    // A flag kcm accepts but cannot run with (lease duration below the renew deadline): the
    // first node's kcm never gets healthy, so its files are rolled back and the old kcm is
    // restarted; the rollout stops Degraded; no moment with two masters down; a leader remains.
    let before: BTreeMap<String, String> = masters.iter().map(|m| (m.clone(), on_node(m, &format!("cat {}", kcm_paths.unit)).1)).collect();
    let patch = serde_json::json!({"spec": {"kcm": {"healthTimeoutSeconds": 20, "extraArgs": {"leader-elect-lease-duration": "1s"}}}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let (worst, log) = health
        .max_down_during(&masters, Duration::from_secs(180), || async {
            // Degraded for this spec (its generation), not left from the one before.
            let (k, s) = status(&c).await;
            s.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True" && c.observed_generation == k.metadata.generation)
        })
        .await;
    let (_, s) = status(&c).await;
    let failed: Vec<_> = s.nodes.iter().filter(|n| n.failed_revision.is_some() && n.failed_revision == n.target_revision).collect();
    assert_eq!(failed.len(), 1, "exactly one node tried the bad flag: {:?}", s.nodes);
    let bad = failed[0].name.clone();
    println!("bad flag: {bad} rolled back: {:?}; most masters down at once (/healthz): {worst}; {log}", failed[0].message);
    assert_eq!(worst, 1, "one master at a time without kcm (0: the watch missed the outage): {log}");
    let healthy_again = poll("the rolled-back node healthy again", Duration::from_secs(60), || async {
        let (_, s) = status(&c).await;
        s.nodes.iter().any(|n| n.name == bad && n.healthy && n.unit_active).then_some(())
    })
    .await;
    assert!(healthy_again.is_some(), "{bad} is not healthy after the rollback\n{}", diagnostics());
    for m in &masters {
        assert!(unit_active(m), "kcm active on {m}");
        assert_eq!(on_node(m, &format!("cat {}", kcm_paths.unit)).1, before[m], "the unit on {m} is the one from before");
    }
    assert!(kcm_leader(&c).await.is_some(), "a leader remains");
    let patch = serde_json::json!({"spec": {"kcm": {"healthTimeoutSeconds": 120, "extraArgs": {"leader-elect-lease-duration": null}}}});
    Api::<KubeControllerManager>::all(c.clone()).patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    rolled_out(&c, &masters, Duration::from_secs(300), "recovery after the bad flag").await;
}
