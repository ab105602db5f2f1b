//! Issue 8 on the API tier (real etcd + kube-apiserver): the helper writes only its own
//! master's KcmNode status and may only clear its own master's holder of kcm's Lease. RBAC
//! (manifests/base/rbac.yaml) refuses everything else first; the policies
//! (manifests/base/admission.yaml) refuse what RBAC lets through, and — with the helper given
//! broad rights on purpose — everything else too, each refusal naming its policy.

use std::path::Path;
use std::time::Duration;

use e2e::apitier::{apply_yaml, ApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use kcm_operator::api::{KcmNode, KcmNodeSpec, KubeControllerManager, Revision, HELPER_SERVICE_ACCOUNT, NAMESPACE};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const OWN: &str = "kcm-node-helper-own-kcmnode";
const LEASE: &str = "kcm-node-helper-kcm-lease";

async fn apply(client: &kube::Client, file: &str) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base").join(file)).unwrap();
    apply_yaml(client, &text).await.unwrap_or_else(|e| panic!("applying {file}: {e:#}"));
}

fn status_body(node: &str, status: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "kcm.kcm-operator.io/v1alpha1", "kind": "KcmNode", "metadata": {"name": node}, "status": status})
}

/// The helper's own report: server-side apply of its KcmNode's status.
async fn report(helper: &kube::Client, node: &str, status: serde_json::Value) -> Result<(), String> {
    let pp = PatchParams::apply(&format!("kcm-node-helper-{node}")).force();
    Api::<KcmNode>::all(helper.clone()).patch_status(node, &pp, &Patch::Apply(status_body(node, status))).await.map(|_| ()).map_err(|e| e.to_string())
}

/// kcm's Lease as `holder` left it, then `who` replaces it with `new_holder`.
async fn set_lease(admin: &kube::Client, who: &kube::Client, holder: &str, new_holder: &str) -> Result<(), String> {
    let api = Api::<Lease>::namespaced(admin.clone(), "kube-system");
    let mut lease = api.get("kube-controller-manager").await.unwrap();
    lease.spec.get_or_insert_with(Default::default).holder_identity = Some(holder.into());
    let lease = api.replace("kube-controller-manager", &PostParams::default(), &lease).await.unwrap();
    let mut next = lease.clone();
    next.spec.as_mut().unwrap().holder_identity = Some(new_holder.into());
    Api::<Lease>::namespaced(who.clone(), "kube-system")
        .replace("kube-controller-manager", &PostParams::default(), &next)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn refused(what: &str, r: Result<(), String>, by: &str) {
    match r {
        Ok(()) => panic!("{what}: allowed, expected a refusal by {by}"),
        Err(e) => {
            println!("{what}: refused: {e}");
            assert!(e.contains(by), "{what}: the refusal names {by}: {e}");
        }
    }
}

#[tokio::test]
async fn a_helper_writes_only_its_own_kcm_node_and_releases_only_its_own_lease_holder() {
    let api = ApiServer::start().await.expect("API tier starts");
    let admin = api.client();
    for f in ["namespace.yaml", "crd.yaml", "rbac.yaml"] {
        apply(&admin, f).await;
    }
    e2e::apitier::wait_for("CRDs served", Duration::from_secs(30), || async {
        Api::<KcmNode>::all(admin.clone()).list(&Default::default()).await.is_ok()
            && Api::<KubeControllerManager>::all(admin.clone()).list(&Default::default()).await.is_ok()
    })
    .await;
    let cr: KubeControllerManager = serde_json::from_value(json!({"apiVersion": "kcm.kcm-operator.io/v1alpha1", "kind": "KubeControllerManager",
        "metadata": {"name": "kube-controller-manager"}, "spec": {"apiserverUrl": "https://127.0.0.1:6443"}}))
    .unwrap();
    Api::<KubeControllerManager>::all(admin.clone()).create(&PostParams::default(), &cr).await.unwrap();
    apply(&admin, "admission.yaml").await;
    // Two masters, a helper pod on each, pod-bound tokens; their KcmNodes as the operator makes them.
    let a = api.client_with_token(&api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, "helper-a", "m1").await.unwrap());
    let b = api.client_with_token(&api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, "helper-b", "m2").await.unwrap());
    let operator = api.client_as("kcm-operator", &[]);
    for n in ["m1", "m2"] {
        let obj = KcmNode::new(n, KcmNodeSpec { target_revision: Some(Revision::apply("abc123")), renew_at: None });
        Api::<KcmNode>::all(operator.clone())
            .patch(n, &PatchParams::apply("kcm-operator").force(), &Patch::Apply(&obj))
            .await
            .expect("the operator writes KcmNode specs");
    }
    let lease: Lease = serde_json::from_value(
        json!({"metadata": {"name": "kube-controller-manager", "namespace": "kube-system"}, "spec": {"holderIdentity": "m2_0000", "leaseDurationSeconds": 15}}),
    )
    .unwrap();
    Api::<Lease>::namespaced(admin.clone(), "kube-system").create(&PostParams::default(), &lease).await.unwrap();
    // Policies take a moment to be enforced after they are created.
    let active = e2e::apitier::poll("the policies enforced", Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            let r = report(&a, "m2", json!({"healthy": true})).await;
            eprintln!("waiting for the policies: m1's helper writing m2's report: {r:?}");
            r.err().filter(|e| e.contains(OWN))
        }
    })
    .await;
    assert!(active.is_some(), "{OWN} never refused a helper writing another master's KcmNode");
    // Each policy is enforced on its own schedule: wait for the Lease one too (CI saw the
    // first enforced and the second not yet). set_lease puts the holder back each try.
    let active = e2e::apitier::poll("the Lease policy enforced", Duration::from_secs(30), || {
        let (a, admin) = (a.clone(), admin.clone());
        async move { set_lease(&admin, &a, "m2_0000", "").await.err().filter(|e| e.contains(LEASE)) }
    })
    .await;
    assert!(active.is_some(), "{LEASE} never refused a helper releasing another master's holder");

    // Allowed: its own report, and clearing its own master's holder.
    report(&a, "m1", json!({"healthy": true, "appliedRevision": "abc123", "observedAt": "2026-11-26T00:00:00Z"}))
        .await
        .expect("the helper reports on its own KcmNode");
    set_lease(&admin, &a, "m1_1111", "").await.expect("the helper on m1 clears m1's holder");
    // Refused by the policies.
    refused("m1's helper writes m2's KcmNode status", report(&a, "m2", json!({"healthy": false})).await, OWN);
    refused("m1's helper releases m2's holder", set_lease(&admin, &a, "m2_0000", "").await, LEASE);
    refused("m1's helper pins itself as holder", set_lease(&admin, &a, "m1_1111", "m1_2222").await, LEASE);
    refused("m1's helper takes an empty Lease", set_lease(&admin, &a, "", "m1_2222").await, LEASE);
    // A token of the helper's ServiceAccount without a node (not pod-bound).
    let unbound = {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let tr: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).unwrap();
        let tr = Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE)
            .create_token_request(HELPER_SERVICE_ACCOUNT, &PostParams::default(), &tr)
            .await
            .unwrap();
        api.client_with_token(&tr.status.unwrap().token)
    };
    refused("an unbound helper token reports", report(&unbound, "m1", json!({"healthy": true})).await, OWN);
    // Refused by RBAC first: a KcmNode's spec, the CR.
    let spec_patch = json!({"spec": {"targetRevision": "abc123/repair-1"}});
    let r = Api::<KcmNode>::all(a.clone()).patch("m1", &PatchParams::default(), &Patch::Merge(&spec_patch)).await.map(|_| ()).map_err(|e| e.to_string());
    refused("m1's helper writes its KcmNode's spec (RBAC)", r, "forbidden");
    // With broad rights given to the helper's ServiceAccount on purpose, the policies still hold.
    let grant = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "test-helper-too-broad"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": HELPER_SERVICE_ACCOUNT, "namespace": NAMESPACE}]});
    apply_yaml(&admin, &serde_yaml::to_string(&grant).unwrap()).await.unwrap();
    let broad = e2e::apitier::poll("the broad grant in effect", Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            let r = Api::<KcmNode>::all(a).patch("m1", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"targetRevision": "abc123/repair-1"}}))).await;
            r.err().map(|e| e.to_string()).filter(|e| e.contains(OWN))
        }
    })
    .await;
    println!("m1's helper writes its KcmNode's spec (cluster-admin): refused: {broad:?}");
    assert!(broad.is_some(), "{OWN} refuses a KcmNode spec write by a helper with broad rights");
    let cr_patch = json!({"spec": {"paused": true}});
    let r = Api::<KubeControllerManager>::all(a.clone())
        .patch("kube-controller-manager", &PatchParams::default(), &Patch::Merge(&cr_patch))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    refused("m1's helper writes the CR (cluster-admin)", r, OWN);
    let r = Api::<KcmNode>::all(a.clone()).delete("m2", &Default::default()).await.map(|_| ()).map_err(|e| e.to_string());
    refused("m1's helper deletes m2's KcmNode (cluster-admin)", r, OWN);
    // Admins and the operator are not matched.
    Api::<KcmNode>::all(admin.clone()).patch("m2", &PatchParams::default(), &Patch::Merge(&spec_patch)).await.expect("the admin writes a KcmNode spec");
    set_lease(&admin, &admin, "m2_0000", "").await.expect("the admin releases any holder");
    report(&b, "m2", json!({"healthy": true})).await.expect("m2's helper reports on its own KcmNode");
}
