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
    /// Keep this master's files current: install when missing, changed or due for renewal.
    Run {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, default_value_t = 120)]
        csr_wait: u64,
        /// Longest pause between two checks, in seconds.
        #[arg(long, default_value_t = 300)]
        max_interval: u64,
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
        Cmd::Run { node, csr_wait, max_interval } => {
            let client = kube::Client::try_default().await.context("building Kubernetes client")?;
            let host = HostFs::new(node.host_root, node.allowed_roots);
            loop {
                let pause = match cycle(&client, &host, &node.node_name, csr_wait).await {
                    Ok(recheck_at) => {
                        let now = k8s_openapi::jiff::Timestamp::now().as_second();
                        u64::try_from(recheck_at - now).unwrap_or(0).clamp(5, max_interval)
                    }
                    Err(e) => {
                        tracing::error!("{e:#}");
                        30
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
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

/// One check, and an install when due. Returns when to look again (unix seconds).
async fn cycle(client: &kube::Client, host: &HostFs, node_name: &str, csr_wait: u64) -> anyhow::Result<i64> {
    let spec = read_spec(client).await?;
    if spec.paused {
        tracing::info!("paused");
        return Ok(0);
    }
    match install::check(client, host, &spec, node_name).await? {
        install::Due::UpToDate { recheck_at } => Ok(recheck_at),
        why => {
            tracing::info!(?why, "installing");
            install_once(client, host, node_name, csr_wait).await?;
            Ok(0)
        }
    }
}
