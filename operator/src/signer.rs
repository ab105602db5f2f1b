//! The signer for [`SIGNER_NAME`]: which CSRs are approved (every rule must hold; the
//! first that fails names the denial), and signing with the cluster CA. Pure: the caller
//! fetches the CSR, the bound pod, the node, its step under way and the CA.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};
use x509_parser::public_key::PublicKey;

use crate::api::{KeyAlgorithm, KubeControllerManagerSpec, KCM_USER, NODE_NAME_EXTRA, POD_NAME_EXTRA, POD_UID_EXTRA, SIGNER_NAME};
use crate::pki::{cidr_contains, ip_from_bytes, pem_block, CertInfo, NodeIdentity, PkiError, Sans};

/// A CSR older than this (seconds) is denied: a helper asks for its certificate during its
/// step and waits for it, so an old pending request is stale or someone else's.
pub const MAX_CSR_AGE_SECS: i64 = 300;

/// The rules a CSR must pass, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Requested by the node-helper's ServiceAccount.
    Requestor,
    /// The requestor's token is bound to a pod (pod-name, pod-uid and node-name extras), and
    /// that pod is a helper pod on that node: owned by the helper DaemonSet, or the
    /// operator's rescue pod for that node.
    HelperPod,
    /// The pod the token is bound to still exists (same uid), is not being deleted and has
    /// not finished.
    PodLive,
    /// The CSR names the node its requestor's pod runs on.
    NodeBinding,
    /// That node exists and is a master.
    NodeIsMaster,
    /// The CSR was created at most [`Policy::max_age_secs`] ago.
    Fresh,
    /// The node has a step under way (a target revision its helper has neither applied nor
    /// failed), and the CSR is for that revision.
    StepPending,
    /// No certificate was issued to this node for that revision yet.
    OnePerStep,
    /// The request is one PEM CSR whose signature verifies.
    RequestParses,
    /// Key type and size are the spec's.
    KeyAlgorithm,
    /// Subject is exactly CN=O=system:kube-controller-manager.
    Subject,
    /// SANs are exactly the node's InternalIPs, 127.0.0.1, its name and localhost.
    SubjectAltNames,
    /// No IP SAN lies in the cluster's service range (the kubelet writes the node's
    /// addresses: it must not get a serving certificate for, say, the `kubernetes` Service IP).
    ServiceRange,
    /// Usages are exactly those kcm needs.
    Usages,
}

impl Rule {
    /// Every rule, in the order they are checked (for metrics that list each reason).
    pub const ALL: [Rule; 14] = [
        Rule::Requestor,
        Rule::HelperPod,
        Rule::PodLive,
        Rule::NodeBinding,
        Rule::NodeIsMaster,
        Rule::Fresh,
        Rule::StepPending,
        Rule::OnePerStep,
        Rule::RequestParses,
        Rule::KeyAlgorithm,
        Rule::Subject,
        Rule::SubjectAltNames,
        Rule::ServiceRange,
        Rule::Usages,
    ];

    /// PascalCase reason for the CSR's Denied condition.
    pub fn reason(self) -> &'static str {
        match self {
            Rule::Requestor => "RequestorNotNodeHelper",
            Rule::HelperPod => "RequestorNotHelperPod",
            Rule::PodLive => "RequestorPodGone",
            Rule::NodeBinding => "RequestorNotBoundToNode",
            Rule::NodeIsMaster => "NodeNotMaster",
            Rule::Fresh => "RequestTooOld",
            Rule::StepPending => "NoPendingStep",
            Rule::OnePerStep => "AlreadyIssuedForStep",
            Rule::RequestParses => "InvalidRequest",
            Rule::KeyAlgorithm => "KeyAlgorithmNotAllowed",
            Rule::Subject => "SubjectMismatch",
            Rule::SubjectAltNames => "SubjectAltNamesMismatch",
            Rule::ServiceRange => "SubjectAltNameInServiceRange",
            Rule::Usages => "UsagesMismatch",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub rule: Rule,
    pub message: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule.reason(), self.message)
    }
}

fn deny<T>(rule: Rule, message: impl Into<String>) -> Result<T, Denial> {
    Err(Denial { rule, message: message.into() })
}

/// The facts of one CSR object the rules look at.
#[derive(Clone, Debug)]
pub struct CsrFacts<'a> {
    pub username: &'a str,
    pub extra: &'a BTreeMap<String, Vec<String>>,
    pub usages: &'a [String],
    /// `spec.request`: PEM bytes.
    pub request: &'a [u8],
    /// The node the CSR says it is for (its [`crate::api::CSR_NODE_LABEL`]).
    pub node_label: Option<&'a str>,
    /// The revision the CSR says it is for (its [`crate::api::CSR_REVISION_ANNOTATION`]).
    pub revision: Option<&'a str>,
    /// Seconds since the CSR was created.
    pub age_secs: i64,
}

impl CsrFacts<'_> {
    /// The single value of a token extra, if there is exactly one.
    pub fn single_extra(&self, key: &str) -> Option<&str> {
        match self.extra.get(key).map(Vec::as_slice) {
            Some([one]) => Some(one.as_str()),
            _ => None,
        }
    }
}

/// What the signer knows about a node the CSR may be for.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub identity: NodeIdentity,
    pub is_master: bool,
}

/// What the signer knows about the pod the requestor's token is bound to.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub uid: String,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// Not being deleted, and not Succeeded or Failed.
    pub live: bool,
    /// Owned (controller reference) by the helper DaemonSet with its current uid, or the
    /// operator's rescue pod for its node. `Err`: why it is not.
    pub helper: Result<(), String>,
}

/// What the caller fetched for one CSR: the bound pod, the node, the node's step under way
/// and the CSRs already issued for it.
#[derive(Clone, Debug, Default)]
pub struct Lookups {
    /// The pod named by the token's pod-name extra (None: it does not exist).
    pub pod: Option<PodFacts>,
    /// The node the token is bound to (None: it does not exist or has no InternalIP).
    pub node: Option<NodeFacts>,
    /// The node's target revision while its helper has neither applied nor failed it.
    pub pending_revision: Option<String>,
    /// Names of other CSRs of this signer already issued to this node for that revision.
    pub issued_for_revision: Vec<String>,
}

/// The signer's settings.
#[derive(Clone, Debug)]
pub struct Policy {
    /// `system:serviceaccount:<namespace>:<name>` of the node-helper.
    pub helper_username: String,
    pub key_algorithm: KeyAlgorithm,
    /// `serviceClusterIpRange` of the spec.
    pub service_cidr: String,
    /// CSRs older than this (seconds) are denied; [`MAX_CSR_AGE_SECS`] unless a test says otherwise.
    pub max_age_secs: i64,
}

/// A CSR that passed every rule.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub node: String,
    pub sans: Sans,
    pub usages: Vec<String>,
    csr_der: Vec<u8>,
}

/// Usages kcm needs: client auth to the apiserver, server auth on its secure port.
pub fn expected_usages(alg: KeyAlgorithm) -> &'static [&'static str] {
    match alg {
        KeyAlgorithm::Rsa2048 => &["digital signature", "key encipherment", "client auth", "server auth"],
        KeyAlgorithm::EcdsaP256 => &["digital signature", "client auth", "server auth"],
    }
}

/// The requestor's rules: who asks, from which pod, for which node, for which step.
fn check_requestor(csr: &CsrFacts<'_>, found: &Lookups, policy: &Policy) -> Result<NodeFacts, Denial> {
    if csr.username != policy.helper_username {
        return deny(Rule::Requestor, format!("requested by {:?}, only {:?} may request", csr.username, policy.helper_username));
    }
    let (Some(pod_name), Some(pod_uid), Some(bound)) = (csr.single_extra(POD_NAME_EXTRA), csr.single_extra(POD_UID_EXTRA), csr.single_extra(NODE_NAME_EXTRA))
    else {
        return deny(
            Rule::HelperPod,
            format!("the requestor's token is not bound to a pod on a node (needs one {POD_NAME_EXTRA}, {POD_UID_EXTRA} and {NODE_NAME_EXTRA})"),
        );
    };
    let Some(pod) = found.pod.as_ref().filter(|p| p.uid == pod_uid) else {
        return deny(Rule::PodLive, format!("the pod {pod_name:?} (uid {pod_uid}) the requestor's token is bound to no longer exists"));
    };
    if !pod.live {
        return deny(Rule::PodLive, format!("the pod {pod_name:?} the requestor's token is bound to is being deleted or has finished"));
    }
    if let Err(why) = &pod.helper {
        return deny(Rule::HelperPod, format!("the pod {pod_name:?} the requestor's token is bound to is not a node-helper pod: {why}"));
    }
    if pod.node.as_deref() != Some(bound) {
        return deny(Rule::HelperPod, format!("the pod {pod_name:?} runs on {:?}, but the token says {bound:?}", pod.node));
    }
    match csr.node_label {
        Some(label) if label == bound => {}
        Some(label) => return deny(Rule::NodeBinding, format!("CSR is for node {label:?} but was requested from a pod on node {bound:?}")),
        None => return deny(Rule::NodeBinding, "CSR does not name its node (label missing)"),
    }
    let Some(node) = found.node.clone().filter(|n| n.identity.name == bound) else {
        return deny(Rule::NodeIsMaster, format!("node {bound:?} does not exist or has no InternalIP address"));
    };
    if !node.is_master {
        return deny(Rule::NodeIsMaster, format!("node {bound:?} is not selected as a master"));
    }
    if csr.age_secs > policy.max_age_secs {
        return deny(Rule::Fresh, format!("created {}s ago; requests older than {}s are not signed", csr.age_secs, policy.max_age_secs));
    }
    let Some(pending) = found.pending_revision.as_deref() else {
        return deny(Rule::StepPending, format!("node {bound:?} has no step under way: the operator did not ask it for a certificate"));
    };
    if csr.revision != Some(pending) {
        return deny(Rule::StepPending, format!("CSR is for revision {:?}, but the step under way on {bound:?} is {pending:?}", csr.revision.unwrap_or("")));
    }
    if !found.issued_for_revision.is_empty() {
        return deny(
            Rule::OnePerStep,
            format!(
                "node {bound:?} already got a certificate for revision {pending:?} (CSR {}); a new one needs a new step",
                found.issued_for_revision.join(", ")
            ),
        );
    }
    Ok(node)
}

/// Checks every rule against what the caller looked up.
pub fn check(csr: &CsrFacts<'_>, found: &Lookups, policy: &Policy) -> Result<Accepted, Denial> {
    let node = check_requestor(csr, found, policy)?;
    check_request(csr.request, csr.usages, &node.identity, policy.key_algorithm, &policy.service_cidr)
}

/// The rules on the request itself, [`Rule::RequestParses`] to [`Rule::Usages`]: a PKCS#10
/// `request` (PEM) with `usages` for the master `node`. Shared by the signer and by the
/// day-0 bootstrap, which issues a master's first certificate with the CA on the host: the
/// same key, subject, SAN, range and usage rules, whoever signs.
pub fn check_request(request: &[u8], usages: &[String], node: &NodeIdentity, key_algorithm: KeyAlgorithm, service_cidr: &str) -> Result<Accepted, Denial> {
    let der = pem_block(request, "CERTIFICATE REQUEST", "request").map_err(|e| Denial { rule: Rule::RequestParses, message: e.to_string() })?;
    let (rest, req) =
        X509CertificationRequest::from_der(&der).map_err(|e| Denial { rule: Rule::RequestParses, message: format!("not a PKCS#10 request: {e}") })?;
    if !rest.is_empty() {
        return deny(Rule::RequestParses, "trailing bytes after the request");
    }
    let info = &req.certification_request_info;
    // The key before the signature: a key we refuse (say RSA-1024) may not even verify.
    let key = match info.subject_pki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA-{}", rsa.key_size()),
        Ok(PublicKey::EC(point)) => {
            let curve = info.subject_pki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => format!("ECDSA-P256/{}", point.key_size()),
                other => format!("ECDSA-{}", other.unwrap_or("unknown-curve")),
            }
        }
        Ok(other) => format!("{other:?}").split('(').next().unwrap_or("unknown").to_string(),
        Err(e) => return deny(Rule::RequestParses, format!("cannot read public key: {e}")),
    };
    let allowed = match key_algorithm {
        KeyAlgorithm::Rsa2048 => "RSA-2048",
        KeyAlgorithm::EcdsaP256 => "ECDSA-P256/256",
    };
    if key != allowed {
        return deny(Rule::KeyAlgorithm, format!("key must be {allowed}; got {key}"));
    }
    if req.verify_signature().is_err() {
        return deny(Rule::RequestParses, "the request's signature does not verify");
    }

    let mut cn = Vec::new();
    let mut org = Vec::new();
    let mut other = Vec::new();
    for attr in info.subject.iter_attributes() {
        let value = attr.as_str().unwrap_or("<non-string>").to_string();
        match attr.attr_type().to_id_string().as_str() {
            "2.5.4.3" => cn.push(value),
            "2.5.4.10" => org.push(value),
            oid => other.push(format!("{oid}={value}")),
        }
    }
    if cn != [KCM_USER] || org != [KCM_USER] || !other.is_empty() {
        return deny(Rule::Subject, format!("subject must be exactly CN={KCM_USER}, O={KCM_USER}; got CN={cn:?} O={org:?} other={other:?}"));
    }

    let mut sans = Sans::default();
    let mut foreign = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    match n {
                        GeneralName::DNSName(d) => {
                            sans.dns.insert(d.to_string());
                        }
                        GeneralName::IPAddress(b) => match ip_from_bytes(b) {
                            Some(ip) => {
                                sans.ips.insert(ip);
                            }
                            None => foreign.push("malformed IP".to_string()),
                        },
                        other => foreign.push(format!("{other}")),
                    }
                }
            }
            ParsedExtension::KeyUsage(_) | ParsedExtension::ExtendedKeyUsage(_) => {}
            other => return deny(Rule::RequestParses, format!("unsupported requested extension {other:?}")),
        }
    }
    let want = node.expected_sans();
    if !foreign.is_empty() {
        return deny(Rule::SubjectAltNames, format!("only DNS and IP SANs are allowed; got {foreign:?}"));
    }
    if sans != want {
        return deny(Rule::SubjectAltNames, format!("SANs must be exactly DNS {:?} IP {:?}; got DNS {:?} IP {:?}", want.dns, want.ips, sans.dns, sans.ips));
    }
    let inside: Vec<String> = sans.ips.iter().filter(|ip| cidr_contains(service_cidr, **ip)).map(|ip| ip.to_string()).collect();
    if !inside.is_empty() {
        return deny(Rule::ServiceRange, format!("IP SAN(s) {inside:?} lie in the service range {}", service_cidr));
    }

    let wanted: BTreeSet<&str> = expected_usages(key_algorithm).iter().copied().collect();
    let got: BTreeSet<&str> = usages.iter().map(String::as_str).collect();
    if got != wanted || got.len() != usages.len() {
        return deny(Rule::Usages, format!("usages must be exactly {wanted:?}; got {:?}", usages));
    }

    Ok(Accepted { node: node.name.clone(), sans, usages: usages.to_vec(), csr_der: der })
}

/// The cluster CA, as read from the host.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub info: CertInfo,
}

impl Ca {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = crate::pki::key_from_pem(key_pem, "CA key")?;
        // A bundle (old and new CA during a rotation) signs with the certificate of its key.
        let (cert_pem, info) = crate::pki::signing_cert(cert_pem, &key, "CA certificate")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::Rcgen { what: "CA certificate".into(), source })?;
        Ok(Self { issuer, info })
    }
}

/// Signs an accepted request: validity `min(validity, expirationSeconds)`, never past the
/// CA's own notAfter; backdated 5 minutes for clock skew. Returns PEM.
pub fn sign(accepted: &Accepted, ca: &Ca, now: i64, validity_secs: i64, expiration_seconds: Option<i32>) -> Result<String, PkiError> {
    let err = |source| PkiError::Rcgen { what: "signing".into(), source };
    let csr = CertificateSigningRequestParams::from_der(&accepted.csr_der.as_slice().into()).map_err(err)?;
    let lifetime = expiration_seconds.map(i64::from).map_or(validity_secs, |e| e.min(validity_secs));
    let not_after = (now + lifetime).min(ca.info.not_after);
    let ts = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| PkiError::Parse { what: "time".into(), reason: e.to_string() });

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, KCM_USER);
    dn.push(DnType::OrganizationName, KCM_USER);
    params.distinguished_name = dn;
    params.not_before = ts(now - crate::identity::BACKDATE_SECS)?;
    params.not_after = ts(not_after)?;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| PkiError::Parse { what: "serial".into(), reason: "no randomness".into() })?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    for d in &accepted.sans.dns {
        params.subject_alt_names.push(SanType::DnsName(d.clone().try_into().map_err(err)?));
    }
    for ip in &accepted.sans.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    for u in &accepted.usages {
        match u.as_str() {
            "digital signature" => params.key_usages.push(KeyUsagePurpose::DigitalSignature),
            "key encipherment" => params.key_usages.push(KeyUsagePurpose::KeyEncipherment),
            "client auth" => params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth),
            "server auth" => params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth),
            _ => {}
        }
    }
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&csr.public_key, &ca.issuer).map_err(err)?;
    Ok(cert.pem())
}

/// Why [`issue_locally`] issued nothing.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the signer's rules refuse the request: {0}")]
    Denied(Denial),
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// A master's first key and certificate, issued with the cluster CA `ca` where it is (day 0:
/// `node-helper bootstrap` on the master, before any kcm or operator runs) exactly as the
/// signer issues one to a helper: a new key of the spec's algorithm, a request for `node`,
/// every rule of [`check_request`] on it, then [`sign`] with the spec's validity (as if
/// asked for in `expirationSeconds`). Returns (certificate, key) as PEM.
pub fn issue_locally(spec: &KubeControllerManagerSpec, node: &NodeIdentity, ca: &Ca, now: i64) -> Result<(String, String), IssueError> {
    let alg = spec.certificate.key_algorithm;
    let key = crate::pki::generate_key(alg)?;
    let request = crate::pki::make_csr(&key, &node.expected_sans())?;
    let usages: Vec<String> = expected_usages(alg).iter().map(|u| u.to_string()).collect();
    let accepted = check_request(request.as_bytes(), &usages, node, alg, &spec.service_cluster_ip_range).map_err(IssueError::Denied)?;
    let validity = spec.certificate.validity_secs();
    Ok((sign(&accepted, ca, now, validity, i32::try_from(validity).ok())?, key.serialize_pem()))
}

/// Whether a signer name is ours: we never touch any other.
pub fn is_ours(signer_name: &str) -> bool {
    signer_name == SIGNER_NAME
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{generate_key, make_csr, tests::identity};

    const HELPER: &str = "system:serviceaccount:kcm-operator:kcm-node-helper";

    fn policy(alg: KeyAlgorithm) -> Policy {
        Policy { helper_username: HELPER.into(), key_algorithm: alg, service_cidr: "10.254.0.0/16".into(), max_age_secs: MAX_CSR_AGE_SECS }
    }

    fn master() -> NodeFacts {
        NodeFacts { identity: identity(), is_master: true }
    }

    fn helper_pod() -> PodFacts {
        PodFacts { uid: "uid-1".into(), node: Some("k8smaster01".into()), live: true, helper: Ok(()) }
    }

    struct Case {
        username: String,
        extra: BTreeMap<String, Vec<String>>,
        usages: Vec<String>,
        request: Vec<u8>,
        label: Option<String>,
        revision: Option<String>,
        age_secs: i64,
        found: Lookups,
    }

    impl Case {
        /// A request that passes every rule for `alg`.
        fn good(alg: KeyAlgorithm) -> Self {
            let key = generate_key(alg).unwrap();
            Self::with_csr(alg, make_csr(&key, &identity().expected_sans()).unwrap())
        }
        fn with_csr(alg: KeyAlgorithm, pem: String) -> Self {
            let one = |v: &str| vec![v.to_string()];
            Case {
                username: HELPER.into(),
                extra: BTreeMap::from([
                    (NODE_NAME_EXTRA.to_string(), one("k8smaster01")),
                    (POD_NAME_EXTRA.to_string(), one("kcm-node-helper-abcde")),
                    (POD_UID_EXTRA.to_string(), one("uid-1")),
                ]),
                usages: expected_usages(alg).iter().map(|s| s.to_string()).collect(),
                request: pem.into_bytes(),
                label: Some("k8smaster01".into()),
                revision: Some("rev1".into()),
                age_secs: 2,
                found: Lookups { pod: Some(helper_pod()), node: Some(master()), pending_revision: Some("rev1".into()), issued_for_revision: vec![] },
            }
        }
        fn check(&self, alg: KeyAlgorithm) -> Result<Accepted, Denial> {
            let facts = CsrFacts {
                username: &self.username,
                extra: &self.extra,
                usages: &self.usages,
                request: &self.request,
                node_label: self.label.as_deref(),
                revision: self.revision.as_deref(),
                age_secs: self.age_secs,
            };
            check(&facts, &self.found, &policy(alg))
        }
    }

    fn denied(case: &Case, alg: KeyAlgorithm, rule: Rule) -> String {
        match case.check(alg) {
            Err(d) => {
                assert_eq!(d.rule, rule, "{d}");
                d.message
            }
            Ok(_) => panic!("expected {rule:?} denial, got approval"),
        }
    }

    fn csr_with(sans: Vec<SanType>, dn: &[(DnType, &str)], alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::default();
        let mut d = DistinguishedName::new();
        for (t, v) in dn {
            d.push(t.clone(), *v);
        }
        p.distinguished_name = d;
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn good_sans() -> Vec<SanType> {
        vec![
            SanType::DnsName("k8smaster01".try_into().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::IpAddress("172.24.8.71".parse().unwrap()),
        ]
    }
    /// `openssl req -new -newkey rsa:1024` with the good subject and SANs (rcgen makes no
    /// RSA-1024 keys).
    const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIB0jCCATsCAQAwUjEnMCUGA1UEAwwec3lzdGVtOmt1YmUtY29udHJvbGxlci1t
YW5hZ2VyMScwJQYDVQQKDB5zeXN0ZW06a3ViZS1jb250cm9sbGVyLW1hbmFnZXIw
gZ8wDQYJKoZIhvcNAQEBBQADgY0AMIGJAoGBAKj8GZuBSYiNQcC0ftN6osVvUxjz
NSR0+K2KC/o1kPCdgCRA0pKS7pzp4geXu4TQ+hMwAQvCGDTNX1EkpnYN/KTVEhNS
/EhYnjtc+KzU5NbvU1VPCTkWZND3UXiBW5i0M15tFuqmSEPYdxjWbyfv3TPByzIv
+w52CAyfOYpOIFqLAgMBAAGgQDA+BgkqhkiG9w0BCQ4xMTAvMC0GA1UdEQQmMCSC
C2s4c21hc3RlcjAxgglsb2NhbGhvc3SHBH8AAAGHBKwYCEcwDQYJKoZIhvcNAQEL
BQADgYEAMPgUrqDDTK5MLmZaKZxspaGbkupfdlhVe2dfP/Mmqwy1xUgd8YHJFzkD
0ZTPf4lvR0Jdepu/E1Txt/xEYDocESyaUv/pu49ca1SsyhxF1Z5/Zy0dKwE0fXvV
dK4FTmIdaV6yOlLhA+/52MMrUPZ06lC3QDo03leA74QWd1ss4+k=
-----END CERTIFICATE REQUEST-----
";
    const KCM_DN: &[(DnType, &str)] = &[(DnType::CommonName, KCM_USER), (DnType::OrganizationName, KCM_USER)];

    #[test]
    fn good_requests_pass_for_both_algorithms() {
        for alg in [KeyAlgorithm::Rsa2048, KeyAlgorithm::EcdsaP256] {
            let a = Case::good(alg).check(alg).unwrap();
            assert_eq!(a.node, "k8smaster01");
        }
    }

    #[test]
    fn every_rule_has_its_own_reason() {
        let all = Rule::ALL;
        let reasons: BTreeSet<&str> = all.iter().map(|r| r.reason()).collect();
        assert_eq!(reasons.len(), all.len());
        assert!(reasons.iter().all(|r| r.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && r.chars().all(|c| c.is_ascii_alphanumeric())));
    }

    #[test]
    fn rule_requestor() {
        let mut c = Case::good(KeyAlgorithm::EcdsaP256);
        c.username = "system:serviceaccount:default:default".into();
        denied(&c, KeyAlgorithm::EcdsaP256, Rule::Requestor);
    }

    #[test]
    fn rule_helper_pod() {
        let alg = KeyAlgorithm::EcdsaP256;
        // A token bound to a Secret (or not bound at all): no pod extras.
        for key in [POD_NAME_EXTRA, POD_UID_EXTRA, NODE_NAME_EXTRA] {
            let mut c = Case::good(alg);
            c.extra.remove(key);
            denied(&c, alg, Rule::HelperPod);
        }
        // Bound to a pod that is not a helper (an admin minted it for some other pod).
        let mut c = Case::good(alg);
        c.found.pod.as_mut().unwrap().helper = Err("not owned by DaemonSet kcm-node-helper".into());
        assert!(denied(&c, alg, Rule::HelperPod).contains("not owned"));
        // The pod runs on another node than the token says.
        let mut c = Case::good(alg);
        c.found.pod.as_mut().unwrap().node = Some("k8smaster02".into());
        denied(&c, alg, Rule::HelperPod);
    }

    #[test]
    fn rule_pod_live() {
        let alg = KeyAlgorithm::EcdsaP256;
        let mut c = Case::good(alg);
        c.found.pod = None;
        denied(&c, alg, Rule::PodLive);
        // Same name, new pod: the token's uid is the deleted one's.
        let mut c = Case::good(alg);
        c.found.pod.as_mut().unwrap().uid = "uid-2".into();
        denied(&c, alg, Rule::PodLive);
        let mut c = Case::good(alg);
        c.found.pod.as_mut().unwrap().live = false;
        denied(&c, alg, Rule::PodLive);
    }

    #[test]
    fn rule_node_binding() {
        let alg = KeyAlgorithm::EcdsaP256;
        let mut c = Case::good(alg);
        c.label = Some("k8smaster02".into());
        assert!(denied(&c, alg, Rule::NodeBinding).contains("k8smaster02"));
        let mut c = Case::good(alg);
        c.label = None;
        denied(&c, alg, Rule::NodeBinding);
    }

    #[test]
    fn rule_node_is_master() {
        let alg = KeyAlgorithm::EcdsaP256;
        let mut c = Case::good(alg);
        c.found.node.as_mut().unwrap().is_master = false;
        denied(&c, alg, Rule::NodeIsMaster);
        c.found.node = None;
        denied(&c, alg, Rule::NodeIsMaster);
    }

    #[test]
    fn rule_fresh() {
        let alg = KeyAlgorithm::EcdsaP256;
        let mut c = Case::good(alg);
        c.age_secs = MAX_CSR_AGE_SECS;
        c.check(alg).unwrap();
        c.age_secs = MAX_CSR_AGE_SECS + 1;
        denied(&c, alg, Rule::Fresh);
    }

    #[test]
    fn rule_step_pending_and_one_per_step() {
        let alg = KeyAlgorithm::EcdsaP256;
        // No step under way: nobody asked this node for a certificate.
        let mut c = Case::good(alg);
        c.found.pending_revision = None;
        denied(&c, alg, Rule::StepPending);
        // A step under way, but the CSR names another (or no) revision.
        let mut c = Case::good(alg);
        c.revision = Some("rev0".into());
        denied(&c, alg, Rule::StepPending);
        c.revision = None;
        denied(&c, alg, Rule::StepPending);
        // A second certificate for the same step.
        let mut c = Case::good(alg);
        c.found.issued_for_revision = vec!["kcm-k8smaster01-1234".into()];
        assert!(denied(&c, alg, Rule::OnePerStep).contains("kcm-k8smaster01-1234"));
    }

    #[test]
    fn rule_service_range() {
        // A kubelet that reports the `kubernetes` Service IP as its InternalIP.
        let alg = KeyAlgorithm::EcdsaP256;
        let id = NodeIdentity { name: "k8smaster01".into(), ips: vec!["10.254.0.1".parse().unwrap()] };
        let key = generate_key(alg).unwrap();
        let mut c = Case::with_csr(alg, make_csr(&key, &id.expected_sans()).unwrap());
        c.found.node = Some(NodeFacts { identity: id, is_master: true });
        assert!(denied(&c, alg, Rule::ServiceRange).contains("10.254.0.1"));
    }

    #[test]
    fn rule_request_parses() {
        let alg = KeyAlgorithm::EcdsaP256;
        let mut c = Case::good(alg);
        c.request = b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n".to_vec();
        denied(&c, alg, Rule::RequestParses);
        let mut c = Case::good(alg);
        c.request = b"hello".to_vec();
        denied(&c, alg, Rule::RequestParses);
        // A valid request whose signature was tampered with.
        let mut c = Case::good(alg);
        let der = pem_block(&c.request, "CERTIFICATE REQUEST", "t").unwrap();
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x55;
        use base64::Engine;
        c.request =
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", base64::engine::general_purpose::STANDARD.encode(bad))
                .into_bytes();
        denied(&c, alg, Rule::RequestParses);
    }

    #[test]
    fn rule_subject() {
        let alg = KeyAlgorithm::EcdsaP256;
        let sig = &rcgen::PKCS_ECDSA_P256_SHA256;
        for dn in [
            &[(DnType::CommonName, "system:admin"), (DnType::OrganizationName, KCM_USER)][..],
            &[(DnType::CommonName, KCM_USER), (DnType::OrganizationName, "system:masters")][..],
            &[(DnType::CommonName, KCM_USER)][..],
            &[(DnType::CommonName, KCM_USER), (DnType::OrganizationName, KCM_USER), (DnType::OrganizationName, "system:masters")][..],
            &[(DnType::CommonName, KCM_USER), (DnType::OrganizationName, KCM_USER), (DnType::OrganizationalUnitName, "System")][..],
        ] {
            let c = Case::with_csr(alg, csr_with(good_sans(), dn, sig));
            denied(&c, alg, Rule::Subject);
        }
    }

    #[test]
    fn rule_subject_alt_names() {
        let alg = KeyAlgorithm::EcdsaP256;
        let sig = &rcgen::PKCS_ECDSA_P256_SHA256;
        let mut extra_ip = good_sans();
        extra_ip.push(SanType::IpAddress("172.24.8.72".parse().unwrap()));
        let mut missing = good_sans();
        missing.pop();
        let mut email = good_sans();
        email.push(SanType::Rfc822Name("a@b.c".try_into().unwrap()));
        let mut uri = good_sans();
        uri.push(SanType::URI("spiffe://x".try_into().unwrap()));
        let mut other_host = good_sans();
        other_host[0] = SanType::DnsName("kubernetes.default".try_into().unwrap());
        for sans in [extra_ip, missing, email, uri, other_host] {
            let c = Case::with_csr(alg, csr_with(sans, KCM_DN, sig));
            denied(&c, alg, Rule::SubjectAltNames);
        }
    }

    #[test]
    fn rule_usages() {
        let alg = KeyAlgorithm::EcdsaP256;
        for usages in [
            vec!["digital signature", "client auth"],
            vec!["digital signature", "client auth", "server auth", "code signing"],
            vec!["digital signature", "client auth", "server auth", "server auth"],
            vec![],
        ] {
            let mut c = Case::good(alg);
            c.usages = usages.into_iter().map(String::from).collect();
            denied(&c, alg, Rule::Usages);
        }
    }

    #[test]
    fn rule_key_algorithm() {
        // An ECDSA key where the spec asks for RSA-2048, and the other way round.
        let c = Case::with_csr(KeyAlgorithm::Rsa2048, csr_with(good_sans(), KCM_DN, &rcgen::PKCS_ECDSA_P256_SHA256));
        assert!(denied(&c, KeyAlgorithm::Rsa2048, Rule::KeyAlgorithm).contains("ECDSA"));
        let c = Case::with_csr(KeyAlgorithm::EcdsaP256, csr_with(good_sans(), KCM_DN, &rcgen::PKCS_ECDSA_P384_SHA384));
        denied(&c, KeyAlgorithm::EcdsaP256, Rule::KeyAlgorithm);
        // RSA-1024 is refused by the key rule (its signature may not even verify).
        let c = Case::with_csr(KeyAlgorithm::Rsa2048, RSA_1024_CSR.into());
        assert!(denied(&c, KeyAlgorithm::Rsa2048, Rule::KeyAlgorithm).contains("RSA-1024"));
    }

    fn test_ca() -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "kubernetes");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.not_after = time::OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn signs_with_ca_and_bounds_validity() {
        let alg = KeyAlgorithm::Rsa2048;
        let accepted = Case::good(alg).check(alg).unwrap();
        let (ca_pem, ca_key) = test_ca();
        let ca = Ca::from_pem(&ca_pem, &ca_key).unwrap();
        let now = 1_800_000_000;
        let pem = sign(&accepted, &ca, now, 8760 * 3600, None).unwrap();
        let info = CertInfo::from_pem(pem.as_bytes(), "issued").unwrap();
        assert_eq!(info.common_name.as_deref(), Some(KCM_USER));
        assert_eq!(info.not_after, now + 8760 * 3600);
        assert_eq!(info.sans, identity().expected_sans());
        let short = sign(&accepted, &ca, now, 8760 * 3600, Some(3600)).unwrap();
        assert_eq!(CertInfo::from_pem(short.as_bytes(), "s").unwrap().not_after, now + 3600);
        // Never past the CA's own expiry.
        let capped = sign(&accepted, &ca, 1_999_000_000, 8760 * 3600, None).unwrap();
        assert_eq!(CertInfo::from_pem(capped.as_bytes(), "c").unwrap().not_after, 2_000_000_000);
        let other = sign(&accepted, &ca, now, 3600, None).unwrap();
        assert_ne!(CertInfo::from_pem(other.as_bytes(), "o").unwrap().serial_hex, info.serial_hex);
    }

    #[test]
    fn a_local_issue_is_what_the_signer_would_issue_and_obeys_its_rules() {
        let (ca_pem, ca_key) = test_ca();
        let ca = Ca::from_pem(&ca_pem, &ca_key).unwrap();
        let now = 1_800_000_000;
        for alg in [KeyAlgorithm::Rsa2048, KeyAlgorithm::EcdsaP256] {
            let mut spec: KubeControllerManagerSpec = serde_json::from_value(serde_json::json!({"apiserverUrl": "https://x:6443"})).unwrap();
            spec.certificate.key_algorithm = alg;
            let (cert_pem, key_pem) = issue_locally(&spec, &identity(), &ca, now).unwrap();
            let info = CertInfo::from_pem(cert_pem.as_bytes(), "local").unwrap();
            assert!(info.matches_key(&crate::pki::key_from_pem(&key_pem, "key").unwrap()), "{alg:?}: the certificate is for the key returned");
            assert_eq!(info.common_name.as_deref(), Some(KCM_USER));
            assert_eq!(info.sans, identity().expected_sans(), "{alg:?}: the node's SANs exactly");
            assert_eq!(info.not_after, now + spec.certificate.validity_secs(), "{alg:?}: the spec's validity");
            assert!(crate::pki::issued_by(cert_pem.as_bytes(), ca_pem.as_bytes()).unwrap(), "{alg:?}: chains to the CA");
        }
        // The signer's content rules hold here too: an address in the service range is refused.
        let spec: KubeControllerManagerSpec =
            serde_json::from_value(serde_json::json!({"apiserverUrl": "https://x:6443", "serviceClusterIpRange": "172.24.0.0/16"})).unwrap();
        match issue_locally(&spec, &identity(), &ca, now) {
            Err(IssueError::Denied(d)) => assert_eq!(d.rule, Rule::ServiceRange, "{d}"),
            other => panic!("a node address in the service range was issued: {other:?}"),
        }
    }

    #[test]
    fn a_ca_bundle_signs_with_the_certificate_of_its_key() {
        let ((old, old_key), (new, new_key)) = (test_ca(), test_ca());
        let accepted = Case::good(KeyAlgorithm::Rsa2048).check(KeyAlgorithm::Rsa2048).unwrap();
        for bundle in [format!("{old}{new}"), format!("{new}{old}")] {
            let ca = Ca::from_pem(&bundle, &new_key).expect("a bundle with the key's certificate in it");
            let pem = sign(&accepted, &ca, 1_800_000_000, 3600, None).unwrap();
            assert!(crate::pki::issued_by(pem.as_bytes(), new.as_bytes()).unwrap(), "signed by the key's CA");
            assert!(!crate::pki::issued_by(pem.as_bytes(), old.as_bytes()).unwrap());
            assert!(crate::pki::issued_by(pem.as_bytes(), bundle.as_bytes()).unwrap(), "trusted by the bundle");
            let minted = crate::identity::mint(&bundle, &old_key, 1_800_000_000, std::time::Duration::from_secs(3600)).unwrap();
            assert!(crate::pki::issued_by(minted.cert_pem.as_bytes(), old.as_bytes()).unwrap(), "the operator's identity from the old key's CA");
        }
    }

    #[test]
    fn ca_key_must_match_ca_cert() {
        let (ca_pem, _) = test_ca();
        let (_, other_key) = test_ca();
        assert!(Ca::from_pem(&ca_pem, &other_key).is_err());
        assert!(Ca::from_pem("nope", "nope").is_err());
    }

    #[test]
    fn only_our_signer() {
        assert!(is_ours(SIGNER_NAME));
        assert!(!is_ours("kubernetes.io/kube-apiserver-client"));
    }
}
