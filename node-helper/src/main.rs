//! node-helper: installs kube-controller-manager on the master it runs on.
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kcm_operator::api::KubeControllerManager;
use kcm_operator::approver::CR_NAME;
use kcm_operator::flags::KcmVersion;
use kcm_operator::render::{self, ClientCredentials};
use node_helper::host::HostFs;
use node_helper::install;
use node_helper::step::{Node, Report};
use node_helper::systemd::HostSystemd;
use kcm_operator::api::HELPER_MANAGER_PREFIX;

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
        #[arg(long, default_value = "v1.33.13")]
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
    /// Apply the revisions the operator gives this master, one step at a time, and report.
    Run {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, default_value_t = 120)]
        csr_wait: u64,
        /// Seconds between two looks at the spec and the unit.
        #[arg(long, default_value_t = 5)]
        interval: u64,
    },
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Where the host's / is mounted.
        #[arg(long, env = "KCM_HOST_ROOT", default_value = "/host")]
        host_root: PathBuf,
        /// Host path prefixes the helper may write under.
        #[arg(long, env = "KCM_ALLOWED_ROOTS", value_delimiter = ',', default_value = "/etc/kubernetes,/etc/systemd/system,/data/k8s,/var/lib/kube-controller-manager")]
        allowed_roots: Vec<PathBuf>,
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
        Cmd::Install { node, csr_wait } => {
            let client = kube::Client::try_default().await.context("building Kubernetes client")?;
            let host = HostFs::new(node.host_root, node.allowed_roots);
            install_once(&client, &host, &node.node_name, csr_wait).await?;
        }
        Cmd::Run { node, csr_wait, interval } => {
            let client = kube::Client::try_default().await.context("building Kubernetes client")?;
            let host = HostFs::new(node.host_root, node.allowed_roots);
            tracing::info!(node = %node.node_name, "node-helper running");
            loop {
                if let Err(e) = tick(&client, &host, &node.node_name, csr_wait).await {
                    tracing::error!("{e:#}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

async fn read_spec(client: &kube::Client) -> anyhow::Result<kcm_operator::api::KubeControllerManagerSpec> {
    let kcm = kube::Api::<KubeControllerManager>::all(client.clone()).get(CR_NAME).await.with_context(|| format!("reading KubeControllerManager {CR_NAME}"))?;
    Ok(kcm.spec)
}

async fn install_once(client: &kube::Client, host: &HostFs, node_name: &str, csr_wait: u64) -> anyhow::Result<()> {
    let spec = read_spec(client).await?;
    let done = install::install(client, host, &spec, node_name, Duration::from_secs(csr_wait)).await?;
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

/// One look: apply the operator's target revision for this node if it is new, otherwise
/// report the unit's state when it changed.
async fn tick(client: &kube::Client, host: &HostFs, node_name: &str, csr_wait: u64) -> anyhow::Result<()> {
    let api = kube::Api::<KubeControllerManager>::all(client.clone());
    let kcm = api.get(CR_NAME).await.with_context(|| format!("reading KubeControllerManager {CR_NAME}"))?;
    let me = kcm.status.as_ref().and_then(|s| s.nodes.iter().find(|n| n.name == node_name)).cloned().unwrap_or_default();
    let spec = &kcm.spec;
    let unit = std::path::Path::new(&spec.paths.unit).file_name().and_then(|n| n.to_str()).unwrap_or("kube-controller-manager.service").to_string();
    let systemd = HostSystemd::new(unit);
    let step = Node { client, host, systemd: &systemd, name: node_name, csr_wait: Duration::from_secs(csr_wait) };
    let keep = Report {
        applied_revision: me.applied_revision.clone(),
        failed_revision: me.failed_revision.clone(),
        cert_serial: me.cert_serial.clone(),
        not_after: me.not_after.clone(),
        kcm_version: me.kcm_version.clone(),
        unit_active: me.unit_active,
        healthy: me.healthy,
        warnings: me.warnings.clone(),
        message: me.message.clone(),
    };
    let report = match me.target_revision.as_deref() {
        Some(target) if !spec.paused && Some(target) != me.applied_revision.as_deref() && Some(target) != me.failed_revision.as_deref() => {
            tracing::info!(node = node_name, target, "applying revision");
            match step.apply(spec, target, me.cert_serial.as_deref()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(node = node_name, target, "step failed: {e}");
                    let (unit_active, healthy) = observe(client, host, &step, spec, node_name).await;
                    Report { failed_revision: Some(target.into()), message: Some(format!("revision {target} failed, node left as it was: {e}")), unit_active, healthy, ..keep }
                }
            }
        }
        _ => {
            let (unit_active, healthy) = observe(client, host, &step, spec, node_name).await;
            if unit_active == me.unit_active && healthy == me.healthy && kcm.status.as_ref().is_some_and(|s| s.nodes.iter().any(|n| n.name == node_name)) {
                return Ok(());
            }
            Report { unit_active, healthy, ..keep }
        }
    };
    let pp = kube::api::PatchParams::apply(&format!("{HELPER_MANAGER_PREFIX}-{node_name}")).force();
    api.patch_status(CR_NAME, &pp, &kube::api::Patch::Apply(report.apply_body(node_name))).await.context("reporting on the KubeControllerManager status")?;
    Ok(())
}

async fn observe(client: &kube::Client, host: &HostFs, step: &Node<'_>, spec: &kcm_operator::api::KubeControllerManagerSpec, node_name: &str) -> (bool, bool) {
    let ca = host.resolve("caCert", &spec.paths.ca_cert).ok().and_then(|p| host.read(&p).ok()).map(|b| String::from_utf8_lossy(&b).into_owned());
    let node = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get(node_name).await.ok();
    let ip = node.as_ref().and_then(|n| kcm_operator::pki::NodeIdentity::from_node(n).ok()).map(|id| id.primary_ip());
    match (ca, ip) {
        (Some(ca), Some(ip)) => step.observe(spec, &ca, ip).await,
        _ => (false, false),
    }
}
