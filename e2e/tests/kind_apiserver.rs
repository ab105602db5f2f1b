//! The seed's apiserver on kind (3 control-plane nodes), on the cluster kind_operator.rs
//! leaves: kube-apiserver bound to each master's own address only (`--bind-address=<InternalIP>`
//! added to kubeadm's static pod, one master at a time, as the seed runs it), so that nothing
//! answers on 127.0.0.1:6443 on any master. The operator's static pods name the CR's
//! `apiserverUrl` (kind's load balancer), never 127.0.0.1:6443; every operator process
//! SIGKILLed afterwards comes back, reaches the apiserver and one of them leads; a replica cut
//! off from the apiserver is not Ready and says so in its log once (and once when it is back);
//! a spec change rolls out leader last, never two masters without kcm.
//!
//! The apiservers stay bound for the tests after this one: kind_rescue's rescue, kind_crash,
//! kind_idle, kind_rotation and kind_bootstrap run against them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::apitier::poll;
use e2e::kind::{client, diagnostics, kubectl, masters, now_secs, on_node, operator_lease, pod_ready, sh, strip_ansi};
use e2e::leadership::HealthWatch;
use k8s_openapi::api::core::v1::{Node, Pod};
use kcm_operator::api::{KubeControllerManager, CR_NAME, NAMESPACE, OPERATOR_APP, OPERATOR_HEALTH_PORT, OPERATOR_MANIFEST};
use kcm_operator::pki::NodeIdentity;
use kcm_operator::render::spec_revision;
use kcm_operator::rollout::spec_part;
use kube::api::{Api, Patch, PatchParams};

const APISERVER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
/// kind's load balancer container (TESTBED.md): the CR's apiserverUrl names it.
const LB_CONTAINER: &str = "kcm-external-load-balancer";

async fn node_ip(c: &kube::Client, m: &str) -> String {
    let n = Api::<Node>::all(c.clone()).get(m).await.unwrap_or_else(|e| panic!("reading Node {m}: {e}"));
    NodeIdentity::from_node(&n).unwrap_or_else(|e| panic!("addresses of {m}: {e}")).primary_ip().to_string()
}

/// curl's exit code and output for `url` inside `node` (7: connection refused).
fn curl(node: &str, url: &str) -> (i32, String) {
    let (_, out) = on_node(node, &format!("out=$(curl -sk -m 3 {url} 2>/dev/null); echo \"$?:$out\""));
    let (code, body) = out.trim().split_once(':').unwrap_or(("-1", ""));
    (code.parse().unwrap_or(-1), body.to_string())
}

/// Adds `--bind-address=<ip>` after kubeadm's `--advertise-address` (written beside the
/// static pod directory and moved in: the kubelet never sees a half-written manifest).
fn bind_to_node_ip(node: &str, ip: &str) {
    let script = format!(
        "f={APISERVER_MANIFEST}; t=/etc/kubernetes/kube-apiserver.yaml.bind; \
         if ! grep -q -- '--bind-address=' $f; then sed 's#^\\( *\\)- --advertise-address=.*$#&\\n\\1- --bind-address={ip}#' $f > $t && mv $t $f; fi; \
         grep -q -- '- --bind-address={ip}$' $f"
    );
    let (ok, out) = on_node(node, &script);
    assert!(ok, "--bind-address={ip} in {node}'s {APISERVER_MANIFEST}: {out}");
}

/// The operator's /readyz on `node` (its health port, inside the node): the HTTP code.
fn operator_readyz(node: &str) -> String {
    on_node(node, &format!("curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{OPERATOR_HEALTH_PORT}/readyz")).1.trim().to_string()
}

/// The operator's log on `node` since `since` (RFC 3339), colours stripped.
fn operator_log(node: &str, since: &str) -> String {
    let (_, out) = kubectl(&["-n", NAMESPACE, "logs", &format!("{OPERATOR_APP}-{node}"), &format!("--since-time={since}")]);
    strip_ansi(&out)
}

fn rfc3339_now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Takes the REJECT rules (`(iptables or ip6tables, rule)`) out again, also when the test panics.
struct Unblock(String, Vec<(&'static str, String)>);

impl Drop for Unblock {
    fn drop(&mut self) {
        for (tool, rule) in &self.1 {
            let (ok, out) = on_node(&self.0, &format!("while {tool} -D {rule} 2>/dev/null; do :; done; true"));
            if !ok {
                eprintln!("removing the {tool} rule on {}: {out}", self.0);
            }
        }
    }
}

#[tokio::test]
async fn the_operator_reaches_an_apiserver_bound_to_the_node_address_only() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "three control-plane nodes");
    let (kcm, _) = e2e::kind::cr(&c).await.expect("the CR (kind_ha.rs applied it)");
    let url = kcm.spec.apiserver_url.clone();

    // 1. The operator's static pods name the CR's apiserverUrl, not 127.0.0.1:6443.
    let manifest = format!("/etc/kubernetes/manifests/{OPERATOR_MANIFEST}");
    for m in &masters {
        let (_, text) = on_node(m, &format!("cat {manifest}"));
        assert!(text.contains(&format!("--apiserver={url}")) && !text.contains("127.0.0.1:6443"), "{m}'s {manifest} names {url} only:\n{text}");
    }

    // 2. Each apiserver bound to its master's own address, one master at a time.
    let t0 = Instant::now();
    for m in &masters {
        let ip = node_ip(&c, m).await;
        bind_to_node_ip(m, &ip);
        let bound = poll(&format!("{m}'s apiserver on {ip} only"), Duration::from_secs(240), || {
            let (m, ip) = (m.clone(), ip.clone());
            async move {
                let (loopback, _) = curl(&m, "https://127.0.0.1:6443/readyz");
                let (code, body) = curl(&m, &format!("https://{ip}:6443/readyz"));
                (loopback == 7 && code == 0 && body == "ok").then_some(())
            }
        })
        .await;
        assert!(bound.is_some(), "{m}: the apiserver did not come back on {ip} only within 240s\n{}", diagnostics());
        println!("{m}: kube-apiserver answers on {ip}:6443 only (127.0.0.1:6443 refused) at +{:.1}s", t0.elapsed().as_secs_f64());
    }
    for m in &masters {
        assert_eq!(curl(m, "https://127.0.0.1:6443/readyz").0, 7, "{m}: 127.0.0.1:6443 refused");
    }

    // 3. Every operator process SIGKILLed: each new one reaches the apiserver at the CR's URL,
    // one leads (a new holder: the identity is unique per process), all three Ready.
    let old_holder = operator_lease(&c).await.and_then(|l| l.holder);
    let killed_at = rfc3339_now();
    for m in &masters {
        let (ok, out) = on_node(m, "pkill -KILL -x kcm-operator");
        assert!(ok, "SIGKILL to the operator on {m}: {out}");
    }
    let t0 = Instant::now();
    let pods = Api::<Pod>::namespaced(c.clone(), NAMESPACE);
    let led = poll("a new operator leader", Duration::from_secs(120), || async {
        let l = operator_lease(&c).await?;
        (l.live(now_secs()) && l.holder != old_holder).then_some(l.holder?)
    })
    .await;
    let Some(new_holder) = led else {
        panic!("no new operator Lease holder within 120s after every operator was killed (was {old_holder:?})\n{}", diagnostics())
    };
    println!("operator Lease: {old_holder:?} -> {new_holder} in {:.1}s after every operator was SIGKILLed", t0.elapsed().as_secs_f64());
    let ready = poll("three operator replicas Ready", Duration::from_secs(120), || async {
        for m in &masters {
            let p = pods.get_opt(&format!("{OPERATOR_APP}-{m}")).await.ok()??;
            if !pod_ready(&p) || operator_readyz(m) != "200" {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(ready.is_some(), "the three operator replicas Ready again (API and their /readyz)\n{}", diagnostics());
    for m in &masters {
        let log = operator_log(m, &killed_at);
        let line = log.lines().find(|l| l.contains("client certificate minted")).unwrap_or_else(|| panic!("{m}: no new session in the log:\n{log}"));
        assert!(line.contains(&format!("apiserver={url}")) || line.contains(&format!("apiserver=\"{url}\"")), "{m}: the session reaches {url}: {line}");
    }

    // 4. A replica cut off from the apiserver (the load balancer rejected inside its master) is
    // not Ready and says so once; back, it is Ready again and says so once. The master cut off
    // is neither kcm's leader's nor the operator leader's (its kubelet and kcm lose the API too).
    let kcm_leader = e2e::kind::kcm_lease(&c).await.and_then(|l| l.node());
    let op_leader = operator_lease(&c).await.and_then(|l| l.node());
    let cut = masters.iter().find(|m| Some(*m) != kcm_leader.as_ref() && Some(*m) != op_leader.as_ref()).expect("a master that leads nothing").clone();
    // Both families: the load balancer's name may resolve to an IPv6 address too.
    let (ok, lb) = sh(std::process::Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}} {{end}}",
        LB_CONTAINER,
    ]));
    let addrs: Vec<String> = lb.split_whitespace().map(str::to_string).collect();
    assert!(ok && !addrs.is_empty(), "the load balancer's addresses: {lb}");
    let lb = addrs.join(",");
    let rules: Vec<(&'static str, String)> = addrs
        .iter()
        .map(|a| (if a.contains(':') { "ip6tables" } else { "iptables" }, format!("OUTPUT -p tcp -d {a} --dport 6443 -j REJECT --reject-with tcp-reset")))
        .collect();
    let cut_at = rfc3339_now();
    let unblock = Unblock(cut.clone(), rules.clone());
    for (tool, rule) in &rules {
        let (ok, out) = on_node(&cut, &format!("{tool} -I {rule}"));
        assert!(ok, "{tool} on {cut}: {out}");
    }
    let t0 = Instant::now();
    let unready = poll(&format!("{cut}'s operator not Ready"), Duration::from_secs(30), || async { (operator_readyz(&cut) != "200").then_some(()) }).await;
    assert!(unready.is_some(), "{cut}'s operator still Ready 30s after its apiserver was cut off\n{}", operator_log(&cut, &cut_at));
    let not_ready_after = t0.elapsed();
    // Several looks fail meanwhile (one every reach::PROBE_PERIOD): still one line.
    let looks = 3;
    tokio::time::sleep(kcm_operator::reach::PROBE_PERIOD * looks).await;
    assert_ne!(operator_readyz(&cut), "200", "{cut}'s operator Ready while cut off");
    let log = operator_log(&cut, &cut_at);
    let unreachable = log.lines().filter(|l| l.contains("apiserver unreachable")).count();
    assert_eq!(unreachable, 1, "{cut}: 'apiserver unreachable' logged once over {looks}+ failed looks:\n{log}");
    drop(unblock);
    let back_at = Instant::now();
    let back = poll(&format!("{cut}'s operator Ready again"), Duration::from_secs(30), || async { (operator_readyz(&cut) == "200").then_some(()) }).await;
    assert!(back.is_some(), "{cut}'s operator not Ready within 30s after its apiserver came back\n{}", operator_log(&cut, &cut_at));
    let log = operator_log(&cut, &cut_at);
    assert_eq!(log.lines().filter(|l| l.contains("apiserver answers again")).count(), 1, "{cut}: its return logged once:\n{log}");
    println!(
        "{cut} cut off from {lb} port 6443: not Ready after {:.1}s, one log line over {looks}+ failed looks; Ready again {:.1}s after",
        not_ready_after.as_secs_f64(),
        back_at.elapsed().as_secs_f64()
    );

    // 5. A spec change rolls out leader last, never two masters without kcm (/healthz, 10 Hz).
    let health = HealthWatch::start(&c, &masters).await;
    let leader = e2e::kind::kcm_lease(&c).await.and_then(|l| l.node()).expect("a kcm leader");
    let kcms = Api::<KubeControllerManager>::all(c.clone());
    let k = kcms.get(CR_NAME).await.unwrap();
    let syncs = if k.spec.kcm.extra_args.get("concurrent-deployment-syncs").map(String::as_str) == Some("6") { "7" } else { "6" };
    let patch = serde_json::json!({"spec": {"kcm": {"extraArgs": {"concurrent-deployment-syncs": syncs}}}});
    kcms.patch(CR_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let t0 = Instant::now();
    let applied_at = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, Duration>::new()));
    let (worst, log) = health
        .max_down_during(&masters, Duration::from_secs(300), || {
            let (c, masters, applied_at) = (c.clone(), masters.clone(), applied_at.clone());
            async move {
                let Some((k, s)) = e2e::kind::cr(&c).await else { return false };
                let rev = spec_revision(&k.spec);
                let mut at = applied_at.lock().unwrap();
                for n in &s.nodes {
                    if n.healthy && n.applied_revision.as_deref().and_then(spec_part).as_deref() == Some(rev.as_str()) {
                        at.entry(n.name.clone()).or_insert(t0.elapsed());
                    }
                }
                masters.iter().all(|m| at.contains_key(m))
            }
        })
        .await;
    let applied_at = applied_at.lock().unwrap().clone();
    println!("--concurrent-deployment-syncs={syncs} with the apiservers on the node addresses: applied at {applied_at:?}; leader {leader}; most masters down at once (/healthz): {worst}; {log}");
    assert_eq!(worst, 1, "one master at a time without kcm (0: the watch missed the outage): {log}");
    assert!(applied_at.iter().all(|(n, t)| *n == leader || *t < applied_at[&leader]), "the leader's master goes last: {applied_at:?}");
    for m in &masters {
        let (_, unit) = on_node(m, &format!("cat {}", k.spec.paths.unit));
        assert!(unit.contains(&format!("--concurrent-deployment-syncs={syncs} ")), "the new flag on {m}");
    }
}
