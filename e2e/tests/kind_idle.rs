//! Idle API cost (issue 8), on kind (3 control-plane nodes), on the cluster kind_crash.rs
//! leaves: our kcm 3/3, nothing to roll out. Each process counts its own API requests by verb
//! and resource and logs `api requests/min: ...` once a minute (kcm_operator::apicount). After
//! two minutes of steady state, the last such line of the operator leader and of every helper
//! is read and printed; no GET or LIST of anything but Leases may remain (everything else is
//! watched).

use std::time::Duration;

use e2e::kind::{all_healthy, client, cr, diagnostics, kubectl, masters, now_secs, operator_lease};
use kcm_operator::api::NAMESPACE;

/// How a rate line looks: `api requests/min: GET leases=30 PATCH kcmnodes/status=6 total=36`.
const PREFIX: &str = "api requests/min: ";

/// (verb, resource, requests per minute)
type Rate = (String, String, f64);

/// The last rate line a pod logged in the last `since`, and its rates.
fn last_rates(pod: &str, since: &str) -> Option<(String, Vec<Rate>)> {
    let (ok, out) = kubectl(&["-n", NAMESPACE, "logs", pod, &format!("--since={since}")]);
    assert!(ok, "logs of {pod}: {out}");
    let line = out.lines().rev().find(|l| l.contains(PREFIX))?.to_string();
    let body = line.split(PREFIX).nth(1)?.split(" who=").next()?.trim().to_string();
    let mut rates = Vec::new();
    let words: Vec<&str> = body.split_whitespace().collect();
    let mut verb = String::new();
    for w in words {
        match w.split_once('=') {
            Some(("total", _)) => {}
            Some((resource, n)) => rates.push((verb.clone(), resource.to_string(), n.parse().unwrap_or(f64::NAN))),
            None => verb = w.to_string(),
        }
    }
    Some((body, rates))
}

#[tokio::test]
async fn steady_state_costs_only_lease_reads() {
    let c = client().await;
    let masters = masters(&c).await;
    // Steady: 3/3 healthy with a leader, nothing rolling out.
    let steady = e2e::apitier::poll("steady state", Duration::from_secs(240), || async {
        all_healthy(&c, &masters, 0.0).await.ok()?;
        let (_, s) = cr(&c).await?;
        s.conditions.iter().any(|x| x.type_ == "Progressing" && x.status == "False").then_some(())
    })
    .await;
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
        let (line, rates) = last_rates(pod, "65s").unwrap_or_else(|| panic!("{who}: no `{PREFIX}` line in the last 65 s of {pod}"));
        println!("  {who}: {line}");
        let polled: Vec<String> =
            rates.iter().filter(|(v, r, n)| (v == "GET" || v == "LIST") && r != "leases" && *n > 0.0).map(|(v, r, n)| format!("{v} {r}={n}")).collect();
        assert!(polled.is_empty(), "{who} reads more than Leases at steady state: {polled:?}");
    }
}
