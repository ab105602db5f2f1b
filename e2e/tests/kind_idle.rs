//! Metrics (issue 11) and idle API cost (issue 8), on kind (3 control-plane nodes), on the
//! cluster kind_crash.rs leaves: our kcm 3/3, nothing to roll out.
//!
//! Metrics: the operator leader's `/metrics` has one certificate notAfter series per master,
//! equal to the notAfter of the certificate on that master's disk (the one kcm serves: the
//! helper's health check compares serials); the replicas together counted the certificates
//! they issued; every helper answers `/metrics` on its master.
//!
//! Idle cost: Each process counts its own API requests by verb
//! and resource and logs `api requests/min: ...` once a minute (kcm_operator::apicount). After
//! two minutes of steady state, the last such line of the operator leader and of every helper
//! is read and printed; no GET or LIST of anything but Leases may remain (everything else is
//! watched).

use std::time::Duration;

use e2e::kind::{all_healthy, client, cr, diagnostics, kubectl, last_rates, masters, now_secs, on_node, operator_lease, RATES_PREFIX};
use kcm_operator::api::{HELPER_METRICS_PORT, NAMESPACE, OPERATOR_HEALTH_PORT};
use kcm_operator::pki::CertInfo;

/// `/metrics` of a process on `node`'s host network.
fn scrape(node: &str, port: u16) -> String {
    let (ok, out) = on_node(node, &format!("curl -sS --max-time 5 http://127.0.0.1:{port}/metrics"));
    assert!(ok, "/metrics on {node}:{port}: {out}");
    out
}

/// The value of the sample `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test]
async fn metrics_match_the_masters() {
    let c = client().await;
    let masters = masters(&c).await;
    let healthy = e2e::apitier::poll("3/3 healthy", Duration::from_secs(240), || async { all_healthy(&c, &masters, 0.0).await.ok() }).await;
    assert!(healthy.is_some(), "not 3/3 healthy\n{}", diagnostics());
    let leader = operator_lease(&c).await.and_then(|l| l.node()).expect("an operator leader");
    let (kcm, _) = cr(&c).await.expect("the CR");
    // The leader's view is refreshed at its next look (a few seconds at most).
    let t0 = std::time::Instant::now();
    let (rows, text) = loop {
        let text = scrape(&leader, OPERATOR_HEALTH_PORT);
        let mut rows = Vec::new();
        for m in &masters {
            let (ok, pem) = on_node(m, &format!("cat {}", kcm.spec.paths.cert));
            assert!(ok, "reading the certificate on {m}: {pem}");
            let on_disk = CertInfo::from_pem(pem.as_bytes(), "certificate on disk").expect("a certificate").not_after as f64;
            let series = sample(&text, &format!("kcm_operator_certificate_not_after_seconds{{node=\"{m}\"}}"));
            rows.push((m.clone(), on_disk, series));
        }
        if rows.iter().all(|(_, d, s)| *s == Some(*d)) || t0.elapsed() > Duration::from_secs(60) {
            break (rows, text);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("kcm_operator_certificate_not_after_seconds")).collect();
    assert!(rows.iter().all(|(_, d, s)| *s == Some(*d)), "the leader's notAfter series {series:?} differ from the certificates on disk {rows:?}");
    assert_eq!(series.len(), masters.len(), "one series per master: {series:?}");
    println!("operator leader {leader} /metrics: notAfter per master = the certificate on its disk: {rows:?}");
    // A certificate issued now is counted: the certificate deleted on one master (drift), its
    // repair gets a new one.
    let issued = || masters.iter().filter_map(|m| sample(&scrape(m, OPERATOR_HEALTH_PORT), "kcm_operator_csr_decisions_total{reason=\"Issued\"}")).sum::<f64>();
    let before = issued();
    let target = masters.iter().find(|m| **m != leader).expect("a follower").clone();
    let serial = |s: &kcm_operator::api::KubeControllerManagerStatus| s.nodes.iter().find(|n| n.name == target).and_then(|n| n.cert_serial.clone());
    let old = serial(&cr(&c).await.expect("the CR").1);
    let (ok, out) = on_node(&target, &format!("rm -f {}", kcm.spec.paths.cert));
    assert!(ok, "{out}");
    let renewed = e2e::apitier::poll("the repaired master's new certificate", Duration::from_secs(120), || async {
        let (_, s) = cr(&c).await?;
        let n = s.nodes.iter().find(|n| n.name == target)?;
        (n.healthy && serial(&s) != old && n.drift.is_empty()).then_some(())
    })
    .await;
    assert!(renewed.is_some(), "{target} did not get a new certificate after its certificate was deleted\n{}", diagnostics());
    let after = issued();
    println!("certificates issued, counted by the operator replicas: {before} before, {after} after the repair of {target}");
    assert!(after >= before + 1.0, "the issued certificate was not counted ({before} -> {after})");
    for m in &masters {
        let text = scrape(m, HELPER_METRICS_PORT);
        let h = sample(&text, &format!("kcm_node_helper_healthy{{node=\"{m}\"}}"));
        println!("helper on {m} /metrics: kcm_node_helper_healthy = {h:?}");
        assert_eq!(h, Some(1.0), "the helper on {m} answers /metrics and reports healthy");
    }
}

/// How a rate line looks: `api requests/min: GET leases=30 PATCH kcmnodes/status=6 total=36`.
#[tokio::test]
async fn steady_state_costs_only_lease_reads() {
    let c = client().await;
    let masters = masters(&c).await;
    // Steady: 3/3 healthy with a leader, nothing rolling out.
    let steady = e2e::apitier::poll("steady state", Duration::from_secs(240), || async { e2e::kind::steady(&c, &masters).await.ok() }).await;
    assert!(steady.is_some(), "never steady (3/3 healthy, not progressing)\n{}", diagnostics());
    let since = now_secs();
    // Every process logs its rate once a minute: after 130 s each has logged one line whose
    // minute lies wholly inside the steady period.
    tokio::time::sleep(Duration::from_secs(130)).await;
    let (_, s) = cr(&c).await.expect("the CR");
    assert!(s.conditions.iter().any(|x| x.type_ == "Progressing" && x.status == "False"), "a rollout started during the measurement");
    let leader = operator_lease(&c).await.and_then(|l| l.node()).expect("an operator leader");
    let mut pods: Vec<(String, String)> = vec![(format!("operator leader ({leader})"), format!("kcm-operator-{leader}"))];
    let (ok, out) = kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=kcm-node-helper",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName}{\"\\n\"}{end}",
    ]);
    assert!(ok, "{out}");
    for l in out.lines().filter(|l| !l.trim().is_empty()) {
        let (pod, node) = l.split_once(' ').unwrap();
        pods.push((format!("helper on {node}"), pod.to_string()));
    }
    assert_eq!(pods.len(), masters.len() + 1, "one helper per master: {pods:?}");
    println!("idle API cost, requests per minute from each client's own counters ({:.0}s of steady state):", now_secs() - since);
    for (who, pod) in &pods {
        let (line, rates) = last_rates(pod, "65s").unwrap_or_else(|| panic!("{who}: no `{RATES_PREFIX}` line in the last 65 s of {pod}"));
        println!("  {who}: {line}");
        let polled: Vec<String> =
            rates.iter().filter(|(v, r, n)| (v == "GET" || v == "LIST") && r != "leases" && *n > 0.0).map(|(v, r, n)| format!("{v} {r}={n}")).collect();
        assert!(polled.is_empty(), "{who} reads more than Leases at steady state: {polled:?}");
    }
}
