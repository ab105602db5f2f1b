//! node-helper: the privileged agent on each master that installs kube-controller-manager.
pub mod bootstrap;
pub mod drift;
pub mod fence;
pub mod host;
pub mod install;
pub mod journal;
pub mod kubelet;
pub mod lock;
pub mod probe;
pub mod readiness;
pub mod step;
pub mod systemd;
