//! Day 0 on a master with no kubelet yet, in the seed's order (etcd and the apiserver
//! first, then kcm, then the kubelets, whose TLS bootstrap needs kcm's CSR signing): no
//! operator pod and no helper pod can run, so nothing of ours reaches the master through
//! the API. `node-helper bootstrap`, run as root on each master (the seed's ssh loop), does
//! that master's first step itself:
//!
//! - checks the host before anything is written: the host lock free, systemd there, the
//!   kcm binary and its `--help`, every path of the CR, the CA pair at `paths.caCert` and
//!   `paths.caKey` (the key belongs to the certificate), no kube-controller-manager running
//!   from anyone else's files;
//! - issues the master's first certificate with that CA by the operator's signer's own rules
//!   ([`kcm_operator::signer::issue_locally`]) and pre-flights it against the CR's apiserver (a
//!   CA the apiserver does not trust fails here);
//! - applies the CR's spec revision as a journaled step ([`crate::step::Node::apply`]): key,
//!   cert, kubeconfig and unit written by the same renderer, kcm started and healthy, all
//!   rolled back on failure; the kcm Lease seen with kcm's own new identity;
//! - places the operator's static pod manifest for when the kubelet comes.
//!
//! When the kubelets and `kubectl apply -k` follow, the operator's first step for this
//! master is the same revision: its helper finds this step's journal (applied) and reports
//! it, or finds the files already what it would write and keeps the certificate; kcm is not
//! restarted. The first renewal goes through the CSR API like any other.

use std::net::IpAddr;

use kcm_operator::api::{KubeControllerManagerSpec, Revision, OPERATOR_MANIFEST};
use kcm_operator::pki::NodeIdentity;
use kcm_operator::signer::Ca;

use crate::host::HostFs;
use crate::install::{self, Issuer};
use crate::journal::JournalFile;
use crate::step::Node;
use crate::systemd::HostSystemd;

/// What one bootstrap is given.
pub struct Bootstrap<'a> {
    pub host: &'a HostFs,
    pub spec: &'a KubeControllerManagerSpec,
    pub node_name: &'a str,
    /// The master's addresses, as its kubelet will report them as InternalIP (the first is
    /// kcm's bind address): the certificate's IP SANs. Others make the operator's first step
    /// a new certificate and a restart.
    pub node_ips: &'a [IpAddr],
    /// Host path of the step journal.
    pub journal: &'a str,
    /// The kubelet's static pod directory and the operator's image; `None`: not placed.
    pub operator_pod: Option<(&'a str, &'a str)>,
}

/// What a bootstrap did.
#[derive(Debug)]
pub struct Done {
    pub revision: String,
    pub cert_serial: String,
    pub not_after: String,
    pub kcm_version: String,
    pub message: String,
    pub operator_pod: Option<String>,
}

/// Why this master's kcm is not ours to bootstrap, if it is not (pure): a kcm process
/// outside the unit (kubeadm's static pod, another unit), or the unit running from a file
/// other than the one the step would write. An inactive unit with another file is taken
/// over: the step keeps its file as `.prev` and puts it back on failure.
pub fn refusal(unit_path: &str, unit_on_host: Option<&str>, unit_active: bool, rendered: &str, outside_pids: &[u32]) -> Option<String> {
    if !outside_pids.is_empty() {
        return Some(format!(
            "kube-controller-manager process(es) {outside_pids:?} run outside {unit_path} (kubeadm's static pod, or another unit): stop them first"
        ));
    }
    let theirs = unit_on_host.filter(|u| unit_active && *u != rendered)?;
    let (a, b): (Vec<&str>, Vec<&str>) = (theirs.lines().collect(), rendered.lines().collect());
    let (n, here, ours) = (0..a.len().max(b.len()))
        .find(|&i| a.get(i) != b.get(i))
        .map(|i| (i + 1, a.get(i).copied().unwrap_or("<end>"), b.get(i).copied().unwrap_or("<end>")))
        .unwrap_or((0, "", ""));
    Some(format!(
        "{unit_path} runs kcm from a unit this command did not write (line {n}: {here:?} here, {ours:?} from the CR): \
         stop it (systemctl disable --now {}) and run bootstrap again, or leave this master's kcm as it is",
        std::path::Path::new(unit_path).file_name().and_then(|n| n.to_str()).unwrap_or(unit_path)
    ))
}

/// The whole day-0 step for one master. Nothing is written until every check passed; a
/// failed step is rolled back from its journal.
pub async fn run(b: &Bootstrap<'_>) -> anyhow::Result<Done> {
    use anyhow::Context;
    let spec = b.spec;
    let _lock = crate::lock::try_lock(b.host.root())?
        .with_context(|| format!("a node-helper acts on this master (host lock {} held): stop it first", crate::lock::LOCK_PATH))?;
    anyhow::ensure!(!b.node_ips.is_empty(), "no --node-ip given: the certificate's IP SANs and kcm's bind address");
    let id = NodeIdentity { name: b.node_name.to_string(), ips: b.node_ips.to_vec() };
    let prepared = install::prepare_for(b.host, spec, id.clone()).await.context("checking the host")?;
    let ca_key = b.host.resolve("caKey", &spec.paths.ca_key)?;
    let key_pem =
        b.host.read(&ca_key).with_context(|| format!("paths.caKey {}: the cluster CA's key is needed to issue the first certificate", spec.paths.ca_key))?;
    let ca = Ca::from_pem(&prepared.ca_pem, &String::from_utf8_lossy(&key_pem))
        .with_context(|| format!("the CA pair {} / {}", spec.paths.ca_cert, spec.paths.ca_key))?;
    let systemd = HostSystemd::for_unit_file(&spec.paths.unit);
    let state = systemd.state().await.context("asking systemd about kcm's unit (is this a systemd host, and are we root?)")?;
    let unit_on_host = b.host.read_optional(&prepared.paths.unit)?.map(|u| String::from_utf8_lossy(&u).into_owned());
    let outside = crate::step::foreign_kcm_pids(&b.host.root().join("proc"));
    if let Some(why) = refusal(&spec.paths.unit, unit_on_host.as_deref(), state.is_active(), &prepared.files.unit, &outside) {
        anyhow::bail!("{why}; nothing was written");
    }
    // A pair an earlier bootstrap left (usable for this master and spec) is kept.
    let (cert_pem, key_pem) = match install::usable_pair(b.host, spec, &prepared)? {
        Some((c, k, _)) => (c, k),
        None => {
            kcm_operator::signer::issue_locally(spec, &id, &ca, kcm_operator::identity::now()).context("issuing the first certificate with the cluster CA")?
        }
    };
    install::preflight(spec, &prepared.ca_pem, &cert_pem, &key_pem)
        .await
        .map_err(|why| anyhow::anyhow!("the new certificate does not work against {}: {why}; nothing was written", spec.apiserver_url))?;
    // kcm's own identity reads kcm's Lease (a restart of a leading kcm hands it over first).
    let client = install::kcm_client(spec, &prepared.ca_pem, &cert_pem, &key_pem).await.map_err(anyhow::Error::msg)?;
    let journal = JournalFile::new(b.host, b.journal)?;
    // A journal an earlier bootstrap marked applied was never reported (no API for it then):
    // this run redoes the step (idempotent: same files, no restart when kcm runs them).
    if journal.load()?.is_some_and(|j| j.applied.is_some()) {
        journal.remove()?;
    }
    let hostname = crate::host::hostname();
    let node = Node {
        client: &client,
        host: b.host,
        systemd: &systemd,
        name: b.node_name,
        issuer: Issuer::Local { id: &id, cert_pem: &cert_pem, key_pem: &key_pem },
        journal: &journal,
        hostname: hostname.as_deref(),
    };
    let revision = Revision::apply(&kcm_operator::render::spec_revision(spec));
    let report = node.apply(spec, &revision).await.with_context(|| format!("step {revision} (rolled back)"))?;
    let operator_pod = match b.operator_pod {
        None => None,
        Some((dir, image)) => {
            let target = format!("{}/{OPERATOR_MANIFEST}", dir.trim_end_matches('/'));
            let hp = b.host.resolve("operatorStaticPod", &target)?;
            b.host.write_atomic_no_prev(&hp, kcm_operator::staticpod::operator_pod(spec, image).as_bytes(), 0o600)?;
            Some(target)
        }
    };
    Ok(Done {
        revision: revision.to_string(),
        cert_serial: report.cert_serial.unwrap_or_default(),
        not_after: report.not_after.unwrap_or_default(),
        kcm_version: report.kcm_version.unwrap_or_default(),
        message: report.message.unwrap_or_default(),
        operator_pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "/etc/systemd/system/kube-controller-manager.service";

    #[test]
    fn kcm_outside_the_unit_is_refused() {
        let why = refusal(UNIT, None, false, "ours\n", &[42]).unwrap();
        assert!(why.contains("[42]") && why.contains("static pod"), "{why}");
    }

    #[test]
    fn a_running_unit_with_other_files_is_refused_naming_the_first_difference() {
        let why = refusal(UNIT, Some("[Unit]\nExecStart=/usr/bin/kcm --v=2\n"), true, "[Unit]\nExecStart=/opt/kcm\n", &[]).unwrap();
        assert!(why.contains("line 2") && why.contains("--v=2") && why.contains("/opt/kcm"), "{why}");
        assert!(why.contains("systemctl disable --now kube-controller-manager.service"), "{why}");
        let longer = refusal(UNIT, Some("a\n"), true, "a\nb\n", &[]).unwrap();
        assert!(longer.contains("line 2: \"<end>\" here, \"b\""), "{longer}");
    }

    #[test]
    fn our_own_unit_or_an_inactive_one_is_taken() {
        assert_eq!(refusal(UNIT, Some("ours\n"), true, "ours\n", &[]), None, "a second run of the same CR");
        assert_eq!(refusal(UNIT, Some("theirs\n"), false, "ours\n", &[]), None, "an inactive unit: the step keeps it as .prev");
        assert_eq!(refusal(UNIT, None, false, "ours\n", &[]), None);
    }
}
