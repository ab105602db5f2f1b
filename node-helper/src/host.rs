//! The master's filesystem as the helper sees it: paths from the spec are checked against
//! the allowed prefixes, mapped under the host root, and written atomically with the
//! previous version kept for rollback.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{name} path {path:?} must be absolute and free of '..' and '.'")]
    NotNormal { name: String, path: String },
    #[error("{name} path {path:?} is outside the allowed roots {allowed:?}")]
    OutsideRoot { name: String, path: String, allowed: Vec<PathBuf> },
    #[error("{name} path {path:?} resolves through a symlink to {real:?}, outside the host root")]
    Escapes { name: String, path: String, real: PathBuf },
    #[error("{op} {path:?}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{name} {path}: {reason}")]
    Invalid { name: String, path: String, reason: String },
}
pub type Result<T, E = HostError> = std::result::Result<T, E>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HostError + 'a {
    move |source| HostError::Io { op, path: path.to_path_buf(), source }
}

/// A path on the host: as the spec names it, and where the helper reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPath {
    pub name: String,
    /// As on the host (what goes into the unit and kubeconfig).
    pub host: PathBuf,
    /// Under the helper's host root (what the helper opens).
    pub local: PathBuf,
}

/// This host's kernel hostname (the helper shares the host's UTS namespace: hostNetwork),
/// which kcm's Lease identity begins with; `None` when unreadable.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

/// The host filesystem, mounted at `root` (`/host` in the DaemonSet, `/` in tests).
#[derive(Clone, Debug)]
pub struct HostFs {
    root: PathBuf,
    allowed: Vec<PathBuf>,
}

impl HostFs {
    pub fn new(root: impl Into<PathBuf>, allowed: Vec<PathBuf>) -> Self {
        Self { root: root.into(), allowed }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks a spec path of a file and maps it under the host root. Pure: touches nothing.
    pub fn resolve(&self, name: &str, path: &str) -> Result<HostPath> {
        self.resolve_in(name, path, false)
    }

    /// As [`resolve`](Self::resolve), for a directory, which may be an allowed root itself.
    pub fn resolve_dir(&self, name: &str, path: &str) -> Result<HostPath> {
        self.resolve_in(name, path, true)
    }

    fn resolve_in(&self, name: &str, path: &str, dir: bool) -> Result<HostPath> {
        let p = Path::new(path);
        let normal = p.is_absolute() && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !normal || path.ends_with('/') {
            return Err(HostError::NotNormal { name: name.into(), path: path.into() });
        }
        if !self.allowed.iter().any(|a| p.starts_with(a) && (dir || p != a)) {
            return Err(HostError::OutsideRoot { name: name.into(), path: path.into(), allowed: self.allowed.clone() });
        }
        let local = self.root.join(p.strip_prefix("/").expect("absolute"));
        Ok(HostPath { name: name.into(), host: p.to_path_buf(), local })
    }

    /// Refuses a path whose existing parent directories lead (through symlinks) outside the root.
    fn check_real(&self, hp: &HostPath) -> Result<()> {
        let root = fs::canonicalize(&self.root).map_err(io("canonicalize", &self.root))?;
        let mut probe = hp.local.clone();
        while !probe.exists() {
            if !probe.pop() {
                return Ok(());
            }
        }
        let real = fs::canonicalize(&probe).map_err(io("canonicalize", &probe))?;
        if !real.starts_with(&root) {
            return Err(HostError::Escapes { name: hp.name.clone(), path: hp.host.display().to_string(), real });
        }
        Ok(())
    }

    pub fn read(&self, hp: &HostPath) -> Result<Vec<u8>> {
        self.check_real(hp)?;
        fs::read(&hp.local).map_err(io("read", &hp.local))
    }

    /// Reads the file if it exists.
    pub fn read_optional(&self, hp: &HostPath) -> Result<Option<Vec<u8>>> {
        self.check_real(hp)?;
        match fs::read(&hp.local) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::Io { op: "read", path: hp.local.clone(), source: e }),
        }
    }

    /// Writes `contents` with `mode` atomically: temp file in the same directory, fsync,
    /// the current file kept as `<name>.prev`, rename, fsync the directory. Parent
    /// directories are created 0755. Returns whether the content changed.
    pub fn write_atomic(&self, hp: &HostPath, contents: &[u8], mode: u32) -> Result<bool> {
        self.write_atomic_keeping(hp, contents, mode, true)
    }

    /// [`Self::write_atomic`] without keeping `<name>.prev`: for a directory whose every
    /// file is read (the kubelet's static pod directory would run a `.prev` as a pod).
    pub fn write_atomic_no_prev(&self, hp: &HostPath, contents: &[u8], mode: u32) -> Result<bool> {
        self.write_atomic_keeping(hp, contents, mode, false)
    }

    fn write_atomic_keeping(&self, hp: &HostPath, contents: &[u8], mode: u32, keep_prev: bool) -> Result<bool> {
        self.check_real(hp)?;
        let dir = hp.local.parent().expect("absolute path has a parent");
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io("create directory", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io("chmod", dir))?;
        }
        if let Some(old) = self.read_optional(hp)? {
            let old_mode = fs::metadata(&hp.local).map_err(io("stat", &hp.local))?.permissions().mode() & 0o7777;
            if old == contents && old_mode == mode {
                return Ok(false);
            }
        }
        let file_name = hp.local.file_name().expect("file").to_string_lossy().to_string();
        let tmp = dir.join(format!(".{file_name}.kcm-tmp"));
        let _ = fs::remove_file(&tmp);
        {
            let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io("create", &tmp))?;
            f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
            f.write_all(contents).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
        }
        if keep_prev && hp.local.exists() {
            let prev = dir.join(format!("{file_name}.prev"));
            // A hard link keeps the old inode reachable; the rename below stays atomic.
            let _ = fs::remove_file(&prev);
            fs::hard_link(&hp.local, &prev).map_err(io("keep previous as", &prev))?;
        }
        fs::rename(&tmp, &hp.local).map_err(io("rename into", &hp.local))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))?;
        Ok(true)
    }

    /// Creates a directory (and parents) 0755 if missing (seed 2.1: `mkdir -p` of the working dir).
    pub fn ensure_dir(&self, hp: &HostPath) -> Result<()> {
        self.check_real(hp)?;
        if !hp.local.is_dir() {
            fs::create_dir_all(&hp.local).map_err(io("create directory", &hp.local))?;
            fs::set_permissions(&hp.local, fs::Permissions::from_mode(0o755)).map_err(io("chmod", &hp.local))?;
        }
        Ok(())
    }

    fn prev_of(hp: &HostPath) -> PathBuf {
        hp.local.with_file_name(format!("{}.prev", hp.local.file_name().expect("file").to_string_lossy()))
    }

    /// Whether `<name>.prev` exists: the file was rewritten since the previous version was kept.
    pub fn has_previous(&self, hp: &HostPath) -> bool {
        Self::prev_of(hp).exists()
    }

    /// Removes `<name>.prev` (once a step is healthy, or before a new step starts).
    pub fn forget_previous(&self, hp: &HostPath) -> Result<()> {
        let prev = Self::prev_of(hp);
        match fs::remove_file(&prev) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Io { op: "remove", path: prev, source }),
        }
    }

    /// Puts `<name>.prev` back in place (rollback). Returns false when there is none.
    pub fn restore_previous(&self, hp: &HostPath) -> Result<bool> {
        let dir = hp.local.parent().expect("absolute path has a parent");
        let prev = Self::prev_of(hp);
        if !prev.exists() {
            return Ok(false);
        }
        fs::rename(&prev, &hp.local).map_err(io("restore previous into", &hp.local))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs_in(dir: &Path) -> HostFs {
        HostFs::new(dir, vec![PathBuf::from("/etc/kubernetes"), PathBuf::from("/etc/systemd/system")])
    }

    #[test]
    fn paths_outside_roots_or_not_normal_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let h = fs_in(t.path());
        assert!(matches!(h.resolve("cert", "/etc/passwd"), Err(HostError::OutsideRoot { .. })));
        assert!(matches!(h.resolve("cert", "/etc/kubernetes/../passwd"), Err(HostError::NotNormal { .. })));
        assert!(matches!(h.resolve("cert", "etc/kubernetes/x"), Err(HostError::NotNormal { .. })));
        assert!(matches!(h.resolve("cert", "/etc/kubernetes"), Err(HostError::OutsideRoot { .. })));
        assert!(matches!(h.resolve("cert", "/etc/kubernetesX/a"), Err(HostError::OutsideRoot { .. })));
        assert!(h.resolve_dir("workingDir", "/etc/kubernetes").is_ok(), "a directory may be an allowed root");
        let ok = h.resolve("cert", "/etc/kubernetes/cert/a.pem").unwrap();
        assert_eq!(ok.local, t.path().join("etc/kubernetes/cert/a.pem"));
    }

    #[test]
    fn atomic_write_keeps_previous_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let h = fs_in(t.path());
        let p = h.resolve("key", "/etc/kubernetes/cert/k.pem").unwrap();
        assert!(h.write_atomic(&p, b"one", 0o600).unwrap());
        assert!(!h.write_atomic(&p, b"one", 0o600).unwrap(), "unchanged content is not rewritten");
        assert!(h.write_atomic(&p, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&p.local).unwrap(), b"two");
        assert_eq!(fs::read(t.path().join("etc/kubernetes/cert/k.pem.prev")).unwrap(), b"one");
        assert_eq!(fs::metadata(&p.local).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(h.restore_previous(&p).unwrap());
        assert_eq!(fs::read(&p.local).unwrap(), b"one");
        assert!(!h.restore_previous(&p).unwrap());
        let leftovers: Vec<_> = fs::read_dir(p.local.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn symlink_out_of_root_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("etc/kubernetes")).unwrap();
        let h = fs_in(t.path());
        let p = h.resolve("cert", "/etc/kubernetes/cert.pem").unwrap();
        assert!(matches!(h.write_atomic(&p, b"x", 0o644), Err(HostError::Escapes { .. })));
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none(), "nothing written outside");
    }
}
