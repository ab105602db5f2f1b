//! What goes on a master: the seed's flag set (1.5), the systemd unit rendered for one
//! node (1.6) and the kubeconfig (1.4). Pure: the caller supplies every input.

use std::net::IpAddr;

use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::{KubeControllerManagerSpec, KubeconfigMode, KCM_USER};
use crate::flags::{escape_specifiers, exec_word, refuse_control, translate, Flag, FlagError, KcmVersion, Translated, UnitValueError};

/// Why a node's files cannot be rendered. Nothing is written then.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error(transparent)]
    Flags(#[from] FlagError),
    #[error(transparent)]
    Value(#[from] UnitValueError),
}

/// The seed's flag set (section 1.5), in the seed's order and with the seed's names,
/// filled from the spec for the node whose IP is `node_ip`; then `removedArgs` taken out
/// and `extraArgs` applied (an existing flag keeps its place, a new one is appended).
pub fn seed_flags(spec: &KubeControllerManagerSpec, node_ip: IpAddr) -> Vec<Flag> {
    let p = &spec.paths;
    let mut flags = vec![
        Flag::bare("profiling"),
        Flag::new("cluster-name", &spec.cluster_name),
        Flag::new("controllers", "*,bootstrapsigner,tokencleaner"),
        Flag::new("kube-api-qps", "1000"),
        Flag::new("kube-api-burst", "2000"),
        Flag::bare("leader-elect"),
        Flag::bare("use-service-account-credentials"),
        Flag::new("concurrent-service-syncs", "2"),
        Flag::new("bind-address", node_ip.to_string()),
        Flag::new("secure-port", spec.kcm.secure_port.to_string()),
        Flag::new("tls-cert-file", &p.cert),
        Flag::new("tls-private-key-file", &p.key),
        Flag::new("port", "0"),
        Flag::new("authentication-kubeconfig", &p.kubeconfig),
        Flag::new("client-ca-file", &p.ca_cert),
        Flag::new("requestheader-allowed-names", ""),
        Flag::new("requestheader-client-ca-file", &p.requestheader_ca_cert),
        Flag::new("requestheader-extra-headers-prefix", "X-Remote-Extra-"),
        Flag::new("requestheader-group-headers", "X-Remote-Group"),
        Flag::new("requestheader-username-headers", "X-Remote-User"),
        Flag::new("authorization-kubeconfig", &p.kubeconfig),
        Flag::new("cluster-signing-cert-file", &p.ca_cert),
        Flag::new("cluster-signing-key-file", &p.ca_key),
        Flag::new("experimental-cluster-signing-duration", "8760h"),
        Flag::new("horizontal-pod-autoscaler-sync-period", "10s"),
        Flag::new("concurrent-deployment-syncs", "10"),
        Flag::new("concurrent-gc-syncs", "30"),
        Flag::new("node-cidr-mask-size", "24"),
        Flag::new("service-cluster-ip-range", &spec.service_cluster_ip_range),
        Flag::new("pod-eviction-timeout", "6m"),
        Flag::new("terminated-pod-gc-threshold", "10000"),
        Flag::new("root-ca-file", &p.ca_cert),
        Flag::new("service-account-private-key-file", &p.service_account_key),
        Flag::new("kubeconfig", &p.kubeconfig),
        Flag::new("logtostderr", "true"),
        Flag::new("v", spec.kcm.verbosity.to_string()),
    ];
    flags.retain(|f| !spec.kcm.removed_args.contains(&f.name));
    for (name, value) in &spec.kcm.extra_args {
        // A successor name overrides the seed's old spelling in place.
        let same = |f: &Flag| f.name == *name || (name == "cluster-signing-duration" && f.name == "experimental-cluster-signing-duration");
        match flags.iter_mut().find(|f| same(f)) {
            Some(f) => *f = Flag::new(name, value),
            None => flags.push(Flag::new(name, value)),
        }
    }
    flags
}

/// The flags of a kcm static pod manifest (kubeadm's): every `--name[=value]` of its first
/// container's command and args.
pub fn static_pod_flags(manifest: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let pod: serde_yaml::Value = serde_yaml::from_str(manifest).map_err(|e| format!("not YAML: {e}"))?;
    let c = &pod["spec"]["containers"][0];
    let words = [&c["command"], &c["args"]].into_iter().filter_map(|v| v.as_sequence()).flatten().filter_map(|w| w.as_str());
    Ok(words
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| match w.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (w.to_string(), None),
        })
        .collect())
}

/// What adopting a kcm that runs with `theirs` (kubeadm's manifest) would silently drop: each
/// of its flags that neither the seed's set for the spec (`seed`, before `removedArgs`) nor
/// the unit (`rendered`) names, and that `kcm.removedArgs` does not list, as `--name=value`
/// (what to put in `kcm.extraArgs`). kubeadm's `--allocate-node-cidrs` and `--cluster-cidr`,
/// say: without them new Nodes get no podCIDR. Flags whose job the unit does under another
/// value (`--kubeconfig`, `--bind-address`, ...) are named by both and not listed.
pub fn adoption_drops(theirs: &[(String, Option<String>)], seed: &[Flag], rendered: &[Flag], removed: &[String]) -> Vec<String> {
    let named = |n: &str| seed.iter().chain(rendered).any(|f| f.name == n) || removed.iter().any(|r| r == n);
    theirs
        .iter()
        .filter(|(n, _)| !named(n))
        .map(|(n, v)| match v {
            Some(v) => format!("--{n}={v}"),
            None => format!("--{n}"),
        })
        .collect()
}

/// The spec's free-text fields that reach the master (paths, the kcm binary and working
/// directory, flag values, the kubeconfig), by their name in the spec.
pub fn spec_text(spec: &KubeControllerManagerSpec) -> Vec<(String, &str)> {
    let mut fields: Vec<(String, &str)> = spec.paths.all().into_iter().map(|(name, path)| (format!("paths.{name}"), path)).collect();
    fields.extend([
        ("kcm.binaryPath".to_string(), spec.kcm.binary_path.as_str()),
        ("kcm.workingDir".to_string(), spec.kcm.working_dir.as_str()),
        ("apiserverUrl".to_string(), spec.apiserver_url.as_str()),
        ("clusterName".to_string(), spec.cluster_name.as_str()),
        ("serviceClusterIpRange".to_string(), spec.service_cluster_ip_range.as_str()),
    ]);
    fields
}

/// Refuses a control character in any of [`spec_text`]: the CRD refuses them, but a spec
/// may bypass it (an older CRD).
pub fn refuse_control_in_spec(spec: &KubeControllerManagerSpec) -> Result<(), UnitValueError> {
    spec_text(spec).into_iter().try_for_each(|(field, value)| refuse_control(&field, value))
}

/// `WorkingDirectory=`: systemd expands specifiers in it but does not unquote it, strips
/// surrounding whitespace, reads a leading `-` or `~` and a trailing `\` as syntax.
fn working_directory(dir: &str) -> Result<String, UnitValueError> {
    let field = "kcm.workingDir";
    refuse_control(field, dir)?;
    if !dir.starts_with('/') {
        return Err(UnitValueError::new(field, dir, "it must be an absolute path"));
    }
    if dir.ends_with(|c: char| c.is_whitespace() || c == '\\') {
        return Err(UnitValueError::new(field, dir, "systemd would drop a trailing blank or read a trailing backslash as a line continuation"));
    }
    Ok(escape_specifiers(dir))
}

/// The executable of `ExecStart=`: one command-line word, except that systemd does not
/// substitute `$` in it (so `$$` would stay doubled) and reads a leading `-`, `@`, `+`, `!`
/// or `:` as a prefix.
fn executable(path: &str) -> Result<String, UnitValueError> {
    let field = "kcm.binaryPath";
    if !path.starts_with('/') {
        return Err(UnitValueError::new(field, path, "it must be an absolute path"));
    }
    if path.contains('$') {
        return Err(UnitValueError::new(field, path, "systemd would substitute a '$' in the process's argv[0] but not in the executed path"));
    }
    exec_word(field, path)
}

/// The unit file of section 1.5/1.6, for one node. Every value is written so that systemd
/// reads it back literally (see [`exec_word`]); a control character anywhere is refused.
pub fn unit(spec: &KubeControllerManagerSpec, flags: &[Flag]) -> Result<String, RenderError> {
    refuse_control_in_spec(spec)?;
    let mut s =
        String::from("[Unit]\nDescription=Kubernetes Controller Manager\nDocumentation=https://github.com/GoogleCloudPlatform/kubernetes\n\n[Service]\n");
    s.push_str(&format!("WorkingDirectory={}\n", working_directory(&spec.kcm.working_dir)?));
    s.push_str(&format!("ExecStart={}", executable(&spec.kcm.binary_path)?));
    for f in flags {
        s.push_str(" \\\n  ");
        s.push_str(&f.render()?);
    }
    s.push_str("\nRestart=on-failure\nRestartSec=5\n\n[Install]\nWantedBy=multi-user.target\n");
    Ok(s)
}

/// How the kubeconfig carries the client certificate.
pub enum ClientCredentials<'a> {
    /// Paths of the cert and key files (restart-free rotation).
    Files { cert: &'a str, key: &'a str },
    /// PEM contents, embedded (the seed's `--embed-certs=true`).
    Embedded { cert_pem: &'a str, key_pem: &'a str },
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'a str,
    clusters: Vec<Named<'a, Cluster>>,
    users: Vec<Named<'a, User>>,
    contexts: Vec<Named<'a, Context<'a>>>,
    current_context: &'a str,
    preferences: serde_json::Value,
}
#[derive(Serialize)]
struct Named<'a, T> {
    name: &'a str,
    #[serde(flatten)]
    body: T,
}
#[derive(Serialize)]
struct Cluster {
    cluster: ClusterBody,
}
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterBody {
    certificate_authority_data: String,
    server: String,
}
#[derive(Serialize)]
struct User {
    user: UserBody,
}
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct UserBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    client_certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_certificate_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key_data: Option<String>,
}
#[derive(Serialize)]
struct Context<'a> {
    context: ContextBody<'a>,
}
#[derive(Serialize)]
struct ContextBody<'a> {
    cluster: &'a str,
    user: &'a str,
}

/// The kubeconfig of section 1.4: cluster with embedded CA and the spec's server, user
/// `system:kube-controller-manager`, its context set and used.
pub fn kubeconfig(spec: &KubeControllerManagerSpec, ca_pem: &str, creds: ClientCredentials<'_>) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let user = match creds {
        ClientCredentials::Files { cert, key } => {
            UserBody { client_certificate: Some(cert.into()), client_key: Some(key.into()), client_certificate_data: None, client_key_data: None }
        }
        ClientCredentials::Embedded { cert_pem, key_pem } => {
            UserBody { client_certificate: None, client_key: None, client_certificate_data: Some(b64(cert_pem)), client_key_data: Some(b64(key_pem)) }
        }
    };
    let kc = Kubeconfig {
        api_version: "v1",
        kind: "Config",
        clusters: vec![Named {
            name: &spec.cluster_name,
            body: Cluster { cluster: ClusterBody { certificate_authority_data: b64(ca_pem), server: spec.apiserver_url.clone() } },
        }],
        users: vec![Named { name: KCM_USER, body: User { user } }],
        contexts: vec![Named { name: KCM_USER, body: Context { context: ContextBody { cluster: &spec.cluster_name, user: KCM_USER } } }],
        current_context: KCM_USER,
        preferences: serde_json::json!({}),
    };
    serde_yaml::to_string(&kc).expect("kubeconfig serializes")
}

/// Everything about one node's files that does not depend on the certificate itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFiles {
    pub unit: String,
    pub flags: Translated,
}

/// Renders the unit for one node and kcm version. `accepted`: flag names from `--help`.
pub fn node_files(
    spec: &KubeControllerManagerSpec,
    node_ip: IpAddr,
    version: KcmVersion,
    accepted: Option<&std::collections::BTreeSet<String>>,
) -> Result<NodeFiles, RenderError> {
    let seed = seed_flags(spec, node_ip);
    // Whatever systemd cannot be given literally is refused, naming its field, before a flag
    // is matched against kcm's --help.
    unit(spec, &seed)?;
    let flags = translate(&seed, version, accepted)?;
    Ok(NodeFiles { unit: unit(spec, &flags.flags)?, flags })
}

/// Short, stable digest of the spec fields that shape the files on a master: the
/// revision the operator rolls out. `paused` does not count.
pub fn spec_revision(spec: &KubeControllerManagerSpec) -> String {
    let mut s = spec.clone();
    s.paused = false;
    // Handing back applies no spec: the revision stays the one the masters run.
    s.hand_back = None;
    let json = serde_json::to_vec(&s).expect("spec serializes");
    let digest = Sha256::digest(&json);
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// Whether the kubeconfig mode embeds the client certificate.
pub fn embeds_client_cert(spec: &KubeControllerManagerSpec) -> bool {
    spec.certificate.kubeconfig_mode == KubeconfigMode::Embedded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CertificateSpec, HostPaths, KcmSpec};

    /// kind's kubeadm (v1.35) kcm manifest, as it stands on a kind node.
    const KIND_KUBEADM_KCM: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-controller-manager\nspec:\n  containers:\n  - command:\n    - kube-controller-manager\n    - --allocate-node-cidrs=true\n    - --authentication-kubeconfig=/etc/kubernetes/controller-manager.conf\n    - --authorization-kubeconfig=/etc/kubernetes/controller-manager.conf\n    - --bind-address=127.0.0.1\n    - --client-ca-file=/etc/kubernetes/pki/ca.crt\n    - --cluster-cidr=10.244.0.0/16\n    - --cluster-name=kcm\n    - --cluster-signing-cert-file=/etc/kubernetes/pki/ca.crt\n    - --cluster-signing-key-file=/etc/kubernetes/pki/ca.key\n    - --controllers=*,bootstrapsigner,tokencleaner\n    - --kubeconfig=/etc/kubernetes/controller-manager.conf\n    - --leader-elect=true\n    - --requestheader-client-ca-file=/etc/kubernetes/pki/front-proxy-ca.crt\n    - --root-ca-file=/etc/kubernetes/pki/ca.crt\n    - --service-account-private-key-file=/etc/kubernetes/pki/sa.key\n    - --service-cluster-ip-range=10.96.0.0/16\n    - --use-service-account-credentials=true\n    - --enable-hostpath-provisioner=true\n    image: registry.k8s.io/kube-controller-manager:v1.35.4\n    name: kube-controller-manager\n";

    #[test]
    fn adopting_kubeadm_names_every_flag_the_unit_would_drop() {
        let ip: IpAddr = "172.18.0.3".parse().unwrap();
        let theirs = static_pod_flags(KIND_KUBEADM_KCM).unwrap();
        assert_eq!(theirs.len(), 18);
        let mut spec = seed_spec();
        let drops = |spec: &KubeControllerManagerSpec| adoption_drops(&theirs, &seed_flags(spec, ip), &seed_flags(spec, ip), &spec.kcm.removed_args);
        assert_eq!(drops(&spec), ["--allocate-node-cidrs=true", "--cluster-cidr=10.244.0.0/16", "--enable-hostpath-provisioner=true"]);
        // Carried in extraArgs (manifests/kind does), or dropped on purpose in removedArgs.
        spec.kcm.extra_args.insert("allocate-node-cidrs".into(), "true".into());
        spec.kcm.extra_args.insert("cluster-cidr".into(), "10.244.0.0/16".into());
        spec.kcm.removed_args.push("enable-hostpath-provisioner".into());
        assert!(drops(&spec).is_empty(), "{:?}", drops(&spec));
        // The repo's kind CR carries them.
        let kind: crate::api::KubeControllerManager =
            serde_yaml::from_str(include_str!("../../manifests/kind/kubecontrollermanager.yaml")).expect("manifests/kind's CR");
        assert!(drops(&kind.spec).is_empty(), "manifests/kind would drop {:?}", drops(&kind.spec));
        assert!(static_pod_flags("{").is_err());
        assert!(static_pod_flags("kind: Pod").unwrap().is_empty());
    }

    fn seed_spec() -> KubeControllerManagerSpec {
        KubeControllerManagerSpec {
            master_selector: Default::default(),
            apiserver_url: "https://172.24.8.100:16443".into(),
            cluster_name: "kubernetes".into(),
            service_cluster_ip_range: "10.254.0.0/16".into(),
            certificate: CertificateSpec::default(),
            kcm: KcmSpec { working_dir: "/data/k8s/k8s/kube-controller-manager".into(), ..Default::default() },
            paths: HostPaths::default(),
            paused: false,
            hand_back: None,
        }
    }

    /// The seed's unit (section 1.5) with ##MASTER_IP## = 172.24.8.71, line by line, as
    /// kcm 1.23 takes it (only the signing-duration flag renamed).
    const SEED_UNIT_1_23: &str = r#"[Unit]
Description=Kubernetes Controller Manager
Documentation=https://github.com/GoogleCloudPlatform/kubernetes

[Service]
WorkingDirectory=/data/k8s/k8s/kube-controller-manager
ExecStart=/opt/k8s/bin/kube-controller-manager \
  --profiling \
  --cluster-name=kubernetes \
  --controllers=*,bootstrapsigner,tokencleaner \
  --kube-api-qps=1000 \
  --kube-api-burst=2000 \
  --leader-elect \
  --use-service-account-credentials \
  --concurrent-service-syncs=2 \
  --bind-address=172.24.8.71 \
  --secure-port=10252 \
  --tls-cert-file=/etc/kubernetes/cert/kube-controller-manager.pem \
  --tls-private-key-file=/etc/kubernetes/cert/kube-controller-manager-key.pem \
  --port=0 \
  --authentication-kubeconfig=/etc/kubernetes/kube-controller-manager.kubeconfig \
  --client-ca-file=/etc/kubernetes/cert/ca.pem \
  --requestheader-allowed-names="" \
  --requestheader-client-ca-file=/etc/kubernetes/cert/ca.pem \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-username-headers=X-Remote-User \
  --authorization-kubeconfig=/etc/kubernetes/kube-controller-manager.kubeconfig \
  --cluster-signing-cert-file=/etc/kubernetes/cert/ca.pem \
  --cluster-signing-key-file=/etc/kubernetes/cert/ca-key.pem \
  --cluster-signing-duration=8760h \
  --horizontal-pod-autoscaler-sync-period=10s \
  --concurrent-deployment-syncs=10 \
  --concurrent-gc-syncs=30 \
  --node-cidr-mask-size=24 \
  --service-cluster-ip-range=10.254.0.0/16 \
  --pod-eviction-timeout=6m \
  --terminated-pod-gc-threshold=10000 \
  --root-ca-file=/etc/kubernetes/cert/ca.pem \
  --service-account-private-key-file=/etc/kubernetes/cert/ca-key.pem \
  --kubeconfig=/etc/kubernetes/kube-controller-manager.kubeconfig \
  --logtostderr=true \
  --v=2
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"#;

    fn ip() -> IpAddr {
        "172.24.8.71".parse().unwrap()
    }

    #[test]
    fn seed_unit_line_by_line_on_1_23() {
        let files = node_files(&seed_spec(), ip(), KcmVersion::new(1, 23, 17), None).unwrap();
        for (n, (got, want)) in files.unit.lines().zip(SEED_UNIT_1_23.lines()).enumerate() {
            assert_eq!(got, want, "line {}", n + 1);
        }
        assert_eq!(files.unit.lines().count(), SEED_UNIT_1_23.lines().count());
    }

    #[test]
    fn seed_unit_on_1_33_loses_exactly_the_removed_lines() {
        let files = node_files(&seed_spec(), ip(), KcmVersion::new(1, 33, 13), None).unwrap();
        let gone = ["  --port=0 \\", "  --pod-eviction-timeout=6m \\", "  --logtostderr=true \\"];
        let want: Vec<&str> = SEED_UNIT_1_23.lines().filter(|l| !gone.contains(l)).collect();
        assert_eq!(files.unit.lines().collect::<Vec<_>>(), want);
        assert_eq!(files.flags.warnings.len(), 4, "{:?}", files.flags.warnings);
    }

    #[test]
    fn seed_unit_on_1_37_loses_concurrent_service_syncs_too() {
        let files = node_files(&seed_spec(), ip(), KcmVersion::new(1, 37, 2), None).unwrap();
        let gone = ["  --port=0 \\", "  --pod-eviction-timeout=6m \\", "  --logtostderr=true \\", "  --concurrent-service-syncs=2 \\"];
        let want: Vec<&str> = SEED_UNIT_1_23.lines().filter(|l| !gone.contains(l)).collect();
        assert_eq!(files.unit.lines().collect::<Vec<_>>(), want);
        assert_eq!(files.flags.warnings.len(), 5, "{:?}", files.flags.warnings);
    }

    #[test]
    fn extra_args_override_in_place_and_append() {
        let mut spec = seed_spec();
        spec.kcm.extra_args.insert("cluster-signing-duration".into(), "720h".into());
        spec.kcm.extra_args.insert("concurrent-gc-syncs".into(), "5".into());
        spec.kcm.extra_args.insert("allocate-node-cidrs".into(), "true".into());
        spec.kcm.removed_args.push("profiling".into());
        let flags = seed_flags(&spec, ip());
        assert!(!flags.iter().any(|f| f.name == "profiling"));
        assert!(!flags.iter().any(|f| f.name == "experimental-cluster-signing-duration"));
        let pos = |n: &str| flags.iter().position(|f| f.name == n).unwrap();
        assert_eq!(pos("cluster-signing-duration"), 22);
        assert_eq!(flags[pos("concurrent-gc-syncs")].value.as_deref(), Some("5"));
        assert_eq!(flags.last().unwrap().name, "allocate-node-cidrs");
    }

    #[test]
    fn kubeconfig_follows_seed_1_4() {
        let spec = seed_spec();
        let kc = kubeconfig(&spec, "CA", ClientCredentials::Files { cert: "/c.pem", key: "/k.pem" });
        let v: serde_json::Value = serde_yaml::from_str(&kc).unwrap();
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "Config");
        assert_eq!(v["current-context"], KCM_USER);
        assert_eq!(v["contexts"][0]["context"]["user"], KCM_USER);
        assert_eq!(v["contexts"][0]["context"]["cluster"], "kubernetes");
        assert_eq!(v["clusters"][0]["cluster"]["server"], "https://172.24.8.100:16443");
        assert_eq!(v["clusters"][0]["cluster"]["certificate-authority-data"], "Q0E=");
        assert_eq!(v["users"][0]["user"]["client-certificate"], "/c.pem");
        let kc = kubeconfig(&spec, "CA", ClientCredentials::Embedded { cert_pem: "C", key_pem: "K" });
        let v: serde_json::Value = serde_yaml::from_str(&kc).unwrap();
        assert_eq!(v["users"][0]["user"]["client-certificate-data"], "Qw==");
        assert_eq!(v["users"][0]["user"]["client-key-data"], "Sw==");
        assert!(v["users"][0]["user"].get("client-certificate").is_none());
    }

    /// The control characters every value is tried with: newline, carriage return, NUL, and a
    /// tab, ESC, DEL, C1 NEL for good measure.
    const CONTROL: [char; 7] = ['\n', '\r', '\0', '\t', '\x1b', '\x7f', '\u{85}'];

    fn render_err(spec: &KubeControllerManagerSpec) -> UnitValueError {
        match node_files(spec, ip(), KcmVersion::new(1, 33, 13), None) {
            Err(RenderError::Value(e)) => e,
            other => panic!("expected a refused value, got {other:?}"),
        }
    }

    #[test]
    fn control_characters_in_working_dir_and_binary_path_are_refused() {
        for c in CONTROL {
            let mut spec = seed_spec();
            spec.kcm.working_dir = format!("/x{c}ExecStartPre=/bin/sh -c 'touch /pwned'");
            let e = render_err(&spec);
            assert_eq!(e.field, "kcm.workingDir", "{e}");
            assert!(e.reason.contains(&format!("U+{:04X}", u32::from(c))), "{e}");
            let mut spec = seed_spec();
            spec.kcm.binary_path = format!("/opt/k8s/bin/kcm{c}ExecStartPre=/bin/sh");
            assert_eq!(render_err(&spec).field, "kcm.binaryPath");
        }
    }

    #[test]
    fn control_characters_in_any_path_are_refused() {
        for (name, _) in HostPaths::default().all() {
            for c in CONTROL {
                let mut v = serde_json::to_value(seed_spec()).unwrap();
                v["paths"][name] = format!("/etc/kubernetes/a{c}b").into();
                let spec: KubeControllerManagerSpec = serde_json::from_value(v).unwrap();
                assert_eq!(render_err(&spec).field, format!("paths.{name}"));
                assert!(unit(&spec, &[]).is_err(), "unit() refuses paths.{name} on its own");
            }
        }
    }

    #[test]
    fn control_characters_in_flag_names_and_values_are_refused() {
        for c in CONTROL {
            let mut spec = seed_spec();
            spec.kcm.extra_args.insert(format!("v{c}ExecStartPre=/bin/sh"), "4".into());
            let e = render_err(&spec);
            assert_eq!(e.field, "flag name", "{e}");
            let mut spec = seed_spec();
            spec.kcm.extra_args.insert("v".into(), format!("4{c}ExecStartPre=/bin/sh"));
            assert_eq!(render_err(&spec).field, "flag --v");
            // Also when the flags come straight to unit(), and when kcm's --help is consulted.
            assert!(unit(&seed_spec(), &[Flag::new("x", format!("1{c}"))]).is_err());
            let accepted = std::collections::BTreeSet::from(["v".to_string()]);
            assert!(matches!(node_files(&spec, ip(), KcmVersion::new(1, 33, 13), Some(&accepted)), Err(RenderError::Value(_))));
        }
    }

    #[test]
    fn systemd_specials_are_escaped_in_the_unit() {
        let mut spec = seed_spec();
        spec.kcm.working_dir = "/data/k8s/50%n dir".into();
        spec.kcm.binary_path = r#"/opt/k8s/my bin/kcm%i"#.into();
        spec.kcm.extra_args.insert("feature-gates".into(), r#"A=%h$HOME\"x""#.into());
        let unit = node_files(&spec, ip(), KcmVersion::new(1, 33, 13), None).unwrap().unit;
        let lines: Vec<&str> = unit.lines().collect();
        assert!(lines.contains(&"WorkingDirectory=/data/k8s/50%%n dir"), "{unit}");
        assert!(lines.contains(&r#"ExecStart="/opt/k8s/my bin/kcm%%i" \"#), "{unit}");
        // The appended flag ends the command line.
        assert!(lines.contains(&r#"  --feature-gates="A=%%h$$HOME\\\"x\"""#), "{unit}");
    }

    #[test]
    fn what_systemd_cannot_take_literally_is_refused() {
        let refused = |f: fn(&mut KubeControllerManagerSpec)| {
            let mut spec = seed_spec();
            f(&mut spec);
            render_err(&spec)
        };
        assert_eq!(refused(|s| s.kcm.working_dir = r"/data/k8s\".into()).field, "kcm.workingDir");
        assert_eq!(refused(|s| s.kcm.working_dir = "/data/k8s ".into()).field, "kcm.workingDir");
        assert_eq!(refused(|s| s.kcm.working_dir = "-/data/k8s".into()).field, "kcm.workingDir");
        assert_eq!(refused(|s| s.kcm.binary_path = "/opt/$X/kcm".into()).field, "kcm.binaryPath");
        assert_eq!(refused(|s| s.kcm.binary_path = "-/opt/kcm".into()).field, "kcm.binaryPath");
        assert_eq!(refused(|s| s.apiserver_url = "https://x:6443\n".into()).field, "apiserverUrl");
        assert_eq!(refused(|s| s.cluster_name = "k\r".into()).field, "clusterName");
    }

    #[test]
    fn revision_ignores_pause_but_not_flags() {
        let a = seed_spec();
        let mut b = a.clone();
        b.paused = true;
        assert_eq!(spec_revision(&a), spec_revision(&b));
        b.kcm.extra_args.insert("v".into(), "4".into());
        assert_ne!(spec_revision(&a), spec_revision(&b));
        assert_eq!(spec_revision(&a).len(), 10);
    }
}
