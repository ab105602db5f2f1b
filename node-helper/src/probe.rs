//! kcm's health as a client sees it: a TLS handshake with its secure port, verified
//! against the cluster CA for the node's IP, then `GET /healthz`. Reports the serial of
//! the certificate kcm serves, so the helper knows kcm serves the one it just wrote.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kcm_operator::pki::{pem_blocks, CertInfo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Serial (hex) of the certificate kcm presented.
    pub serial_hex: String,
    /// HTTP status code of `/healthz`.
    pub status: u16,
    pub body: String,
}

impl Health {
    pub fn ok(&self) -> bool {
        self.status == 200 && self.body.trim() == "ok"
    }
}

/// Probes `https://<ip>:<port>/healthz` once, within `timeout`.
pub async fn healthz(ip: IpAddr, port: u16, ca_pem: &str, timeout: Duration) -> Result<Health, String> {
    tokio::time::timeout(timeout, probe(ip, port, ca_pem)).await.map_err(|_| format!("no answer from {ip}:{port} within {timeout:?}"))?
}

/// Probes a kcm whose serving certificate cannot be verified (kubeadm's static pod serves a
/// self-signed one it makes at start) once, within `timeout`: whether that process answers
/// `/healthz`, never a trust decision. The handshake's signature is still checked.
pub async fn healthz_unverified(ip: IpAddr, port: u16, timeout: Duration) -> Result<Health, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    tokio::time::timeout(timeout, get_healthz(config, ip, port)).await.map_err(|_| format!("no answer from {ip}:{port} within {timeout:?}"))?
}

/// Accepts any server certificate (see [`healthz_unverified`]).
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn probe(ip: IpAddr, port: u16, ca_pem: &str) -> Result<Health, String> {
    // Every CA of the file: a bundle (old and new CA) trusts a kcm serving either's certificate.
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_blocks(ca_pem.as_bytes(), "CERTIFICATE", "CA").map_err(|e| e.to_string())? {
        roots.add(CertificateDer::from(ca)).map_err(|e| format!("CA: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    get_healthz(config, ip, port).await
}

/// One TLS connection to `ip:port` under `config`, and `GET /healthz` on it.
async fn get_healthz(config: rustls::ClientConfig, ip: IpAddr, port: u16) -> Result<Health, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = SocketAddr::new(ip, port);
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let mut tls = connector.connect(ServerName::IpAddress(ip.into()), tcp).await.map_err(|e| format!("TLS with {addr}: {e}"))?;
    let served = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).ok_or("no server certificate")?;
    let pem =
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &served));
    let serial_hex = CertInfo::from_pem(pem.as_bytes(), "served certificate").map_err(|e| e.to_string())?.serial_hex;
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| format!("write {addr}: {e}"))?;
    let mut buf = Vec::new();
    // kcm closes the connection after the response (Connection: close).
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no HTTP status from {addr}: {text:?}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    let body = if text.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    Ok(Health { serial_hex, status, body })
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk("2\r\nok\r\n0\r\n\r\n"), "ok");
        assert_eq!(dechunk("1\r\no\r\n1\r\nk\r\n0\r\n\r\n"), "ok");
        assert_eq!(dechunk("zz\r\n"), "");
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = healthz("127.0.0.1".parse().unwrap(), port, "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n", Duration::from_secs(2)).await;
        assert!(err.is_err());
    }
}
