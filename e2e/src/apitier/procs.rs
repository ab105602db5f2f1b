//! Child processes for the API tier (etcd, kube-apiserver, ...).
//!
//! Every child runs in its own process group and gets PR_SET_PDEATHSIG=SIGKILL.
//! Children are spawned from one dedicated, never-exiting thread: the kernel
//! delivers the parent-death signal when the *spawning thread* exits, so
//! spawning from a tokio worker or a test thread could kill a server that is
//! still in use. With the dedicated thread the signal fires exactly when the
//! test binary itself dies (including SIGKILL / Ctrl-C), so nothing leaks.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

type Job = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("apitier-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning apitier-spawner thread");
        Mutex::new(tx)
    })
}

/// A running child process whose stdout+stderr go to `log`. Killed (whole
/// process group, SIGKILL) and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, bin: &Path, args: &[String], log: &Path) -> Result<Proc> {
        Self::spawn_env(name, bin, args, &[], log)
    }

    /// Like [`Proc::spawn`], with these environment variables added to the inherited ones.
    pub fn spawn_env(name: &str, bin: &Path, args: &[String], env: &[(&str, &std::ffi::OsStr)], log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err)).process_group(0);
        // SAFETY: prctl is async-signal-safe; no allocation in the closure.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let (tx, rx) = mpsc::channel();
        spawner().lock().unwrap().send((cmd, tx)).expect("apitier-spawner thread gone");
        let child = rx.recv().expect("apitier-spawner thread gone").with_context(|| format!("starting {name} ({})", bin.display()))?;
        Ok(Proc { name: name.to_string(), child, log: log.to_path_buf() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` if the process already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Last `max_lines` lines of the log.
    pub fn log_tail(&self, max_lines: usize) -> String {
        log_tail(&self.log, max_lines)
    }

    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn log_tail(path: &Path, max_lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("<no log at {}>", path.display());
    };
    const MAX_BYTES: u64 = 64 * 1024;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_BYTES {
        let _ = f.seek(SeekFrom::Start(len - MAX_BYTES));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}
