//! Rows 4 and 5 (key `idle`), on kind at steady state (3/3 healthy, nothing rolling out), over
//! one window of [`WINDOW_SECS`]:
//! - footprint: VmHWM and VmRSS of every operator replica and every helper, next to kcm's own
//!   on the same masters, and CPU seconds per hour (utime+stime over the window);
//! - API cost: the requests per minute each client counted itself (the `api requests/min:`
//!   line kcm_operator::apicount logs once a minute), for the operator's leader and every
//!   helper, by verb in the note. Only the lines whose whole minute lies inside the window.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Row, Series, Summary};
use crate::kind::{client, masters, now_secs, on_node, operator_lease, rate_lines, steady, Rate};

/// Long enough for two whole rate minutes per process inside it.
pub const WINDOW_SECS: u64 = 190;
/// The rate lines read: logged in the last this many seconds, so their minute began inside the window.
const RATES_SINCE_SECS: u64 = WINDOW_SECS - 60;

/// One process as /proc shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcSample {
    /// kcm-operator, node-helper or kcm
    pub name: String,
    pub pid: u32,
    pub rss_kib: f64,
    pub hwm_kib: f64,
    /// utime + stime, clock ticks
    pub ticks: f64,
}

/// The script run in a node container: one line `name pid VmRSS VmHWM ticks` per process, then `hz N`.
const PROCS: &str = r#"for n in kcm-operator node-helper; do for p in $(pgrep -x $n); do echo "$n $p $(awk '/^VmRSS/{r=$2}/^VmHWM/{h=$2}END{print r, h}' /proc/$p/status) $(awk '{print $14+$15}' /proc/$p/stat)"; done; done
p=$(systemctl show -p MainPID --value kube-controller-manager); [ "$p" != 0 ] && echo "kcm $p $(awk '/^VmRSS/{r=$2}/^VmHWM/{h=$2}END{print r, h}' /proc/$p/status) $(awk '{print $14+$15}' /proc/$p/stat)"
echo "hz $(getconf CLK_TCK)""#;

/// Parses [`PROCS`]' output: the samples and the clock tick rate.
pub fn parse_procs(out: &str) -> (Vec<ProcSample>, f64) {
    let mut hz = 100.0;
    let mut v = Vec::new();
    for l in out.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["hz", n] => hz = n.parse().unwrap_or(100.0),
            [name, pid, rss, hwm, ticks] => {
                if let (Ok(pid), Ok(rss_kib), Ok(hwm_kib), Ok(ticks)) = (pid.parse(), rss.parse(), hwm.parse(), ticks.parse()) {
                    v.push(ProcSample { name: name.to_string(), pid, rss_kib, hwm_kib, ticks })
                }
            }
            _ => {}
        }
    }
    (v, hz)
}

/// CPU seconds per hour of one process between two samples `secs` apart (None if it was
/// replaced meanwhile: another PID).
pub fn cpu_per_hour(a: &ProcSample, b: &ProcSample, hz: f64, secs: f64) -> Option<f64> {
    (a.pid == b.pid && secs > 0.0).then(|| (b.ticks - a.ticks).max(0.0) / hz / secs * 3600.0)
}

/// (master, process name) -> the sample and the clock tick rate.
type Snapshot = BTreeMap<(String, String), (ProcSample, f64)>;

/// One process name's figures, one per master.
#[derive(Clone, Debug, Default)]
struct Footprint {
    hwm: Vec<f64>,
    rss: Vec<f64>,
    cpu: Vec<f64>,
}

/// A client's minute totals, the lines they came from, and its reads of anything but Leases.
#[derive(Default)]
struct Cost {
    totals: Vec<f64>,
    bodies: Vec<String>,
    polls: Vec<String>,
}

fn snapshot(masters: &[String]) -> Result<Snapshot, String> {
    let mut all = BTreeMap::new();
    for m in masters {
        let (ok, out) = on_node(m, PROCS);
        if !ok {
            return Err(format!("reading /proc on {m}: {out}"));
        }
        let (procs, hz) = parse_procs(&out);
        for p in procs {
            all.insert((m.clone(), p.name.clone()), (p, hz));
        }
    }
    Ok(all)
}

/// The total of a rate line and its reads of anything but Leases.
fn total_and_polls(rates: &[Rate]) -> (f64, Vec<String>) {
    let total = rates.iter().map(|r| r.2).sum();
    let polls = rates.iter().filter(|(v, r, n)| (v == "GET" || v == "LIST") && r != "leases" && *n > 0.0).map(|(v, r, n)| format!("{v} {r}={n}")).collect();
    (total, polls)
}

pub async fn run() -> Vec<Row> {
    match measure().await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed(4, "idle", "footprint and idle API cost", e)],
    }
}

async fn measure() -> Result<Vec<Row>, String> {
    let c = client().await;
    let masters = masters(&c).await;
    let ok = crate::apitier::poll("steady state", Duration::from_secs(300), || async { steady(&c, &masters).await.ok() }).await;
    if ok.is_none() {
        return Err(format!("never steady within 300s: {}", steady(&c, &masters).await.err().unwrap_or_default()));
    }
    let t0 = now_secs();
    let first = snapshot(&masters)?;
    tokio::time::sleep(Duration::from_secs(WINDOW_SECS)).await;
    let secs = now_secs() - t0;
    let last = snapshot(&masters)?;
    steady(&c, &masters).await.map_err(|e| format!("not steady at the end of the window: {e}"))?;
    let leader = operator_lease(&c).await.and_then(|l| l.node()).ok_or("no operator leader")?;

    // Footprint, per process name: (hwm MiB, rss MiB, cpu s/h) for each master.
    let mut by: BTreeMap<&str, Footprint> = BTreeMap::new();
    for ((m, name), (b, hz)) in &last {
        let Some((a, _)) = first.get(&(m.clone(), name.clone())) else { continue };
        let cpu = cpu_per_hour(a, b, *hz, secs).ok_or_else(|| format!("{name} on {m} was restarted during the window (PID {} -> {})", a.pid, b.pid))?;
        let e = by.entry(match name.as_str() {
            "kcm-operator" => "operator",
            "node-helper" => "helper",
            _ => "kcm",
        });
        let v = e.or_default();
        v.hwm.push(b.hwm_kib / 1024.0);
        v.rss.push(b.rss_kib / 1024.0);
        v.cpu.push(cpu);
    }
    for who in ["operator", "helper", "kcm"] {
        let n = by.get(who).map(|v| v.hwm.len()).unwrap_or(0);
        if n != masters.len() {
            return Err(format!("{who}: {n} processes found, one per master expected ({})", masters.len()));
        }
    }
    let kcm = by["kcm"].clone();
    let mut rows = Vec::new();
    let note_fp = format!(
        "/proc/<pid>/status and /proc/<pid>/stat of each process on each master (n = replicas), read at the start and end of {secs:.0}s of steady state; the operator's leader is on {leader}; baseline: kube-controller-manager itself on the same masters"
    );
    for (who, goal) in [("operator", 30.0), ("helper", 20.0)] {
        let Footprint { hwm, rss, cpu } = by[who].clone();
        rows.push(
            Row::new(4, "idle", &format!("{who} peak RSS (VmHWM)"), "MiB", Summary::MedianWorst, Series::new(who, hwm))
                .baseline(Series::new("kcm", kcm.hwm.clone()))
                .goal(&format!("<= {goal} MiB"), move |r| r.ours.worst().map(|w| w <= goal))
                .note(note_fp.clone()),
        );
        rows.push(
            Row::new(4, "idle", &format!("{who} steady RSS (VmRSS)"), "MiB", Summary::MedianWorst, Series::new(who, rss))
                .baseline(Series::new("kcm", kcm.rss.clone()))
                .note(note_fp.clone()),
        );
        rows.push(
            Row::new(4, "idle", &format!("{who} CPU at idle"), "CPU s/h", Summary::MedianWorst, Series::new(who, cpu))
                .baseline(Series::new("kcm", kcm.cpu.clone()))
                .note(note_fp.clone()),
        );
    }

    // API cost: the operator's leader and every helper, each minute line inside the window.
    let pods = crate::kind::pods_with_app(&c, kcm_operator::api::HELPER_APP).await;
    let mut helper_pods: Vec<(String, String)> =
        pods.iter().filter_map(|p| Some((crate::kind::pod_node(p)?, p.metadata.name.clone()?))).filter(|(n, _)| masters.contains(n)).collect();
    helper_pods.sort();
    if helper_pods.len() != masters.len() {
        return Err(format!("one helper pod per master expected: {helper_pods:?}"));
    }
    let since = format!("{RATES_SINCE_SECS}s");
    let cost = |who: &str, pods: &[(String, String)]| -> Result<Cost, String> {
        let mut c = Cost::default();
        for (node, pod) in pods {
            let lines = rate_lines(pod, &since)?;
            if lines.is_empty() {
                return Err(format!("{who} on {node}: no rate line in the last {since}"));
            }
            for (body, rates) in lines {
                let (t, p) = total_and_polls(&rates);
                c.totals.push(t);
                c.polls.extend(p);
                c.bodies.push(format!("{node}: {body}"));
            }
        }
        Ok(c)
    };
    let op = vec![(leader.clone(), format!("{}-{leader}", kcm_operator::api::OPERATOR_APP))];
    for (who, pods) in [("operator leader", op), ("helper", helper_pods)] {
        let Cost { totals, bodies, polls } = cost(who, &pods)?;
        let polls_none = polls.is_empty();
        rows.push(
            Row::new(5, "idle", &format!("{who} API requests at idle"), "req/min", Summary::MedianWorst, Series::new(who, totals))
                .goal("reads: Leases only", move |_| Some(polls_none))
                .note(format!(
                    "each client's own counter (the `api requests/min:` line, one per minute and process, wholly inside the window){}: {}",
                    if polls.is_empty() { String::new() } else { format!("; READS OTHER THAN LEASES: {}", polls.join(", ")) },
                    bodies.join("; ")
                )),
        );
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procs_parse_and_cpu() {
        let out = "kcm-operator 120 20480 24576 300\nnode-helper 130 10240 12288 50\nkcm 140 102400 150000 9000\nhz 100\n";
        let (p, hz) = parse_procs(out);
        assert_eq!(hz, 100.0);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], ProcSample { name: "kcm-operator".into(), pid: 120, rss_kib: 20480.0, hwm_kib: 24576.0, ticks: 300.0 });
        let mut later = p[0].clone();
        later.ticks = 400.0; // 1 s of CPU in 100 s: 36 s per hour
        assert_eq!(cpu_per_hour(&p[0], &later, hz, 100.0), Some(36.0));
        later.pid = 121;
        assert_eq!(cpu_per_hour(&p[0], &later, hz, 100.0), None, "a restarted process is no sample");
    }

    #[test]
    fn polls_are_reads_of_anything_but_leases() {
        let r = |v: &str, res: &str, n: f64| (v.to_string(), res.to_string(), n);
        let (t, p) = total_and_polls(&[r("GET", "leases", 30.0), r("PATCH", "kcmnodes/status", 6.0)]);
        assert_eq!((t, p.len()), (36.0, 0));
        let (_, p) = total_and_polls(&[r("LIST", "pods", 1.0)]);
        assert_eq!(p, vec!["LIST pods=1".to_string()]);
    }
}
