//! One rollout step on this master, when the operator gives it a revision: write the
//! files, adopt kubeadm's kcm (move its static pod manifest aside), restart the systemd
//! unit when needed, and wait for kcm to answer /healthz with the certificate just
//! written. A step that does not get healthy in time is rolled back: previous files,
//! previous unit state, kubeadm's static pod back in place. Every step is journaled on the
//! host first ([`crate::journal`]): a helper killed in the middle resumes it or rolls it back.

use std::path::Path;
use std::time::Duration;

use kcm_operator::api::{KcmNode, KcmNodeStatus, KubeControllerManagerSpec, KubeconfigMode, Revision, KCM_LEASE};
use kcm_operator::pki::rfc3339;
use kube::Resource;
use serde_json::json;

use crate::host::{HostFs, HostPath};
use crate::install::{self, InstallError, NewCert, Prepared};
use crate::journal::{self, Journal, JournalFile, Recovery};
use crate::probe;
use crate::systemd::{HostSystemd, SystemdError};

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("kube-controller-manager did not become healthy within {secs}s: {last}")]
    Unhealthy { secs: u64, last: String },
    #[error("kubeadm's kube-controller-manager (pids {pids:?}) still runs {secs}s after its manifest was moved aside")]
    StaticPodLingers { pids: Vec<u32>, secs: u64 },
    #[error("{0}; rolled back")]
    Interrupted(String),
    #[error("hand back refused: {0}; nothing stopped")]
    HandBackRefused(String),
    #[error("kubeadm's kube-controller-manager did not answer /healthz on {addr} within {secs}s: {last}; its manifest put aside again, ours kept running")]
    KubeadmUnhealthy { addr: String, secs: u64, last: String },
}

/// After releasing kcm's Lease, how long (seconds) the restart waits for a follower to take
/// it: a few of kcm's 2 s retry periods.
pub const HANDOFF_WAIT_SECS: u64 = 6;

/// Where kubeadm's manifest is kept while this node's kcm runs under systemd: beside the
/// kubeconfig, outside the kubelet's manifest directory.
pub fn adopted_path(spec: &KubeControllerManagerSpec) -> Option<String> {
    if spec.paths.static_pod_manifest.is_empty() {
        return None;
    }
    let dir = Path::new(&spec.paths.kubeconfig).parent()?;
    Some(dir.join("kube-controller-manager.static-pod.yaml.adopted").display().to_string())
}

/// Where kubeadm's kcm, run with `flags` (its manifest's), answers /healthz on this host: its
/// `--bind-address` (loopback when it binds every address; kubeadm sets 127.0.0.1) and its
/// `--secure-port` (kcm's default 10257).
pub fn kubeadm_healthz(flags: &[(String, Option<String>)]) -> (std::net::IpAddr, u16) {
    let flag = |n: &str| flags.iter().rev().find(|(f, _)| f == n).and_then(|(_, v)| v.clone());
    let ip = flag("bind-address").and_then(|a| a.parse::<std::net::IpAddr>().ok()).filter(|ip| !ip.is_unspecified());
    let ip = ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    (ip, flag("secure-port").and_then(|p| p.parse().ok()).unwrap_or(10257))
}

/// Why kubeadm's kcm could not work with the kubeconfig its manifest names (pure): a client
/// certificate of it (embedded, or a file `read` gives) that expired by `now`, or that cannot
/// be read. `None`: none found wrong (a kubeconfig without certificates is not judged).
pub fn kubeadm_credentials_problem(path: &str, kubeconfig: &str, read: impl Fn(&str) -> Option<Vec<u8>>, now: i64) -> Option<String> {
    let doc: serde_yaml::Value = match serde_yaml::from_str(kubeconfig) {
        Ok(d) => d,
        Err(e) => return Some(format!("kubeadm's kubeconfig {path} is not YAML: {e}")),
    };
    let b64 = |s: &str| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s.trim()).ok();
    for user in doc["users"].as_sequence().into_iter().flatten() {
        let u = &user["user"];
        let pem = match (u["client-certificate-data"].as_str(), u["client-certificate"].as_str()) {
            (Some(data), _) => b64(data),
            (None, Some(file)) => read(file),
            (None, None) => continue,
        };
        let cert = pem.as_deref().and_then(|p| kcm_operator::pki::CertInfo::from_pem(p, "kubeadm's kcm client certificate").ok());
        match cert {
            None => return Some(format!("kubeadm's kubeconfig {path}: its client certificate cannot be read")),
            Some(c) if c.not_after <= now => {
                return Some(format!(
                    "kubeadm's kubeconfig {path}: its client certificate expired at {} (renew it first: kubeadm certs renew controller-manager.conf)",
                    rfc3339(c.not_after)
                ))
            }
            Some(_) => {}
        }
    }
    None
}

/// What the helper reports about its master: its KcmNode's status.
pub type Report = KcmNodeStatus;

/// The server-side apply body for the status of KcmNode `node`, owned by this node's helper
/// (field manager `kcm-node-helper-<node>`): a field left out is a field withdrawn.
pub fn report_body(node: &str, report: &Report) -> serde_json::Value {
    json!({
        "apiVersion": KcmNode::api_version(&()),
        "kind": KcmNode::kind(&()),
        "metadata": {"name": node},
        "status": report,
    })
}

/// The helper's handles for one master.
pub struct Node<'a> {
    pub client: &'a kube::Client,
    pub host: &'a HostFs,
    pub systemd: &'a HostSystemd,
    pub name: &'a str,
    /// Where a new certificate comes from: the operator's signer, or on day 0 the pair
    /// `bootstrap` issued (which also gives the master's addresses).
    pub issuer: install::Issuer<'a>,
    pub journal: &'a JournalFile<'a>,
    /// This master's kernel hostname: kcm's Lease identity begins with it.
    pub hostname: Option<&'a str>,
}

impl Node<'_> {
    /// Applies `revision`, journaled: a step an earlier helper was killed in is resumed
    /// (its files and certificate request reused) or, past [`journal::MAX_ATTEMPTS`], rolled
    /// back. On failure the host is put back as the journal says it was.
    pub async fn apply(&self, spec: &KubeControllerManagerSpec, target: &Revision) -> Result<Report, StepError> {
        let revision = target.to_string();
        let revision = revision.as_str();
        let found = self.journal.load()?;
        if let Some(report) = found.as_ref().filter(|j| j.revision == revision).and_then(|j| j.applied.clone()) {
            // It ended healthy before an earlier helper could report it: report it, redo nothing.
            tracing::info!(node = self.name, revision, "the step had ended healthy before the helper stopped: reporting it");
            return Ok(report);
        }
        let prepared = match self.issuer {
            install::Issuer::Local { id, .. } => install::prepare_for(self.host, spec, id.clone()).await?,
            install::Issuer::Signer { .. } => install::prepare(self.client, self.host, spec, self.name).await?,
        };
        let mut j = match self.resume(spec, found, revision).await? {
            Some(j) => j,
            None => self.begin(revision, &prepared).await?,
        };
        self.journal.save(&j)?;
        let result = self.run_step(spec, target, &prepared, &mut j).await;
        match result {
            Ok(report) => {
                // Healthy: the previous versions are no longer needed, nor the journaled key.
                // The journal stays, as `applied`, until the report is in the API
                // ([`Node::reported`]).
                for hp in prepared.paths.written() {
                    self.host.forget_previous(hp)?;
                }
                j.request = None;
                j.applied = Some(report.clone());
                if let Err(e) = self.journal.save(&j) {
                    // Never leave the journaled key behind: without the marker, a helper
                    // killed before the report applies the step again (idempotent, no new
                    // certificate).
                    tracing::error!(node = self.name, "marking the step applied in its journal: {e}; removing the journal");
                    self.journal.remove()?;
                }
                journal::crash_point(self.host, "step-applied");
                Ok(report)
            }
            Err(e) => {
                self.roll_back(spec, &j).await;
                self.journal.remove()?;
                Err(e)
            }
        }
    }

    /// The journal `found` for step `revision`: resumed (`Some`, one more attempt), or, past
    /// [`journal::MAX_ATTEMPTS`], rolled back (`Err`). `None`: a new step begins; an
    /// interrupted step of another revision is rolled back first (a finished one has nothing
    /// to roll back).
    async fn resume(&self, spec: &KubeControllerManagerSpec, found: Option<Journal>, revision: &str) -> Result<Option<Journal>, StepError> {
        match found {
            Some(mut j) if j.revision == revision => {
                if let Recovery::RollBack { why } = journal::recovery(&j, Some(revision)) {
                    self.roll_back(spec, &j).await;
                    self.journal.remove()?;
                    return Err(StepError::Interrupted(why));
                }
                j.attempts += 1;
                tracing::warn!(node = self.name, revision, attempt = j.attempts, "resuming a step an earlier helper did not finish");
                Ok(Some(j))
            }
            other => {
                if let Some(stale) = other.filter(|j| j.applied.is_none()) {
                    tracing::warn!(node = self.name, stale = %stale.revision, "rolling back an interrupted step first");
                    self.roll_back(spec, &stale).await;
                }
                Ok(None)
            }
        }
    }

    /// The report of an applied step is in the API: its journal goes.
    pub fn reported(&self, applied_revision: Option<&str>) -> Result<(), StepError> {
        let Some(j) = self.journal.load()? else { return Ok(()) };
        if j.applied.is_some() && applied_revision == Some(j.revision.as_str()) {
            journal::crash_point(self.host, "step-reported");
            self.journal.remove()?;
        }
        Ok(())
    }

    /// A new step's journal: the state before it. A `.prev` left from an earlier step is
    /// removed, so after this one a `.prev` always means "this step rewrote the file".
    async fn begin(&self, revision: &str, p: &Prepared) -> Result<Journal, StepError> {
        let mut files = Vec::new();
        for hp in p.paths.written() {
            self.host.forget_previous(hp)?;
            files.push((hp.host.display().to_string(), self.host.read_optional(hp)?.is_some()));
        }
        let was_active = self.systemd.state().await?.is_active();
        Ok(Journal { revision: revision.into(), attempts: 1, was_active, files, request: None, adopting: false, restarted: false, applied: None })
    }

    /// Whether this step rewrote or created the file (on any attempt).
    fn changed(&self, j: &Journal, hp: &HostPath) -> bool {
        let existed = j.files.iter().any(|(p, e)| *e && Path::new(p) == hp.host);
        self.host.has_previous(hp) || (!existed && hp.local.exists())
    }

    async fn run_step(&self, spec: &KubeControllerManagerSpec, target: &Revision, prepared: &Prepared, j: &mut Journal) -> Result<Report, StepError> {
        let revision = target.to_string();
        let revision = revision.as_str();
        let new_cert = target.renews().map_or(NewCert::IfNeeded, NewCert::Replacing);
        let installed = install::write(self.client, self.host, spec, prepared, self.issuer, new_cert, revision, Some((self.journal, &mut *j))).await?;
        journal::crash_point(self.host, "unit-written");
        tracing::info!(node = self.name, revision, changed = ?installed.changed, new_cert = installed.new_cert, "files written");
        self.adopt(spec, j).await?;
        let unit_now = self.systemd.state().await?;
        let p = &prepared.paths;
        // A repair always restarts: the kcm it replaces is unhealthy or runs drifted files.
        let repair = target.repair_at().is_some();
        let needs_restart = j.adopting
            || repair
            || !unit_now.is_active()
            || self.changed(j, &p.unit)
            || self.changed(j, &p.kubeconfig)
            || (self.changed(j, &p.cert) && spec.certificate.kubeconfig_mode == KubeconfigMode::Embedded);
        if needs_restart {
            // Journaled first: from here on a rollback restarts kcm on the old files.
            if !j.restarted {
                j.restarted = true;
                self.journal.save(j)?;
            }
            self.restart_with_handoff().await?;
        }
        self.wait_healthy(spec, prepared, &installed.cert.serial_hex).await?;
        Ok(Report {
            file_hashes: self.written_hashes(prepared),
            applied_revision: Some(revision.into()),
            cert_serial: Some(installed.cert.serial_hex.clone()),
            not_after: Some(rfc3339(installed.cert.not_after)),
            not_before: Some(rfc3339(installed.cert.not_before)),
            kcm_version: Some(installed.kcm_version.to_string()),
            unit_active: true,
            healthy: true,
            warnings: installed.warnings.clone(),
            message: Some(format!("revision {revision} healthy{}", if needs_restart { " after restart" } else { " without restart" })),
            ..Default::default()
        })
    }

    /// Rolls back an interrupted step the journal names when it is not the one asked for
    /// now (`pending`: the node's target while unapplied). Returns what was done.
    pub async fn recover(&self, spec: &KubeControllerManagerSpec, pending: Option<&Revision>) -> Result<Option<String>, StepError> {
        let pending = pending.map(Revision::to_string);
        let pending = pending.as_deref();
        let Some(j) = self.journal.load()? else { return Ok(None) };
        if pending == Some(j.revision.as_str()) {
            return Ok(None); // apply() resumes it, or reports it when it ended
        }
        let why = match journal::recovery(&j, pending) {
            Recovery::RollBack { why } => why,
            Recovery::Resume => return Ok(None),
            Recovery::Applied => {
                // It ended healthy, and the target has moved on since: nothing to undo.
                tracing::info!(node = self.name, revision = %j.revision, "removing the journal of a step that had ended healthy");
                self.journal.remove()?;
                return Ok(None);
            }
        };
        tracing::warn!(node = self.name, "{why}: rolling back");
        self.roll_back(spec, &j).await;
        self.journal.remove()?;
        Ok(Some(why))
    }

    /// Hands this master back to kubeadm's kcm (`spec.handBack`): its static pod manifest put
    /// back (the one kept aside at adoption, or one kubeadm wrote since), kubeadm's kcm
    /// answering /healthz, and only then our unit stopped (the Lease handed off first when it
    /// leads) and disabled: the master is never without a kcm. Refused before anything is
    /// touched with no manifest, or with kubeadm's kubeconfig unusable. On the master whose
    /// kcm leads, ours stops first (see below). Journaled like a
    /// step: a helper killed in the middle resumes it; kubeadm's kcm not healthy in time puts
    /// the manifest aside again, our kcm still running.
    pub async fn hand_back(&self, spec: &KubeControllerManagerSpec, target: &Revision) -> Result<Report, StepError> {
        let revision = target.to_string();
        let found = self.journal.load()?;
        if let Some(report) = found.as_ref().filter(|j| j.revision == revision).and_then(|j| j.applied.clone()) {
            tracing::info!(node = self.name, revision, "the hand back had ended before the helper stopped: reporting it");
            return Ok(report);
        }
        let kept = adopted_path(spec)
            .ok_or_else(|| StepError::HandBackRefused("spec.paths.staticPodManifest is empty: no kubeadm static pod to hand back to".into()))?;
        let kept = self.host.resolve("adoptedStaticPod", &kept)?;
        let manifest = self.host.resolve("staticPodManifest", &spec.paths.static_pod_manifest)?;
        let placed = self.host.read_optional(&manifest)?;
        let body = match placed.clone() {
            Some(b) => b,
            None => self.host.read_optional(&kept)?.ok_or_else(|| {
                StepError::HandBackRefused(format!("no kubeadm manifest kept aside at {} (nor one at {})", kept.host.display(), manifest.host.display()))
            })?,
        };
        let flags = kcm_operator::render::static_pod_flags(&String::from_utf8_lossy(&body))
            .map_err(|e| StepError::HandBackRefused(format!("kubeadm's manifest {}: {e}", kept.host.display())))?;
        if let Some(kc) = flags.iter().rev().find(|(f, _)| f == "kubeconfig").and_then(|(_, v)| v.clone()) {
            let hp = self.host.resolve("kubeadm's kubeconfig", &kc).map_err(|e| StepError::HandBackRefused(e.to_string()))?;
            let text = self.host.read_optional(&hp)?.ok_or_else(|| StepError::HandBackRefused(format!("kubeadm's kubeconfig {kc} is missing")))?;
            let read = |p: &str| self.host.resolve("kubeadm's client certificate", p).ok().and_then(|hp| self.host.read_optional(&hp).ok().flatten());
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            if let Some(problem) = kubeadm_credentials_problem(&kc, &String::from_utf8_lossy(&text), read, now) {
                return Err(StepError::HandBackRefused(problem));
            }
        }
        let mut j = match self.resume(spec, found, &revision).await? {
            Some(j) => j,
            None => {
                let was_active = self.systemd.state().await?.is_active();
                let files = vec![(manifest.host.display().to_string(), placed.is_some())];
                Journal { revision: revision.clone(), attempts: 1, was_active, files, request: None, adopting: false, restarted: false, applied: None }
            }
        };
        self.journal.save(&j)?;
        // Our kcm leads: it goes first, and its Lease to a kcm on another master (already
        // handed back, or ours), since a kcm process left on this host (kubeadm's, starting)
        // would keep the fence from releasing it: 15 s without a leader. This master then runs
        // no kcm until kubeadm's serves (decide lets the leader's master go only while every
        // other master serves). A follower's kcm stops only once kubeadm's serves.
        if self.holds_kcm_lease().await {
            j.restarted = true;
            self.journal.save(&j)?;
            self.stop_with_handoff(true).await?;
        }
        if placed.is_none() {
            self.host.write_atomic(&manifest, &body, 0o600)?;
            tracing::info!(node = self.name, manifest = %manifest.host.display(), "kubeadm's kcm static pod manifest put back");
        }
        journal::crash_point(self.host, "static-pod-back");
        let (ip, port) = kubeadm_healthz(&flags);
        if let Err(e) = self.wait_kubeadm_healthy(spec, ip, port).await {
            self.roll_back(spec, &j).await;
            self.journal.remove()?;
            return Err(e);
        }
        // From here a rollback restarts ours (handing the Lease off): journaled first.
        if !j.restarted {
            j.restarted = true;
            self.journal.save(&j)?;
        }
        let held = self.holds_kcm_lease().await;
        self.stop_with_handoff(held).await?;
        self.systemd.systemctl(&["disable", &self.systemd.unit]).await?;
        self.host.forget_previous(&manifest)?;
        let report = Report {
            applied_revision: Some(revision.clone()),
            unit_active: false,
            // kubeadm's kcm answers /healthz here: the master has a working kcm.
            healthy: true,
            kcm_version: None,
            message: Some(format!("handed back: kubeadm's kcm static pod answers /healthz on {ip}:{port}; {} stopped and disabled", self.systemd.unit)),
            ..Default::default()
        };
        j.applied = Some(report.clone());
        if let Err(e) = self.journal.save(&j) {
            tracing::error!(node = self.name, "marking the hand back applied in its journal: {e}; removing the journal");
            self.journal.remove()?;
        }
        tracing::info!(node = self.name, revision, "handed back to kubeadm's kcm");
        Ok(report)
    }

    /// Waits until a kcm not of our unit runs on this host and answers /healthz on `ip:port`.
    async fn wait_kubeadm_healthy(&self, spec: &KubeControllerManagerSpec, ip: std::net::IpAddr, port: u16) -> Result<(), StepError> {
        // The kubelet has to see the manifest and start the container first.
        let secs = u64::from(spec.kcm.health_timeout_seconds) + 60;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let proc_root = self.host.root().join("proc");
        let mut last = String::from("no kcm of kubeadm's running yet");
        while tokio::time::Instant::now() < deadline {
            if !foreign_kcm_pids(&proc_root).is_empty() {
                match probe::healthz_unverified(ip, port, Duration::from_secs(3)).await {
                    Ok(h) if h.ok() => return Ok(()),
                    Ok(h) => last = format!("status {} body {:?}", h.status, h.body.trim()),
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(StepError::KubeadmUnhealthy { addr: format!("{ip}:{port}"), secs, last })
    }

    /// Restarts the unit. When this master's kcm holds kcm's Lease, it is stopped first and,
    /// once confirmed down, the Lease is released (as client-go releases it), so a running
    /// follower takes over within its retry period instead of waiting out the lease.
    async fn restart_with_handoff(&self) -> Result<(), StepError> {
        self.systemd.reload_enable().await?;
        if !self.holds_kcm_lease().await {
            self.systemd.systemctl(&["restart", &self.systemd.unit]).await?;
            return Ok(());
        }
        self.stop_with_handoff(true).await?;
        self.systemd.systemctl(&["start", &self.systemd.unit]).await?;
        Ok(())
    }

    /// Stops the unit; when this master's kcm held kcm's Lease and no kcm process is left on
    /// this host, releases the Lease and waits a little for a kcm elsewhere to take it.
    /// `held`: whether this master's kcm held the Lease just before (the caller looked).
    async fn stop_with_handoff(&self, held: bool) -> Result<(), StepError> {
        // `systemctl stop` returns once the process has exited (or was killed at TimeoutStopSec).
        self.systemd.systemctl(&["stop", &self.systemd.unit]).await?;
        journal::crash_point(self.host, "unit-stopped");
        let state = self.systemd.state().await?;
        let proc_root = self.host.root().join("proc");
        // The fence's rule: no kube-controller-manager process of any kind left on this host
        // (another unit or a static pod may hold the Lease, alive).
        let left = crate::systemd::kcm_pids(&proc_root);
        if !left.is_empty() {
            tracing::warn!(node = self.name, pids = ?left, "kcm stopped but kube-controller-manager process(es) remain on this host: Lease not released");
        }
        if held && state.main_pid == 0 && left.is_empty() {
            match self.release_kcm_lease().await {
                Ok(true) => {
                    tracing::info!(node = self.name, "kcm stopped and confirmed down: released its Lease for a follower");
                    // Let a follower on another master take it before this kcm comes back
                    // (it would otherwise often win the race it just left).
                    match self.follower_takes_over(Duration::from_secs(HANDOFF_WAIT_SECS)).await {
                        Some(h) => tracing::info!(node = self.name, holder = %h, "a follower leads"),
                        None => tracing::warn!(node = self.name, "no follower took kcm's Lease within {HANDOFF_WAIT_SECS}s: starting this kcm anyway"),
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(node = self.name, "releasing kcm's Lease: {e} (a follower takes over when it expires)"),
            }
        }
        Ok(())
    }

    /// A rollback of a step that never restarted kcm: the unit reloaded (its file may be
    /// back), started only if it does not run.
    async fn keep_running(&self) -> Result<(), StepError> {
        self.systemd.reload_enable().await?;
        if !self.systemd.state().await?.is_active() {
            self.systemd.systemctl(&["start", &self.systemd.unit]).await?;
        } else {
            tracing::info!(node = self.name, "rollback: kcm was not restarted by the step and keeps running");
        }
        Ok(())
    }

    /// Waits until kcm's Lease names a holder on another master; returns it.
    async fn follower_takes_over(&self, within: Duration) -> Option<String> {
        let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(self.client.clone(), KCM_LEASE.0);
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let holder = api.get(KCM_LEASE.1).await.ok().and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
            if let Some(h) = holder.filter(|h| !kcm_operator::rollout::holder_is(Some(h), self.name, self.hostname)) {
                return Some(h);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    }

    async fn holds_kcm_lease(&self) -> bool {
        let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(self.client.clone(), KCM_LEASE.0);
        let holder = api.get(KCM_LEASE.1).await.ok().and_then(|l| l.spec).and_then(|s| s.holder_identity);
        kcm_operator::rollout::holder_is(holder.as_deref(), self.name, self.hostname)
    }

    /// Empties kcm's Lease if this master still holds it (resourceVersion-guarded), once
    /// this master's kcm is confirmed down.
    async fn release_kcm_lease(&self) -> Result<bool, kube::Error> {
        let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(self.client.clone(), KCM_LEASE.0);
        let lease = api.get(KCM_LEASE.1).await?;
        let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) else { return Ok(false) };
        if !kcm_operator::rollout::holder_is(Some(&holder), self.name, self.hostname) {
            return Ok(false);
        }
        crate::fence::release(&api, lease, &holder).await
    }

    /// Moves kubeadm's static pod manifest aside (journaled first) and waits until its kcm
    /// is gone.
    async fn adopt(&self, spec: &KubeControllerManagerSpec, j: &mut Journal) -> Result<(), StepError> {
        let Some(kept) = adopted_path(spec) else { return Ok(()) };
        let manifest = self.host.resolve("staticPodManifest", &spec.paths.static_pod_manifest)?;
        match self.host.read_optional(&manifest)? {
            Some(body) => {
                let kept = self.host.resolve("adoptedStaticPod", &kept)?;
                j.adopting = true;
                self.journal.save(j)?;
                self.host.write_atomic(&kept, &body, 0o600)?;
                std::fs::remove_file(&manifest.local).map_err(|source| crate::host::HostError::Io {
                    op: "move aside",
                    path: manifest.local.clone(),
                    source,
                })?;
                tracing::info!(node = self.name, kept = %kept.host.display(), "kubeadm's kcm static pod moved aside");
                journal::crash_point(self.host, "static-pod-moved");
            }
            // Moved aside by an earlier attempt of this step: its kcm may still be going.
            None if j.adopting => {}
            None => return Ok(()),
        }
        let proc_root = self.host.root().join("proc");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let pids = foreign_kcm_pids(&proc_root);
            if pids.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::StaticPodLingers { pids, secs: 90 });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_healthy(&self, spec: &KubeControllerManagerSpec, p: &Prepared, serial: &str) -> Result<(), StepError> {
        let secs = u64::from(spec.kcm.health_timeout_seconds);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut last = String::from("no probe yet");
        while tokio::time::Instant::now() < deadline {
            match probe::healthz(p.id.primary_ip(), spec.kcm.secure_port, &p.ca_pem, Duration::from_secs(3)).await {
                Ok(h) if h.ok() && h.serial_hex.eq_ignore_ascii_case(serial) => return Ok(()),
                Ok(h) => last = format!("status {} body {:?} serving serial {}", h.status, h.body.trim(), h.serial_hex),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(StepError::Unhealthy { secs, last })
    }

    /// Puts the node back as the journal says it was before the step: each file it rewrote
    /// from its `.prev`, each it created removed, the unit as active or inactive as it was,
    /// kubeadm's static pod back if the step moved it. Best effort: every failure is logged.
    async fn roll_back(&self, spec: &KubeControllerManagerSpec, j: &Journal) {
        tracing::warn!(node = self.name, revision = %j.revision, "rolling back");
        for (path, existed) in &j.files {
            let hp = match self.host.resolve("journaled file", path) {
                Ok(hp) => hp,
                Err(e) => {
                    tracing::error!("rollback of {path}: {e}");
                    continue;
                }
            };
            match self.host.restore_previous(&hp) {
                Ok(true) => {}
                // A file this step created: remove it, the node had none.
                Ok(false) if !existed && hp.local.exists() => remove_logged(&hp),
                Ok(false) => {}
                Err(e) => tracing::error!("rollback of {path}: {e}"),
            }
        }
        let unit_result = match journal::unit_rollback(j) {
            journal::UnitRollback::Stop => self.systemd.stop_disable().await.map_err(StepError::from),
            // Never a plain restart of the leader: the Lease goes to a follower first.
            journal::UnitRollback::Restart => self.restart_with_handoff().await,
            journal::UnitRollback::KeepRunning => self.keep_running().await,
        };
        if let Err(e) = unit_result {
            tracing::error!("rollback of the unit: {e}");
        }
        if j.adopting {
            if let Some(kept) = adopted_path(spec) {
                let restore = async {
                    let kept = self.host.resolve("adoptedStaticPod", &kept)?;
                    let manifest = self.host.resolve("staticPodManifest", &spec.paths.static_pod_manifest)?;
                    if self.host.read_optional(&manifest)?.is_none() {
                        let body = self.host.read(&kept)?;
                        self.host.write_atomic(&manifest, &body, 0o600)?;
                    }
                    Ok::<_, crate::host::HostError>(())
                };
                match restore.await {
                    Ok(()) => tracing::warn!(node = self.name, "kubeadm's kcm static pod restored"),
                    Err(e) => tracing::error!("restoring kubeadm's static pod: {e}"),
                }
            }
        }
    }

    /// SHA-256 of the files a step writes (key, cert, kubeconfig, unit), as they are now.
    pub fn written_hashes(&self, p: &Prepared) -> std::collections::BTreeMap<String, String> {
        p.paths
            .written()
            .into_iter()
            .filter_map(|hp| self.host.read_optional(hp).ok().flatten().map(|b| (hp.host.display().to_string(), crate::drift::sha256_hex(&b))))
            .collect()
    }

    /// On a master handed back: whether our unit is active (it should not be), and whether
    /// kubeadm's kcm answers /healthz where its manifest says.
    pub async fn observe_handed_back(&self, spec: &KubeControllerManagerSpec) -> (bool, bool) {
        let active = self.systemd.state().await.map(|s| s.is_active()).unwrap_or(false);
        let manifest = self.host.resolve("staticPodManifest", &spec.paths.static_pod_manifest).ok().and_then(|hp| self.host.read_optional(&hp).ok().flatten());
        let Some(flags) = manifest.and_then(|b| kcm_operator::render::static_pod_flags(&String::from_utf8_lossy(&b)).ok()) else { return (active, false) };
        let (ip, port) = kubeadm_healthz(&flags);
        (active, probe::healthz_unverified(ip, port, Duration::from_secs(3)).await.is_ok_and(|h| h.ok()))
    }

    /// The unit's state and health as they are, for reports between steps.
    pub async fn observe(&self, spec: &KubeControllerManagerSpec, ca_pem: &str, ip: std::net::IpAddr) -> (bool, bool) {
        let active = self.systemd.state().await.map(|s| s.is_active()).unwrap_or(false);
        let healthy = active && probe::healthz(ip, spec.kcm.secure_port, ca_pem, Duration::from_secs(3)).await.is_ok_and(|h| h.ok());
        (active, healthy)
    }
}

fn remove_logged(hp: &HostPath) {
    if let Err(e) = std::fs::remove_file(&hp.local) {
        tracing::error!("removing {}: {e}", hp.host.display());
    }
}

/// kube-controller-manager processes not started by our unit (kubeadm's static pod).
pub fn foreign_kcm_pids(proc_root: &Path) -> Vec<u32> {
    crate::systemd::kcm_pids(proc_root)
        .into_iter()
        .filter(|pid| {
            let cg = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).unwrap_or_default();
            !cg.contains("kube-controller-manager.service")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_manifest_lives_beside_the_kubeconfig() {
        let spec: KubeControllerManagerSpec =
            serde_json::from_value(json!({"apiserverUrl": "https://x:6443", "paths": {"kubeconfig": "/etc/kubernetes/kcm/kcm.kubeconfig"}})).unwrap();
        assert_eq!(adopted_path(&spec).as_deref(), Some("/etc/kubernetes/kcm/kube-controller-manager.static-pod.yaml.adopted"));
        let mut none = spec.clone();
        none.paths.static_pod_manifest.clear();
        assert_eq!(adopted_path(&none), None);
    }

    #[test]
    fn kubeadm_kcm_answers_where_its_manifest_binds() {
        let f = |v: &[(&str, &str)]| v.iter().map(|(n, v)| (n.to_string(), Some(v.to_string()))).collect::<Vec<_>>();
        assert_eq!(kubeadm_healthz(&f(&[("bind-address", "127.0.0.1")])), ("127.0.0.1".parse().unwrap(), 10257));
        assert_eq!(kubeadm_healthz(&f(&[("bind-address", "0.0.0.0"), ("secure-port", "10259")])), ("127.0.0.1".parse().unwrap(), 10259));
        assert_eq!(kubeadm_healthz(&f(&[("bind-address", "10.0.0.5")])), ("10.0.0.5".parse().unwrap(), 10257));
        assert_eq!(kubeadm_healthz(&[]), ("127.0.0.1".parse().unwrap(), 10257));
    }

    #[test]
    fn kubeadm_credentials_that_expired_refuse_the_hand_back() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_000).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_000).unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &pem);
        let embedded = format!("users:\n- name: u\n  user:\n    client-certificate-data: {data}\n");
        let none = |_: &str| None;
        assert_eq!(kubeadm_credentials_problem("/k", &embedded, none, 1_500), None);
        let p = kubeadm_credentials_problem("/k", &embedded, none, 2_000).expect("expired");
        assert!(p.contains("expired at") && p.contains("kubeadm certs renew"), "{p}");
        let by_file = "users:\n- name: u\n  user:\n    client-certificate: /etc/kubernetes/pki/cm.crt\n";
        let read = |f: &str| (f == "/etc/kubernetes/pki/cm.crt").then(|| pem.clone().into_bytes());
        assert!(kubeadm_credentials_problem("/k", by_file, read, 2_500).is_some_and(|p| p.contains("expired")));
        assert!(kubeadm_credentials_problem("/k", by_file, none, 1_500).is_some_and(|p| p.contains("cannot be read")));
        assert_eq!(kubeadm_credentials_problem("/k", "users:\n- name: u\n  user:\n    token: abc\n", none, 2_500), None, "no certificate: not judged");
        assert!(kubeadm_credentials_problem("/k", "{", none, 0).is_some());
    }

    #[test]
    fn report_body_is_the_kcm_node_status_only() {
        let r = Report { applied_revision: Some("r1".into()), healthy: true, ..Default::default() };
        let body = report_body("m1", &r);
        assert_eq!((body["kind"].as_str(), body["metadata"]["name"].as_str()), (Some("KcmNode"), Some("m1")));
        assert_eq!(body["status"]["appliedRevision"], "r1");
        assert!(body.get("spec").is_none(), "the operator owns the spec");
        assert!(body["status"].get("observedAt").is_none(), "left out: withdrawn");
    }
}
