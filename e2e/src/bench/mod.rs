//! Benchmarks side by side (`bash e2e/run.sh bench`): every scenario measures ours next to
//! what an admin would do instead, on the same cluster in the same run, and returns [`Row`]s.
//! The binary `e2e/src/bin/bench.rs` runs them and writes `e2e/bench/results.json` and
//! `e2e/bench/RESULTS.md` (the table). The figures are measured, never assumed: a row whose
//! measurement failed carries the error in `note` and no samples, and the table says so.

use serde::{Deserialize, Serialize};

pub mod csr;
pub mod idle;
pub mod leader_loss;
pub mod rotation;
pub mod scale;

/// The scenarios by the key `--only` takes, in the order a full run runs them: the idle
/// figures first, while the cluster `up` made is quiet.
pub const KEYS: &[&str] = &["idle", "csr", "scale", "leader-loss", "rotation"];

/// The scenarios that change the kind cluster's state (they wait for the idle window).
pub const DISTURBS_KIND: &[&str] = &["leader-loss", "rotation"];

/// The issue's row number of a scenario's first row.
fn number(key: &str) -> u8 {
    match key {
        "csr" => 1,
        "rotation" => 2,
        "leader-loss" => 3,
        "idle" => 4,
        "scale" => 6,
        _ => 0,
    }
}

/// Runs one scenario on a task of its own: a panic in it (a guard restores what it changed)
/// becomes a row that says so instead of ending the run.
pub async fn run(key: &str) -> Vec<Row> {
    let k = key.to_string();
    let task = tokio::spawn(async move {
        match k.as_str() {
            "idle" => idle::run().await,
            "csr" => csr::run().await,
            "scale" => scale::run().await,
            "leader-loss" => leader_loss::run().await,
            "rotation" => rotation::run().await,
            _ => vec![Row::failed(number(&k), &k, &k, "this scenario is not built yet")],
        }
    });
    match task.await {
        Ok(rows) => rows,
        Err(e) => {
            let why = match e.try_into_panic() {
                Ok(p) => p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            vec![Row::failed(number(key), key, key, format!("the scenario panicked: {why}"))]
        }
    }
}

/// The kind cluster's Kubernetes version (the API tier runs the same binaries); without a
/// kind cluster (a run of API-tier scenarios only), the API tier's.
pub async fn kubernetes_version() -> String {
    if !crate::kind::kubeconfig_path().exists() {
        return format!("{} (API tier; no kind cluster)", crate::apitier::k8s_version());
    }
    match crate::kind::client().await.apiserver_version().await {
        Ok(v) => v.git_version,
        Err(e) => format!("unknown ({e})"),
    }
}

/// The operator binary the API-tier scenarios run: `$KCM_OPERATOR_BIN` (run.sh sets it to
/// the release build), else `$CARGO_TARGET_DIR/{release,debug}/kcm-operator`.
pub fn operator_bin() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KCM_OPERATOR_BIN").filter(|v| !v.is_empty()) {
        let p = std::path::PathBuf::from(p);
        anyhow::ensure!(p.is_file(), "KCM_OPERATOR_BIN={} is not a file", p.display());
        return Ok(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let found = ["release", "debug"].iter().map(|p| target.join(p).join("kcm-operator")).find(|p| p.is_file());
    found.ok_or_else(|| {
        anyhow::anyhow!("no kcm-operator binary in {}/{{release,debug}}: build it (cargo build -p kcm-operator) or set KCM_OPERATOR_BIN", target.display())
    })
}

/// The body of `GET http://<addr><path>` (a local /metrics or /readyz), within 5 s.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(std::time::Duration::from_secs(5), get).await.map_err(|_| anyhow::anyhow!("GET {addr}{path}: no answer in 5 s"))??;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("GET {addr}{path}: not an HTTP response"))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow::anyhow!("GET {addr}{path}: no status code in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// A spawned task that is aborted when this is dropped (a scenario's watchers and
/// simulated helpers end with it, also on an early return).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One side of a row: a label and its samples, in `Row::unit`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub label: String,
    pub samples: Vec<f64>,
}

impl Series {
    pub fn new(label: impl Into<String>, samples: Vec<f64>) -> Self {
        Series { label: label.into(), samples }
    }
    fn sorted(&self) -> Vec<f64> {
        let mut s: Vec<f64> = self.samples.iter().copied().filter(|x| x.is_finite()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }
    /// The `q` quantile (0..=1), nearest rank; None without samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let s = self.sorted();
        if s.is_empty() {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * s.len() as f64).ceil() as usize;
        Some(s[rank.clamp(1, s.len()) - 1])
    }
    pub fn median(&self) -> Option<f64> {
        self.quantile(0.5)
    }
    /// The largest sample (for costs and latencies the worst one).
    pub fn worst(&self) -> Option<f64> {
        self.sorted().last().copied()
    }
}

/// How a row summarises its series.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Summary {
    /// median and worst (repetitions of a scenario)
    MedianWorst,
    /// p50 and p99 (many requests)
    P50P99,
    /// one figure per sample, printed as they are (a curve: N = 3, 10, 50)
    Each,
}

/// One line of the table: a measure of one scenario, ours next to the baseline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// The issue's numbering: 1 CSR latency ... 6 scale.
    pub scenario: u8,
    /// The scenario's key (`--only`): csr, rotation, leader-loss, footprint, api-cost, scale.
    pub key: String,
    pub measure: String,
    /// s, ms, MiB, req/min, CPU s/h ...
    pub unit: String,
    pub summary: Summary,
    pub ours: Series,
    /// What an admin would do instead, measured the same way (none, one or several).
    pub baselines: Vec<Series>,
    /// The goal as the issue states it, e.g. "p99 <= 200 ms".
    pub goal: Option<String>,
    /// Whether the goal was met, when it has one and ours has samples.
    pub goal_met: Option<bool>,
    /// How it was measured, or why it has no figure.
    pub note: String,
    /// When and at which commit this row was measured (a `--only` run updates some rows).
    #[serde(default)]
    pub measured: String,
}

impl Row {
    pub fn new(scenario: u8, key: &str, measure: &str, unit: &str, summary: Summary, ours: Series) -> Self {
        Row {
            scenario,
            key: key.into(),
            measure: measure.into(),
            unit: unit.into(),
            summary,
            ours,
            baselines: Vec::new(),
            goal: None,
            goal_met: None,
            note: String::new(),
            measured: String::new(),
        }
    }
    pub fn baseline(mut self, s: Series) -> Self {
        self.baselines.push(s);
        self
    }
    /// A goal and the test of it on ours' summary (median or p99: `check` gets the row).
    pub fn goal(mut self, goal: &str, check: impl Fn(&Row) -> Option<bool>) -> Self {
        self.goal = Some(goal.into());
        self.goal_met = check(&self);
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
    /// A row whose measurement failed: no samples, the error as its note.
    pub fn failed(scenario: u8, key: &str, measure: &str, err: impl std::fmt::Display) -> Self {
        Row::new(scenario, key, measure, "", Summary::MedianWorst, Series::default()).note(format!("NOT MEASURED: {err}"))
    }
    /// The figure cell for one series.
    pub fn cell(&self, s: &Series) -> String {
        let f = |x: Option<f64>| x.map(fmt_num).unwrap_or_else(|| "—".into());
        if s.samples.is_empty() {
            return format!("{}: no figure", s.label);
        }
        match self.summary {
            Summary::MedianWorst => format!("{}: {} / {} (n={})", s.label, f(s.median()), f(s.worst()), s.samples.len()),
            Summary::P50P99 => format!("{}: p50 {} / p99 {} (n={})", s.label, f(s.quantile(0.5)), f(s.quantile(0.99)), s.samples.len()),
            Summary::Each => format!("{}: {}", s.label, s.samples.iter().map(|v| fmt_num(*v)).collect::<Vec<_>>().join(" / ")),
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Where and when it was measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub date: String,
    pub host: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub cpu_model: String,
    pub kernel: String,
    pub kubernetes: String,
    pub commit: String,
}

impl Machine {
    /// Reads /proc and `uname`; `kubernetes` and `commit` are the caller's.
    pub fn here(kubernetes: &str, commit: &str) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model =
            cpuinfo.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())).unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
        let out = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd).args(args).output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
        };
        Machine {
            date: out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            host: out("hostname", &[]),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            cpu_model,
            kernel: out("uname", &["-r"]),
            kubernetes: kubernetes.into(),
            commit: commit.into(),
        }
    }
}

/// What `results.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Results {
    pub machine: Machine,
    pub rows: Vec<Row>,
}

impl Results {
    /// Replaces the rows of the scenarios in `fresh` (by key) and keeps the others: a run of
    /// some scenarios (`--only`) updates its rows of an earlier full run.
    pub fn merge(&mut self, machine: Machine, fresh: Vec<Row>) {
        let keys: Vec<&str> = fresh.iter().map(|r| r.key.as_str()).collect();
        self.rows.retain(|r| !keys.contains(&r.key.as_str()));
        let stamp = |m: &Machine| format!("{} at commit {}", m.date, m.commit);
        let old = stamp(&self.machine);
        for r in self.rows.iter_mut().filter(|r| r.measured.is_empty()) {
            r.measured = old.clone();
        }
        let new = stamp(&machine);
        self.rows.extend(fresh.into_iter().map(|r| Row { measured: new.clone(), ..r }));
        self.rows.sort_by_key(|r| r.scenario);
        self.machine = machine;
    }

    /// The table, with the machine, versions and date.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::from("# Benchmark results\n\n");
        s += "Written by `bash e2e/run.sh bench` (`e2e/src/bench/`); do not edit by hand.\n\n";
        s += &format!(
            "Last run {} on `{}`: {} CPUs ({}), {} GiB, Linux {}; Kubernetes {}; commit {}.\n\n",
            m.date, m.host, m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.kubernetes, m.commit
        );
        let mut when: Vec<(&str, Vec<u8>)> = Vec::new();
        for r in &self.rows {
            match when.iter_mut().find(|(w, _)| *w == r.measured) {
                Some((_, n)) if n.contains(&r.scenario) => {}
                Some((_, n)) => n.push(r.scenario),
                None => when.push((&r.measured, vec![r.scenario])),
            }
        }
        if when.len() > 1 {
            s += "Rows measured in separate runs (`--only`), on this machine and cluster:\n";
            for (w, n) in when {
                s += &format!("- {}: {}\n", n.iter().map(u8::to_string).collect::<Vec<_>>().join(", "), w);
            }
            s += "\n";
        }
        s += "Figures are median / worst of the repetitions (n), or p50 / p99 for request latencies.\n\n";
        s += "| # | measure | unit | ours | baseline | goal | met |\n|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            let base = if r.baselines.is_empty() { "—".into() } else { r.baselines.iter().map(|b| r.cell(b)).collect::<Vec<_>>().join("<br>") };
            let met = match r.goal_met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None if r.goal.is_some() => "not measured",
                None => "—",
            };
            s +=
                &format!("| {} | {} | {} | {} | {} | {} | {} |\n", r.scenario, r.measure, r.unit, r.cell(&r.ours), base, r.goal.as_deref().unwrap_or("—"), met);
        }
        // One footnote per distinct note, naming its rows, in the table's order.
        let mut notes: Vec<(&str, Vec<String>)> = Vec::new();
        for r in self.rows.iter().filter(|r| !r.note.is_empty()) {
            let name = format!("{} {}", r.scenario, r.measure);
            match notes.iter_mut().find(|(n, _)| *n == r.note) {
                Some((_, rows)) => rows.push(name),
                None => notes.push((&r.note, vec![name])),
            }
        }
        if !notes.is_empty() {
            s += "\n## How each row was measured\n\n";
            for (n, rows) in notes {
                s += &format!("- **{}**: {n}\n", rows.join("; "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let s = Series::new("x", (1..=100).map(f64::from).collect());
        assert_eq!(s.quantile(0.5), Some(50.0));
        assert_eq!(s.quantile(0.99), Some(99.0));
        assert_eq!(s.worst(), Some(100.0));
        let one = Series::new("x", vec![7.0]);
        assert_eq!((one.median(), one.quantile(0.99), one.worst()), (Some(7.0), Some(7.0), Some(7.0)));
        assert_eq!(Series::new("x", vec![3.0, 1.0, 2.0, 10.0, 4.0]).median(), Some(3.0));
        assert_eq!(Series::default().median(), None);
    }

    #[test]
    fn goals_and_cells() {
        let r = Row::new(1, "csr", "issuance", "ms", Summary::P50P99, Series::new("ours", vec![10.0, 20.0, 300.0]))
            .baseline(Series::new("kcm", vec![5.0]))
            .goal("p99 <= 200 ms", |r| r.ours.quantile(0.99).map(|v| v <= 200.0));
        assert_eq!(r.goal_met, Some(false));
        assert_eq!(r.cell(&r.ours), "ours: p50 20.0 / p99 300 (n=3)");
        let empty = Row::failed(2, "rotation", "leaderless", "cluster gone");
        assert_eq!(empty.cell(&empty.ours), ": no figure");
        assert!(empty.note.starts_with("NOT MEASURED"));
    }

    #[test]
    fn merge_replaces_only_the_rerun_scenarios() {
        let row = |n: u8, key: &str, v: f64| Row::new(n, key, "m", "s", Summary::MedianWorst, Series::new("ours", vec![v]));
        let mut res = Results { machine: Machine::default(), rows: vec![row(1, "csr", 1.0), row(3, "leader-loss", 3.0)] };
        res.merge(Machine { date: "d2".into(), commit: "c2".into(), ..Machine::default() }, vec![row(3, "leader-loss", 4.0), row(2, "rotation", 2.0)]);
        let got: Vec<(u8, f64)> = res.rows.iter().map(|r| (r.scenario, r.ours.samples[0])).collect();
        assert_eq!(got, vec![(1, 1.0), (2, 2.0), (3, 4.0)]);
        let md = res.markdown();
        assert!(md.contains("| 2 | m | s | ours: 2.00 / 2.00 (n=1) | — | — | — |"), "{md}");
        assert!(md.contains("- 1:  at commit \n- 2, 3: d2 at commit c2\n"), "each row's run: {md}");
        res.rows[0].note = "same".into();
        res.rows[2].note = "same".into();
        assert!(res.markdown().contains("- **1 m; 3 m**: same\n"), "one footnote for rows with the same note");
    }
}
