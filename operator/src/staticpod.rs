//! The operator's static pod manifest, rendered from the CR: the node-helper places it in
//! the kubelet's static pod directory on its master (image pinned to the helper's own), and
//! on a cluster where no kcm runs yet the admin places it once per master
//! (`kcm-operator static-pod --cr <file> --image <image>` prints it). Pure.
//!
//! The kubelet runs it without the API, without kcm and without a ServiceAccount: the
//! operator mints its own client certificate from the cluster CA at the CR's paths
//! (`paths.caCert`, `paths.caKey`), mounted read-only one file each, and reaches the
//! apiserver at the CR's `apiserverUrl` (the address kcm's kubeconfig names too), never an
//! assumed 127.0.0.1:6443: an apiserver may bind the master's own address only. A change
//! of either is a changed manifest, which the helper writes over the one in place.

use serde_json::json;

use crate::api::{KubeControllerManagerSpec, NAMESPACE, OPERATOR_APP};

/// Where the operator serves /healthz, /readyz and /metrics: on every address of the
/// master (the pod uses the host's network), so Prometheus can scrape it; the kubelet
/// probes it on loopback.
pub const HEALTH_PORT: u16 = crate::api::OPERATOR_HEALTH_PORT;

/// The operator's static pod manifest (YAML) for `spec`, running `image`.
pub fn operator_pod(spec: &KubeControllerManagerSpec, image: &str) -> String {
    let p = &spec.paths;
    let probe = |path: &str| json!({"httpGet": {"host": "127.0.0.1", "path": path, "port": HEALTH_PORT}});
    let mut liveness = probe("/healthz");
    liveness["initialDelaySeconds"] = json!(10);
    liveness["periodSeconds"] = json!(10);
    liveness["failureThreshold"] = json!(3);
    let mut readiness = probe("/readyz");
    readiness["periodSeconds"] = json!(5);
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": OPERATOR_APP,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": OPERATOR_APP, "app.kubernetes.io/component": "static-pod"},
        },
        "spec": {
            "hostNetwork": true,
            "priorityClassName": "system-node-critical",
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "operator",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/kcm-operator"],
                "args": [
                    "--identity=host",
                    format!("--ca-cert={}", p.ca_cert),
                    format!("--ca-key={}", p.ca_key),
                    format!("--apiserver={}", spec.apiserver_url),
                    "--client-cert-validity=24h",
                    format!("--health-addr=0.0.0.0:{HEALTH_PORT}"),
                ],
                "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false},
                "livenessProbe": liveness,
                "readinessProbe": readiness,
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                // Only the CA pair, not the rest of the host's PKI directory.
                "volumeMounts": [
                    {"name": "ca-cert", "mountPath": p.ca_cert, "readOnly": true},
                    {"name": "ca-key", "mountPath": p.ca_key, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "ca-cert", "hostPath": {"path": p.ca_cert, "type": "File"}},
                {"name": "ca-key", "hostPath": {"path": p.ca_key, "type": "File"}},
            ],
        },
    });
    let body = serde_yaml::to_string(&pod).expect("a JSON value serializes as YAML");
    format!("# The kcm-operator static pod, rendered from KubeControllerManager {} (paths.caCert, paths.caKey).\n# Placed and kept up to date by kcm-node-helper; do not edit by hand.\n{body}", crate::api::CR_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(paths: serde_json::Value) -> KubeControllerManagerSpec {
        serde_json::from_value(json!({"apiserverUrl": "https://10.0.0.10:6443", "paths": paths})).unwrap()
    }

    #[test]
    fn seed_layout_mounts_the_seed_ca_pair_only() {
        let text = operator_pod(&spec(json!({})), "registry.example/kcm-operator:v1");
        let pod: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["image"], "registry.example/kcm-operator:v1");
        let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.contains(&"--ca-cert=/etc/kubernetes/cert/ca.pem") && args.contains(&"--ca-key=/etc/kubernetes/cert/ca-key.pem"), "{args:?}");
        let vols: Vec<&str> = pod["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["hostPath"]["path"].as_str().unwrap()).collect();
        assert_eq!(vols, ["/etc/kubernetes/cert/ca.pem", "/etc/kubernetes/cert/ca-key.pem"]);
        assert_eq!(pod["metadata"]["namespace"], NAMESPACE);
        assert_eq!(pod["spec"]["hostNetwork"], true);
        assert!(args.contains(&"--apiserver=https://10.0.0.10:6443"), "the CR's apiserverUrl, not 127.0.0.1: {args:?}");
        assert_eq!(args.iter().filter(|a| a.starts_with("--apiserver")).count(), 1, "{args:?}");
    }

    #[test]
    fn probes_hit_the_health_address_on_a_port_apart_from_the_helpers() {
        let pod: serde_json::Value = serde_yaml::from_str(&operator_pod(&spec(json!({})), "img")).unwrap();
        assert_eq!(pod["spec"]["hostNetwork"], true, "the port is the host's: it must not clash");
        let c = &pod["spec"]["containers"][0];
        assert!(c["args"].as_array().unwrap().iter().any(|a| a == "--health-addr=0.0.0.0:10271"), "{}", c["args"]);
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(
                (get["host"].as_str(), get["path"].as_str(), get["port"].as_u64()),
                (Some("127.0.0.1"), Some(path), Some(u64::from(HEALTH_PORT))),
                "{probe}"
            );
        }
        // The helper DaemonSet runs on the same masters with the host's network too.
        let ds: serde_json::Value = serde_yaml::from_str(include_str!("../../manifests/base/node-helper.yaml")).unwrap();
        let helper = &ds["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
        let port = u64::from(crate::api::HELPER_METRICS_PORT);
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(helper[probe]["httpGet"]["port"].as_u64(), Some(port), "helper {probe}");
        }
        assert_eq!(helper["ports"][0]["containerPort"].as_u64(), Some(port));
        let env = helper["env"].as_array().unwrap().iter().find(|e| e["name"] == crate::api::HELPER_METRICS_ADDR_ENV).expect("the helper's address is set");
        assert_eq!(env["value"], format!("0.0.0.0:{port}"));
        assert_ne!(HEALTH_PORT, crate::api::HELPER_METRICS_PORT);
        assert!(![6443, 2379, 2380].contains(&HEALTH_PORT) && !(10248..=10260).contains(&HEALTH_PORT));
    }

    #[test]
    fn kubeadm_layout_comes_from_the_cr() {
        let text = operator_pod(&spec(json!({"caCert": "/etc/kubernetes/pki/ca.crt", "caKey": "/etc/kubernetes/pki/ca.key"})), "img");
        assert!(text.contains("--ca-key=/etc/kubernetes/pki/ca.key") && !text.contains("/etc/kubernetes/cert/"), "{text}");
    }
}
