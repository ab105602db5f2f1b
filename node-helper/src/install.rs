//! One master's install: check every path, read the CA and the kcm version on the host,
//! render the unit, get a certificate through the CSR API, then write key, cert,
//! kubeconfig and unit atomically. Nothing is written before every input is known good.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::ByteString;
use kcm_operator::api::{KubeControllerManagerSpec, CSR_NODE_LABEL, CSR_REVISION_ANNOTATION, SIGNER_NAME};
use kcm_operator::flags::{parse_help, FlagError, KcmVersion};
use kcm_operator::pki::{self, CertInfo, NodeIdentity, PkiError};
use kcm_operator::render::{self, ClientCredentials, NodeFiles, RenderError};
use kcm_operator::signer::expected_usages;
use kube::api::{Api, ObjectMeta, PostParams};

use kcm_operator::kube_error::{kube_err, KubeError};

use crate::host::{HostError, HostFs, HostPath};
use crate::journal::{Journal, JournalFile, PendingRequest};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Flags(#[from] FlagError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("running {binary} {arg}: {reason}")]
    Kcm { binary: String, arg: &'static str, reason: String },
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("CSR {name} was denied: {reason}: {message}")]
    Denied { name: String, reason: String, message: String },
    #[error("CSR {name} failed: {message}")]
    Failed { name: String, message: String },
    #[error("CSR {name}: no certificate within {secs}s (is the operator running?)")]
    Timeout { name: String, secs: u64 },
    #[error("adopting the kcm of {manifest} would drop flags it runs with: {}; add them to kcm.extraArgs (name without --: value), or list their names in kcm.removedArgs to drop them; nothing was changed", flags.join(" "))]
    AdoptionDrops { manifest: String, flags: Vec<String> },
    #[error("{manifest}: {reason}")]
    StaticPod { manifest: String, reason: String },
    #[error("pre-flight of the new certificate {serial} failed, nothing written: {reason}")]
    Preflight { serial: String, reason: String },
}
pub type Result<T, E = InstallError> = std::result::Result<T, E>;

/// Every host path of the spec, checked and mapped. Fails before anything is touched.
pub struct Paths {
    pub ca_cert: HostPath,
    pub cert: HostPath,
    pub key: HostPath,
    pub kubeconfig: HostPath,
    pub unit: HostPath,
    pub working_dir: HostPath,
}

impl Paths {
    /// The files a step writes, in the order it writes them.
    pub fn written(&self) -> [&HostPath; 4] {
        [&self.key, &self.cert, &self.kubeconfig, &self.unit]
    }

    pub fn resolve(host: &HostFs, spec: &KubeControllerManagerSpec) -> Result<Self> {
        // A control character in a path (or anything else the unit carries) is refused first.
        render::refuse_control_in_spec(spec).map_err(RenderError::from)?;
        // The paths the unit only names (kcm reads them) must be well-formed too.
        for (name, path) in spec.paths.all() {
            if !path.is_empty() {
                host.resolve(name, path)?;
            }
        }
        // The kcm binary, which systemd runs as root, too; it may lie outside the roots written under.
        HostFs::new(host.root(), vec!["/".into()]).resolve("binaryPath", &spec.kcm.binary_path)?;
        let p = &spec.paths;
        Ok(Self {
            ca_cert: host.resolve("caCert", &p.ca_cert)?,
            cert: host.resolve("cert", &p.cert)?,
            key: host.resolve("key", &p.key)?,
            kubeconfig: host.resolve("kubeconfig", &p.kubeconfig)?,
            unit: host.resolve("unit", &p.unit)?,
            working_dir: host.resolve_dir("workingDir", &spec.kcm.working_dir)?,
        })
    }
}

/// What the kcm binary on the host says of itself.
#[derive(Clone, Debug)]
pub struct KcmBinary {
    pub version: KcmVersion,
    pub accepted: BTreeSet<String>,
}

impl KcmBinary {
    /// Runs `<binary> --version` and `--help` (the binary reached under the host root).
    pub async fn probe(host: &HostFs, binary_path: &str) -> Result<Self> {
        let local = host.root().join(binary_path.trim_start_matches('/'));
        let run = |arg: &'static str| {
            let local = local.clone();
            async move {
                let fail = |reason: String| InstallError::Kcm { binary: binary_path.to_string(), arg, reason };
                let out = tokio::time::timeout(Duration::from_secs(30), tokio::process::Command::new(&local).arg(arg).kill_on_drop(true).output())
                    .await
                    .map_err(|_| fail("no answer within 30s".into()))?
                    .map_err(|e| fail(e.to_string()))?;
                if !out.status.success() {
                    return Err(fail(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
                }
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
        };
        let version = version_output(&run("--version").await?).map_err(|reason| InstallError::Kcm { binary: binary_path.into(), arg: "--version", reason })?;
        let accepted = parse_help(&run("--help").await?);
        if accepted.is_empty() {
            return Err(InstallError::Kcm { binary: binary_path.into(), arg: "--help", reason: "lists no flags".into() });
        }
        Ok(Self { version, accepted })
    }
}

/// The version in what kube-controller-manager's `--version` prints (`Kubernetes v1.35.4`);
/// anything else is not kcm (coreutils' `true --version` says `true (GNU coreutils) 9.1`).
pub fn version_output(out: &str) -> std::result::Result<KcmVersion, String> {
    let out = out.trim();
    match out.strip_prefix("Kubernetes v") {
        Some(_) => out.parse::<KcmVersion>().map_err(|e| e.to_string()),
        None => Err(format!("prints {:?}, not `Kubernetes v<version>`: not kube-controller-manager", out.lines().next().unwrap_or(""))),
    }
}

/// Everything one install writes, rendered and checked, not yet written.
pub struct Planned {
    pub files: NodeFiles,
    pub kubeconfig: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Renders the node's files around a certificate (pure).
pub fn plan(spec: &KubeControllerManagerSpec, id: &NodeIdentity, kcm: &KcmBinary, ca_pem: &str, cert_pem: String, key_pem: String) -> Result<Planned> {
    let files = render::node_files(spec, id.primary_ip(), kcm.version, Some(&kcm.accepted))?;
    let creds = if render::embeds_client_cert(spec) {
        ClientCredentials::Embedded { cert_pem: &cert_pem, key_pem: &key_pem }
    } else {
        ClientCredentials::Files { cert: &spec.paths.cert, key: &spec.paths.key }
    };
    let kubeconfig = render::kubeconfig(spec, ca_pem, creds);
    Ok(Planned { files, kubeconfig, cert_pem, key_pem })
}

/// A new CSR name for this node: `kcm-<node>-<8 hex>`.
pub fn csr_name(node: &str) -> String {
    let mut b = [0u8; 4];
    aws_lc_rs::rand::fill(&mut b).expect("CSPRNG");
    let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("kcm-{node}-{suffix}")
}

/// Submits CSR `name` for this node and waits for the operator to sign it. The CSR names the
/// node (label) and the step it is for (annotation): the signer issues one certificate per
/// node and step, and only while that step is under way. A CSR of that name that exists
/// already (made by an earlier attempt of the step, for the same key) is waited for.
pub async fn request_certificate(
    client: &kube::Client,
    spec: &KubeControllerManagerSpec,
    id: &NodeIdentity,
    revision: &str,
    name: &str,
    csr_pem: &str,
    wait: Duration,
) -> Result<String> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let name = name.to_string();
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(CSR_NODE_LABEL.to_string(), id.name.clone())].into()),
            annotations: Some([(CSR_REVISION_ANNOTATION.to_string(), revision.to_string())].into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.as_bytes().to_vec()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(expected_usages(spec.certificate.key_algorithm).iter().map(|s| s.to_string()).collect()),
            expiration_seconds: Some(i32::try_from(spec.certificate.validity_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        },
        status: None,
    };
    match api.create(&PostParams::default(), &csr).await {
        Ok(_) => tracing::info!(csr = %name, "submitted CSR, waiting for the signer"),
        Err(kube::Error::Api(e)) if e.code == 409 => tracing::info!(csr = %name, "CSR of an earlier attempt of this step exists: waiting for it"),
        Err(e) => return Err(kube_err(format!("creating CSR {name}"))(e).into()),
    }
    // A watch on this one CSR until the signer decided (no polling).
    let decided = |c: Option<&CertificateSigningRequest>| {
        let Some(st) = c.and_then(|c| c.status.as_ref()) else { return false };
        st.certificate.as_ref().is_some_and(|b| !b.0.is_empty())
            || st.conditions.iter().flatten().any(|c| c.status == "True" && (c.type_ == "Denied" || c.type_ == "Failed"))
    };
    let got = match tokio::time::timeout(wait, kube::runtime::wait::await_condition(api.clone(), &name, decided)).await {
        Err(_) => return Err(InstallError::Timeout { name, secs: wait.as_secs() }),
        Ok(Err(e)) => return Err(InstallError::Failed { name, message: format!("watching it: {e}") }),
        Ok(Ok(got)) => got,
    };
    {
        let status = got.and_then(|g| g.status).unwrap_or_default();
        for c in status.conditions.unwrap_or_default() {
            if c.status == "True" && (c.type_ == "Denied" || c.type_ == "Failed") {
                let reason = c.reason.unwrap_or_default();
                let message = c.message.unwrap_or_default();
                return Err(if c.type_ == "Denied" {
                    InstallError::Denied { name, reason, message }
                } else {
                    InstallError::Failed { name, message: format!("{reason}: {message}") }
                });
            }
        }
        match status.certificate.filter(|c| !c.0.is_empty()) {
            Some(cert) => String::from_utf8(cert.0).map_err(|_| InstallError::Failed { name, message: "certificate is not UTF-8 PEM".into() }),
            None => Err(InstallError::Failed { name, message: "the CSR was deleted before it was decided".into() }),
        }
    }
}

/// What was installed, for the node's status.
#[derive(Clone, Debug)]
pub struct Installed {
    pub cert: CertInfo,
    pub kcm_version: KcmVersion,
    pub warnings: Vec<String>,
    /// Host paths whose content changed (their previous version is kept as `.prev`).
    pub changed: Vec<String>,
    /// Whether a new certificate was issued.
    pub new_cert: bool,
}

/// Every input of an install, read and checked; nothing written yet.
pub struct Prepared {
    pub paths: Paths,
    pub ca_pem: String,
    pub kcm: KcmBinary,
    pub id: NodeIdentity,
    pub files: NodeFiles,
}

/// Reads and checks every input for node `node_name`, its addresses from its Node. Fails
/// before anything is written: a bad path, a missing CA, a missing kcm binary, a flag kcm
/// rejects.
pub async fn prepare(client: &kube::Client, host: &HostFs, spec: &KubeControllerManagerSpec, node_name: &str) -> Result<Prepared> {
    let node = Api::<Node>::all(client.clone()).get(node_name).await.map_err(kube_err(format!("reading node {node_name}")))?;
    prepare_for(host, spec, NodeIdentity::from_node(&node)?).await
}

/// [`prepare`] for a master whose name and addresses are known (day 0: no Node yet).
pub async fn prepare_for(host: &HostFs, spec: &KubeControllerManagerSpec, id: NodeIdentity) -> Result<Prepared> {
    let paths = Paths::resolve(host, spec)?;
    let ca_pem = String::from_utf8_lossy(&host.read(&paths.ca_cert)?).into_owned();
    CertInfo::from_pem(ca_pem.as_bytes(), "CA certificate")?;
    let kcm = KcmBinary::probe(host, &spec.kcm.binary_path).await?;
    let files = render::node_files(spec, id.primary_ip(), kcm.version, Some(&kcm.accepted))?;
    // kubeadm's kcm, about to be adopted: nothing it runs with is dropped unasked.
    if !spec.paths.static_pod_manifest.is_empty() {
        let manifest = host.resolve("staticPodManifest", &spec.paths.static_pod_manifest)?;
        if let Some(body) = host.read_optional(&manifest)? {
            let name = spec.paths.static_pod_manifest.clone();
            let theirs =
                render::static_pod_flags(&String::from_utf8_lossy(&body)).map_err(|reason| InstallError::StaticPod { manifest: name.clone(), reason })?;
            let drops = render::adoption_drops(&theirs, &render::seed_flags(spec, id.primary_ip()), &files.flags.flags, &spec.kcm.removed_args);
            if !drops.is_empty() {
                return Err(InstallError::AdoptionDrops { manifest: name, flags: drops });
            }
        }
    }
    Ok(Prepared { paths, ca_pem, kcm, id, files })
}

/// Where a step's new certificate comes from.
#[derive(Clone, Copy, Debug)]
pub enum Issuer<'a> {
    /// The operator's signer, through a CSR; waits at most `wait` for it.
    Signer { wait: Duration },
    /// Day 0 (`node-helper bootstrap`): no kcm and no operator run yet, so nothing signs a
    /// CSR. The master's addresses are given, and its first pair was issued with the
    /// cluster CA on this host by the signer's own rules ([`signer::issue_locally`]) and
    /// pre-flighted ([`preflight`]) before the step began.
    Local { id: &'a NodeIdentity, cert_pem: &'a str, key_pem: &'a str },
}

/// The certificate and key on the host, when they are usable for this node and spec.
pub fn usable_pair(host: &HostFs, spec: &KubeControllerManagerSpec, p: &Prepared) -> Result<Option<(String, String, CertInfo)>> {
    let (Some(cert_pem), Some(key_pem)) = (host.read_optional(&p.paths.cert)?, host.read_optional(&p.paths.key)?) else { return Ok(None) };
    let (Ok(cert_pem), Ok(key_pem)) = (String::from_utf8(cert_pem), String::from_utf8(key_pem)) else { return Ok(None) };
    let Ok(cert) = CertInfo::from_pem(cert_pem.as_bytes(), "installed certificate") else { return Ok(None) };
    let Ok(key) = pki::key_from_pem(&key_pem, "installed key") else { return Ok(None) };
    let alg_ok = match spec.certificate.key_algorithm {
        kcm_operator::api::KeyAlgorithm::Rsa2048 => key.algorithm() == &rcgen::PKCS_RSA_SHA256,
        kcm_operator::api::KeyAlgorithm::EcdsaP256 => key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    // An expired certificate (or one about to expire) is never reused: a repair renews it.
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    // Nor one that lives longer than the spec now asks for (the validity was shortened).
    let live = cert.not_after > now + 60 && cert.not_after <= now + spec.certificate.validity_secs() + 300;
    // Nor one the CA file no longer trusts (a CA rotated: its old CA dropped from the bundle).
    let trusted = pki::issued_by(cert_pem.as_bytes(), p.ca_pem.as_bytes()).unwrap_or(false);
    Ok((live && trusted && cert.matches_key(&key) && alg_ok && cert.sans == p.id.expected_sans()).then_some((cert_pem, key_pem, cert)))
}

/// Before a new certificate is installed: it chains to the CA the kubeconfig names, and the
/// apiserver, reached the way kcm will reach it (the spec's URL, that CA, the new pair),
/// sees user and group `system:kube-controller-manager` (SelfSubjectReview).
pub async fn preflight(spec: &KubeControllerManagerSpec, ca_pem: &str, cert_pem: &str, key_pem: &str) -> std::result::Result<(), String> {
    match pki::issued_by(cert_pem.as_bytes(), ca_pem.as_bytes()) {
        Ok(true) => {}
        Ok(false) => return Err(format!("it does not chain to the CA {}", spec.paths.ca_cert)),
        Err(e) => return Err(e.to_string()),
    }
    let client = kcm_client(spec, ca_pem, cert_pem, key_pem).await?;
    let review = k8s_openapi::api::authentication::v1::SelfSubjectReview::default();
    let got = tokio::time::timeout(
        Duration::from_secs(15),
        Api::<k8s_openapi::api::authentication::v1::SelfSubjectReview>::all(client).create(&PostParams::default(), &review),
    )
    .await
    .map_err(|_| format!("no answer from {} within 15s", spec.apiserver_url))?
    .map_err(|e| format!("SelfSubjectReview at {}: {e}", spec.apiserver_url))?;
    let user = got.status.and_then(|s| s.user_info).unwrap_or_default();
    let name = user.username.unwrap_or_default();
    let groups = user.groups.unwrap_or_default();
    if name != kcm_operator::api::KCM_USER || !groups.iter().any(|g| g == kcm_operator::api::KCM_USER) {
        return Err(format!("the apiserver sees user {name:?} in groups {groups:?}, not {0} in group {0}", kcm_operator::api::KCM_USER));
    }
    Ok(())
}

/// A client that reaches the apiserver as kcm will: the spec's URL, the CA, the pair.
pub async fn kcm_client(spec: &KubeControllerManagerSpec, ca_pem: &str, cert_pem: &str, key_pem: &str) -> std::result::Result<kube::Client, String> {
    let text = render::kubeconfig(spec, ca_pem, ClientCredentials::Embedded { cert_pem, key_pem });
    let kc: kube::config::Kubeconfig = serde_yaml::from_str(&text).map_err(|e| format!("the rendered kubeconfig does not parse: {e}"))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.map_err(|e| format!("the rendered kubeconfig is not usable: {e}"))?;
    kube::Client::try_from(cfg).map_err(|e| format!("client for {}: {e}", spec.apiserver_url))
}

/// When [`write`] requests a new certificate instead of keeping the one on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewCert<'a> {
    /// Only when the host has no usable certificate for this node and spec.
    IfNeeded,
    /// Also when the host's certificate has this serial (hex): a renewal. One the step
    /// already installed (a helper killed before it reported) is kept, so a repeated step
    /// does not ask for a second certificate.
    Replacing(&'a str),
    /// Always.
    Always,
}

impl NewCert<'_> {
    fn keeps(self, serial_hex: &str) -> bool {
        match self {
            NewCert::IfNeeded => true,
            NewCert::Replacing(old) => !old.eq_ignore_ascii_case(serial_hex),
            NewCert::Always => false,
        }
    }
}

/// Writes key, cert, kubeconfig and unit for step `revision`. When `new_cert` says so, a new
/// key is generated and a certificate requested first. With a journal, the key and the CSR
/// name are journaled before the CSR is made, and a request an earlier attempt of the step
/// journaled is reused: a resumed step never asks for a second certificate.
#[allow(clippy::too_many_arguments)]
pub async fn write(
    client: &kube::Client,
    host: &HostFs,
    spec: &KubeControllerManagerSpec,
    p: &Prepared,
    issuer: Issuer<'_>,
    new_cert: NewCert<'_>,
    revision: &str,
    mut journal: Option<(&JournalFile<'_>, &mut Journal)>,
) -> Result<Installed> {
    let existing = usable_pair(host, spec, p)?.filter(|(_, _, cert)| new_cert.keeps(&cert.serial_hex));
    let new_cert = existing.is_none();
    let (cert_pem, key_pem, cert) = match (existing, issuer) {
        (Some(pair), _) => pair,
        (None, Issuer::Local { cert_pem, key_pem, .. }) => {
            let key = pki::key_from_pem(key_pem, "locally issued key")?;
            let cert = CertInfo::from_pem(cert_pem.as_bytes(), "locally issued certificate")?;
            // Pre-flighted by `bootstrap` before the step began (a CA the apiserver does not
            // trust fails there, with nothing journaled).
            if !cert.matches_key(&key) {
                return Err(InstallError::Failed { name: p.id.name.clone(), message: "the locally issued certificate is not for its key".into() });
            }
            (cert_pem.to_string(), key_pem.to_string(), cert)
        }
        (None, Issuer::Signer { wait: csr_wait }) => {
            let journaled = journal.as_ref().and_then(|(_, j)| j.request.clone());
            let (key, name) = match journaled {
                Some(r) => (pki::key_from_pem(&r.key_pem, "journaled key")?, r.csr),
                None => {
                    let key = pki::generate_key(spec.certificate.key_algorithm)?;
                    let name = csr_name(&p.id.name);
                    if let Some((file, j)) = journal.as_mut() {
                        j.request = Some(PendingRequest { csr: name.clone(), key_pem: key.serialize_pem() });
                        file.save(j)?;
                    }
                    (key, name)
                }
            };
            let csr = pki::make_csr(&key, &p.id.expected_sans())?;
            let cert_pem = request_certificate(client, spec, &p.id, revision, &name, &csr, csr_wait).await?;
            let cert = CertInfo::from_pem(cert_pem.as_bytes(), "issued certificate")?;
            if !cert.matches_key(&key) {
                return Err(InstallError::Failed { name: p.id.name.clone(), message: "issued certificate is not for our key".into() });
            }
            let key_pem = key.serialize_pem();
            preflight(spec, &p.ca_pem, &cert_pem, &key_pem).await.map_err(|reason| InstallError::Preflight { serial: cert.serial_hex.clone(), reason })?;
            (cert_pem, key_pem, cert)
        }
    };
    let planned = plan(spec, &p.id, &p.kcm, &p.ca_pem, cert_pem, key_pem)?;
    host.ensure_dir(&p.paths.working_dir)?;
    let mut changed = Vec::new();
    for (hp, body, mode) in [
        (&p.paths.key, planned.key_pem.as_bytes(), 0o600),
        (&p.paths.cert, planned.cert_pem.as_bytes(), 0o644),
        (&p.paths.kubeconfig, planned.kubeconfig.as_bytes(), 0o600),
        (&p.paths.unit, planned.files.unit.as_bytes(), 0o644),
    ] {
        if host.write_atomic(hp, body, mode)? {
            changed.push(hp.host.display().to_string());
        }
        if hp == &p.paths.key {
            crate::journal::crash_point(host, "key-written");
        }
    }
    Ok(Installed { cert, kcm_version: p.kcm.version, warnings: planned.files.flags.warnings, changed, new_cert })
}

/// The whole install of step `revision` for node `node_name` with a new key and certificate.
pub async fn install(
    client: &kube::Client,
    host: &HostFs,
    spec: &KubeControllerManagerSpec,
    node_name: &str,
    revision: &str,
    csr_wait: Duration,
) -> Result<Installed> {
    let prepared = prepare(client, host, spec, node_name).await?;
    write(client, host, spec, &prepared, Issuer::Signer { wait: csr_wait }, NewCert::Always, revision, None).await
}

#[cfg(test)]
mod tests {
    use super::NewCert;

    #[test]
    fn only_kcm_says_kubernetes_and_its_version() {
        assert_eq!(super::version_output("Kubernetes v1.35.4\n").unwrap().to_string(), "v1.35.4");
        let e = super::version_output("true (GNU coreutils) 9.1\nCopyright (C) 2022").unwrap_err();
        assert!(e.contains("true (GNU coreutils) 9.1") && e.contains("not kube-controller-manager"), "{e}");
        assert!(super::version_output("").is_err());
        assert!(super::version_output("Kubernetes vX").is_err());
    }

    #[test]
    fn a_renewal_replaces_only_the_certificate_it_names() {
        assert!(NewCert::IfNeeded.keeps("0a1b"));
        assert!(!NewCert::Replacing("0A1B").keeps("0a1b"), "the named certificate is replaced");
        assert!(NewCert::Replacing("0A1B").keeps("ffff"), "one already renewed (a repeated step) is kept");
        assert!(!NewCert::Always.keeps("ffff"));
    }
}
