//! The `KubeControllerManager` custom resource and the contract shared by the operator
//! and the node-helper (signer name, field managers, label keys). Each constant lives here once.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resource, and prefix of every key this project owns.
pub const GROUP: &str = "kcm.kcm-operator.io";
/// The signerName the operator signs for, and the only one it ever touches.
pub const SIGNER_NAME: &str = "kcm.kcm-operator.io/kube-controller-manager";
/// The identity kube-controller-manager runs as (CN and O of its certificate; seed 1.2).
pub const KCM_USER: &str = "system:kube-controller-manager";
/// Name of the one KubeControllerManager object per cluster.
pub const CR_NAME: &str = "kube-controller-manager";
/// The operator replicas' own Lease (in [`NAMESPACE`]).
pub const OPERATOR_LEASE: &str = "kcm-operator";
/// Namespace the node-helper DaemonSet and the operator's Lease live in.
pub const NAMESPACE: &str = "kcm-operator";
/// ServiceAccount of the node-helper: the only requestor whose CSRs are approved.
pub const HELPER_SERVICE_ACCOUNT: &str = "kcm-node-helper";
/// Field manager for everything the operator writes with server-side apply.
pub const OPERATOR_MANAGER: &str = "kcm-operator";
/// Field manager prefix for what a node-helper writes (suffixed with the node name).
pub const HELPER_MANAGER_PREFIX: &str = "kcm-node-helper";
/// Label on each CSR naming the node it is for.
pub const CSR_NODE_LABEL: &str = "kcm.kcm-operator.io/node";
/// The extra attribute that pod-bound ServiceAccount tokens carry: the node the pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The extra attributes of a pod-bound ServiceAccount token naming the pod it is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// Annotation on each CSR naming the target revision (the step) it is requested for: the
/// signer issues one certificate per node and step.
pub const CSR_REVISION_ANNOTATION: &str = "kcm.kcm-operator.io/revision";
/// Renew now: on the KubeControllerManager (every master) or on a KcmNode (that master), an
/// RFC 3339 time; a master whose certificate was issued before it gets a renewal, one master
/// at a time, the leader's last (`kcm-operator renew [--node N]` sets it to now).
pub const RENEW_REQUESTED_ANNOTATION: &str = "kcm.kcm-operator.io/renew-requested-at";
/// The Lease kcm itself elects its leader on (seed 2.5).
pub const KCM_LEASE: (&str, &str) = ("kube-system", "kube-controller-manager");
/// Label of control-plane nodes set by kubeadm; the default master selector.
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// `app.kubernetes.io/name` of the node-helper DaemonSet's pods (its selector).
pub const HELPER_APP: &str = "kcm-node-helper";
/// `app.kubernetes.io/name` of a rescue helper pod: the operator's copy of the DaemonSet's
/// template pinned to one master by `nodeName`, not matched by the DaemonSet's selector.
pub const RESCUE_APP: &str = "kcm-node-helper-rescue";
/// Name of the node-helper DaemonSet (and prefix of rescue pods: `<name>-rescue-<node>`).
pub const HELPER_DAEMONSET: &str = "kcm-node-helper";
/// `app.kubernetes.io/name` of the operator's static pods.
pub const OPERATOR_APP: &str = "kcm-operator";
/// File name of the operator's static pod manifest in the kubelet's static pod directory.
pub const OPERATOR_MANIFEST: &str = "kcm-operator.yaml";
/// Port of the operator's /healthz, /readyz and /metrics on every master (its static pod
/// uses the host's network). Clashes with none of the control plane's (6443, 2379-2380,
/// 10248-10260) nor the helper's.
pub const OPERATOR_HEALTH_PORT: u16 = 10271;
/// Port of the node-helper's /metrics, /healthz and /readyz on every master (hostNetwork):
/// in the Prometheus exporters' range, away from node-exporter's 9100 and the
/// control plane's ports.
pub const HELPER_METRICS_PORT: u16 = 9477;
/// Environment variable of the helper's `--metrics-addr` (`off`: no server, as in rescue pods).
pub const HELPER_METRICS_ADDR_ENV: &str = "KCM_HELPER_METRICS_ADDR";
/// A helper reports at least this often (seconds), also when nothing changed.
pub const REPORT_PERIOD_SECS: i64 = 10;
/// The CR's condition that is True once every master is handed back ([`KubeControllerManagerSpec::hand_back`]).
pub const HANDED_BACK_CONDITION: &str = "HandedBack";
/// A node report older than this (seconds) is unknown: neither healthy nor unhealthy.
pub const STALE_AFTER_SECS: i64 = 3 * REPORT_PERIOD_SECS;

/// Desired state of the highly available kube-controller-manager. Cluster-scoped, one per cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kcm.kcm-operator.io",
    version = "v1alpha1",
    kind = "KubeControllerManager",
    plural = "kubecontrollermanagers",
    shortname = "kcm",
    status = "KubeControllerManagerStatus",
    printcolumn = r#"{"name":"Leader","type":"string","jsonPath":".status.leader"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expires"}"#,
    printcolumn = r#"{"name":"Renews","type":"string","jsonPath":".status.nextRenewal"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = "self.metadata.name == 'kube-controller-manager'"
)]
#[serde(rename_all = "camelCase")]
pub struct KubeControllerManagerSpec {
    /// Labels selecting the masters kcm runs on. Default: kubeadm's control-plane role label.
    /// Only labels a kubelet cannot set on its own Node (NodeRestriction):
    /// `node-role.kubernetes.io/*` and `node-restriction.kubernetes.io/*`. A worker that could
    /// label itself a master would get a rescue pod and a kcm certificate.
    #[serde(default = "default_master_selector")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "size(self) > 0", "message": "masterSelector must select on at least one label"},
        {"rule": "self.all(k, k.startsWith('node-role.kubernetes.io/') || k.startsWith('node-restriction.kubernetes.io/'))",
         "message": "masterSelector may only use labels a kubelet cannot set on itself: node-role.kubernetes.io/* or node-restriction.kubernetes.io/*"},
    ]))]
    pub master_selector: BTreeMap<String, String>,
    /// The apiserver URL written into the kubeconfig (seed: ${KUBE_APISERVER}).
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('https://')", "message": "apiserverUrl must be an https:// URL"},
        no_control_rule("apiserverUrl"),
    ]))]
    pub apiserver_url: String,
    /// Cluster name in the kubeconfig and `--cluster-name` (seed: kubernetes).
    #[serde(default = "default_cluster_name")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = [no_control_rule("clusterName")]))]
    pub cluster_name: String,
    /// `--service-cluster-ip-range` (seed: ${SERVICE_CIDR}).
    #[serde(default = "default_service_cidr")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = [
        {"rule": CIDR, "message": "serviceClusterIpRange must be a CIDR"},
        no_control_rule("serviceClusterIpRange"),
    ]))]
    pub service_cluster_ip_range: String,
    #[serde(default)]
    pub certificate: CertificateSpec,
    #[serde(default)]
    pub kcm: KcmSpec,
    #[serde(default)]
    pub paths: HostPaths,
    /// Stop all rollouts and renewals; status is still reported.
    #[serde(default)]
    pub paused: bool,
    /// Hand the masters back to kubeadm's kcm: see [`HandBack`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hand_back: Option<HandBack>,
}

/// Hand the masters back (`kubeadm`: to kubeadm's kcm static pod). On each master that runs
/// our kcm, one at a time, the kcm leader's last: the manifest kept aside at adoption is put
/// back, and once kubeadm's kcm answers /healthz there our unit is stopped (its Lease handed
/// off first) and disabled. Refused on a master with no manifest kept, or whose kubeadm
/// kubeconfig's certificate has expired; nothing is stopped there. Renewals and repairs
/// stop. When every master is handed back (condition HandedBack), the helpers remove the
/// operator's static pods; then delete the rest (README, "Uninstall"). Removed again before
/// that, it adopts kubeadm's kcm again.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HandBack {
    /// kubeadm's kcm static pod, from the manifest kept aside at adoption.
    Kubeadm,
}

/// The kcm certificate and how it is renewed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    /// Validity of each certificate, in hours (seed: 8760h, one year).
    #[serde(default = "default_validity_hours")]
    #[schemars(range(min = 1, max = 87600))]
    pub validity_hours: u32,
    /// For drills and tests only: a validity in minutes, overriding `validityHours`, as short
    /// as the CSR API allows (10 minutes), to watch renewals happen. Leave unset in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 5256000))]
    pub validity_minutes: Option<u32>,
    /// Renew when this share of the validity (percent) remains.
    #[serde(default = "default_renew_percent")]
    #[schemars(range(min = 5, max = 90))]
    pub renew_when_remaining_percent: u8,
    #[serde(default)]
    pub key_algorithm: KeyAlgorithm,
    /// How the client certificate appears in the kubeconfig.
    #[serde(default)]
    pub kubeconfig_mode: KubeconfigMode,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KeyAlgorithm {
    /// RSA 2048, as the seed's cfssl request.
    #[default]
    #[serde(rename = "RSA2048")]
    Rsa2048,
    /// ECDSA on P-256.
    #[serde(rename = "ECDSAP256")]
    EcdsaP256,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KubeconfigMode {
    /// Client cert and key referenced by path: renewal is a file swap, kcm reloads, no restart.
    #[default]
    Referenced,
    /// Client cert and key embedded, as the seed's `--embed-certs=true`; renewal restarts kcm.
    Embedded,
}

/// The kcm binary, its ports and flags.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KcmSpec {
    /// Path of the kube-controller-manager binary on the masters.
    #[serde(default = "default_binary_path")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("kcm.binaryPath")))]
    pub binary_path: String,
    /// `--secure-port` (seed: 10252).
    #[serde(default = "default_secure_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub secure_port: u16,
    /// `WorkingDirectory=` of the unit (seed: ${K8S_DIR}/kube-controller-manager).
    #[serde(default = "default_working_dir")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("kcm.workingDir")))]
    pub working_dir: String,
    /// `--v` (seed: 2).
    #[serde(default = "default_verbosity")]
    pub verbosity: u8,
    /// Flags added to, or overriding, the seed's set (name without `--`). An empty value
    /// renders `--name=""`.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = MAX_ARGS,
        "additionalProperties" = {"type": "string", "maxLength": MAX_TEXT, "x-kubernetes-validations": [no_control_rule("kcm.extraArgs values")]},
        "x-kubernetes-validations" = [{"rule": "self.all(k, k.matches('^[a-z0-9][a-z0-9-]*$'))", "message": "kcm.extraArgs: flag names are lowercase words with dashes, without leading -- (and without control characters)"}],
    ))]
    pub extra_args: BTreeMap<String, String>,
    /// Flags to leave out (name without `--`): of the seed's set, and of those kubeadm's kcm
    /// manifest runs with, which adoption otherwise refuses to drop.
    #[serde(default)]
    #[schemars(length(max = MAX_ARGS), extend("items" = {"type": "string", "maxLength": MAX_TEXT, "x-kubernetes-validations": [no_control_rule("kcm.removedArgs entries")]}))]
    pub removed_args: Vec<String>,
    /// Seconds a node's kcm has to answer /healthz after a restart before it is rolled back.
    #[serde(default = "default_health_timeout")]
    #[schemars(range(min = 10, max = 900))]
    pub health_timeout_seconds: u32,
}

/// Where the files live on the masters. Defaults: the seed's layout.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPaths {
    /// Cluster CA certificate (`--client-ca-file`, `--root-ca-file`, kubeconfig CA).
    #[serde(default = "default_ca_cert")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.caCert")))]
    pub ca_cert: String,
    /// Cluster CA key (`--cluster-signing-key-file`), also what the operator signs with.
    #[serde(default = "default_ca_key")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.caKey")))]
    pub ca_key: String,
    /// CA for request-header authentication (seed: the cluster CA; kubeadm: front-proxy-ca.crt).
    #[serde(default = "default_ca_cert")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.requestheaderCaCert")))]
    pub requestheader_ca_cert: String,
    /// ServiceAccount token signing key (seed: ca-key.pem; kubeadm: sa.key).
    #[serde(default = "default_ca_key")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.serviceAccountKey")))]
    pub service_account_key: String,
    /// The kcm certificate written by the helper.
    #[serde(default = "default_cert")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.cert")))]
    pub cert: String,
    /// The kcm private key written by the helper (0600).
    #[serde(default = "default_key")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.key")))]
    pub key: String,
    #[serde(default = "default_kubeconfig")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.kubeconfig")))]
    pub kubeconfig: String,
    #[serde(default = "default_unit")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = path_rules("paths.unit")))]
    pub unit: String,
    /// kubeadm's static pod manifest for kcm, moved aside on adoption (empty: none).
    #[serde(default = "default_static_pod")]
    #[schemars(length(max = MAX_TEXT), extend("x-kubernetes-validations" = optional_path_rules("paths.staticPodManifest")))]
    pub static_pod_manifest: String,
}

/// Longest string field the CRD accepts (PATH_MAX); with [`MAX_ARGS`], it bounds what the
/// apiserver estimates its CEL rules to cost.
const MAX_TEXT: u32 = 4096;
/// Most entries in `kcm.extraArgs` and `kcm.removedArgs`.
const MAX_ARGS: u32 = 256;
/// CEL: `self` holds no control character (C0, DEL, C1). In the unit, a newline would start
/// a new setting (`ExecStartPre=`, run as root on every master).
const NO_CONTROL: &str = r"self.matches('^[^\\x00-\\x1f\\x7f-\\x9f]*$')";
/// CEL: `self` is one IPv4 CIDR (octets and prefix in range) or one IPv6 CIDR. Not CEL's
/// `isCIDR`: that library came in Kubernetes 1.31, and a 1.30 apiserver refuses the whole
/// CRD for it.
const CIDR: &str = concat!(
    r"self.matches('^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$')",
    r" || self.matches('^[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){2,7}/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$')"
);
/// CEL: `self` is an absolute path without `..` components.
const ABSOLUTE_NO_DOTDOT: &str = "self.startsWith('/') && !self.contains('/../') && !self.endsWith('/..')";

fn no_control_rule(field: &str) -> serde_json::Value {
    serde_json::json!({"rule": NO_CONTROL, "message": format!("{field} must not contain control characters (newline, carriage return, tab, NUL, ...)")})
}

/// The rules of every path field: absolute, without `..`, without control characters.
fn path_rules(field: &str) -> serde_json::Value {
    serde_json::json!([{"rule": ABSOLUTE_NO_DOTDOT, "message": format!("{field} must be an absolute path without '..'")}, no_control_rule(field)])
}

/// [`path_rules`] for a path that may be empty (none).
fn optional_path_rules(field: &str) -> serde_json::Value {
    let rule = format!("self == '' || ({ABSOLUTE_NO_DOTDOT})");
    serde_json::json!([{"rule": rule, "message": format!("{field} must be empty or an absolute path without '..'")}, no_control_rule(field)])
}

/// The label prefixes a `masterSelector` may use: no kubelet may set them on its own Node
/// (NodeRestriction admission).
pub const MASTER_LABEL_PREFIXES: [&str; 2] = ["node-role.kubernetes.io/", "node-restriction.kubernetes.io/"];

/// Whether `key` is a label a kubelet cannot set on itself ([`MASTER_LABEL_PREFIXES`]).
pub fn master_label_allowed(key: &str) -> bool {
    MASTER_LABEL_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn default_master_selector() -> BTreeMap<String, String> {
    BTreeMap::from([(CONTROL_PLANE_LABEL.to_string(), String::new())])
}
fn default_cluster_name() -> String {
    "kubernetes".into()
}
fn default_service_cidr() -> String {
    "10.254.0.0/16".into()
}
fn default_validity_hours() -> u32 {
    8760
}
fn default_renew_percent() -> u8 {
    20
}
fn default_binary_path() -> String {
    "/opt/k8s/bin/kube-controller-manager".into()
}
fn default_secure_port() -> u16 {
    10252
}
fn default_working_dir() -> String {
    "/data/k8s/k8s/kube-controller-manager".into()
}
fn default_verbosity() -> u8 {
    2
}
fn default_health_timeout() -> u32 {
    120
}
fn default_ca_cert() -> String {
    "/etc/kubernetes/cert/ca.pem".into()
}
fn default_ca_key() -> String {
    "/etc/kubernetes/cert/ca-key.pem".into()
}
fn default_cert() -> String {
    "/etc/kubernetes/cert/kube-controller-manager.pem".into()
}
fn default_key() -> String {
    "/etc/kubernetes/cert/kube-controller-manager-key.pem".into()
}
fn default_kubeconfig() -> String {
    "/etc/kubernetes/kube-controller-manager.kubeconfig".into()
}
fn default_unit() -> String {
    "/etc/systemd/system/kube-controller-manager.service".into()
}
fn default_static_pod() -> String {
    "/etc/kubernetes/manifests/kube-controller-manager.yaml".into()
}

impl CertificateSpec {
    /// The validity of each certificate, in seconds: `validityMinutes` when set, else `validityHours`.
    pub fn validity_secs(&self) -> i64 {
        match self.validity_minutes {
            Some(m) => i64::from(m) * 60,
            None => i64::from(self.validity_hours) * 3600,
        }
    }
}

impl Default for CertificateSpec {
    fn default() -> Self {
        Self {
            validity_minutes: None,
            validity_hours: default_validity_hours(),
            renew_when_remaining_percent: default_renew_percent(),
            key_algorithm: KeyAlgorithm::default(),
            kubeconfig_mode: KubeconfigMode::default(),
        }
    }
}

impl Default for KcmSpec {
    fn default() -> Self {
        Self {
            binary_path: default_binary_path(),
            secure_port: default_secure_port(),
            working_dir: default_working_dir(),
            verbosity: default_verbosity(),
            extra_args: BTreeMap::new(),
            removed_args: Vec::new(),
            health_timeout_seconds: default_health_timeout(),
        }
    }
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            ca_cert: default_ca_cert(),
            ca_key: default_ca_key(),
            requestheader_ca_cert: default_ca_cert(),
            service_account_key: default_ca_key(),
            cert: default_cert(),
            key: default_key(),
            kubeconfig: default_kubeconfig(),
            unit: default_unit(),
            static_pod_manifest: default_static_pod(),
        }
    }
}

impl HostPaths {
    /// Every path the helper reads or writes, with its name, for validation.
    pub fn all(&self) -> [(&'static str, &str); 9] {
        [
            ("caCert", &self.ca_cert),
            ("caKey", &self.ca_key),
            ("requestheaderCaCert", &self.requestheader_ca_cert),
            ("serviceAccountKey", &self.service_account_key),
            ("cert", &self.cert),
            ("key", &self.key),
            ("kubeconfig", &self.kubeconfig),
            ("unit", &self.unit),
            ("staticPodManifest", &self.static_pod_manifest),
        ]
    }
}

/// Observed state, written by the operator (and per-node reports by each helper).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeControllerManagerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Holder of Lease kube-system/kube-controller-manager, as a node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Healthy masters / selected masters, e.g. "3/3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Earliest certificate expiry among the masters (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// When the next certificate renewal is due (RFC 3339): the earliest of the masters' `renewAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_renewal: Option<String>,
    /// One entry per master. At most 100: the bound within which the helpers' admission
    /// policy (manifests/base/admission.yaml, which compares the entries pairwise) is tested.
    #[serde(default)]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub nodes: Vec<NodeStatus>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl KubeControllerManager {
    /// Whether every master has been handed back under the current spec (its HandedBack
    /// condition True, for this generation): what the helpers wait for before they remove
    /// the operator's static pods.
    pub fn handed_back(&self) -> bool {
        let generation = self.metadata.generation;
        self.spec.hand_back.is_some()
            && self
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == HANDED_BACK_CONDITION && c.status == "True" && c.observed_generation == generation))
    }
}

/// One master in the CR's status: the operator's side of its [`KcmNode`] and the report of
/// its helper (an aggregate for `kubectl get kcm -o yaml`; the contract is the KcmNode).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    /// Revision the operator wants on this node (set by the operator when it is the node's turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<String>,
    /// When this master's certificate is renewed (RFC 3339; set by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<String>,
    /// What the master's helper reports (its KcmNode's status).
    #[serde(flatten)]
    pub report: KcmNodeStatus,
    /// The latest renew-now request for this master (unix seconds; the CR's or its KcmNode's
    /// [`RENEW_REQUESTED_ANNOTATION`]). Not part of the status: the operator reads it anew.
    #[serde(skip)]
    #[schemars(skip)]
    pub renew_requested_at: Option<i64>,
}

impl std::ops::Deref for NodeStatus {
    type Target = KcmNodeStatus;
    fn deref(&self) -> &KcmNodeStatus {
        &self.report
    }
}

impl std::ops::DerefMut for NodeStatus {
    fn deref_mut(&mut self) -> &mut KcmNodeStatus {
        &mut self.report
    }
}

impl NodeStatus {
    /// The aggregate entry of one KcmNode.
    pub fn of(node: &KcmNode) -> Self {
        Self {
            name: kube::ResourceExt::name_any(node),
            target_revision: node.spec.target_revision.as_ref().map(Revision::to_string),
            renew_at: node.spec.renew_at.clone(),
            report: node.status.clone().unwrap_or_default(),
            renew_requested_at: None,
        }
    }
}

/// A target revision: the spec's revision (see [`crate::render::spec_revision`]), and what
/// the step does beyond applying it. Written `<spec>`, `<spec>/renew-<serial>` (renew the
/// certificate with that hex serial; a retry after a failed attempt adds
/// `/try-<attempt>-<unix seconds>`, a new target) or `<spec>/repair-<unix seconds>` (reinstall and
/// restart; the time makes a second repair of the same spec a new target) or
/// `<spec>/hand-back-<unix seconds>` (hand the master back to kubeadm's kcm:
/// [`KubeControllerManagerSpec::hand_back`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Revision {
    pub spec: String,
    pub step: Step,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Apply,
    /// `retry`: the attempt (2 and up) after a failed one and when it was given (unix
    /// seconds), written `/try-<attempt>-<at>`; the first attempt has none.
    Renew {
        serial: String,
        retry: Option<(u32, i64)>,
    },
    Repair {
        at: i64,
    },
    /// `at`: when it was given, so a retry after a failed hand back is a new target.
    HandBack {
        at: i64,
    },
}

impl Revision {
    pub fn apply(spec: &str) -> Self {
        Self { spec: spec.into(), step: Step::Apply }
    }
    pub fn renew(spec: &str, serial: &str) -> Self {
        Self { spec: spec.into(), step: Step::Renew { serial: serial.into(), retry: None } }
    }
    /// Attempt `attempt` (2 and up) of a renewal whose earlier attempt failed, given at `at`.
    pub fn renew_retry(spec: &str, serial: &str, attempt: u32, at: i64) -> Self {
        Self { spec: spec.into(), step: Step::Renew { serial: serial.into(), retry: Some((attempt, at)) } }
    }
    /// A renewal's attempt (1 for the first) and when it was given (`None` for the first).
    pub fn renewal_attempt(&self) -> Option<(u32, Option<i64>)> {
        match &self.step {
            Step::Renew { retry: Some((n, at)), .. } => Some((*n, Some(*at))),
            Step::Renew { retry: None, .. } => Some((1, None)),
            _ => None,
        }
    }
    pub fn repair(spec: &str, at: i64) -> Self {
        Self { spec: spec.into(), step: Step::Repair { at } }
    }
    pub fn hand_back(spec: &str, at: i64) -> Self {
        Self { spec: spec.into(), step: Step::HandBack { at } }
    }
    /// When a hand back was given (unix seconds).
    pub fn hand_back_at(&self) -> Option<i64> {
        match self.step {
            Step::HandBack { at } => Some(at),
            _ => None,
        }
    }
    /// The serial (hex) of the certificate a renewal replaces.
    pub fn renews(&self) -> Option<&str> {
        match &self.step {
            Step::Renew { serial, .. } => Some(serial),
            _ => None,
        }
    }
    /// When a repair was given (unix seconds).
    pub fn repair_at(&self) -> Option<i64> {
        match self.step {
            Step::Repair { at } => Some(at),
            _ => None,
        }
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Step::Apply => write!(f, "{}", self.spec),
            Step::Renew { serial, retry: None } => write!(f, "{}/renew-{serial}", self.spec),
            Step::Renew { serial, retry: Some((n, at)) } => write!(f, "{}/renew-{serial}/try-{n}-{at}", self.spec),
            Step::Repair { at } => write!(f, "{}/repair-{at}", self.spec),
            Step::HandBack { at } => write!(f, "{}/hand-back-{at}", self.spec),
        }
    }
}

impl std::str::FromStr for Revision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("revision {s:?}: expected <spec>, <spec>/renew-<serial>[/try-<attempt>-<unix seconds>], <spec>/repair-<unix seconds> or <spec>/hand-back-<unix seconds>")
        };
        let hex = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_hexdigit());
        let (spec, step) = match s.split_once('/') {
            None => (s, Step::Apply),
            Some((spec, rest)) if rest.starts_with("hand-back-") => (spec, Step::HandBack { at: rest["hand-back-".len()..].parse().map_err(|_| bad())? }),
            Some((spec, rest)) => match (rest.strip_prefix("renew-"), rest.strip_prefix("repair-")) {
                (Some(serial), _) if hex(serial) => (spec, Step::Renew { serial: serial.into(), retry: None }),
                (Some(renew), _) => {
                    let (serial, retry) = renew.split_once("/try-").ok_or_else(bad)?;
                    let (n, at) = retry.split_once('-').ok_or_else(bad)?;
                    let (n, at) = (n.parse::<u32>().map_err(|_| bad())?, at.parse::<i64>().map_err(|_| bad())?);
                    if !hex(serial) || n < 2 {
                        return Err(bad());
                    }
                    (spec, Step::Renew { serial: serial.into(), retry: Some((n, at)) })
                }
                (_, Some(at)) => (spec, Step::Repair { at: at.parse().map_err(|_| bad())? }),
                _ => return Err(bad()),
            },
        };
        if spec.is_empty() || !spec.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err(bad());
        }
        Ok(Self { spec: spec.into(), step })
    }
}

impl Serialize for Revision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Revision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Revision {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Revision".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "maxLength": 256, "pattern": "^[A-Za-z0-9.-]+(/renew-[0-9A-Fa-f]+(/try-[0-9]+-[0-9]+)?|/repair-[0-9]+|/hand-back-[0-9]+)?$"})
    }
    fn inline_schema() -> bool {
        true
    }
}

/// One master's slice of the rollout: the contract between the operator and that master's
/// helper. Cluster-scoped, named after the node, owned by the KubeControllerManager. The
/// operator writes the spec (what to do), only that master's helper writes the status
/// (admission enforces both: manifests/base/admission.yaml).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kcm.kcm-operator.io",
    version = "v1alpha1",
    kind = "KcmNode",
    plural = "kcmnodes",
    status = "KcmNodeStatus",
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.appliedRevision"}"#,
    printcolumn = r#"{"name":"Serial","type":"string","jsonPath":".status.certSerial"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.notAfter"}"#,
    printcolumn = r#"{"name":"Renews","type":"string","jsonPath":".spec.renewAt"}"#,
    printcolumn = r#"{"name":"Healthy","type":"boolean","jsonPath":".status.healthy"}"#,
    printcolumn = r#"{"name":"KCM","type":"string","jsonPath":".status.kcmVersion"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRevision","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KcmNodeSpec {
    /// The revision the operator wants on this master (set when it is the master's turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<Revision>,
    /// When this master's certificate is renewed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<String>,
}

impl KcmNode {
    /// The revision this master's helper is working on: its target, while neither applied
    /// nor failed.
    pub fn pending(&self) -> Option<&Revision> {
        let target = self.spec.target_revision.as_ref()?;
        let st = self.status.as_ref();
        let is = |r: Option<&String>| r.is_some_and(|r| r.parse::<Revision>().is_ok_and(|r| &r == target));
        (!is(st.and_then(|s| s.applied_revision.as_ref())) && !is(st.and_then(|s| s.failed_revision.as_ref()))).then_some(target)
    }
}

/// What the helper on one master reports about it (only that master's helper writes it).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KcmNodeStatus {
    /// Revision the helper last installed successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<String>,
    /// Revision the helper tried and rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// Hex serial of the installed certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// notAfter of the installed certificate (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// notBefore of the installed certificate (RFC 3339): issued 5 minutes later (the signer
    /// backdates it for clock skew); what a renew-now request is compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// The master's kernel hostname, which kcm's Lease identity begins with (it may differ
    /// from the Node name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// kube-controller-manager version found on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kcm_version: Option<String>,
    #[serde(default)]
    pub unit_active: bool,
    #[serde(default)]
    pub healthy: bool,
    /// Flags dropped or translated for this node's kcm version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the helper last looked at this master (RFC 3339). Absent: no helper reports
    /// (it stopped); older than [`STALE_AFTER_SECS`]: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<String>,
    /// SHA-256 (hex) of each file the helper wrote (key, cert, kubeconfig, unit), by host path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub file_hashes: BTreeMap<String, String>,
    /// What differs on disk from what the helper wrote, one line each (a missing or changed
    /// file, an expired certificate). Non-empty: the master gets a repair step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    /// Why the operator's static pod is not placed on this master (no static pod path, CA
    /// key missing, ...); absent when it is placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_pod_error: Option<String>,
}

impl KcmNodeStatus {
    /// The revision last applied, when it parses.
    pub fn applied(&self) -> Option<Revision> {
        self.applied_revision.as_deref()?.parse().ok()
    }
    /// Whether the last applied step handed the master back to kubeadm's kcm.
    pub fn handed_back(&self) -> bool {
        self.applied().is_some_and(|r| r.hand_back_at().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_round_trip() {
        for (text, rev) in [
            ("a1b2c3d4e5f6", Revision::apply("a1b2c3d4e5f6")),
            ("a1b2c3d4e5f6/renew-0A1b", Revision::renew("a1b2c3d4e5f6", "0A1b")),
            ("a1b2c3d4e5f6/repair-1800000000", Revision::repair("a1b2c3d4e5f6", 1_800_000_000)),
            ("a1b2c3d4e5f6/renew-0A1b/try-2-1800000000", Revision::renew_retry("a1b2c3d4e5f6", "0A1b", 2, 1_800_000_000)),
            ("a1b2c3d4e5f6/hand-back-1800000000", Revision::hand_back("a1b2c3d4e5f6", 1_800_000_000)),
        ] {
            assert_eq!(text.parse::<Revision>().unwrap(), rev);
            assert_eq!(rev.to_string(), text);
            assert_eq!(serde_json::to_value(&rev).unwrap(), serde_json::json!(text));
        }
        assert_eq!("abc/renew-ff".parse::<Revision>().unwrap().renews(), Some("ff"));
        assert_eq!("abc/repair-12".parse::<Revision>().unwrap().repair_at(), Some(12));
        assert_eq!("abc/renew-ff/try-3-12".parse::<Revision>().unwrap().renews(), Some("ff"), "a retry renews the same certificate");
        assert_eq!("abc/renew-ff/try-3-12".parse::<Revision>().unwrap().renewal_attempt(), Some((3, Some(12))));
        assert_eq!("abc/renew-ff".parse::<Revision>().unwrap().renewal_attempt(), Some((1, None)));
        for bad in [
            "",
            "abc/",
            "abc/renew-",
            "abc/renew-xyz",
            "abc/repair-soon",
            "abc/other-1",
            "a b",
            "abc/renew-ff/x",
            "x\ny",
            "abc/renew-ff/try-1-12",
            "abc/renew-ff/try-2",
            "abc/renew-/try-2-12",
            "abc/renew-ff/try-2-12/x",
            "abc/hand-back-",
            "abc/hand-back-soon",
            "abc/hand-back-12/x",
            "abc/hand-back-hand-back-12",
        ] {
            assert!(bad.parse::<Revision>().is_err(), "{bad:?} parses");
        }
    }

    #[test]
    fn pending_is_the_target_while_neither_applied_nor_failed() {
        let mut n = KcmNode::new("m1", KcmNodeSpec { target_revision: Some(Revision::apply("r2")), renew_at: None });
        assert_eq!(n.pending(), Some(&Revision::apply("r2")));
        n.status = Some(KcmNodeStatus { applied_revision: Some("r1".into()), ..Default::default() });
        assert!(n.pending().is_some());
        n.status = Some(KcmNodeStatus { applied_revision: Some("r2".into()), ..Default::default() });
        assert_eq!(n.pending(), None);
        n.status = Some(KcmNodeStatus { failed_revision: Some("r2".into()), ..Default::default() });
        assert_eq!(n.pending(), None);
        n.spec.target_revision = None;
        assert_eq!(n.pending(), None);
    }

    #[test]
    fn node_status_aggregates_a_kcm_node() {
        let mut n = KcmNode::new("m1", KcmNodeSpec { target_revision: Some(Revision::renew("r1", "ab")), renew_at: Some("2027-01-01T00:00:00Z".into()) });
        n.status = Some(KcmNodeStatus { healthy: true, cert_serial: Some("ab".into()), ..Default::default() });
        let agg = NodeStatus::of(&n);
        assert_eq!((agg.name.as_str(), agg.target_revision.as_deref(), agg.healthy), ("m1", Some("r1/renew-ab"), true));
        let flat = serde_json::to_value(&agg).unwrap();
        assert_eq!(flat["certSerial"], "ab", "the report is flattened into the entry: {flat}");
    }
}
