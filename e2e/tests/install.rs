//! Issue 3 on the API tier (real etcd + kube-apiserver): the node-helper for one master
//! gets its CSR approved and signed by the operator's signer, writes the four files, the
//! written kubeconfig authenticates as system:kube-controller-manager, and the real
//! kube-controller-manager starts with the rendered unit and serves /healthz with the
//! written certificate. CSRs from other identities or with wrong contents are denied.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::apitier::{whoami, ApiServer};
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::ByteString;
use kcm_operator::api::{KubeControllerManager, KubeControllerManagerSpec, CSR_NODE_LABEL, HELPER_SERVICE_ACCOUNT, KCM_USER, NAMESPACE, SIGNER_NAME};
use kcm_operator::approver::{self, SignerConfig, CR_NAME};
use kcm_operator::pki::{self, CertInfo, NodeIdentity};
use kube::api::{Api, ObjectMeta, PostParams};
use node_helper::host::HostFs;
use node_helper::install::{self, InstallError};

const NODE: &str = "k8smaster01";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn kcm_binary() -> PathBuf {
    e2e::apitier::k8s_bin("kube-controller-manager").expect("kube-controller-manager binary")
}

/// A spec whose host paths all live under `root` (the helper's host root is `/`).
fn spec_under(root: &Path, api: &ApiServer, port: u16) -> KubeControllerManagerSpec {
    let p = |rel: &str| root.join(rel).display().to_string();
    serde_json::from_value(serde_json::json!({
        "apiserverUrl": api.url(),
        "clusterName": "kubernetes",
        "serviceClusterIpRange": "10.96.0.0/16",
        "kcm": {
            "binaryPath": kcm_binary().display().to_string(),
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

/// Applies the project's RBAC (manifests/base) so the helper runs with exactly its rights.
async fn apply_manifests(client: &kube::Client) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base");
    for file in ["namespace.yaml", "rbac.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        e2e::apitier::apply_yaml(client, &text).await.unwrap_or_else(|e| panic!("applying {file}: {e:#}"));
    }
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    use kube::CustomResourceExt;
    crds.create(&PostParams::default(), &KubeControllerManager::crd()).await.unwrap();
    e2e::apitier::wait_for("KubeControllerManager CRD served", Duration::from_secs(30), || async {
        Api::<KubeControllerManager>::all(client.clone()).list(&Default::default()).await.is_ok()
    })
    .await;
}

async fn create_cr(client: &kube::Client, spec: KubeControllerManagerSpec) {
    let cr = KubeControllerManager::new(CR_NAME, spec);
    Api::<KubeControllerManager>::all(client.clone()).create(&PostParams::default(), &cr).await.unwrap();
}

struct Bed {
    api: ApiServer,
    root: tempfile::TempDir,
    helper: kube::Client,
    spec: KubeControllerManagerSpec,
    port: u16,
    _signer: tokio::task::JoinHandle<()>,
}

async fn bed() -> Bed {
    let api = ApiServer::start().await.expect("API tier starts");
    let admin = api.client();
    apply_manifests(&admin).await;
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let spec = spec_under(root.path(), &api, port);
    // The master's CA material, where the seed keeps it.
    let certdir = root.path().join("etc/kubernetes/cert");
    std::fs::create_dir_all(&certdir).unwrap();
    std::fs::copy(api.ca_cert_path(), certdir.join("ca.pem")).unwrap();
    std::fs::copy(api.ca_key_path(), certdir.join("ca-key.pem")).unwrap();
    std::fs::copy(api.sa_key_path(), certdir.join("sa.key")).unwrap();
    create_cr(&admin, spec.clone()).await;
    let token = api.bound_sa_token(NAMESPACE, HELPER_SERVICE_ACCOUNT, "kcm-node-helper-test", NODE).await.expect("bound token");
    let helper = api.client_with_token(&token);
    let signer = tokio::spawn(approver::run(admin.clone(), SignerConfig::new(certdir.join("ca.pem"), certdir.join("ca-key.pem"))));
    Bed { api, root, helper, spec, port, _signer: signer }
}

fn host(bed: &Bed) -> HostFs {
    HostFs::new("/", vec![bed.root.path().to_path_buf()])
}

#[tokio::test]
async fn helper_installs_and_kcm_serves_with_the_issued_certificate() {
    let bed = bed().await;
    let done = install::install(&bed.helper, &host(&bed), &bed.spec, NODE, Duration::from_secs(60)).await.expect("install");
    println!("installed: serial {} kcm {} warnings {:?} changed {:?}", done.cert.serial_hex, done.kcm_version, done.warnings, done.changed);
    assert_eq!(done.changed.len(), 4, "{:?}", done.changed);

    let p = &bed.spec.paths;
    let mode = |f: &str| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&p.key), 0o600, "key mode");
    assert_eq!(mode(&p.cert), 0o644, "cert mode");
    let cert = CertInfo::from_pem(&std::fs::read(&p.cert).unwrap(), "written cert").unwrap();
    assert_eq!(cert.common_name.as_deref(), Some(KCM_USER));
    let id = NodeIdentity { name: NODE.into(), hostname: NODE.into(), ips: vec!["127.0.0.1".parse().unwrap()] };
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
    println!("kcm answered ok on {url}, serving serial {served}");
    kcm.kill().await.ok();

    // The CSR is Approved and Issued by our signer.
    let csrs = Api::<CertificateSigningRequest>::all(bed.api.client()).list(&Default::default()).await.unwrap();
    let ours: Vec<_> = csrs.items.iter().filter(|c| c.spec.signer_name == SIGNER_NAME).collect();
    assert_eq!(ours.len(), 1);
    let conds = ours[0].status.as_ref().unwrap().conditions.clone().unwrap();
    assert!(conds.iter().any(|c| c.type_ == "Approved" && c.reason.as_deref() == Some("KcmOperatorApproved")), "{conds:?}");

    // A second install keeps the previous files for rollback.
    install::install(&bed.helper, &host(&bed), &bed.spec, NODE, Duration::from_secs(60)).await.expect("second install");
    assert!(Path::new(&format!("{}.prev", p.cert)).exists());
}

/// Creates a CSR for our signer as `client` and waits for the signer's verdict.
async fn verdict(client: &kube::Client, admin: &kube::Client, name: &str, pem: String, usages: &[&str], node: &str) -> (String, String) {
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some([(CSR_NODE_LABEL.to_string(), node.to_string())].into()), ..Default::default() },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(usages.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        },
        status: None,
    };
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

#[tokio::test]
async fn bad_csrs_are_denied_with_the_rule_that_failed() {
    let bed = bed().await;
    let admin = bed.api.client();
    let id = NodeIdentity { name: NODE.into(), hostname: NODE.into(), ips: vec!["127.0.0.1".parse().unwrap()] };
    let usages = ["digital signature", "key encipherment", "client auth", "server auth"];
    let rsa_csr = |sans: &pki::Sans| {
        let key = pki::generate_key(kcm_operator::api::KeyAlgorithm::Rsa2048).unwrap();
        pki::make_csr(&key, sans).unwrap()
    };
    let good = rsa_csr(&id.expected_sans());

    // From another identity (the admin), otherwise perfect.
    let (reason, msg) = verdict(&admin, &admin, "from-admin", good.clone(), &usages, NODE).await;
    assert_eq!(reason, "RequestorNotNodeHelper", "{msg}");
    // From the helper, for another node.
    let (reason, msg) = verdict(&bed.helper, &admin, "other-node", good.clone(), &usages, "k8smaster02").await;
    assert_eq!(reason, "RequestorNotBoundToNode", "{msg}");
    // Wrong SANs: another master's address.
    let mut sans = id.expected_sans();
    sans.ips.insert("172.24.8.72".parse().unwrap());
    let (reason, msg) = verdict(&bed.helper, &admin, "wrong-san", rsa_csr(&sans), &usages, NODE).await;
    assert_eq!(reason, "SubjectAltNamesMismatch", "{msg}");
    // Wrong usages.
    let (reason, msg) = verdict(&bed.helper, &admin, "wrong-usage", good.clone(), &["digital signature", "key encipherment", "client auth"], NODE).await;
    assert_eq!(reason, "UsagesMismatch", "{msg}");
    // Wrong CN and O.
    let key = pki::generate_key(kcm_operator::api::KeyAlgorithm::Rsa2048).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "system:admin");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "system:masters");
    let bad_dn = params.serialize_request(&key).unwrap().pem().unwrap();
    let (reason, msg) = verdict(&bed.helper, &admin, "wrong-cn", bad_dn, &usages, NODE).await;
    assert_eq!(reason, "SubjectMismatch", "{msg}");
    // Bad PEM.
    let bad_pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_string();
    let created = Api::<CertificateSigningRequest>::all(bed.helper.clone())
        .create(
            &PostParams::default(),
            &CertificateSigningRequest {
                metadata: ObjectMeta { name: Some("bad-pem".into()), ..Default::default() },
                spec: CertificateSigningRequestSpec { request: ByteString(bad_pem.into_bytes()), signer_name: SIGNER_NAME.into(), usages: Some(vec!["client auth".into()]), ..Default::default() },
                status: None,
            },
        )
        .await;
    assert!(created.is_err(), "the apiserver itself rejects a CSR that is not PEM");
    // And the good one, from the helper, is issued.
    let (reason, _) = verdict(&bed.helper, &admin, "good", good, &usages, NODE).await;
    assert_eq!(reason, "Issued");
}

#[tokio::test]
async fn bad_input_fails_before_anything_is_written() {
    let bed = bed().await;
    // A host path outside the allowed roots.
    let mut spec = bed.spec.clone();
    spec.paths.unit = "/etc/systemd/system/kube-controller-manager.service".into();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, Duration::from_secs(10)).await.err().expect("refused");
    assert!(matches!(err, InstallError::Host(_)), "{err}");
    // A missing CA file.
    let mut spec = bed.spec.clone();
    spec.paths.ca_cert = bed.root.path().join("etc/kubernetes/cert/missing.pem").display().to_string();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, Duration::from_secs(10)).await.err().expect("refused");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // A kcm binary that does not exist.
    let mut spec = bed.spec.clone();
    spec.kcm.binary_path = "/opt/k8s/bin/no-such-kcm".into();
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, Duration::from_secs(10)).await.err().expect("refused");
    assert!(matches!(err, InstallError::Kcm { .. }), "{err}");
    // A flag kcm rejects.
    let mut spec = bed.spec.clone();
    spec.kcm.extra_args.insert("no-such-flag".into(), "1".into());
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, Duration::from_secs(10)).await.err().expect("refused");
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
    let err = install::install(&bed.helper, &host(&bed), &spec, NODE, Duration::from_secs(60)).await.err().expect("refused");
    println!("pre-flight refused: {err}");
    assert!(matches!(err, InstallError::Preflight { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    for p in [&spec.paths.cert, &spec.paths.key, &spec.paths.kubeconfig, &spec.paths.unit] {
        assert!(!Path::new(p).exists(), "{p} written despite the failed pre-flight");
    }
}
