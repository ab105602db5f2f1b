//! The install path against a real kube-apiserver: `kubectl apply --dry-run=server -k`
//! of both kustomizations succeeds, and malformed KubeControllerManagers are rejected by
//! the CRD's schema and CEL rules with a message that says what is wrong. An install points
//! at a registry through kustomize's `images:`, the operator's static pod included.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::apitier::ApiServer;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo root")
}

fn kubectl() -> PathBuf {
    e2e::apitier::k8s_bin("kubectl").expect("kubectl binary")
}

fn run(api: &ApiServer, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(kubectl());
    cmd.current_dir(repo()).arg("--kubeconfig").arg(api.admin_kubeconfig_path()).args(args);
    let out = if let Some(input) = stdin {
        use std::io::Write;
        let mut child = cmd
            .arg("-f")
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    } else {
        cmd.output().unwrap()
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A real apiserver with the CRD (its CEL rules compiled and accepted) and the namespace.
async fn apiserver_with_crd() -> ApiServer {
    let api = ApiServer::start().await.expect("API tier starts");
    // A server-side dry run creates nothing, so what the rest is created in goes first.
    let (ok, out) = run(&api, &["apply", "-f", "manifests/base/crd.yaml", "-f", "manifests/base/namespace.yaml"], None);
    assert!(ok, "CRD and namespace apply: {out}");
    let (ok, out) = run(
        &api,
        &["wait", "--for=condition=Established", "--timeout=30s", "crd/kubecontrollermanagers.kcm.kcm-operator.io", "crd/kcmnodes.kcm.kcm-operator.io"],
        None,
    );
    assert!(ok, "CRD established: {out}");
    api
}

#[tokio::test]
async fn kustomizations_apply_on_a_real_apiserver_and_bad_crs_are_rejected() {
    let api = apiserver_with_crd().await;
    for k in ["manifests/", "manifests/kind/"] {
        let (ok, out) = run(&api, &["apply", "--dry-run=server", "-k", k], None);
        println!("dry-run -k {k}:\n{out}");
        assert!(ok, "kubectl apply --dry-run=server -k {k} failed:\n{out}");
        assert!(out.contains("kubecontrollermanager.kcm.kcm-operator.io/kube-controller-manager"), "{out}");
        assert!(out.contains("daemonset.apps/kcm-node-helper"), "{out}");
    }

    let cr =
        |name: &str, spec: &str| format!("apiVersion: kcm.kcm-operator.io/v1alpha1\nkind: KubeControllerManager\nmetadata:\n  name: {name}\nspec:\n{spec}");
    let cases = [
        (cr("kube-controller-manager", "  apiserverUrl: http://10.0.0.1:6443\n"), "apiserverUrl must be an https:// URL"),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  serviceClusterIpRange: banana\n"), "serviceClusterIpRange must be a CIDR"),
        (
            cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  serviceClusterIpRange: 10.96.0.0/33\n"),
            "serviceClusterIpRange must be a CIDR",
        ),
        (
            cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  serviceClusterIpRange: 10.256.0.0/16\n"),
            "serviceClusterIpRange must be a CIDR",
        ),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  serviceClusterIpRange: 10.96.0.0\n"), "serviceClusterIpRange must be a CIDR"),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  paths:\n    cert: ../../etc/shadow\n"), "paths.cert must be an absolute path"),
        (
            cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  kcm:\n    binaryPath: /opt/k8s/../../bin/sh\n"),
            "kcm.binaryPath must be an absolute path",
        ),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  kcm:\n    workingDir: data/k8s\n"), "kcm.workingDir must be an absolute path"),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  kcm:\n    extraArgs:\n      --v: \"4\"\n"), "flag names are lowercase"),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  certificate:\n    keyAlgorithm: DSA\n"), "keyAlgorithm"),
        (cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  kcm:\n    securePort: 70000\n"), "securePort"),
        (cr("another-name", "  apiserverUrl: https://10.0.0.1:6443\n"), "kube-controller-manager"),
        (
            cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n  masterSelector:\n    example.com/master: \"true\"\n"),
            "labels a kubelet cannot set on itself",
        ),
        (cr("kube-controller-manager", "  clusterName: x\n"), "apiserverUrl"),
    ];
    for (doc, want) in &cases {
        let (ok, out) = run(&api, &["apply", "--dry-run=server"], Some(doc));
        assert!(!ok, "accepted a bad CR:\n{doc}\n{out}");
        assert!(out.contains(want), "rejection of\n{doc}\ndoes not mention {want:?}:\n{out}");
    }
    let (ok, out) = run(&api, &["apply", "--dry-run=server"], Some(&cr("kube-controller-manager", "  apiserverUrl: https://10.0.0.1:6443\n")));
    assert!(ok, "minimal CR rejected: {out}");
    for range in ["10.254.0.0/16", "172.16.0.0/12", "fd00:10:96::/112", "2001:db8::/64"] {
        let (ok, out) = run(
            &api,
            &["apply", "--dry-run=server"],
            Some(&cr("kube-controller-manager", &format!("  apiserverUrl: https://10.0.0.1:6443\n  serviceClusterIpRange: {range}\n"))),
        );
        assert!(ok, "serviceClusterIpRange {range} rejected: {out}");
    }
}

/// Issue 8, "No injection": writing the CR is root on every master, so no control character
/// reaches the unit through the CRD. A newline in `workingDir` would otherwise add an
/// `ExecStartPre=` that systemd runs as root, past the `--help` allow-list.
#[tokio::test]
async fn control_characters_are_refused_by_the_crd_on_a_real_apiserver() {
    let api = apiserver_with_crd().await;
    let kind_cr = "manifests/kind/kubecontrollermanager.yaml";
    let (ok, out) = run(&api, &["apply", "--dry-run=server", "-f", kind_cr], None);
    assert!(ok, "the kind CR is refused: {out}");
    let good: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(repo().join(kind_cr)).unwrap()).unwrap();

    // Sent as JSON, so each control character travels as its JSON escape ("\n", "\r",
    // "\u0000", "\t", "\u007f").
    let mut tried = 0;
    for c in ['\n', '\r', '\0', '\t', '\x7f'] {
        let injected = format!("/var/lib/kcm{c}ExecStartPre=/bin/sh -c 'touch /pwned'");
        type Inject<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
        let cases: [(&str, &str, Inject); 5] = [
            (
                "spec.kcm.workingDir",
                "kcm.workingDir must not contain control characters",
                Box::new(|v| v["spec"]["kcm"]["workingDir"] = injected.clone().into()),
            ),
            (
                "spec.kcm.binaryPath",
                "kcm.binaryPath must not contain control characters",
                Box::new(|v| v["spec"]["kcm"]["binaryPath"] = injected.clone().into()),
            ),
            ("spec.paths.unit", "paths.unit must not contain control characters", Box::new(|v| v["spec"]["paths"]["unit"] = injected.clone().into())),
            ("spec.kcm.extraArgs", "kcm.extraArgs: flag names", Box::new(|v| v["spec"]["kcm"]["extraArgs"] = serde_json::json!({format!("v{c}x"): "4"}))),
            (
                "spec.kcm.extraArgs[v]",
                "kcm.extraArgs values must not contain control characters",
                Box::new(|v| v["spec"]["kcm"]["extraArgs"] = serde_json::json!({"v": format!("4{c}x")})),
            ),
        ];
        for (path, message, inject) in &cases {
            let mut doc = good.clone();
            inject(&mut doc);
            let json = serde_json::to_string(&doc).unwrap();
            let (ok, out) = run(&api, &["apply", "--dry-run=server"], Some(&json));
            assert!(!ok, "accepted a CR with {c:?} in {path}:\n{json}\n{out}");
            if tried == 0 {
                println!("refusal of {c:?} in {path}:\n{out}");
            }
            assert!(out.contains(path) && out.contains(message), "refusal of {c:?} in {path} does not name the field ({message:?}):\n{out}");
            tried += 1;
        }
    }
    assert_eq!(tried, 25);
}

/// The metric names a PromQL expression selects: its identifiers, less functions (followed
/// by `(`), aggregation operators, keywords, numbers, label names (inside `{}`, and the
/// lists after `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`) and
/// durations (inside `[]`).
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 25] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let (mut names, mut i, mut after_grouping) = (Vec::new(), 0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '{' || c == '[' || (c == '(' && after_grouping) {
            let close = match c {
                '{' => '}',
                '[' => ']',
                _ => ')',
            };
            let mut in_string = false;
            i += 1;
            while i < chars.len() && (in_string || chars[i] != close) {
                if chars[i] == '"' && chars[i - 1] != '\\' {
                    in_string = !in_string;
                }
                i += 1;
            }
            after_grouping = false;
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            continue;
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            after_grouping = GROUPING.contains(&word.as_str());
            if next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
            continue;
        } else if !c.is_whitespace() {
            after_grouping = false;
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_of_promql() {
    assert_eq!(metric_names("min by (node) (a_seconds) - time() < 30 * 86400"), ["a_seconds"]);
    assert_eq!(metric_names(r#"max(b{type="Degraded", status="true"}) == 1 and on (x) rate(c_total[5m]) > 1e3"#), ["b", "c_total"]);
}

/// Issue 11: `manifests/monitoring/` applies on a real apiserver once the Prometheus
/// Operator's PrometheusRule CRD is there (a minimal copy in `e2e/testdata/`, checked with
/// strict field validation), and its alerts name only metrics `kcm_operator::metrics` exports.
#[tokio::test]
async fn monitoring_rules_apply_on_a_real_apiserver_and_name_only_exported_metrics() {
    let api = apiserver_with_crd().await;
    let (ok, out) = run(&api, &["apply", "-f", "e2e/testdata/prometheusrule-crd.yaml"], None);
    assert!(ok, "PrometheusRule CRD apply: {out}");
    let (ok, out) = run(&api, &["wait", "--for=condition=Established", "--timeout=30s", "crd/prometheusrules.monitoring.coreos.com"], None);
    assert!(ok, "PrometheusRule CRD established: {out}");

    let (ok, out) = run(&api, &["apply", "--dry-run=server", "-k", "manifests/monitoring/"], None);
    println!("dry-run -k manifests/monitoring/:\n{out}");
    assert!(ok, "kubectl apply --dry-run=server -k manifests/monitoring/ failed:\n{out}");
    assert!(out.contains("prometheusrule.monitoring.coreos.com/kcm-operator"), "{out}");
    // The schema is enforced: a bad duration and a misplaced field are refused.
    let rule = |extra: &str| {
        format!("apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: bad\n  namespace: kcm-operator\nspec:\n  groups:\n    - name: g\n      rules:\n        - alert: A\n          expr: vector(1)\n{extra}")
    };
    for (extra, want) in
        [("          for: 5 minutes\n", "spec.groups[0].rules[0].for"), ("          severity: page\n", "unknown field \"spec.groups[0].rules[0].severity\"")]
    {
        let (ok, out) = run(&api, &["apply", "--dry-run=server"], Some(&rule(extra)));
        assert!(!ok && out.contains(want), "a bad rule ({extra:?}) was not refused with {want:?}:\n{out}");
    }
    let (ok, out) = run(&api, &["apply", "--dry-run=server"], Some(&rule("          for: 5m\n")));
    assert!(ok, "a good rule was refused: {out}");

    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("manifests/monitoring/prometheusrule.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let exported = kcm_operator::metrics::exported_names();
    let mut alerts = Vec::new();
    for group in doc["spec"]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("an alert");
            let expr = rule["expr"].as_str().expect("an expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{alert}: no metric in {expr:?}");
            for n in &names {
                assert!(exported.contains(n), "{alert}: {n} is not exported by kcm_operator::metrics ({exported:?})");
            }
            assert!(rule["for"].as_str().is_some() && rule["labels"]["severity"].as_str().is_some(), "{alert}: for and severity");
            for a in ["summary", "description"] {
                assert!(rule["annotations"][a].as_str().is_some_and(|t| !t.is_empty()), "{alert}: no {a}");
            }
            alerts.push((alert.to_string(), rule["for"].as_str().unwrap().to_string()));
        }
    }
    let want = [("KcmCertificateExpiresSoon", "15m"), ("KcmNoLeader", "1m"), ("KcmOperatorDegraded", "10m"), ("KcmMasterUnhealthy", "5m")];
    assert_eq!(alerts, want.map(|(a, f)| (a.to_string(), f.to_string())));
}

/// The image the repo's kustomizations name (what `e2e/run.sh` builds and loads into kind).
const DEV_IMAGE: &str = "kcm-operator/kcm-operator:dev";
/// A registry a user ships to.
const SHIPPED_IMAGE: &str = "registry.example.com/team/kcm-operator:1.2.3";

/// `kubectl kustomize <dir>` (client side).
fn kustomize(dir: &Path) -> String {
    let out = Command::new(kubectl()).arg("kustomize").arg(dir).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Every container image of every pod spec in a multi-document render: `(kind/name/container, image)`.
fn pod_images(render: &str) -> Vec<(String, String)> {
    use serde::Deserialize;
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(render) {
        let doc = serde_json::Value::deserialize(doc).unwrap();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let pod = match kind {
            "Pod" => &doc["spec"],
            "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => &doc["spec"]["template"]["spec"],
            "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        for list in ["initContainers", "containers"] {
            for c in pod[list].as_array().into_iter().flatten() {
                let at = format!("{kind}/{}/{}", doc["metadata"]["name"].as_str().unwrap_or_default(), c["name"].as_str().unwrap_or_default());
                found.push((at, c["image"].as_str().unwrap_or_default().to_string()));
            }
        }
    }
    found
}

/// `kcm-operator static-pod --cr <cr> --image <image>`, the CLI itself (built by cargo: a
/// binary of another package has no `CARGO_BIN_EXE_*` here).
fn static_pod(cr: &Path, image: &str) -> serde_json::Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo())
        .args(["run", "-q", "-p", "kcm-operator", "--bin", "kcm-operator", "--", "static-pod", "--cr"])
        .arg(cr)
        .args(["--image", image])
        .output()
        .unwrap();
    assert!(out.status.success(), "kcm-operator static-pod --cr {} --image {image}: {}", cr.display(), String::from_utf8_lossy(&out.stderr));
    serde_yaml::from_slice(&out.stdout).unwrap()
}

/// Issue 11: `images:` in a kustomization points an install at a registry. For each
/// kustomization users apply, an overlay in a temp dir (resources: the repo's, `images:` to
/// another registry) renders that image in every pod spec and the dev image nowhere, and the
/// apiserver accepts it. The operator's static pod follows: the helper writes it with the
/// image of its own container `node-helper`, and `kcm-operator static-pod` given the
/// DaemonSet's rendered image runs exactly that image.
#[tokio::test]
async fn images_point_the_install_and_the_operators_static_pod_at_a_registry() {
    let api = apiserver_with_crd().await;
    let repo = repo();
    let (name, tag) = SHIPPED_IMAGE.rsplit_once(':').unwrap();
    for (k, cr) in [("manifests", "manifests/kubecontrollermanager.yaml"), ("manifests/kind", "manifests/kind/kubecontrollermanager.yaml")] {
        let default = pod_images(&kustomize(&repo.join(k)));
        assert!(!default.is_empty() && default.iter().all(|(_, i)| i == DEV_IMAGE), "{k} as shipped: {default:?}");

        // A user's overlay: kustomize takes a base only by a relative path.
        let overlay = tempfile::tempdir().unwrap();
        let up: PathBuf = overlay.path().canonicalize().unwrap().components().skip(1).map(|_| "..").collect();
        let kustomization = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\nimages:\n  - name: kcm-operator/kcm-operator\n    newName: {name}\n    newTag: \"{tag}\"\n",
            up.join(repo.join(k).strip_prefix("/").unwrap()).display()
        );
        std::fs::write(overlay.path().join("kustomization.yaml"), &kustomization).unwrap();
        let render = kustomize(overlay.path());
        let images = pod_images(&render);
        println!("{k} with images: {SHIPPED_IMAGE}: {images:?}");
        assert!(images.iter().any(|(at, _)| at == "DaemonSet/kcm-node-helper/node-helper"), "{k}: no helper container in {images:?}");
        assert!(images.iter().all(|(_, i)| i == SHIPPED_IMAGE), "{k}: a pod spec does not run {SHIPPED_IMAGE}: {images:?}");
        assert!(!render.contains(DEV_IMAGE), "{k}: {DEV_IMAGE} is still in the render:\n{render}");

        let (ok, out) = run(&api, &["apply", "--dry-run=server", "-k", &overlay.path().display().to_string()], None);
        assert!(ok, "kubectl apply --dry-run=server of the overlay over {k}:\n{kustomization}\n{out}");
        assert!(out.contains("daemonset.apps/kcm-node-helper"), "{out}");

        // What node-helper's own_image reads (its container `node-helper`) is what it places.
        let helper_image = &images.iter().find(|(at, _)| at == "DaemonSet/kcm-node-helper/node-helper").unwrap().1;
        let pod = static_pod(&repo.join(cr), helper_image);
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert!(!containers.is_empty() && containers.iter().all(|c| c["image"] == SHIPPED_IMAGE), "static pod for {cr}: {pod}");
        assert_eq!(containers[0]["command"][0], "/kcm-operator", "{pod}");
    }
}

/// kind_ha builds its first CR from manifests/kind's file through the Rust type: it parses.
#[test]
fn the_kind_cr_parses_as_the_typed_cr() {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/kind/kubecontrollermanager.yaml")).expect("manifests/kind's CR");
    let k: kcm_operator::api::KubeControllerManager = serde_yaml::from_str(&file).expect("parses");
    assert_eq!(k.metadata.name.as_deref(), Some(kcm_operator::api::CR_NAME));
    assert!(!k.spec.paused, "{:?}", k.spec);
    // Only what kubeadm's kcm runs with beyond the seed's set (adoption refuses to drop it).
    let extra: Vec<&str> = k.spec.kcm.extra_args.keys().map(String::as_str).collect();
    assert_eq!(extra, ["allocate-node-cidrs", "cluster-cidr", "enable-hostpath-provisioner"], "{:?}", k.spec);
}
