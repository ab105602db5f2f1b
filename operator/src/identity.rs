//! The operator's API identity when it runs as a static pod: static pods cannot use a
//! ServiceAccount, and the operator must work when no kcm runs (kcm is what issues
//! ServiceAccount tokens' controllers and runs the DaemonSets). So it reads the cluster CA
//! from the host (read-only hostPath) and mints itself a short-lived ECDSA P-256 client
//! certificate, CN [`OPERATOR_USER`] and no groups: its rights are exactly those of the
//! ClusterRole/Roles bound to User `kcm-operator` in manifests/base/rbac.yaml.
//!
//! Renewal: a `kube::Client` cannot swap its TLS identity, so the binary rebuilds the client
//! (and restarts the tasks using it) when [`ClientCert::renew_at`] comes: half the lifetime.
//! The leader keeps its Lease across that restart (same holder identity: it renews).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SerialNumber};

use crate::api::NAMESPACE;
use crate::pki::{key_from_pem, pem_block, PkiError};

/// The user the operator's host-minted certificate names (CN; no O, so no groups).
pub const OPERATOR_USER: &str = "kcm-operator";
/// Default apiserver: the one on this master (kubeadm's serving cert has SAN 127.0.0.1).
pub const DEFAULT_APISERVER: &str = "https://127.0.0.1:6443";
/// Default lifetime of the minted client certificate.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// notBefore is backdated by this much for clock skew between masters.
pub const BACKDATE_SECS: i64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cluster CA expired at {0}: cannot mint a client certificate")]
    CaExpired(String),
    #[error("kubeconfig for {apiserver}: {reason}")]
    Kubeconfig { apiserver: String, reason: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("invalid duration {0:?}: use e.g. 90s, 30m, 24h")]
    Duration(String),
}
pub type Result<T, E = IdentityError> = std::result::Result<T, E>;

/// A minted client certificate and its key, both PEM.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds: when it was minted, and its validity (notBefore is backdated).
    pub issued_at: i64,
    pub not_before: i64,
    pub not_after: i64,
}

impl ClientCert {
    /// When to mint the next one: at 50% of the lifetime (unix seconds).
    pub fn renew_at(&self) -> i64 {
        renew_at(self.issued_at, self.not_after)
    }
}

/// Half-way from issuance to notAfter. Counted from issuance, not from the backdated
/// notBefore, so that a short validity (say 2m, for tests) is not due at once.
pub fn renew_at(issued_at: i64, not_after: i64) -> i64 {
    issued_at + (not_after - issued_at).max(0) / 2
}

/// How long from `now` until renewal is due; zero when it is already due.
pub fn renew_in(issued_at: i64, not_after: i64, now: i64) -> Duration {
    Duration::from_secs(renew_at(issued_at, not_after).saturating_sub(now).max(0) as u64)
}

/// Mints a client certificate for [`OPERATOR_USER`] under the CA: ECDSA P-256, client auth
/// only, notBefore `now - 5 min`, notAfter `now + validity` capped at the CA's notAfter.
pub fn mint(ca_cert_pem: &str, ca_key_pem: &str, now: i64, validity: Duration) -> Result<ClientCert> {
    let ca_key = key_from_pem(ca_key_pem, "CA key")?;
    // A bundle (old and new CA) signs with the certificate of its key.
    let (ca_cert_pem, ca) = crate::pki::signing_cert(ca_cert_pem, &ca_key, "CA certificate")?;
    let ca_cert_pem = ca_cert_pem.as_str();
    if ca.not_after <= now {
        return Err(IdentityError::CaExpired(crate::pki::rfc3339(ca.not_after)));
    }
    let err = |source| PkiError::Rcgen { what: "minting the operator's client certificate".into(), source };
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(err)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;

    let not_before = now - BACKDATE_SECS;
    let not_after = (now + validity.as_secs() as i64).min(ca.not_after);
    let ts = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| PkiError::Parse { what: "time".into(), reason: e.to_string() });
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, OPERATOR_USER);
    params.distinguished_name = dn;
    params.not_before = ts(not_before)?;
    params.not_after = ts(not_after)?;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| PkiError::Parse { what: "serial".into(), reason: "no randomness".into() })?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok(ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), issued_at: now, not_before, not_after })
}

/// A kubeconfig for `apiserver` trusting the CA and authenticating with `cert`
/// (everything embedded; default namespace [`NAMESPACE`]).
pub fn kubeconfig(apiserver: &str, ca_cert_pem: &str, cert: &ClientCert) -> Result<kube::config::Kubeconfig> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let bad = |reason: String| IdentityError::Kubeconfig { apiserver: apiserver.into(), reason };
    if !apiserver.starts_with("https://") {
        return Err(bad("the apiserver URL must start with https://".into()));
    }
    // At least one certificate; the whole file is trusted (every CA of a bundle).
    pem_block(ca_cert_pem.as_bytes(), "CERTIFICATE", "CA certificate")?;
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": apiserver, "certificate-authority-data": b64(ca_cert_pem)}}],
        "users": [{"name": OPERATOR_USER, "user": {"client-certificate-data": b64(&cert.cert_pem), "client-key-data": b64(&cert.key_pem)}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": OPERATOR_USER, "namespace": NAMESPACE}}],
        "current-context": "operator",
    });
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// Where the host identity comes from, and for how long a certificate is minted.
#[derive(Clone, Debug)]
pub struct HostIdentity {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The apiservers to try, in order (the static pod: the CR's `apiserverUrl`).
    pub apiservers: Vec<String>,
    pub validity: Duration,
}

impl HostIdentity {
    /// Reads the CA from the host, mints a fresh certificate and builds a client with it for
    /// the first of [`Self::apiservers`] that answers ([`crate::reach::first_answering`]).
    /// Returns the certificate too, for its renewal time, and the apiserver chosen.
    /// Its requests are counted in `counts`.
    pub async fn client(&self, counts: &std::sync::Arc<crate::apicount::ApiCounts>) -> Result<(kube::Client, ClientCert, String)> {
        let ca_cert = read(&self.ca_cert)?;
        let ca_key = read(&self.ca_key)?;
        let cert = mint(&ca_cert, &ca_key, now(), self.validity)?;
        let mut candidates = Vec::new();
        for apiserver in &self.apiservers {
            let kc = kubeconfig(apiserver, &ca_cert, &cert)?;
            let bad = |reason: String| IdentityError::Kubeconfig { apiserver: apiserver.clone(), reason };
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.map_err(|e| bad(e.to_string()))?;
            candidates.push((apiserver.clone(), crate::apicount::counted_client_with(config, counts.clone()).map_err(|e| bad(e.to_string()))?));
        }
        if candidates.is_empty() {
            return Err(IdentityError::Unreachable("no apiserver given (--apiserver)".into()));
        }
        let (_, apiserver, client) =
            crate::reach::first_answering(candidates, |c| c).await.map_err(|why| IdentityError::Unreachable(crate::reach::none_answered(&why)))?;
        Ok((client, cert, apiserver))
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read { path: path.to_path_buf(), source })
}

/// Unix seconds now.
pub fn now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

/// Parses `90s`, `30m`, `24h`, `1d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let bad = || IdentityError::Duration(s.to_string());
    let (num, mult) = match s.char_indices().last().ok_or_else(bad)? {
        (i, 's') => (&s[..i], 1),
        (i, 'm') => (&s[..i], 60),
        (i, 'h') => (&s[..i], 3600),
        (i, 'd') => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(n.checked_mul(mult).ok_or_else(bad)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertInfo;
    use x509_parser::prelude::{FromDer, X509Certificate};

    /// An RSA CA like kubeadm's, expiring at `not_after`.
    fn ca(not_after: i64) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "kubernetes");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        p.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn mints_a_short_lived_client_cert_for_the_operator_user_only() {
        let (ca_pem, ca_key) = ca(2_000_000_000);
        let c = mint(&ca_pem, &ca_key, NOW, DEFAULT_VALIDITY).unwrap();
        assert_eq!((c.not_before, c.not_after), (NOW - 300, NOW + 86400));
        let der = pem_block(c.cert_pem.as_bytes(), "CERTIFICATE", "t").unwrap();
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        // CN kcm-operator, and no O: no groups, so nothing beyond its own bindings.
        let subject: Vec<String> = x.subject().iter_attributes().map(|a| a.as_str().unwrap().to_string()).collect();
        assert_eq!(subject, [OPERATOR_USER]);
        assert_eq!(x.validity().not_before.timestamp(), NOW - 300);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!x.is_ca());
        assert_eq!(x.public_key().algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1", "ECDSA key");
        // Signed by the CA.
        let ca_der = pem_block(ca_pem.as_bytes(), "CERTIFICATE", "ca").unwrap();
        let (_, cax) = X509Certificate::from_der(&ca_der).unwrap();
        x.verify_signature(Some(cax.public_key())).unwrap();
        assert_eq!(x.issuer(), cax.subject());
        // The key is the certificate's.
        let info = CertInfo::from_pem(c.cert_pem.as_bytes(), "t").unwrap();
        assert!(info.matches_key(&key_from_pem(&c.key_pem, "k").unwrap()));
        // Each mint is a new key and serial.
        let d = mint(&ca_pem, &ca_key, NOW, DEFAULT_VALIDITY).unwrap();
        assert_ne!(d.key_pem, c.key_pem);
        assert_ne!(CertInfo::from_pem(d.cert_pem.as_bytes(), "d").unwrap().serial_hex, info.serial_hex);
    }

    #[test]
    fn validity_is_capped_by_the_ca_and_an_expired_ca_is_refused() {
        let (ca_pem, ca_key) = ca(NOW + 3600);
        assert_eq!(mint(&ca_pem, &ca_key, NOW, DEFAULT_VALIDITY).unwrap().not_after, NOW + 3600);
        assert!(matches!(mint(&ca_pem, &ca_key, NOW + 3600, DEFAULT_VALIDITY), Err(IdentityError::CaExpired(_))));
    }

    #[test]
    fn ca_key_must_match_ca_cert() {
        let (ca_pem, _) = ca(2_000_000_000);
        let (_, other) = ca(2_000_000_000);
        assert!(mint(&ca_pem, &other, NOW, DEFAULT_VALIDITY).is_err());
        assert!(mint("nope", "nope", NOW, DEFAULT_VALIDITY).is_err());
    }

    #[test]
    fn renews_at_half_the_lifetime() {
        assert_eq!(renew_at(NOW, NOW + 86400), NOW + 43200);
        assert_eq!(renew_in(NOW, NOW + 86400, NOW), Duration::from_secs(43200));
        assert_eq!(renew_in(NOW, NOW + 86400, NOW + 50_000), Duration::ZERO, "overdue: now");
        assert_eq!(renew_at(10, 10), 10);
        assert_eq!(renew_at(10, 5), 10, "inverted range renews immediately");
        // A 2-minute certificate is renewed after 1 minute, despite the 5-minute backdating.
        let (ca_pem, ca_key) = ca(2_000_000_000);
        let c = mint(&ca_pem, &ca_key, NOW, Duration::from_secs(120)).unwrap();
        assert_eq!((c.issued_at, c.not_before, c.renew_at()), (NOW, NOW - 300, NOW + 60));
        // Capped by the CA: renewal halfway to the CA's expiry.
        let (ca_pem, ca_key) = ca(NOW + 1000);
        assert_eq!(mint(&ca_pem, &ca_key, NOW, DEFAULT_VALIDITY).unwrap().renew_at(), NOW + 500);
    }

    #[tokio::test]
    async fn kubeconfig_builds_a_client_config_with_the_ca_and_identity() {
        let (ca_pem, ca_key) = ca(2_000_000_000);
        let c = mint(&ca_pem, &ca_key, now(), DEFAULT_VALIDITY).unwrap();
        let kc = kubeconfig(DEFAULT_APISERVER, &ca_pem, &c).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        assert_eq!(cfg.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(cfg.default_namespace, NAMESPACE);
        assert_eq!(cfg.root_cert.as_ref().map(Vec::len), Some(1));
        assert!(kube::Client::try_from(cfg).is_ok(), "rustls accepts the P-256 identity");
        assert!(matches!(kubeconfig("http://127.0.0.1:6443", &ca_pem, &c), Err(IdentityError::Kubeconfig { .. })));
        assert!(kubeconfig(DEFAULT_APISERVER, "not pem", &c).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        for bad in ["", "h", "0h", "-1h", "1.5h", "1w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
