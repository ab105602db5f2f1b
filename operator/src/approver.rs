//! The signer's I/O: watches CSRs of [`SIGNER_NAME`], looks up the node and the spec,
//! lets [`signer::check`] decide, then approves and signs, or denies with the rule's reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

use crate::api::{KubeControllerManager, KubeControllerManagerSpec, HELPER_SERVICE_ACCOUNT, NAMESPACE, SIGNER_NAME};
use crate::pki::NodeIdentity;
use crate::signer::{self, Ca, CsrFacts, NodeFacts, Policy};

/// Name of the one KubeControllerManager object per cluster.
pub const CR_NAME: &str = "kube-controller-manager";

#[derive(Debug, thiserror::Error)]
pub enum ApproverError {
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cluster CA: {0}")]
    Ca(#[from] crate::pki::PkiError),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ApproverError {
    let what = what.into();
    move |source| ApproverError::Kube { what, source }
}

/// Where the signer finds the cluster CA, and whose CSRs it accepts.
#[derive(Clone, Debug)]
pub struct SignerConfig {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Namespace of the node-helper's ServiceAccount.
    pub helper_namespace: String,
}

impl SignerConfig {
    pub fn new(ca_cert: impl Into<PathBuf>, ca_key: impl Into<PathBuf>) -> Self {
        Self { ca_cert: ca_cert.into(), ca_key: ca_key.into(), helper_namespace: NAMESPACE.into() }
    }
    fn helper_username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.helper_namespace, HELPER_SERVICE_ACCOUNT)
    }
    fn load_ca(&self) -> Result<Ca, ApproverError> {
        let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|source| ApproverError::Read { path: p.clone(), source });
        Ok(Ca::from_pem(&read(&self.ca_cert)?, &read(&self.ca_key)?)?)
    }
}

struct Ctx {
    client: kube::Client,
    config: SignerConfig,
}

/// Whether a node's labels match the master selector.
pub fn is_master(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn decided(csr: &CertificateSigningRequest) -> (bool, bool) {
    let conds = csr.status.as_ref().and_then(|s| s.conditions.as_ref()).cloned().unwrap_or_default();
    let has = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
    (has("Approved"), has("Denied") || has("Failed"))
}

async fn reconcile(csr: Arc<CertificateSigningRequest>, ctx: Arc<Ctx>) -> Result<Action, ApproverError> {
    if !signer::is_ours(&csr.spec.signer_name) {
        return Ok(Action::await_change());
    }
    let name = csr.name_any();
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let (approved, finished) = decided(&csr);
    let issued = csr.status.as_ref().and_then(|s| s.certificate.as_ref()).is_some_and(|c| !c.0.is_empty());
    if finished || issued {
        return Ok(Action::await_change());
    }
    let Some(kcm) = Api::<KubeControllerManager>::all(ctx.client.clone()).get_opt(CR_NAME).await.map_err(kube_err("reading KubeControllerManager"))? else {
        tracing::warn!(csr = %name, "no KubeControllerManager {CR_NAME}; leaving CSR pending");
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let spec: &KubeControllerManagerSpec = &kcm.spec;
    let policy = Policy { helper_username: ctx.config.helper_username(), key_algorithm: spec.certificate.key_algorithm };

    // Look the node up only when the CSR names the node its requestor is bound to.
    let empty = BTreeMap::new();
    let extra = csr.spec.extra.as_ref().unwrap_or(&empty);
    let node_label = csr.labels().get(crate::api::CSR_NODE_LABEL).cloned();
    let node = match &node_label {
        Some(n) => Api::<Node>::all(ctx.client.clone()).get_opt(n).await.map_err(kube_err(format!("reading node {n}")))?,
        None => None,
    };
    let facts = CsrFacts {
        username: csr.spec.username.as_deref().unwrap_or(""),
        extra,
        usages: csr.spec.usages.as_deref().unwrap_or(&[]),
        request: &csr.spec.request.0,
        node_label: node_label.as_deref(),
    };
    let lookup = |n: &str| {
        let node = node.as_ref().filter(|x| x.name_any() == n)?;
        Some(NodeFacts { identity: NodeIdentity::from_node(node).ok()?, is_master: is_master(node, &spec.master_selector) })
    };
    let pp = PatchParams::default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let accepted = match signer::check(&facts, lookup, &policy) {
        Ok(a) => a,
        Err(denial) if !approved => {
            tracing::warn!(csr = %name, reason = denial.rule.reason(), "denying: {}", denial.message);
            let patch = json!({"status": {"conditions": [{
                "type": "Denied", "status": "True", "reason": denial.rule.reason(),
                "message": denial.message, "lastUpdateTime": now.to_string(),
            }]}});
            api.patch_approval(&name, &pp, &Patch::Merge(&patch)).await.map_err(kube_err(format!("denying CSR {name}")))?;
            return Ok(Action::await_change());
        }
        Err(denial) => {
            // Approved by someone else but fails our rules: never sign it.
            let patch = json!({"status": {"conditions": [{
                "type": "Failed", "status": "True", "reason": denial.rule.reason(),
                "message": format!("not signed: {}", denial.message), "lastUpdateTime": now.to_string(),
            }]}});
            api.patch_status(&name, &pp, &Patch::Merge(&patch)).await.map_err(kube_err(format!("failing CSR {name}")))?;
            return Ok(Action::await_change());
        }
    };
    let ca = ctx.config.load_ca()?;
    if !approved {
        let patch = json!({"status": {"conditions": [{
            "type": "Approved", "status": "True", "reason": "KcmOperatorApproved",
            "message": format!("kube-controller-manager certificate for master {}", accepted.node), "lastUpdateTime": now.to_string(),
        }]}});
        api.patch_approval(&name, &pp, &Patch::Merge(&patch)).await.map_err(kube_err(format!("approving CSR {name}")))?;
    }
    let validity = spec.certificate.validity_secs();
    let pem = signer::sign(&accepted, &ca, now.as_second(), validity, csr.spec.expiration_seconds)?;
    let patch = json!({"status": {"certificate": k8s_openapi::ByteString(pem.into_bytes())}});
    match api.patch_status(&name, &pp, &Patch::Merge(&patch)).await {
        Ok(_) => {}
        // Issued already by an earlier pass that this (stale) event did not see yet.
        Err(kube::Error::Api(e)) if e.code == 422 && api.get_status(&name).await.is_ok_and(|c| c.status.and_then(|s| s.certificate).is_some()) => {
            return Ok(Action::await_change());
        }
        Err(e) => return Err(kube_err(format!("issuing CSR {name}"))(e)),
    }
    tracing::info!(csr = %name, node = %accepted.node, "approved and issued");
    Ok(Action::await_change())
}

fn error_policy(csr: Arc<CertificateSigningRequest>, err: &ApproverError, _: Arc<Ctx>) -> Action {
    tracing::error!(csr = %csr.name_any(), "signer: {err}");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the signer until the stream ends.
pub async fn run(client: kube::Client, config: SignerConfig) {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    Controller::new(api, wc)
        .run(reconcile, error_policy, Arc::new(Ctx { client, config }))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("signer: {e}");
            }
        })
        .await;
}
