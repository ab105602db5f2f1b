//! kcm-operator: the CSR signer for kube-controller-manager certificates.
use anyhow::Context;
use clap::Parser;
use kcm_operator::approver::{self, SignerConfig};

#[derive(Parser, Debug)]
#[command(version, about = "Deploys and keeps alive a highly available kube-controller-manager")]
struct Args {
    /// Cluster CA certificate the signer issues under.
    #[arg(long, env = "KCM_CA_CERT", default_value = "/etc/kubernetes/cert/ca.pem")]
    ca_cert: String,
    /// Cluster CA key the signer signs with.
    #[arg(long, env = "KCM_CA_KEY", default_value = "/etc/kubernetes/cert/ca-key.pem")]
    ca_key: String,
    /// Namespace of the node-helper ServiceAccount whose CSRs are accepted.
    #[arg(long, env = "KCM_HELPER_NAMESPACE", default_value = kcm_operator::api::NAMESPACE)]
    helper_namespace: String,
    /// Log format: plain or json.
    #[arg(long, env = "KCM_LOG_FORMAT", default_value = "plain")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kcm_operator::logging::init(&args.log_format);
    let client = kube::Client::try_default().await.context("building Kubernetes client")?;
    let mut config = SignerConfig::new(&args.ca_cert, &args.ca_key);
    config.helper_namespace = args.helper_namespace;
    // Refuse to start when the CRD is missing, with a clear message.
    kube::Api::<kcm_operator::api::KubeControllerManager>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .context("listing KubeControllerManagers (is the CRD installed? kubectl apply -k manifests/)")?;
    tracing::info!(ca = %args.ca_cert, "signer running for {}", kcm_operator::api::SIGNER_NAME);
    tokio::select! {
        _ = approver::run(client, config) => anyhow::bail!("signer stream ended"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
