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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::kind::{
    all_healthy, client, cr, diagnostics, kcm_lease, kubectl, masters, now_secs, on_node, pod_node, pod_ready, pods_with_app, process_running, write_on_node,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kcm_operator::api::{HostPaths, KubeControllerManagerSpec, HELPER_APP, HELPER_DAEMONSET, NAMESPACE, OPERATOR_MANIFEST, RESCUE_APP};
use kube::api::{Api, ListParams, PostParams};

const APISERVER: &str = "https://kcm-external-load-balancer:6443";
const IMAGE: &str = "kcm-operator/kcm-operator:dev";
const MANIFEST_DIR: &str = "/etc/kubernetes/manifests";
const SCHEDULER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-scheduler.yaml";
const SCHEDULER_STOPPED: &str = "/etc/kubernetes/kube-scheduler.yaml.stopped";
/// The seed's layout (manifests/kubecontrollermanager.yaml leaves the paths at their defaults).
const SEED_CA: &str = "/etc/kubernetes/cert/ca.pem";
const SEED_CA_KEY: &str = "/etc/kubernetes/cert/ca-key.pem";
const SEED_CERT: &str = "/etc/kubernetes/cert/kube-controller-manager.pem";
const SEED_KEY: &str = "/etc/kubernetes/cert/kube-controller-manager-key.pem";
const SEED_KUBECONFIG: &str = "/etc/kubernetes/kube-controller-manager.kubeconfig";
const SEED_UNIT: &str = "/etc/systemd/system/kube-controller-manager.service";
const SEED_WORKING_DIR: &str = "/data/k8s/k8s/kube-controller-manager";
/// What kind_ha.rs installed (manifests/kind) and kubeadm's kcm.
const KIND_KCM_DIR: &str = "/etc/kubernetes/kcm";
const KUBEADM_KCM_MANIFEST: &str = "/etc/kubernetes/manifests/kube-controller-manager.yaml";

/// Puts kube-scheduler's manifest back on every master, also when the test panics.
struct SchedulerBack(Vec<String>);

impl Drop for SchedulerBack {
    fn drop(&mut self) {
        for n in &self.0 {
            let (ok, out) = on_node(n, &format!("if [ -f {SCHEDULER_STOPPED} ]; then mv {SCHEDULER_STOPPED} {SCHEDULER_MANIFEST}; fi"));
            if !ok {
                eprintln!("putting kube-scheduler back on {n}: {out}");
            }
        }
    }
}

/// Waits (bounded) until `f` holds for every node; panics with `what` otherwise.
async fn wait_nodes(nodes: &[String], within: Duration, what: &str, f: impl Fn(&str) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let pending: Vec<&String> = nodes.iter().filter(|n| !f(n)).collect();
        if pending.is_empty() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "{what}: not done within {within:?} on {pending:?}\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn must(node: &str, script: &str) -> String {
    let (ok, out) = on_node(node, script);
    assert!(ok, "on {node}: `{script}`: {out}");
    out
}

#[tokio::test]
async fn seed_bootstrap_without_kcm_or_scheduler() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "three control-plane nodes: {masters:?}");
    let old_paths = cr(&c).await.map(|(k, _)| k.spec.paths);

    // ---------------------------------------------------------------- tear down
    // Ours first, while kcm still runs (the garbage collector removes the DaemonSet's pods).
    let (ok, out) = kubectl(&["delete", "kubecontrollermanager", "kube-controller-manager", "--ignore-not-found", "--timeout=120s"]);
    assert!(ok, "deleting the CR: {out}\n{}", diagnostics());
    let (ok, out) = kubectl(&["-n", NAMESPACE, "delete", "ds", HELPER_DAEMONSET, "--ignore-not-found", "--wait", "--timeout=120s"]);
    assert!(ok, "deleting the DaemonSet: {out}\n{}", diagnostics());
    let t0 = Instant::now();
    while !pods_with_app(&c, HELPER_APP).await.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the DaemonSet's pods are not gone within 120s\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for m in &masters {
        must(m, &format!("rm -f {MANIFEST_DIR}/{OPERATOR_MANIFEST}"));
    }
    let took = wait_nodes(&masters, Duration::from_secs(120), "no kcm-operator process", |n| !process_running(n, "kcm-operator")).await;
    println!("teardown: CR, DaemonSet and operator static pods gone ({:.0}s for the operator processes)", took.as_secs_f64());
    let (ok, out) =
        kubectl(&["-n", NAMESPACE, "delete", "pod", "-l", &format!("app.kubernetes.io/name={RESCUE_APP}"), "--ignore-not-found", "--wait", "--timeout=120s"]);
    assert!(ok, "deleting leftover rescue pods: {out}");

    // kcm: ours (kind layout) and kubeadm's, and anything a previous run left at the seed's paths.
    let mut files = vec![SEED_CERT.to_string(), SEED_KEY.into(), SEED_KUBECONFIG.into(), SEED_CA.into(), SEED_CA_KEY.into(), KUBEADM_KCM_MANIFEST.into()];
    if let Some(p) = &old_paths {
        files.extend([p.cert.clone(), p.key.clone(), p.kubeconfig.clone(), p.unit.clone()]);
    }
    let rm = files.join(" ");
    for m in &masters {
        must(
            m,
            &format!(
                "systemctl disable --now kube-controller-manager >/dev/null 2>&1 || true; rm -f {SEED_UNIT} {rm}; rm -rf {KIND_KCM_DIR} {SEED_WORKING_DIR}; \
                 systemctl daemon-reload; systemctl reset-failed kube-controller-manager >/dev/null 2>&1 || true"
            ),
        );
    }
    let took = wait_nodes(&masters, Duration::from_secs(120), "no kube-controller-manager process", |n| !process_running(n, "kube-controller-manager")).await;
    println!("teardown: no kube-controller-manager process on any master ({:.0}s)", took.as_secs_f64());
    let t0 = Instant::now();
    loop {
        let l = kcm_lease(&c).await.unwrap_or_default();
        if !l.live(now_secs()) {
            println!("teardown: kcm's Lease expired ({l:?}) after {:.0}s", t0.elapsed().as_secs_f64());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "kcm's Lease still live 90s after the last kcm stopped: {l:?}\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The trap: with no kcm, nothing recreates it, and pods with a ServiceAccount volume need it.
    let (ok, out) = kubectl(&["-n", NAMESPACE, "delete", "configmap", "kube-root-ca.crt", "--ignore-not-found"]);
    assert!(ok, "deleting {NAMESPACE}/kube-root-ca.crt: {out}");

    // kube-scheduler: stopped on every master (put back by the guard whatever happens).
    let _scheduler_back = SchedulerBack(masters.clone());
    for m in &masters {
        must(m, &format!("if [ -f {SCHEDULER_MANIFEST} ]; then mv {SCHEDULER_MANIFEST} {SCHEDULER_STOPPED}; fi"));
    }
    let took = wait_nodes(&masters, Duration::from_secs(120), "no kube-scheduler process", |n| !process_running(n, "kube-scheduler")).await;
    println!("teardown: kube-scheduler stopped on every master ({:.0}s)", took.as_secs_f64());

    // The cluster CA at the seed's paths, as the seed's admin has it.
    for m in &masters {
        must(m, &format!("mkdir -p /etc/kubernetes/cert && cp /etc/kubernetes/pki/ca.crt {SEED_CA} && cp /etc/kubernetes/pki/ca.key {SEED_CA_KEY} && chmod 600 {SEED_CA_KEY}"));
    }
    let cm_gone = Api::<ConfigMap>::namespaced(c.clone(), NAMESPACE).get_opt("kube-root-ca.crt").await.ok().flatten().is_none();
    assert!(cm_gone, "nothing recreated {NAMESPACE}/kube-root-ca.crt with no kcm");

    // ---------------------------------------------------------------- install
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("manifests/kubecontrollermanager.yaml")).expect("the seed's CR");
    let mut cr_value: serde_yaml::Value = serde_yaml::from_str(&text).expect("the seed's CR is YAML");
    cr_value["spec"]["apiserverUrl"] = serde_yaml::Value::String(APISERVER.into());
    let spec: KubeControllerManagerSpec = serde_yaml::from_value(cr_value["spec"].clone()).expect("the seed's spec");
    assert_eq!(spec.paths, HostPaths::default(), "the seed's CR uses the seed's layout");
    assert_eq!((spec.paths.ca_cert.as_str(), spec.paths.ca_key.as_str(), spec.paths.cert.as_str()), (SEED_CA, SEED_CA_KEY, SEED_CERT));
    let dir = tempfile::tempdir().unwrap();
    let cr_file = dir.path().join("kubecontrollermanager.yaml");
    std::fs::write(&cr_file, serde_yaml::to_string(&cr_value).unwrap()).unwrap();

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
    while Api::<ConfigMap>::namespaced(c.clone(), NAMESPACE).get_opt("kube-root-ca.crt").await.ok().flatten().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "{NAMESPACE}/kube-root-ca.crt not recreated within 60s of 3/3\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // A Deployment created now gets its ReplicaSet and Pods (Pending: no scheduler yet).
    let ns = "kcm-e2e-bootstrap";
    let (ok, out) = kubectl(&["create", "namespace", ns]);
    assert!(ok || out.contains("AlreadyExists"), "creating namespace {ns}: {out}");
    let dep = e2e::kind::probe_deployment();
    let _ = Api::<Deployment>::namespaced(c.clone(), ns).create(&PostParams::default(), &dep).await;
    let t0 = Instant::now();
    let pods = loop {
        let rs = Api::<ReplicaSet>::namespaced(c.clone(), ns).list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
        let pods = Api::<Pod>::namespaced(c.clone(), ns).list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        if rs > 0 && pods.len() == 2 {
            break pods;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the Deployment got {rs} ReplicaSet(s) and {} Pod(s) from our kcm within 120s\n{}",
            pods.len(),
            diagnostics()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
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
