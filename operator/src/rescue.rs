//! Rescue helpers: a master with no running node-helper (its DaemonSet pod absent, or not
//! Ready for a while) gets a helper pod the operator creates itself, pinned by `nodeName`
//! from the DaemonSet's own template and labelled [`RESCUE_APP`] (not matched by the
//! DaemonSet's selector). This is what keeps the product working when no kcm runs: without
//! kcm there is no DaemonSet controller, and without kube-scheduler DaemonSet pods are
//! never bound. Once the DaemonSet's own pod is Ready on that master, the rescue pod is
//! deleted. The two never act at once on a host: the helper takes a host lock first.
//!
//! [`plan`] is pure; [`run_once`] lists, creates and deletes.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Pod};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::ResourceExt;

use crate::api::{HELPER_APP, HELPER_DAEMONSET, HELPER_METRICS_ADDR_ENV, NAMESPACE, RESCUE_APP};

/// A DaemonSet pod created, or whose helper container (re)started or exited, less than this
/// many seconds ago is given time to become Ready before a rescue pod is made for its
/// master: a helper container the kubelet is restarting (killed, OOM) is not a master
/// without a helper, and a rescue pod then would race it for the host lock.
pub const DAEMONSET_POD_GRACE_SECS: i64 = 60;
/// The ConfigMap kcm's root-ca publisher makes in every namespace; the projected
/// ServiceAccount volume of every pod needs it. With no kcm, the operator makes it.
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

/// A helper pod as the plan sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HelperPod {
    pub name: String,
    pub node: String,
    /// A rescue pod (label [`RESCUE_APP`]) rather than the DaemonSet's.
    pub rescue: bool,
    pub ready: bool,
    /// Being deleted, or finished (Succeeded/Failed): it will not act again.
    pub gone: bool,
    /// Seconds since the pod was created or its container last started or exited.
    pub since_secs: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RescueAction {
    /// Create a rescue pod on this master.
    Create { node: String },
    /// Delete this rescue pod (the DaemonSet's pod is Ready there, or it finished).
    Delete { pod: String, why: String },
}

/// Name of the rescue pod for `node`: one per master, so a repeated create is a no-op.
pub fn rescue_pod_name(node: &str) -> String {
    let name = format!("{HELPER_DAEMONSET}-rescue-{node}");
    name.chars().take(253).collect()
}

/// What to create and delete so that every master has exactly one acting helper.
pub fn plan(masters: &[String], pods: &[HelperPod]) -> Vec<RescueAction> {
    let mut out = Vec::new();
    for m in masters {
        let on = |rescue: bool| pods.iter().filter(move |p| &p.node == m && p.rescue == rescue);
        let ds_ready = on(false).any(|p| p.ready && !p.gone);
        let ds_starting = on(false).any(|p| !p.ready && !p.gone && p.since_secs < DAEMONSET_POD_GRACE_SECS);
        let mut rescue_live = false;
        for r in on(true) {
            if r.gone {
                continue;
            }
            if ds_ready {
                out.push(RescueAction::Delete { pod: r.name.clone(), why: format!("the DaemonSet's helper is Ready on {m}") });
            } else {
                rescue_live = true;
            }
        }
        // A finished rescue pod is deleted so a new one can take its (fixed) name.
        for r in on(true).filter(|r| r.gone && !ds_ready) {
            out.push(RescueAction::Delete { pod: r.name.clone(), why: format!("finished on {m}") });
            rescue_live = true;
        }
        if !ds_ready && !ds_starting && !rescue_live {
            out.push(RescueAction::Create { node: m.clone() });
        }
    }
    out
}

/// The rescue pod for `node`: the DaemonSet's pod template, pinned to the node, with the
/// rescue label instead of the DaemonSet's, and without the helper's HTTP server: it shares
/// the host's network with the DaemonSet's pod, which takes over on the same master and
/// serves the port (a second pod declaring the same host port is refused by the kubelet's
/// admission, and a second bind would fail).
pub fn rescue_pod(ds: &DaemonSet, node: &str) -> Option<Pod> {
    let template = ds.spec.as_ref()?.template.clone();
    let mut spec = template.spec?;
    spec.node_name = Some(node.to_string());
    // Bound by nodeName: no scheduler involved, so no affinity or selector to satisfy.
    spec.affinity = None;
    spec.node_selector = None;
    for c in &mut spec.containers {
        c.ports = None;
        c.liveness_probe = None;
        c.readiness_probe = None;
        c.startup_probe = None;
        let env = c.env.get_or_insert_with(Vec::new);
        env.retain(|e| e.name != HELPER_METRICS_ADDR_ENV);
        env.push(EnvVar { name: HELPER_METRICS_ADDR_ENV.into(), value: Some("off".into()), value_from: None });
    }
    let mut labels: BTreeMap<String, String> = template.metadata.and_then(|m| m.labels).unwrap_or_default();
    labels.insert("app.kubernetes.io/name".into(), RESCUE_APP.into());
    labels.insert(crate::api::CSR_NODE_LABEL.into(), node.to_string());
    Some(Pod {
        metadata: ObjectMeta { name: Some(rescue_pod_name(node)), namespace: Some(NAMESPACE.into()), labels: Some(labels), ..Default::default() },
        spec: Some(spec),
        status: None,
    })
}

fn helper_pod(p: &Pod, now: i64) -> Option<HelperPod> {
    let labels = p.labels();
    let app = labels.get("app.kubernetes.io/name")?;
    let rescue = match app.as_str() {
        HELPER_APP => false,
        RESCUE_APP => true,
        _ => return None,
    };
    let spec = p.spec.as_ref()?;
    // A DaemonSet pod not bound yet names its node in its required node affinity.
    let node = spec.node_name.clone().or_else(|| {
        let terms = &spec.affinity.as_ref()?.node_affinity.as_ref()?.required_during_scheduling_ignored_during_execution.as_ref()?.node_selector_terms;
        terms
            .iter()
            .flat_map(|t| t.match_fields.iter().flatten())
            .find(|f| f.key == "metadata.name" && f.operator == "In")
            .and_then(|f| f.values.as_ref()?.first().cloned())
    })?;
    let status = p.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    let finished = matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed"));
    let created = p.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0.as_second());
    // The latest start or exit of a container: a restart gives the pod its grace again.
    let moved = status
        .container_statuses
        .iter()
        .flatten()
        .flat_map(|c| {
            let running = c.state.as_ref().and_then(|s| s.running.as_ref()).and_then(|r| r.started_at.as_ref());
            let exited =
                [c.state.as_ref(), c.last_state.as_ref()].into_iter().flatten().filter_map(|s| s.terminated.as_ref()).filter_map(|t| t.finished_at.as_ref());
            running.into_iter().chain(exited).map(|t| t.0.as_second())
        })
        .max()
        .unwrap_or(created)
        .max(created);
    Some(HelperPod { name: p.name_any(), node, rescue, ready, gone: finished || p.metadata.deletion_timestamp.is_some(), since_secs: now - moved })
}

/// One round over the watched helper pods and DaemonSet: creates or deletes rescue pods per
/// [`plan`], and `kube-root-ca.crt` when it is missing and a rescue pod is needed. Returns
/// what it did, for the caller's log and Events.
#[allow(clippy::too_many_arguments)]
pub async fn run_once(
    client: &kube::Client,
    masters: &[String],
    pods: &[std::sync::Arc<Pod>],
    ds: Option<&DaemonSet>,
    root_ca_missing: bool,
    ca_pem: Option<&str>,
    now: i64,
) -> Result<Vec<String>, kube::Error> {
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let helpers: Vec<HelperPod> = pods.iter().filter_map(|p| helper_pod(p, now)).collect();
    let actions = plan(masters, &helpers);
    let mut done = Vec::new();
    if actions.iter().any(|a| matches!(a, RescueAction::Create { .. })) && root_ca_missing {
        if let Some(ca) = ca_pem {
            create_root_ca(client, ca).await?;
        }
    }
    for a in actions {
        match a {
            RescueAction::Create { node } => {
                let Some(pod) = ds.and_then(|d| rescue_pod(d, &node)) else {
                    done.push(format!("{node}: no helper runs, and DaemonSet {NAMESPACE}/{HELPER_DAEMONSET} is missing: cannot make a rescue pod"));
                    break;
                };
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(_) => done.push(format!("{node}: no helper runs there: created rescue pod {}", pod.name_any())),
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
            RescueAction::Delete { pod, why } => match pods_api.delete(&pod, &DeleteParams::default()).await {
                Ok(_) => done.push(format!("deleted rescue pod {pod}: {why}")),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            },
        }
    }
    Ok(done)
}

/// Makes `kube-root-ca.crt` in the operator's namespace, which is missing (kcm's root-ca
/// publisher makes it; with no kcm nothing does, and no pod with a ServiceAccount token
/// volume can start). kcm takes it over once it runs.
pub async fn create_root_ca(client: &kube::Client, ca_pem: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(ROOT_CA_CONFIGMAP.into()), namespace: Some(NAMESPACE.into()), ..Default::default() },
        data: Some([("ca.crt".to_string(), ca_pem.to_string())].into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => {
            tracing::info!("created ConfigMap {NAMESPACE}/{ROOT_CA_CONFIGMAP} (no kcm has published it)");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masters() -> Vec<String> {
        vec!["m1".into(), "m2".into(), "m3".into()]
    }
    fn pod(name: &str, node: &str, rescue: bool, ready: bool, age: i64) -> HelperPod {
        HelperPod { name: name.into(), node: node.into(), rescue, ready, gone: false, since_secs: age }
    }

    #[test]
    fn masters_without_helpers_get_rescue_pods() {
        let pods = vec![pod("ds-1", "m1", false, true, 600)];
        assert_eq!(plan(&masters(), &pods), vec![RescueAction::Create { node: "m2".into() }, RescueAction::Create { node: "m3".into() }]);
    }

    #[test]
    fn a_starting_daemonset_pod_is_given_time() {
        let pods = vec![pod("ds-1", "m1", false, true, 600), pod("ds-2", "m2", false, false, 5), pod("ds-3", "m3", false, false, 600)];
        assert_eq!(plan(&masters(), &pods), vec![RescueAction::Create { node: "m3".into() }]);
    }

    #[test]
    fn a_helper_container_the_kubelet_restarts_is_given_time_too() {
        let p = |status: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "ds-x", "labels": {"app.kubernetes.io/name": HELPER_APP}, "creationTimestamp": "2027-01-15T08:00:00Z"},
                "spec": {"nodeName": "m2", "containers": []},
                "status": status,
            }))
            .unwrap()
        };
        let now = 1_800_000_000 + 3600; // an hour after creation
                                        // Killed 5 s ago, restarted 3 s ago, not Ready yet: starting, no rescue pod.
        let restarted =
            p(serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "h", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
            "state": {"running": {"startedAt": "2027-01-15T08:59:57Z"}},
            "lastState": {"terminated": {"exitCode": 137, "finishedAt": "2027-01-15T08:59:55Z"}}}]}));
        let h = helper_pod(&restarted, now).unwrap();
        assert_eq!(h.since_secs, 3);
        assert!(plan(&["m2".into()], &[h]).is_empty(), "a restarting helper container gets its grace");
        // In back-off since its last exit 2 minutes ago: a rescue pod.
        let looping =
            p(serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "h", "image": "i", "imageID": "", "ready": false, "restartCount": 5,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2027-01-15T08:58:00Z"}}}]}));
        let h = helper_pod(&looping, now).unwrap();
        assert_eq!(h.since_secs, 120);
        assert_eq!(plan(&["m2".into()], &[h]), vec![RescueAction::Create { node: "m2".into() }]);
    }

    #[test]
    fn rescue_pod_goes_once_the_daemonset_pod_is_ready() {
        let pods = vec![
            pod("ds-1", "m1", false, true, 600),
            pod("ds-2", "m2", false, true, 600),
            pod("ds-3", "m3", false, true, 10),
            pod("rescue-m3", "m3", true, true, 300),
        ];
        assert_eq!(plan(&masters(), &pods), vec![RescueAction::Delete { pod: "rescue-m3".into(), why: "the DaemonSet's helper is Ready on m3".into() }]);
    }

    #[test]
    fn one_rescue_pod_per_master_and_a_finished_one_is_replaced() {
        let pods = vec![pod("ds-1", "m1", false, true, 600), pod("ds-2", "m2", false, true, 600), pod("rescue-m3", "m3", true, false, 30)];
        assert!(plan(&masters(), &pods).is_empty(), "a live rescue pod is enough");
        let mut finished = pods.clone();
        finished[2].gone = true;
        assert_eq!(plan(&masters(), &finished), vec![RescueAction::Delete { pod: "rescue-m3".into(), why: "finished on m3".into() }]);
    }

    #[test]
    fn an_unbound_daemonset_pod_counts_for_the_node_its_affinity_names() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ds-x", "labels": {"app.kubernetes.io/name": HELPER_APP}, "creationTimestamp": "2027-01-15T08:00:00Z"},
            "spec": {"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["m2"]}]}]}}}},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        let h = helper_pod(&p, 1_800_000_010).unwrap();
        assert_eq!((h.node.as_str(), h.rescue, h.ready, h.gone), ("m2", false, false, false));
    }

    #[test]
    fn rescue_pod_is_the_daemonset_template_pinned_and_relabelled() {
        let ds: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": HELPER_DAEMONSET, "namespace": NAMESPACE},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": HELPER_APP}},
                     "template": {"metadata": {"labels": {"app.kubernetes.io/name": HELPER_APP}},
                                  "spec": {"serviceAccountName": "kcm-node-helper", "nodeSelector": {"x": "y"},
                                           "containers": [{"name": "node-helper", "image": "img:1",
                                                           "env": [{"name": HELPER_METRICS_ADDR_ENV, "value": "0.0.0.0:9477"}],
                                                           "ports": [{"name": "metrics", "containerPort": 9477}],
                                                           "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9477}},
                                                           "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9477}}}]}}}
        }))
        .unwrap();
        let p = rescue_pod(&ds, "m2").unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("m2"));
        assert_eq!(spec.node_selector, None);
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        // No second server, port or probe on the master the DaemonSet's pod serves.
        assert!(c.ports.is_none() && c.liveness_probe.is_none() && c.readiness_probe.is_none(), "{c:?}");
        let env: Vec<(&str, Option<&str>)> = c.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
        assert_eq!(env, [(HELPER_METRICS_ADDR_ENV, Some("off"))]);
        assert_eq!(p.metadata.labels.unwrap()["app.kubernetes.io/name"], RESCUE_APP, "not matched by the DaemonSet's selector");
        assert_eq!(p.metadata.name.as_deref(), Some("kcm-node-helper-rescue-m2"));
    }
}
