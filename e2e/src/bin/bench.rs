//! `bash e2e/run.sh bench`: runs the benchmark scenarios (all, or `--only csr,scale`) and
//! writes `e2e/bench/results.json` and `e2e/bench/RESULTS.md`; prints the table. The kind
//! scenarios use the cluster `bash e2e/run.sh up` made (KUBECONFIG); the API-tier ones start
//! their own etcd and kube-apiserver.

use std::path::PathBuf;
use std::time::Instant;

use e2e::bench::{self, Machine, Results, Row};

/// Runs one scenario and prints its rows as they come.
async fn timed(key: &'static str, t0: Instant) -> Vec<Row> {
    let t = Instant::now();
    eprintln!("[bench +{:.0}s] == {key}", t0.elapsed().as_secs_f64());
    let got = bench::run(key).await;
    for r in &got {
        let base: String = r.baselines.iter().map(|b| format!("  vs  {}", r.cell(b))).collect();
        let why = if r.note.starts_with("NOT") { format!("  ({})", r.note) } else { String::new() };
        eprintln!("[bench] {} {} [{}]: {}{base}{why}", r.scenario, r.measure, r.unit, r.cell(&r.ours));
    }
    eprintln!("[bench +{:.0}s] == {key}: {} rows in {:.0}s", t0.elapsed().as_secs_f64(), got.len(), t.elapsed().as_secs_f64());
    got
}

fn main() -> anyhow::Result<()> {
    let mut only: Option<Vec<String>> = None;
    let mut out = PathBuf::from("e2e/bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--only" => only = Some(args.next().unwrap_or_default().split(',').map(str::to_string).collect()),
            "--out" => out = PathBuf::from(args.next().unwrap_or_default()),
            // Writes RESULTS.md anew from results.json, measuring nothing.
            "--render" => {
                let json = out.join("results.json");
                let res: Results = serde_json::from_slice(&std::fs::read(&json)?)?;
                std::fs::write(out.join("RESULTS.md"), res.markdown())?;
                return Ok(());
            }
            _ => anyhow::bail!("usage: bench [--out DIR] [--only key,key | --render]; keys: {}", bench::KEYS.join(",")),
        }
    }
    let keys: Vec<&'static str> = bench::KEYS.iter().copied().filter(|k| only.as_ref().is_none_or(|o| o.iter().any(|x| x == k))).collect();
    if let Some(o) = &only {
        if let Some(bad) = o.iter().find(|x| !bench::KEYS.contains(&x.as_str())) {
            anyhow::bail!("unknown scenario {bad:?}; keys: {}", bench::KEYS.join(","));
        }
    }
    // The commit measured: read before the run, which can take half an hour.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let rt = tokio::runtime::Runtime::new()?;
    let t0 = Instant::now();
    // The idle window runs alongside the API-tier scenarios (the kind cluster is quiet while
    // they run on the host; it is up, and costs what it costs, during all of them anyway);
    // everything that disturbs the cluster waits for it.
    let idle = keys.contains(&"idle").then(|| rt.spawn(timed("idle", t0)));
    let mut rows: Vec<Row> = Vec::new();
    for key in keys.iter().filter(|k| **k != "idle") {
        if bench::DISTURBS_KIND.contains(key) {
            if let Some(h) = idle.as_ref().filter(|h| !h.is_finished()) {
                eprintln!("[bench +{:.0}s] waiting for the idle window before {key}", t0.elapsed().as_secs_f64());
                while !h.is_finished() {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
        rows.extend(rt.block_on(timed(key, t0)));
    }
    if let Some(h) = idle {
        rows.extend(rt.block_on(h)?);
    }
    std::fs::create_dir_all(&out)?;
    let json = out.join("results.json");
    let mut res: Results = std::fs::read(&json).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    res.merge(Machine::here(&rt.block_on(bench::kubernetes_version()), &commit), rows);
    std::fs::write(&json, serde_json::to_string_pretty(&res)?)?;
    let md = res.markdown();
    std::fs::write(out.join("RESULTS.md"), &md)?;
    println!("{md}");
    eprintln!("[bench] wrote {} and RESULTS.md in {:.0}s", json.display(), t0.elapsed().as_secs_f64());
    Ok(())
}
