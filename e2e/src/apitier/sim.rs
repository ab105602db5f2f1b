//! Simulated masters on the API tier: what the operator and its signer see of a master when
//! no kubelet runs. A Node labelled control-plane, the helper DaemonSet's pod bound to it
//! (Running and Ready only when [`mark_ready`] says so), a token bound to that pod (what the
//! real helper authenticates with) and its KcmNode. Used by the install tests and by the
//! benchmarks (`e2e/src/bench/csr.rs`, `scale.rs`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::ByteString;
use kcm_operator::api::{
    KcmNode, KcmNodeSpec, KubeControllerManager, KubeControllerManagerSpec, CR_NAME, CSR_NODE_LABEL, CSR_REVISION_ANNOTATION, HELPER_APP, HELPER_DAEMONSET,
    HELPER_SERVICE_ACCOUNT, NAMESPACE, RESCUE_APP,
};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;

use super::ApiServer;

/// Applies the project's namespace, RBAC and helper DaemonSet (manifests/base), so the
/// helper and the operator run with exactly their rights and helper pods have their owner
/// (no DaemonSet controller runs here), and the two CRDs; waits until the CRDs are served.
pub async fn install_base(client: &Client) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base");
    for file in ["namespace.yaml", "rbac.yaml", "node-helper.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).with_context(|| format!("reading manifests/base/{file}"))?;
        super::apply_yaml(client, &text).await.with_context(|| format!("applying {file}"))?;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &KubeControllerManager::crd()).await.context("creating the KubeControllerManager CRD")?;
    crds.create(&PostParams::default(), &KcmNode::crd()).await.context("creating the KcmNode CRD")?;
    let served = super::poll("KubeControllerManager and KcmNode CRDs served", Duration::from_secs(30), || async {
        let lp = Default::default();
        (Api::<KubeControllerManager>::all(client.clone()).list(&lp).await.is_ok() && Api::<KcmNode>::all(client.clone()).list(&lp).await.is_ok()).then_some(())
    })
    .await;
    served.context("the CRDs were not served within 30 s")
}

/// The smallest spec for a cluster whose apiserver is `apiserver_url`: defaults otherwise
/// (RSA-2048, a year's validity, renewed when 20% remains, masters by the control-plane label).
pub fn minimal_spec(apiserver_url: &str) -> Result<KubeControllerManagerSpec> {
    Ok(serde_json::from_value(json!({ "apiserverUrl": apiserver_url }))?)
}

/// Creates the KubeControllerManager.
pub async fn create_cr(client: &Client, spec: KubeControllerManagerSpec) -> Result<KubeControllerManager> {
    let cr = KubeControllerManager::new(CR_NAME, spec);
    Api::<KubeControllerManager>::all(client.clone()).create(&PostParams::default(), &cr).await.context("creating the KubeControllerManager")
}

/// What a pod with the helper's ServiceAccount on a master is, to the signer.
#[derive(Clone, Copy, Debug)]
pub enum Owner {
    /// Controlled by the helper DaemonSet: what the real helper runs in.
    DaemonSet,
    /// The operator's rescue pod for the node.
    Rescue,
    /// A pod with the helper's ServiceAccount that is neither.
    Stray,
}

/// Creates a pod with the helper's ServiceAccount on `node` (no kubelet runs it); returns
/// its name, for [`ApiServer::bound_sa_token`].
pub async fn helper_pod(admin: &Client, node: &str, owner: Owner) -> Result<String> {
    let (name, labels, owners) = match owner {
        Owner::DaemonSet => {
            let ds = Api::<DaemonSet>::namespaced(admin.clone(), NAMESPACE).get(HELPER_DAEMONSET).await.context("reading the helper DaemonSet")?;
            let owner = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": HELPER_DAEMONSET, "uid": ds.metadata.uid, "controller": true}]);
            (format!("{HELPER_DAEMONSET}-{node}"), json!({"app.kubernetes.io/name": HELPER_APP}), owner)
        }
        Owner::Rescue => (kcm_operator::rescue::rescue_pod_name(node), json!({"app.kubernetes.io/name": RESCUE_APP}), json!([])),
        Owner::Stray => (format!("stray-{node}"), json!({"app.kubernetes.io/name": HELPER_APP}), json!([])),
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels, "ownerReferences": owners},
        "spec": {"nodeName": node, "serviceAccountName": HELPER_SERVICE_ACCOUNT, "containers": [{"name": "node-helper", "image": "none"}]},
    }))?;
    Api::<Pod>::namespaced(admin.clone(), NAMESPACE).create(&PostParams::default(), &pod).await.with_context(|| format!("creating pod {name}"))?;
    Ok(name)
}

/// Reports pod `name` (in the helper's namespace) Running and Ready, as a kubelet would: the
/// operator then sees a live helper on its master and makes no rescue pod.
pub async fn mark_ready(admin: &Client, name: &str) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
    ]}});
    Api::<Pod>::namespaced(admin.clone(), NAMESPACE)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("marking pod {name} Ready"))?;
    Ok(())
}

/// A simulated master and its helper.
pub struct Master {
    pub name: String,
    /// The helper DaemonSet's pod on it.
    pub pod: String,
    /// A client with a token bound to that pod: what the real helper authenticates as.
    pub helper: Client,
}

/// Makes master `name`: its Node (control-plane label, InternalIP 127.0.0.1), the helper
/// DaemonSet's pod on it, and a client with a token bound to that pod. Needs
/// [`install_base`] first.
pub async fn master_with_helper(api: &ApiServer, admin: &Client, name: &str) -> Result<Master> {
    let pod = helper_pod(admin, name, Owner::DaemonSet).await?;
    let token = api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, &pod, name).await?;
    Ok(Master { name: name.into(), pod, helper: api.try_client_with_token(&token)? })
}

/// Each node's KcmNode as the operator and the helper would leave it: its target revision
/// (spec) and what its helper applied (status).
pub async fn set_steps(admin: &Client, steps: &[(&str, &str, Option<&str>)]) -> Result<()> {
    let api = Api::<KcmNode>::all(admin.clone());
    for (node, target, applied) in steps {
        let target = target.parse().map_err(anyhow::Error::msg)?;
        let obj = KcmNode::new(node, KcmNodeSpec { target_revision: Some(target), renew_at: None });
        api.patch(node, &PatchParams::apply("test-operator").force(), &Patch::Apply(&obj)).await.with_context(|| format!("writing KcmNode {node}"))?;
        let status =
            json!({"apiVersion": "kcm.kcm-operator.io/v1alpha1", "kind": "KcmNode", "metadata": {"name": node}, "status": {"appliedRevision": applied}});
        api.patch_status(node, &PatchParams::apply("test-helper").force(), &Patch::Apply(&status))
            .await
            .with_context(|| format!("writing the status of KcmNode {node}"))?;
    }
    Ok(())
}

/// A CSR as the helper makes it for `node` and step `revision` (label, annotation), for
/// `signer` with these usages.
pub fn csr(name: &str, node: &str, revision: &str, pem: String, signer: &str, usages: &[&str], expiration_seconds: Option<i32>) -> CertificateSigningRequest {
    CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([(CSR_NODE_LABEL.to_string(), node.to_string())].into()),
            annotations: Some([(CSR_REVISION_ANNOTATION.to_string(), revision.to_string())].into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: signer.into(),
            usages: Some(usages.iter().map(|s| s.to_string()).collect()),
            expiration_seconds,
            ..Default::default()
        },
        status: None,
    }
}
