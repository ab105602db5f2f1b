//! Scenario 6 (`scale`): the operator at N simulated masters (N = 3, 10, 50), on the API
//! tier. The real operator binary runs as its own process (`--elect=false`, as user
//! kcm-operator with its RBAC), so its RSS and its API request counters are its own. Each
//! master is a Node with the control-plane label and the helper DaemonSet's pod on it,
//! reported Ready (no kubelet); its helper is simulated by a task of the bench that reports
//! on the master's KcmNode as the real helper does (`node_helper::step::report_body`,
//! server-side apply of the status as `kcm-node-helper-<node>`, every report period and on
//! each change) and applies each step the operator gives after a fixed delay [`D`].
//!
//! First the initial rollout brings every master to the spec's revision; then every
//! certificate is aged at once (the helpers report a notAfter inside the renewal window), and
//! the renewal is timed from that moment until every master reports its renew revision
//! applied. The operator rolls one master at a time, so the floor is N×D; its own share is
//! the rest.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kcm_operator::api::{KcmNode, KcmNodeStatus, KubeControllerManager, CR_NAME, HELPER_MANAGER_PREFIX, REPORT_PERIOD_SECS};
use kcm_operator::identity::OPERATOR_USER;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};

use super::{AbortOnDrop, Row, Series, Summary};
use crate::apitier::sim::{self, Owner};
use crate::apitier::{ApiServer, Proc};

const KEY: &str = "scale";
/// The numbers of masters, in the order of the samples.
const NS: [usize; 3] = [3, 10, 50];
/// How long a simulated helper takes to apply a step: a constant, so the rest is the operator's.
const D: Duration = Duration::from_millis(1000);
/// An aged certificate ends this far ahead: inside the default renewal window (the last 20%
/// of a year), not expired (an expired one would be repaired, not renewed).
const AGED_LEFT_SECS: i64 = 86_400;
/// Linear in N: the per-master figure at the largest N at most this many times that at the smallest.
const LINEAR_FACTOR: f64 = 2.0;
const GOAL: &str = "linear in N (per master at N=50 <= 2x at N=3)";
const WALL: &str = "Scale: renewal of every master, wall time";

/// Whether a per-master cost stays flat: the value at the largest N at most [`LINEAR_FACTOR`]
/// times that at the smallest. `per_master`: (N, cost per master). None with fewer than two points.
pub fn flat(per_master: &[(usize, f64)]) -> Option<bool> {
    let first = per_master.iter().min_by_key(|(n, _)| *n)?;
    let last = per_master.iter().max_by_key(|(n, _)| *n)?;
    (last.0 > first.0).then_some(last.1 <= LINEAR_FACTOR * first.1)
}

/// The operator's own time per master (ms) in a renewal of `n` masters that took `total`,
/// each step's helper taking `d`.
pub fn own_ms_per_master(total: Duration, n: usize, d: Duration) -> f64 {
    (total.as_secs_f64() - n as f64 * d.as_secs_f64()) / n as f64 * 1000.0
}

/// `kcm_operator_api_requests_total` from the operator's /metrics, by (verb, resource).
pub fn api_requests(metrics: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("kcm_operator_api_requests_total{") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let label = |k: &str| labels.split("\",").find_map(|kv| kv.strip_prefix(&format!("{k}=\"")).map(|v| v.trim_end_matches('"').to_string()));
        if let (Some(verb), Some(resource)) = (label("verb"), label("resource")) {
            out.insert((verb, resource), value);
        }
    }
    out
}

/// `after - before`, without the keys that did not move.
pub fn delta(before: &BTreeMap<(String, String), f64>, after: &BTreeMap<(String, String), f64>) -> BTreeMap<(String, String), f64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0))).filter(|(_, v)| *v > 0.0).collect()
}

/// `VERB resource=count`, largest first.
pub fn breakdown(requests: &BTreeMap<(String, String), f64>) -> String {
    let mut v: Vec<_> = requests.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
    v.iter().map(|((verb, res), n)| format!("{verb} {res}={n}")).collect::<Vec<_>>().join(", ")
}

/// A `Vm*:` line of /proc/<pid>/status, in MiB.
pub fn vm_mib(status: &str, field: &str) -> Option<f64> {
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The slope from the smallest N to the largest: (value at largest − value at smallest) / ΔN.
pub fn growth(points: &[(usize, f64)]) -> Option<f64> {
    let first = points.iter().min_by_key(|(n, _)| *n)?;
    let last = points.iter().max_by_key(|(n, _)| *n)?;
    (last.0 > first.0).then(|| (last.1 - first.1) / (last.0 - first.0) as f64)
}

/// "N=3/10/50" for the measured Ns.
fn label(ns: &[usize]) -> String {
    format!("N={}", ns.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("/"))
}

// ------------------------------------------------------------------ simulated helpers

/// What a simulated helper knows of its KcmNode.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    exists: bool,
    target: Option<String>,
}

/// A step a simulated helper reported applied, when the report was written.
struct Applied {
    node: String,
    revision: String,
    at: Instant,
}

/// A certificate serial (hex) unique in this process.
fn serial() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("5e{:08x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn rfc3339(unix: i64) -> String {
    Timestamp::from_second(unix).map(|t| t.to_string()).unwrap_or_default()
}

/// Writes `report` (with observedAt now) on `node`'s KcmNode, as the helper does.
async fn send(client: &Client, node: &str, report: &KcmNodeStatus) -> Result<()> {
    let mut sent = report.clone();
    sent.observed_at = Some(Timestamp::now().to_string());
    let pp = PatchParams::apply(&format!("{HELPER_MANAGER_PREFIX}-{node}")).force();
    Api::<KcmNode>::all(client.clone()).patch_status(node, &pp, &Patch::Apply(node_helper::step::report_body(node, &sent))).await?;
    Ok(())
}

/// Everything a simulated helper needs.
struct SimHelper {
    client: Client,
    node: String,
    seen: watch::Receiver<Seen>,
    aged: watch::Receiver<bool>,
    applied: mpsc::UnboundedSender<Applied>,
    validity_secs: i64,
    errors: Arc<AtomicUsize>,
}

impl SimHelper {
    /// Reports once its KcmNode exists, then every report period; applies each new target
    /// [`D`] after it saw it (a new serial, a certificate for the spec's validity, healthy);
    /// ages its certificate when told to.
    async fn run(mut self) {
        let mut report = KcmNodeStatus::default();
        let mut last_sent: Option<Instant> = None;
        let mut pending: Option<(String, Instant)> = None;
        let mut unsent_step: Option<String> = None;
        let mut aged_done = false;
        loop {
            let seen = self.seen.borrow_and_update().clone();
            let target = seen.target.filter(|t| seen.exists && report.applied_revision.as_ref() != Some(t));
            pending = match (target, pending.take()) {
                (Some(t), Some((p, since))) if p == t => Some((p, since)),
                (Some(t), _) => Some((t, Instant::now())),
                (None, _) => None,
            };
            let mut due = seen.exists && last_sent.is_none();
            if *self.aged.borrow_and_update() && !aged_done && report.not_after.is_some() {
                report.not_after = Some(rfc3339(Timestamp::now().as_second() + AGED_LEFT_SECS));
                aged_done = true;
                due = true;
            }
            let step_at = pending.as_ref().map(|(_, since)| *since + D);
            let refresh_at = last_sent.map(|t| t + Duration::from_secs(REPORT_PERIOD_SECS as u64));
            if !due {
                let next = [step_at, refresh_at].into_iter().flatten().min().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    r = self.seen.changed() => if r.is_err() { return } else { continue },
                    r = self.aged.changed(), if !aged_done => if r.is_err() { return } else { continue },
                    _ = tokio::time::sleep_until(next.into()) => {}
                }
            }
            if let Some((t, since)) = pending.take() {
                if Instant::now() >= since + D {
                    report.applied_revision = Some(t.clone());
                    report.failed_revision = None;
                    report.cert_serial = Some(serial());
                    report.not_after = Some(rfc3339(Timestamp::now().as_second() + self.validity_secs));
                    report.kcm_version = Some(crate::apitier::k8s_version().into());
                    report.unit_active = true;
                    report.healthy = true;
                    unsent_step = Some(t);
                } else {
                    pending = Some((t, since));
                }
            }
            match send(&self.client, &self.node, &report).await {
                Ok(()) => {
                    last_sent = Some(Instant::now());
                    if let Some(revision) = unsent_step.take() {
                        let _ = self.applied.send(Applied { node: self.node.clone(), revision, at: Instant::now() });
                    }
                }
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("[bench scale] simulated helper of {}: reporting: {e:#}", self.node);
                    last_sent = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Tells each simulated helper what its KcmNode says (one watch on all of them).
async fn dispatch(client: Client, helpers: HashMap<String, watch::Sender<Seen>>) {
    let mut events = std::pin::pin!(watcher(Api::<KcmNode>::all(client), watcher::Config::default()));
    while let Some(ev) = events.next().await {
        let (node, seen) = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                (n.name_any(), Seen { exists: true, target: n.spec.target_revision.as_ref().map(|r| r.to_string()) })
            }
            Ok(watcher::Event::Delete(n)) => (n.name_any(), Seen::default()),
            Ok(_) => continue,
            Err(e) => {
                eprintln!("[bench scale] watching KcmNodes: {e}");
                continue;
            }
        };
        if let Some(tx) = helpers.get(&node) {
            tx.send_if_modified(|s| std::mem::replace(s, seen.clone()) != seen);
        }
    }
}

// ------------------------------------------------------------------ the operator

/// The operator binary against the API tier, killed on drop.
struct Operator {
    proc: Proc,
    health: std::net::SocketAddr,
}

impl Operator {
    async fn start(api: &ApiServer, bin: &Path) -> Result<Operator> {
        let health: std::net::SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let kubeconfig = api.kubeconfig_as(OPERATOR_USER, &[])?;
        let args = vec![
            "--elect=false".to_string(),
            "--identity=in-cluster".into(),
            format!("--ca-cert={}", api.ca_cert_path().display()),
            format!("--ca-key={}", api.ca_key_path().display()),
            format!("--health-addr={health}"),
        ];
        let log = api.dir().join("kcm-operator.log");
        let mut proc = Proc::spawn_env("kcm-operator", bin, &args, &[("KUBECONFIG", kubeconfig.as_os_str())], &log)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(super::http_get(health, "/readyz").await, Ok((200, _))) {
                return Ok(Operator { proc, health });
            }
            if let Some(status) = proc.exited() {
                bail!("the operator exited ({status}); log tail:\n{}", proc.log_tail(20));
            }
            if Instant::now() > deadline {
                bail!("the operator was not ready in 30 s; log tail:\n{}", proc.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn requests(&self) -> Result<BTreeMap<(String, String), f64>> {
        let (code, body) = super::http_get(self.health, "/metrics").await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(api_requests(&body))
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).context("reading the operator's /proc status")?;
        let get = |f: &str| vm_mib(&status, f).ok_or_else(|| anyhow!("no {f} in the operator's /proc status"));
        Ok((get("VmRSS")?, get("VmHWM")?))
    }
}

// ------------------------------------------------------------------ one N

/// What one N measured.
struct Point {
    n: usize,
    initial: Duration,
    renewal: Duration,
    requests: BTreeMap<(String, String), f64>,
    rss_mib: f64,
    hwm_mib: f64,
    write_errors: usize,
}

/// Waits until every node in `names` reported a step applied whose revision `matches`;
/// returns when the last of them was written.
async fn all_applied(rx: &mut mpsc::UnboundedReceiver<Applied>, names: &[String], matches: impl Fn(&str) -> bool, timeout: Duration) -> Result<Instant> {
    let mut done: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while done.len() < names.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(a)) if matches(&a.revision) => {
                done.insert(a.node, a.at);
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("the simulated helpers stopped"),
            Err(_) => {
                let missing: Vec<&String> = names.iter().filter(|n| !done.contains_key(*n)).collect();
                bail!("after {timeout:?}, {} of {} masters had not applied their step: {missing:?}", missing.len(), names.len());
            }
        }
    }
    done.values().max().copied().ok_or_else(|| anyhow!("no masters"))
}

/// Waits until the CR's status says the operator decided that every master runs the spec.
async fn up_to_date(admin: &Client, timeout: Duration) -> Result<()> {
    let api = Api::<KubeControllerManager>::all(admin.clone());
    let done = crate::apitier::poll("the operator's Progressing=False UpToDate", timeout, || async {
        let kcm = api.get(CR_NAME).await.ok()?;
        kcm.status?.conditions.iter().any(|c| c.type_ == "Progressing" && c.status == "False" && c.reason == "UpToDate").then_some(())
    })
    .await;
    done.ok_or_else(|| anyhow!("the operator did not report UpToDate within {timeout:?}"))
}

async fn measure(n: usize, bin: &Path) -> Result<Point> {
    let api = ApiServer::start().await.context("starting the API tier")?;
    let admin = api.try_client()?;
    sim::install_base(&admin).await?;
    let spec = sim::minimal_spec(api.url())?;
    let validity_secs = spec.certificate.validity_secs();
    let rev = kcm_operator::render::spec_revision(&spec);
    sim::create_cr(&admin, spec).await?;
    let names: Vec<String> = (1..=n).map(|i| format!("m{i:02}")).collect();
    for name in &names {
        crate::apitier::master_node(&admin, name, "127.0.0.1").await?;
        let pod = sim::helper_pod(&admin, name, Owner::DaemonSet).await?;
        sim::mark_ready(&admin, &pod).await?;
    }

    let errors = Arc::new(AtomicUsize::new(0));
    let (aged, aged_rx) = watch::channel(false);
    let (applied_tx, mut applied) = mpsc::unbounded_channel();
    let mut senders = HashMap::new();
    let mut tasks = Vec::new();
    for name in &names {
        let (tx, seen) = watch::channel(Seen::default());
        senders.insert(name.clone(), tx);
        let h = SimHelper {
            client: admin.clone(),
            node: name.clone(),
            seen,
            aged: aged_rx.clone(),
            applied: applied_tx.clone(),
            validity_secs,
            errors: errors.clone(),
        };
        tasks.push(AbortOnDrop(tokio::spawn(h.run())));
    }
    tasks.push(AbortOnDrop(tokio::spawn(dispatch(admin.clone(), senders))));
    let operator = Operator::start(&api, bin).await?;
    let patience = D * n as u32 * 5 + Duration::from_secs(60);
    let tail = |e: anyhow::Error| anyhow!("{e:#}; operator log tail:\n{}", operator.proc.log_tail(15));

    let t = Instant::now();
    all_applied(&mut applied, &names, |r| r == rev, patience).await.map_err(tail)?;
    let initial = t.elapsed();
    up_to_date(&admin, Duration::from_secs(30)).await.map_err(tail)?;

    let before = operator.requests().await?;
    let t0 = Instant::now();
    aged.send_replace(true);
    let renew = format!("{rev}/renew-");
    let last = all_applied(&mut applied, &names, |r| r.starts_with(&renew), patience).await.map_err(tail)?;
    let renewal = last.duration_since(t0);
    up_to_date(&admin, Duration::from_secs(30)).await.map_err(tail)?;
    let after = operator.requests().await?;
    let (rss_mib, hwm_mib) = operator.memory()?;

    // The API agrees: every KcmNode has its renew revision as target and applied.
    for k in Api::<KcmNode>::all(admin.clone()).list(&Default::default()).await?.items {
        let target = k.spec.target_revision.as_ref().map(|r| r.to_string()).unwrap_or_default();
        let applied = k.status.as_ref().and_then(|s| s.applied_revision.clone()).unwrap_or_default();
        if !target.starts_with(&renew) || applied != target {
            bail!("KcmNode {} has target {target:?}, applied {applied:?} after the renewal", k.name_any());
        }
    }
    drop(tasks);
    Ok(Point { n, initial, renewal, requests: delta(&before, &after), rss_mib, hwm_mib, write_errors: errors.load(Ordering::Relaxed) })
}

// ------------------------------------------------------------------ rows

fn rows(points: &[Point], failures: &[String], bin: &Path) -> Vec<Row> {
    let ns: Vec<usize> = points.iter().map(|p| p.n).collect();
    let series = |v: Vec<f64>| Series::new(label(&ns), v);
    let per_master = |f: &dyn Fn(&Point) -> f64| points.iter().map(|p| (p.n, f(p) / p.n as f64)).collect::<Vec<_>>();
    let own = |p: &Point| own_ms_per_master(p.renewal, p.n, D);
    let total = |p: &Point| p.requests.values().sum::<f64>();
    let missing = if failures.is_empty() { String::new() } else { format!("NOT MEASURED: {}. ", failures.join("; ")) };
    // The whole setup once, on the wall-time row; the others point to it.
    let setup = format!("{missing}Setup as in \"6 {WALL}\".");
    let how = format!(
        "{missing}The operator binary {} (--elect=false, as user kcm-operator with its RBAC) on the API tier, N Nodes with the control-plane label, \
         the helper DaemonSet's pod on each reported Ready, a simulated helper per master reporting on its KcmNode as the real one does \
         (every {REPORT_PERIOD_SECS} s and on change) and applying each step D = {} ms after it saw it; initial rollout first, then every \
         certificate aged at once (notAfter reported 1 day ahead: due, not expired) and timed until every master reported its renew revision applied.",
        bin.display(),
        D.as_millis()
    );
    let each = |f: &dyn Fn(&Point) -> String| points.iter().map(|p| format!("N={}: {}", p.n, f(p))).collect::<Vec<_>>().join("; ");
    let errors: usize = points.iter().map(|p| p.write_errors).sum();
    let errors = if errors > 0 { format!(" The simulated helpers' writes failed {errors} times (retried).") } else { String::new() };
    vec![
        Row::new(6, KEY, WALL, "s", Summary::Each, series(points.iter().map(|p| p.renewal.as_secs_f64()).collect()))
            .goal(GOAL, |_| flat(&per_master(&|p| p.renewal.as_secs_f64())))
            .note(format!(
                "{how} Floor N×D: {}. Initial rollout: {}.{errors}",
                each(&|p| format!("{:.0} s", p.n as f64 * D.as_secs_f64())),
                each(&|p| format!("{:.1} s", p.initial.as_secs_f64()))
            )),
        Row::new(6, KEY, "Scale: operator's own time per master in the renewal", "ms", Summary::Each, series(points.iter().map(own).collect()))
            .goal(GOAL, |_| flat(&points.iter().map(|p| (p.n, own(p))).collect::<Vec<_>>()))
            .note(format!(
                "(renewal wall time − N×D) / N, D = {} ms: what the operator adds per master to the helper's step; its rollout loop waits \
                 200 ms after each change before it looks (to take a burst of changes in one look), so about 200 ms of it is by design. {setup}",
                D.as_millis()
            )),
        Row::new(6, KEY, "Scale: operator's API requests during the renewal", "requests", Summary::Each, series(points.iter().map(total).collect()))
            .goal(GOAL, |_| flat(&per_master(&total)))
            .note(format!(
                "The operator's own counters (kcm_operator_api_requests_total on its /metrics) from the aging to its UpToDate after the last master; \
                 by verb and resource: {}. The aging changes each master's renewAt, which the operator writes: about one PATCH kcmnodes per master \
                 that a real renewal would not make. {setup}",
                each(&|p| breakdown(&p.requests))
            )),
        Row::new(6, KEY, "Scale: operator RSS after the renewal", "MiB", Summary::Each, series(points.iter().map(|p| p.rss_mib).collect())).note(format!(
            "VmRSS of the operator process after the renewal (/proc/<pid>/status); VmHWM (peak): {}; growth per master from the \
             smallest to the largest N: {}. {setup}",
            each(&|p| format!("{:.1} MiB", p.hwm_mib)),
            growth(&points.iter().map(|p| (p.n, p.rss_mib)).collect::<Vec<_>>()).map_or("—".into(), |g| format!("{:.0} KiB", g * 1024.0))
        )),
    ]
}

/// Runs the scenario: one operator and API tier per N, one sample per N in each row.
pub async fn run() -> Vec<Row> {
    let bin = match super::operator_bin() {
        Ok(b) => b,
        Err(e) => return vec![Row::failed(6, KEY, "Scale: the operator at N simulated masters", format!("{e:#}"))],
    };
    let mut points = Vec::new();
    let mut failures = Vec::new();
    for n in NS {
        let t = Instant::now();
        match measure(n, &bin).await {
            Ok(p) => {
                eprintln!(
                    "[bench scale] N={n}: initial rollout {:.1} s, renewal {:.1} s ({:.0} ms own per master), {} requests, RSS {:.1} MiB ({:.0} s in all)",
                    p.initial.as_secs_f64(),
                    p.renewal.as_secs_f64(),
                    own_ms_per_master(p.renewal, n, D),
                    p.requests.values().sum::<f64>(),
                    p.rss_mib,
                    t.elapsed().as_secs_f64()
                );
                points.push(p);
            }
            Err(e) => {
                eprintln!("[bench scale] N={n} failed: {e:#}");
                failures.push(format!("N={n}: {e:#}"));
            }
        }
    }
    if points.is_empty() {
        return vec![Row::failed(6, KEY, "Scale: the operator at N simulated masters", failures.join("; "))];
    }
    rows(&points, &failures, &bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_compares_the_largest_n_with_the_smallest() {
        assert_eq!(flat(&[(3, 100.0), (10, 150.0), (50, 190.0)]), Some(true));
        assert_eq!(flat(&[(3, 100.0), (10, 150.0), (50, 201.0)]), Some(false));
        assert_eq!(flat(&[(50, 150.0), (3, 100.0)]), Some(true), "by N, not by order");
        assert_eq!(flat(&[(3, 100.0)]), None);
        assert_eq!(flat(&[]), None);
        assert_eq!(growth(&[(3, 30.0), (10, 31.0), (53, 35.0)]), Some(0.1));
        assert_eq!(growth(&[(3, 30.0)]), None);
    }

    #[test]
    fn own_time_is_what_exceeds_the_helpers_delay() {
        assert!((own_ms_per_master(Duration::from_millis(3750), 3, Duration::from_secs(1)) - 250.0).abs() < 1e-9);
        assert!((own_ms_per_master(Duration::from_secs(60), 50, Duration::from_secs(1)) - 200.0).abs() < 1e-9);
    }

    #[test]
    fn api_requests_from_metrics_and_their_delta() {
        let text = "# HELP kcm_operator_api_requests_total x\n# TYPE kcm_operator_api_requests_total counter\n\
            kcm_operator_api_requests_total{resource=\"kcmnodes\",verb=\"PATCH\"} 7\n\
            kcm_operator_api_requests_total{resource=\"kubecontrollermanagers/status\",verb=\"PATCH\"} 12\n\
            kcm_operator_api_requests_total{resource=\"/version\",verb=\"GET\"} 1\n\
            kcm_operator_leading 1\n";
        let got = api_requests(text);
        assert_eq!(got.len(), 3);
        assert_eq!(got[&("PATCH".to_string(), "kcmnodes".to_string())], 7.0);
        assert_eq!(got[&("GET".to_string(), "/version".to_string())], 1.0);
        let mut later = got.clone();
        *later.get_mut(&("PATCH".to_string(), "kcmnodes".to_string())).unwrap() = 10.0;
        later.insert(("CREATE".into(), "events".into()), 4.0);
        let d = delta(&got, &later);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(breakdown(&d), "CREATE events=4, PATCH kcmnodes=3");
    }

    #[test]
    fn memory_from_proc_status() {
        let status = "Name:\tkcm-operator\nVmHWM:\t   40960 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(vm_mib(status, "VmRSS"), Some(20.0));
        assert_eq!(vm_mib(status, "VmHWM"), Some(40.0));
        assert_eq!(vm_mib(status, "VmSwap"), None);
        assert_eq!(label(&[3, 10, 50]), "N=3/10/50");
    }
}
