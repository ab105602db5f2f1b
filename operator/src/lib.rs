//! kcm-operator: deploys and keeps alive a highly available kube-controller-manager.
pub mod api;
pub mod apicount;
pub mod approver;
pub mod election;
pub mod flags;
pub mod health;
pub mod identity;
pub mod kube_error;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod render;
pub mod rescue;
pub mod rollout;
pub mod signer;
pub mod staticpod;
pub mod watch;
