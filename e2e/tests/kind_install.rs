//! On the kind cluster (3 control-plane nodes), after `kubectl apply -k manifests/kind/`:
//! the operator's signer issues each master's certificate through the CSR API and the
//! node-helper on each master writes key (0600), cert, kubeconfig (embedded CA) and the
//! unit rendered for that node; the written kubeconfig authenticates as
//! system:kube-controller-manager from the node itself (seed 1.2-1.6, checked via docker exec).
//! Starting kcm under systemd is not part of this file yet (see issue 4).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::apitier::{k8s_bin, poll};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;
use kcm_operator::api::{KubeControllerManager, CONTROL_PLANE_LABEL, CSR_NODE_LABEL, KCM_USER, SIGNER_NAME};
use kcm_operator::approver::CR_NAME;
use kcm_operator::pki::NodeIdentity;
use kube::api::{Api, ListParams};

fn kubeconfig() -> PathBuf {
    let state = std::env::var("KCM_STATE").unwrap_or_else(|_| "/var/tmp/kcm-e2e".into());
    let p = PathBuf::from(state).join("kubeconfig");
    assert!(p.exists(), "{} missing: bring the cluster up with `bash e2e/run.sh up`", p.display());
    p
}

async fn client() -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn on_node(node: &str, script: &str) -> (bool, String) {
    sh(Command::new("docker").args(["exec", node, "sh", "-c", script]))
}

#[tokio::test]
async fn operator_signs_and_helpers_write_files_on_all_three_masters() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (ok, out) = sh(Command::new(k8s_bin("kubectl").unwrap()).current_dir(&repo).arg("--kubeconfig").arg(kubeconfig()).args(["apply", "-k", "manifests/kind/"]));
    assert!(ok, "kubectl apply -k manifests/kind/:\n{out}");
    println!("{out}");

    let c = client().await;
    let nodes = Api::<Node>::all(c.clone()).list(&ListParams::default().labels(CONTROL_PLANE_LABEL)).await.unwrap();
    assert_eq!(nodes.items.len(), 3, "three control-plane nodes");
    let kcm = Api::<KubeControllerManager>::all(c.clone()).get(CR_NAME).await.unwrap();
    let paths = kcm.spec.paths.clone();

    // Each master gets an Approved and Issued CSR from our signer.
    let csrs = Api::<CertificateSigningRequest>::all(c.clone());
    let names: Vec<String> = nodes.items.iter().map(|n| n.metadata.name.clone().unwrap()).collect();
    let t0 = std::time::Instant::now();
    let issued = poll("a certificate issued for each master", Duration::from_secs(240), || {
        let (csrs, names) = (csrs.clone(), names.clone());
        async move {
            let list = csrs.list(&ListParams::default()).await.ok()?;
            let done: Vec<String> = names
                .iter()
                .filter(|n| {
                    list.items.iter().any(|x| {
                        x.spec.signer_name == SIGNER_NAME
                            && x.metadata.labels.as_ref().and_then(|l| l.get(CSR_NODE_LABEL)) == Some(n)
                            && x.status.as_ref().is_some_and(|s| {
                                s.certificate.is_some() && s.conditions.iter().flatten().any(|c| c.type_ == "Approved" && c.status == "True")
                            })
                    })
                })
                .cloned()
                .collect();
            (done.len() == names.len()).then_some(done)
        }
    })
    .await;
    if issued.is_none() {
        let (_, pods) = sh(Command::new(k8s_bin("kubectl").unwrap()).arg("--kubeconfig").arg(kubeconfig()).args(["-n", "kcm-operator", "get", "pods", "-o", "wide"]));
        let (_, logs) = sh(Command::new(k8s_bin("kubectl").unwrap()).arg("--kubeconfig").arg(kubeconfig()).args(["-n", "kcm-operator", "logs", "--all-containers", "--prefix", "-l", "app.kubernetes.io/name", "--tail", "20"]));
        let (_, list) = sh(Command::new(k8s_bin("kubectl").unwrap()).arg("--kubeconfig").arg(kubeconfig()).args(["get", "csr"]));
        panic!("not every master got a certificate within 240s\npods:\n{pods}\nCSRs:\n{list}\nlogs:\n{logs}");
    }
    println!("certificates issued for {names:?} in {:.1}s", t0.elapsed().as_secs_f64());

    // The files on each master (docker exec into the node container).
    for node in &nodes.items {
        let name = node.metadata.name.clone().unwrap();
        let id = NodeIdentity::from_node(node).unwrap();
        let ip = id.primary_ip().to_string();
        let (ok, out) = poll(&format!("files on {name}"), Duration::from_secs(60), || {
            let (name, key, unit) = (name.clone(), paths.key.clone(), paths.unit.clone());
            async move {
                let r = on_node(&name, &format!("stat -c %a {key} && test -s {unit}"));
                r.0.then_some(r)
            }
        })
        .await
        .unwrap_or_else(|| on_node(&name, &format!("ls -la $(dirname {}) $(dirname {})", paths.key, paths.unit)));
        assert!(ok, "files on {name}: {out}");
        assert_eq!(out.lines().next(), Some("600"), "key mode on {name}");
        let (ok, out) = on_node(&name, &format!("cat {}", paths.unit));
        assert!(ok && out.contains(&format!("--bind-address={ip} ")), "unit on {name} binds to {ip}:\n{out}");
        assert!(out.contains(&format!("ExecStart={} ", kcm.spec.kcm.binary_path)), "{out}");
        assert!(!out.contains("--port=0") && !out.contains("--logtostderr"), "flags removed from kcm 1.33 are gone:\n{out}");
        let (ok, out) = on_node(&name, &format!("grep -c certificate-authority-data {}", paths.kubeconfig));
        assert!(ok && out.trim() == "1", "kubeconfig on {name} embeds the CA: {out}");
        let (ok, out) = on_node(&name, &format!("openssl x509 -in {} -noout -subject -ext subjectAltName 2>&1 || cat {}", paths.cert, paths.cert));
        println!("{name}: {}", out.replace('\n', " "));
        // The kubeconfig, used from the master itself, is system:kube-controller-manager.
        let (ok2, who) = on_node(&name, &format!("kubectl --kubeconfig {} auth whoami -o jsonpath='{{.status.userInfo.username}}'", paths.kubeconfig));
        assert!(ok2 && who.trim() == KCM_USER, "whoami on {name} with the written kubeconfig: {who} (cert: {ok} {out})");
    }
}
