//! The step journal: one JSON file on the host, written before a step changes anything, so
//! a helper killed in the middle of a step (SIGKILL, OOM, a node reboot) knows what it was
//! doing when it starts again. It records the state before the step (was the unit active,
//! which files existed: their previous content is `<file>.prev` once the step rewrote them),
//! the certificate request under way (key and CSR name, so a resumed step waits for the same
//! certificate instead of asking for a second one), and whether kubeadm's static pod
//! manifest is being moved aside, and whether the step has restarted kcm yet: a rollback
//! restarts kcm (handing its Lease to a follower first) only if the step did.
//!
//! A helper that finds a journal for the revision it is told to apply resumes the step (at
//! most [`MAX_ATTEMPTS`] times); for any other revision, or none, it rolls the step back.
//!
//! A step that ended healthy is not forgotten at once: first its `.prev` files go and the
//! journal is rewritten as `applied` (the report to send; the key and the request are
//! dropped, so no private key stays in it), then the report is sent, and only then is the
//! journal removed. A helper killed between the two finds an applied journal: it sends that
//! report again (or, when the target moved on, just removes it); it never redoes, resumes or
//! rolls back a step that finished. A rolled-back step's journal is removed at once.

use serde::{Deserialize, Serialize};

use crate::host::{HostError, HostFs, HostPath};

/// Default host path of the journal.
pub const DEFAULT_PATH: &str = "/etc/kubernetes/kcm-node-helper.step.json";
/// A step the helper died in this many times is rolled back and reported failed.
pub const MAX_ATTEMPTS: u32 = 3;

/// What a step is doing, as recorded on the host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub revision: String,
    /// How many helpers started this step (1 for the first).
    pub attempts: u32,
    /// Whether kcm's unit was active before the step.
    pub was_active: bool,
    /// Each host path the step writes, and whether it existed before the step.
    pub files: Vec<(String, bool)>,
    /// The certificate request under way: its CSR name and PEM key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<PendingRequest>,
    /// Set before kubeadm's static pod manifest is moved aside.
    #[serde(default)]
    pub adopting: bool,
    /// Set before the step restarts kcm's unit: only then does a rollback restart it (on
    /// the files it puts back). A journal from before this field says yes (as it did then).
    #[serde(default = "restarted_unknown")]
    pub restarted: bool,
    /// The step ended healthy: the report to send (kept until it is in the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<kcm_operator::api::KcmNodeStatus>,
}

fn restarted_unknown() -> bool {
    true
}

/// What a rollback does with kcm's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitRollback {
    /// It was not active before the step: stopped and disabled.
    Stop,
    /// The step restarted it on the new files: restarted on the old ones (with the Lease
    /// hand-off when it leads).
    Restart,
    /// The step never restarted it: the kcm that runs is the one from before the step, and
    /// its files are back. The unit is reloaded, and started only if it is not running.
    KeepRunning,
}

/// The unit's rollback for a journal (pure): a step that failed before it restarted kcm (a
/// certificate that never came, a pre-flight that failed, a restart-free renewal whose new
/// kcm certificate was not served) restarts nothing.
pub fn unit_rollback(j: &Journal) -> UnitRollback {
    match (j.was_active, j.restarted) {
        (false, _) => UnitRollback::Stop,
        (true, true) => UnitRollback::Restart,
        (true, false) => UnitRollback::KeepRunning,
    }
}

/// A certificate request of a step, journaled before the CSR is created.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingRequest {
    pub csr: String,
    pub key_pem: String,
}

/// What to do with a journal found on the host, given the revision the helper is told to
/// apply now (None: no step is pending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Carry on with the same step (the files and the request it journaled are reused).
    Resume,
    /// Put the host back as the journal says it was, then forget the step.
    RollBack { why: String },
    /// The step ended healthy and only its report may be missing: send it (when the step is
    /// still the target), then forget the step. Nothing on the host changes.
    Applied,
}

pub fn recovery(journal: &Journal, target: Option<&str>) -> Recovery {
    if journal.applied.is_some() {
        return Recovery::Applied;
    }
    match target {
        Some(t) if t == journal.revision && journal.attempts < MAX_ATTEMPTS => Recovery::Resume,
        Some(t) if t == journal.revision => Recovery::RollBack { why: format!("the helper stopped {} times in the middle of step {t}", journal.attempts) },
        Some(t) => Recovery::RollBack { why: format!("the step for revision {} was interrupted; the target is now {t}", journal.revision) },
        None => Recovery::RollBack { why: format!("the step for revision {} was interrupted and is no longer asked for", journal.revision) },
    }
}

/// The journal file on the host. Written atomically, mode 0600 (it may hold a private key).
pub struct JournalFile<'a> {
    host: &'a HostFs,
    path: HostPath,
}

impl<'a> JournalFile<'a> {
    pub fn new(host: &'a HostFs, path: &str) -> Result<Self, HostError> {
        Ok(Self { host, path: host.resolve("journal", path)? })
    }

    /// The journal on the host; a file that does not parse is reported as an error, never
    /// silently taken for "no step".
    pub fn load(&self) -> Result<Option<Journal>, HostError> {
        let Some(bytes) = self.host.read_optional(&self.path)? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| HostError::Invalid {
            name: "journal".into(),
            path: self.path.host.display().to_string(),
            reason: format!("does not parse: {e}"),
        })
    }

    pub fn save(&self, journal: &Journal) -> Result<(), HostError> {
        let body = serde_json::to_vec_pretty(journal).expect("journal serializes");
        self.host.write_atomic_no_prev(&self.path, &body, 0o600).map(|_| ())
    }

    pub fn remove(&self) -> Result<(), HostError> {
        match std::fs::remove_file(&self.path.local) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Io { op: "remove", path: self.path.local.clone(), source }),
        }
    }
}

/// Test hook for the kind e2e: when the host file `/run/kcm-node-helper.crash-at` names this
/// point, the helper removes the file and kills itself with SIGKILL (a kill at that exact
/// moment of a step). Only root on the master can create the file.
pub fn crash_point(host: &HostFs, point: &str) {
    let file = host.root().join("run/kcm-node-helper.crash-at");
    if std::fs::read_to_string(&file).is_ok_and(|p| p.trim() == point) {
        let _ = std::fs::remove_file(&file);
        tracing::error!(point, "crash point reached: SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(rev: &str, attempts: u32) -> Journal {
        Journal { revision: rev.into(), attempts, ..Default::default() }
    }

    #[test]
    fn the_same_revision_resumes_a_bounded_number_of_times() {
        assert_eq!(recovery(&journal("r1", 1), Some("r1")), Recovery::Resume);
        assert_eq!(recovery(&journal("r1", MAX_ATTEMPTS - 1), Some("r1")), Recovery::Resume);
        assert!(matches!(recovery(&journal("r1", MAX_ATTEMPTS), Some("r1")), Recovery::RollBack { why } if why.contains("3 times")));
    }

    #[test]
    fn another_revision_or_none_rolls_back() {
        assert!(matches!(recovery(&journal("r1", 1), Some("r2")), Recovery::RollBack { why } if why.contains("r2")));
        assert!(matches!(recovery(&journal("r1", 1), None), Recovery::RollBack { .. }));
    }

    #[test]
    fn an_applied_step_is_never_resumed_nor_rolled_back() {
        let mut j = journal("r1", 2);
        j.applied = Some(kcm_operator::api::KcmNodeStatus { applied_revision: Some("r1".into()), ..Default::default() });
        for target in [Some("r1"), Some("r2"), None] {
            assert_eq!(recovery(&j, target), Recovery::Applied, "target {target:?}");
        }
        j.attempts = MAX_ATTEMPTS;
        assert_eq!(recovery(&j, Some("r1")), Recovery::Applied, "past the attempts too: it finished");
    }

    #[test]
    fn a_rollback_restarts_kcm_only_when_the_step_did() {
        let j = |was_active, restarted| Journal { was_active, restarted, ..journal("r1", 1) };
        assert_eq!(unit_rollback(&j(false, false)), UnitRollback::Stop);
        assert_eq!(unit_rollback(&j(false, true)), UnitRollback::Stop);
        assert_eq!(unit_rollback(&j(true, true)), UnitRollback::Restart);
        // A renewal whose certificate never came, or whose pre-flight failed: nothing restarted.
        assert_eq!(unit_rollback(&j(true, false)), UnitRollback::KeepRunning);
        // A journal written before `restarted` existed: restarted, as rollbacks did then.
        let old: Journal = serde_json::from_str(r#"{"revision":"r1","attempts":1,"wasActive":true,"files":[]}"#).unwrap();
        assert!(old.restarted);
        assert_eq!(unit_rollback(&old), UnitRollback::Restart);
        let new: Journal = serde_json::from_str(&serde_json::to_string(&j(true, false)).unwrap()).unwrap();
        assert!(!new.restarted, "a new journal says what it did");
    }

    #[test]
    fn round_trips_on_the_host_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let host = HostFs::new(t.path(), vec!["/etc/kubernetes".into()]);
        let f = JournalFile::new(&host, DEFAULT_PATH).unwrap();
        assert_eq!(f.load().unwrap(), None);
        let mut j = journal("r1", 1);
        j.files = vec![("/etc/kubernetes/a".into(), true)];
        j.request = Some(PendingRequest { csr: "kcm-m1-0a0b".into(), key_pem: "KEY".into() });
        f.save(&j).unwrap();
        assert_eq!(f.load().unwrap(), Some(j.clone()));
        // Marked applied (as a finished step is): the report round-trips, the key is gone.
        j.request = None;
        j.applied = Some(kcm_operator::api::KcmNodeStatus { applied_revision: Some("r1".into()), healthy: true, unit_active: true, ..Default::default() });
        f.save(&j).unwrap();
        assert_eq!(f.load().unwrap(), Some(j.clone()));
        let text = std::fs::read_to_string(t.path().join("etc/kubernetes/kcm-node-helper.step.json")).unwrap();
        assert!(!text.contains("KEY") && text.contains("\"applied\""), "{text}");
        let local = t.path().join("etc/kubernetes/kcm-node-helper.step.json");
        assert_eq!(std::fs::metadata(&local).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&local, b"{not json").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("does not parse"));
        f.remove().unwrap();
        f.remove().unwrap();
        assert_eq!(f.load().unwrap(), None);
    }
}
