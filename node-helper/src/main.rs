//! node-helper: installs kube-controller-manager on the master it runs on.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node as K8sNode;
use kcm_operator::api::CR_NAME;
use kcm_operator::api::{KcmNode, KubeControllerManager};
use kcm_operator::api::{HELPER_MANAGER_PREFIX, OPERATOR_MANIFEST, REPORT_PERIOD_SECS};
use kcm_operator::flags::KcmVersion;
use kcm_operator::health::{self, Endpoints};
use kcm_operator::metrics::{HelperMetrics, StepResult};
use kcm_operator::render::{self, ClientCredentials};
use kcm_operator::watch::{by_name, reflect};
use kube::runtime::reflector::{ObjectRef, Store};
use node_helper::host::HostFs;
use node_helper::install;
use node_helper::readiness::Readiness;
use node_helper::step::{report_body, Node, Report};
use node_helper::systemd::HostSystemd;

#[derive(Parser, Debug)]
#[command(version, about = "Installs kube-controller-manager on this master")]
struct Args {
    #[arg(long, env = "KCM_LOG_FORMAT", default_value = "plain", global = true)]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print every file the helper would write for a CR and a node; writes nothing.
    Render {
        /// The KubeControllerManager as YAML.
        #[arg(long)]
        cr: PathBuf,
        #[arg(long)]
        node_ip: IpAddr,
        #[arg(long, default_value = "v1.35.4")]
        kcm_version: String,
        /// CA certificate to embed; a placeholder is printed without it.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Issue a certificate through the CSR API and write key, cert, kubeconfig and unit, once.
    Install {
        #[command(flatten)]
        node: NodeArgs,
        /// Seconds to wait for the signer.
        #[arg(long, default_value_t = 120)]
        csr_wait: u64,
    },
    /// Day 0, run as root on a master before its kubelet runs: issue this master's first
    /// certificate with the cluster CA on the host, write key, cert, kubeconfig and unit,
    /// start kcm, and place the operator's static pod. Nothing is written until every
    /// check passed; a failed step is rolled back.
    Bootstrap {
        /// The KubeControllerManager as YAML (the one `kubectl apply` will get).
        #[arg(long)]
        cr: PathBuf,
        /// This master's Node name, as its kubelet will register it.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// This master's InternalIP address(es), as its kubelet will report them
        /// (comma-separated; the first is kcm's bind address).
        #[arg(long, value_delimiter = ',', required = true)]
        node_ip: Vec<IpAddr>,
        /// The operator's image, for its static pod manifest; without it none is placed.
        #[arg(long)]
        image: Option<String>,
        /// The kubelet's static pod directory (its `staticPodPath`).
        #[arg(long, default_value = "/etc/kubernetes/manifests")]
        static_pod_dir: String,
        /// Where the host's / is (run on the host: /).
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = ALLOWED_ROOTS)]
        allowed_roots: Vec<PathBuf>,
        #[arg(long, default_value = node_helper::journal::DEFAULT_PATH)]
        journal: String,
    },
    /// Apply the revisions the operator gives this master, one step at a time, and report.
    Run {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, default_value_t = 120)]
        csr_wait: u64,
        /// Seconds between two looks at the spec and the unit.
        #[arg(long, default_value_t = 5)]
        interval: u64,
        /// Serve /metrics, /healthz and /readyz here (the host's network: a port no other
        /// process of a master uses); `off` for none.
        #[arg(long, env = kcm_operator::api::HELPER_METRICS_ADDR_ENV, default_value = DEFAULT_METRICS_ADDR, value_parser = parse_listen)]
        metrics_addr: Listen,
    },
}

/// Every address of the master, port [`kcm_operator::api::HELPER_METRICS_PORT`] (a test
/// holds the two together; the DaemonSet's probes use that port).
const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9477";

/// An address to listen on, or none (`off`).
#[derive(Clone, Debug, PartialEq)]
struct Listen(Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    match s.trim() {
        "off" | "" => Ok(Listen(None)),
        a => a.parse().map(|a| Listen(Some(a))).map_err(|e| format!("{a:?}: {e} (an address like 0.0.0.0:9477, or off)")),
    }
}

/// Host path prefixes a helper may write under, unless told otherwise.
const ALLOWED_ROOTS: &str = "/etc/kubernetes,/etc/systemd/system,/data/k8s,/var/lib/kube-controller-manager";

#[derive(clap::Args, Debug)]
struct NodeArgs {
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where the host's / is mounted.
    #[arg(long, env = "KCM_HOST_ROOT", default_value = "/host")]
    host_root: PathBuf,
    /// Host path prefixes the helper may write under.
    #[arg(long, env = "KCM_ALLOWED_ROOTS", value_delimiter = ',', default_value = ALLOWED_ROOTS)]
    allowed_roots: Vec<PathBuf>,
    /// Host path of the step journal (under an allowed root).
    #[arg(long, env = "KCM_STEP_JOURNAL", default_value = node_helper::journal::DEFAULT_PATH)]
    journal: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kcm_operator::logging::init(&args.log_format);
    match args.cmd {
        Cmd::Render { cr, node_ip, kcm_version, ca_file } => {
            let text = std::fs::read_to_string(&cr).with_context(|| format!("reading {}", cr.display()))?;
            let kcm: KubeControllerManager = serde_yaml::from_str(&text).with_context(|| format!("parsing {} as a KubeControllerManager", cr.display()))?;
            let version: KcmVersion = kcm_version.parse()?;
            let ca = match ca_file {
                Some(p) => std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                None => "<cluster CA certificate>".into(),
            };
            let spec = &kcm.spec;
            let files = render::node_files(spec, node_ip, version, None)?;
            let creds = if render::embeds_client_cert(spec) {
                ClientCredentials::Embedded { cert_pem: "<issued at install>", key_pem: "<generated on the host at install>" }
            } else {
                ClientCredentials::Files { cert: &spec.paths.cert, key: &spec.paths.key }
            };
            for w in &files.flags.warnings {
                eprintln!("warning: {w}");
            }
            println!("# {} (0644)\n{}", spec.paths.unit, files.unit);
            println!("# {} (0600)\n{}", spec.paths.kubeconfig, render::kubeconfig(spec, &ca, creds));
            println!("# {} (0600): private key, generated on the host at install ({:?})", spec.paths.key, spec.certificate.key_algorithm);
            println!("# {} (0644): certificate, issued by the {} signer", spec.paths.cert, kcm_operator::api::SIGNER_NAME);
        }
        Cmd::Bootstrap { cr, node_name, node_ip, image, static_pod_dir, host_root, allowed_roots, journal } => {
            let text = std::fs::read_to_string(&cr).with_context(|| format!("reading {}", cr.display()))?;
            let kcm: KubeControllerManager = serde_yaml::from_str(&text).with_context(|| format!("parsing {} as a KubeControllerManager", cr.display()))?;
            let host = HostFs::new(host_root, allowed_roots);
            let b = node_helper::bootstrap::Bootstrap {
                host: &host,
                spec: &kcm.spec,
                node_name: &node_name,
                node_ips: &node_ip,
                journal: &journal,
                operator_pod: image.as_deref().map(|i| (static_pod_dir.as_str(), i)),
            };
            let done = node_helper::bootstrap::run(&b).await.with_context(|| format!("bootstrap of {node_name}"))?;
            println!(
                "{node_name}: {} (revision {}, kcm {}, certificate {} valid until {}); operator static pod: {}",
                done.message,
                done.revision,
                done.kcm_version,
                done.cert_serial,
                done.not_after,
                done.operator_pod.as_deref().unwrap_or("not placed (no --image)")
            );
        }
        Cmd::Install { node, csr_wait } => {
            let client = kube::Client::try_default().await.context("building Kubernetes client")?;
            let host = HostFs::new(node.host_root, node.allowed_roots);
            install_once(&client, &host, &node.node_name, csr_wait).await?;
        }
        Cmd::Run { node, csr_wait, interval, metrics_addr } => {
            let config = kube::Config::infer().await.context("Kubernetes client configuration")?;
            let (client, counts) = kcm_operator::apicount::counted_client(config).context("building Kubernetes client")?;
            kcm_operator::apicount::spawn_reporter(counts.clone(), Duration::from_secs(60), "node-helper");
            let host = HostFs::new(node.host_root.clone(), node.allowed_roots);
            // SIGTERM (pod deleted, DaemonSet updated) is taken between two looks, never
            // in the middle of a step: the step finishes or rolls back first.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing the SIGTERM handler")?;
            // The CR, this master's KcmNode and Node, kept by watches: no polling. A change
            // wakes the loop; the interval paces the local checks (unit, health, files).
            // Started before the host lock is taken: a helper standing by is ready too.
            let wake = Arc::new(tokio::sync::Notify::new());
            let (kcm, w1) = reflect(kube::Api::<KubeControllerManager>::all(client.clone()), by_name(CR_NAME), wake.clone());
            let (me, w2) = reflect(kube::Api::<KcmNode>::all(client.clone()), by_name(&node.node_name), wake.clone());
            let (this_node, w3) = reflect(kube::Api::<K8sNode>::all(client.clone()), by_name(&node.node_name), wake.clone());
            tokio::spawn(futures::future::join_all([w1, w2, w3]));
            let stores = Stores { kcm, me, node: this_node };
            let readiness = Arc::new(Readiness::default());
            // One waiter on the stores' first sync: kube's Store wakes only the last of several
            // concurrent `wait_until_ready` callers (a oneshot keeps one waker), so the run loop
            // below waits on this channel, never on the stores a second time.
            let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
            tokio::spawn({
                let (stores, readiness) = (stores.clone(), readiness.clone());
                async move {
                    if stores.ready().await.is_ok() {
                        readiness.synced();
                        let _ = synced_tx.send(true);
                    }
                }
            });
            let metrics = HelperMetrics::new(&node.node_name);
            if let Listen(Some(addr)) = metrics_addr {
                let (r, m) = (readiness.clone(), metrics.clone());
                let endpoints = Endpoints { ready: Arc::new(move || r.ready()), metrics: Arc::new(move || m.render(Some(&counts))) };
                // A taken port ends the process here, with the address in the message.
                tokio::spawn(health::serve(addr, "--metrics-addr", endpoints).await?);
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            }
            let _lock = loop {
                match node_helper::lock::try_lock(&node.host_root)? {
                    Some(l) => break l,
                    None => {
                        readiness.standing_by(true);
                        tracing::info!(node = %node.node_name, "another helper acts on this master (host lock {} held): waiting", node_helper::lock::LOCK_PATH)
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = term.recv() => return Ok(()),
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            };
            readiness.standing_by(false);
            tracing::info!(node = %node.node_name, "node-helper running (host lock taken)");
            // kcm's Lease is released for a follower when this host's kcm exits unplanned.
            let hostname = node_helper::host::hostname();
            tokio::spawn(node_helper::fence::run(client.clone(), node.host_root.clone(), node.node_name.clone(), hostname.clone()));
            tokio::select! {
                r = synced_rx.wait_for(|synced| *synced) => {
                    r.context("the watches of the CR, the KcmNode and the Node ended before their first sync")?;
                }
                _ = term.recv() => return Ok(()),
            }
            let mut helper = Helper {
                client,
                host,
                hostname,
                node_name: node.node_name,
                journal: node.journal,
                csr_wait: Duration::from_secs(csr_wait),
                image: None,
                last: None,
                failed_probes: 0,
                stores,
                metrics,
            };
            loop {
                readiness.tick_started(Instant::now());
                if let Err(e) = helper.tick().await {
                    tracing::error!("{e:#}");
                }
                readiness.tick_ended(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
                    _ = wake.notified() => {}
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            helper.stopping().await;
        }
    }
    Ok(())
}

async fn install_once(client: &kube::Client, host: &HostFs, node_name: &str, csr_wait: u64) -> anyhow::Result<()> {
    let kcm = kube::Api::<KubeControllerManager>::all(client.clone()).get(CR_NAME).await.with_context(|| format!("reading KubeControllerManager {CR_NAME}"))?;
    let me = kube::Api::<KcmNode>::all(client.clone()).get_opt(node_name).await.with_context(|| format!("reading KcmNode {node_name}"))?;
    // The signer issues certificates only for a step under way on this node.
    let revision = me
        .as_ref()
        .and_then(KcmNode::pending)
        .with_context(|| format!("KcmNode {node_name} has no step under way: the signer issues certificates only for the operator's target revision"))?;
    let done = install::install(client, host, &kcm.spec, node_name, &revision.to_string(), Duration::from_secs(csr_wait)).await?;
    for w in &done.warnings {
        tracing::warn!("{w}");
    }
    println!(
        "installed on {node_name}: kcm {} certificate serial {} notAfter {} changed {:?}",
        done.kcm_version,
        done.cert.serial_hex,
        kcm_operator::pki::rfc3339(done.cert.not_after),
        done.changed
    );
    Ok(())
}

/// What the helper watches: the CR, its master's KcmNode and Node.
#[derive(Clone)]
struct Stores {
    kcm: Store<KubeControllerManager>,
    me: Store<KcmNode>,
    node: Store<K8sNode>,
}

impl Stores {
    async fn ready(&self) -> anyhow::Result<()> {
        self.kcm.wait_until_ready().await?;
        self.me.wait_until_ready().await?;
        self.node.wait_until_ready().await?;
        Ok(())
    }
}

/// The run loop's state on this master.
struct Helper {
    stores: Stores,
    client: kube::Client,
    host: HostFs,
    /// This master's kernel hostname (kcm's Lease identity begins with it).
    hostname: Option<String>,
    node_name: String,
    /// Host path of the step journal.
    journal: String,
    csr_wait: Duration,
    /// This helper's own image (read once from its Pod): the operator's static pod runs it.
    image: Option<String>,
    /// The last report sent, and when (unix seconds).
    last: Option<(i64, Report)>,
    /// Failed health probes in a row.
    failed_probes: u32,
    /// What /metrics exports: the last look's report, the steps.
    metrics: HelperMetrics,
}

/// A kcm that was healthy is reported unhealthy after this many failed probes in a row.
/// Three probes 5 s apart: a kcm that crashed and that systemd restarts (RestartSec=5) is
/// healthy again before it would count as unhealthy (and earn a repair).
const UNHEALTHY_AFTER_PROBES: u32 = 3;

impl Helper {
    /// One look: place the operator's static pod, apply the operator's target revision for
    /// this node if it is new, otherwise observe the unit and the files; report when
    /// anything changed, and at least every report period.
    async fn tick(&mut self) -> anyhow::Result<()> {
        let kcm = self.stores.kcm.get(&ObjectRef::new(CR_NAME)).with_context(|| format!("no KubeControllerManager {CR_NAME}"))?;
        let node_name_owned = self.node_name.clone();
        let node_name = node_name_owned.as_str();
        let spec = &kcm.spec;
        // First the operator's static pod: it is the operator that makes the KcmNodes.
        let operator_pod_error = if kcm.handed_back() { self.remove_operator_pod().await.err() } else { self.place_operator_pod(spec).await.err() };
        if let Some(e) = &operator_pod_error {
            tracing::warn!(node = node_name, "operator static pod not placed: {e}");
        }
        let Some(kcm_node) = self.stores.me.get(&ObjectRef::new(node_name)) else {
            tracing::info!(node = node_name, "no KcmNode {node_name} yet: waiting for the operator to make it");
            return Ok(());
        };
        let me = kcm_node.status.clone().unwrap_or_default();
        let systemd = HostSystemd::for_unit_file(&spec.paths.unit);
        let (client, host) = (&self.client, &self.host);
        let journal = node_helper::journal::JournalFile::new(host, &self.journal)?;
        let step = Node {
            client,
            host,
            systemd: &systemd,
            name: node_name,
            issuer: install::Issuer::Signer { wait: self.csr_wait },
            journal: &journal,
            hostname: self.hostname.as_deref(),
        };
        // A step starts from what the API says now, not from the watch's view: a helper that
        // just took the host lock from another (a rescue helper) may not have seen that one's
        // report yet, and must not do its finished step again. One GET per step.
        let confirmed = match kcm_node.pending().filter(|_| !spec.paused) {
            Some(_) => Some(kube::Api::<KcmNode>::all(self.client.clone()).get(node_name).await.with_context(|| format!("reading KcmNode {node_name}"))?),
            None => None,
        };
        let pending = confirmed.as_ref().and_then(|n| n.pending());
        // A step an earlier helper was killed in, and that is not the one asked for now, is
        // rolled back before anything else. A journal that does not parse is reported and
        // left where it is: no step runs until an admin moves it aside.
        let (journal_note, journal_bad) = match step.recover(spec, pending).await {
            Ok(Some(why)) => {
                tracing::warn!(node = node_name, "interrupted step rolled back: {why}");
                (Some(format!("interrupted step rolled back: {why}")), false)
            }
            Ok(None) => (None, false),
            Err(node_helper::step::StepError::Host(e @ node_helper::host::HostError::Invalid { .. })) => {
                tracing::error!(node = node_name, "{e}: no step runs until it is moved aside");
                (Some(format!("step journal {e}: no step runs until it is moved aside (it may hold the key of an interrupted step)")), true)
            }
            Err(e) => return Err(e.into()),
        };
        let pending = pending.filter(|_| !journal_bad);
        // What is reported stays as it was unless this look changes it: as the API said at this
        // look's GET, or as this helper last sent it, and only then as the watch has it. The
        // watch may not have seen the report of the step this helper just applied: keeping
        // the watch's older status (its applied revision and file hashes) would send it back,
        // undoing that report, and the step would be applied a second time (kind_crash: kcm
        // restarted twice for one repair).
        let base = report_base(confirmed.as_ref(), self.last.as_ref().map(|(_, r)| r), &me);
        let keep = Report { observed_at: None, drift: Vec::new(), operator_pod_error: None, ..base };
        let this_node = self.stores.node.get(&ObjectRef::new(node_name));
        let mut report = match pending {
            Some(target) => {
                tracing::info!(node = node_name, %target, "applying revision");
                let result = if target.hand_back_at().is_some() { step.hand_back(spec, target).await } else { step.apply(spec, target).await };
                match result {
                    Ok(r) => {
                        self.metrics.step(StepResult::Applied);
                        r
                    }
                    Err(e) => {
                        self.metrics.step(StepResult::Failed);
                        tracing::error!(node = node_name, %target, "step failed: {e}");
                        let (unit_active, healthy) = observe(host, &step, spec, this_node.as_deref()).await;
                        Report {
                            failed_revision: Some(target.to_string()),
                            message: Some(format!("revision {target} failed, node left as it was: {e}")),
                            unit_active,
                            healthy,
                            ..keep
                        }
                    }
                }
            }
            _ if keep.handed_back() => {
                let (unit_active, healthy) = step.observe_handed_back(spec).await;
                Report { unit_active, healthy, ..keep }
            }
            _ => {
                let (unit_active, probed) = observe(host, &step, spec, this_node.as_deref()).await;
                // A failed probe of a kcm that was healthy is not yet "unhealthy" (that would
                // earn it a repair): UNHEALTHY_AFTER_PROBES in a row are.
                self.failed_probes = if probed { 0 } else { self.failed_probes + 1 };
                let healthy = probed || (me.healthy && self.failed_probes < UNHEALTHY_AFTER_PROBES);
                Report { unit_active, healthy, ..keep }
            }
        };
        report.hostname = self.hostname.clone();
        // A report from before notBefore was reported (a helper upgraded since its last step):
        // read from the installed certificate, so a renew-now request can be judged.
        if report.not_before.is_none() {
            let installed = read_host(host, &spec.paths.cert).and_then(|pem| kcm_operator::pki::CertInfo::from_pem(&pem, "installed certificate").ok());
            if let Some(c) = installed.filter(|c| report.cert_serial.as_deref().is_some_and(|s| s.eq_ignore_ascii_case(&c.serial_hex))) {
                report.not_before = Some(kcm_operator::pki::rfc3339(c.not_before));
            }
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        // Reading and hashing the files is blocking I/O: off the async runtime (the fence
        // follows kcm every 100 ms on it).
        let (paths, hashes, baseline, host_fs) = (spec.paths.clone(), report.file_hashes.clone(), report.applied_revision.is_some(), host.clone());
        // Handed back, our files are kubeadm's kcm's business no more: no drift to repair.
        let skip_drift = report.handed_back();
        let (hashes, drift) = tokio::task::spawn_blocking(move || {
            if skip_drift {
                return (hashes, Vec::new());
            }
            let read = |p: &str| read_host(&host_fs, p);
            // Files of ours with no recorded hashes (a helper from before hashes were kept):
            // what is there now is the baseline.
            let hashes = if hashes.is_empty() && baseline {
                node_helper::drift::hashes(&[&paths.key, &paths.cert, &paths.kubeconfig, &paths.unit], read)
            } else {
                hashes
            };
            let mut drift = node_helper::drift::check(&hashes, &paths.cert, read, now.as_second());
            // Only where our kcm runs: before adoption the manifest is kubeadm's to have.
            if baseline {
                drift.extend(node_helper::drift::static_pod_back(&paths.static_pod_manifest, read));
            }
            (hashes, drift)
        })
        .await
        .context("checking the files for drift")?;
        report.file_hashes = hashes;
        report.drift = drift;
        if let Some(note) = journal_note {
            report.message = Some(note);
        }
        report.operator_pod_error = operator_pod_error;
        self.metrics.report(&report);
        let due = self.last.as_ref().is_none_or(|(at, last)| *last != report || now.as_second() - at >= REPORT_PERIOD_SECS) || me.observed_at.is_none();
        if !due {
            // Sent already: an applied step's journal left by a failed removal goes now.
            if !journal_bad {
                step.reported(self.last.as_ref().and_then(|(_, r)| r.applied_revision.as_deref()))?;
            }
            return Ok(());
        }
        if !report.drift.is_empty() {
            tracing::warn!(node = node_name, drift = ?report.drift, "files differ from what the helper wrote");
        }
        let mut sent = report.clone();
        sent.observed_at = Some(now.to_string());
        let pp = kube::api::PatchParams::apply(&format!("{HELPER_MANAGER_PREFIX}-{node_name}")).force();
        kube::Api::<KcmNode>::all(self.client.clone())
            .patch_status(node_name, &pp, &kube::api::Patch::Apply(report_body(node_name, &sent)))
            .await
            .with_context(|| format!("reporting on KcmNode {node_name}"))?;
        // The report of an applied step is in the API: its journal can go.
        if !journal_bad {
            step.reported(sent.applied_revision.as_deref())?;
        }
        self.last = Some((now.as_second(), report));
        Ok(())
    }

    /// The last report of a stopping helper: the same, without `observedAt`, so the master
    /// counts as unknown at once instead of healthy until the report goes stale.
    async fn stopping(&self) {
        let Some((_, last)) = &self.last else { return };
        let pp = kube::api::PatchParams::apply(&format!("{HELPER_MANAGER_PREFIX}-{}", self.node_name)).force();
        match kube::Api::<KcmNode>::all(self.client.clone())
            .patch_status(&self.node_name, &pp, &kube::api::Patch::Apply(report_body(&self.node_name, last)))
            .await
        {
            Ok(_) => tracing::info!(node = %self.node_name, "stopping: report withdrawn"),
            Err(e) => tracing::warn!(node = %self.node_name, "stopping: withdrawing the report: {e}"),
        }
    }

    /// Every master is handed back (`spec.handBack`, condition HandedBack): the operator's
    /// static pod leaves this master. `Err`: why it could not be removed.
    async fn remove_operator_pod(&mut self) -> Result<(), String> {
        let dir = node_helper::kubelet::static_pod_dir(self.host.root())?;
        let target = format!("{}/{OPERATOR_MANIFEST}", dir.trim_end_matches('/'));
        let hp = self.host.resolve("operatorStaticPod", &target).map_err(|e| e.to_string())?;
        match std::fs::remove_file(&hp.local) {
            Ok(()) => {
                tracing::info!(node = %self.node_name, path = %target, "every master handed back: removed the operator's static pod");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {target}: {e}")),
        }
    }

    /// Writes the operator's static pod manifest into the kubelet's static pod directory,
    /// with this helper's own image, when it differs. `Err`: why it is not placed.
    async fn place_operator_pod(&mut self, spec: &kcm_operator::api::KubeControllerManagerSpec) -> Result<(), String> {
        let dir = node_helper::kubelet::static_pod_dir(self.host.root())?;
        for (name, path) in [("caCert", &spec.paths.ca_cert), ("caKey", &spec.paths.ca_key)] {
            let hp = self.host.resolve(name, path).map_err(|e| e.to_string())?;
            if !hp.local.is_file() {
                return Err(format!("paths.{name} {path} does not exist on this master"));
            }
        }
        if self.image.is_none() {
            self.image = Some(own_image(&self.client).await?);
        }
        let image = self.image.as_deref().expect("set above");
        let manifest = kcm_operator::staticpod::operator_pod(spec, image);
        let target = format!("{}/{OPERATOR_MANIFEST}", dir.trim_end_matches('/'));
        let hp = self.host.resolve("operatorStaticPod", &target).map_err(|e| e.to_string())?;
        if self.host.write_atomic_no_prev(&hp, manifest.as_bytes(), 0o600).map_err(|e| e.to_string())? {
            tracing::info!(node = %self.node_name, path = %target, image, "placed the operator's static pod");
        }
        Ok(())
    }
}

/// The status a look starts from: the API's at this look's GET, else what this helper last
/// sent (it is the only writer of its master's status while it holds the host lock), else
/// the watch's, which may lag behind both.
fn report_base(confirmed: Option<&KcmNode>, last: Option<&Report>, watched: &Report) -> Report {
    match (confirmed, last) {
        (Some(n), _) => n.status.clone().unwrap_or_default(),
        (None, Some(last)) => last.clone(),
        (None, None) => watched.clone(),
    }
}

/// A host file's bytes (`None` when missing or outside the allowed paths).
fn read_host(host: &HostFs, path: &str) -> Option<Vec<u8>> {
    host.resolve("file", path).ok().and_then(|hp| host.read_optional(&hp).ok().flatten())
}

/// The image of this helper's own container (Pod from `POD_NAMESPACE`/`POD_NAME`).
async fn own_image(client: &kube::Client) -> Result<String, String> {
    let (Ok(ns), Ok(name)) = (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) else {
        return Err("POD_NAMESPACE and POD_NAME are not set: cannot tell this helper's image".into());
    };
    let pod = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .map_err(|e| format!("reading this helper's pod {ns}/{name}: {e}"))?;
    pod.spec
        .and_then(|s| s.containers.into_iter().find(|c| c.name == "node-helper").and_then(|c| c.image))
        .ok_or_else(|| format!("pod {ns}/{name} has no container node-helper with an image"))
}

/// The unit's state and health; the node's address comes from the watched Node.
async fn observe(host: &HostFs, step: &Node<'_>, spec: &kcm_operator::api::KubeControllerManagerSpec, node: Option<&K8sNode>) -> (bool, bool) {
    let ca = host.resolve("caCert", &spec.paths.ca_cert).ok().and_then(|p| host.read(&p).ok()).map(|b| String::from_utf8_lossy(&b).into_owned());
    let ip = node.and_then(|n| kcm_operator::pki::NodeIdentity::from_node(n).ok()).map(|id| id.primary_ip());
    match (ca, ip) {
        (Some(ca), Some(ip)) => step.observe(spec, &ca, ip).await,
        _ => (false, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_look_starts_from_the_report_just_sent_not_the_watchs_older_one() {
        let watched = Report { applied_revision: Some("r/repair-1".into()), ..Default::default() };
        let sent = Report { applied_revision: Some("r/repair-2".into()), ..Default::default() };
        assert_eq!(report_base(None, Some(&sent), &watched).applied_revision.as_deref(), Some("r/repair-2"), "the watch lags behind what was sent");
        let mut api = KcmNode::new("m1", Default::default());
        api.status = Some(Report { applied_revision: Some("r/repair-3".into()), ..Default::default() });
        assert_eq!(report_base(Some(&api), Some(&sent), &watched).applied_revision.as_deref(), Some("r/repair-3"), "this look's GET is the freshest");
        assert_eq!(report_base(None, None, &watched).applied_revision.as_deref(), Some("r/repair-1"), "a helper that sent nothing yet");
    }

    #[test]
    fn metrics_addr_defaults_to_the_helper_port_and_can_be_off() {
        let default = parse_listen(DEFAULT_METRICS_ADDR).unwrap().0.unwrap();
        assert_eq!(default.port(), kcm_operator::api::HELPER_METRICS_PORT);
        assert!(default.ip().is_unspecified());
        assert_eq!(parse_listen("off"), Ok(Listen(None)));
        assert_eq!(parse_listen("127.0.0.1:9999"), Ok(Listen(Some("127.0.0.1:9999".parse().unwrap()))));
        let err = parse_listen("localhost").unwrap_err();
        assert!(err.contains("or off"), "{err}");
        let args = Args::try_parse_from(["node-helper", "run", "--node-name", "m1"]).unwrap();
        assert!(matches!(args.cmd, Cmd::Run { metrics_addr: Listen(Some(a)), .. } if a == default));
    }
}
