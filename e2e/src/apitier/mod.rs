//! API tier: a real etcd + kube-apiserver started as child processes with a
//! throwaway CA, for tests that only need the Kubernetes API (CSRs, Leases,
//! CRDs, RBAC, ServiceAccount tokens). Starts in a few seconds; everything is
//! torn down when the [`ApiServer`] is dropped (also on panic), and the
//! children die with the test binary even if it is SIGKILLed.
//!
//! Binaries (built by `e2e/testbed/build-k8s.sh`):
//! - kube-apiserver: `$KCM_APISERVER_BIN`, else `$KCM_K8S_BIN_DIR/kube-apiserver`,
//!   else `${KCM_CACHE:-/var/cache/kcm-operator}/k8s-<K8S_VERSION>/bin/kube-apiserver`
//! - etcd: `$KCM_ETCD_BIN`, else `$KCM_CACHE/etcd-<ETCD_VERSION>/bin/etcd`, else the
//!   newest `$KCM_CACHE/etcd-*/bin/etcd`
//!
//! Set `KCM_APITIER_KEEP=1` to keep the temp dir (certs, logs, etcd data)
//! after the test; its path is printed.

mod pki;
mod procs;
pub mod sim;
mod util;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use procs::Proc;
pub use util::{apply_yaml, poll, wait_for};

/// A pinned version of the test bed (`e2e/testbed/versions.env`: `K8S_VERSION`,
/// `ETCD_VERSION`, `KIND_VERSION`). The file is the one place they are set.
pub fn pinned(key: &str) -> &'static str {
    include_str!("../../testbed/versions.env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("e2e/testbed/versions.env sets no {key}"))
}

/// Kubernetes version of the default binary directory (the kind cluster's).
pub fn k8s_version() -> &'static str {
    pinned("K8S_VERSION")
}

/// Preferred etcd version (kubeadm's pin for [`k8s_version`]).
pub fn etcd_version() -> &'static str {
    pinned("ETCD_VERSION")
}
/// `--service-account-issuer` and `--api-audiences` of the test apiserver.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc";
/// `--service-cluster-ip-range` of the test apiserver.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Subject of the admin client certificate.
pub const ADMIN_USER: &str = "kcm-test-admin";
pub const ADMIN_GROUP: &str = "system:masters";

const BUILD_HINT: &str = "build it with e2e/testbed/build-k8s.sh";

// ------------------------------------------------------------------ binaries

/// `${KCM_CACHE:-/var/cache/kcm-operator}`
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KCM_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/kcm-operator"))
}

/// The kube-controller-manager versions of the version matrix, oldest first
/// (`e2e/testbed/kcm-versions`, which `e2e/run.sh test` builds from).
pub fn kcm_matrix() -> Vec<&'static str> {
    include_str!("../../testbed/kcm-versions").lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
}

/// Where build-k8s.sh puts the binaries of Kubernetes `version`: `$KCM_CACHE/k8s-<version>/bin`.
fn cached_bin_dir(version: &str) -> PathBuf {
    cache_dir().join(format!("k8s-{version}")).join("bin")
}

/// A binary of one matrix `version`: `$KCM_CACHE/k8s-<version>/bin/<name>`.
pub fn k8s_bin_of(version: &str, name: &str) -> Result<PathBuf> {
    let how = format!("build it with K8S_VERSION={version} K8S_COMPONENTS=\"kube-apiserver kube-controller-manager\"");
    existing(cached_bin_dir(version).join(name), name, &how)
}

/// `$KCM_K8S_BIN_DIR`, else `$KCM_CACHE/k8s-<K8S_VERSION>/bin` (may not exist).
pub fn k8s_bin_dir() -> PathBuf {
    std::env::var_os("KCM_K8S_BIN_DIR").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| cached_bin_dir(k8s_version()))
}

fn existing(path: PathBuf, what: &str, how: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{what} binary not found at {} ({how}); {BUILD_HINT}", path.display())
    }
}

/// A Kubernetes binary (`kube-controller-manager`, `kubectl`, ...) from
/// [`k8s_bin_dir`]; errors with the path and a build hint if missing.
pub fn k8s_bin(name: &str) -> Result<PathBuf> {
    existing(k8s_bin_dir().join(name), name, "override the directory with KCM_K8S_BIN_DIR or KCM_CACHE")
}

/// kube-apiserver binary (`$KCM_APISERVER_BIN` or [`k8s_bin`]).
pub fn apiserver_bin() -> Result<PathBuf> {
    match std::env::var_os("KCM_APISERVER_BIN").filter(|v| !v.is_empty()) {
        Some(p) => existing(PathBuf::from(p), "kube-apiserver", "from KCM_APISERVER_BIN"),
        None => k8s_bin("kube-apiserver"),
    }
}

/// etcd binary (`$KCM_ETCD_BIN`, `$KCM_CACHE/etcd-<ETCD_VERSION>/bin/etcd`, or the
/// newest `$KCM_CACHE/etcd-*/bin/etcd`).
pub fn etcd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KCM_ETCD_BIN").filter(|v| !v.is_empty()) {
        return existing(PathBuf::from(p), "etcd", "from KCM_ETCD_BIN");
    }
    let cache = cache_dir();
    let preferred = cache.join(format!("etcd-{}", etcd_version())).join("bin").join("etcd");
    if preferred.is_file() {
        return Ok(preferred);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("etcd-"))
        .map(|e| e.path().join("bin").join("etcd"))
        .filter(|p| p.is_file())
        .collect();
    candidates.sort_by_key(|p| version_key(p));
    match candidates.pop() {
        Some(p) => Ok(p),
        None => bail!(
            "etcd binary not found at {} nor any {}/etcd-*/bin/etcd (override with KCM_ETCD_BIN or KCM_CACHE); {BUILD_HINT}",
            preferred.display(),
            cache.display()
        ),
    }
}

fn version_key(p: &Path) -> Vec<u64> {
    // .../etcd-v3.5.24/bin/etcd -> [3, 5, 24]
    p.ancestors()
        .nth(2)
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .trim_start_matches("etcd-v")
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

// ------------------------------------------------------------------ server

/// Knobs for [`ApiServer::start_with`].
#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// Extra kube-apiserver flags (`--name=value`). A flag given here replaces
    /// the built-in flag of the same name (e.g. `--enable-admission-plugins=...`,
    /// `--feature-gates=...`) instead of being appended to it.
    pub extra_apiserver_args: Vec<String>,
    /// How long to wait for `/readyz`. Default 60 s.
    pub ready_timeout: Duration,
    /// This kube-apiserver instead of [`apiserver_bin`]'s (another version's).
    pub apiserver_bin: Option<PathBuf>,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions { extra_apiserver_args: Vec::new(), ready_timeout: Duration::from_secs(60), apiserver_bin: None }
    }
}

/// A running etcd + kube-apiserver pair with a throwaway PKI. Dropping it
/// kills both process groups and removes the temp dir.
pub struct ApiServer {
    // Field order = drop order: processes die before the temp dir is removed.
    apiserver: Proc,
    etcd: Proc,
    url: String,
    etcd_url: String,
    ca: pki::Ca,
    admin: pki::CertAndKey,
    dir_path: PathBuf,
    tempdir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("url", &self.url)
            .field("etcd_url", &self.etcd_url)
            .field("dir", &self.dir_path)
            .field("apiserver_pid", &self.apiserver.pid())
            .field("etcd_pid", &self.etcd.pid())
            .finish()
    }
}

fn free_ports<const N: usize>() -> Result<[u16; N]> {
    // Hold all listeners at once so the ports are distinct, then release them.
    let listeners = (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>().context("binding a free loopback port")?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    write_file(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

enum LaunchError {
    /// Port collision (someone grabbed a port between probe and bind): retry.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

fn port_collision(log: &str) -> bool {
    log.contains("address already in use")
}

impl ApiServer {
    /// Start etcd + kube-apiserver with default options and wait until
    /// `/readyz` is ok (60 s deadline).
    pub async fn start() -> Result<ApiServer> {
        Self::start_with(ApiServerOptions::default()).await
    }

    /// Like [`ApiServer::start`] with extra apiserver flags / timeout.
    pub async fn start_with(opts: ApiServerOptions) -> Result<ApiServer> {
        let t0 = Instant::now();
        let apiserver_bin = match &opts.apiserver_bin {
            Some(bin) => bin.clone(),
            None => apiserver_bin()?,
        };
        let etcd_bin = etcd_bin()?;
        let tempdir = tempfile::Builder::new().prefix("kcm-apitier-").tempdir().context("creating temp dir")?;
        let dir = tempdir.path().to_path_buf();

        // PKI
        let ca = pki::Ca::generate(pki::CA_COMMON_NAME)?;
        let serving = ca.serving_cert(
            "kube-apiserver",
            &["127.0.0.1", "localhost", "10.96.0.1", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"],
        )?;
        let admin = ca.client_cert(ADMIN_USER, &[ADMIN_GROUP])?;
        let (sa_key, sa_pub) = pki::sa_key_pair()?;
        write_file(&dir.join("ca.crt"), &ca.cert_pem)?;
        write_private(&dir.join("ca.key"), &ca.key_pem)?;
        write_file(&dir.join("apiserver.crt"), &serving.cert_pem)?;
        write_private(&dir.join("apiserver.key"), &serving.key_pem)?;
        write_file(&dir.join("admin.crt"), &admin.cert_pem)?;
        write_private(&dir.join("admin.key"), &admin.key_pem)?;
        write_private(&dir.join("sa.key"), &sa_key)?;
        write_file(&dir.join("sa.pub"), &sa_pub)?;

        let mut last_err = None;
        for attempt in 1..=3 {
            match launch(&dir, attempt, &apiserver_bin, &etcd_bin, &ca, &admin, &opts).await {
                Ok((apiserver, etcd, url, etcd_url)) => {
                    let server = ApiServer { apiserver, etcd, url, etcd_url, ca, admin, dir_path: dir, tempdir: Some(tempdir) };
                    server.write_kubeconfig(&server.admin_kubeconfig_path(), &server.admin)?;
                    eprintln!("apitier: kube-apiserver ready at {} in {:.1}s (dir {})", server.url, t0.elapsed().as_secs_f64(), server.dir_path.display());
                    return Ok(server);
                }
                Err(LaunchError::Retry(e)) => {
                    eprintln!("apitier: attempt {attempt} hit a port collision, retrying: {e:#}");
                    last_err = Some(e);
                }
                Err(LaunchError::Fatal(e)) => {
                    if std::env::var_os("KCM_APITIER_KEEP").is_some() {
                        eprintln!("apitier: keeping {}", tempdir.keep().display());
                    }
                    return Err(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("apiserver start failed")))
    }

    /// `https://127.0.0.1:<port>`
    pub fn url(&self) -> &str {
        &self.url
    }
    /// `http://127.0.0.1:<port>` of the etcd client endpoint.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }
    /// The temp dir holding certs, keys, kubeconfigs, logs and etcd data.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
    /// CA certificate PEM (also the apiserver's --client-ca-file and serving CA).
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }
    /// CA private key PEM (PKCS#8 ECDSA P-256).
    pub fn ca_key_pem(&self) -> &str {
        &self.ca.key_pem
    }
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir_path.join("ca.crt")
    }
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir_path.join("ca.key")
    }
    /// Private ServiceAccount signing key (PKCS#8 PEM): the apiserver's
    /// --service-account-signing-key-file, and what kube-controller-manager's
    /// --service-account-private-key-file needs.
    pub fn sa_key_path(&self) -> PathBuf {
        self.dir_path.join("sa.key")
    }
    /// Public ServiceAccount key (PEM "PUBLIC KEY"): --service-account-key-file.
    pub fn sa_pub_path(&self) -> PathBuf {
        self.dir_path.join("sa.pub")
    }
    /// kube-apiserver's stdout+stderr.
    pub fn apiserver_log_path(&self) -> &Path {
        self.apiserver.log_path()
    }
    pub fn etcd_log_path(&self) -> &Path {
        self.etcd.log_path()
    }
    /// Last `lines` lines of both logs (for failure messages).
    pub fn log_tails(&self, lines: usize) -> String {
        format!(
            "--- etcd ({}) ---\n{}\n--- kube-apiserver ({}) ---\n{}",
            self.etcd.log_path().display(),
            self.etcd.log_tail(lines),
            self.apiserver.log_path().display(),
            self.apiserver.log_tail(lines)
        )
    }

    /// Path of a kubeconfig for the admin (CN=kcm-test-admin, O=system:masters),
    /// with embedded certs; written at start.
    pub fn admin_kubeconfig_path(&self) -> PathBuf {
        self.dir_path.join("admin.kubeconfig")
    }

    /// Writes a kubeconfig with a freshly minted client cert (CN=user,
    /// O=each group) and returns its path (`<dir>/user-<user>.kubeconfig`,
    /// overwritten if it exists).
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let ck = self.ca.client_cert(user, groups)?;
        let safe: String = user.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = self.dir_path.join(format!("user-{safe}.kubeconfig"));
        self.write_kubeconfig(&path, &ck)?;
        Ok(path)
    }

    fn write_kubeconfig(&self, path: &Path, ck: &pki::CertAndKey) -> Result<()> {
        let kc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "apitier", "cluster": {
                "server": self.url,
                "certificate-authority-data": b64(&self.ca.cert_pem),
            }}],
            "users": [{"name": "user", "user": {
                "client-certificate-data": b64(&ck.cert_pem),
                "client-key-data": b64(&ck.key_pem),
            }}],
            "contexts": [{"name": "apitier", "context": {"cluster": "apitier", "user": "user"}}],
            "current-context": "apitier",
        });
        write_private(path, &serde_yaml::to_string(&kc)?)
    }

    /// Admin client (CN=kcm-test-admin, O=system:masters). Call inside a
    /// tokio runtime; the client belongs to that runtime (make a new one per
    /// test if the server is shared). Panics only if the client cannot be
    /// built from the server's own PKI (a bug), see [`ApiServer::try_client`].
    pub fn client(&self) -> Client {
        self.try_client().unwrap_or_else(|e| panic!("apitier: admin client: {e:#}"))
    }

    /// Client authenticating with a freshly minted client certificate from
    /// the CA: CN=`user`, one O= per group (the apiserver adds
    /// `system:authenticated`). Panics like [`ApiServer::client`].
    pub fn client_as(&self, user: &str, groups: &[&str]) -> Client {
        self.try_client_as(user, groups).unwrap_or_else(|e| panic!("apitier: client as {user} {groups:?}: {e:#}"))
    }

    /// Client authenticating with a bearer token (e.g. a ServiceAccount
    /// token). Panics like [`ApiServer::client`].
    pub fn client_with_token(&self, token: &str) -> Client {
        self.try_client_with_token(token).unwrap_or_else(|e| panic!("apitier: token client: {e:#}"))
    }

    pub fn try_client(&self) -> Result<Client> {
        client_for(&self.url, &self.ca.cert_pem, &self.admin)
    }

    /// The admin `kube::Config` behind [`ApiServer::client`], for building a
    /// client another way (e.g. `kcm_operator::apicount::counted_client`).
    pub fn admin_config(&self) -> Result<kube::Config> {
        config_for(&self.url, &self.ca.cert_pem, &self.admin)
    }

    pub fn try_client_as(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let ck = self.ca.client_cert(user, groups)?;
        client_for(&self.url, &self.ca.cert_pem, &ck)
    }

    pub fn try_client_with_token(&self, token: &str) -> Result<Client> {
        let auth: kube::config::AuthInfo = serde_json::from_value(json!({ "token": token }))?;
        client_from(&self.url, &self.ca.cert_pem, auth)
    }

    /// Client cert + key PEM (CN=`user`, one O= per group) signed by the CA,
    /// for processes that take cert files.
    pub fn mint_client_cert(&self, user: &str, groups: &[&str]) -> Result<(String, String)> {
        let ck = self.ca.client_cert(user, groups)?;
        Ok((ck.cert_pem, ck.key_pem))
    }

    /// See the free function [`bound_sa_token`]; uses the admin client.
    pub async fn bound_sa_token(&self, ns: &str, sa: &str, pod_name: &str, node_name: &str) -> Result<String> {
        bound_sa_token(&self.try_client()?, ns, sa, pod_name, node_name).await
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.apiserver.kill();
        self.etcd.kill();
        if std::env::var_os("KCM_APITIER_KEEP").is_some() {
            if let Some(t) = self.tempdir.take() {
                eprintln!("apitier: keeping {}", t.keep().display());
            }
        }
    }
}

fn client_for(url: &str, ca_pem: &str, ck: &pki::CertAndKey) -> Result<Client> {
    Client::try_from(config_for(url, ca_pem, ck)?).context("building kube client")
}

fn config_for(url: &str, ca_pem: &str, ck: &pki::CertAndKey) -> Result<kube::Config> {
    let auth: kube::config::AuthInfo = serde_json::from_value(json!({
        "client-certificate-data": b64(&ck.cert_pem),
        "client-key-data": b64(&ck.key_pem),
    }))?;
    config_from(url, ca_pem, auth)
}

fn client_from(url: &str, ca_pem: &str, auth: kube::config::AuthInfo) -> Result<Client> {
    Client::try_from(config_from(url, ca_pem, auth)?).context("building kube client")
}

fn config_from(url: &str, ca_pem: &str, auth: kube::config::AuthInfo) -> Result<kube::Config> {
    let ca_der = pem_to_der(ca_pem)?;
    let mut config = kube::Config::new(url.parse().with_context(|| format!("parsing {url}"))?);
    config.root_cert = Some(vec![ca_der]);
    config.auth_info = auth;
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(config)
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body.trim())?)
}

async fn launch(
    dir: &Path,
    attempt: u32,
    apiserver_bin: &Path,
    etcd_bin: &Path,
    ca: &pki::Ca,
    admin: &pki::CertAndKey,
    opts: &ApiServerOptions,
) -> std::result::Result<(Proc, Proc, String, String), LaunchError> {
    let fatal = LaunchError::Fatal;
    let [etcd_port, peer_port, api_port] = free_ports::<3>().map_err(fatal)?;
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let data_dir = dir.join(format!("etcd-data-{attempt}"));
    let etcd_args: Vec<String> = vec![
        "--name=apitier".into(),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=apitier={peer_url}"),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ];
    let log = dir.join(if attempt == 1 { "etcd.log".into() } else { format!("etcd-{attempt}.log") });
    let mut etcd = Proc::spawn("etcd", etcd_bin, &etcd_args, &log).map_err(fatal)?;

    // Wait for etcd /health (the apiserver backs off when etcd is not up yet).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if etcd_healthy(etcd_port).await {
            break;
        }
        if let Some(status) = etcd.exited() {
            let tail = etcd.log_tail(40);
            let e = anyhow!("etcd exited ({status}) before becoming healthy; log tail:\n{tail}");
            return Err(if port_collision(&tail) { LaunchError::Retry(e) } else { fatal(e) });
        }
        if Instant::now() > deadline {
            return Err(fatal(anyhow!("etcd at {etcd_url} not healthy after 30s; log tail:\n{}", etcd.log_tail(40))));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let p = |f: &str| dir.join(f).display().to_string();
    let mut flags: Vec<(String, String)> = [
        ("--etcd-servers", etcd_url.clone()),
        ("--secure-port", api_port.to_string()),
        ("--bind-address", "127.0.0.1".into()),
        ("--advertise-address", "127.0.0.1".into()),
        // No Endpoints for the `kubernetes` Service: nothing here reaches it, and since 1.37
        // the endpoint reconciler refuses a loopback advertise address.
        ("--endpoint-reconciler-type", "none".into()),
        ("--cert-dir", p("apiserver-certs")),
        ("--tls-cert-file", p("apiserver.crt")),
        ("--tls-private-key-file", p("apiserver.key")),
        ("--client-ca-file", p("ca.crt")),
        ("--service-account-issuer", SA_ISSUER.into()),
        ("--api-audiences", SA_ISSUER.into()),
        ("--service-account-key-file", p("sa.pub")),
        ("--service-account-signing-key-file", p("sa.key")),
        ("--service-cluster-ip-range", SERVICE_CIDR.into()),
        ("--authorization-mode", "Node,RBAC".into()),
        ("--enable-admission-plugins", "NodeRestriction".into()),
        ("--allow-privileged", "true".into()),
        ("--profiling", "false".into()),
        ("--v", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let extra_keys: Vec<&str> = opts.extra_apiserver_args.iter().map(|a| a.split('=').next().unwrap_or(a)).collect();
    flags.retain(|(k, _)| !extra_keys.contains(&k.as_str()));
    let mut args: Vec<String> = flags.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.extend(opts.extra_apiserver_args.iter().cloned());

    let log = dir.join(if attempt == 1 { "kube-apiserver.log".into() } else { format!("kube-apiserver-{attempt}.log") });
    let mut apiserver = Proc::spawn("kube-apiserver", apiserver_bin, &args, &log).map_err(fatal)?;
    let url = format!("https://127.0.0.1:{api_port}");
    let client = client_for(&url, &ca.cert_pem, admin).map_err(fatal)?;

    let deadline = Instant::now() + opts.ready_timeout;
    let mut last: String;
    loop {
        let req = http::Request::get("/readyz").body(Vec::new()).expect("static request");
        match tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await {
            Ok(Ok(body)) if body.trim() == "ok" => break,
            Ok(Ok(body)) => last = body,
            Ok(Err(e)) => last = format!("{e}"),
            Err(_) => last = "request timed out (5s)".into(),
        }
        let exited = match (etcd.exited(), apiserver.exited()) {
            (Some(s), _) => Some(("etcd", s)),
            (None, Some(s)) => Some(("kube-apiserver", s)),
            (None, None) => None,
        };
        if let Some((name, status)) = exited {
            let e = anyhow!("{name} exited ({status}) before /readyz was ok\n{}", both_tails(&etcd, &apiserver));
            let collided = port_collision(&apiserver.log_tail(40)) || port_collision(&etcd.log_tail(40));
            eprintln!("apitier: {e:#}");
            return Err(if collided { LaunchError::Retry(e) } else { fatal(e) });
        }
        if Instant::now() > deadline {
            let e = anyhow!("kube-apiserver at {url} not ready after {:?}; last /readyz: {last}\n{}", opts.ready_timeout, both_tails(&etcd, &apiserver));
            eprintln!("apitier: {e:#}");
            return Err(fatal(e));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((apiserver, etcd, url, etcd_url))
}

fn both_tails(etcd: &Proc, apiserver: &Proc) -> String {
    format!(
        "--- etcd log tail ({}) ---\n{}\n--- kube-apiserver log tail ({}) ---\n{}",
        etcd.log_path().display(),
        etcd.log_tail(30),
        apiserver.log_path().display(),
        apiserver.log_tail(60)
    )
}

async fn etcd_healthy(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        Some(text.contains("\"health\":\"true\""))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Some(true)))
}

// ------------------------------------------------------------------ helpers

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Ensures namespace `ns`, ServiceAccount `sa`, a Node `node_name` (label
/// `node-role.kubernetes.io/control-plane=""`, status addresses InternalIP
/// 127.0.0.1 and Hostname `node_name`) and a Pod `pod_name` pinned to the node
/// via spec.nodeName with serviceAccountName `sa` (image "none"; nothing runs
/// it). Then issues a TokenRequest bound to that Pod (expirationSeconds 3600,
/// default audience) and returns the token. With kube-apiserver >= 1.30 the
/// token carries the node name/uid, so its user info has extra
/// `authentication.kubernetes.io/node-name`.
pub async fn bound_sa_token(client: &Client, ns: &str, sa: &str, pod_name: &str, node_name: &str) -> Result<String> {
    let pp = PostParams::default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    match namespaces.create(&pp, &nsobj).await {
        Ok(_) => {}
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("creating namespace {ns}")),
    }

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let saobj: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": sa}}))?;
    match sas.create(&pp, &saobj).await {
        Ok(_) => {}
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("creating serviceaccount {ns}/{sa}")),
    }

    master_node(client, node_name, "127.0.0.1").await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod_name},
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": sa,
            "containers": [{"name": "main", "image": "none"}],
        },
    }))?;
    let pod = match pods.create(&pp, &pod).await {
        Ok(p) => p,
        Err(e) if is_conflict(&e) => pods.get(pod_name).await?,
        Err(e) => return Err(e).with_context(|| format!("creating pod {ns}/{pod_name}")),
    };
    let spec = pod.spec.as_ref();
    let (on_node, with_sa) = (spec.and_then(|s| s.node_name.as_deref()), spec.and_then(|s| s.service_account_name.as_deref()));
    if on_node != Some(node_name) || with_sa != Some(sa) {
        bail!("existing pod {ns}/{pod_name} has nodeName {on_node:?} / serviceAccountName {with_sa:?}, want {node_name:?} / {sa:?}");
    }
    let uid = pod.metadata.uid.clone().ok_or_else(|| anyhow!("pod {ns}/{pod_name} has no uid"))?;

    let tr: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {},
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": uid},
        },
    }))?;
    let tr = sas.create_token_request(sa, &pp, &tr).await.with_context(|| format!("TokenRequest for {ns}/{sa} bound to pod {pod_name}"))?;
    let token = tr.status.map(|s| s.token).unwrap_or_default();
    if token.is_empty() {
        bail!("TokenRequest for {ns}/{sa} returned no token");
    }
    Ok(token)
}

/// Ensures a Node `node_name` labelled `node-role.kubernetes.io/control-plane=""` whose
/// status has the addresses InternalIP `ip` and Hostname `node_name` (no kubelet runs it).
pub async fn master_node(client: &Client, node_name: &str, ip: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name, "labels": {"node-role.kubernetes.io/control-plane": ""}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("creating node {node_name}")),
    }
    let status = json!({"status": {"addresses": [
        {"type": "InternalIP", "address": ip},
        {"type": "Hostname", "address": node_name},
    ]}});
    nodes.patch_status(node_name, &PatchParams::default(), &Patch::Merge(&status)).await.with_context(|| format!("patching status of node {node_name}"))?;
    Ok(())
}

/// SelfSubjectReview (authentication.k8s.io/v1): how the apiserver sees
/// `client`. Returns (username, groups, extra).
pub async fn whoami(client: &Client) -> Result<(String, Vec<String>, BTreeMap<String, Vec<String>>)> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let ssr: SelfSubjectReview = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
        "metadata": {},
    }))?;
    let ssr = api.create(&PostParams::default(), &ssr).await.context("creating SelfSubjectReview")?;
    let ui = ssr.status.and_then(|s| s.user_info).ok_or_else(|| anyhow!("SelfSubjectReview returned no status.userInfo"))?;
    Ok((ui.username.unwrap_or_default(), ui.groups.unwrap_or_default(), ui.extra.unwrap_or_default()))
}
