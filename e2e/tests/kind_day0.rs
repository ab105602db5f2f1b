//! The seed's day 0 on kind (3 control-plane nodes), in the seed's order: the apiserver and
//! etcd run, kcm is installed before any kubelet, then the kubelets come, then
//! `kubectl apply`. Runs last: it is destructive.
//!
//! Everything of ours and kubeadm's kcm is removed from the masters (as in kind_bootstrap),
//! and `kubelet` is stopped on all three (the apiserver and etcd containers keep running).
//! The node-helper binary, taken out of the product's image, and the seed's CR are copied to
//! each master, and `node-helper bootstrap` is run on each, one after another (the seed's
//! ssh loop). First with bad input on one master (a missing CA key, a CA the apiserver does
//! not trust, a binary that is not kcm): each refused naming the problem, nothing written.
//! Then for real: 3 kcm, one leader, seed 2.1-2.5 passing with no kubelet running. Then the
//! kubelets start and the CRD, manifests/base and the CR are applied: the operator's static
//! pods and the helpers take over, 3/3 healthy, no kcm restarted (MainPID unchanged); a new
//! certificate asked for afterwards (a shorter validity) is issued by the operator's signer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::kind::{
    all_healthy, client, cr, diagnostics, kcm_lease, kubectl, masters, now_secs, on_node, pod_ready, pods_with_app, process_running, sh, write_on_node,
};
use e2e::seed::*;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;
use kcm_operator::api::{CSR_NODE_LABEL, HELPER_APP, OPERATOR_APP, OPERATOR_MANIFEST, SIGNER_NAME};
use kcm_operator::pki::{CertInfo, NodeIdentity};
use kube::api::{Api, ListParams};

/// Where the test puts the binary and the CR on each master.
const BIN: &str = "/usr/local/bin/kcm-node-helper";
const CR_FILE: &str = "/root/kcm.yaml";

/// `/<name>` of the image the cluster runs (a static binary), copied out of it into `dir`.
fn from_image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let (ok, id) = sh(std::process::Command::new("docker").args(["create", IMAGE, &format!("/{name}")]));
    assert!(ok, "docker create {IMAGE}: {id}");
    let id = id.trim().lines().last().unwrap_or_default().to_string();
    let out = dir.join(name);
    let (ok, msg) = sh(std::process::Command::new("docker").args(["cp", &format!("{id}:/{name}"), out.to_str().unwrap()]));
    let _ = sh(std::process::Command::new("docker").args(["rm", &id]));
    assert!(ok, "docker cp /{name} out of {IMAGE}: {msg}");
    out
}

/// `node-helper bootstrap` on `node` with the CR at `cr`; (succeeded, output).
fn bootstrap(node: &str, ip: &str, cr: &str) -> (bool, String) {
    on_node(node, &format!("{BIN} bootstrap --cr {cr} --node-name {node} --node-ip {ip} --image {IMAGE} 2>&1"))
}

/// MainPID of kcm's unit on `node` (0: none).
fn main_pid(node: &str) -> u32 {
    must(node, "systemctl show -p MainPID --value kube-controller-manager").trim().parse().unwrap_or(0)
}

/// Nothing of ours on `node`: no kcm file at the seed's paths, no journal, no static pod, no unit running.
fn nothing_written(node: &str) -> Result<(), String> {
    let files = [SEED_CERT, SEED_KEY, SEED_KUBECONFIG, SEED_UNIT, node_helper::journal::DEFAULT_PATH, &format!("{MANIFEST_DIR}/{OPERATOR_MANIFEST}")]
        .map(str::to_string);
    let present: Vec<&String> = files.iter().filter(|f| on_node(node, &format!("test -e {f}")).0).collect();
    if !present.is_empty() {
        return Err(format!("written on {node}: {present:?}"));
    }
    if e2e::kind::unit_active(node) || process_running(node, "kube-controller-manager") {
        return Err(format!("kcm runs on {node}"));
    }
    Ok(())
}

#[tokio::test]
async fn seed_day0_bootstrap_before_the_kubelets() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "three control-plane nodes: {masters:?}");
    let nodes = Api::<Node>::all(c.clone()).list(&ListParams::default()).await.expect("nodes");
    let ips: BTreeMap<String, String> = nodes
        .items
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, NodeIdentity::from_node(n).ok()?.primary_ip().to_string())))
        .filter(|(n, _)| masters.contains(n))
        .collect();

    // ---------------------------------------------------------------- day 0
    teardown(&c, &masters).await;
    let _kubelets_back = AtEnd { nodes: masters.clone(), script: "systemctl start kubelet".into() };
    for m in &masters {
        must(m, "systemctl stop kubelet");
    }
    let took = wait_nodes(&masters, Duration::from_secs(60), "no kubelet process", |n| !process_running(n, "kubelet")).await;
    println!("day 0: kubelet stopped on every master ({:.0}s); apiserver and etcd keep running", took.as_secs_f64());
    let (ok, out) = kubectl(&["get", "--raw", "/readyz"]);
    assert!(ok && out.trim() == "ok", "the apiserver answers with no kubelet: {out}");

    let dir = tempfile::tempdir().unwrap();
    let bin = from_image(dir.path(), "node-helper");
    let (cr_yaml, spec) = seed_cr();
    for m in &masters {
        let (ok, out) = sh(std::process::Command::new("docker").args(["cp", bin.to_str().unwrap(), &format!("{m}:{BIN}")]));
        assert!(ok, "docker cp the node-helper to {m}: {out}");
        let (ok, out) = write_on_node(m, CR_FILE, cr_yaml.as_bytes(), "600");
        assert!(ok, "the CR on {m}: {out}");
    }

    // ---------------------------------------------------------------- bad input, nothing written
    let first = &masters[0];
    let ip0 = &ips[first];
    let variant = |name: &str, edit: &dyn Fn(&mut serde_yaml::Value)| {
        let mut v: serde_yaml::Value = serde_yaml::from_str(&cr_yaml).unwrap();
        edit(&mut v["spec"]);
        let path = format!("/root/kcm-{name}.yaml");
        let (ok, out) = write_on_node(first, &path, serde_yaml::to_string(&v).unwrap().as_bytes(), "600");
        assert!(ok, "{path} on {first}: {out}");
        path
    };
    let set =
        |field: &'static str, key: &'static str, value: &'static str| move |s: &mut serde_yaml::Value| s[field][key] = serde_yaml::Value::String(value.into());
    let cases: [(&str, String, &[&str]); 3] = [
        ("a missing CA key", variant("no-ca-key", &set("paths", "caKey", "/etc/kubernetes/cert/no-such-key.pem")), &["caKey", "no-such-key.pem"]),
        (
            "a CA the apiserver does not trust",
            variant("other-ca", &|s: &mut serde_yaml::Value| {
                set("paths", "caCert", "/etc/kubernetes/pki/front-proxy-ca.crt")(s);
                set("paths", "caKey", "/etc/kubernetes/pki/front-proxy-ca.key")(s);
            }),
            &["does not work against", APISERVER],
        ),
        ("a binary that is not kcm", variant("not-kcm", &set("kcm", "binaryPath", "/bin/true")), &["/bin/true", "--version"]),
    ];
    for (what, path, words) in &cases {
        let (ok, out) = bootstrap(first, ip0, path);
        assert!(!ok, "bootstrap with {what} succeeded on {first}:\n{out}");
        assert!(words.iter().all(|w| out.contains(w)), "bootstrap with {what}: the message names {words:?}:\n{out}");
        if let Err(e) = nothing_written(first) {
            panic!("bootstrap with {what}: {e}\n{out}");
        }
        println!("bad input, {what}: refused, nothing written: {}", out.trim().lines().last().unwrap_or_default());
    }

    // ---------------------------------------------------------------- the bootstrap, master by master
    let t0 = Instant::now();
    for m in &masters {
        let (ok, out) = bootstrap(m, &ips[m], CR_FILE);
        assert!(ok, "bootstrap on {m}:\n{out}\n{}", must(m, "journalctl -u kube-controller-manager --no-pager | tail -30"));
        println!("bootstrap {m} at +{:.1}s: {}", t0.elapsed().as_secs_f64(), out.trim().lines().last().unwrap_or_default());
    }
    // A second run changes nothing: the same files, kcm not restarted.
    let pid_before = main_pid(first);
    let (ok, out) = bootstrap(first, ip0, CR_FILE);
    assert!(ok && out.contains("without restart") && main_pid(first) == pid_before, "a second bootstrap on {first} (MainPID was {pid_before}):\n{out}");

    // ---------------------------------------------------------------- seed 2.1-2.5, no kubelet yet
    assert!(masters.iter().all(|m| !process_running(m, "kubelet")), "a kubelet runs: the test did not test day 0");
    let ca = must(first, &format!("cat {SEED_CA}"));
    for m in &masters {
        assert!(e2e::kind::unit_active(m), "seed 2.1/2.2: kube-controller-manager.service active on {m}");
        for f in [SEED_CERT, SEED_KEY, SEED_KUBECONFIG, SEED_UNIT] {
            assert!(on_node(m, &format!("test -s {f}")).0, "seed 2.1: {f} on {m}");
        }
        assert_eq!(must(m, &format!("stat -c %a {SEED_KEY}")).trim(), "600", "mode of {SEED_KEY} on {m}");
        let cert = CertInfo::from_pem(must(m, &format!("cat {SEED_CERT}")).as_bytes(), "kcm certificate").unwrap();
        assert!(cert.sans.ips.iter().any(|ip| ip.to_string() == ips[m]), "{m}'s certificate names its address {}: {:?}", ips[m], cert.sans);
        if let Err(e) = e2e::kind::metrics_with_admin_cert(&ips[m], spec.kcm.secure_port, &ca) {
            panic!("seed 2.3 on {m}: {e}");
        }
    }
    let ns = "kcm-e2e-day0";
    let pods = e2e::kind::deployment_gets_pods(&c, ns, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("seed 2.4: {e}\n{}", diagnostics()));
    let lease = kcm_lease(&c).await.unwrap_or_default();
    let leader = lease.node().unwrap_or_default();
    assert!(lease.live(now_secs()) && masters.contains(&leader), "seed 2.5: one live leader among the masters: {lease:?}");
    println!(
        "day 0 with no kubelet: 3 kcm under systemd, metrics with the admin cert, a Deployment got {} Pods, leader {leader} ({:.1}s for the three bootstraps)",
        pods.len(),
        t0.elapsed().as_secs_f64()
    );
    let pids: BTreeMap<String, u32> = masters.iter().map(|m| (m.clone(), main_pid(m))).collect();
    assert!(pids.values().all(|p| *p > 0), "MainPIDs {pids:?}");

    // ---------------------------------------------------------------- the kubelets, then kubectl apply
    let handover = now_secs();
    let t0 = Instant::now();
    for m in &masters {
        must(m, "systemctl start kubelet");
    }
    let (ok, out) = e2e::kind::apply_kustomization("manifests/base/");
    assert!(ok, "CRD + kubectl apply -k manifests/base/:\n{out}");
    let cr_file = dir.path().join("kubecontrollermanager.yaml");
    std::fs::write(&cr_file, &cr_yaml).unwrap();
    let (ok, out) = kubectl(&["apply", "-f", cr_file.to_str().unwrap()]);
    assert!(ok, "applying the seed's CR:\n{out}");
    let leader = loop {
        let operators = pods_with_app(&c, OPERATOR_APP).await.iter().filter(|p| pod_ready(p)).count();
        let helpers = pods_with_app(&c, HELPER_APP).await.iter().filter(|p| pod_ready(p)).count();
        let why = match all_healthy(&c, &masters, handover).await {
            Ok(l) if operators == 3 && helpers == 3 => break l,
            Ok(_) => String::new(),
            Err(why) => why,
        };
        assert!(
            t0.elapsed() < Duration::from_secs(420),
            "after the kubelets came: {operators} operator pod(s) and {helpers} helper pod(s) Ready; {why}\n{}",
            diagnostics()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let now: BTreeMap<String, u32> = masters.iter().map(|m| (m.clone(), main_pid(m))).collect();
    assert_eq!(now, pids, "the hand-over to the operator restarted kcm (MainPID before, after)");
    println!(
        "hand-over: kubelets started, 3 operator static pods and 3 helpers Ready, 3/3 healthy, leader {leader}, no kcm restarted, in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);

    // ---------------------------------------------------------------- renew now: the operator's signer
    let (_, before) = cr(&c).await.expect("CR");
    let serials: BTreeMap<String, String> = before.nodes.iter().map(|n| (n.name.clone(), n.cert_serial.clone().unwrap_or_default())).collect();
    let operator = from_image(dir.path(), "kcm-operator");
    let asked_us = (now_secs() * 1e6) as i64;
    let (ok, out) = sh(std::process::Command::new(&operator).arg("renew").env("KUBECONFIG", e2e::kind::kubeconfig()));
    assert!(ok, "kcm-operator renew:\n{out}");
    println!("renew now: {}", out.trim().lines().last().unwrap_or_default());
    let t0 = Instant::now();
    let since = now_secs();
    // When each master's new certificate was first reported, and which master led then.
    let mut renewed_at: BTreeMap<String, f64> = BTreeMap::new();
    loop {
        let (_, s) = cr(&c).await.expect("CR");
        for n in &s.nodes {
            if n.cert_serial.is_some() && n.cert_serial.as_ref() != serials.get(&n.name) {
                renewed_at.entry(n.name.clone()).or_insert_with(|| t0.elapsed().as_secs_f64());
            }
        }
        if renewed_at.len() == masters.len() && all_healthy(&c, &masters, since).await.is_ok() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "renew now: renewed {renewed_at:?} within 300s: {:?}\n{}", s.nodes, diagnostics());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The order the operator gave the renewals in: its RolloutStep Events (microsecond
    // eventTime), not the 1 s polls above, which see restart-free steps land in one sample.
    let leader_now = kcm_lease(&c).await.and_then(|l| l.node()).unwrap_or_default();
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(c.clone()).list(&ListParams::default().fields("reason=RolloutStep")).await.unwrap();
    let mut given: Vec<(i64, String)> = events
        .items
        .iter()
        .filter(|e| e.note.as_deref().is_some_and(|n| n.contains("requested at")))
        .filter_map(|e| Some((e.event_time.as_ref()?.0.as_microsecond(), e.regarding.as_ref()?.name.clone()?)))
        .filter(|(at, _)| *at >= asked_us)
        .collect();
    given.sort();
    let order: Vec<String> = given.into_iter().map(|(_, m)| m).collect();
    assert_eq!(order.len(), masters.len(), "renew now: one RolloutStep per master: {order:?}");
    assert_eq!(order.last(), Some(&leader_now), "renew now: the leader's master renewed last: {order:?} (first reported {renewed_at:?})");
    let csrs = Api::<CertificateSigningRequest>::all(c.clone()).list(&ListParams::default()).await.unwrap();
    for m in &masters {
        let installed = CertInfo::from_pem(must(m, &format!("cat {SEED_CERT}")).as_bytes(), "kcm certificate").unwrap();
        let issued = csrs.items.iter().any(|x| {
            x.spec.signer_name == SIGNER_NAME
                && x.metadata.labels.as_ref().and_then(|l| l.get(CSR_NODE_LABEL)) == Some(m)
                && x.status
                    .as_ref()
                    .and_then(|st| st.certificate.as_ref())
                    .and_then(|b| CertInfo::from_pem(&b.0, "issued").ok())
                    .is_some_and(|i| i.serial_hex == installed.serial_hex)
        });
        assert!(issued, "{m}'s new certificate {} is the one a CSR of {SIGNER_NAME} for {m} was issued", installed.serial_hex);
    }
    let after: BTreeMap<String, u32> = masters.iter().map(|m| (m.clone(), main_pid(m))).collect();
    assert_eq!(after, pids, "a restart-free (Referenced) renewal restarted kcm");
    // Asked once, done once: nothing more is renewed for the same request.
    let (_, s) = cr(&c).await.expect("CR");
    let renewed: BTreeMap<String, String> = s.nodes.iter().map(|n| (n.name.clone(), n.cert_serial.clone().unwrap_or_default())).collect();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (_, s) = cr(&c).await.expect("CR");
    let later: BTreeMap<String, String> = s.nodes.iter().map(|n| (n.name.clone(), n.cert_serial.clone().unwrap_or_default())).collect();
    assert_eq!(later, renewed, "renew now renewed a master a second time for the same request");
    println!(
        "renew now: every master renewed once by {SIGNER_NAME} through the CSR API, the leader {leader_now} last ({renewed_at:?} s), kcm not restarted, in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
