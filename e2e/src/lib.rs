//! Test helpers for kcm-operator end-to-end tests.
//!
//! - [`apitier`]: a real etcd + kube-apiserver per test (no kubelet, no kind).

pub mod apitier;
pub mod bench;
pub mod kind;
pub mod leadership;
pub mod seed;

pub use apitier::{bound_sa_token, whoami, ApiServer, ApiServerOptions};
