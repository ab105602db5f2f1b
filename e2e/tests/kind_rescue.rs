//! Rescue and repair on kind (3 control-plane nodes), on the cluster kind_ha.rs and
//! kind_operator.rs leave: our kcm runs 3/3 under systemd from manifests/kind, the operator
//! runs as static pods placed by the helper DaemonSet.
//!
//! a. Rescue: kcm stopped on all three masters and every helper pod deleted (so nothing
//!    recreates them: the DaemonSet controller is inside kcm). The operator creates rescue
//!    helper pods pinned by nodeName, they repair the masters one at a time, the cluster is
//!    back to 3/3 with one leader by itself, and the rescue pods go once the DaemonSet's own
//!    pods are Ready again. Sampled every second meanwhile: READY never counts more healthy
//!    masters than actually ran kcm (give or take the staleness window), LEADER is empty
//!    whenever kcm's Lease has expired.
//! b. Two of three broken (their kcm certificate replaced by an expired one signed by the
//!    cluster CA, units restarted): both repaired, one at a time, the healthy third never
//!    touched.
//! c. Drift: the certificate file deleted on one master and its kcm restarted: the status
//!    names the missing file, then the master is repaired by itself.
//!
//! One test, in phases, because every phase builds on the cluster state the one before left.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use e2e::kind::{
    all_healthy, client, cr, diagnostics, kcm_lease, kubectl, masters, now_secs, observed_at, on_node, pod_node, pod_ready, pods_with_app, ready_counts,
    report_fresh, unit_active, write_on_node,
};
use kcm_operator::api::{NodeStatus, HELPER_APP, KCM_USER, NAMESPACE, REPORT_PERIOD_SECS, RESCUE_APP, STALE_AFTER_SECS};
use kcm_operator::pki::CertInfo;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};

/// READY may lag the hosts: a helper looks at its master at least every REPORT_PERIOD_SECS
/// and a report counts for STALE_AFTER_SECS after the helper looked. So a healthy count `h`
/// at time t is true if `h` units were active at some moment within the preceding
/// STALE_AFTER_SECS + REPORT_PERIOD_SECS seconds.
const READY_TOLERANCE_SECS: f64 = (STALE_AFTER_SECS + REPORT_PERIOD_SECS) as f64;
/// The operator's reaction time to an expired kcm Lease: LEADER must be empty in every
/// sample taken when the Lease had expired longer ago than this.
const LEADER_LAG_SECS: f64 = 3.0;
/// Sampling slack when comparing two events seen by once-a-second sampling.
const SAMPLE_SLACK_SECS: f64 = 2.0;

/// Runs `script` on every node at once (the masters' kcm go down together, not one by one).
fn on_all_nodes(nodes: &[String], script: &str) {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes.iter().map(|n| (n, s.spawn(move || on_node(n, script)))).collect();
        for (n, h) in handles {
            let (ok, out) = h.join().expect("docker exec thread");
            assert!(ok, "`{script}` on {n}: {out}");
        }
    });
}

/// Sleeps until one second after `since`.
async fn tick(since: Instant) {
    let spent = since.elapsed();
    if spent < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_secs(1) - spent).await;
    }
}

/// One once-a-second look at the cluster during the rescue.
#[derive(Clone, Debug)]
struct Sample {
    /// Seconds since the stop.
    t: f64,
    /// Masters whose unit `systemctl is-active` said active.
    active: usize,
    /// status.ready as (healthy, selected).
    ready: Option<(usize, usize)>,
    leader: Option<String>,
    /// How long ago kcm's Lease had expired when it was read (negative: still valid).
    lease_expired_by: Option<f64>,
    lease_holder: Option<String>,
}

/// A certificate for `key` (or a new key when it does not parse) signed by the cluster CA,
/// valid only in January 2020: expired, but otherwise what kcm's certificate looks like.
fn expired_cert(ca_cert_pem: &str, ca_key_pem: &str, key_pem: &str) -> String {
    let ca_key = KeyPair::from_pem(ca_key_pem).expect("the cluster CA key parses");
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).expect("the cluster CA certificate parses");
    let key = KeyPair::from_pem(key_pem).unwrap_or_else(|e| {
        println!("kcm key on the node does not parse ({e}): the expired certificate gets a new key (mismatched as well)");
        KeyPair::generate().expect("key")
    });
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, KCM_USER);
    params.distinguished_name.push(DnType::CommonName, KCM_USER);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.signed_by(&key, &issuer).expect("signing the expired certificate").pem()
}

/// notAfter of the certificate at `path` on `node` (None: missing or unreadable).
fn cert_not_after(node: &str, path: &str) -> Option<i64> {
    let (ok, pem) = on_node(node, &format!("cat {path}"));
    if !ok {
        return None;
    }
    CertInfo::from_pem(pem.as_bytes(), path).ok().map(|c| c.not_after)
}

/// The master's report is fresh, observed after `since`, healthy, active and without drift.
fn repaired(n: &NodeStatus, now: f64, since: f64) -> bool {
    report_fresh(n, now) && observed_at(n).is_some_and(|t| t > since) && n.healthy && n.unit_active && n.drift.is_empty()
}

fn main_pid(node: &str) -> String {
    on_node(node, "systemctl show -p MainPID --value kube-controller-manager").1.trim().to_string()
}

async fn wait_all_healthy(c: &kube::Client, masters: &[String], since: f64, within: Duration, what: &str) -> (String, Duration) {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < within {
        match all_healthy(c, masters, since).await {
            Ok(leader) => return (leader, t0.elapsed()),
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("{what}: not 3/3 healthy with a leader within {within:?}; last: {last}\n{}", diagnostics());
}

#[tokio::test]
async fn rescue_repair_and_drift() {
    let c = client().await;
    let masters = masters(&c).await;
    assert_eq!(masters.len(), 3, "three control-plane nodes: {masters:?}");
    let (leader, took) = wait_all_healthy(&c, &masters, 0.0, Duration::from_secs(300), "precondition").await;
    println!("precondition: 3/3 healthy, kcm leader {leader} ({:.0}s)", took.as_secs_f64());
    let (k, _) = cr(&c).await.expect("CR");
    let paths = k.spec.paths.clone();

    // ---------------------------------------------------------------- a. rescue
    let holder_before = kcm_lease(&c).await.and_then(|l| l.holder);
    let stop_epoch = now_secs();
    let t0 = Instant::now();
    on_all_nodes(&masters, "systemctl stop kube-controller-manager");
    let (ok, out) = kubectl(&["-n", NAMESPACE, "delete", "pod", "-l", &format!("app.kubernetes.io/name={HELPER_APP}"), "--wait=false"]);
    assert!(ok, "deleting the helper pods: {out}");
    println!("rescue: kcm stopped on {masters:?} and helper pods deleted ({:.1}s); kcm Lease holder was {holder_before:?}", t0.elapsed().as_secs_f64());

    // Right before the stop all three units were active (checked by the precondition).
    let mut samples =
        vec![Sample { t: 0.0, active: 3, ready: Some((3, 3)), leader: Some(leader.clone()), lease_expired_by: None, lease_holder: holder_before.clone() }];
    let mut rescue_seen: BTreeMap<String, (f64, Option<String>)> = BTreeMap::new();
    let within = Duration::from_secs(300);
    let mut last_why = String::new();
    let back = loop {
        let s0 = Instant::now();
        let t = t0.elapsed().as_secs_f64();
        let active = masters.iter().filter(|m| unit_active(m)).count();
        let lease = kcm_lease(&c).await;
        let read_at = now_secs();
        let status = cr(&c).await.map(|(_, s)| s).unwrap_or_default();
        samples.push(Sample {
            t,
            active,
            ready: ready_counts(&status),
            leader: status.leader.clone(),
            lease_expired_by: lease.as_ref().map(|l| l.expired_by(read_at)),
            lease_holder: lease.as_ref().and_then(|l| l.holder.clone()),
        });
        for p in pods_with_app(&c, RESCUE_APP).await {
            let name = p.metadata.name.clone().unwrap_or_default();
            rescue_seen.entry(name).or_insert((t, pod_node(&p)));
        }
        let new_holder = lease.as_ref().and_then(|l| l.holder.clone()).is_some_and(|h| Some(&h) != holder_before.as_ref());
        match all_healthy(&c, &masters, stop_epoch).await {
            Ok(l) if new_holder => break Some((l, t0.elapsed())),
            Ok(_) => last_why = "kcm Lease still held by the stopped kcm's identity".into(),
            Err(why) => last_why = why,
        }
        if t0.elapsed() > within {
            break None;
        }
        tick(s0).await;
    };
    let Some((new_leader, took)) = back else {
        let tail: Vec<_> = samples.iter().rev().take(10).collect();
        panic!(
            "rescue: not back to 3/3 with a leader within {within:?}; last: {last_why}; last samples {tail:?}; rescue pods seen {rescue_seen:?}\n{}",
            diagnostics()
        );
    };
    println!("rescue: back to 3/3 healthy with kcm leader {new_leader} in {:.1}s after the stop ({} samples)", took.as_secs_f64(), samples.len());
    println!("rescue: rescue pods seen (first seen at +s, node): {rescue_seen:?}");

    // READY never counted more healthy masters than actually ran kcm within the tolerance.
    println!("rescue: READY tolerance {READY_TOLERANCE_SECS}s (STALE_AFTER_SECS {STALE_AFTER_SECS} + REPORT_PERIOD_SECS {REPORT_PERIOD_SECS})");
    let mut ready_lies = Vec::new();
    for s in &samples {
        let Some((h, _)) = s.ready else { continue };
        let ran = samples.iter().filter(|o| o.t <= s.t && o.t >= s.t - READY_TOLERANCE_SECS).map(|o| o.active).max().unwrap_or(0);
        if h > ran {
            ready_lies.push(format!("+{:.0}s: READY {h} but at most {ran} unit(s) active in the preceding {READY_TOLERANCE_SECS}s", s.t));
        }
    }
    let first_down = samples.iter().find(|s| s.active < 3).map(|s| s.t);
    let ready_drop = samples.iter().find(|s| s.ready.is_some_and(|(h, _)| h < 3)).map(|s| s.t);
    println!("rescue: first sample with a unit down at +{first_down:?}s; READY first below 3 at +{ready_drop:?}s");
    assert!(ready_lies.is_empty(), "READY counted masters that did not run kcm: {ready_lies:?}\n{}", diagnostics());

    // LEADER was empty whenever kcm's Lease had expired (allowing the operator's reaction time).
    let mut leader_lies = Vec::new();
    let mut worst_lag: f64 = 0.0;
    for s in &samples {
        let Some(e) = s.lease_expired_by else { continue };
        if s.leader.is_some() && e > 0.0 {
            worst_lag = worst_lag.max(e);
            if e > LEADER_LAG_SECS {
                leader_lies.push(format!("+{:.0}s: LEADER {:?} but the Lease ({:?}) expired {e:.1}s before", s.t, s.leader, s.lease_holder));
            }
        }
    }
    // Not vacuous: the Lease did expire during the rescue, and LEADER was seen empty then.
    let expired_samples = samples.iter().filter(|s| s.lease_expired_by.is_some_and(|e| e > 0.0)).count();
    let empty_when_expired = samples.iter().filter(|s| s.lease_expired_by.is_some_and(|e| e > 0.0) && s.leader.is_none()).count();
    println!("rescue: {expired_samples} sample(s) with kcm's Lease expired, {empty_when_expired} of them with LEADER empty; worst LEADER lag behind the expiry {worst_lag:.1}s (allowed {LEADER_LAG_SECS}s)");
    assert!(
        expired_samples > 0 && empty_when_expired > 0,
        "kcm's Lease never expired during the rescue (or LEADER never emptied): the LEADER check proved nothing; samples {samples:?}"
    );
    assert!(leader_lies.is_empty(), "LEADER named a holder of an expired Lease: {leader_lies:?}\n{}", diagnostics());

    // Rescue pods did the work: one per master, pinned to it.
    for m in &masters {
        let name = format!("{}-rescue-{m}", kcm_operator::api::HELPER_DAEMONSET);
        let seen = rescue_seen.get(&name);
        assert!(seen.is_some(), "no rescue pod {name} was seen for {m}; seen: {rescue_seen:?}\n{}", diagnostics());
        assert_eq!(seen.unwrap().1.as_deref(), Some(m.as_str()), "rescue pod {name} is pinned to {m}");
    }

    // kcm runs again, so the DaemonSet controller recreates its pods (the scheduler binds
    // them); once they are Ready the operator deletes its rescue pods.
    let t1 = Instant::now();
    let mut last = String::new();
    loop {
        let ds: Vec<_> = pods_with_app(&c, HELPER_APP).await;
        let ready_on: BTreeSet<String> = ds.iter().filter(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none()).filter_map(pod_node).collect();
        let rescue: Vec<String> = pods_with_app(&c, RESCUE_APP).await.into_iter().filter_map(|p| p.metadata.name).collect();
        if masters.iter().all(|m| ready_on.contains(m)) && rescue.is_empty() {
            break;
        }
        last = format!("DaemonSet pods Ready on {ready_on:?}; rescue pods {rescue:?}");
        assert!(t1.elapsed() < Duration::from_secs(300), "rescue pods not cleaned up within 300s of 3/3: {last}\n{}", diagnostics());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("rescue: DaemonSet pods Ready on all masters and no rescue pod left {:.1}s after 3/3 ({last})", t1.elapsed().as_secs_f64());

    // ---------------------------------------------------------------- b. two of three broken
    let (leader, _) = wait_all_healthy(&c, &masters, 0.0, Duration::from_secs(120), "before breaking two masters").await;
    // The kcm leader and one more: the healthy third has to take kcm's lead over, and must
    // never be restarted while the other two are unhealthy.
    let mut broken: Vec<String> = vec![leader.clone()];
    broken.push(masters.iter().find(|m| **m != leader).unwrap().clone());
    let intact = masters.iter().find(|m| !broken.contains(m)).unwrap().clone();
    let (ok, ca_pem) = on_node(&intact, &format!("cat {}", paths.ca_cert));
    assert!(ok, "reading {} on {intact}: {ca_pem}", paths.ca_cert);
    let (ok, ca_key_pem) = on_node(&intact, &format!("cat {}", paths.ca_key));
    assert!(ok, "reading {} on {intact}", paths.ca_key);
    for b in &broken {
        let (ok, key_pem) = on_node(b, &format!("cat {}", paths.key));
        assert!(ok, "reading {} on {b}", paths.key);
        let pem = expired_cert(&ca_pem, &ca_key_pem, &key_pem);
        let (ok, out) = write_on_node(b, &paths.cert, pem.as_bytes(), "644");
        assert!(ok, "writing the expired certificate on {b}: {out}");
        let na = cert_not_after(b, &paths.cert);
        assert!(na.is_some_and(|t| (t as f64) < now_secs()), "{b}: the certificate on disk is expired now (notAfter {na:?})");
    }
    let intact_pid = main_pid(&intact);
    let health = e2e::leadership::HealthWatch::start(&c, &masters).await;
    let break_epoch = now_secs();
    let t0 = Instant::now();
    on_all_nodes(&broken, "systemctl restart kube-controller-manager");
    println!("two broken: expired certificates on {broken:?}, units restarted; {intact} left intact (MainPID {intact_pid})");

    let mut cert_new: BTreeMap<String, f64> = BTreeMap::new();
    let mut healthy_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut drift_seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut intact_down: Vec<f64> = Vec::new();
    let mut unit_log: Vec<String> = Vec::new();
    let within = Duration::from_secs(480);
    loop {
        let s0 = Instant::now();
        let t = t0.elapsed().as_secs_f64();
        // Disk first, then status: a step the operator started after reading a master as
        // repaired shows up on disk after that master's report.
        for b in &broken {
            if !cert_new.contains_key(b) && cert_not_after(b, &paths.cert).is_some_and(|na| na as f64 > now_secs()) {
                cert_new.insert(b.clone(), t);
            }
        }
        let states: Vec<(String, bool)> = masters.iter().map(|m| (m.clone(), unit_active(m))).collect();
        if states.iter().any(|(m, a)| m == &intact && !a) {
            intact_down.push(t);
        }
        unit_log.push(format!("+{t:.0}s {:?}", states.iter().map(|(m, a)| format!("{m}={}", if *a { "up" } else { "down" })).collect::<Vec<_>>()));
        let now = now_secs();
        let status = cr(&c).await.map(|(_, s)| s).unwrap_or_default();
        for b in &broken {
            let Some(n) = status.nodes.iter().find(|n| &n.name == b) else { continue };
            if !n.drift.is_empty() && observed_at(n).is_some_and(|o| o > break_epoch) {
                let e = drift_seen.entry(b.clone()).or_default();
                for d in &n.drift {
                    if !e.contains(d) {
                        e.push(d.clone());
                    }
                }
            }
            if cert_new.contains_key(b) && !healthy_at.contains_key(b) && repaired(n, now, break_epoch) {
                healthy_at.insert(b.clone(), t);
            }
        }
        if healthy_at.len() == broken.len() && all_healthy(&c, &masters, break_epoch).await.is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < within,
            "two broken: not recovered within {within:?}; new certificates at {cert_new:?}, healthy at {healthy_at:?}, drift {drift_seen:?}; units {:?}\n{}",
            unit_log.iter().rev().take(10).collect::<Vec<_>>(),
            diagnostics()
        );
        tick(s0).await;
    }
    let took = t0.elapsed();
    println!("two broken: back to 3/3 in {:.1}s; new certificate on disk at {cert_new:?}, reported healthy at {healthy_at:?} (+s)", took.as_secs_f64());
    println!("two broken: drift reported: {drift_seen:?}");
    assert!(intact_down.is_empty(), "the healthy master {intact} was down at +{intact_down:?}s while the others were being repaired");
    let served = health.always_up(&intact, break_epoch, now_secs());
    println!("two broken: {intact}'s kcm answered /healthz at every probe (10 Hz) while the others were repaired: {served}");
    assert!(served, "the healthy master {intact}'s kcm stopped answering /healthz while the others were being repaired\n{}", diagnostics());
    assert_eq!(main_pid(&intact), intact_pid, "the healthy master {intact}'s kcm was restarted");
    // One at a time: the second master's new certificate appeared only after the first was
    // reported healthy again (give or take the sampling).
    let mut order: Vec<(&String, f64)> = cert_new.iter().map(|(m, t)| (m, *t)).collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (first, second) = (order[0].0, order[1].0);
    println!(
        "two broken: repair order {first} (new cert +{:.0}s, healthy +{:.0}s) then {second} (new cert +{:.0}s, healthy +{:.0}s)",
        cert_new[first], healthy_at[first], cert_new[second], healthy_at[second]
    );
    assert!(
        cert_new[second] + SAMPLE_SLACK_SECS >= healthy_at[first],
        "both masters were repaired at once: {second} got its new certificate at +{:.0}s, before {first} was healthy at +{:.0}s; units {unit_log:?}",
        cert_new[second],
        healthy_at[first]
    );

    // ---------------------------------------------------------------- c. drift
    let (leader, _) = wait_all_healthy(&c, &masters, 0.0, Duration::from_secs(120), "before the drift").await;
    let target = masters.iter().find(|m| **m != leader).unwrap().clone();
    let others: Vec<String> = masters.iter().filter(|m| **m != target).cloned().collect();
    let break_epoch = now_secs();
    let t0 = Instant::now();
    let (ok, out) = on_node(&target, &format!("rm {} && systemctl restart kube-controller-manager", paths.cert));
    assert!(ok, "deleting {} on {target} and restarting its kcm: {out}", paths.cert);
    println!("drift: deleted {} on {target} and restarted its kcm", paths.cert);
    let mut drift_at: Option<(f64, Vec<String>, bool)> = None;
    let mut fixed_at: Option<f64> = None;
    let mut others_down: Vec<String> = Vec::new();
    let within = Duration::from_secs(300);
    loop {
        let s0 = Instant::now();
        let t = t0.elapsed().as_secs_f64();
        let present = on_node(&target, &format!("test -s {}", paths.cert)).0;
        for o in &others {
            if !unit_active(o) {
                others_down.push(format!("{o} at +{t:.0}s"));
            }
        }
        let now = now_secs();
        let status = cr(&c).await.map(|(_, s)| s).unwrap_or_default();
        if let Some(n) = status.nodes.iter().find(|n| n.name == target) {
            if drift_at.is_none() && observed_at(n).is_some_and(|o| o > break_epoch) && n.drift.iter().any(|d| d.contains(&paths.cert)) {
                drift_at = Some((t, n.drift.clone(), present));
            }
            if fixed_at.is_none() && present && repaired(n, now, break_epoch) {
                fixed_at = Some(t);
            }
        }
        if fixed_at.is_some() && all_healthy(&c, &masters, break_epoch).await.is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < within,
            "drift: {target} not repaired within {within:?}; drift seen {drift_at:?}; certificate present {present}\n{}",
            diagnostics()
        );
        tick(s0).await;
    }
    let took = t0.elapsed();
    let Some((t_drift, lines, present_then)) = drift_at else {
        panic!("drift: the status of {target} never named {} as drift before it was repaired\n{}", paths.cert, diagnostics())
    };
    let t_fixed = fixed_at.unwrap();
    println!(
        "drift: reported at +{t_drift:.0}s as {lines:?} (certificate on disk then: {present_then}); repaired, 3/3 again at +{:.1}s (healthy +{t_fixed:.0}s)",
        took.as_secs_f64()
    );
    assert!(t_drift <= t_fixed, "the drift was named only after the repair (+{t_drift:.0}s vs +{t_fixed:.0}s)");
    assert!(on_node(&target, &format!("test -s {}", paths.cert)).0, "{} is back on {target}", paths.cert);
    let na = cert_not_after(&target, &paths.cert);
    assert!(na.is_some_and(|t| t as f64 > now_secs()), "the new certificate on {target} is valid (notAfter {na:?})");
    assert!(others_down.is_empty(), "other masters went down during the drift repair: {others_down:?}");
    // ---------------------------------------------------------------- d. bad input: the CA key missing on one master
    // The operator's static pod is not placed there (the kubelet could not mount it) and the
    // CR says why (Degraded/OperatorPodNotPlaced, naming the master); the others carry on,
    // kcm keeps running everywhere; once the key is back, the condition clears.
    let (_, _) = wait_all_healthy(&c, &masters, 0.0, Duration::from_secs(120), "before the missing CA key").await;
    let target = masters[0].clone();
    let moved = format!("{}.kcm-e2e-moved", paths.ca_key);
    let _restore = RestoreFile { node: target.clone(), from: moved.clone(), to: paths.ca_key.clone() };
    let t0 = Instant::now();
    let (ok, out) = on_node(&target, &format!("mv {} {moved}", paths.ca_key));
    assert!(ok, "moving {} away on {target}: {out}", paths.ca_key);
    let degraded = e2e::apitier::poll("Degraded OperatorPodNotPlaced", Duration::from_secs(60), || async {
        let (_, s) = cr(&c).await?;
        let cond = s.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "OperatorPodNotPlaced")?;
        Some((cond.message.clone(), s.nodes.clone()))
    })
    .await;
    let (msg, nodes) =
        degraded.unwrap_or_else(|| panic!("no Degraded/OperatorPodNotPlaced within 60s of removing {} on {target}\n{}", paths.ca_key, diagnostics()));
    println!("bad input: {} missing on {target}: Degraded OperatorPodNotPlaced after {:.1}s: {msg}", paths.ca_key, t0.elapsed().as_secs_f64());
    assert!(msg.contains(&target) && msg.contains("caKey"), "the condition names the master and the path: {msg}");
    for n in &nodes {
        assert_eq!(
            n.operator_pod_error.is_some(),
            n.name == target,
            "operatorPodError only on {target}: {:?}",
            nodes.iter().map(|n| (&n.name, &n.operator_pod_error)).collect::<Vec<_>>()
        );
    }
    for m in &masters {
        assert!(unit_active(m), "kcm keeps running on {m}");
    }
    drop(_restore);
    let cleared = e2e::apitier::poll("Degraded cleared", Duration::from_secs(60), || async {
        let (_, s) = cr(&c).await?;
        s.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "False").then_some(())
    })
    .await;
    assert!(cleared.is_some(), "Degraded did not clear once {} was back on {target}\n{}", paths.ca_key, diagnostics());
    println!("bad input: {} back on {target}: Degraded cleared after {:.1}s in all", paths.ca_key, t0.elapsed().as_secs_f64());
}

/// Moves a file back on a node, also when the test panics.
struct RestoreFile {
    node: String,
    from: String,
    to: String,
}

impl Drop for RestoreFile {
    fn drop(&mut self) {
        let (ok, out) = on_node(&self.node, &format!("if [ -e {from} ]; then mv {from} {to}; fi", from = self.from, to = self.to));
        if !ok {
            eprintln!("restoring {} on {}: {out}", self.to, self.node);
        }
    }
}
