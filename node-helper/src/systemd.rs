//! systemd on the host, reached from the helper's container: the command is forked, and
//! the child enters PID 1's mount namespace (setns) before exec, so `systemctl` is the
//! host's own binary talking to the host's systemd. Entering a mount namespace fails in a
//! multi-threaded process, which is why it happens in the forked child.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("opening {path}: {source} (is the pod hostPID and privileged?)")]
    Namespace { path: PathBuf, source: std::io::Error },
    #[error("systemctl {args}: {reason}")]
    Command { args: String, reason: String },
}

/// The host's init, as seen with hostPID.
#[derive(Clone, Debug)]
pub struct HostSystemd {
    /// `/proc/1` of the host.
    proc1: PathBuf,
    pub unit: String,
}

/// What `systemctl show` says of the unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub main_pid: u32,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active == "active"
    }
    /// Parses `systemctl show -p ActiveState -p SubState -p MainPID` output.
    pub fn parse(text: &str) -> Self {
        let mut s = UnitState::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("ActiveState", v)) => s.active = v.trim().into(),
                Some(("SubState", v)) => s.sub = v.trim().into(),
                Some(("MainPID", v)) => s.main_pid = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        s
    }
}

impl HostSystemd {
    pub fn new(unit: impl Into<String>) -> Self {
        Self { proc1: PathBuf::from("/proc/1"), unit: unit.into() }
    }

    /// The unit whose file is at `path` (the spec's `paths.unit`): its file name.
    pub fn for_unit_file(path: &str) -> Self {
        Self::new(std::path::Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("kube-controller-manager.service"))
    }

    /// Runs `systemctl <args>` in the host's mount namespace; returns stdout.
    pub async fn systemctl(&self, args: &[&str]) -> Result<String, SystemdError> {
        let ns_path = self.proc1.join("ns/mnt");
        let ns = File::open(&ns_path).map_err(|source| SystemdError::Namespace { path: ns_path.clone(), source })?;
        let mut cmd = tokio::process::Command::new("systemctl");
        cmd.args(args).env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2).
        unsafe {
            cmd.pre_exec(move || nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from));
        }
        let joined = args.join(" ");
        let fail = |reason: String| SystemdError::Command { args: joined.clone(), reason };
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .map_err(|_| fail("no answer within 90s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// daemon-reload and enable: the unit file on disk becomes the one systemd runs next.
    pub async fn reload_enable(&self) -> Result<(), SystemdError> {
        self.systemctl(&["daemon-reload"]).await?;
        self.systemctl(&["enable", &self.unit]).await?;
        Ok(())
    }

    /// Seed 2.1: daemon-reload, enable, restart.
    pub async fn reload_enable_restart(&self) -> Result<(), SystemdError> {
        self.reload_enable().await?;
        self.systemctl(&["restart", &self.unit]).await?;
        Ok(())
    }

    pub async fn stop_disable(&self) -> Result<(), SystemdError> {
        self.systemctl(&["disable", "--now", &self.unit]).await?;
        self.systemctl(&["daemon-reload"]).await?;
        Ok(())
    }

    /// Seed 2.2: the unit's state.
    pub async fn state(&self) -> Result<UnitState, SystemdError> {
        Ok(UnitState::parse(&self.systemctl(&["show", "-p", "ActiveState", "-p", "SubState", "-p", "MainPID", &self.unit]).await?))
    }
}

/// PIDs of the host's kube-controller-manager processes (from /proc, with hostPID).
pub fn kcm_pids(proc_root: &std::path::Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let argv0 = cmd.split(|b| *b == 0).next()?;
        let name = std::path::Path::new(std::str::from_utf8(argv0).ok()?).file_name()?.to_str()?.to_string();
        (name == "kube-controller-manager").then_some(pid)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_state_parses() {
        let s = UnitState::parse("ActiveState=active\nSubState=running\nMainPID=4242\n");
        assert!(s.is_active());
        assert_eq!(s.main_pid, 4242);
        let s = UnitState::parse("ActiveState=failed\nSubState=failed\nMainPID=0\n");
        assert!(!s.is_active());
    }

    #[test]
    fn finds_kcm_processes_by_argv0() {
        let t = tempfile::tempdir().unwrap();
        for (pid, cmd) in [("10", &b"/opt/k8s/bin/kube-controller-manager\0--v=2\0"[..]), ("11", b"kubelet\0"), ("x", b"kube-controller-manager\0")] {
            std::fs::create_dir_all(t.path().join(pid)).unwrap();
            std::fs::write(t.path().join(pid).join("cmdline"), cmd).unwrap();
        }
        assert_eq!(kcm_pids(t.path()), vec![10]);
    }
}
