//! The host lock: one helper acts on a master at a time. A rescue pod and the DaemonSet's
//! own pod can run on the same master for a moment (the operator deletes the rescue pod
//! once the DaemonSet's pod is Ready); each takes an exclusive `flock` on a file of the
//! host's `/run` before it touches anything, and holds it until it exits (the kernel
//! drops it with the process, also on SIGKILL).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file, under the host root: on the host's tmpfs `/run`, so a reboot clears it.
pub const LOCK_PATH: &str = "run/kcm-node-helper.lock";

/// Held while alive; dropped with the process.
#[derive(Debug)]
pub struct HostLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("opening the host lock {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("host lock {path}: {errno}")]
    Flock { path: PathBuf, errno: Errno },
}

/// Takes the lock if it is free; `Ok(None)` when another helper holds it.
pub fn try_lock(host_root: &Path) -> Result<Option<HostLock>, LockError> {
    let path = host_root.join(LOCK_PATH);
    let file =
        OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(|source| LockError::Open { path: path.clone(), source })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(HostLock { _lock: lock, path })),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(LockError::Flock { path, errno }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_helper_waits_until_the_first_is_gone() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        let first = try_lock(root.path()).unwrap().expect("free at first");
        assert!(try_lock(root.path()).unwrap().is_none(), "held by the first helper");
        drop(first);
        assert!(try_lock(root.path()).unwrap().is_some(), "free once the first is gone");
    }

    #[test]
    fn a_missing_run_directory_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let e = try_lock(root.path()).unwrap_err();
        assert!(e.to_string().contains("kcm-node-helper.lock"), "{e}");
    }
}
