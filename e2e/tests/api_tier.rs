//! API tier self-tests: a real etcd + kube-apiserver per test (no kubelet).
//! CSR approval, RBAC for minted client certs, pod-bound ServiceAccount
//! tokens carrying the node name, and the counting client of
//! `kcm_operator::apicount` against real requests.

use std::time::Instant;

use e2e::apitier::{k8s_bin, whoami, ApiServer};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};

async fn start() -> ApiServer {
    let t = Instant::now();
    let api = ApiServer::start().await.unwrap_or_else(|e| panic!("API tier did not start: {e:#}"));
    println!("apiserver {} up in {:.1}s", api.url(), t.elapsed().as_secs_f64());
    api
}

#[tokio::test]
async fn csr_is_approved_through_the_approval_subresource() {
    let api = start().await;
    let admin = api.client();

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "csr-test-user");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "csr-test-group");
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();

    let csrs: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": "apitier-csr"},
        "spec": {
            "request": base64_std(pem.as_bytes()),
            "signerName": "kubernetes.io/kube-apiserver-client",
            "usages": ["digital signature", "client auth"],
            "expirationSeconds": 3600,
        },
    }))
    .unwrap();
    let created = csrs.create(&PostParams::default(), &csr).await.expect("create CSR");
    println!("created CSR, spec.username={:?} groups={:?}", created.spec.username, created.spec.groups);
    assert_eq!(created.spec.username.as_deref(), Some("kcm-test-admin"), "apiserver records the requestor");

    let approval = serde_json::json!({"status": {"conditions": [{
        "type": "Approved",
        "status": "True",
        "reason": "ApiTierTest",
        "message": "approved by e2e/tests/api_tier.rs",
    }]}});
    csrs.patch_approval("apitier-csr", &PatchParams::default(), &Patch::Merge(&approval)).await.expect("patch /approval");

    let got = csrs.get("apitier-csr").await.expect("get CSR");
    let conds = got.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    println!("CSR conditions after approval: {conds:?}");
    let approved = conds.iter().find(|c| c.type_ == "Approved");
    assert!(approved.is_some_and(|c| c.status == "True" && c.reason.as_deref() == Some("ApiTierTest")), "no Approved=True condition; observed {conds:?}");
    // Nothing signs it (no kube-controller-manager): no certificate yet.
    assert!(got.status.as_ref().and_then(|s| s.certificate.as_ref()).is_none());
}

#[tokio::test]
async fn rbac_denies_an_unbound_user_and_allows_the_admin() {
    let api = start().await;

    let nobody = api.client_as("nobody", &[]);
    let (user, groups, _) = whoami(&nobody).await.expect("whoami as nobody");
    println!("nobody is seen as user={user} groups={groups:?}");
    assert_eq!(user, "nobody");
    assert_eq!(groups, ["system:authenticated"]);
    match Api::<Node>::all(nobody).list(&Default::default()).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            println!("nobody listing nodes: 403 {} / {}", status.reason, status.message);
            assert_eq!(status.reason, "Forbidden", "{status:?}");
        }
        other => panic!("expected 403 Forbidden for nobody listing nodes, got {other:?}"),
    }

    let admin = api.client();
    let (user, groups, _) = whoami(&admin).await.expect("whoami as admin");
    println!("admin is seen as user={user} groups={groups:?}");
    assert_eq!(user, "kcm-test-admin");
    assert!(groups.iter().any(|g| g == "system:masters"), "{groups:?}");
    let nodes = Api::<Node>::all(admin).list(&Default::default()).await.expect("admin lists nodes");
    println!("admin listed {} nodes", nodes.items.len());

    // Several O= RDNs become several groups; system:masters among them grants access.
    let multi = api.client_as("multi", &["team-a", "team-b", "system:masters"]);
    let (user, groups, _) = whoami(&multi).await.expect("whoami as multi");
    println!("multi is seen as user={user} groups={groups:?}");
    assert_eq!(user, "multi");
    assert_eq!(groups, ["team-a", "team-b", "system:masters", "system:authenticated"]);
    Api::<Node>::all(multi).list(&Default::default()).await.expect("system:masters member lists nodes");

    // The admin kubeconfig works for other processes (kubectl).
    if let Ok(kubectl) = k8s_bin("kubectl") {
        let out = std::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(api.admin_kubeconfig_path())
            .args(["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"])
            .output()
            .expect("run kubectl");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("kubectl auth whoami: {text}");
        assert!(out.status.success() && text.trim() == "kcm-test-admin", "kubectl auth whoami: {text}");
    }
}

#[tokio::test]
async fn pod_bound_service_account_token_carries_the_node_name() {
    let api = start().await;
    let (ns, sa, pod, node) = ("kcm-system", "kcm-node-helper", "kcm-node-helper-abcde", "k8smaster01");
    let token = api.bound_sa_token(ns, sa, pod, node).await.unwrap_or_else(|e| panic!("bound_sa_token: {e:#}"));

    let node_obj = Api::<Node>::all(api.client()).get(node).await.expect("node exists");
    let addrs = node_obj.status.and_then(|s| s.addresses).unwrap_or_default();
    println!("node {node} labels={:?} addresses={addrs:?}", node_obj.metadata.labels);
    assert!(addrs.iter().any(|a| a.type_ == "InternalIP" && a.address == "127.0.0.1"), "{addrs:?}");
    assert!(addrs.iter().any(|a| a.type_ == "Hostname" && a.address == node), "{addrs:?}");

    let (user, groups, extra) = whoami(&api.client_with_token(&token)).await.expect("whoami with SA token");
    println!("token is seen as user={user} groups={groups:?} extra={extra:?}");
    assert_eq!(user, format!("system:serviceaccount:{ns}:{sa}"));
    assert!(groups.iter().any(|g| g == &format!("system:serviceaccounts:{ns}")), "{groups:?}");
    assert_eq!(extra.get("authentication.kubernetes.io/node-name"), Some(&vec![node.to_string()]), "extra: {extra:?}");
    assert_eq!(extra.get("authentication.kubernetes.io/pod-name"), Some(&vec![pod.to_string()]), "extra: {extra:?}");

    // Idempotent: a second call reuses the objects and mints another valid token.
    let again = api.bound_sa_token(ns, sa, pod, node).await.unwrap_or_else(|e| panic!("second bound_sa_token: {e:#}"));
    let (user2, _, extra2) = whoami(&api.client_with_token(&again)).await.expect("whoami with second token");
    assert_eq!(user2, user);
    assert_eq!(extra2.get("authentication.kubernetes.io/node-name"), Some(&vec![node.to_string()]));
}

#[tokio::test]
async fn counted_client_counts_each_request_by_verb_and_resource() {
    use futures::TryStreamExt;
    use k8s_openapi::api::coordination::v1::Lease;
    use kcm_operator::apicount::{counted_client, format_line, per_minute};
    use kube::api::{ListParams, WatchParams};

    let api = start().await;
    let (client, counts) = counted_client(api.admin_config().expect("admin config")).expect("counted client");
    let key = |v: &str, r: &str| (v.to_string(), r.to_string());

    // Nothing is sent while building the client.
    assert!(counts.snapshot().counts.is_empty());

    // 1 CREATE, 3 GETs of that Lease, 1 LIST of nodes, through the client
    // certificate auth and TLS of the default stack.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "apicount-test"},
        "spec": {"holderIdentity": "apicount", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.expect("create Lease");
    for _ in 0..3 {
        let got = leases.get("apicount-test").await.expect("get Lease");
        assert_eq!(got.spec.and_then(|s| s.holder_identity).as_deref(), Some("apicount"));
    }
    Api::<Node>::all(client.clone()).list(&ListParams::default()).await.expect("list nodes");
    let first = counts.snapshot();
    println!("after create/get/list: {:?}", first.counts);
    assert_eq!(
        first.counts,
        [(key("CREATE", "leases"), 1), (key("GET", "leases"), 3), (key("LIST", "nodes"), 1)].into(),
        "exactly the requests made, nothing else (no hidden discovery or retries)"
    );

    // PATCH, a WATCH (counted once when opened), a 404 (failed requests
    // count too), and a non-resource GET.
    let patch = serde_json::json!({"spec": {"holderIdentity": "apicount-2"}});
    leases.patch("apicount-test", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch Lease");
    let events: Vec<_> = leases
        .watch(&WatchParams::default().fields("metadata.name=apicount-test").timeout(1), "0")
        .await
        .expect("watch Leases")
        .try_collect()
        .await
        .expect("watch stream");
    assert!(!events.is_empty(), "the watch from resourceVersion 0 replays the Lease");
    let missing = leases.get("apicount-missing").await;
    assert!(matches!(missing, Err(kube::Error::Api(ref s)) if s.code == 404), "{missing:?}");
    let version = client.apiserver_version().await.expect("GET /version");
    println!("apiserver version {}", version.git_version);
    let second = counts.snapshot();
    println!("after patch/watch/404/version: {:?}", second.counts);
    assert_eq!(
        second.counts,
        [
            (key("CREATE", "leases"), 1),
            (key("GET", "/version"), 1),
            (key("GET", "leases"), 4),
            (key("LIST", "nodes"), 1),
            (key("PATCH", "leases"), 1),
            (key("WATCH", "leases"), 1),
        ]
        .into()
    );

    // The rate line covers only what happened between the two snapshots.
    let line = format_line(&per_minute(&first, &second));
    println!("{line}");
    for part in ["GET /version=", "GET leases=", "PATCH leases=", "WATCH leases=", " total="] {
        assert!(line.contains(part), "{part:?} missing from {line}");
    }
    assert!(!line.contains("CREATE") && !line.contains("LIST"), "{line}");
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
