//! Drift: what is on disk versus what the helper wrote. After each step the helper records
//! the SHA-256 of every file it wrote (in its report, so a restarted helper still knows);
//! on each look it hashes them again. A missing or changed file, or a certificate on disk
//! that has expired, is drift: the operator gives the master a repair step. Pure but for
//! the `read` callback.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes of the files at `paths` as they are now (a missing file is left out).
pub fn hashes(paths: &[&str], read: impl Fn(&str) -> Option<Vec<u8>>) -> BTreeMap<String, String> {
    paths.iter().filter_map(|p| read(p).map(|b| (p.to_string(), sha256_hex(&b)))).collect()
}

/// One line per drifted file: `recorded` are the hashes the helper wrote; `cert_path` is
/// also checked for expiry at `now` (unix).
pub fn check(recorded: &BTreeMap<String, String>, cert_path: &str, read: impl Fn(&str) -> Option<Vec<u8>>, now: i64) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in recorded {
        match read(path) {
            None => out.push(format!("{path}: missing")),
            Some(b) if sha256_hex(&b) != *want => out.push(format!("{path}: changed since the helper wrote it")),
            Some(_) => {}
        }
    }
    if let Some(b) = read(cert_path) {
        if let Ok(c) = kcm_operator::pki::CertInfo::from_pem(&b, "certificate on disk") {
            if c.not_after <= now {
                out.push(format!("{cert_path}: certificate {} expired at {}", c.serial_hex, kcm_operator::pki::rfc3339(c.not_after)));
            }
        }
    }
    out
}

/// kubeadm's kcm static pod manifest back where kubeadm keeps it (`manifest`) on a master
/// whose kcm runs under our unit: a `kubeadm upgrade` writes it again, and a second kcm
/// then runs beside ours. Drift: the repair adopts it again (moved aside, its flags checked).
pub fn static_pod_back(manifest: &str, read: impl Fn(&str) -> Option<Vec<u8>>) -> Option<String> {
    (!manifest.is_empty() && read(manifest).is_some())
        .then(|| format!("{manifest}: kubeadm's kcm static pod manifest is back (written again by kubeadm?): a second kcm beside ours"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_changed_files_are_named() {
        let files: BTreeMap<&str, &[u8]> = [("/a", &b"one"[..]), ("/b", &b"two"[..])].into();
        let read = |p: &str| files.get(p).map(|b| b.to_vec());
        let recorded = hashes(&["/a", "/b", "/c"], read);
        assert_eq!(recorded.len(), 2, "a missing file is not recorded");
        assert!(check(&recorded, "/a", read, 0).is_empty());
        let after: BTreeMap<&str, &[u8]> = [("/a", &b"one!"[..])].into();
        let read_after = |p: &str| after.get(p).map(|b| b.to_vec());
        assert_eq!(check(&recorded, "/x", read_after, 0), vec!["/a: changed since the helper wrote it".to_string(), "/b: missing".to_string()]);
    }

    #[test]
    fn an_expired_certificate_on_disk_is_drift() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_000).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_000).unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let read = |p: &str| (p == "/cert").then(|| pem.clone().into_bytes());
        let recorded = hashes(&["/cert"], read);
        assert!(check(&recorded, "/cert", read, 1_500).is_empty());
        let d = check(&recorded, "/cert", read, 2_001);
        assert!(d.len() == 1 && d[0].contains("expired at"), "{d:?}");
    }

    #[test]
    fn a_kubeadm_manifest_written_again_is_drift() {
        let read = |p: &str| (p == "/etc/kubernetes/manifests/kube-controller-manager.yaml").then(|| b"kind: Pod".to_vec());
        let line = static_pod_back("/etc/kubernetes/manifests/kube-controller-manager.yaml", read).expect("drift");
        assert!(line.contains("is back"), "{line}");
        assert_eq!(static_pod_back("/etc/kubernetes/manifests/other.yaml", read), None);
        assert_eq!(static_pod_back("", read), None, "no static pod path: nothing to adopt");
    }
}
