//! kcm-operator: the CSR signer for kube-controller-manager certificates, run by the elected
//! leader among the operator replicas.
//!
//! Identity: `--identity in-cluster` (a Deployment with its ServiceAccount) or `--identity host`
//! (the static pod: a client certificate minted from the host's cluster CA, see
//! `kcm_operator::identity`). A host certificate is renewed at half its lifetime by building a
//! new client and restarting the session (elector + signer) with it; the leader keeps its
//! Lease across the restart because its holder identity does not change.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kcm_operator::approver::{self, SignerConfig};
use kcm_operator::election::{self, ElectionConfig, Elector};
use kcm_operator::health::{self, Endpoints, Ready};
use kcm_operator::identity::{self, HostIdentity};
use kcm_operator::metrics::OperatorMetrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum IdentityMode {
    /// Client certificate minted from the host's cluster CA (static pod; no ServiceAccount).
    Host,
    /// The pod's ServiceAccount (or KUBECONFIG), via kube's default config.
    InCluster,
}

#[derive(Parser, Debug)]
#[command(version, about = "Deploys and keeps alive a highly available kube-controller-manager")]
struct Args {
    /// Cluster CA certificate the signer issues under (and, with --identity host, the
    /// operator's own client certificate).
    #[arg(long, env = "KCM_CA_CERT", default_value = "/etc/kubernetes/cert/ca.pem")]
    ca_cert: String,
    /// Cluster CA key the signer signs with.
    #[arg(long, env = "KCM_CA_KEY", default_value = "/etc/kubernetes/cert/ca-key.pem")]
    ca_key: String,
    /// Namespace of the node-helper ServiceAccount whose CSRs are accepted.
    #[arg(long, env = "KCM_HELPER_NAMESPACE", default_value = kcm_operator::api::NAMESPACE)]
    helper_namespace: String,
    /// Where the operator's API identity comes from.
    #[arg(long, env = "KCM_IDENTITY", value_enum, default_value = "in-cluster")]
    identity: IdentityMode,
    /// The apiservers to talk to with --identity host, tried in order (comma-separated or the
    /// flag repeated); each one's serving cert must name its host. The static pod: the CR's
    /// apiserverUrl.
    #[arg(long, env = "KCM_APISERVER", value_delimiter = ',', default_value = identity::DEFAULT_APISERVER)]
    apiserver: Vec<String>,
    /// Lifetime of the host-minted client certificate (renewed at half of it): 90s, 30m, 24h.
    #[arg(long, env = "KCM_CLIENT_CERT_VALIDITY", default_value = "24h", value_parser = parse_duration)]
    client_cert_validity: Duration,
    /// Elect a leader on Lease kcm-operator/kcm-operator; only the leader signs. `--elect=false`
    /// runs the signer unconditionally (one replica only!).
    #[arg(long, env = "KCM_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    elect: bool,
    /// holderIdentity on the Lease; default `<hostname>_<random>` (unique per process).
    #[arg(long, env = "KCM_LEASE_IDENTITY")]
    lease_identity: Option<String>,
    /// Serve /healthz, /readyz and /metrics here (the static pod: 0.0.0.0:10271); off when unset.
    #[arg(long, env = "KCM_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// Log format: plain or json.
    #[arg(long, env = "KCM_LOG_FORMAT", default_value = "plain")]
    log_format: String,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Print the operator's static pod manifest for a KubeControllerManager (the file to put
    /// in the kubelet's static pod directory of every master when no kcm runs yet); writes nothing.
    StaticPod {
        /// The KubeControllerManager as YAML (its paths.caCert and paths.caKey are mounted).
        #[arg(long)]
        cr: std::path::PathBuf,
        /// The image holding /kcm-operator (the same image as the node-helper DaemonSet's).
        #[arg(long)]
        image: String,
    },
    /// Renew now: ask for a new kcm certificate on every master (or one), issued through the
    /// CSR API one master at a time, the leader's last. Sets the renew-requested-at
    /// annotation to now on the KubeControllerManager (or the master's KcmNode), with the
    /// kubeconfig's credentials (KUBECONFIG).
    Renew {
        /// Only this master (its KcmNode).
        #[arg(long)]
        node: Option<String>,
    },
}

/// `kcm-operator renew`: the annotation set to now, on the CR or on one master's KcmNode.
async fn renew_now(node: Option<&str>) -> anyhow::Result<()> {
    use kcm_operator::api::{KcmNode, KubeControllerManager, CR_NAME, RENEW_REQUESTED_ANNOTATION};
    let client = kube::Client::try_default().await.context("building a Kubernetes client from the kubeconfig")?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {RENEW_REQUESTED_ANNOTATION: now}}}));
    let pp = kube::api::PatchParams::default();
    let what = match node {
        Some(n) => {
            kube::Api::<KcmNode>::all(client).patch(n, &pp, &patch).await.with_context(|| format!("annotating KcmNode {n}"))?;
            format!("KcmNode {n}")
        }
        None => {
            kube::Api::<KubeControllerManager>::all(client)
                .patch(CR_NAME, &pp, &patch)
                .await
                .with_context(|| format!("annotating KubeControllerManager {CR_NAME}"))?;
            format!("KubeControllerManager {CR_NAME} (every master)")
        }
    };
    println!("{what}: {RENEW_REQUESTED_ANNOTATION}={now}; `kubectl get kcmnodes` shows each master's new serial as it is renewed");
    Ok(())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    identity::parse_duration(s).map_err(|e| e.to_string())
}

/// SIGTERM (kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
}

/// How a session (one client) ended.
enum End {
    Renew,
    /// The apiserver stopped answering and there are others to try.
    Switch,
    Shutdown,
    Failed(anyhow::Error),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kcm_operator::logging::init(&args.log_format);
    if let Some(Cmd::StaticPod { cr, image }) = &args.cmd {
        let text = std::fs::read_to_string(cr).with_context(|| format!("reading {}", cr.display()))?;
        let kcm: kcm_operator::api::KubeControllerManager =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {} as a KubeControllerManager", cr.display()))?;
        print!("{}", kcm_operator::staticpod::operator_pod(&kcm.spec, image));
        return Ok(());
    }
    if let Some(Cmd::Renew { node }) = &args.cmd {
        return renew_now(node.as_deref()).await;
    }
    let mut signer = SignerConfig::new(&args.ca_cert, &args.ca_key);
    signer.helper_namespace = args.helper_namespace.clone();
    let election = args.elect.then(|| ElectionConfig::new(args.lease_identity.clone().unwrap_or_else(election::default_identity)));
    let host = HostIdentity {
        ca_cert: args.ca_cert.clone().into(),
        ca_key: args.ca_key.clone().into(),
        apiservers: args.apiserver.clone(),
        validity: args.client_cert_validity,
    };

    // Every API request of this process, by verb and resource: logged once a minute, and
    // exported on /metrics.
    let counts = Arc::new(kcm_operator::apicount::ApiCounts::new());
    kcm_operator::apicount::spawn_reporter(counts.clone(), Duration::from_secs(60), "kcm-operator");
    let metrics = OperatorMetrics::new();

    let ready = Ready::default();
    if let Some(addr) = args.health_addr {
        let (r, m, c) = (ready.clone(), metrics.clone(), counts.clone());
        let endpoints = Endpoints { ready: Arc::new(move || r.get()), metrics: Arc::new(move || m.render(Some(&c))) };
        // A taken port ends the process here, with the address in the message.
        tokio::spawn(health::serve(addr, "--health-addr", endpoints).await?);
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // The looks before a session has a client: logged once when they start failing.
    let mut connecting = kcm_operator::reach::Reach::default();
    loop {
        // A client for this session, when it must be replaced, and the apiserver it talks to.
        let (client, renew_in, apiserver) = match args.identity {
            IdentityMode::InCluster => {
                let config = kube::Config::infer().await.context("Kubernetes client configuration")?;
                let url = config.cluster_url.to_string();
                (kcm_operator::apicount::counted_client_with(config, counts.clone()).context("building Kubernetes client")?, None, url)
            }
            IdentityMode::Host => match host.client(&counts).await {
                Ok((client, cert, apiserver)) => {
                    let renew_in = identity::renew_in(cert.issued_at, cert.not_after, identity::now());
                    tracing::info!(user = identity::OPERATOR_USER, %apiserver, not_after = %kcm_operator::pki::rfc3339(cert.not_after),
                        "client certificate minted from {}; renewal in {}s", args.ca_cert, renew_in.as_secs());
                    (client, Some(renew_in), apiserver)
                }
                Err(e) => {
                    // Not ready, said once; tried again until an apiserver answers.
                    ready.set(false);
                    if let Some(kcm_operator::reach::Change::Lost(why)) = connecting.observe(&Err(kcm_operator::reach::chain(&e))) {
                        tracing::error!("no session: {why}; not ready, trying again every {}s", kcm_operator::reach::PROBE_PERIOD.as_secs());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(kcm_operator::reach::PROBE_PERIOD) => continue,
                        _ = &mut shutdown => return Ok(()),
                    }
                }
            },
        };
        if let Some(kcm_operator::reach::Change::Back { failures }) = connecting.observe(&Ok(())) {
            tracing::info!(%apiserver, "an apiserver answers after {failures} failed tries");
        }
        // Refuse to start when the CRD is missing, with a clear message.
        kube::Api::<kcm_operator::api::KubeControllerManager>::all(client.clone())
            .list(&kube::api::ListParams::default().limit(1))
            .await
            .context("listing KubeControllerManagers (is the CRD installed? kubectl apply -k manifests/)")?;
        ready.set(true);
        // Ready while the apiserver answers; with other apiservers to try, a lasting outage
        // ends the session so the next one starts from the first that answers.
        let switch = matches!(args.identity, IdentityMode::Host) && args.apiserver.len() > 1;
        let reachable = kcm_operator::reach::watch(client.clone(), apiserver.clone(), ready.clone(), switch);

        let elector = election.clone().map(|cfg| Elector::new(client.clone(), cfg));
        let renewal = async {
            match renew_in {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let end = tokio::select! {
            e = lead(elector.as_ref(), client.clone(), signer.clone(), &metrics) => End::Failed(e),
            _ = renewal => End::Renew,
            _ = reachable => End::Switch,
            _ = &mut shutdown => End::Shutdown,
        };
        match end {
            End::Renew => tracing::info!("client certificate at half its lifetime: restarting with a new one"),
            End::Switch => ready.set(false),
            End::Shutdown => {
                if let Some(e) = &elector {
                    match e.release().await {
                        Ok(true) => tracing::info!("released the lease"),
                        Ok(false) => {}
                        Err(err) => tracing::warn!("releasing the lease: {err}"),
                    }
                }
                return Ok(());
            }
            End::Failed(e) => return Err(e),
        }
    }
}

/// Waits for leadership (if electing), runs the signer while leading, and stops it the
/// moment the lease is lost; then waits to lead again. Returns only on a fatal error.
/// `kcm_operator_leader` follows.
async fn lead(elector: Option<&Elector>, client: kube::Client, signer: SignerConfig, metrics: &OperatorMetrics) -> anyhow::Error {
    loop {
        let lost = async {
            match elector {
                Some(e) => {
                    e.acquire().await;
                    tracing::info!("leading: signer running for {}", kcm_operator::api::SIGNER_NAME);
                    Some(e.keep())
                }
                None => {
                    tracing::info!("no election (--elect=false): signer running for {}", kcm_operator::api::SIGNER_NAME);
                    None
                }
            }
        }
        .await;
        metrics.set_leading(true);
        let lost = async {
            match lost {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        let end = tokio::select! {
            why = lost => {
                tracing::warn!("lost leadership ({why}): signer stopped");
                None
            }
            _ = approver::run(client.clone(), signer.clone(), metrics.clone()) => Some(anyhow::anyhow!("signer stream ended")),
            _ = kcm_operator::rollout::run(client.clone(), signer.ca_cert.clone(), signer.ca_key.clone(), metrics.clone()) => Some(anyhow::anyhow!("rollout stream ended")),
        };
        metrics.set_leading(false);
        if let Some(e) = end {
            return e;
        }
    }
}
