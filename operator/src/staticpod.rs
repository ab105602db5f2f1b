//! The operator's static pod manifest, rendered from the CR: the node-helper places it in
//! the kubelet's static pod directory on its master (image pinned to the helper's own), and
//! on a cluster where no kcm runs yet the admin places it once per master
//! (`kcm-operator static-pod --cr <file> --image <image>` prints it). Pure.
//!
//! The kubelet runs it without the API, without kcm and without a ServiceAccount: the
//! operator mints its own client certificate from the cluster CA at the CR's paths
//! (`paths.caCert`, `paths.caKey`), mounted read-only one file each.

use serde_json::json;

use crate::api::{KubeControllerManagerSpec, NAMESPACE, OPERATOR_APP};
use crate::identity::DEFAULT_APISERVER;

/// Where the operator serves /healthz and /readyz (loopback of the master; hostNetwork).
pub const HEALTH_PORT: u16 = 10271;

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
                    format!("--apiserver={DEFAULT_APISERVER}"),
                    "--client-cert-validity=24h",
                    format!("--health-addr=127.0.0.1:{HEALTH_PORT}"),
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
    }

    #[test]
    fn kubeadm_layout_comes_from_the_cr() {
        let text = operator_pod(&spec(json!({"caCert": "/etc/kubernetes/pki/ca.crt", "caKey": "/etc/kubernetes/pki/ca.key"})), "img");
        assert!(text.contains("--ca-key=/etc/kubernetes/pki/ca.key") && !text.contains("/etc/kubernetes/cert/"), "{text}");
    }
}
