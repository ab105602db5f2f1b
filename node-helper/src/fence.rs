//! Fenced release of kcm's Lease after an unplanned exit. kcm does not release its Lease
//! when it dies (killed, crashed, stopped by someone else), so the other masters wait out
//! the whole lease (15 s) before one of them leads. The helper watches this host's kcm
//! process; when the process that held the Lease is gone it releases the Lease for a
//! follower, but only when:
//! - the Lease's `holderIdentity` is still exactly the identity recorded while that process
//!   ran as the only kcm on this host and the Lease named this host (not a hostname prefix);
//! - no kube-controller-manager process is left on the host (another unit, a static pod, the
//!   restarted one): any of them may be the holder, alive;
//! - the Lease has not changed since it was read (the write carries its resourceVersion).
//!
//! [`Fence`] and [`release_decision`] are pure; [`run`] looks every [`TICK`] and acts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kcm_operator::api::KCM_LEASE;
use kcm_operator::rollout::holder_is;

/// How often the tracked process is checked (a stat of `/proc/<pid>/cmdline`).
pub const TICK: Duration = Duration::from_millis(100);
/// How often the host's processes are listed and the Lease read while kcm runs.
pub const LOOK: Duration = Duration::from_secs(2);

/// What the fence knows: the kcm process it follows and the Lease identity it held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fence {
    /// The only kcm process on this host, when there is exactly one.
    pub pid: Option<u32>,
    /// The Lease's holderIdentity while `pid` ran alone and the Lease named this host.
    pub holder: Option<String>,
}

impl Fence {
    /// A periodic look: the host's kcm processes and the Lease's holder.
    /// `node` and `hostname`: this master's names (kcm's Lease names it by its hostname).
    pub fn observe(&mut self, node: &str, hostname: Option<&str>, pids: &[u32], lease_holder: Option<&str>) {
        match pids {
            [pid] => {
                if self.pid != Some(*pid) {
                    *self = Fence { pid: Some(*pid), holder: None };
                }
                // Only a process running alone can be the holder that names this host.
                match lease_holder.filter(|h| holder_is(Some(h), node, hostname)) {
                    Some(h) => self.holder = Some(h.to_string()),
                    None => self.holder = None,
                }
            }
            // None, or several: nothing can be attributed.
            _ => *self = Fence::default(),
        }
    }
}

/// Whether the Lease may be released now that the followed process has exited: `Ok(holder)`
/// to release it from, `Err(why not)`.
pub fn release_decision(fence: &Fence, pids_now: &[u32], lease_holder: Option<&str>) -> Result<String, String> {
    let Some(recorded) = fence.holder.as_deref() else {
        return Err("the exited kcm did not hold kcm's Lease".into());
    };
    if !pids_now.is_empty() {
        return Err(format!("kube-controller-manager process(es) {pids_now:?} still run on this host: one of them may hold the Lease"));
    }
    match lease_holder {
        Some(h) if h == recorded => Ok(h.to_string()),
        Some(h) => Err(format!("the Lease is held by {h:?}, not by the exited kcm ({recorded:?})")),
        None => Err("the Lease has no holder".into()),
    }
}

fn alive(proc_root: &Path, pid: u32) -> bool {
    std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .and_then(|a| std::str::from_utf8(a).ok())
            .and_then(|a| Path::new(a).file_name())
            .is_some_and(|n| n == "kube-controller-manager")
    })
}

/// Empties the Lease if it still is exactly what was read (resourceVersion) and still
/// names `holder`. Returns whether it was released.
pub async fn release(api: &kube::Api<Lease>, mut lease: Lease, holder: &str) -> Result<bool, kube::Error> {
    let Some(spec) = lease.spec.as_mut() else { return Ok(false) };
    if spec.holder_identity.as_deref() != Some(holder) {
        return Ok(false);
    }
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    spec.holder_identity = Some(String::new());
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now.clone());
    spec.acquire_time = Some(now);
    // `replace` sends metadata.resourceVersion: a Lease changed since the read is a 409.
    match api.replace(KCM_LEASE.1, &Default::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Follows this host's kcm and releases its Lease when it exits unplanned. Runs forever.
pub async fn run(client: kube::Client, host_root: PathBuf, node: String, hostname: Option<String>) {
    let api: kube::Api<Lease> = kube::Api::namespaced(client, KCM_LEASE.0);
    let proc_root = host_root.join("proc");
    let mut fence = Fence::default();
    let mut last_look = tokio::time::Instant::now() - LOOK;
    loop {
        tokio::time::sleep(TICK).await;
        if let Some(pid) = fence.pid.filter(|p| !alive(&proc_root, *p)) {
            let pids = crate::systemd::kcm_pids(&proc_root);
            match api.get(KCM_LEASE.1).await {
                Ok(lease) => {
                    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
                    match release_decision(&fence, &pids, holder.as_deref()) {
                        Ok(h) => match release(&api, lease, &h).await {
                            Ok(true) => tracing::warn!(node = %node, pid, holder = %h, "kcm exited unplanned: released its Lease for a follower"),
                            Ok(false) => tracing::info!(node = %node, pid, "kcm exited; its Lease changed meanwhile: left alone"),
                            Err(e) => tracing::warn!(node = %node, pid, "kcm exited; releasing its Lease: {e}"),
                        },
                        Err(why) if fence.holder.is_some() => tracing::warn!(node = %node, pid, "kcm exited; Lease not released: {why}"),
                        Err(_) => {}
                    }
                }
                Err(e) => tracing::warn!(node = %node, pid, "kcm exited; reading its Lease: {e}"),
            }
            fence = Fence::default();
            last_look = tokio::time::Instant::now() - LOOK;
            continue;
        }
        if last_look.elapsed() < LOOK {
            continue;
        }
        last_look = tokio::time::Instant::now();
        let pids = crate::systemd::kcm_pids(&proc_root);
        // The Lease only matters while exactly one kcm runs here.
        let holder = if pids.len() == 1 {
            match api.get(KCM_LEASE.1).await {
                Ok(l) => l.spec.and_then(|s| s.holder_identity),
                Err(e) => {
                    tracing::debug!("reading kcm's Lease: {e}");
                    continue;
                }
            }
        } else {
            None
        };
        fence.observe(&node, hostname.as_deref(), &pids, holder.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLDER: &str = "m1_0f6c1a2e-5b7d-4c44-9a11-3e2f1d0c9b8a";

    fn leading() -> Fence {
        let mut f = Fence::default();
        f.observe("m1", None, &[42], Some(HOLDER));
        f
    }

    #[test]
    fn records_the_exact_identity_of_the_only_kcm_while_it_leads() {
        assert_eq!(leading(), Fence { pid: Some(42), holder: Some(HOLDER.into()) });
        let mut f = Fence::default();
        f.observe("m1", None, &[42], Some("m2_aaaa"));
        assert_eq!(f, Fence { pid: Some(42), holder: None }, "another master leads");
        let mut f = leading();
        f.observe("m1", None, &[42, 43], Some(HOLDER));
        assert_eq!(f, Fence::default(), "two kcm on the host: nothing attributable");
        let mut f = leading();
        f.observe("m1", None, &[77], Some(HOLDER));
        assert_eq!(f, Fence { pid: Some(77), holder: Some(HOLDER.into()) }, "a new process starts a new record");
    }

    #[test]
    fn a_master_whose_hostname_is_not_its_node_name_is_followed_by_its_hostname() {
        let holder = "M1.example.com_0f6c1a2e";
        let mut f = Fence::default();
        f.observe("m1", Some("m1.example.com"), &[42], Some(holder));
        assert_eq!(f, Fence { pid: Some(42), holder: Some(holder.into()) }, "kcm names itself by the hostname, in any case");
        let mut f = Fence::default();
        f.observe("m1", None, &[42], Some(holder));
        assert_eq!(f.holder, None, "without the hostname nothing is attributed");
    }

    #[test]
    fn releases_only_the_recorded_holder_with_no_kcm_left() {
        assert_eq!(release_decision(&leading(), &[], Some(HOLDER)), Ok(HOLDER.to_string()));
    }

    #[test]
    fn a_second_kcm_on_the_host_blocks_the_release() {
        let e = release_decision(&leading(), &[99], Some(HOLDER)).unwrap_err();
        assert!(e.contains("[99] still run"), "{e}");
    }

    #[test]
    fn a_holder_that_is_not_exactly_the_recorded_one_is_left_alone() {
        // Same host, another process (a hostname prefix is not enough).
        let e = release_decision(&leading(), &[], Some("m1_11111111-2222-3333-4444-555555555555")).unwrap_err();
        assert!(e.contains("not by the exited kcm"), "{e}");
        assert!(release_decision(&leading(), &[], None).is_err());
        assert!(release_decision(&leading(), &[], Some("m2_x")).is_err());
    }

    #[test]
    fn a_follower_that_exits_releases_nothing() {
        let mut f = Fence::default();
        f.observe("m1", None, &[42], Some("m2_aaaa"));
        assert!(release_decision(&f, &[], Some("m2_aaaa")).is_err());
    }

    #[test]
    fn liveness_reads_the_command_line() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("42")).unwrap();
        std::fs::write(root.path().join("42/cmdline"), b"/opt/k8s/bin/kube-controller-manager\0--v=2\0").unwrap();
        assert!(alive(root.path(), 42));
        std::fs::write(root.path().join("42/cmdline"), b"").unwrap(); // a zombie
        assert!(!alive(root.path(), 42));
        assert!(!alive(root.path(), 43));
    }
}
