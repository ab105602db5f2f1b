//! The seed's case on the kind cluster: its layout (where manifests/kubecontrollermanager.yaml
//! puts kcm's files), the masters taken back to "apiserver and etcd, no kcm, nothing of ours",
//! and the seed's CR pointed at kind's load balancer. Shared by the destructive tests that
//! install as the seed's admin does (kind_bootstrap: rescue pods; kind_day0: no kubelet).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kcm_operator::api::{HostPaths, KubeControllerManagerSpec, HELPER_APP, HELPER_DAEMONSET, NAMESPACE, OPERATOR_MANIFEST, RESCUE_APP};
use kube::api::Api;

use crate::kind::{cr, diagnostics, kcm_lease, kubectl, now_secs, on_node, pods_with_app, process_running};

/// kind's load balancer: the seed's `${KUBE_APISERVER}` on this cluster.
pub const APISERVER: &str = "https://kcm-external-load-balancer:6443";
/// The image e2e/run.sh builds and loads into the nodes.
pub const IMAGE: &str = "kcm-operator/kcm-operator:dev";
/// The kubelet's static pod directory on a kind node.
pub const MANIFEST_DIR: &str = "/etc/kubernetes/manifests";
pub const SEED_CA: &str = "/etc/kubernetes/cert/ca.pem";
pub const SEED_CA_KEY: &str = "/etc/kubernetes/cert/ca-key.pem";
pub const SEED_CERT: &str = "/etc/kubernetes/cert/kube-controller-manager.pem";
pub const SEED_KEY: &str = "/etc/kubernetes/cert/kube-controller-manager-key.pem";
pub const SEED_KUBECONFIG: &str = "/etc/kubernetes/kube-controller-manager.kubeconfig";
pub const SEED_UNIT: &str = "/etc/systemd/system/kube-controller-manager.service";
pub const SEED_WORKING_DIR: &str = "/data/k8s/k8s/kube-controller-manager";
/// Where the kind layout (manifests/kind) keeps kcm's files.
pub const KIND_KCM_DIR: &str = "/etc/kubernetes/kcm";
pub const KUBEADM_KCM_MANIFEST: &str = "/etc/kubernetes/manifests/kube-controller-manager.yaml";

/// Runs `script` on every node when dropped, also when the test panics: puts back what a
/// test stopped (kube-scheduler, the kubelet).
pub struct AtEnd {
    pub nodes: Vec<String>,
    pub script: String,
}

impl Drop for AtEnd {
    fn drop(&mut self) {
        for n in &self.nodes {
            let (ok, out) = on_node(n, &self.script);
            if !ok {
                eprintln!("on {n} at the end: `{}`: {out}", self.script);
            }
        }
    }
}

/// Waits (bounded) until `f` holds for every node; panics with `what` otherwise.
pub async fn wait_nodes(nodes: &[String], within: Duration, what: &str, f: impl Fn(&str) -> bool) -> Duration {
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

/// `script` on `node`, which must succeed; its output.
pub fn must(node: &str, script: &str) -> String {
    let (ok, out) = on_node(node, script);
    assert!(ok, "on {node}: `{script}`: {out}");
    out
}

/// Takes every master back to the seed's day 0: the CR, the DaemonSet, the operator's static
/// pods and rescue pods gone; kcm stopped and its files removed (ours in either layout,
/// kubeadm's manifest); no kcm process anywhere and kcm's Lease expired; the operator's
/// namespace without `kube-root-ca.crt` (with no kcm nothing recreates it: the trap the
/// bootstrap must get out of); the cluster CA at the seed's paths, as the seed's admin has it.
pub async fn teardown(c: &kube::Client, masters: &[String]) {
    let old_paths = cr(c).await.map(|(k, _)| k.spec.paths);
    // Ours first, while kcm still runs (the garbage collector removes the DaemonSet's pods).
    let (ok, out) = kubectl(&["delete", "kubecontrollermanager", "kube-controller-manager", "--ignore-not-found", "--timeout=120s"]);
    assert!(ok, "deleting the CR: {out}\n{}", diagnostics());
    let (ok, out) = kubectl(&["-n", NAMESPACE, "delete", "ds", HELPER_DAEMONSET, "--ignore-not-found", "--wait", "--timeout=120s"]);
    assert!(ok, "deleting the DaemonSet: {out}\n{}", diagnostics());
    let t0 = Instant::now();
    while !pods_with_app(c, HELPER_APP).await.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the DaemonSet's pods are not gone within 120s\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for m in masters {
        must(m, &format!("rm -f {MANIFEST_DIR}/{OPERATOR_MANIFEST}"));
    }
    let took = wait_nodes(masters, Duration::from_secs(120), "no kcm-operator process", |n| !process_running(n, "kcm-operator")).await;
    println!("teardown: CR, DaemonSet and operator static pods gone ({:.0}s for the operator processes)", took.as_secs_f64());
    let (ok, out) =
        kubectl(&["-n", NAMESPACE, "delete", "pod", "-l", &format!("app.kubernetes.io/name={RESCUE_APP}"), "--ignore-not-found", "--wait", "--timeout=120s"]);
    assert!(ok, "deleting leftover rescue pods: {out}");

    // kcm: ours (either layout) and kubeadm's, and anything a previous run left at the seed's paths.
    let mut files = vec![SEED_CERT.to_string(), SEED_KEY.into(), SEED_KUBECONFIG.into(), SEED_CA.into(), SEED_CA_KEY.into(), KUBEADM_KCM_MANIFEST.into()];
    if let Some(p) = &old_paths {
        files.extend([p.cert.clone(), p.key.clone(), p.kubeconfig.clone(), p.unit.clone()]);
    }
    let rm = files.join(" ");
    for m in masters {
        must(
            m,
            &format!(
                "systemctl disable --now kube-controller-manager >/dev/null 2>&1 || true; rm -f {SEED_UNIT} {rm} {journal}; rm -rf {KIND_KCM_DIR} {SEED_WORKING_DIR}; \
                 systemctl daemon-reload; systemctl reset-failed kube-controller-manager >/dev/null 2>&1 || true",
                journal = node_helper::journal::DEFAULT_PATH
            ),
        );
    }
    let took = wait_nodes(masters, Duration::from_secs(120), "no kube-controller-manager process", |n| !process_running(n, "kube-controller-manager")).await;
    println!("teardown: no kube-controller-manager process on any master ({:.0}s)", took.as_secs_f64());
    let t0 = Instant::now();
    loop {
        let l = kcm_lease(c).await.unwrap_or_default();
        if !l.live(now_secs()) {
            println!("teardown: kcm's Lease expired ({l:?}) after {:.0}s", t0.elapsed().as_secs_f64());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "kcm's Lease still live 90s after the last kcm stopped: {l:?}\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (ok, out) = kubectl(&["-n", NAMESPACE, "delete", "configmap", "kube-root-ca.crt", "--ignore-not-found"]);
    assert!(ok, "deleting {NAMESPACE}/kube-root-ca.crt: {out}");

    for m in masters {
        must(m, &format!("mkdir -p /etc/kubernetes/cert && cp /etc/kubernetes/pki/ca.crt {SEED_CA} && cp /etc/kubernetes/pki/ca.key {SEED_CA_KEY} && chmod 600 {SEED_CA_KEY}"));
    }
}

/// Whether `{NAMESPACE}/kube-root-ca.crt` is absent (nothing recreated it: no kcm runs).
pub async fn root_ca_configmap_gone(c: &kube::Client) -> bool {
    Api::<ConfigMap>::namespaced(c.clone(), NAMESPACE).get_opt("kube-root-ca.crt").await.ok().flatten().is_none()
}

/// The seed's own CR (manifests/kubecontrollermanager.yaml) with only `apiserverUrl` set to
/// [`APISERVER`], as YAML, and its spec; the spec is checked to use the seed's layout.
pub fn seed_cr() -> (String, KubeControllerManagerSpec) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("manifests/kubecontrollermanager.yaml")).expect("the seed's CR");
    let mut cr_value: serde_yaml::Value = serde_yaml::from_str(&text).expect("the seed's CR is YAML");
    cr_value["spec"]["apiserverUrl"] = serde_yaml::Value::String(APISERVER.into());
    let spec: KubeControllerManagerSpec = serde_yaml::from_value(cr_value["spec"].clone()).expect("the seed's spec");
    assert_eq!(spec.paths, HostPaths::default(), "the seed's CR uses the seed's layout");
    assert_eq!((spec.paths.ca_cert.as_str(), spec.paths.ca_key.as_str(), spec.paths.cert.as_str()), (SEED_CA, SEED_CA_KEY, SEED_CERT));
    (serde_yaml::to_string(&cr_value).unwrap(), spec)
}
