//! x509 work shared by the signer and the node-helper: a master's identity (the SANs its
//! certificate must carry), keys, CSRs, and reading certificates back.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Node;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::api::{KeyAlgorithm, KCM_USER};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: not valid PEM")]
    Pem { what: String },
    #[error("{what}: cannot parse: {reason}")]
    Parse { what: String, reason: String },
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    #[error("node {0} has no InternalIP address")]
    NoAddress(String),
}
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// Who a master is, as far as its certificate goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// The node's InternalIP addresses, in the order the kubelet reports them.
    pub ips: Vec<IpAddr>,
}

/// The SANs a master's kcm certificate carries: its InternalIP addresses, 127.0.0.1, its
/// node name and localhost (seed 1.2: the hosts list, narrowed to one node). No ExternalIP
/// and no Hostname address: the kubelet writes those, and nothing inside the cluster
/// reaches kcm by them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sans {
    pub dns: BTreeSet<String>,
    pub ips: BTreeSet<IpAddr>,
}

impl NodeIdentity {
    pub fn from_node(node: &Node) -> Result<Self> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let addrs = node.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
        let mut ips = Vec::new();
        for a in addrs.iter().filter(|a| a.type_ == "InternalIP") {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        if ips.is_empty() {
            return Err(PkiError::NoAddress(name));
        }
        Ok(Self { name, ips })
    }

    /// The address kcm binds to on this node (`--bind-address`).
    pub fn primary_ip(&self) -> IpAddr {
        self.ips[0]
    }

    pub fn expected_sans(&self) -> Sans {
        let mut ips: BTreeSet<IpAddr> = self.ips.iter().copied().collect();
        ips.insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let dns = [self.name.clone(), "localhost".to_string()].into_iter().collect();
        Sans { dns, ips }
    }
}

/// A fresh private key of the spec's algorithm.
pub fn generate_key(alg: KeyAlgorithm) -> Result<KeyPair> {
    let sig = match alg {
        KeyAlgorithm::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    // aws-lc-rs generates RSA keys of 2048 bits for PKCS_RSA_SHA256.
    KeyPair::generate_for(sig).map_err(|source| PkiError::Rcgen { what: "generating key".into(), source })
}

pub fn key_from_pem(pem: &str, what: &str) -> Result<KeyPair> {
    KeyPair::from_pem(pem).map_err(|source| PkiError::Rcgen { what: what.into(), source })
}

/// The CSR a master's helper submits: CN and O `system:kube-controller-manager`, its SANs.
pub fn make_csr(key: &KeyPair, sans: &Sans) -> Result<String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, KCM_USER);
    dn.push(DnType::OrganizationName, KCM_USER);
    params.distinguished_name = dn;
    let err = |source| PkiError::Rcgen { what: "building CSR".into(), source };
    for d in &sans.dns {
        params.subject_alt_names.push(SanType::DnsName(d.clone().try_into().map_err(err)?));
    }
    for ip in &sans.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.serialize_request(key).map_err(err)?.pem().map_err(err)
}

/// Decodes the first PEM block of `pem` whose label is `label`.
pub fn pem_block(pem: &[u8], label: &str, what: &str) -> Result<Vec<u8>> {
    pem_blocks(pem, label, what)?.into_iter().next().ok_or_else(|| PkiError::Pem { what: what.into() })
}

/// Decodes every PEM block of `pem` whose label is `label`, in order (a CA bundle holds
/// several: the old CA and the new one during a rotation). At least one.
pub fn pem_blocks(pem: &[u8], label: &str, what: &str) -> Result<Vec<Vec<u8>>> {
    use base64::Engine;
    let bad = || PkiError::Pem { what: what.into() };
    let text = std::str::from_utf8(pem).map_err(|_| bad())?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&begin) {
        let body = &rest[at + begin.len()..];
        let stop = body.find(&end).ok_or_else(bad)?;
        let b64: String = body[..stop].chars().filter(|c| !c.is_whitespace()).collect();
        out.push(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad())?);
        rest = &body[stop + end.len()..];
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// DER as one PEM block.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// The certificate of a CA bundle whose public key is `key`'s: the CA that signs with it
/// (a bundle may trust an old and a new CA), as one PEM block and its facts.
pub fn signing_cert(bundle: &str, key: &KeyPair, what: &str) -> Result<(String, CertInfo)> {
    for der in pem_blocks(bundle.as_bytes(), "CERTIFICATE", what)? {
        let info = CertInfo::from_der(&der, what)?;
        if info.matches_key(key) {
            return Ok((to_pem("CERTIFICATE", &der), info));
        }
    }
    Err(PkiError::Parse { what: format!("{what} key"), reason: "belongs to no certificate of the CA file".into() })
}

/// What the helper and the operator need to know of an installed certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub serial_hex: String,
    pub not_before: i64,
    pub not_after: i64,
    pub common_name: Option<String>,
    pub sans: Sans,
    /// DER of the SubjectPublicKeyInfo, to match against a key.
    pub spki_der: Vec<u8>,
}

impl CertInfo {
    /// The first certificate of `pem`.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self> {
        Self::from_der(&pem_block(pem, "CERTIFICATE", what)?, what)
    }

    pub fn from_der(der: &[u8], what: &str) -> Result<Self> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse { what: what.into(), reason: e.to_string() })?;
        let mut sans = Sans::default();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    match n {
                        GeneralName::DNSName(d) => {
                            sans.dns.insert(d.to_string());
                        }
                        GeneralName::IPAddress(b) => {
                            if let Some(ip) = ip_from_bytes(b) {
                                sans.ips.insert(ip);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let common_name = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).map(str::to_string);
        Ok(Self {
            serial_hex: cert.raw_serial_as_string().replace(':', ""),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            common_name,
            sans,
            spki_der: cert.tbs_certificate.subject_pki.raw.to_vec(),
        })
    }

    /// Whether `key` is the private half of this certificate's public key.
    pub fn matches_key(&self, key: &KeyPair) -> bool {
        use rcgen::PublicKeyData;
        key.subject_public_key_info() == self.spki_der
    }
}

/// Whether the certificate in `cert_pem` is signed by a CA of the bundle `ca_pem` (its
/// issuer matches that CA's subject and the signature verifies with that CA's key).
pub fn issued_by(cert_pem: &[u8], ca_pem: &[u8]) -> Result<bool> {
    let cert_der = pem_block(cert_pem, "CERTIFICATE", "certificate")?;
    let (_, cert) = X509Certificate::from_der(&cert_der).map_err(|e| PkiError::Parse { what: "certificate".into(), reason: e.to_string() })?;
    for ca_der in pem_blocks(ca_pem, "CERTIFICATE", "CA certificate")? {
        let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| PkiError::Parse { what: "CA certificate".into(), reason: e.to_string() })?;
        if cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}

pub(crate) fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Whether `ip` lies inside `cidr` (`a.b.c.d/n` or an IPv6 prefix); an unparsable CIDR
/// contains nothing (the CRD admits only valid ones).
pub fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else { return false };
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else { return false };
    let (net, addr, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(u32::from(n)), u128::from(u32::from(a)), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let shift = width - bits;
    shift >= 128 || (net >> shift) == (addr >> shift)
}

/// RFC 3339 rendering of a unix time, for status fields.
pub fn rfc3339(unix: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix).map(|t| t.to_string()).unwrap_or_else(|_| unix.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn identity() -> NodeIdentity {
        NodeIdentity { name: "k8smaster01".into(), ips: vec!["172.24.8.71".parse().unwrap()] }
    }

    #[test]
    fn cidr_membership() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr_contains("10.96.0.0/12", ip("10.96.0.1")));
        assert!(cidr_contains("10.96.0.0/12", ip("10.111.255.255")));
        assert!(!cidr_contains("10.96.0.0/12", ip("10.112.0.0")));
        assert!(cidr_contains("10.254.0.0/16", ip("10.254.3.4")));
        assert!(!cidr_contains("10.254.0.0/16", ip("172.18.0.3")));
        assert!(cidr_contains("0.0.0.0/0", ip("1.2.3.4")));
        assert!(cidr_contains("fd00:10:96::/112", ip("fd00:10:96::1")));
        assert!(!cidr_contains("fd00:10:96::/112", ip("fd00:10:97::1")));
        assert!(!cidr_contains("10.96.0.0/12", ip("fd00::1")), "families never mix");
        assert!(!cidr_contains("nonsense", ip("10.96.0.1")));
        assert!(!cidr_contains("10.96.0.0/40", ip("10.96.0.1")));
    }

    #[test]
    fn sans_are_own_ips_loopback_name_localhost() {
        let s = identity().expected_sans();
        assert_eq!(s.dns.iter().map(String::as_str).collect::<Vec<_>>(), ["k8smaster01", "localhost"]);
        assert_eq!(s.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(), ["127.0.0.1", "172.24.8.71"]);
    }

    #[test]
    fn node_identity_from_node_object() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kcm-control-plane"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "kcm-control-plane"},
                {"type": "InternalIP", "address": "172.18.0.3"},
                {"type": "InternalIP", "address": "fc00::3"},
                {"type": "ExternalIP", "address": "203.0.113.9"}
            ]}
        }))
        .unwrap();
        let id = NodeIdentity::from_node(&node).unwrap();
        assert_eq!(id.primary_ip().to_string(), "172.18.0.3");
        assert_eq!(id.ips.len(), 2, "InternalIP only: {:?}", id.ips);
        let bare: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(matches!(NodeIdentity::from_node(&bare), Err(PkiError::NoAddress(n)) if n == "x"));
    }

    #[test]
    fn csr_round_trips_and_keys_match() {
        let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        let pem = make_csr(&key, &identity().expected_sans()).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(pem_block(pem.as_bytes(), "CERTIFICATE REQUEST", "csr").is_ok());
        assert!(matches!(pem_block(b"garbage", "CERTIFICATE", "x"), Err(PkiError::Pem { .. })));
    }

    #[test]
    fn issued_by_checks_issuer_and_signature() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "ca");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["x".into()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        assert!(issued_by(leaf.pem().as_bytes(), ca.pem().as_bytes()).unwrap());
        // Another CA with the same name: the signature does not verify.
        let other_key = KeyPair::generate().unwrap();
        let other = ca_params.self_signed(&other_key).unwrap();
        assert!(!issued_by(leaf.pem().as_bytes(), other.pem().as_bytes()).unwrap());
        assert!(issued_by(b"not pem", ca.pem().as_bytes()).is_err());
        // A bundle (old and new CA, in either order) trusts what either issued.
        for bundle in [format!("{}{}", other.pem(), ca.pem()), format!("{}\n{}", ca.pem(), other.pem())] {
            assert!(issued_by(leaf.pem().as_bytes(), bundle.as_bytes()).unwrap(), "{bundle}");
        }
    }

    #[test]
    fn the_signing_certificate_of_a_bundle_is_the_one_of_the_key() {
        let ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            (p.self_signed(&key).unwrap(), key)
        };
        let ((old, old_key), (new, new_key)) = (ca("old"), ca("new"));
        let bundle = format!("{}{}", old.pem(), new.pem());
        assert_eq!(pem_blocks(bundle.as_bytes(), "CERTIFICATE", "bundle").unwrap().len(), 2);
        let (pem, info) = signing_cert(&bundle, &new_key, "CA").unwrap();
        assert_eq!(info.common_name.as_deref(), Some("new"));
        assert_eq!(pem_block(pem.as_bytes(), "CERTIFICATE", "x").unwrap(), new.der().to_vec(), "re-encoded as it was");
        assert_eq!(signing_cert(&bundle, &old_key, "CA").unwrap().1.common_name.as_deref(), Some("old"));
        let stranger = KeyPair::generate().unwrap();
        assert!(signing_cert(&bundle, &stranger, "CA").unwrap_err().to_string().contains("belongs to no certificate"));
    }
}
