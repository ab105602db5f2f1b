//! kcm's leadership as seen from outside, shared by the kind tests and the benchmarks: kcm's
//! Lease read at about 20 Hz on a thread of its own, and each master's kcm MainPID read inside
//! the node at about 10 Hz; from both, the intervals "without a working leader" (no holder, an
//! expired Lease, or a holder whose kcm process is gone) and the holder changes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kcm_operator::api::KCM_LEASE;
use kcm_operator::rollout::leader_node;
use kube::api::Api;

use kcm_operator::api::CR_NAME;

use crate::kind::{client, kubectl, now_secs, on_node};

/// How often the Lease watcher reads kcm's Lease.
pub const LEASE_PERIOD: Duration = Duration::from_millis(50);
/// Where the planted fake kcm lives in a node container (argv0 basename kube-controller-manager).
pub const FAKE_DIR: &str = "/opt/kcm-e2e-fence"; // not /tmp: noexec on kind nodes
/// The renewal drill: 10-minute certificates (the CSR API's minimum), renewed when 90% remains.
pub const DRILL_MINUTES: u32 = 10;
pub const DRILL_PERCENT: u8 = 90;
/// The seed's command on every master, run over ssh in its `for master_ip in ...` loop.
pub const SEED_RESTART: &str = "systemctl daemon-reload && systemctl enable kube-controller-manager && systemctl restart kube-controller-manager";

/// The CR's certificate spec as `manifests/kind` has it: yearly, Referenced.
pub fn restore_patch() -> serde_json::Value {
    serde_json::json!({"spec": {"certificate": {"validityMinutes": null, "renewWhenRemainingPercent": 20, "kubeconfigMode": "Referenced"}}})
}

/// The drill in `mode` (Referenced or Embedded): a renewal round every minute or so.
pub fn drill_patch(mode: &str) -> serde_json::Value {
    serde_json::json!({"spec": {"certificate": {"kubeconfigMode": mode, "validityMinutes": DRILL_MINUTES, "renewWhenRemainingPercent": DRILL_PERCENT}}})
}
/// The MainPID watchers stop by themselves after this long, should their owner not stop them.
pub const WATCH_MAX_SECS: u64 = 3 * 3600;

/// One read of kcm's Lease.
#[derive(Clone, Debug)]
pub struct LeaseSample {
    /// When it was read (the middle of the request), seconds since the epoch.
    pub t: f64,
    /// Full holder identity; None when empty (a released Lease) or no Lease.
    pub holder: Option<String>,
    pub renew: Option<f64>,
    pub acquire: Option<f64>,
    pub duration: f64,
}

impl LeaseSample {
    pub fn expires(&self) -> Option<f64> {
        self.renew.map(|r| r + self.duration)
    }
    pub fn live(&self, at: f64) -> bool {
        self.holder.is_some() && self.expires().is_some_and(|e| at <= e)
    }
}

/// A master's kcm MainPID over time: its changes (0 while the unit has no process).
#[derive(Clone, Debug, Default)]
pub struct PidTrack {
    pub changes: Vec<(f64, u32)>,
    /// When the watcher last read it.
    pub last_seen: f64,
}

impl PidTrack {
    pub fn at(&self, t: f64) -> Option<u32> {
        self.changes.iter().rev().find(|(ct, _)| *ct <= t).map(|(_, p)| *p)
    }
    /// Every new kcm process in (from, to]: a non-zero MainPID unlike the last non-zero one.
    pub fn restarts(&self, from: f64, to: f64) -> Vec<(f64, u32)> {
        let mut last = self.changes.iter().rev().find(|(t, p)| *t <= from && *p != 0).map(|(_, p)| *p);
        let mut out = Vec::new();
        for (t, p) in self.changes.iter().filter(|(t, _)| *t > from && *t <= to) {
            if *p != 0 && Some(*p) != last {
                out.push((*t, *p));
                last = Some(*p);
            }
        }
        out
    }
    /// The first moment after `from` the MainPID differed from what it was then (a stop or a new process).
    pub fn first_change(&self, from: f64) -> Option<f64> {
        let p0 = self.at(from);
        self.changes.iter().find(|(t, p)| *t > from && Some(*p) != p0).map(|(t, _)| *t)
    }
    /// Any change at all in (from, to].
    pub fn changes_between(&self, from: f64, to: f64) -> Vec<(f64, u32)> {
        self.changes.iter().filter(|(t, _)| *t > from && *t <= to).copied().collect()
    }
}

/// The Lease watcher (its own thread and runtime, so that nothing the test does blocks it)
/// and one MainPID watcher per master (a loop inside the node container, read line by line).
pub struct Watch {
    pub stop: Arc<AtomicBool>,
    pub lease: Arc<Mutex<Vec<LeaseSample>>>,
    pub lease_errors: Arc<Mutex<Vec<(f64, String)>>>,
    pub pids: Arc<Mutex<BTreeMap<String, PidTrack>>>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub children: Vec<Child>,
    pub nodes: Vec<String>,
    pub pidfile: String,
}

impl Watch {
    pub fn start(nodes: &[String]) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let lease = Arc::new(Mutex::new(Vec::new()));
        let lease_errors = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(BTreeMap::new()));
        let mut threads = Vec::new();
        let (s, l, e) = (stop.clone(), lease.clone(), lease_errors.clone());
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("Lease watcher runtime");
            rt.block_on(async move {
                let c = client().await;
                let api = Api::<Lease>::namespaced(c, KCM_LEASE.0);
                while !s.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let a = now_secs();
                    let r = tokio::time::timeout(Duration::from_secs(1), api.get_opt(KCM_LEASE.1)).await;
                    let t = (a + now_secs()) / 2.0;
                    match r {
                        Ok(Ok(found)) => {
                            let spec = found.and_then(|l| l.spec).unwrap_or_default();
                            let secs = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime| m.0.as_millisecond() as f64 / 1000.0;
                            l.lock().unwrap().push(LeaseSample {
                                t,
                                holder: spec.holder_identity.filter(|h| !h.is_empty()),
                                renew: spec.renew_time.as_ref().map(secs),
                                acquire: spec.acquire_time.as_ref().map(secs),
                                duration: spec.lease_duration_seconds.unwrap_or(0) as f64,
                            });
                        }
                        Ok(Err(err)) => e.lock().unwrap().push((t, err.to_string())),
                        Err(_) => e.lock().unwrap().push((t, "no answer within 1s".into())),
                    }
                    if let Some(rest) = LEASE_PERIOD.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(rest).await;
                    }
                }
            });
        }));
        let pidfile = format!("/run/kcm-e2e-leadership-watch.{}", std::process::id());
        let mut children = Vec::new();
        for n in nodes {
            // Ends by itself after WATCH_MAX_SECS, or when its output is gone; Drop kills it by
            // the PID it wrote.
            let script = format!(
                "echo $$ > {pidfile}; end=$(( $(date +%s) + {WATCH_MAX_SECS} )); while [ $(date +%s) -lt $end ]; do echo \"$(systemctl show -p MainPID --value kube-controller-manager 2>/dev/null)\" || exit 0; sleep 0.1; done"
            );
            let pids = pids.clone();
            let name = n.clone();
            let (child, thread) = spawn_node_loop(n, &script, "MainPID watcher", move |line| {
                let t = now_secs();
                let Ok(pid) = line.trim().parse::<u32>() else { return };
                let mut g = pids.lock().unwrap();
                let tr: &mut PidTrack = g.entry(name.clone()).or_default();
                tr.last_seen = t;
                if tr.changes.last().map(|c| c.1) != Some(pid) {
                    tr.changes.push((t, pid));
                }
            });
            threads.push(thread);
            children.push(child);
        }
        Watch { stop, lease, lease_errors, pids, threads, children, nodes: nodes.to_vec(), pidfile }
    }

    /// Seconds without a working leader in [from, to] (see [`leaderless`], kcm's process counted).
    pub fn leaderless_secs(&self, from: f64, to: f64) -> f64 {
        leaderless(&self.lease_all(), &self.pid_tracks(), from, to, true).iter().map(|(a, b, _)| (b - a).max(0.0)).sum()
    }
    pub fn lease_all(&self) -> Vec<LeaseSample> {
        self.lease.lock().unwrap().clone()
    }
    pub fn lease_since(&self, from: f64) -> Vec<LeaseSample> {
        let g = self.lease.lock().unwrap();
        let i = g.partition_point(|s| s.t < from);
        g[i..].to_vec()
    }
    pub fn latest(&self) -> Option<LeaseSample> {
        self.lease.lock().unwrap().last().cloned()
    }
    pub fn pid_track(&self, node: &str) -> PidTrack {
        self.pids.lock().unwrap().get(node).cloned().unwrap_or_default()
    }
    pub fn pid_tracks(&self) -> BTreeMap<String, PidTrack> {
        self.pids.lock().unwrap().clone()
    }
    pub fn lease_errors(&self, from: f64, to: f64) -> Vec<(f64, String)> {
        self.lease_errors.lock().unwrap().iter().filter(|(t, _)| *t >= from && *t <= to).cloned().collect()
    }
    /// Panics unless every MainPID watcher read its master within the last 3 s.
    pub fn assert_fresh(&self, what: &str) {
        let now = now_secs();
        for n in &self.nodes {
            let tr = self.pid_track(n);
            assert!(now - tr.last_seen < 3.0, "{what}: the MainPID watcher on {n} last read {:.1}s ago: the PID figures would be blind", now - tr.last_seen);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for n in &self.nodes {
            let _ = on_node(n, &format!("if [ -s {f} ]; then kill $(cat {f}) 2>/dev/null; rm -f {f}; fi", f = self.pidfile));
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The live holder's master just before `t`.
pub fn leader_before(lease: &[LeaseSample], t: f64) -> Option<String> {
    lease.iter().rev().filter(|s| s.t < t).find(|s| s.live(s.t)).and_then(|s| leader_node(s.holder.as_deref()))
}

/// Intervals within [from, to] without a working leader: no holder (released, or no Lease),
/// an expired Lease, or, when `process` is set, a holder whose kcm process is gone (the
/// MainPID on its master when the identity first appeared no longer runs). Each as
/// (start, end, why). Starts and ends are refined by the Lease's own times where it tells
/// more than the sampling (an expiry instant, the new holder's renewTime).
pub fn leaderless(lease: &[LeaseSample], pids: &BTreeMap<String, PidTrack>, from: f64, to: f64, process: bool) -> Vec<(f64, f64, String)> {
    let mut first_seen: BTreeMap<&str, f64> = BTreeMap::new();
    for s in lease {
        if let Some(h) = s.holder.as_deref() {
            first_seen.entry(h).or_insert(s.t);
        }
    }
    let holder_pid = |h: &str| -> Option<(String, u32)> {
        let node = leader_node(Some(h))?;
        let tr = pids.get(&node)?;
        // An identity seen before the MainPID watcher's first read: the first PID it read.
        let pid = tr.at(*first_seen.get(h)?).or_else(|| tr.changes.first().map(|c| c.1))?;
        (pid != 0).then_some((node, pid))
    };
    // (time, is a Lease sample)
    let mut instants: Vec<(f64, bool)> = vec![(from, false)];
    for s in lease.iter().filter(|s| s.t >= from - 30.0 && s.t <= to) {
        if s.t >= from {
            instants.push((s.t, true));
        }
        // Just past the expiry (the Lease is live up to and including it).
        if let Some(e) = s.expires().map(|e| e + 1e-3).filter(|e| *e >= from && *e <= to) {
            instants.push((e, false));
        }
    }
    if process {
        for tr in pids.values() {
            instants.extend(tr.changes.iter().filter(|(t, _)| *t >= from && *t <= to).map(|(t, _)| (*t, false)));
        }
    }
    instants.sort_by(|a, b| a.0.total_cmp(&b.0));
    let sample_at = |t: f64| -> Option<&LeaseSample> {
        let i = lease.partition_point(|s| s.t <= t);
        (i > 0).then(|| &lease[i - 1])
    };
    let working = |t: f64| -> Result<(), String> {
        let Some(s) = sample_at(t) else { return Err("no Lease read yet".into()) };
        let Some(h) = s.holder.as_deref() else { return Err("no holder (released or no Lease)".into()) };
        if !s.live(t) {
            return Err(format!("Lease of {h} expired"));
        }
        if process {
            if let Some((node, pid)) = holder_pid(h) {
                if pids.get(&node).and_then(|tr| tr.at(t)) != Some(pid) {
                    return Err(format!("{h} still named, its kcm (PID {pid} on {node}) gone"));
                }
            }
        }
        Ok(())
    };
    let mut out = Vec::new();
    let mut down: Option<(f64, String)> = None;
    let mut prev_t = from;
    for (t, is_sample) in instants {
        match (working(t), down.take()) {
            (Err(why), None) => {
                // A released Lease was released after the previous instant: count from there.
                let start = if is_sample && why.starts_with("no holder") { prev_t } else { t };
                down = Some((start.max(from), why));
            }
            (Err(_), Some(d)) => down = Some(d),
            (Ok(()), Some((start, why))) => {
                let end = if is_sample { sample_at(t).and_then(|s| s.renew).map_or(t, |r| r.max(start).min(t)) } else { t };
                out.push((start, end, why));
            }
            (Ok(()), None) => {}
        }
        prev_t = t;
    }
    if let Some((start, why)) = down {
        out.push((start, to, format!("{why} (still at the end of the phase)")));
    }
    out
}

/// The sequence of distinct holders in [from, to], starting with the one at `from`.
pub fn holder_sequence(lease: &[LeaseSample], from: f64, to: f64) -> Vec<(f64, String)> {
    let mut last = lease.iter().rev().filter(|s| s.t <= from).find_map(|s| s.holder.clone());
    let mut seq: Vec<(f64, String)> = last.iter().map(|h| (from, h.clone())).collect();
    for s in lease.iter().filter(|s| s.t > from && s.t <= to) {
        if let Some(h) = &s.holder {
            if Some(h) != last.as_ref() {
                seq.push((s.t, h.clone()));
                last = Some(h.clone());
            }
        }
    }
    seq
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct UnitFacts {
    pub main_pid: u32,
    pub n_restarts: u32,
}

pub fn unit_facts(node: &str) -> UnitFacts {
    let (_, out) = on_node(node, "systemctl show -p MainPID -p NRestarts kube-controller-manager");
    let mut f = UnitFacts::default();
    for line in out.lines() {
        match line.trim().split_once('=') {
            Some(("MainPID", v)) => f.main_pid = v.parse().unwrap_or(0),
            Some(("NRestarts", v)) => f.n_restarts = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    f
}

pub fn unit_facts_all(masters: &[String]) -> BTreeMap<String, UnitFacts> {
    std::thread::scope(|s| {
        let hs: Vec<_> = masters.iter().map(|m| (m.clone(), s.spawn(move || unit_facts(m)))).collect();
        hs.into_iter().map(|(m, h)| (m, h.join().expect("systemctl show thread"))).collect()
    })
}

/// The first Lease read after `after` with a live holder other than `old`.
pub async fn wait_new_holder(w: &Watch, after: f64, old: Option<&str>, within: Duration) -> Option<LeaseSample> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = w.lease_since(after).into_iter().find(|s| s.holder.is_some() && s.holder.as_deref() != old && s.live(s.t)) {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// When the new holder took the Lease: its acquireTime (written by kcm, same host clock) when
/// it lies between `after` and the read that showed it, else that read.
pub fn acquired_at(s: &LeaseSample, after: f64) -> f64 {
    s.acquire.filter(|a| *a >= after && *a <= s.t).unwrap_or(s.t)
}

/// Applies a merge patch to the CR when dropped armed (on a panic): puts back what the test
/// changed (spec.certificate, spec.paused).
pub struct PatchGuard {
    pub patch: Option<serde_json::Value>,
}

impl PatchGuard {
    pub fn arm(&mut self, patch: serde_json::Value) {
        self.patch = Some(patch);
    }
    pub fn disarm(&mut self) {
        self.patch = None;
    }
}

impl Drop for PatchGuard {
    fn drop(&mut self) {
        let Some(p) = self.patch.take() else { return };
        let p = p.to_string();
        let (ok, out) = kubectl(&["patch", "kubecontrollermanager", CR_NAME, "--type", "merge", "-p", &p]);
        eprintln!("restoring the CR after a failure ({p}): {}", if ok { "done".to_string() } else { out });
    }
}

/// Fake kcm processes planted in node containers; killed (by their PID) when dropped.
#[derive(Default)]
pub struct Planted {
    procs: Vec<(String, u32)>,
}

pub fn fake_path() -> String {
    format!("{FAKE_DIR}/kube-controller-manager")
}

impl Planted {
    /// Starts `sleep 600` as /tmp/fence/kube-controller-manager on `node`; returns its PID.
    pub fn plant(&mut self, node: &str) -> u32 {
        let fake = fake_path();
        let script = format!(
            "set -e; rm -rf {FAKE_DIR}; mkdir -p {FAKE_DIR}; cp /bin/sleep {fake}; \
             (setsid sh -c 'echo $$ > {FAKE_DIR}/pid; exec {fake} 600' >/dev/null 2>&1 &); \
             i=0; while [ ! -s {FAKE_DIR}/pid ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; cat {FAKE_DIR}/pid"
        );
        let (ok, out) = on_node(node, &script);
        assert!(ok, "planting a fake kube-controller-manager on {node}: {out}");
        let pid: u32 = out.trim().lines().last().unwrap_or("").trim().parse().unwrap_or_else(|_| panic!("PID of the fake kcm on {node}: {out:?}"));
        self.procs.push((node.to_string(), pid));
        // `sh` wrote its PID, then execs the fake: wait until the PID runs it.
        let argv0 = format!("tr '\\0' '\\n' < /proc/{pid}/cmdline 2>/dev/null | head -n1");
        let t0 = Instant::now();
        loop {
            if on_node(node, &argv0).1.trim() == fake {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "the fake kcm (PID {pid}) on {node} does not run {fake}: {:?}", on_node(node, &argv0).1);
            std::thread::sleep(Duration::from_millis(100));
        }
        pid
    }

    /// Kills every planted process (only a PID that still runs the fake) and removes the files.
    pub fn remove_all(&mut self) {
        let fake = fake_path();
        for (node, pid) in self.procs.drain(..) {
            let script = format!(
                "if [ \"$(tr '\\0' '\\n' < /proc/{pid}/cmdline 2>/dev/null | head -n1)\" = {fake} ]; then kill -9 {pid}; fi; \
                 i=0; while [ \"$(tr '\\0' '\\n' < /proc/{pid}/cmdline 2>/dev/null | head -n1)\" = {fake} ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done; \
                 rm -rf {FAKE_DIR}; [ \"$(tr '\\0' '\\n' < /proc/{pid}/cmdline 2>/dev/null | head -n1)\" != {fake} ]"
            );
            let (ok, out) = on_node(&node, &script);
            if !ok {
                eprintln!("the fake kcm (PID {pid}) on {node} may still run: {out}");
            }
        }
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// Runs `script` (a bounded loop printing one line a look) inside `node`'s container and
/// hands each line to `on_line` on a thread of its own, until the loop's output ends.
fn spawn_node_loop(node: &str, script: &str, what: &str, mut on_line: impl FnMut(&str) + Send + 'static) -> (Child, std::thread::JoinHandle<()>) {
    let mut child = Command::new("docker")
        .args(["exec", node, "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("docker exec {node} ({what}): {e}"));
    let out = child.stdout.take().expect("watcher stdout");
    let thread = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
        }
    });
    (child, thread)
}

/// Probe results by master: `(time, up)` in the order probed.
pub type HealthSamples = BTreeMap<String, Vec<(f64, bool)>>;

/// How often [`HealthWatch`] probes each master's kcm.
pub const HEALTH_PERIOD_SECS: &str = "0.1";
/// kubeadm's kcm static pod serves /healthz here, inside the node (`--bind-address=127.0.0.1`).
pub const KUBEADM_KCM_HEALTHZ: &str = "https://127.0.0.1:10257/healthz";

/// kcm's `/healthz` on every master at about 10 Hz, probed inside the node (a loop in the
/// node container, read line by line, as the MainPID watcher): ours at the node's address and
/// the CR's secure port, else kubeadm's static pod at [`KUBEADM_KCM_HEALTHZ`]. A master counts
/// as up only while one of them answers 200 within 3 s (the helper's probe timeout): an active unit whose kcm does not
/// serve yet is down, and a master still on kubeadm's kcm is up while that one serves.
pub struct HealthWatch {
    samples: Arc<Mutex<HealthSamples>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    children: Vec<Child>,
    nodes: Vec<String>,
    pidfile: String,
}

impl HealthWatch {
    /// Starts probing `masters` (their InternalIPs from the API; the port from the CR).
    pub async fn start(c: &kube::Client, masters: &[String]) -> HealthWatch {
        let (kcm, _) = crate::kind::cr(c).await.expect("the CR");
        let port = kcm.spec.kcm.secure_port;
        let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(c.clone());
        let samples: Arc<Mutex<HealthSamples>> = Arc::new(Mutex::new(BTreeMap::new()));
        let pidfile = format!("/run/kcm-e2e-health-watch.{}", std::process::id());
        let (mut threads, mut children) = (Vec::new(), Vec::new());
        for m in masters {
            let n = nodes.get(m).await.unwrap_or_else(|e| panic!("reading Node {m}: {e}"));
            let ip = kcm_operator::pki::NodeIdentity::from_node(&n).unwrap_or_else(|e| panic!("addresses of {m}: {e}")).primary_ip();
            let probe = |url: &str| format!("curl -sk -m 3 -o /dev/null -w '%{{http_code}}' {url} 2>/dev/null");
            let script = format!(
                "echo $$ >> {pidfile}; end=$(( $(date +%s) + {WATCH_MAX_SECS} )); while [ $(date +%s) -lt $end ]; do c=$({ours}); [ \"$c\" = 200 ] || c=$({kubeadm}); echo \"$c\" || exit 0; sleep {HEALTH_PERIOD_SECS}; done",
                ours = probe(&format!("https://{ip}:{port}/healthz")),
                kubeadm = probe(KUBEADM_KCM_HEALTHZ),
            );
            let (samples, name) = (samples.clone(), m.clone());
            let (child, thread) = spawn_node_loop(m, &script, "health watcher", move |line| {
                let up = line.trim() == "200";
                samples.lock().unwrap().entry(name.clone()).or_default().push((now_secs(), up));
            });
            threads.push(thread);
            children.push(child);
        }
        let w = HealthWatch { samples, threads, children, nodes: masters.to_vec(), pidfile };
        // Every master probed once before anyone counts (a master not probed yet is down).
        let t0 = Instant::now();
        while w.samples.lock().unwrap().len() < masters.len() {
            assert!(t0.elapsed() < Duration::from_secs(20), "the health watchers gave no first probe within 20s: {:?}", w.samples.lock().unwrap().keys());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w
    }

    /// The most masters whose kcm did not answer /healthz at one moment in [from, to], and
    /// the first moment it was so, with who was down (see [`most_down`]).
    pub fn most_down(&self, from: f64, to: f64) -> (usize, f64, Vec<String>) {
        most_down(&self.samples.lock().unwrap(), from, to)
    }

    /// Whether `node`'s kcm answered its latest probe.
    pub fn up(&self, node: &str) -> bool {
        self.samples.lock().unwrap().get(node).and_then(|v| v.last()).is_some_and(|s| s.1)
    }

    /// Whether `node`'s kcm answered every probe in [from, to] (and was probed in it).
    pub fn always_up(&self, node: &str, from: f64, to: f64) -> bool {
        let g = self.samples.lock().unwrap();
        let v = g.get(node).map(Vec::as_slice).unwrap_or_default();
        let inside: Vec<bool> = v.iter().filter(|s| s.0 >= from && s.0 <= to).map(|s| s.1).collect();
        !inside.is_empty() && inside.iter().all(|up| *up)
    }

    /// Until `done` (checked once a second) or `within`: the most masters whose kcm did not
    /// answer /healthz at one moment, and that moment described. Panics when `within` passes,
    /// or when a watcher goes blind.
    pub async fn max_down_during<F, Fut>(&self, masters: &[String], within: Duration, mut done: F) -> (usize, String)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let from = now_secs();
        let deadline = Instant::now() + within;
        let worst = |to: f64| {
            let (n, at, who) = self.most_down(from, to);
            (n, format!("{n} down at +{:.1}s: {who:?}", at - from))
        };
        while Instant::now() < deadline {
            self.assert_fresh("max_down_during", masters);
            if done().await {
                return worst(now_secs());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("not done within {within:?}; {}\n{}", worst(now_secs()).1, crate::kind::diagnostics());
    }

    /// Panics unless every master was probed within the last 4 s (a blind watcher proves nothing).
    pub fn assert_fresh(&self, what: &str, masters: &[String]) {
        let now = now_secs();
        let g = self.samples.lock().unwrap();
        for m in masters {
            let last = g.get(m).and_then(|v| v.last()).map_or(f64::NEG_INFINITY, |s| s.0);
            assert!(now - last < 4.0, "{what}: kcm's /healthz on {m} last probed {:.1}s ago: the availability figures would be blind", now - last);
        }
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = on_node(n, &format!("if [ -s {f} ]; then kill $(cat {f}) 2>/dev/null; rm -f {f}; fi", f = self.pidfile));
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// From per-master probe results `(time, up)`: the most masters down at one moment in
/// [from, to], the first moment it was reached, and who was down then. Each master is in the
/// state of its latest probe (from before `from` too); a master not probed yet counts as down.
pub fn most_down(samples: &HealthSamples, from: f64, to: f64) -> (usize, f64, Vec<String>) {
    let mut state: BTreeMap<&str, bool> = samples.iter().map(|(m, v)| (m.as_str(), v.iter().rev().find(|s| s.0 <= from).is_some_and(|s| s.1))).collect();
    let down = |st: &BTreeMap<&str, bool>| st.iter().filter(|(_, up)| !**up).map(|(m, _)| m.to_string()).collect::<Vec<_>>();
    let mut events: Vec<(f64, &str, bool)> =
        samples.iter().flat_map(|(m, v)| v.iter().filter(|s| s.0 > from && s.0 <= to).map(move |s| (s.0, m.as_str(), s.1))).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut worst = (down(&state).len(), from, down(&state));
    for (t, m, up) in events {
        state.insert(m, up);
        let d = down(&state);
        if d.len() > worst.0 {
            worst = (d.len(), t, d);
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_down_counts_overlaps_not_samples() {
        let s: HealthSamples = [
            ("a".to_string(), vec![(0.0, true), (1.0, false), (3.0, true)]),
            ("b".to_string(), vec![(0.5, true), (2.5, false), (4.0, true)]),
            ("c".to_string(), vec![(0.2, true)]),
        ]
        .into();
        // a down in [1, 3), b down in [2.5, 4): both at 2.5.
        assert_eq!(most_down(&s, 0.6, 10.0), (2, 2.5, vec!["a".to_string(), "b".to_string()]));
        // Only a's outage in [0.6, 2]: one at a time.
        assert_eq!(most_down(&s, 0.6, 2.0).0, 1);
        // The state before `from` counts: from 2.6 on, a is still down until 3.0 (b too).
        assert_eq!(most_down(&s, 2.6, 2.9), (2, 2.6, vec!["a".to_string(), "b".to_string()]));
        // Not probed before `from`: down.
        assert_eq!(most_down(&s, 0.1, 0.15).0, 2);
    }
}
