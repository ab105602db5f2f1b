//! On the kind cluster (3 control-plane nodes), after `kubectl apply -k manifests/kind/`
//! (kind_ha.rs applied it; applied again here, idempotent): the operator runs as a static pod
//! on every master by default. Each node-helper places /etc/kubernetes/manifests/kcm-operator.yaml
//! on its master (image pinned to the helper's own); there is no operator Deployment. The
//! three mirror pods are Running and Ready with a client certificate minted from the host
//! CA, exactly one replica leads on Lease kcm-operator/kcm-operator; when the leader's
//! process gets SIGTERM (it releases the lease; the kubelet restarts the container) another
//! replica holds the lease within a few seconds; when a leader is killed outright (SIGKILL,
//! no release) another takes over once the 15 s lease expires. Nothing is removed at the
//! end: the static pods are the product's default, and the next tests rely on them.

use std::time::{Duration, Instant};

use e2e::apitier::poll;
use e2e::kind::{client, masters, on_node, pod_ready};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kcm_operator::api::OPERATOR_LEASE;
use kcm_operator::api::{HELPER_DAEMONSET, NAMESPACE, OPERATOR_APP, OPERATOR_MANIFEST};
use kube::api::{Api, ListParams};

const MANIFEST_DIR: &str = "/etc/kubernetes/manifests";

/// The master a Lease holder identity (`<hostname>_<random>`) names.
fn holder_node(holder: &str) -> String {
    kcm_operator::rollout::leader_node(Some(holder)).unwrap_or_default()
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let (ok, out) = e2e::kind::kubectl(args);
    (ok, e2e::kind::strip_ansi(&out))
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
    let l = leases.get_opt(OPERATOR_LEASE).await.ok()??;
    l.spec?.holder_identity.filter(|h| !h.is_empty())
}

fn diagnostics() -> String {
    let (_, pods) = kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "wide"]);
    let (_, lease) = kubectl(&["-n", NAMESPACE, "get", "lease", OPERATOR_LEASE, "-o", "yaml"]);
    let (_, logs) = kubectl(&["-n", NAMESPACE, "logs", "-l", "app.kubernetes.io/component=static-pod", "--prefix", "--tail", "15"]);
    format!("pods:\n{pods}\nlease:\n{lease}\nlogs:\n{logs}\n{}", e2e::kind::diagnostics())
}

/// The three mirror pods `kcm-operator-<node>` Running and Ready.
async fn mirror_pods_ready(pods: &Api<Pod>, nodes: &[String]) -> Option<Vec<Pod>> {
    let mut out = Vec::new();
    for n in nodes {
        let p = pods.get_opt(&format!("{OPERATOR_APP}-{n}")).await.ok()??;
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !running || !pod_ready(&p) {
            return None;
        }
        out.push(p);
    }
    Some(out)
}

/// Exactly one replica says it leads, the two others follow, and the Lease names the leader's master.
async fn one_leader(leases: &Api<Lease>, nodes: &[String]) -> Option<(String, Vec<String>)> {
    let h = holder(leases).await?;
    let states: Vec<String> = nodes.iter().map(|n| election_state(&format!("{OPERATOR_APP}-{n}"))).collect();
    let leaders: Vec<&String> = nodes.iter().zip(&states).filter(|(_, s)| *s == "leading").map(|(n, _)| n).collect();
    let followers = states.iter().filter(|s| *s == "following").count();
    (leaders.len() == 1 && followers == 2 && *leaders[0] == holder_node(&h)).then_some((h, states))
}

fn restarts(p: &Pod) -> i32 {
    p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

#[tokio::test]
async fn operator_static_pods_elect_one_leader_and_fail_over() {
    let (ok, out) = e2e::kind::apply_kustomization("manifests/kind/");
    assert!(ok, "kubectl apply -k manifests/kind/:\n{out}");
    let c = client().await;
    let nodes = masters(&c).await;
    assert_eq!(nodes.len(), 3, "three control-plane nodes: {nodes:?}");

    // No operator Deployment: the static pods are the default.
    let deps = Api::<Deployment>::namespaced(c.clone(), NAMESPACE).list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = deps.items.iter().filter_map(|d| d.metadata.name.clone()).collect();
    assert!(names.is_empty(), "no Deployment in {NAMESPACE}: {names:?}");

    // The helper placed the manifest on every master, with the helper's own image.
    let ds = Api::<DaemonSet>::namespaced(c.clone(), NAMESPACE).get(HELPER_DAEMONSET).await.expect("the helper DaemonSet");
    let image = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|s| s.containers[0].image.clone().unwrap_or_default()).unwrap_or_default();
    let path = format!("{MANIFEST_DIR}/{OPERATOR_MANIFEST}");
    let t0 = Instant::now();
    for n in &nodes {
        let placed = poll(&format!("{path} on {n}"), Duration::from_secs(120), || async {
            let (ok, text) = on_node(n, &format!("cat {path}"));
            ok.then_some(text)
        })
        .await;
        let Some(text) = placed else { panic!("the helper did not place {path} on {n} within 120s\n{}", diagnostics()) };
        let pod: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} on {n} is not YAML ({e}):\n{text}"));
        assert_eq!(pod["spec"]["containers"][0]["image"].as_str(), Some(image.as_str()), "{path} on {n} runs the helper's image");
    }
    println!("{path} placed by the helper on {nodes:?} ({:.1}s), image {image}", t0.elapsed().as_secs_f64());

    // Three mirror pods Running and Ready.
    let pods: Api<Pod> = Api::namespaced(c.clone(), NAMESPACE);
    let t0 = Instant::now();
    let ready = poll("three operator mirror pods Ready", Duration::from_secs(120), || mirror_pods_ready(&pods, &nodes)).await;
    let Some(ready) = ready else { panic!("static pods not Ready within 120s\n{}", diagnostics()) };
    for p in &ready {
        let img = p.spec.as_ref().and_then(|s| s.containers[0].image.clone());
        assert_eq!(img.as_deref(), Some(image.as_str()), "mirror pod {:?} runs the helper's image", p.metadata.name);
    }
    println!("three operator mirror pods Running and Ready ({:.1}s)", t0.elapsed().as_secs_f64());

    // Exactly one leader: the Lease names one of the masters, and exactly that pod says it leads.
    let leases: Api<Lease> = Api::namespaced(c.clone(), NAMESPACE);
    let settled = poll("one leader and two followers", Duration::from_secs(60), || one_leader(&leases, &nodes)).await;
    let Some((leader, states)) = settled else { panic!("no single leader\n{}", diagnostics()) };
    println!("Lease {NAMESPACE}/{OPERATOR_LEASE} held by {leader}; replicas: {:?}", nodes.iter().zip(&states).collect::<Vec<_>>());
    let leader_node = holder_node(&leader);
    assert!(nodes.contains(&leader_node), "holder {leader} is not a master");
    let (_, logs) = kubectl(&["-n", NAMESPACE, "logs", &format!("{OPERATOR_APP}-{leader_node}")]);
    assert!(logs.contains("client certificate minted") && logs.contains("user=\"kcm-operator\""), "host identity in use:\n{logs}");

    // Graceful failover: SIGTERM to the leader's process; it releases the lease, the kubelet
    // restarts the container. The lease goes to another holder identity: a follower at its
    // next retry, or the restarted replica on the same master, which may start and take the
    // released lease before a follower's retry comes (CI saw it).
    let before = pods.get(&format!("{OPERATOR_APP}-{leader_node}")).await.map(|p| restarts(&p)).unwrap_or(0);
    let t0 = Instant::now();
    let (ok, out) = on_node(&leader_node, "pkill -TERM -x kcm-operator");
    assert!(ok, "SIGTERM to kcm-operator on {leader_node}: {out}");
    let next = poll("another holder identity holds the lease", Duration::from_secs(30), || {
        let (leases, leader) = (leases.clone(), leader.clone());
        async move { holder(&leases).await.filter(|h| *h != leader) }
    })
    .await;
    let gap = t0.elapsed();
    let Some(next) = next else { panic!("no new holder within 30s of SIGTERM to the operator on {leader_node}\n{}", diagnostics()) };
    println!("graceful failover (SIGTERM, lease released): {leader} -> {next} in {:.2}s", gap.as_secs_f64());
    assert!(gap < Duration::from_secs(10), "failover took {gap:?}");
    let (_, lease_yaml) = kubectl(&["-n", NAMESPACE, "get", "lease", OPERATOR_LEASE, "-o", "jsonpath={.spec}"]);
    println!("lease now: {lease_yaml}");
    let restarted = poll("the SIGTERMed replica restarted and Ready", Duration::from_secs(90), || async {
        let p = pods.get_opt(&format!("{OPERATOR_APP}-{leader_node}")).await.ok()??;
        (restarts(&p) > before && pod_ready(&p)).then_some(restarts(&p))
    })
    .await;
    let Some(r) = restarted else { panic!("the operator on {leader_node} was not restarted by the kubelet within 90s\n{}", diagnostics()) };
    println!("the kubelet restarted the operator on {leader_node} (restarts {before} -> {r}) in {:.1}s", t0.elapsed().as_secs_f64());

    // Hard failover: SIGKILL the new leader's process (no release): the others wait for the
    // lease to expire (15 s after its last renewal), then one takes it.
    let next_node = holder_node(&next);
    let t0 = Instant::now();
    let (ok, out) = on_node(&next_node, "pkill -KILL -x kcm-operator");
    assert!(ok, "SIGKILL to kcm-operator on {next_node}: {out}");
    let third = poll("a holder other than the killed one", Duration::from_secs(40), || {
        let (leases, next) = (leases.clone(), next.clone());
        async move { holder(&leases).await.filter(|h| *h != next) }
    })
    .await;
    let gap = t0.elapsed();
    let Some(third) = third else { panic!("no new holder within 40s of killing {next}\n{}", diagnostics()) };
    println!("hard failover (SIGKILL, lease expiry): {next} -> {third} in {:.2}s", gap.as_secs_f64());
    assert!(gap < Duration::from_secs(25), "failover took {gap:?}");

    // Leave it as found: three Ready replicas, one leader.
    let t0 = Instant::now();
    let ready = poll("three operator mirror pods Ready again", Duration::from_secs(120), || mirror_pods_ready(&pods, &nodes)).await;
    assert!(ready.is_some(), "static pods not all Ready again within 120s\n{}", diagnostics());
    let settled = poll("one leader again", Duration::from_secs(60), || one_leader(&leases, &nodes)).await;
    let Some((leader, _)) = settled else { panic!("no single leader after the failovers\n{}", diagnostics()) };
    println!("after the failovers: three replicas Ready, {leader} leads ({:.1}s)", t0.elapsed().as_secs_f64());
}
