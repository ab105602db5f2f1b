//! On the kind cluster (3 control-plane nodes, image kcm-operator/operator:dev loaded):
//! the operator as a static pod (manifests/static-pod/kcm-operator.yaml copied into
//! /etc/kubernetes/manifests on every master, as an admin would) comes up on all three
//! masters with a client certificate minted from the host CA, exactly one replica leads
//! on Lease kcm-operator/kcm-operator, and when the leader's manifest is removed (kubelet
//! stops the pod with SIGTERM: the leader releases the lease) another replica holds the
//! lease within a few seconds; when a leader is killed outright (SIGKILL, no release) another
//! takes over once the 15 s lease expires. Everything is removed again at the end, and the
//! operator Deployment of manifests/kind (if present) is scaled back to what it was.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::apitier::poll;
use e2e::kind::{client, on_node, sh};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kcm_operator::api::{CONTROL_PLANE_LABEL, NAMESPACE};
use kcm_operator::election::LEASE_NAME;
use kube::api::{Api, ListParams};

const MANIFEST_DIR: &str = "/etc/kubernetes/manifests";
const MANIFEST: &str = "kcm-operator.yaml";

/// The master a Lease holder identity (`<hostname>_<random>`) names.
fn holder_node(holder: &str) -> String {
    kcm_operator::rollout::leader_node(Some(holder)).unwrap_or_default()
}

/// Drops ANSI colour sequences (the operator's plain log format colours its fields).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let (ok, out) = e2e::kind::kubectl(args);
    (ok, strip_ansi(&out))
}

/// The master a holder identity (`<hostname>_<random>`) names.

/// Removes the static pod manifests and restores the Deployment, also when the test panics.
struct Cleanup {
    nodes: Vec<String>,
    deployment_replicas: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.nodes {
            let (ok, out) = on_node(n, &format!("rm -f {MANIFEST_DIR}/{MANIFEST}"));
            if !ok {
                eprintln!("cleanup on {n}: {out}");
            }
        }
        // Wait (bounded) for the mirror pods to go, so the next test starts clean.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            let (_, out) = kubectl(&["-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=static-pod", "-o", "name"]);
            if out.trim().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(r) = &self.deployment_replicas {
            let (ok, out) = kubectl(&["-n", NAMESPACE, "scale", "deployment/kcm-operator", &format!("--replicas={r}")]);
            println!("restored deployment/kcm-operator to {r} replicas: {ok} {out}");
        }
    }
}

/// The pod's last election log line: "leading", "following" or "lost".
fn election_state(pod: &str) -> String {
    let (_, logs) = kubectl(&["-n", NAMESPACE, "logs", pod, "--tail", "200"]);
    logs.lines()
        .rev()
        .find_map(|l| {
            if l.contains("leading: signer running") {
                Some("leading")
            } else if l.contains("following: Lease") {
                Some("following")
            } else if l.contains("lost leadership") {
                Some("lost")
            } else {
                None
            }
        })
        .unwrap_or("none")
        .to_string()
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    let l = leases.get_opt(LEASE_NAME).await.ok()??;
    l.spec?.holder_identity.filter(|h| !h.is_empty())
}

fn diagnostics() -> String {
    let (_, pods) = kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "wide"]);
    let (_, lease) = kubectl(&["-n", NAMESPACE, "get", "lease", LEASE_NAME, "-o", "yaml"]);
    let (_, logs) = kubectl(&["-n", NAMESPACE, "logs", "-l", "app.kubernetes.io/component=static-pod", "--prefix", "--tail", "15"]);
    format!("pods:\n{pods}\nlease:\n{lease}\nlogs:\n{logs}")
}

#[tokio::test]
async fn operator_static_pods_elect_one_leader_and_fail_over() {
    let (ok, out) = kubectl(&["apply", "-f", "manifests/base/namespace.yaml", "-f", "manifests/base/crd.yaml", "-f", "manifests/base/rbac.yaml"]);
    assert!(ok, "applying namespace, CRD, RBAC:\n{out}");
    let c = client().await;
    let nodes: Vec<String> = Api::<Node>::all(c.clone())
        .list(&ListParams::default().labels(CONTROL_PLANE_LABEL))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.name.unwrap())
        .collect();
    assert_eq!(nodes.len(), 3, "three control-plane nodes: {nodes:?}");

    // The Deployment of manifests/kind would take part in the election: pause it for the test.
    let (has_deploy, replicas) = kubectl(&["-n", NAMESPACE, "get", "deployment/kcm-operator", "-o", "jsonpath={.spec.replicas}"]);
    let _cleanup = Cleanup { nodes: nodes.clone(), deployment_replicas: has_deploy.then(|| replicas.trim().to_string()) };
    if has_deploy {
        let (ok, out) = kubectl(&["-n", NAMESPACE, "scale", "deployment/kcm-operator", "--replicas=0"]);
        assert!(ok, "{out}");
        let (ok, out) = kubectl(&["-n", NAMESPACE, "wait", "--for=delete", "pod", "-l", "app.kubernetes.io/name=kcm-operator,!app.kubernetes.io/component", "--timeout=60s"]);
        assert!(ok || out.contains("no matching resources"), "deployment pods gone: {out}");
    }

    // Place the manifest on every master, as an admin would.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/static-pod").join(MANIFEST);
    for n in &nodes {
        let (ok, out) = sh(Command::new("docker").arg("cp").arg(&manifest).arg(format!("{n}:{MANIFEST_DIR}/{MANIFEST}")));
        assert!(ok, "docker cp to {n}: {out}");
    }

    // Three mirror pods Running and Ready.
    let pods: Api<Pod> = Api::namespaced(c.clone(), NAMESPACE);
    let names: Vec<String> = nodes.iter().map(|n| format!("kcm-operator-{n}")).collect();
    let t0 = Instant::now();
    let placed = k8s_openapi::jiff::Timestamp::now().as_second() - 2;
    let ready = poll("three operator mirror pods Ready", Duration::from_secs(120), || {
        let (pods, names) = (pods.clone(), names.clone());
        async move {
            for name in &names {
                let p = pods.get_opt(name).await.ok()??;
                let st = p.status?;
                // Started from the manifest just placed, not left over from an earlier run.
                if st.start_time.as_ref().is_none_or(|t| t.0.as_second() < placed) {
                    return None;
                }
                let ready = st.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
                if st.phase.as_deref() != Some("Running") || !ready {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    assert!(ready.is_some(), "static pods not Ready within 120s\n{}", diagnostics());
    println!("three operator mirror pods Running and Ready in {:.1}s: {names:?}", t0.elapsed().as_secs_f64());

    // Exactly one leader: the Lease names one of the masters, and exactly that pod says it leads.
    let leases: Api<Lease> = Api::namespaced(c.clone(), NAMESPACE);
    let settled = poll("one leader and two followers", Duration::from_secs(60), || {
        let (leases, nodes) = (leases.clone(), nodes.clone());
        async move {
            let h = holder(&leases).await?;
            let states: Vec<String> = nodes.iter().map(|n| election_state(&format!("kcm-operator-{n}"))).collect();
            let leaders: Vec<&String> = nodes.iter().zip(&states).filter(|(_, s)| *s == "leading").map(|(n, _)| n).collect();
            let followers = states.iter().filter(|s| *s == "following").count();
            (leaders.len() == 1 && followers == 2 && *leaders[0] == holder_node(&h)).then_some((h, states))
        }
    })
    .await;
    let Some((leader, states)) = settled else { panic!("no single leader\n{}", diagnostics()) };
    println!("Lease {NAMESPACE}/{LEASE_NAME} held by {leader}; replicas: {:?}", nodes.iter().zip(&states).collect::<Vec<_>>());
    let leader_node = holder_node(&leader).to_string();
    assert!(nodes.contains(&leader_node), "holder {leader} is not a master");
    let (_, logs) = kubectl(&["-n", NAMESPACE, "logs", &format!("kcm-operator-{leader_node}")]);
    assert!(logs.contains("client certificate minted") && logs.contains("user=\"kcm-operator\""), "host identity in use:\n{logs}");

    // Graceful failover: remove the leader's manifest; the kubelet stops it with SIGTERM,
    // it releases the lease, a follower takes it at its next retry.
    let t0 = Instant::now();
    let (ok, out) = on_node(&leader_node, &format!("rm {MANIFEST_DIR}/{MANIFEST}"));
    assert!(ok, "{out}");
    let next = poll("another replica holds the lease", Duration::from_secs(30), || {
        let (leases, leader_node) = (leases.clone(), leader_node.clone());
        async move { holder(&leases).await.filter(|h| holder_node(h) != leader_node) }
    })
    .await;
    let gap = t0.elapsed();
    let Some(next) = next else { panic!("no new holder within 30s of removing {leader_node}'s manifest\n{}", diagnostics()) };
    println!("graceful failover: {leader} -> {next} in {:.2}s after removing the manifest on {leader_node}", gap.as_secs_f64());
    assert!(gap < Duration::from_secs(10), "failover took {gap:?}");
    let (_, lease_yaml) = kubectl(&["-n", NAMESPACE, "get", "lease", LEASE_NAME, "-o", "jsonpath={.spec}"]);
    println!("lease now: {lease_yaml}");

    // Hard failover: SIGKILL the new leader's container (no release): the others wait for
    // the lease to expire (15 s after its last renewal), then one takes it.
    let next_node = holder_node(&next).to_string();
    let t0 = Instant::now();
    let (ok, out) = on_node(&next_node, "crictl stop --timeout 0 $(crictl ps -q --name '^operator$' --label io.kubernetes.pod.namespace=kcm-operator)");
    assert!(ok, "killing the operator on {next_node}: {out}");
    let third = poll("a holder other than the killed one", Duration::from_secs(40), || {
        let (leases, next) = (leases.clone(), next.clone());
        async move { holder(&leases).await.filter(|h| *h != next) }
    })
    .await;
    let gap = t0.elapsed();
    let Some(third) = third else { panic!("no new holder within 40s of killing {next}\n{}", diagnostics()) };
    println!("hard failover (SIGKILL, lease expiry): {next} -> {third} in {:.2}s", gap.as_secs_f64());
    assert!(gap < Duration::from_secs(25), "failover took {gap:?}");
}

#[test]
fn ansi_is_stripped() {
    assert_eq!(strip_ansi("\x1b[2mkcm\x1b[0m \x1b[3muser\x1b[0m\x1b[2m=\x1b[0m\"x\""), "kcm user=\"x\"");
}
