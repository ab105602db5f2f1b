//! The signer's I/O: watches CSRs of [`SIGNER_NAME`], looks up the node and the spec,
//! lets [`signer::check`] decide, then approves and signs, or denies with the rule's reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::{
    KcmNode, KubeControllerManager, KubeControllerManagerSpec, Revision, CR_NAME, CSR_REVISION_ANNOTATION, HELPER_DAEMONSET, HELPER_SERVICE_ACCOUNT, NAMESPACE,
    NODE_NAME_EXTRA, POD_NAME_EXTRA, RESCUE_APP, SIGNER_NAME,
};
use crate::kube_error::{kube_err, KubeError};
use crate::metrics::OperatorMetrics;
use crate::pki::NodeIdentity;
use crate::rescue::rescue_pod_name;
use crate::signer::{self, Ca, CsrFacts, Lookups, NodeFacts, PodFacts, Policy};

#[derive(Debug, thiserror::Error)]
pub enum ApproverError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cluster CA: {0}")]
    Ca(#[from] crate::pki::PkiError),
}

/// Where the signer finds the cluster CA, and whose CSRs it accepts.
#[derive(Clone, Debug)]
pub struct SignerConfig {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Namespace of the node-helper's ServiceAccount.
    pub helper_namespace: String,
    /// CSRs older than this (seconds) are denied ([`signer::MAX_CSR_AGE_SECS`]).
    pub max_csr_age_secs: i64,
}

impl SignerConfig {
    pub fn new(ca_cert: impl Into<PathBuf>, ca_key: impl Into<PathBuf>) -> Self {
        Self { ca_cert: ca_cert.into(), ca_key: ca_key.into(), helper_namespace: NAMESPACE.into(), max_csr_age_secs: signer::MAX_CSR_AGE_SECS }
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
    /// One decision at a time per node (the node the CSR's token is bound to), each lock
    /// holding the newest resourceVersion of a CSR this signer issued for that node (or,
    /// before the first, of the CSR collection when it started): see [`issued_for`]. Only
    /// the one-certificate-per-step rule looks beyond the CSR itself, and only at its node's
    /// CSRs: decisions for different masters may run at once.
    deciding: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<Option<String>>>>>,
    /// The CSR collection's resourceVersion when this signer started.
    start: Option<String>,
    metrics: OperatorMetrics,
}

/// One Event per decision: regarding the KcmNode of the node the CSR names (so `kubectl
/// describe kcmnode <node>` shows what its helper was given or refused), related to the CSR;
/// regarding the CSR when it names no node. The reason is `CertificateIssued` or the rule's.
async fn decided_event(ctx: &Ctx, csr: &CertificateSigningRequest, type_: EventType, reason: &str, note: String) {
    let node = csr.labels().get(crate::api::CSR_NODE_LABEL).cloned();
    let csr_ref = csr.object_ref(&());
    let (regarding, secondary) = match node {
        Some(n) => {
            let r = ObjectReference {
                api_version: Some(KcmNode::api_version(&()).into()),
                kind: Some(KcmNode::kind(&()).into()),
                name: Some(n),
                ..Default::default()
            };
            (r, Some(csr_ref))
        }
        None => (csr_ref, None),
    };
    crate::events::publish(&ctx.client, &regarding, secondary, type_, "Sign", reason, &note).await;
}

/// Whether a node's labels match the master selector.
pub fn is_master(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.labels();
    // Fail closed on a selector the CRD would refuse (a CR from before the rule): a label a
    // kubelet can set on itself selects no master.
    !selector.is_empty() && selector.keys().all(|k| crate::api::master_label_allowed(k)) && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a pod is a node-helper pod: controlled by the helper DaemonSet `ds_uid` names
/// (None: it does not exist), or the operator's rescue pod for its node.
pub fn helper_pod_check(pod: &Pod, ds_uid: Option<&str>) -> Result<(), String> {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("");
    if let Some(owner) = pod.owner_references().iter().find(|o| o.controller == Some(true)) {
        return match (owner.kind.as_str(), owner.name.as_str(), ds_uid) {
            ("DaemonSet", HELPER_DAEMONSET, Some(uid)) if owner.uid == uid => Ok(()),
            ("DaemonSet", HELPER_DAEMONSET, _) => Err(format!("its owner DaemonSet {HELPER_DAEMONSET} (uid {}) is not the current one", owner.uid)),
            (kind, name, _) => Err(format!("it is controlled by {kind} {name}, not by DaemonSet {HELPER_DAEMONSET}")),
        };
    }
    let rescue = pod.labels().get("app.kubernetes.io/name").is_some_and(|a| a == RESCUE_APP);
    if rescue && pod.name_any() == rescue_pod_name(node) {
        return Ok(());
    }
    Err(format!("it is neither controlled by DaemonSet {HELPER_DAEMONSET} nor the rescue pod {}", rescue_pod_name(node)))
}

/// The facts the rules need beyond the CSR: the pod its token is bound to, the node, the
/// node's step under way and what was issued for it. Fetched only as far as the CSR's own
/// claims lead (a token without pod extras costs no reads).
async fn lookups(ctx: &Ctx, facts: &CsrFacts<'_>, kcm: &KubeControllerManager, csr_name: &str, floor: Option<&str>) -> Result<Lookups, ApproverError> {
    let mut found = Lookups::default();
    let (Some(pod_name), Some(node_name)) = (facts.single_extra(POD_NAME_EXTRA), facts.single_extra(NODE_NAME_EXTRA)) else {
        return Ok(found);
    };
    let ns = &ctx.config.helper_namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(pod) = pods.get_opt(pod_name).await.map_err(kube_err(format!("reading pod {ns}/{pod_name}")))? {
        let ds = Api::<DaemonSet>::namespaced(ctx.client.clone(), ns)
            .get_opt(HELPER_DAEMONSET)
            .await
            .map_err(kube_err(format!("reading DaemonSet {ns}/{HELPER_DAEMONSET}")))?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
        found.pod = Some(PodFacts {
            uid: pod.uid().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            live: pod.metadata.deletion_timestamp.is_none() && phase != "Succeeded" && phase != "Failed",
            helper: helper_pod_check(&pod, ds.as_ref().and_then(|d| d.metadata.uid.as_deref())),
        });
    }
    if let Some(node) = Api::<Node>::all(ctx.client.clone()).get_opt(node_name).await.map_err(kube_err(format!("reading node {node_name}")))? {
        found.node = NodeIdentity::from_node(&node).ok().map(|identity| NodeFacts { identity, is_master: is_master(&node, &kcm.spec.master_selector) });
    }
    let kcm_node = Api::<KcmNode>::all(ctx.client.clone()).get_opt(node_name).await.map_err(kube_err(format!("reading KcmNode {node_name}")))?;
    found.pending_revision = kcm_node.as_ref().and_then(KcmNode::pending).map(Revision::to_string);
    if let Some(rev) = facts.revision.filter(|r| found.pending_revision.as_deref() == Some(*r)) {
        let csrs = issued_for(ctx, node_name, floor).await?;
        found.issued_for_revision = csrs
            .iter()
            .filter(|c| c.name_any() != csr_name && c.annotations().get(CSR_REVISION_ANNOTATION).map(String::as_str) == Some(rev))
            .filter(|c| c.status.as_ref().and_then(|s| s.certificate.as_ref()).is_some_and(|b| !b.0.is_empty()))
            .map(|c| c.name_any())
            .collect();
    }
    Ok(found)
}

/// The CSRs of our signer naming `node`, for the one-certificate-per-step rule. Every
/// certificate is issued by the leading signer, its decisions one at a time: whatever was
/// issued for `node` before this decision is at or below `floor`, the resourceVersion of
/// this signer's latest issue for it (or of the collection when it started leading, which
/// covers a previous leader's). A LIST "not older than" it is served by the apiserver's watch cache at once,
/// where a quorum-consistent LIST waits for the cache to catch up with etcd (in 1.33 about
/// 100 ms when no CSR changed meanwhile: every decision paid it). Without a floor, or when the
/// cache cannot serve it, the consistent LIST.
async fn issued_for(ctx: &Ctx, node: &str, floor: Option<&str>) -> Result<Vec<CertificateSigningRequest>, ApproverError> {
    let api = Api::<CertificateSigningRequest>::all(ctx.client.clone());
    let lp = ListParams::default().labels(&format!("{}={node}", crate::api::CSR_NODE_LABEL)).fields(&format!("spec.signerName={SIGNER_NAME}"));
    if let Some(rv) = floor {
        match api.list(&lp.clone().at(rv).matching(kube::api::VersionMatch::NotOlderThan)).await {
            Ok(l) => return Ok(l.items),
            Err(e) => tracing::debug!("listing CSRs of node {node} not older than {rv}: {e}; listing consistently"),
        }
    }
    Ok(api.list(&lp).await.map_err(kube_err(format!("listing CSRs of node {node}")))?.items)
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
    let policy = Policy {
        helper_username: ctx.config.helper_username(),
        key_algorithm: spec.certificate.key_algorithm,
        service_cidr: spec.service_cluster_ip_range.clone(),
        max_age_secs: ctx.config.max_csr_age_secs,
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let empty = BTreeMap::new();
    let facts = CsrFacts {
        username: csr.spec.username.as_deref().unwrap_or(""),
        extra: csr.spec.extra.as_ref().unwrap_or(&empty),
        usages: csr.spec.usages.as_deref().unwrap_or(&[]),
        request: &csr.spec.request.0,
        node_label: csr.labels().get(crate::api::CSR_NODE_LABEL).map(String::as_str),
        revision: csr.annotations().get(CSR_REVISION_ANNOTATION).map(String::as_str),
        age_secs: csr.metadata.creation_timestamp.as_ref().map_or(0, |t| now.as_second() - t.0.as_second()),
    };
    // One decision at a time per node: two CSRs for the same step must not both pass the
    // one-certificate-per-step rule before either is issued.
    let node_lock = {
        let key = facts.single_extra(NODE_NAME_EXTRA).unwrap_or_default().to_string();
        let mut locks = ctx.deciding.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(ctx.start.clone()))).clone()
    };
    let mut floor = node_lock.lock().await;
    let found = lookups(&ctx, &facts, &kcm, &name, floor.as_deref()).await?;
    let pp = PatchParams::default();
    let accepted = match signer::check(&facts, &found, &policy) {
        Ok(a) => a,
        Err(denial) if !approved => {
            tracing::warn!(csr = %name, reason = denial.rule.reason(), "denying: {}", denial.message);
            let patch = json!({"status": {"conditions": [{
                "type": "Denied", "status": "True", "reason": denial.rule.reason(),
                "message": denial.message, "lastUpdateTime": now.to_string(),
            }]}});
            api.patch_approval(&name, &pp, &Patch::Merge(&patch)).await.map_err(kube_err(format!("denying CSR {name}")))?;
            ctx.metrics.csr_decisions.inc(&[denial.rule.reason()]);
            decided_event(&ctx, &csr, EventType::Warning, denial.rule.reason(), format!("CSR {name} denied: {}", denial.message)).await;
            return Ok(Action::await_change());
        }
        Err(denial) => {
            // Approved by someone else but fails our rules: never sign it.
            let patch = json!({"status": {"conditions": [{
                "type": "Failed", "status": "True", "reason": denial.rule.reason(),
                "message": format!("not signed: {}", denial.message), "lastUpdateTime": now.to_string(),
            }]}});
            api.patch_status(&name, &pp, &Patch::Merge(&patch)).await.map_err(kube_err(format!("failing CSR {name}")))?;
            ctx.metrics.csr_decisions.inc(&[denial.rule.reason()]);
            decided_event(&ctx, &csr, EventType::Warning, denial.rule.reason(), format!("CSR {name} approved by someone else, not signed: {}", denial.message))
                .await;
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
        Ok(issued) => *floor = issued.metadata.resource_version.or(floor.take()),
        // Issued already by an earlier pass that this (stale) event did not see yet.
        Err(kube::Error::Api(e)) if e.code == 422 && api.get_status(&name).await.is_ok_and(|c| c.status.and_then(|s| s.certificate).is_some()) => {
            return Ok(Action::await_change());
        }
        Err(e) => return Err(kube_err(format!("issuing CSR {name}"))(e).into()),
    }
    // The issue is recorded: the master's next decision need not wait for the Event.
    drop(floor);
    ctx.metrics.csr_decisions.inc(&[crate::metrics::ISSUED]);
    tracing::info!(csr = %name, node = %accepted.node, "approved and issued");
    decided_event(&ctx, &csr, EventType::Normal, "CertificateIssued", format!("CSR {name}: certificate issued for master {}", accepted.node)).await;
    Ok(Action::await_change())
}

fn error_policy(csr: Arc<CertificateSigningRequest>, err: &ApproverError, ctx: Arc<Ctx>) -> Action {
    tracing::error!(csr = %csr.name_any(), "signer: {err}");
    ctx.metrics.reconcile_errors.inc(&["signer"]);
    Action::requeue(Duration::from_secs(5))
}

/// Runs the signer until the stream ends; each decision is counted in `metrics`
/// (`kcm_operator_csr_decisions_total{reason}`).
pub async fn run(client: kube::Client, config: SignerConfig, metrics: OperatorMetrics) {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    // Where this leadership starts: everything a previous leader issued is at or below it.
    let start = match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(l) => l.metadata.resource_version,
        Err(e) => {
            tracing::warn!("reading the CSR collection's resourceVersion: {e}; every decision lists CSRs consistently until the first issue");
            None
        }
    };
    let wc = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    Controller::new(api, wc)
        .run(reconcile, error_policy, Arc::new(Ctx { client, config, deciding: Default::default(), start, metrics }))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("signer: {e}");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        n
    }

    #[test]
    fn only_labels_a_kubelet_cannot_set_on_itself_select_masters() {
        let cp = BTreeMap::from([(crate::api::CONTROL_PLANE_LABEL.to_string(), String::new())]);
        assert!(is_master(&node(&[(crate::api::CONTROL_PLANE_LABEL, "")]), &cp));
        assert!(!is_master(&node(&[("kubernetes.io/os", "linux")]), &cp));
        let restricted = BTreeMap::from([("node-restriction.kubernetes.io/kcm".to_string(), "yes".to_string())]);
        assert!(is_master(&node(&[("node-restriction.kubernetes.io/kcm", "yes")]), &restricted));
        // A label any kubelet may put on its own Node (--node-labels) selects nothing, even
        // on a node that carries it: a worker could make itself a master.
        let forgeable = BTreeMap::from([("example.com/master".to_string(), "true".to_string())]);
        assert!(!is_master(&node(&[("example.com/master", "true")]), &forgeable));
        let mixed = BTreeMap::from([(crate::api::CONTROL_PLANE_LABEL.to_string(), String::new()), ("example.com/master".to_string(), "true".to_string())]);
        assert!(!is_master(&node(&[(crate::api::CONTROL_PLANE_LABEL, ""), ("example.com/master", "true")]), &mixed));
        assert!(!is_master(&node(&[]), &BTreeMap::new()), "an empty selector selects no master");
    }
}
