//! Throwaway PKI for the API tier: a CA, serving cert, client certs and the
//! ServiceAccount signing key. Everything is ECDSA P-256 with PKCS#8 keys.
//!
//! Client certificates are assembled by hand (tiny DER writer below) because
//! rcgen's `DistinguishedName` keeps one value per attribute type, while
//! Kubernetes maps *every* `O=` RDN to a group, and tests want several groups.

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SigningKey};

pub(crate) const CA_COMMON_NAME: &str = "kcm-test-ca";

/// A CA: certificate PEM + PKCS#8 private key PEM.
pub(crate) struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: Vec<u8>,
}

/// A certificate and its PKCS#8 private key, both PEM.
pub(crate) struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn generate(common_name: &str) -> Result<Ca> {
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).context("self-signing CA")?;
        Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().to_vec() })
    }

    fn key(&self) -> Result<KeyPair> {
        KeyPair::from_pem(&self.key_pem).context("parsing CA key")
    }

    /// Serving certificate for the given SANs (DNS names or IP literals).
    pub fn serving_cert(&self, common_name: &str, sans: &[&str]) -> Result<CertAndKey> {
        let ca_key = self.key()?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &ca_key).context("CA issuer")?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).context("signing serving cert")?;
        Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Client certificate with Subject `O=<group>... , CN=<user>` (one `O` RDN
    /// per group), extended key usage clientAuth, signed by this CA.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> Result<CertAndKey> {
        let ca_key = self.key()?;
        let key = KeyPair::generate()?;
        let der = build_client_cert_der(&self.cert_der, &ca_key, &key, user, groups)?;
        Ok(CertAndKey { cert_pem: pem_encode("CERTIFICATE", &der), key_pem: key.serialize_pem() })
    }
}

/// Key pair for --service-account-signing-key-file (private, PKCS#8) and
/// --service-account-key-file (public, SPKI "PUBLIC KEY").
pub(crate) fn sa_key_pair() -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating SA key")?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

// ---------------------------------------------------------------- DER writer

const OID_CN: &[u64] = &[2, 5, 4, 3];
const OID_O: &[u64] = &[2, 5, 4, 10];
const OID_ECDSA_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
const OID_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const OID_EXT_KEY_USAGE: &[u64] = &[2, 5, 29, 37];
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const OID_AKI: &[u64] = &[2, 5, 29, 35];
const OID_CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn oid(arcs: &[u64]) -> Vec<u8> {
    fn base128(mut v: u64, out: &mut Vec<u8>) {
        let mut tmp = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            tmp.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        tmp.reverse();
        out.extend(tmp);
    }
    let mut body = Vec::new();
    base128(arcs[0] * 40 + arcs[1], &mut body);
    for a in &arcs[2..] {
        base128(*a, &mut body);
    }
    tlv(0x06, &body)
}

fn utf8(s: &str) -> Vec<u8> {
    tlv(0x0c, s.as_bytes())
}

fn rdn(attr: &[u64], value: &str) -> Vec<u8> {
    tlv(0x31, &seq(&[oid(attr), utf8(value)]))
}

fn extension(id: &[u64], critical: bool, value: Vec<u8>) -> Vec<u8> {
    let mut parts = vec![oid(id)];
    if critical {
        parts.push(vec![0x01, 0x01, 0xff]);
    }
    parts.push(tlv(0x04, &value));
    seq(&parts)
}

fn build_client_cert_der(ca_der: &[u8], ca_key: &KeyPair, subject_key: &KeyPair, user: &str, groups: &[&str]) -> Result<Vec<u8>> {
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).map_err(|e| anyhow::anyhow!("parsing CA certificate: {e}"))?;
    let issuer_raw = ca.tbs_certificate.subject.as_raw().to_vec();
    let ca_ski: Option<Vec<u8>> = ca.extensions().iter().find_map(|ext| match ext.parsed_extension() {
        x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(kid) => Some(kid.0.to_vec()),
        _ => None,
    });

    let spki = subject_key.subject_public_key_info();
    // Positive, non-zero-leading 16-byte serial derived from the (random) public key.
    let pk = subject_key.der_bytes();
    let mut serial: Vec<u8> = pk[pk.len() - 16..].to_vec();
    serial[0] = (serial[0] & 0x7f) | 0x40;

    let mut subject = Vec::new();
    for g in groups {
        subject.push(rdn(OID_O, g));
    }
    subject.push(rdn(OID_CN, user));
    let subject = seq(&subject);

    let sig_alg = seq(&[oid(OID_ECDSA_SHA256)]);
    let validity = seq(&[
        tlv(0x17, b"000101000000Z"),   // 2000-01-01
        tlv(0x18, b"20991231235959Z"), // 2099-12-31 (GeneralizedTime past 2049)
    ]);
    let mut exts = vec![
        // keyUsage: digitalSignature (bit 0) -> BIT STRING, 7 unused bits, 0x80
        extension(OID_KEY_USAGE, true, tlv(0x03, &[0x07, 0x80])),
        extension(OID_EXT_KEY_USAGE, false, seq(&[oid(OID_CLIENT_AUTH)])),
        extension(OID_BASIC_CONSTRAINTS, true, seq(&[])),
    ];
    if let Some(kid) = ca_ski {
        // AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] IMPLICIT OCTET STRING }
        exts.push(extension(OID_AKI, false, seq(&[tlv(0x80, &kid)])));
    }
    let tbs = seq(&[
        tlv(0xa0, &tlv(0x02, &[0x02])), // version v3
        tlv(0x02, &serial),
        sig_alg.clone(),
        issuer_raw,
        validity,
        subject,
        spki,
        tlv(0xa3, &seq(&exts)),
    ]);
    let sig = ca_key.sign(&tbs).context("signing client certificate")?;
    let mut bits = vec![0u8];
    bits.extend_from_slice(&sig);
    Ok(seq(&[tbs, sig_alg, tlv(0x03, &bits)]))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_decode(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }

    #[test]
    fn client_cert_parses_with_all_groups() {
        let ca = Ca::generate(CA_COMMON_NAME).unwrap();
        let ck = ca.client_cert("alice", &["g1", "system:masters", "g3"]).unwrap();
        let der = pem_decode(&ck.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let orgs: Vec<_> = cert.subject().iter_organization().map(|o| o.as_str().unwrap().to_string()).collect();
        assert_eq!(orgs, ["g1", "system:masters", "g3"]);
        let cn: Vec<_> = cert.subject().iter_common_name().map(|o| o.as_str().unwrap()).collect();
        assert_eq!(cn, ["alice"]);
        let ca_der = pem_decode(&ca.cert_pem);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
    }
}
