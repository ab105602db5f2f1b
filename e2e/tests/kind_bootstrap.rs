//! The seed's case on kind (3 control-plane nodes): a cluster whose masters run apiserver
//! and kubelet but no kcm, and no kube-scheduler either. Runs last: it is destructive.
//!
//! The test first removes everything of ours and kubeadm's kcm from all three masters (no
//! kcm process anywhere, kcm's Lease expired, the `kube-root-ca.crt` ConfigMap of the
//! operator's namespace deleted: with no kcm nothing recreates it), stops kube-scheduler,
//! and puts the cluster CA at the seed's paths. Then the install as the seed's admin does it:
//! `kubectl apply` of the CRD, manifests/base and the seed's own CR
//! (manifests/kubecontrollermanager.yaml, only apiserverUrl changed), plus the one documented
//! step per master: the operator's static pod manifest (`kcm-operator static-pod`) into the
//! kubelet's static pod directory. The operator creates rescue helper pods (the DaemonSet's
//! pods cannot run: no kcm, no scheduler), they install kcm under systemd at the seed's
//! paths, 3/3 healthy with one leader; a Deployment created afterwards gets its ReplicaSet
//! and Pods; once kube-scheduler is back, the DaemonSet's pods become Ready and no rescue
//! pod remains.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::kind::{all_healthy, client, diagnostics, kubectl, masters, now_secs, on_node, pod_node, pod_ready, pods_with_app, process_running, write_on_node};
use e2e::seed::*;
use k8s_openapi::api::core::v1::Pod;
use kcm_operator::api::{HELPER_APP, HELPER_DAEMONSET, NAMESPACE, OPERATOR_MANIFEST, RESCUE_APP};
use kube::api::{Api, ListParams};

const SCHEDULER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-scheduler.yaml";
const SCHEDULER_STOPPED: &str = "/etc/kubernetes/kube-scheduler.yaml.stopped";

#[tokio::test]
async fn seed_bootstrap_without_kcm_or_scheduler() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "three control-plane nodes: {masters:?}");

    // ---------------------------------------------------------------- tear down
    teardown(&c, &masters).await;

    // kube-scheduler: stopped on every master (put back by the guard whatever happens).
    let _scheduler_back =
        AtEnd { nodes: masters.clone(), script: format!("if [ -f {SCHEDULER_STOPPED} ]; then mv {SCHEDULER_STOPPED} {SCHEDULER_MANIFEST}; fi") };
    for m in &masters {
        must(m, &format!("if [ -f {SCHEDULER_MANIFEST} ]; then mv {SCHEDULER_MANIFEST} {SCHEDULER_STOPPED}; fi"));
    }
    let took = wait_nodes(&masters, Duration::from_secs(120), "no kube-scheduler process", |n| !process_running(n, "kube-scheduler")).await;
    println!("teardown: kube-scheduler stopped on every master ({:.0}s)", took.as_secs_f64());

    assert!(root_ca_configmap_gone(&c).await, "nothing recreated {NAMESPACE}/kube-root-ca.crt with no kcm");

    // ---------------------------------------------------------------- install
    let (cr_yaml, spec) = seed_cr();
    let dir = tempfile::tempdir().unwrap();
    let cr_file = dir.path().join("kubecontrollermanager.yaml");
    std::fs::write(&cr_file, cr_yaml).unwrap();

    let apply_epoch = now_secs();
    let t_apply = Instant::now();
    let (ok, out) = e2e::kind::apply_kustomization("manifests/base/");
    assert!(ok, "CRD + kubectl apply -k manifests/base/:\n{out}");
    let (ok, out) = kubectl(&["apply", "-f", cr_file.to_str().unwrap()]);
    assert!(ok, "applying the seed's CR:\n{out}");
    let (_, ds_image) = kubectl(&["-n", NAMESPACE, "get", "ds", HELPER_DAEMONSET, "-o", "jsonpath={.spec.template.spec.containers[0].image}"]);
    assert_eq!(ds_image.trim(), IMAGE, "the image manifests/base runs is the one the static pod is rendered with");
    // The one documented step per master: the operator's static pod manifest.
    let manifest = kcm_operator::staticpod::operator_pod(&spec, IMAGE);
    for m in &masters {
        let (ok, out) = write_on_node(m, &format!("{MANIFEST_DIR}/{OPERATOR_MANIFEST}"), manifest.as_bytes(), "644");
        assert!(ok, "placing the operator's static pod on {m}: {out}");
    }
    println!(
        "install: CRD, manifests/base, the seed's CR (apiserverUrl {APISERVER}) applied and the static pod placed on {masters:?} in {:.1}s",
        t_apply.elapsed().as_secs_f64()
    );

    // Until 3/3: which helpers ran, and whether a DaemonSet pod ever became Ready (it cannot
    // without kube-scheduler).
    let mut rescue_seen: BTreeMap<String, (f64, Option<String>)> = BTreeMap::new();
    let mut first_active: BTreeMap<String, f64> = BTreeMap::new();
    let (mut ds_pods_max, mut ds_ready_max) = (0usize, 0usize);
    let within = Duration::from_secs(600);
    let leader = loop {
        let t = t_apply.elapsed().as_secs_f64();
        for p in pods_with_app(&c, RESCUE_APP).await {
            rescue_seen.entry(p.metadata.name.clone().unwrap_or_default()).or_insert((t, pod_node(&p)));
        }
        let ds = pods_with_app(&c, HELPER_APP).await;
        ds_pods_max = ds_pods_max.max(ds.len());
        ds_ready_max = ds_ready_max.max(ds.iter().filter(|p| pod_ready(p)).count());
        for m in &masters {
            if !first_active.contains_key(m) && e2e::kind::unit_active(m) {
                first_active.insert(m.clone(), t);
            }
        }
        let last = match all_healthy(&c, &masters, apply_epoch).await {
            Ok(l) => break l,
            Err(why) => why,
        };
        assert!(
            t_apply.elapsed() < within,
            "bootstrap: not 3/3 within {within:?}; last: {last}; rescue pods seen {rescue_seen:?}; units first active {first_active:?}\n{}",
            diagnostics()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let took = t_apply.elapsed();
    println!("bootstrap: 3/3 healthy, kcm leader {leader}, {:.1}s from apply", took.as_secs_f64());
    println!(
        "bootstrap: units first active at {first_active:?} (+s); rescue pods seen {rescue_seen:?}; DaemonSet pods: at most {ds_pods_max}, {ds_ready_max} Ready"
    );

    // The seed's files at the seed's paths, our kcm the only one.
    for m in &masters {
        for f in [SEED_CERT, SEED_KEY, SEED_KUBECONFIG, SEED_UNIT] {
            assert!(on_node(m, &format!("test -s {f}")).0, "{f} on {m}");
        }
        assert_eq!(must(m, &format!("stat -c %a {SEED_KEY}")).trim(), "600", "mode of {SEED_KEY} on {m}");
        let unit = must(m, &format!("cat {SEED_UNIT}"));
        assert!(unit.contains(&format!("WorkingDirectory={SEED_WORKING_DIR}")) && unit.contains("--secure-port=10252"), "the seed's unit on {m}:\n{unit}");
        let kubeconfig = must(m, &format!("cat {SEED_KUBECONFIG}"));
        assert!(kubeconfig.contains(APISERVER), "{SEED_KUBECONFIG} on {m} points at {APISERVER}");
        assert!(e2e::kind::unit_active(m), "kube-controller-manager.service active on {m}");
        let n = must(m, &format!("pgrep -c -x {}", e2e::kind::comm("kube-controller-manager")));
        assert_eq!(n.trim(), "1", "one kube-controller-manager process on {m}");
        assert!(!on_node(m, &format!("test -e {KUBEADM_KCM_MANIFEST} || test -e {KIND_KCM_DIR}")).0, "no kubeadm or kind-layout kcm came back on {m}");
    }
    println!("bootstrap: seed files at the seed's paths on every master, key 0600, unit active");

    // The rescue pods did the work: one per master, pinned to it; no DaemonSet pod could.
    for m in &masters {
        let name = format!("{HELPER_DAEMONSET}-rescue-{m}");
        let seen = rescue_seen.get(&name).unwrap_or_else(|| panic!("no rescue pod {name} for {m}; seen {rescue_seen:?}\n{}", diagnostics()));
        assert_eq!(seen.1.as_deref(), Some(m.as_str()), "rescue pod {name} pinned to {m}");
    }
    assert_eq!(ds_ready_max, 0, "a DaemonSet pod was Ready while kube-scheduler was stopped: the test did not test the bootstrap");

    // kcm's root-ca publisher runs again: the ConfigMap the trap was about is back.
    let t0 = Instant::now();
    while root_ca_configmap_gone(&c).await {
        assert!(t0.elapsed() < Duration::from_secs(60), "{NAMESPACE}/kube-root-ca.crt not recreated within 60s of 3/3\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // A Deployment created now gets its ReplicaSet and Pods (Pending: no scheduler yet).
    let ns = "kcm-e2e-bootstrap";
    let t0 = Instant::now();
    let pods = e2e::kind::deployment_gets_pods(&c, ns, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}: not from our kcm\n{}", diagnostics()));
    let phases: Vec<(Option<String>, Option<String>)> =
        pods.iter().map(|p| (p.metadata.name.clone(), p.status.as_ref().and_then(|s| s.phase.clone()))).collect();
    println!("bootstrap: a Deployment got its ReplicaSet and 2 Pods in {:.1}s: {phases:?}", t0.elapsed().as_secs_f64());

    // ---------------------------------------------------------------- the scheduler back
    let t0 = Instant::now();
    for m in &masters {
        must(m, &format!("if [ -f {SCHEDULER_STOPPED} ]; then mv {SCHEDULER_STOPPED} {SCHEDULER_MANIFEST}; fi"));
    }
    let mut last = String::new();
    loop {
        let ds = pods_with_app(&c, HELPER_APP).await;
        let ready_on: Vec<String> = ds.iter().filter(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none()).filter_map(pod_node).collect();
        let rescue: Vec<String> = pods_with_app(&c, RESCUE_APP).await.into_iter().filter_map(|p| p.metadata.name).collect();
        let bound = Api::<Pod>::namespaced(c.clone(), ns)
            .list(&ListParams::default())
            .await
            .map(|l| l.items.iter().filter(|p| pod_node(p).is_some()).count())
            .unwrap_or(0);
        if masters.iter().all(|m| ready_on.contains(m)) && rescue.is_empty() && bound == 2 {
            break;
        }
        last = format!("DaemonSet pods Ready on {ready_on:?}; rescue pods {rescue:?}; {bound}/2 Deployment pods bound");
        assert!(t0.elapsed() < Duration::from_secs(300), "after kube-scheduler came back: {last}\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("scheduler back: DaemonSet pods Ready on every master, no rescue pod left, Deployment pods bound, in {:.1}s ({last})", t0.elapsed().as_secs_f64());
    // The DaemonSet's helpers report now (fresh reports after the hand-over), still 3/3.
    let handover = now_secs();
    let t0 = Instant::now();
    let leader = loop {
        match all_healthy(&c, &masters, handover).await {
            Ok(l) => break l,
            Err(why) => {
                assert!(t0.elapsed() < Duration::from_secs(120), "not 3/3 with a leader after the hand-over to the DaemonSet's pods: {why}\n{}", diagnostics())
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    println!("after the hand-over: 3/3 healthy, kcm leader {leader}");
    let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
}
