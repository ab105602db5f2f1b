//! Issue 8 part 3 on the API tier (real etcd + kube-apiserver): "admission, not trust".
//! With manifests/base applied, the ValidatingAdmissionPolicies in admission.yaml hold a
//! node-helper, identified by the node name its pod-bound token carries, to its own master:
//! it reports in its own `status.nodes` entry only (not the operator's targetRevision and
//! renewAt, not another node's entry, not the top-level status), and on kcm's Lease it may
//! only clear a holder on its own node. The admin and the operator are not affected.

use std::path::Path;
use std::time::Duration;

use e2e::apitier::{whoami, ApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::authentication::v1::TokenRequest;
use kcm_operator::api::{KubeControllerManager, HELPER_MANAGER_PREFIX, HELPER_SERVICE_ACCOUNT, KCM_LEASE, NAMESPACE, NODE_NAME_EXTRA, OPERATOR_MANAGER};
use kcm_operator::approver::CR_NAME;
use kcm_operator::identity::OPERATOR_USER;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use node_helper::step::Report;
use serde_json::{json, Value};

const A: &str = "k8smaster01";
const B: &str = "k8smaster02";
const OWN_NODE: &str = "kcm-node-helper-own-node";
const LEASE_RELEASE: &str = "kcm-node-helper-lease-release";

fn base() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base")
}

/// Applies manifests/base as its kustomization lists it (the CRD from crd.yaml, as shipped).
async fn apply_manifests(admin: &Client) {
    let kustomization: Value = serde_yaml::from_str(&std::fs::read_to_string(base().join("kustomization.yaml")).unwrap()).unwrap();
    let files: Vec<String> = kustomization["resources"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert!(files.iter().any(|f| f == "admission.yaml"), "kustomization.yaml does not list admission.yaml: {files:?}");
    for file in &files {
        let text = std::fs::read_to_string(base().join(file)).unwrap();
        e2e::apitier::apply_yaml(admin, &text).await.unwrap_or_else(|e| panic!("applying {file}: {e:#}"));
    }
    e2e::apitier::wait_for("KubeControllerManager CRD served", Duration::from_secs(30), || async {
        Api::<KubeControllerManager>::all(admin.clone()).list(&Default::default()).await.is_ok()
    })
    .await;
}

fn status_body(status: Value) -> Value {
    json!({"apiVersion": "kcm.kcm-operator.io/v1alpha1", "kind": "KubeControllerManager", "metadata": {"name": CR_NAME}, "status": status})
}

/// Server-side apply on the status as `manager`, as the operator and the helper write it.
async fn apply_status(client: &Client, manager: &str, status: Value) -> Result<KubeControllerManager, kube::Error> {
    Api::<KubeControllerManager>::all(client.clone()).patch_status(CR_NAME, &PatchParams::apply(manager).force(), &Patch::Apply(status_body(status))).await
}

fn helper_manager(node: &str) -> String {
    format!("{HELPER_MANAGER_PREFIX}-{node}")
}

/// The report a helper sends, built by the helper's own code (`Report::apply_body`).
fn report(healthy: bool) -> Report {
    Report {
        applied_revision: Some("rev-1".into()),
        cert_serial: Some("0a1b".into()),
        kcm_version: Some("v1.33.13".into()),
        unit_active: true,
        healthy,
        message: Some("revision rev-1 healthy".into()),
        observed_at: Some(k8s_openapi::jiff::Timestamp::now().to_string()),
        ..Default::default()
    }
}

/// Sends `report` for `node` through `client` exactly as the helper's run loop does.
async fn send_report(client: &Client, node: &str, report: &Report) -> Result<KubeControllerManager, kube::Error> {
    Api::<KubeControllerManager>::all(client.clone())
        .patch_status(CR_NAME, &PatchParams::apply(&helper_manager(node)).force(), &Patch::Apply(report.apply_body(node)))
        .await
}

/// What the operator writes (rollout.rs): per-node targetRevision and renewAt, and the
/// top-level status fields.
fn operator_status(target: &str) -> Value {
    let renew_at = "2030-01-01T00:00:00Z";
    json!({
        "observedGeneration": 1,
        "ready": "2/2",
        "leader": B,
        "expires": "2031-01-01T00:00:00Z",
        "nextRenewal": renew_at,
        "nodes": [
            {"name": A, "targetRevision": target, "renewAt": renew_at},
            {"name": B, "targetRevision": target, "renewAt": renew_at},
        ],
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllHealthy", "message": "2/2 healthy", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
    })
}

/// The request was refused by admission policy `policy`, with a message naming it.
fn refused_by<T: std::fmt::Debug>(policy: &str, what: &str, res: Result<T, kube::Error>) -> String {
    match res {
        Err(kube::Error::Api(s)) => {
            println!("{what}: refused {} {}: {}", s.code, s.reason, s.message);
            // The apiserver names the policy ("ValidatingAdmissionPolicy '<name>' with binding
            // ... denied request: "), and so does the message of every rule.
            assert!(s.message.contains(&format!("ValidatingAdmissionPolicy '{policy}'")), "{what}: not refused by {policy}: {s:?}");
            assert!(s.message.contains(&format!("denied request: {policy}: ")), "{what}: the rule's message does not name {policy}: {s:?}");
            s.message
        }
        other => panic!("{what}: expected a refusal by {policy}, got {other:?}"),
    }
}

/// The request was refused by RBAC (403, not by an admission policy).
fn refused_by_rbac<T: std::fmt::Debug>(what: &str, res: Result<T, kube::Error>) {
    match res {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("cannot ") && !s.message.contains("ValidatingAdmissionPolicy") => {
            println!("{what}: RBAC 403: {}", s.message);
        }
        other => panic!("{what}: expected an RBAC 403, got {other:?}"),
    }
}

struct Bed {
    api: ApiServer,
    admin: Client,
    operator: Client,
    /// The helper on node A (token bound to its pod on A).
    helper_a: Client,
}

/// `fresh`, then the operator's status written and node B's helper reported (through its own
/// pod-bound token).
async fn bed() -> Bed {
    let bed = fresh().await;
    apply_status(&bed.operator, OPERATOR_MANAGER, operator_status("rev-1")).await.expect("the operator writes the status");
    let helper_b = helper_on(&bed.api, B).await;
    send_report(&helper_b, B, &report(true)).await.expect("B's helper reports its own entry");
    bed
}

/// Manifests applied, the CR created by the admin (no status yet), and the policies active.
async fn fresh() -> Bed {
    let api = ApiServer::start().await.unwrap_or_else(|e| panic!("API tier did not start: {e:#}"));
    let admin = api.client();
    apply_manifests(&admin).await;
    let cr: KubeControllerManager = serde_json::from_value(json!({
        "apiVersion": "kcm.kcm-operator.io/v1alpha1", "kind": "KubeControllerManager",
        "metadata": {"name": CR_NAME}, "spec": {"apiserverUrl": api.url()},
    }))
    .unwrap();
    Api::<KubeControllerManager>::all(admin.clone()).create(&PostParams::default(), &cr).await.expect("admin creates the CR");
    let operator = api.client_as(OPERATOR_USER, &[]);
    let helper_a = helper_on(&api, A).await;
    let (user, _, extra) = whoami(&helper_a).await.unwrap();
    assert_eq!(user, format!("system:serviceaccount:{NAMESPACE}:{HELPER_SERVICE_ACCOUNT}"));
    assert_eq!(extra.get(NODE_NAME_EXTRA), Some(&vec![A.to_string()]), "{extra:?}");

    // The policies take effect once the apiserver has loaded them: poll (bounded) until a
    // known-bad write (A's helper reporting for B) is refused. A server-side dry run, so
    // nothing is written while the policies are not active yet.
    let api_a = Api::<KubeControllerManager>::all(helper_a.clone());
    let active = e2e::apitier::poll("the admission policies to refuse a helper writing another node's entry", Duration::from_secs(30), || {
        let api_a = api_a.clone();
        async move {
            let pp = PatchParams::apply(&helper_manager(A)).force().dry_run();
            api_a.patch_status(CR_NAME, &pp, &Patch::Apply(report(false).apply_body(B))).await.err()
        }
    })
    .await
    .expect("policy active");
    refused_by(OWN_NODE, "A's helper reporting for B (activation probe, dry run)", Err::<(), _>(active));
    Bed { api, admin, operator, helper_a }
}

async fn helper_on(api: &ApiServer, node: &str) -> Client {
    let token = api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, &format!("kcm-node-helper-{node}"), node).await.expect("pod-bound token");
    api.client_with_token(&token)
}

async fn status_of(client: &Client) -> kcm_operator::api::KubeControllerManagerStatus {
    Api::<KubeControllerManager>::all(client.clone()).get(CR_NAME).await.unwrap().status.unwrap()
}

fn node<'a>(st: &'a kcm_operator::api::KubeControllerManagerStatus, name: &str) -> &'a kcm_operator::api::NodeStatus {
    st.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no status entry for {name}: {st:?}"))
}

#[tokio::test]
async fn a_helper_writes_only_its_own_report() {
    let bed = bed().await;
    let h = &bed.helper_a;
    let before = status_of(&bed.admin).await;

    // (a) Its own report, as the helper sends it: accepted; the operator's fields stay.
    send_report(h, A, &report(true)).await.expect("A's helper reports its own entry");
    // A stopping helper's last report (no observedAt) too.
    send_report(h, A, &Report { observed_at: None, ..report(true) }).await.expect("A's helper withdraws its report");
    send_report(h, A, &report(true)).await.expect("A's helper reports again");
    let st = status_of(&bed.admin).await;
    let (a, b) = (node(&st, A), node(&st, B));
    assert!(a.healthy && a.observed_at.is_some() && a.applied_revision.as_deref() == Some("rev-1"), "{a:?}");
    assert_eq!(a.target_revision.as_deref(), Some("rev-1"), "{a:?}");
    assert_eq!(a.renew_at, node(&before, A).renew_at);
    assert_eq!(b, node(&before, B), "B's entry untouched");
    assert_eq!((st.ready.as_deref(), st.leader.as_deref()), (Some("2/2"), Some(B)));

    // (b) Another node's entry: changed, added, or removed.
    let msg = refused_by(OWN_NODE, "A reports for B", send_report(h, B, &report(false)).await);
    assert!(msg.contains(&format!("(node {A})")) && msg.contains(B), "{msg}");
    refused_by(OWN_NODE, "A adds an entry for a third node", send_report(h, "k8smaster03", &report(true)).await);
    let mut two = report(true).apply_body(A);
    two["status"]["nodes"].as_array_mut().unwrap().push(json!({"name": B, "healthy": false}));
    let res = Api::<KubeControllerManager>::all(h.clone()).patch_status(CR_NAME, &PatchParams::apply(&helper_manager(A)).force(), &Patch::Apply(two)).await;
    refused_by(OWN_NODE, "A reports for itself and B in one apply", res);
    // A merge patch replaces the whole list: B's entry would go.
    let merge = json!({"status": {"nodes": [{"name": A, "healthy": true}]}});
    let res = Api::<KubeControllerManager>::all(h.clone()).patch_status(CR_NAME, &PatchParams::default(), &Patch::Merge(&merge)).await;
    refused_by(OWN_NODE, "A drops B's entry (merge patch)", res);
    // Its own entry's operator-owned fields.
    for (field, value) in [("targetRevision", "rev-2"), ("renewAt", "2020-01-01T00:00:00Z")] {
        let mut body = report(true).apply_body(A);
        body["status"]["nodes"][0][field] = json!(value);
        let res = Api::<KubeControllerManager>::all(h.clone()).patch_status(CR_NAME, &PatchParams::apply(&helper_manager(A)).force(), &Patch::Apply(body)).await;
        let msg = refused_by(OWN_NODE, &format!("A sets its own {field}"), res);
        assert!(msg.contains("targetRevision and renewAt"), "{msg}");
    }
    // The top-level status.
    for (field, value) in [
        ("ready", json!("0/2")),
        ("leader", json!(A)),
        ("observedGeneration", json!(7)),
        ("nextRenewal", json!("2020-01-01T00:00:00Z")),
        ("conditions", json!([{"type": "Ready", "status": "False", "reason": "Forged", "message": "x", "lastTransitionTime": "2025-01-01T00:00:00Z"}])),
    ] {
        let mut body = report(true).apply_body(A);
        body["status"][field] = value;
        let res = Api::<KubeControllerManager>::all(h.clone()).patch_status(CR_NAME, &PatchParams::apply(&helper_manager(A)).force(), &Patch::Apply(body)).await;
        let msg = refused_by(OWN_NODE, &format!("A sets status.{field}"), res);
        assert!(msg.contains("not status.observedGeneration"), "{msg}");
    }
    // The spec, the object, the status by PUT: RBAC refuses first (the helper has get on the
    // CR and patch on its status only); the policy would refuse them too.
    let api = Api::<KubeControllerManager>::all(h.clone());
    refused_by_rbac("A patches the CR's spec", api.patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"paused": true}}))).await);
    refused_by_rbac("A deletes the CR", api.delete(CR_NAME, &Default::default()).await);
    let current = api.get(CR_NAME).await.unwrap();
    refused_by_rbac("A replaces the status (PUT)", api.replace_status(CR_NAME, &PostParams::default(), &current).await);
    refused_by_rbac("A lists the CRs", api.list(&Default::default()).await);
    let after = status_of(&bed.admin).await;
    assert_eq!(node(&after, B), node(&before, B), "every refused write left B's entry alone");
    assert_eq!(node(&after, A).target_revision.as_deref(), Some("rev-1"));

    // The operator and the admin are not held to a node.
    apply_status(&bed.operator, OPERATOR_MANAGER, operator_status("rev-2")).await.expect("the operator sets every targetRevision");
    let st = status_of(&bed.admin).await;
    assert!(st.nodes.iter().all(|n| n.target_revision.as_deref() == Some("rev-2")), "{st:?}");
    send_report(&bed.admin, B, &report(false)).await.expect("the admin writes B's entry");
    let merge = json!({"status": {"ready": "1/2"}});
    Api::<KubeControllerManager>::all(bed.admin.clone()).patch_status(CR_NAME, &PatchParams::default(), &Patch::Merge(&merge)).await.expect("the admin writes status.ready");
    Api::<KubeControllerManager>::all(bed.admin.clone())
        .patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"paused": true}})))
        .await
        .expect("the admin writes the spec");
    assert!(!node(&status_of(&bed.admin).await, B).healthy);
}

/// A helper may report before the operator wrote any status (a fresh install): its new entry
/// goes, without targetRevision or renewAt; and the operator's first status still goes after.
#[tokio::test]
async fn a_helper_reports_before_the_operator_wrote_any_status() {
    let bed = fresh().await;
    assert!(Api::<KubeControllerManager>::all(bed.admin.clone()).get(CR_NAME).await.unwrap().status.is_none(), "no status yet");
    for field in ["targetRevision", "renewAt"] {
        let mut body = report(true).apply_body(A);
        body["status"]["nodes"][0][field] = json!("2030-01-01T00:00:00Z");
        let res = Api::<KubeControllerManager>::all(bed.helper_a.clone()).patch_status(CR_NAME, &PatchParams::apply(&helper_manager(A)).force(), &Patch::Apply(body)).await;
        refused_by(OWN_NODE, &format!("A's first report sets its {field}"), res);
    }
    send_report(&bed.helper_a, A, &report(true)).await.expect("A's first report");
    let st = status_of(&bed.admin).await;
    assert_eq!(st.nodes.len(), 1, "{st:?}");
    assert!(node(&st, A).healthy && node(&st, A).target_revision.is_none(), "{st:?}");
    apply_status(&bed.operator, OPERATOR_MANAGER, operator_status("rev-1")).await.expect("the operator's first status");
    let st = status_of(&bed.admin).await;
    assert!(node(&st, A).healthy, "the operator's apply keeps A's report: {st:?}");
    assert_eq!(node(&st, A).target_revision.as_deref(), Some("rev-1"));
}

/// kcm's Lease as kcm writes it (client-go leader election), with `holder`.
async fn set_kcm_lease(admin: &Client, holder: &str) -> Lease {
    let api = Api::<Lease>::namespaced(admin.clone(), KCM_LEASE.0);
    let now = k8s_openapi::jiff::Timestamp::now();
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": KCM_LEASE.1, "namespace": KCM_LEASE.0},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 3,
                 "acquireTime": now.to_string(), "renewTime": now.to_string()},
    }))
    .unwrap();
    api.patch(KCM_LEASE.1, &PatchParams::apply("kube-controller-manager").force(), &Patch::Apply(&lease)).await.expect("kcm (the admin) writes its Lease")
}

fn with_holder(mut lease: Lease, holder: &str) -> Lease {
    lease.spec.as_mut().unwrap().holder_identity = Some(holder.into());
    lease
}

#[tokio::test]
async fn a_helper_only_releases_kcms_lease_held_on_its_own_node() {
    let bed = bed().await;
    let leases = Api::<Lease>::namespaced(bed.helper_a.clone(), KCM_LEASE.0);
    let b_holder = format!("{B}_4b1c2a3e-0000-4000-8000-000000000002");
    let a_holder = format!("{A}_4b1c2a3e-0000-4000-8000-000000000001");

    // Held by B: A's helper may not release it (the fence's own release, forced past its check
    // by naming B's holder), nor take it.
    let held = set_kcm_lease(&bed.admin, &b_holder).await;
    let res = node_helper::fence::release(&leases, held.clone(), &b_holder).await;
    let msg = refused_by(LEASE_RELEASE, "A releases B's lease", res);
    assert!(msg.contains(&b_holder) && msg.contains(A), "{msg}");
    let res = leases.replace(KCM_LEASE.1, &PostParams::default(), &with_holder(held.clone(), &a_holder)).await;
    refused_by(LEASE_RELEASE, "A takes B's lease", res);

    // Held by A: a holder may not be set (to A's other identity or to B), only cleared.
    let held = set_kcm_lease(&bed.admin, &a_holder).await;
    for to in [format!("{A}_other"), b_holder.clone()] {
        let res = leases.replace(KCM_LEASE.1, &PostParams::default(), &with_holder(held.clone(), &to)).await;
        let msg = refused_by(LEASE_RELEASE, &format!("A hands its lease to {to}"), res);
        assert!(msg.contains("only clear the holder"), "{msg}");
    }
    // Nor anything else changed with the release.
    let mut labelled = with_holder(held.clone(), "");
    labelled.metadata.labels = Some([("forged".to_string(), "yes".to_string())].into());
    refused_by(LEASE_RELEASE, "A releases and labels its lease", leases.replace(KCM_LEASE.1, &PostParams::default(), &labelled).await);
    let mut transitions = with_holder(held.clone(), "");
    transitions.spec.as_mut().unwrap().lease_transitions = Some(0);
    refused_by(LEASE_RELEASE, "A releases and resets leaseTransitions", leases.replace(KCM_LEASE.1, &PostParams::default(), &transitions).await);
    // Other Leases: RBAC.
    refused_by_rbac("A creates a Lease in kube-system", leases.create(&PostParams::default(), &with_holder(Lease { metadata: kube::api::ObjectMeta { name: Some("other".into()), ..Default::default() }, spec: held.spec.clone() }, &a_holder)).await);
    refused_by_rbac("A deletes kcm's Lease", leases.delete(KCM_LEASE.1, &Default::default()).await);
    refused_by_rbac("A patches kcm's Lease", leases.patch(KCM_LEASE.1, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"holderIdentity": ""}}))).await);

    // (c) The fence's release of A's own holder: accepted.
    let released = node_helper::fence::release(&leases, held, &a_holder).await.expect("A releases its own lease");
    assert!(released, "the release found the Lease changed");
    let now = Api::<Lease>::namespaced(bed.admin.clone(), KCM_LEASE.0).get(KCM_LEASE.1).await.unwrap();
    let spec = now.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(""));
    assert_eq!(spec.lease_transitions, Some(3));
    // An empty Lease is nobody's: releasing it again is refused.
    let res = leases.replace(KCM_LEASE.1, &PostParams::default(), &now).await;
    refused_by(LEASE_RELEASE, "A updates the released lease", res);

    // The admin (and kcm, which is not the helper) may set any holder.
    set_kcm_lease(&bed.admin, &b_holder).await;
}

/// A token for the helper's ServiceAccount that is not bound to a pod (so it carries no node
/// name): bound to a Secret when `secret` is given, else unbound.
async fn token_without_node(admin: &Client, secret: Option<&str>) -> String {
    let bound = match secret {
        Some(name) => {
            let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}})).unwrap();
            let s = Api::<Secret>::namespaced(admin.clone(), NAMESPACE).create(&PostParams::default(), &s).await.unwrap();
            json!({"apiVersion": "v1", "kind": "Secret", "name": name, "uid": s.metadata.uid})
        }
        None => Value::Null,
    };
    let mut spec = json!({"audiences": [], "expirationSeconds": 3600});
    if !bound.is_null() {
        spec["boundObjectRef"] = bound;
    }
    let tr: TokenRequest = serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "metadata": {}, "spec": spec})).unwrap();
    let tr = Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE).create_token_request(HELPER_SERVICE_ACCOUNT, &PostParams::default(), &tr).await.unwrap();
    tr.status.unwrap().token
}

#[tokio::test]
async fn a_helper_token_without_a_node_name_writes_nothing() {
    let bed = bed().await;
    let a_holder = format!("{A}_4b1c2a3e-0000-4000-8000-000000000001");
    for (kind, secret) in [("secret-bound", Some("kcm-node-helper-token-test")), ("unbound", None)] {
        let token = token_without_node(&bed.admin, secret).await;
        let client = bed.api.client_with_token(&token);
        let (user, _, extra) = whoami(&client).await.unwrap();
        println!("{kind} token: user {user} extra {extra:?}");
        assert_eq!(user, format!("system:serviceaccount:{NAMESPACE}:{HELPER_SERVICE_ACCOUNT}"));
        assert!(!extra.contains_key(NODE_NAME_EXTRA), "{extra:?}");
        let msg = refused_by(OWN_NODE, &format!("{kind} token reports for A"), send_report(&client, A, &report(true)).await);
        assert!(msg.contains("names no single node"), "{msg}");
        let held = set_kcm_lease(&bed.admin, &a_holder).await;
        let res = node_helper::fence::release(&Api::namespaced(client.clone(), KCM_LEASE.0), held, &a_holder).await;
        let msg = refused_by(LEASE_RELEASE, &format!("{kind} token releases A's lease"), res);
        assert!(msg.contains("names no single node"), "{msg}");
    }
}

/// RBAC stops most writes before admission; the policies hold on their own. With the helper's
/// RBAC broadened (as a careless edit might), it still writes nothing but its own report and
/// the release of its own node's Lease; the status by PUT (update) is held like a patch.
#[tokio::test]
async fn the_policies_hold_where_rbac_would_allow_more() {
    let bed = bed().await;
    let broad = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "test-broad-helper"},
        "rules": [
            {"apiGroups": ["kcm.kcm-operator.io"], "resources": ["kubecontrollermanagers", "kubecontrollermanagers/status"], "verbs": ["*"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
        ],
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "test-broad-helper"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-broad-helper"},
        "subjects": [{"kind": "ServiceAccount", "name": HELPER_SERVICE_ACCOUNT, "namespace": NAMESPACE}],
    });
    e2e::apitier::apply_yaml(&bed.admin, &format!("{}\n---\n{}", serde_yaml::to_string(&broad).unwrap(), serde_yaml::to_string(&binding).unwrap())).await.unwrap();
    let api = Api::<KubeControllerManager>::all(bed.helper_a.clone());
    e2e::apitier::wait_for("the broadened RBAC to let the helper list", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.list(&Default::default()).await.is_ok() }
    })
    .await;

    let spec_patch = Patch::Merge(json!({"spec": {"paused": true}}));
    let msg = refused_by(OWN_NODE, "A patches the CR's spec", api.patch(CR_NAME, &PatchParams::default(), &spec_patch).await);
    assert!(msg.contains("only update the status subresource") && msg.contains("UPDATE the object"), "{msg}");
    refused_by(OWN_NODE, "A deletes the CR", api.delete(CR_NAME, &Default::default()).await);
    // PUT of the status (as read, untyped: every field kept): its own report goes, another
    // node's entry does not.
    let raw = Api::<DynamicObject>::all_with(bed.helper_a.clone(), &ApiResource::erase::<KubeControllerManager>(&()));
    let put_healthy = |of: &'static str| {
        let raw = raw.clone();
        async move {
            let mut current = raw.get(CR_NAME).await.unwrap();
            let nodes = current.data["status"]["nodes"].as_array_mut().unwrap();
            nodes.iter_mut().find(|n| n["name"] == of).unwrap()["healthy"] = json!(false);
            raw.replace_status(CR_NAME, &PostParams::default(), &current).await
        }
    };
    put_healthy(A).await.expect("A replaces the status with its own report changed");
    assert!(!node(&status_of(&bed.admin).await, A).healthy);
    refused_by(OWN_NODE, "A replaces the status with B's entry changed", put_healthy(B).await);
    assert!(node(&status_of(&bed.admin).await, B).healthy, "B's entry untouched");

    // Leases: no other Lease, no create or delete; a patch clearing its own holder is a release.
    let leases = Api::<Lease>::namespaced(bed.helper_a.clone(), KCM_LEASE.0);
    let a_holder = format!("{A}_4b1c2a3e-0000-4000-8000-000000000001");
    let held = set_kcm_lease(&bed.admin, &a_holder).await;
    let other = Lease { metadata: kube::api::ObjectMeta { name: Some("other".into()), ..Default::default() }, spec: held.spec.clone() };
    let msg = refused_by(LEASE_RELEASE, "A creates another Lease", leases.create(&PostParams::default(), &other).await);
    assert!(msg.contains("not CREATE Lease kube-system/other"), "{msg}");
    let generated = Lease { metadata: kube::api::ObjectMeta { generate_name: Some("other-".into()), ..Default::default() }, spec: held.spec.clone() };
    refused_by(LEASE_RELEASE, "A creates a Lease with a generated name", leases.create(&PostParams::default(), &generated).await);
    refused_by(LEASE_RELEASE, "A deletes kcm's Lease", leases.delete(KCM_LEASE.1, &Default::default()).await);
    let take = Patch::Merge(json!({"spec": {"holderIdentity": format!("{B}_x")}}));
    refused_by(LEASE_RELEASE, "A hands kcm's Lease to B (merge patch)", leases.patch(KCM_LEASE.1, &PatchParams::default(), &take).await);
    let clear = Patch::Merge(json!({"spec": {"holderIdentity": ""}}));
    leases.patch(KCM_LEASE.1, &PatchParams::default(), &clear).await.expect("A clears its own holder (merge patch)");
}

/// The apiserver type-checks both policies against the types they match (the CRD, Lease)
/// without a warning (a misspelt field, a wrong type).
#[tokio::test]
async fn the_policies_type_check_without_warnings() {
    use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
    let api = ApiServer::start().await.unwrap_or_else(|e| panic!("API tier did not start: {e:#}"));
    let admin = api.client();
    apply_manifests(&admin).await;
    // The CRD's schema must be published first: a policy checked before that is checked
    // against no type at all (and passes).
    e2e::apitier::wait_for("the CRD's OpenAPI v3 schema", Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            let req = http::Request::get("/openapi/v3/apis/kcm.kcm-operator.io/v1alpha1").body(Vec::new()).unwrap();
            admin.request_text(req).await.is_ok_and(|t| t.contains(".v1alpha1.KubeControllerManager\""))
        }
    })
    .await;
    // The type checks are written by kube-controller-manager's status controller: run just that.
    let kcm = e2e::apitier::k8s_bin("kube-controller-manager").expect("kube-controller-manager binary");
    let log = api.dir().join("kcm-vap-status.log");
    let _kcm = tokio::process::Command::new(kcm)
        .arg(format!("--kubeconfig={}", api.admin_kubeconfig_path().display()))
        .args(["--controllers=validatingadmissionpolicy-status-controller", "--leader-elect=false", "--secure-port=0"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start kube-controller-manager");
    let vaps = Api::<ValidatingAdmissionPolicy>::all(admin.clone());
    for name in [OWN_NODE, LEASE_RELEASE] {
        let checked = e2e::apitier::poll(&format!("type checking of {name}"), Duration::from_secs(60), || {
            let vaps = vaps.clone();
            async move {
                let p = vaps.get(name).await.ok()?;
                let st = p.status?;
                (st.observed_generation == p.metadata.generation).then_some(st.type_checking?)
            }
        })
        .await
        .unwrap_or_else(|| panic!("{name} was not type-checked; kube-controller-manager log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        let warnings = checked.expression_warnings.unwrap_or_default();
        println!("{name}: {} type-checking warnings", warnings.len());
        assert!(warnings.is_empty(), "{name}: {warnings:#?}");
    }
}

/// Every top-level status field but `nodes` is one the own-node policy keeps unchanged: a
/// field added to KubeControllerManagerStatus must be added to admission.yaml too.
#[test]
fn the_own_node_policy_names_every_top_level_status_field() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(KubeControllerManager::crd()).unwrap();
    let props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"].as_object().unwrap().clone();
    let text = std::fs::read_to_string(base().join("admission.yaml")).unwrap();
    let mut missing: Vec<&String> = props.keys().filter(|k| *k != "nodes" && !text.contains(&format!("oldObject.?status.?{k}"))).collect();
    missing.sort();
    assert!(missing.is_empty(), "status fields the own-node policy does not keep unchanged: {missing:?}");
    assert!(props.contains_key("nodes") && props.len() > 1, "{props:?}");
}

/// The own-node policy compares the entries of status.nodes pairwise. At the schema's bound
/// (maxItems), with every entry full, a helper's report is still judged within the apiserver's
/// CEL cost budget: accepted for its own entry, refused (by the rule, not a cost error) for
/// another node's.
#[tokio::test]
async fn a_full_status_is_judged_within_the_cost_budget() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(KubeControllerManager::crd()).unwrap();
    let max = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["nodes"]["maxItems"].as_u64().expect("status.nodes has maxItems");
    let bed = bed().await;
    let names: Vec<String> = (0..max).map(|i| match i {
        0 => A.to_string(),
        1 => B.to_string(),
        i => format!("k8smaster{i:03}"),
    })
    .collect();
    let entry = |name: &str| {
        let mut e = report(true).apply_body(name)["status"]["nodes"][0].clone();
        e["message"] = json!(format!("{} {name}", "m".repeat(1000)));
        e["warnings"] = json!(["w".repeat(200), "v".repeat(200), "u".repeat(200)]);
        e["drift"] = json!(["d".repeat(200)]);
        e["fileHashes"] = json!({"/etc/kubernetes/a": "0".repeat(64), "/etc/kubernetes/b": "1".repeat(64), "/etc/kubernetes/c": "2".repeat(64), "/etc/systemd/system/d": "3".repeat(64)});
        e["targetRevision"] = json!("rev-1");
        e["renewAt"] = json!("2030-01-01T00:00:00Z");
        e
    };
    let mut st = operator_status("rev-1");
    st["nodes"] = json!(names.iter().map(|n| entry(n)).collect::<Vec<_>>());
    apply_status(&bed.admin, "e2e", st).await.expect("the admin writes a full status");

    let t = std::time::Instant::now();
    send_report(&bed.helper_a, A, &report(true)).await.expect("A reports with every entry full");
    println!("{max} full entries: A's report accepted in {:?}", t.elapsed());
    let msg = refused_by(OWN_NODE, "A reports for B with every entry full", send_report(&bed.helper_a, B, &report(false)).await);
    assert!(msg.contains("not the entries of k8smaster02"), "{msg}");
    let mut over = serde_json::to_value(status_of(&bed.admin).await).unwrap();
    over["nodes"].as_array_mut().unwrap().push(entry("k8smaster999"));
    match apply_status(&bed.admin, "e2e", over).await {
        Err(kube::Error::Api(s)) if s.message.contains("status.nodes") => println!("{} entries refused by the schema: {}", max + 1, s.message),
        other => panic!("expected the schema to refuse {} entries, got {other:?}", max + 1),
    }
}
