//! The kind test bed itself ("done when" of the test-bed issue), against the cluster that
//! `e2e/testbed/testbed.sh up` created. Reads `${KCM_STATE:-/var/tmp/kcm-e2e}/kubeconfig`.
//!
//! Run: `cargo test -p e2e --test testbed` (the top-level runner decides when).
//!
//! - 3 control-plane nodes, all Ready
//! - Lease kube-system/kube-controller-manager held by one of the 3 nodes
//! - a privileged hostNetwork+hostPID DaemonSet with a hostPath mount (local debootstrap image)
//!   runs one pod per node and runs the host's /opt/k8s/bin/kube-controller-manager --version
//! - a static Rust binary in a FROM-scratch image, loaded with `kind load`, runs as an
//!   ordinary (pod-network) Deployment
//!
//! Every wait is a poll with a deadline that prints what it last observed on failure.
//! Namespaces created here are deleted at the end, pass or fail.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::Client;
use serde_json::json;

/// The Kubernetes version the test bed built (testbed.sh writes it to $KCM_STATE/k8s-version;
/// it differs only where stock kind images were pulled).
fn k8s_version() -> String {
    std::fs::read_to_string(state_dir().join("k8s-version"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| e2e::apitier::k8s_version().into())
}
/// The debootstrapped Debian image the test bed imports into docker and into every node.
const BASE_IMAGE: &str = "kcm-testbed/debian:bookworm";
use kcm_operator::api::CONTROL_PLANE_LABEL;

fn state_dir() -> PathBuf {
    PathBuf::from(std::env::var("KCM_STATE").unwrap_or_else(|_| "/var/tmp/kcm-e2e".into()))
}

fn testbed_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testbed/testbed.sh")
}

async fn client() -> Result<Client> {
    Ok(e2e::kind::client().await)
}

/// Polls `check` every 2s until it returns `Ok(Ok(value))`, or fails after `timeout` with
/// the last observation (`Ok(Err(observed))`) or error.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, String>>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Ok(v)) => {
                eprintln!("ok after {:.0?}: {what}", start.elapsed());
                return Ok(v);
            }
            Ok(Err(observed)) => observed,
            Err(e) => format!("error: {e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for: {what}\nlast observed: {last}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn unique_ns(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{:x}{:x}", std::process::id() % 0xfff, nanos % 0xfffff)
}

/// Creates namespace `ns`, runs `body`, deletes the namespace (pass or fail).
async fn in_namespace<F, Fut>(client: &Client, ns: &str, body: F) -> Result<()>
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({
        "metadata": { "name": ns, "labels": { "kcm-operator.e2e/testbed": "true" } }
    }))?;
    namespaces.create(&PostParams::default(), &obj).await.with_context(|| format!("creating namespace {ns}"))?;
    let result = body(client.clone(), ns.to_string()).await;
    if let Err(e) = namespaces.delete(ns, &DeleteParams::default()).await {
        eprintln!("warning: deleting namespace {ns}: {e}");
    }
    result
}

fn is_ready(node: &Node) -> bool {
    node.status.as_ref().and_then(|s| s.conditions.as_ref()).map(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")).unwrap_or(false)
}

fn name_of<K: kube::Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

async fn control_plane_nodes(client: &Client) -> Result<Vec<Node>> {
    let nodes: Api<Node> = Api::all(client.clone());
    Ok(nodes.list(&ListParams::default().labels(CONTROL_PLANE_LABEL)).await?.items)
}

fn describe_pods(pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| {
            let st = p.status.as_ref();
            let phase = st.and_then(|s| s.phase.clone()).unwrap_or_default();
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            let waiting: Vec<String> = st
                .and_then(|s| s.container_statuses.as_ref())
                .map(|cs| {
                    cs.iter()
                        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                        .map(|w| format!("{}: {}", w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            format!("{} on {node}: {phase} {waiting:?}", name_of(p))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn three_control_plane_nodes_ready() -> Result<()> {
    let client = client().await?;
    let names = poll("3 control-plane nodes, all Ready", Duration::from_secs(180), || async {
        let nodes = control_plane_nodes(&client).await?;
        let seen: Vec<String> = nodes.iter().map(|n| format!("{}(ready={})", name_of(n), is_ready(n))).collect();
        if nodes.len() == 3 && nodes.iter().all(is_ready) {
            Ok(Ok(nodes.iter().map(name_of).collect::<Vec<_>>()))
        } else {
            Ok(Err(format!("{} control-plane nodes: {seen:?}", nodes.len())))
        }
    })
    .await?;
    // every node runs the Kubernetes version the test bed built
    for n in control_plane_nodes(&client).await? {
        let v = n.status.as_ref().and_then(|s| s.node_info.as_ref()).map(|i| i.kubelet_version.clone()).unwrap_or_default();
        assert_eq!(v, k8s_version(), "kubelet version of node {}", name_of(&n));
    }
    eprintln!("control-plane nodes: {names:?}");
    Ok(())
}

#[tokio::test]
async fn kcm_lease_held_by_a_control_plane_node() -> Result<()> {
    let client = client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let holder = poll("Lease kube-system/kube-controller-manager held by one of the 3 control-plane nodes", Duration::from_secs(180), || async {
        let nodes: Vec<String> = control_plane_nodes(&client).await?.iter().map(name_of).collect();
        let lease = match leases.get_opt("kube-controller-manager").await? {
            Some(l) => l,
            None => return Ok(Err("no Lease kube-system/kube-controller-manager".into())),
        };
        let spec = lease.spec.unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        // kcm's identity is "<hostname>_<uuid>"; kind node hostnames are the node names
        let host = holder.split('_').next().unwrap_or_default().to_string();
        if nodes.len() == 3 && nodes.contains(&host) && spec.renew_time.is_some() {
            Ok(Ok(holder))
        } else {
            Ok(Err(format!("holderIdentity={holder:?} renewTime={:?} nodes={nodes:?}", spec.renew_time)))
        }
    })
    .await?;
    eprintln!("kube-controller-manager lease holder: {holder}");
    Ok(())
}

#[tokio::test]
async fn privileged_hostpath_daemonset_runs_host_kcm() -> Result<()> {
    let client = client().await?;
    let ns = unique_ns("kcm-testbed-ds");
    in_namespace(&client, &ns, |client, ns| async move {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": { "name": "host-probe" },
            "spec": {
                "selector": { "matchLabels": { "app": "host-probe" } },
                "template": {
                    "metadata": { "labels": { "app": "host-probe" } },
                    "spec": {
                        "hostNetwork": true,
                        "hostPID": true,
                        "terminationGracePeriodSeconds": 1,
                        "tolerations": [{ "key": CONTROL_PLANE_LABEL, "operator": "Exists", "effect": "NoSchedule" }],
                        "containers": [{
                            "name": "probe",
                            "image": BASE_IMAGE,
                            "imagePullPolicy": "Never",
                            "securityContext": { "privileged": true },
                            "command": ["/bin/sh", "-c",
                                "echo \"HOSTPATH: $(/host/opt/k8s/bin/kube-controller-manager --version 2>&1)\"; \
                                 echo \"NSENTER: $(nsenter --target 1 --mount -- /opt/k8s/bin/kube-controller-manager --version 2>&1)\"; \
                                 echo \"HOSTNAME: $(cat /proc/sys/kernel/hostname)\"; \
                                 exec sleep 3600"],
                            "volumeMounts": [{ "name": "k8s-bin", "mountPath": "/host/opt/k8s/bin", "readOnly": true }]
                        }],
                        "volumes": [{ "name": "k8s-bin", "hostPath": { "path": "/opt/k8s/bin", "type": "Directory" } }]
                    }
                }
            }
        }))?;
        let dss: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        dss.create(&PostParams::default(), &ds).await?;

        let nodes: Vec<String> = control_plane_nodes(&client).await?.iter().map(name_of).collect();
        let running = poll("host-probe DaemonSet: one Running pod on each of the 3 nodes", Duration::from_secs(180), || async {
            let list = pods.list(&ListParams::default().labels("app=host-probe")).await?.items;
            let mut on: Vec<String> = list
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                .collect();
            on.sort();
            on.dedup();
            let mut want = nodes.clone();
            want.sort();
            if on == want && list.len() == 3 {
                Ok(Ok(list))
            } else {
                let st = dss.get(&name_of(&ds)).await?.status.unwrap_or_default();
                Ok(Err(format!("daemonset desired={} ready={}; pods: {}", st.desired_number_scheduled, st.number_ready, describe_pods(&list))))
            }
        })
        .await?;

        for pod in &running {
            let pname = name_of(pod);
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            let want = format!("Kubernetes {}", k8s_version());
            let logs = poll(&format!("pod {pname} on {node} to log the host's kcm --version"), Duration::from_secs(60), || async {
                let logs = pods.logs(&pname, &LogParams::default()).await.unwrap_or_default();
                if logs.contains(&format!("HOSTPATH: {want}")) && logs.contains(&format!("NSENTER: {want}")) {
                    Ok(Ok(logs))
                } else {
                    Ok(Err(format!("logs: {logs:?}")))
                }
            })
            .await?;
            // hostNetwork + hostPID: the pod sees the node's own hostname
            if !logs.contains(&format!("HOSTNAME: {node}")) {
                bail!("pod {pname} should see host name {node}; logs: {logs:?}");
            }
            eprintln!("{node}: {}", logs.lines().next().unwrap_or_default());
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn scratch_rust_image_loads_and_runs() -> Result<()> {
    // build the static binary, the FROM-scratch image, and `kind load` it into every node
    let script = testbed_script();
    let out = tokio::process::Command::new("bash").arg(&script).arg("hello").output().await.with_context(|| format!("running {} hello", script.display()))?;
    if !out.status.success() {
        bail!("{} hello failed ({}):\n{}", script.display(), out.status, String::from_utf8_lossy(&out.stderr));
    }
    let image = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    if image.is_empty() {
        return Err(anyhow!("{} hello printed no image name", script.display()));
    }

    let client = client().await?;
    let ns = unique_ns("kcm-testbed-hello");
    in_namespace(&client, &ns, |client, ns| async move {
        let dep: Deployment = serde_json::from_value(json!({
            "metadata": { "name": "hello" },
            "spec": {
                "replicas": 2,
                "selector": { "matchLabels": { "app": "hello" } },
                "template": {
                    "metadata": { "labels": { "app": "hello" } },
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "tolerations": [{ "key": CONTROL_PLANE_LABEL, "operator": "Exists", "effect": "NoSchedule" }],
                        "containers": [{
                            "name": "hello",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "env": [{ "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } }]
                        }]
                    }
                }
            }
        }))?;
        let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        deps.create(&PostParams::default(), &dep).await?;

        let running = poll("hello Deployment: 2 Running pods with pod-network IPs", Duration::from_secs(180), || async {
            let list = pods.list(&ListParams::default().labels("app=hello")).await?.items;
            let ok: Vec<&Pod> = list
                .iter()
                .filter(|p| {
                    let st = p.status.as_ref();
                    st.and_then(|s| s.phase.as_deref()) == Some("Running")
                        && st.and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| ip != st.and_then(|s| s.host_ip.as_deref()).unwrap_or(""))
                })
                .collect();
            if ok.len() == 2 {
                Ok(Ok(list))
            } else {
                Ok(Err(describe_pods(&list)))
            }
        })
        .await?;

        for pod in &running {
            let pname = name_of(pod);
            let logs = poll(&format!("pod {pname} to log its hello line"), Duration::from_secs(60), || async {
                let logs = pods.logs(&pname, &LogParams::default()).await.unwrap_or_default();
                if logs.contains("hello from a static Rust binary in a FROM-scratch image") {
                    Ok(Ok(logs))
                } else {
                    Ok(Err(format!("logs: {logs:?}")))
                }
            })
            .await?;
            eprintln!("{pname}: {}", logs.trim());
        }
        Ok(())
    })
    .await
}
