//! A helper killed in the middle of a step (issue 8, crash-safe steps), on kind (3
//! control-plane nodes), on the cluster kind_rescue.rs leaves: our kcm 3/3 under systemd.
//!
//! Three times, on one master each: the helper is told (the test hook file
//! `/run/kcm-node-helper.crash-at`, see node-helper/src/journal.rs) to SIGKILL itself at one
//! point of a step, and the step is started by deleting that master's kcm certificate (drift:
//! the operator gives the master a repair step, which gets a new key and certificate):
//! - `key-written` on a follower: after the new key is written, before the certificate;
//! - `unit-stopped` on the leader: after `systemctl stop`, before the Lease hand-off and start;
//! - `unit-written` on the other follower: after every file is written, before the restart.
//!
//! Each time: the helper container restarts (the kill happened), the new helper resumes the
//! journaled step, and the master ends healthy with the step applied; its key, certificate
//! and kubeconfig belong together and kcm serves that certificate; exactly one certificate
//! was issued for the step; kubeadm's manifest stays moved aside; no journal and no `.prev`
//! file is left. Sampled every second meanwhile: never two masters without an active kcm.

use std::time::{Duration, Instant};

use e2e::kind::{all_healthy, client, cr, diagnostics, masters, now_secs, on_node, pod_node, pods_with_app, unit_active};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kcm_operator::api::{KcmNode, CSR_NODE_LABEL, CSR_REVISION_ANNOTATION, HELPER_APP, SIGNER_NAME};
use kcm_operator::pki::{self, CertInfo};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

const CRASH_AT: &str = "/run/kcm-node-helper.crash-at";
const JOURNAL: &str = node_helper::journal::DEFAULT_PATH;

async fn wait_all_healthy(c: &kube::Client, masters: &[String], within: Duration, what: &str) -> String {
    e2e::kind::await_healthy(c, masters, 0.0, within).await.unwrap_or_else(|why| panic!("{what}: {why}\n{}", diagnostics()))
}

/// Restarts of the helper container on `node` (DaemonSet pod).
async fn helper_restarts(c: &kube::Client, node: &str) -> i32 {
    let pods = pods_with_app(c, HELPER_APP).await;
    let pod = pods.iter().find(|p| pod_node(p).as_deref() == Some(node)).unwrap_or_else(|| panic!("no helper pod on {node}"));
    pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.first()).map_or(0, |c| c.restart_count)
}

fn read_on(node: &str, path: &str) -> String {
    let (ok, out) = on_node(node, &format!("cat {path}"));
    assert!(ok, "reading {path} on {node}: {out}");
    out
}

/// Kills the helper on `target` at `point` of a repair step, and checks how the step ends.
async fn crash_at(c: &kube::Client, masters: &[String], target: &str, point: &str) {
    let (kcm, _) = cr(c).await.expect("the CR");
    let paths = kcm.spec.paths.clone();
    let kcm_nodes = Api::<KcmNode>::all(c.clone());
    // The step this kill interrupts is a new repair: what was applied before does not count.
    let applied_before = kcm_nodes.get(target).await.expect("the target's KcmNode").status.and_then(|s| s.applied_revision);
    let restarts_before = helper_restarts(c, target).await;
    let _disarm = Disarm(target.to_string());
    let (ok, out) = on_node(target, &format!("echo {point} > {CRASH_AT} && rm -f {}", paths.cert));
    assert!(ok, "arming {point} on {target}: {out}");
    let t0 = Instant::now();
    let mut fewest_active = masters.len();
    let mut applied = None;
    while t0.elapsed() < Duration::from_secs(300) {
        let sample = Instant::now();
        let active = masters.iter().filter(|m| unit_active(m)).count();
        fewest_active = fewest_active.min(active);
        assert!(
            active >= masters.len() - 1,
            "{point}: {active} of {} masters run kcm at +{:.0}s\n{}",
            masters.len(),
            t0.elapsed().as_secs_f64(),
            diagnostics()
        );
        // Done: the helper was killed and restarted, and its KcmNode shows a new repair applied.
        let me = kcm_nodes.get(target).await.ok();
        let (target_rev, st) =
            (me.as_ref().and_then(|n| n.spec.target_revision.as_ref().map(|r| r.to_string())), me.and_then(|n| n.status).unwrap_or_default());
        let done = target_rev.as_deref().is_some_and(|t| t.contains("/repair-"))
            && st.applied_revision == target_rev
            && st.applied_revision != applied_before
            && st.healthy
            && helper_restarts(c, target).await > restarts_before;
        if done && all_healthy(c, masters, now_secs() - 25.0).await.is_ok() {
            applied = st.applied_revision.clone();
            break;
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(sample.elapsed())).await;
    }
    let revision = applied.unwrap_or_else(|| panic!("{point}: the repair of {target} did not end healthy within 300s\n{}", diagnostics()));
    let took = t0.elapsed().as_secs_f64();
    let restarts = helper_restarts(c, target).await - restarts_before;
    println!("{point} on {target}: helper killed ({restarts} container restart), step {revision} applied and 3/3 healthy after {took:.1}s; fewest masters running kcm meanwhile: {fewest_active}");
    assert_eq!(restarts, 1, "{point}: the helper on {target} was killed once (container restarts)");
    assert!(!on_node(target, &format!("test -e {CRASH_AT}")).0, "{point}: the hook fired and removed itself");

    // The master's files belong together, and kcm serves the certificate on disk.
    let cert = CertInfo::from_pem(read_on(target, &paths.cert).as_bytes(), "certificate on disk").expect("a certificate");
    let key = pki::key_from_pem(&read_on(target, &paths.key), "key on disk").expect("a key");
    assert!(cert.matches_key(&key), "{point}: key and certificate on {target} belong together");
    let kubeconfig = read_on(target, &paths.kubeconfig);
    assert!(kubeconfig.contains(&paths.cert) && kubeconfig.contains(&paths.key), "{point}: the kubeconfig on {target} names the cert and key files");
    let (_, s) = cr(c).await.expect("the CR");
    let n = s.nodes.iter().find(|n| n.name == target).expect("status entry");
    assert_eq!(
        n.cert_serial.as_deref().map(str::to_ascii_lowercase),
        Some(cert.serial_hex.to_ascii_lowercase()),
        "{point}: kcm on {target} runs (and was probed serving) the certificate on disk"
    );
    // Exactly one certificate was issued for the step: the resumed step reused its request.
    let lp = ListParams::default().labels(&format!("{CSR_NODE_LABEL}={target}"));
    let csrs = Api::<CertificateSigningRequest>::all(c.clone()).list(&lp).await.unwrap();
    let issued: Vec<String> = csrs
        .items
        .iter()
        .filter(|x| x.spec.signer_name == SIGNER_NAME && x.annotations().get(CSR_REVISION_ANNOTATION) == Some(&revision))
        .filter(|x| x.status.as_ref().and_then(|s| s.certificate.as_ref()).is_some())
        .map(|x| x.name_any())
        .collect();
    assert_eq!(issued.len(), 1, "{point}: certificates issued to {target} for {revision}: {issued:?}");
    // kubeadm's manifest is where adoption put it; nothing of the step is left over.
    assert!(!on_node(target, &format!("test -e {}", paths.static_pod_manifest)).0, "{point}: kubeadm's kcm manifest stays moved aside on {target}");
    let adopted = node_helper::step::adopted_path(&kcm.spec).unwrap();
    assert!(on_node(target, &format!("test -s {adopted}")).0, "{point}: kubeadm's manifest kept at {adopted} on {target}");
    assert!(!on_node(target, &format!("test -e {JOURNAL}")).0, "{point}: no journal left on {target}");
    let prevs = on_node(target, &format!("ls {0}.prev {1}.prev {2}.prev {3}.prev 2>/dev/null", paths.key, paths.cert, paths.kubeconfig, paths.unit)).1;
    assert!(prevs.trim().is_empty(), "{point}: .prev files left on {target}: {prevs}");
}

/// Removes the hook file, also when the test fails before the helper consumed it.
struct Disarm(String);

impl Drop for Disarm {
    fn drop(&mut self) {
        on_node(&self.0, &format!("rm -f {CRASH_AT}"));
    }
}

#[tokio::test]
async fn a_helper_killed_mid_step_resumes_it() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    let leader = wait_all_healthy(&c, &masters, Duration::from_secs(180), "before the kills").await;
    let followers: Vec<String> = masters.iter().filter(|m| **m != leader).cloned().collect();
    crash_at(&c, &masters, &followers[0], "key-written").await;
    let leader = wait_all_healthy(&c, &masters, Duration::from_secs(120), "after key-written").await;
    crash_at(&c, &masters, &leader, "unit-stopped").await;
    wait_all_healthy(&c, &masters, Duration::from_secs(120), "after unit-stopped").await;
    let target = followers[1].clone();
    crash_at(&c, &masters, &target, "unit-written").await;
    wait_all_healthy(&c, &masters, Duration::from_secs(120), "after the kills").await;
}
