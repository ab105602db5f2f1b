//! Helpers for tests against the kind cluster that `e2e/testbed/testbed.sh up` made: its
//! kubeconfig, a client, `kubectl`, and commands inside the node containers (`docker exec`).

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kcm_operator::api::{KubeControllerManager, KubeControllerManagerStatus, NodeStatus, CONTROL_PLANE_LABEL, STALE_AFTER_SECS};
use kube::api::{Api, ListParams};

use crate::apitier::k8s_bin;

/// `$KCM_STATE/kubeconfig` (default `/var/tmp/kcm-e2e/kubeconfig`), whether it exists or not.
pub fn kubeconfig_path() -> PathBuf {
    let state = std::env::var("KCM_STATE").unwrap_or_else(|_| "/var/tmp/kcm-e2e".into());
    PathBuf::from(state).join("kubeconfig")
}

/// [`kubeconfig_path`]; panics with a hint when the cluster is not up.
pub fn kubeconfig() -> PathBuf {
    let p = kubeconfig_path();
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

/// Drops ANSI colour sequences (the operator's plain log format colours its fields).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
    for args in [
        &["-n", "kcm-operator", "get", "ds,lease", "-o", "wide"][..],
        &["-n", "kube-system", "get", "lease", "kube-controller-manager", "-o", "jsonpath={.spec}"][..],
    ] {
        s.push_str(&format!("$ kubectl {}\n{}\n", args.join(" "), kubectl(args).1));
    }
    for n in node_containers() {
        let (_, out) = on_node(&n, "systemctl is-active kube-controller-manager; pgrep -a -x kube-controller | cut -c1-120; ls /etc/kubernetes/manifests");
        s.push_str(&format!("$ {n}: unit, processes, static pod manifests\n{out}\n"));
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

// ---------------------------------------------------------------- shared by the kind tests

/// The control-plane nodes (kind's node containers have the same names), sorted.
pub async fn masters(c: &kube::Client) -> Vec<String> {
    let nodes = Api::<Node>::all(c.clone()).list(&ListParams::default().labels(CONTROL_PLANE_LABEL)).await.expect("listing nodes");
    let mut m: Vec<String> = nodes.items.into_iter().filter_map(|n| n.metadata.name).collect();
    m.sort();
    m
}

/// The CR and its status, when the CR exists.
pub async fn cr(c: &kube::Client) -> Option<(KubeControllerManager, KubeControllerManagerStatus)> {
    let k = Api::<KubeControllerManager>::all(c.clone()).get_opt(kcm_operator::api::CR_NAME).await.ok()??;
    let s = k.status.clone().unwrap_or_default();
    Some((k, s))
}

/// Seconds since the epoch, with milliseconds.
pub fn now_secs() -> f64 {
    Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// An RFC 3339 time as seconds since the epoch.
pub fn rfc3339_secs(s: &str) -> Option<f64> {
    s.parse::<Timestamp>().ok().map(|t| t.as_millisecond() as f64 / 1000.0)
}

/// When the node's helper last looked (`observedAt`), as seconds since the epoch.
pub fn observed_at(n: &NodeStatus) -> Option<f64> {
    n.observed_at.as_deref().and_then(rfc3339_secs)
}

/// A report the operator may count: observed within [`STALE_AFTER_SECS`] of `now`.
pub fn report_fresh(n: &NodeStatus, now: f64) -> bool {
    observed_at(n).is_some_and(|t| now - t <= STALE_AFTER_SECS as f64)
}

/// `status.ready` ("h/n") as (h, n).
pub fn ready_counts(s: &KubeControllerManagerStatus) -> Option<(usize, usize)> {
    let (h, n) = s.ready.as_deref()?.split_once('/')?;
    Some((h.trim().parse().ok()?, n.trim().parse().ok()?))
}

/// A Lease as the status rules read it.
#[derive(Clone, Debug, Default)]
pub struct LeaseView {
    /// Full holder identity (`<node>_<random>`); None when empty.
    pub holder: Option<String>,
    /// renewTime + leaseDurationSeconds, seconds since the epoch.
    pub expires_at: Option<f64>,
}

impl LeaseView {
    /// The master the holder identity names.
    pub fn node(&self) -> Option<String> {
        kcm_operator::rollout::leader_node(self.holder.as_deref())
    }
    /// How long ago the Lease expired at `now` (negative: still valid for that long). A Lease
    /// with no holder or no renewTime counts as expired long ago.
    pub fn expired_by(&self, now: f64) -> f64 {
        match (&self.holder, self.expires_at) {
            (Some(_), Some(e)) => now - e,
            (None, Some(e)) => (now - e).max(0.0),
            _ => f64::INFINITY,
        }
    }
    pub fn live(&self, now: f64) -> bool {
        self.holder.is_some() && self.expired_by(now) < 0.0
    }
}

/// Lease `ns/name`, or None when it cannot be read.
pub async fn lease(c: &kube::Client, ns: &str, name: &str) -> Option<LeaseView> {
    let l = Api::<Lease>::namespaced(c.clone(), ns).get_opt(name).await.ok()??;
    let spec = l.spec.unwrap_or_default();
    let expires_at = spec.renew_time.as_ref().map(|t| t.0.as_millisecond() as f64 / 1000.0 + spec.lease_duration_seconds.unwrap_or(0) as f64);
    Some(LeaseView { holder: spec.holder_identity.filter(|h| !h.is_empty()), expires_at })
}

/// kcm's own Lease (kube-system/kube-controller-manager).
pub async fn kcm_lease(c: &kube::Client) -> Option<LeaseView> {
    let (ns, name) = kcm_operator::api::KCM_LEASE;
    lease(c, ns, name).await
}

/// The operator's Lease (kcm-operator/kcm-operator).
pub async fn operator_lease(c: &kube::Client) -> Option<LeaseView> {
    lease(c, kcm_operator::api::NAMESPACE, kcm_operator::api::OPERATOR_LEASE).await
}

/// Whether kube-controller-manager.service is active on `node`.
pub fn unit_active(node: &str) -> bool {
    on_node(node, "systemctl is-active kube-controller-manager").1.trim() == "active"
}

/// Whether a process named exactly `name` runs in the node container (or in its pods).
pub fn process_running(node: &str, name: &str) -> bool {
    on_node(node, &format!("pgrep -x {}", comm(name))).0
}

/// A process name as the kernel keeps it (`/proc/<pid>/comm`, 15 bytes): what `pgrep -x`
/// matches; `kube-controller-manager` is `kube-controller`.
pub fn comm(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// Writes `content` to `path` inside the node container, atomically (a hidden temporary file
/// beside it, so that the kubelet never reads half a static pod manifest), with `mode`.
pub fn write_on_node(node: &str, path: &str, content: &[u8], mode: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::Stdio;
    let script = format!(
        "set -e; d=$(dirname '{path}'); mkdir -p \"$d\"; t=\"$d/.$(basename '{path}').e2e-tmp\"; cat > \"$t\"; chmod {mode} \"$t\"; mv -f \"$t\" '{path}'"
    );
    let mut child = Command::new("docker")
        .args(["exec", "-i", node, "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("docker exec -i {node}: {e}"));
    // Dropping stdin closes it: `cat` sees the end of the content.
    let written = child.stdin.take().expect("stdin").write_all(content);
    let out = child.wait_with_output().expect("docker exec");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match written {
        Ok(()) => (out.status.success(), text),
        Err(e) => (false, format!("writing to docker exec: {e}; {text}")),
    }
}

/// Seed 2.3 on one master: kcm's `/metrics` on `https://<ip>:<port>` answers with the
/// admin's client certificate (from the kind kubeconfig) and refuses without one (401/403),
/// the server checked against `ca_pem`.
pub fn metrics_with_admin_cert(ip: &str, port: u16, ca_pem: &str) -> Result<(), String> {
    let kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let user = &kc["users"][0]["user"];
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let b64 = |v: &serde_yaml::Value| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, v.as_str().unwrap_or_default()).unwrap_or_default();
    let file = |name: &str, body: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).map(|_| p.display().to_string()).map_err(|e| e.to_string())
    };
    let (cert, key, ca) = (
        file("admin.pem", &b64(&user["client-certificate-data"]))?,
        file("admin-key.pem", &b64(&user["client-key-data"]))?,
        file("ca.pem", ca_pem.as_bytes())?,
    );
    let url = format!("https://{}/metrics", std::net::SocketAddr::new(ip.parse().map_err(|e| format!("{ip}: {e}"))?, port));
    let (ok, out) = sh(Command::new("curl").args(["-sS", "--max-time", "10", "--cacert", &ca, "--cert", &cert, "--key", &key, &url]));
    if !(ok && out.contains("workqueue_adds_total")) {
        return Err(format!("metrics from {url} with the admin cert: {}", &out[..out.len().min(400)]));
    }
    let (_, anon) = sh(Command::new("curl").args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", &ca, &url]));
    if !(anon.trim() == "401" || anon.trim() == "403") {
        return Err(format!("metrics without a client certificate on {url}: HTTP {anon}"));
    }
    Ok(())
}

/// Seed 2.4: [`probe_deployment`] created in namespace `ns` (made if missing) gets its
/// ReplicaSet and its 2 Pods from kcm within `within`; the Pods, or why not.
pub async fn deployment_gets_pods(c: &kube::Client, ns: &str, within: std::time::Duration) -> Result<Vec<Pod>, String> {
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
    let (ok, out) = kubectl(&["create", "namespace", ns]);
    if !ok && !out.contains("AlreadyExists") {
        return Err(format!("creating namespace {ns}: {out}"));
    }
    let _ = Api::<Deployment>::namespaced(c.clone(), ns).create(&Default::default(), &probe_deployment()).await;
    let t0 = std::time::Instant::now();
    loop {
        let rs = Api::<ReplicaSet>::namespaced(c.clone(), ns).list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
        let pods = Api::<Pod>::namespaced(c.clone(), ns).list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        if rs > 0 && pods.len() == 2 {
            return Ok(pods);
        }
        if t0.elapsed() > within {
            return Err(format!("the Deployment got {rs} ReplicaSet(s) and {} Pod(s) within {within:?}", pods.len()));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The logs of the helper pods on `node` (the DaemonSet's, its previous container too, and a
/// rescue pod's while it exists), last lines each: for failure messages.
pub async fn helper_logs(c: &kube::Client, node: &str) -> String {
    let mut out = String::new();
    for app in [kcm_operator::api::HELPER_APP, kcm_operator::api::RESCUE_APP] {
        for p in pods_with_app(c, app).await.into_iter().filter(|p| pod_node(p).as_deref() == Some(node)) {
            let name = p.metadata.name.clone().unwrap_or_default();
            for prev in [true, false] {
                let mut args = vec!["-n", kcm_operator::api::NAMESPACE, "logs", name.as_str(), "--tail", "80", "--timestamps"];
                if prev {
                    args.push("--previous");
                }
                let (_, log) = kubectl(&args);
                out.push_str(&format!("--- {name}{}:\n{log}\n", if prev { " (previous container)" } else { "" }));
            }
        }
    }
    out
}

/// Pods in the operator's namespace with `app.kubernetes.io/name=<app>`.
pub async fn pods_with_app(c: &kube::Client, app: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(c.clone(), kcm_operator::api::NAMESPACE)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Restarts of the helper container on `node` (its DaemonSet pod).
pub async fn helper_restarts(c: &kube::Client, node: &str) -> i32 {
    let pods = pods_with_app(c, kcm_operator::api::HELPER_APP).await;
    let pod = pods.iter().find(|p| pod_node(p).as_deref() == Some(node)).unwrap_or_else(|| panic!("no helper pod on {node}"));
    pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.first()).map_or(0, |c| c.restart_count)
}

/// The helper's test hook (node-helper/src/journal.rs `crash_point`): a host file naming the
/// point of a step where the helper SIGKILLs itself.
pub const CRASH_AT: &str = "/run/kcm-node-helper.crash-at";

/// Removes the hook file [`CRASH_AT`] from these nodes when dropped, also when a test fails
/// before a helper consumed it (a hook left armed would kill a helper in a later test).
pub struct Disarm(pub Vec<String>);

impl Drop for Disarm {
    fn drop(&mut self) {
        for n in &self.0 {
            on_node(n, &format!("rm -f {CRASH_AT}"));
        }
    }
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The node a pod is bound to.
pub fn pod_node(p: &Pod) -> Option<String> {
    p.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// Everything healthy: the CR says `n/n` for the `masters`, every master's report is fresh,
/// healthy, without drift and observed after `since` (seconds since the epoch), its unit is
/// active on the host, and kcm's Lease has a live holder that `status.leader` names. Returns
/// the leader's node, or why not.
pub async fn all_healthy(c: &kube::Client, masters: &[String], since: f64) -> Result<String, String> {
    let Some((_, s)) = cr(c).await else { return Err("no CR".into()) };
    let now = now_secs();
    let want = format!("{}/{}", masters.len(), masters.len());
    if s.ready.as_deref() != Some(want.as_str()) {
        return Err(format!("ready {:?}", s.ready));
    }
    for m in masters {
        let Some(n) = s.nodes.iter().find(|n| &n.name == m) else { return Err(format!("{m}: no status entry")) };
        if !(report_fresh(n, now) && observed_at(n).is_some_and(|t| t > since) && n.healthy && n.unit_active && n.drift.is_empty()) {
            return Err(format!("{m}: observedAt {:?} healthy {} unitActive {} drift {:?}", n.observed_at, n.healthy, n.unit_active, n.drift));
        }
    }
    let Some(l) = kcm_lease(c).await else { return Err("kcm Lease unreadable".into()) };
    if !l.live(now) {
        return Err(format!("kcm Lease not held: {l:?}"));
    }
    let leader = l.node().unwrap_or_default();
    if s.leader.as_deref() != Some(leader.as_str()) {
        return Err(format!("status.leader {:?}, Lease holder {leader}", s.leader));
    }
    for m in masters {
        if !unit_active(m) {
            return Err(format!("{m}: unit not active"));
        }
    }
    Ok(leader)
}

/// Waits up to `within` for [`all_healthy`]; the leader's node, or the last reason why not.
pub async fn await_healthy(c: &kube::Client, masters: &[String], since: f64, within: std::time::Duration) -> Result<String, String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match all_healthy(c, masters, since).await {
            Ok(l) => return Ok(l),
            Err(why) if std::time::Instant::now() > deadline => return Err(format!("not all healthy within {within:?}: {why}")),
            Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        }
    }
}

/// Steady state: 3/3 healthy with a leader (see [`all_healthy`]) and nothing rolling out
/// (the CR's Progressing is False).
pub async fn steady(c: &kube::Client, masters: &[String]) -> Result<(), String> {
    all_healthy(c, masters, 0.0).await?;
    let (_, s) = cr(c).await.ok_or("no CR")?;
    if s.conditions.iter().any(|x| x.type_ == "Progressing" && x.status == "False") {
        Ok(())
    } else {
        Err("a rollout is under way (Progressing is not False)".into())
    }
}

/// The node containers of the kind cluster (`kcm-control-plane*`), for diagnostics.
fn node_containers() -> Vec<String> {
    let (_, out) = sh(Command::new("docker").args(["ps", "--filter", "name=kcm-control-plane", "--format", "{{.Names}}"]));
    let mut v: Vec<String> = out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    v.sort();
    v
}

/// A Deployment of two idle pods (tolerating every taint; the test bed's base image, present
/// on every node whatever the Kubernetes version): kcm's deployment and replicaset controllers
/// must give it a ReplicaSet and two Pods (seed 2.4).
pub fn probe_deployment() -> k8s_openapi::api::apps::v1::Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "probe"}},
                 "template": {"metadata": {"labels": {"app": "probe"}}, "spec": {
                     "containers": [{"name": "c", "image": "kcm-testbed/debian:bookworm", "imagePullPolicy": "Never", "command": ["sleep", "infinity"]}],
                     "terminationGracePeriodSeconds": 1,
                     "tolerations": [{"operator": "Exists"}]}}}
    }))
    .expect("a valid Deployment")
}

/// A merge patch on the CR.
pub async fn patch_cr(c: &kube::Client, patch: &serde_json::Value) -> Result<(), String> {
    Api::<KubeControllerManager>::all(c.clone())
        .patch(kcm_operator::api::CR_NAME, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(patch))
        .await
        .map(|_| ())
        .map_err(|e| format!("patching the CR with {patch}: {e}"))
}

/// What kcm_operator::apicount logs once a minute, before the rates.
pub const RATES_PREFIX: &str = "api requests/min: ";

/// (verb, resource, requests per minute)
pub type Rate = (String, String, f64);

/// The rates of one `api requests/min: GET leases=30 PATCH kcmnodes/status=6 total=36 who=...`
/// line (the text after the prefix, up to ` who=`), and that text; None for other lines.
pub fn parse_rates(line: &str) -> Option<(String, Vec<Rate>)> {
    let body = line.split(RATES_PREFIX).nth(1)?.split(" who=").next()?.trim().to_string();
    let mut rates = Vec::new();
    let mut verb = String::new();
    for w in body.split_whitespace() {
        match w.split_once('=') {
            Some(("total", _)) => {}
            Some((resource, n)) => rates.push((verb.clone(), resource.to_string(), n.parse().unwrap_or(f64::NAN))),
            None => verb = w.to_string(),
        }
    }
    Some((body, rates))
}

/// Every rate line a pod of the operator's namespace logged in the last `since` (`65s`), oldest first.
pub fn rate_lines(pod: &str, since: &str) -> Result<Vec<(String, Vec<Rate>)>, String> {
    let (ok, out) = kubectl(&["-n", kcm_operator::api::NAMESPACE, "logs", pod, &format!("--since={since}")]);
    if !ok {
        return Err(format!("logs of {pod}: {out}"));
    }
    Ok(out.lines().filter_map(parse_rates).collect())
}

/// The last rate line a pod logged in the last `since`, and its rates.
pub fn last_rates(pod: &str, since: &str) -> Option<(String, Vec<Rate>)> {
    rate_lines(pod, since).unwrap_or_else(|e| panic!("{e}")).pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\x1b[2mkcm\x1b[0m \x1b[3muser\x1b[0m\x1b[2m=\x1b[0m\"x\""), "kcm user=\"x\"");
    }

    #[test]
    fn rate_lines_parse() {
        let l = "2026-11-26T14:42:13Z  INFO kcm_operator::apicount: api requests/min: GET leases=30 PATCH kcmnodes/status=6 total=36 who=\"node-helper\"";
        let (body, rates) = parse_rates(l).unwrap();
        assert_eq!(body, "GET leases=30 PATCH kcmnodes/status=6 total=36");
        assert_eq!(rates, vec![("GET".into(), "leases".into(), 30.0), ("PATCH".into(), "kcmnodes/status".into(), 6.0)]);
        assert_eq!(parse_rates("INFO something else"), None);
    }
}
