//! kcm-operator: deploys and keeps alive a highly available kube-controller-manager.
pub mod api;
pub mod approver;
pub mod flags;
pub mod logging;
pub mod pki;
pub mod render;
pub mod signer;
