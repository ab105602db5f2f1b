//! Issue 3 on the API tier (real etcd + kube-apiserver): the node-helper for one master
//! gets its CSR approved and signed by the operator's signer, writes the four files, the
//! written kubeconfig authenticates as system:kube-controller-manager, and the real
//! kube-controller-manager starts with the rendered unit and serves /healthz with the
//! written certificate. CSRs from other identities or with wrong contents are denied.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use e2e::apitier::sim::{self, Owner};
use e2e::apitier::{whoami, ApiServer, ApiServerOptions};
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::ByteString;
use kcm_operator::api::{KubeControllerManagerSpec, HELPER_DAEMONSET, HELPER_SERVICE_ACCOUNT, KCM_USER, NAMESPACE, SIGNER_NAME};
use kcm_operator::approver::{self, SignerConfig};
use kcm_operator::flags::{self, Flag, KcmVersion};
use kcm_operator::pki::{self, CertInfo, NodeIdentity};
use kube::api::{Api, ObjectMeta, PostParams};
use node_helper::host::HostFs;
use node_helper::install::{self, InstallError};

const NODE: &str = "k8smaster01";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A spec whose host paths all live under `root` (the helper's host root is `/`), for the
/// kube-controller-manager at `kcm`.
fn spec_under(root: &Path, api: &ApiServer, port: u16, kcm: &Path) -> KubeControllerManagerSpec {
    let p = |rel: &str| root.join(rel).display().to_string();
    serde_json::from_value(serde_json::json!({
        "apiserverUrl": api.url(),
        "clusterName": "kubernetes",
        "serviceClusterIpRange": "10.96.0.0/16",
        "kcm": {
            "binaryPath": kcm.display().to_string(),
            "securePort": port,
            "workingDir": p("data/k8s/k8s/kube-controller-manager"),
            // Nothing else runs here: keep kcm's controllers to a quiet few.
            "extraArgs": {"controllers": "serviceaccount-token,csrcleaner", "leader-elect": "false"}
        },
        "paths": {
            "caCert": p("etc/kubernetes/cert/ca.pem"),
            "caKey": p("etc/kubernetes/cert/ca-key.pem"),
            "requestheaderCaCert": p("etc/kubernetes/cert/ca.pem"),
            "serviceAccountKey": p("etc/kubernetes/cert/sa.key"),
            "cert": p("etc/kubernetes/cert/kube-controller-manager.pem"),
            "key": p("etc/kubernetes/cert/kube-controller-manager-key.pem"),
            "kubeconfig": p("etc/kubernetes/kube-controller-manager.kubeconfig"),
            "unit": p("etc/systemd/system/kube-controller-manager.service"),
            "staticPodManifest": ""
        }
    }))
    .unwrap()
}

struct Bed {
    api: ApiServer,
    root: tempfile::TempDir,
    helper: kube::Client,
    spec: KubeControllerManagerSpec,
    port: u16,
    _signer: tokio::task::JoinHandle<()>,
}

/// The bed on the default version's kube-apiserver and kube-controller-manager.
async fn bed() -> Bed {
    let kcm = e2e::apitier::k8s_bin("kube-controller-manager").expect("kube-controller-manager binary");
    bed_with(ApiServerOptions::default(), &kcm).await
}

/// The bed on kube-apiserver and kube-controller-manager of matrix `version`.
async fn bed_of(version: &str) -> Bed {
    let bin = |name: &str| e2e::apitier::k8s_bin_of(version, name).unwrap_or_else(|e| panic!("{e:#}"));
    bed_with(ApiServerOptions { apiserver_bin: Some(bin("kube-apiserver")), ..Default::default() }, &bin("kube-controller-manager")).await
}

async fn bed_with(opts: ApiServerOptions, kcm: &Path) -> Bed {
    let api = ApiServer::start_with(opts).await.expect("API tier starts");
    let admin = api.client();
    sim::install_base(&admin).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let spec = spec_under(root.path(), &api, port, kcm);
    // The master's CA material, where the seed keeps it.
    let certdir = root.path().join("etc/kubernetes/cert");
    std::fs::create_dir_all(&certdir).unwrap();
    std::fs::copy(api.ca_cert_path(), certdir.join("ca.pem")).unwrap();
    std::fs::copy(api.ca_key_path(), certdir.join("ca-key.pem")).unwrap();
    std::fs::copy(api.sa_key_path(), certdir.join("sa.key")).unwrap();
    sim::create_cr(&admin, spec.clone()).await.unwrap();
    let helper = sim::master_with_helper(&api, &admin, NODE).await.expect("the master and its helper").helper;
    set_steps(&admin, &[(NODE, STEP, None)]).await;
    let signer = tokio::spawn(approver::run(admin.clone(), SignerConfig::new(certdir.join("ca.pem"), certdir.join("ca-key.pem")), Default::default()));
    Bed { api, root, helper, spec, port, _signer: signer }
}

/// The operator's target revision in the bed: the step the helper's CSRs are for.
const STEP: &str = "test-rev-1";

async fn helper_pod(admin: &kube::Client, node: &str, owner: Owner) -> String {
    sim::helper_pod(admin, node, owner).await.unwrap()
}

async fn set_steps(admin: &kube::Client, steps: &[(&str, &str, Option<&str>)]) {
    sim::set_steps(admin, steps).await.unwrap()
}

fn host(bed: &Bed) -> HostFs {
    HostFs::new("/", vec![bed.root.path().to_path_buf()])
}

/// The version matrix: for each kcm version of `e2e/testbed/kcm-versions`, on the
/// kube-apiserver of the same version, the helper installs (the seed's flags fitted to that
/// binary's `--help`) and the rendered unit's command line runs and serves. Every version
/// is tried; the failures are reported together.
#[tokio::test]
async fn helper_installs_and_kcm_serves_with_the_issued_certificate() {
    let mut failed = Vec::new();
    for version in e2e::apitier::kcm_matrix() {
        println!("=== kube-controller-manager {version}");
        if let Err(e) = tokio::spawn(installs_and_serves(version)).await {
            println!("=== kube-controller-manager {version}: FAILED");
            failed.push(format!("{version}: {e}"));
        }
    }
    assert!(failed.is_empty(), "the version matrix failed for:\n{}", failed.join("\n"));
}

async fn installs_and_serves(version: &'static str) {
    let bed = bed_of(version).await;
    let done = install::install(&bed.helper, &host(&bed), &bed.spec, NODE, STEP, Duration::from_secs(60)).await.expect("install");
    println!("installed: serial {} kcm {} warnings {:?} changed {:?}", done.cert.serial_hex, done.kcm_version, done.warnings, done.changed);
    assert_eq!(done.kcm_version, version.parse().unwrap(), "the binary's --version");
    assert_eq!(done.changed.len(), 4, "{:?}", done.changed);

    let p = &bed.spec.paths;
    let mode = |f: &str| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&p.key), 0o600, "key mode");
    assert_eq!(mode(&p.cert), 0o644, "cert mode");
    let cert = CertInfo::from_pem(&std::fs::read(&p.cert).unwrap(), "written cert").unwrap();
    assert_eq!(cert.common_name.as_deref(), Some(KCM_USER));
    let id = NodeIdentity { name: NODE.into(), ips: vec!["127.0.0.1".parse().unwrap()] };
    assert_eq!(cert.sans, id.expected_sans());
    let validity = cert.not_after - cert.not_before;
    assert!((8760 * 3600..=8760 * 3600 + 600).contains(&validity), "validity {validity}s");
    let key = pki::key_from_pem(&std::fs::read_to_string(&p.key).unwrap(), "key").unwrap();
    assert!(cert.matches_key(&key));

    // The written kubeconfig authenticates as system:kube-controller-manager (SelfSubjectReview).
    let kc = kube::config::Kubeconfig::read_from(&p.kubeconfig).unwrap();
    assert!(kc.clusters[0].cluster.as_ref().unwrap().certificate_authority_data.is_some(), "CA embedded");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let as_kcm = kube::Client::try_from(cfg).unwrap();
    let (user, groups, _) = whoami(&as_kcm).await.unwrap();
    assert_eq!(user, KCM_USER);
    assert!(groups.iter().any(|g| g == KCM_USER), "{groups:?}");

    // The real kube-controller-manager starts from the unit's ExecStart and serves
    // /healthz on its secure port with the written certificate.
    let unit = std::fs::read_to_string(&p.unit).unwrap();
    let exec = unit.split("ExecStart=").nth(1).unwrap().split("\nRestart=").next().unwrap().replace("\\\n", " ");
    let words: Vec<String> = exec.split_whitespace().map(|w| w.replace("=\"\"", "=")).collect();
    let log = bed.root.path().join("kcm.log");
    let mut kcm = tokio::process::Command::new(&words[0])
        .args(&words[1..])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(bed.root.path().join("kcm.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{}/healthz", bed.port);
    let ca = p.ca_cert.clone();
    let ok = e2e::apitier::poll("kcm /healthz", Duration::from_secs(60), || {
        let (url, ca) = (url.clone(), ca.clone());
        async move {
            let out = tokio::process::Command::new("curl").args(["-sS", "--max-time", "3", "--cacert", &ca, &url]).output().await.ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "ok").then_some(())
        }
    })
    .await;
    if ok.is_none() {
        let err = std::fs::read_to_string(bed.root.path().join("kcm.err")).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        panic!("kcm never answered {url} with ok; stderr tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let served = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo | openssl s_client -connect 127.0.0.1:{} 2>/dev/null | openssl x509 -noout -serial", bed.port))
        .output()
        .await
        .unwrap();
    let served = String::from_utf8_lossy(&served.stdout).trim().trim_start_matches("serial=").to_ascii_lowercase();
    assert_eq!(served.trim_start_matches('0'), cert.serial_hex.to_ascii_lowercase().trim_start_matches('0'), "served serial");
    println!("kcm {version} answered ok on {url}, serving serial {served}");
    kcm.kill().await.ok();

    // The CSR is Approved and Issued by our signer.
    let csrs = Api::<CertificateSigningRequest>::all(bed.api.client()).list(&Default::default()).await.unwrap();
    let ours: Vec<_> = csrs.items.iter().filter(|c| c.spec.signer_name == SIGNER_NAME).collect();
    assert_eq!(ours.len(), 1);
    let conds = ours[0].status.as_ref().unwrap().conditions.clone().unwrap();
    assert!(conds.iter().any(|c| c.type_ == "Approved" && c.reason.as_deref() == Some("KcmOperatorApproved")), "{conds:?}");

    // A second certificate for the same step is refused; the next step gets one, and its
    // install keeps the previous files for rollback.
    let err = install::install(&bed.helper, &host(&bed), &bed.spec, NODE, STEP, Duration::from_secs(60)).await.expect_err("second certificate for one step");
    assert!(matches!(&err, InstallError::Denied { reason, .. } if reason == "AlreadyIssuedForStep"), "{err}");
    set_steps(&bed.api.client(), &[(NODE, "test-rev-2", Some(STEP))]).await;
    install::install(&bed.helper, &host(&bed), &bed.spec, NODE, "test-rev-2", Duration::from_secs(60)).await.expect("second install");
    assert!(Path::new(&format!("{}.prev", p.cert)).exists());
}

/// The flag table (`kcm_operator::flags`) against the real `--help` of each matrix
/// binary: a flag it keeps is listed, a flag it drops, refuses or renames away is not, and
/// a rename's new name is.
#[test]
fn the_flag_table_agrees_with_each_kcm_help() {
    let mut wrong = Vec::new();
    for version in e2e::apitier::kcm_matrix() {
        let kcm = e2e::apitier::k8s_bin_of(version, "kube-controller-manager").unwrap_or_else(|e| panic!("{e:#}"));
        let out = std::process::Command::new(&kcm).arg("--help").output().expect("kube-controller-manager --help");
        let listed = flags::parse_help(&String::from_utf8_lossy(&out.stdout));
        assert!(listed.len() > 100, "{version}: --help lists only {} flags", listed.len());
        let v: KcmVersion = version.parse().unwrap();
        let mut fates = Vec::new();
        for name in flags::ruled_flags() {
            let value = if name == "port" { "0" } else { "1" };
            let (fate, ok) = match flags::translate(&[Flag::new(name, value)], v, None) {
                Ok(t) if t.flags.is_empty() => ("dropped", !listed.contains(name)),
                Ok(t) if t.flags[0].name == name => ("kept", listed.contains(name)),
                Ok(t) => ("renamed", !listed.contains(name) && listed.contains(&t.flags[0].name)),
                Err(_) => ("refused", !listed.contains(name)),
            };
            fates.push(format!("{name}:{fate}"));
            if !ok {
                wrong.push(format!(
                    "{version}: --{name} is {fate} by the table, but --help {} it",
                    if listed.contains(name) { "lists" } else { "does not list" }
                ));
            }
        }
        println!("{version}: {} flags in --help; {}", listed.len(), fates.join(" "));
    }
    assert!(wrong.is_empty(), "the flag table disagrees with --help:\n{}", wrong.join("\n"));
}

/// Creates a CSR for our signer as `client` for step `revision` and waits for the signer's verdict.
async fn verdict(client: &kube::Client, admin: &kube::Client, name: &str, pem: String, usages: &[&str], node: &str, revision: &str) -> (String, String) {
    let csr = sim::csr(name, node, revision, pem, SIGNER_NAME, usages, None);
    Api::<CertificateSigningRequest>::all(client.clone()).create(&PostParams::default(), &csr).await.unwrap();
    let api = Api::<CertificateSigningRequest>::all(admin.clone());
    e2e::apitier::poll(&format!("verdict on CSR {name}"), Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let c = api.get(name).await.ok()?;
            let st = c.status?;
            if st.certificate.is_some() {
                return Some(("Issued".to_string(), String::new()));
            }
            st.conditions?.into_iter().find(|c| c.type_ == "Denied").map(|c| (c.reason.unwrap_or_default(), c.message.unwrap_or_default()))
        }
    })
    .await
    .unwrap_or_else(|| panic!("no verdict on {name}"))
}

/// A token of the helper's ServiceAccount bound to a Secret (as `kubectl create token
/// --bound-object-kind Secret` mints it): no pod, no node.
async fn secret_bound_token(admin: &kube::Client) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    let secret: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "any-secret"}, "stringData": {"x": "y"}})).unwrap();
    let secret = Api::<Secret>::namespaced(admin.clone(), NAMESPACE).create(&PostParams::default(), &secret).await.unwrap();
    let tr: TokenRequest = serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": "any-secret", "uid": secret.metadata.uid}}}))
    .unwrap();
    let tr =
        Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE).create_token_request(HELPER_SERVICE_ACCOUNT, &PostParams::default(), &tr).await.unwrap();
    tr.status.unwrap().token
}

/// An RSA-1024 request with otherwise good contents (rcgen makes no such keys).
fn rsa_1024_csr(sans: &pki::Sans) -> String {
    let san: Vec<String> = sans.dns.iter().map(|d| format!("DNS:{d}")).chain(sans.ips.iter().map(|i| format!("IP:{i}"))).collect();
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout", "/dev/null", "-subj"])
        .arg(format!("/CN={KCM_USER}/O={KCM_USER}"))
        .args(["-addext", &format!("subjectAltName={}", san.join(","))])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 8's signer rules on a real apiserver: each hostile request is denied with its own
/// reason, and the real helper's request (DaemonSet pod, or rescue pod) is issued.
#[tokio::test]
async fn bad_csrs_are_denied_with_the_rule_that_failed() {
    let bed = bed().await;
    let admin = bed.api.client();
    let id = NodeIdentity { name: NODE.into(), ips: vec!["127.0.0.1".parse().unwrap()] };
    let usages = ["digital signature", "key encipherment", "client auth", "server auth"];
    let rsa_csr = |sans: &pki::Sans| {
        let key = pki::generate_key(kcm_operator::api::KeyAlgorithm::Rsa2048).unwrap();
        pki::make_csr(&key, sans).unwrap()
    };
    let good = rsa_csr(&id.expected_sans());
    let expect = |what: &str, got: (String, String), reason: &str| {
        println!("{what}: {} {}", got.0, got.1);
        assert_eq!(got.0, reason, "{what}: {}", got.1);
    };

    // From another identity (the admin), otherwise perfect.
    expect("from the admin", verdict(&admin, &admin, "from-admin", good.clone(), &usages, NODE, STEP).await, "RequestorNotNodeHelper");
    // The helper's ServiceAccount, with a token an admin bound to a Secret.
    let by_secret = bed.api.client_with_token(&secret_bound_token(&admin).await);
    expect("token bound to a Secret", verdict(&by_secret, &admin, "secret-bound", good.clone(), &usages, NODE, STEP).await, "RequestorNotHelperPod");
    // ... bound to a pod with the helper's ServiceAccount that is not a helper pod.
    let stray = helper_pod(&admin, NODE, Owner::Stray).await;
    let by_stray = bed.api.client_with_token(&bed.api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, &stray, NODE).await.unwrap());
    expect("token bound to a non-helper pod", verdict(&by_stray, &admin, "stray-pod", good.clone(), &usages, NODE, STEP).await, "RequestorNotHelperPod");
    // ... bound to a helper pod that is being deleted (no kubelet finishes it here).
    let rescue = helper_pod(&admin, NODE, Owner::Rescue).await;
    let by_gone = bed.api.client_with_token(&bed.api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, &rescue, NODE).await.unwrap());
    let dp = kube::api::DeleteParams { grace_period_seconds: Some(600), ..Default::default() };
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(admin.clone(), NAMESPACE).delete(&rescue, &dp).await.unwrap();
    expect("token of a deleted pod", verdict(&by_gone, &admin, "pod-gone", good.clone(), &usages, NODE, STEP).await, "RequestorPodGone");
    // From the helper, for another node.
    expect("for another node", verdict(&bed.helper, &admin, "other-node", good.clone(), &usages, "k8smaster02", STEP).await, "RequestorNotBoundToNode");
    // For a revision that is not the step under way.
    expect("for another step", verdict(&bed.helper, &admin, "other-step", good.clone(), &usages, NODE, "test-rev-0").await, "NoPendingStep");
    // Wrong SANs: another master's address; an extra DNS name.
    let mut sans = id.expected_sans();
    sans.ips.insert("172.24.8.72".parse().unwrap());
    expect("an extra IP SAN", verdict(&bed.helper, &admin, "wrong-san", rsa_csr(&sans), &usages, NODE, STEP).await, "SubjectAltNamesMismatch");
    let mut sans = id.expected_sans();
    sans.dns.insert("kubernetes.default".into());
    expect("an extra DNS SAN", verdict(&bed.helper, &admin, "extra-dns", rsa_csr(&sans), &usages, NODE, STEP).await, "SubjectAltNamesMismatch");
    // Wrong usages.
    expect(
        "wrong usages",
        verdict(&bed.helper, &admin, "wrong-usage", good.clone(), &["digital signature", "key encipherment", "client auth"], NODE, STEP).await,
        "UsagesMismatch",
    );
    // An RSA-1024 key: the key rule, not a signature error.
    expect("RSA-1024", verdict(&bed.helper, &admin, "rsa-1024", rsa_1024_csr(&id.expected_sans()), &usages, NODE, STEP).await, "KeyAlgorithmNotAllowed");
    // Wrong CN and O.
    let key = pki::generate_key(kcm_operator::api::KeyAlgorithm::Rsa2048).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "system:admin");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "system:masters");
    let bad_dn = params.serialize_request(&key).unwrap().pem().unwrap();
    expect("wrong subject", verdict(&bed.helper, &admin, "wrong-cn", bad_dn, &usages, NODE, STEP).await, "SubjectMismatch");
    // Bad PEM.
    let bad_pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_string();
    let created = Api::<CertificateSigningRequest>::all(bed.helper.clone())
        .create(
            &PostParams::default(),
            &CertificateSigningRequest {
                metadata: ObjectMeta { name: Some("bad-pem".into()), ..Default::default() },
                spec: CertificateSigningRequestSpec {
                    request: ByteString(bad_pem.into_bytes()),
                    signer_name: SIGNER_NAME.into(),
                    usages: Some(vec!["client auth".into()]),
                    ..Default::default()
                },
                status: None,
            },
        )
        .await;
    assert!(created.is_err(), "the apiserver itself rejects a CSR that is not PEM");
    // The good one, from the helper, is issued; a second one for the same step is not.
    expect("the helper's request", verdict(&bed.helper, &admin, "good", good.clone(), &usages, NODE, STEP).await, "Issued");
    expect("a second certificate for the step", verdict(&bed.helper, &admin, "good-again", good.clone(), &usages, NODE, STEP).await, "AlreadyIssuedForStep");
    // Two requests for a new step at once: exactly one is issued (decisions are serialized, and
    // each one's LIST of issued CSRs includes every earlier issue: not older than the last one).
    const RACE: &str = "test-rev-race";
    set_steps(&admin, &[(NODE, RACE, None)]).await;
    let (a, b) = tokio::join!(
        verdict(&bed.helper, &admin, "race-a", good.clone(), &usages, NODE, RACE),
        verdict(&bed.helper, &admin, "race-b", good.clone(), &usages, NODE, RACE)
    );
    let mut got = [a.0.clone(), b.0.clone()];
    got.sort();
    assert_eq!(got, ["AlreadyIssuedForStep".to_string(), "Issued".to_string()], "two CSRs for one step at once: {a:?} {b:?}");
    // Once the step is applied, a token an admin mints for the real helper pod gets nothing.
    set_steps(&admin, &[(NODE, STEP, Some(STEP))]).await;
    let minted =
        bed.api.client_with_token(&bed.api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, &format!("{HELPER_DAEMONSET}-{NODE}"), NODE).await.unwrap());
    expect("no step under way", verdict(&minted, &admin, "no-step", good.clone(), &usages, NODE, STEP).await, "NoPendingStep");

    // A master whose kubelet reports an address in the service range (10.96.0.0/16 here).
    const M2: &str = "k8smaster02";
    let pod2 = helper_pod(&admin, M2, Owner::Rescue).await;
    let by_m2 = bed.api.client_with_token(&bed.api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, &pod2, M2).await.unwrap());
    let addresses = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.96.0.50"}]}});
    Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone()).patch_status(M2, &Default::default(), &kube::api::Patch::Merge(&addresses)).await.unwrap();
    set_steps(&admin, &[(NODE, STEP, Some(STEP)), (M2, STEP, None)]).await;
    let m2 = NodeIdentity { name: M2.into(), ips: vec!["10.96.0.50".parse().unwrap()] };
    expect(
        "an IP SAN in the service range",
        verdict(&by_m2, &admin, "service-ip", rsa_csr(&m2.expected_sans()), &usages, M2, STEP).await,
        "SubjectAltNameInServiceRange",
    );
    // The same master with a normal address: the rescue pod's request is issued.
    let addresses = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]}});
    Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone()).patch_status(M2, &Default::default(), &kube::api::Patch::Merge(&addresses)).await.unwrap();
    let m2 = NodeIdentity { name: M2.into(), ips: vec!["127.0.0.2".parse().unwrap()] };
    expect("the rescue pod's request", verdict(&by_m2, &admin, "rescue-good", rsa_csr(&m2.expected_sans()), &usages, M2, STEP).await, "Issued");
}

/// A request left pending longer than the signer's age limit (the operator was down) is
/// denied when the signer comes back, not signed.
#[tokio::test]
async fn a_stale_csr_is_denied() {
    let bed = bed().await;
    bed._signer.abort();
    let admin = bed.api.client();
    let id = NodeIdentity { name: NODE.into(), ips: vec!["127.0.0.1".parse().unwrap()] };
    let key = pki::generate_key(kcm_operator::api::KeyAlgorithm::Rsa2048).unwrap();
    let usages = ["digital signature", "key encipherment", "client auth", "server auth"];
    let pending = tokio::spawn({
        let (helper, admin) = (bed.helper.clone(), admin.clone());
        let pem = pki::make_csr(&key, &id.expected_sans()).unwrap();
        async move { verdict(&helper, &admin, "stale", pem, &usages, NODE, STEP).await }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let certdir = bed.root.path().join("etc/kubernetes/cert");
    let mut config = SignerConfig::new(certdir.join("ca.pem"), certdir.join("ca-key.pem"));
    config.max_csr_age_secs = 2;
    let _signer = tokio::spawn(approver::run(admin.clone(), config, Default::default()));
    let (reason, message) = pending.await.unwrap();
    println!("stale CSR: {reason} {message}");
    assert_eq!(reason, "RequestTooOld", "{message}");
}

#[tokio::test]
async fn bad_input_fails_before_anything_is_written() {
    let bed = bed().await;
    // A host path outside the allowed roots.
    let mut spec = bed.spec.clone();
    spec.paths.unit = "/etc/systemd/system/kube-controller-manager.service".into();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, STEP, Duration::from_secs(10)).await.expect_err("refused");
    assert!(matches!(err, InstallError::Host(_)), "{err}");
    // A missing CA file.
    let mut spec = bed.spec.clone();
    spec.paths.ca_cert = bed.root.path().join("etc/kubernetes/cert/missing.pem").display().to_string();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, STEP, Duration::from_secs(10)).await.expect_err("refused");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // A kcm binary that does not exist.
    let mut spec = bed.spec.clone();
    spec.kcm.binary_path = "/opt/k8s/bin/no-such-kcm".into();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, STEP, Duration::from_secs(10)).await.expect_err("refused");
    assert!(matches!(err, InstallError::Kcm { .. }), "{err}");
    // A flag kcm rejects.
    let mut spec = bed.spec.clone();
    spec.kcm.extra_args.insert("no-such-flag".into(), "1".into());
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, STEP, Duration::from_secs(10)).await.expect_err("refused");
    assert!(err.to_string().contains("--no-such-flag"), "{err}");
    // Nothing was written, and no CSR was made.
    assert!(!Path::new(&bed.spec.paths.cert).exists());
    assert!(!Path::new(&bed.spec.paths.unit).exists());
    let csrs = Api::<CertificateSigningRequest>::all(bed.api.client()).list(&Default::default()).await.unwrap();
    assert!(csrs.items.is_empty(), "no CSR for bad input");
}

/// Pre-flight: a certificate the apiserver would not accept for kcm (here: the spec's
/// apiserver URL leads nowhere, so nobody vouches for it) is never installed; the error
/// says why and the host keeps what it had (nothing).
#[tokio::test]
async fn a_certificate_that_fails_preflight_is_not_installed() {
    let bed = bed().await;
    let mut spec = bed.spec.clone();
    spec.apiserver_url = "https://127.0.0.1:1".into();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, STEP, Duration::from_secs(60)).await.expect_err("refused");
    println!("pre-flight refused: {err}");
    assert!(matches!(err, InstallError::Preflight { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    for p in [&spec.paths.cert, &spec.paths.key, &spec.paths.kubeconfig, &spec.paths.unit] {
        assert!(!Path::new(p).exists(), "{p} written despite the failed pre-flight");
    }
}
