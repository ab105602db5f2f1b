//! node-helper: the privileged agent on each master that installs kube-controller-manager.
pub mod host;
pub mod install;
pub mod probe;
pub mod step;
pub mod systemd;
