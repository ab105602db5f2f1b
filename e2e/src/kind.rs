//! Helpers for tests against the kind cluster that `e2e/testbed/testbed.sh up` made: its
//! kubeconfig, a client, `kubectl`, and commands inside the node containers (`docker exec`).

use std::path::PathBuf;
use std::process::Command;

use crate::apitier::k8s_bin;

/// `$KCM_STATE/kubeconfig` (default `/var/tmp/kcm-e2e/kubeconfig`).
pub fn kubeconfig() -> PathBuf {
    let state = std::env::var("KCM_STATE").unwrap_or_else(|_| "/var/tmp/kcm-e2e".into());
    let p = PathBuf::from(state).join("kubeconfig");
    assert!(p.exists(), "{} missing: bring the cluster up with `bash e2e/run.sh up`", p.display());
    p
}

/// A client for the kind cluster (build it inside the test's runtime).
pub async fn client() -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig()).expect("kind kubeconfig parses");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("kind kubeconfig is usable");
    kube::Client::try_from(cfg).expect("client")
}

/// Runs a command; returns (success, stdout+stderr).
pub fn sh(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `kubectl --kubeconfig <kind> <args>` from the repository root.
pub fn kubectl(args: &[&str]) -> (bool, String) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    sh(Command::new(k8s_bin("kubectl").expect("kubectl")).current_dir(repo).arg("--kubeconfig").arg(kubeconfig()).args(args))
}

/// `sh -c <script>` inside a node container.
pub fn on_node(node: &str, script: &str) -> (bool, String) {
    sh(Command::new("docker").args(["exec", node, "sh", "-c", script]))
}

/// What the operator's pods and the CSRs look like, for failure messages.
pub fn diagnostics() -> String {
    let mut s = String::new();
    for args in [
        &["-n", "kcm-operator", "get", "pods", "-o", "wide"][..],
        &["get", "kubecontrollermanager", "-o", "yaml"][..],
        &["get", "csr"][..],
        &["-n", "kcm-operator", "logs", "--all-containers", "--prefix", "-l", "app.kubernetes.io/name", "--tail", "30"][..],
    ] {
        s.push_str(&format!("$ kubectl {}\n{}\n", args.join(" "), kubectl(args).1));
    }
    s
}

/// `kubectl apply -k <dir>` the way a new cluster needs it: the CRD first, established,
/// then the whole kustomization (a CR in the same apply as its new CRD is refused).
pub fn apply_kustomization(dir: &str) -> (bool, String) {
    let (ok, out) = kubectl(&["apply", "-f", "manifests/base/crd.yaml"]);
    if !ok {
        return (ok, out);
    }
    let (ok, out) = kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd/kubecontrollermanagers.kcm.kcm-operator.io"]);
    if !ok {
        return (ok, out);
    }
    kubectl(&["apply", "-k", dir])
}
