//! `/healthz` (the process is alive and serving) and `/readyz` (the operator has a working
//! API client and the CRD is there; followers are ready too: readiness is not leadership).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use warp::Filter;

/// Set by main once the API answered with the CRD present.
#[derive(Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Binds `addr` (failing here, not later, when the port is taken) and returns the server.
pub async fn serve(addr: SocketAddr, ready: Ready) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let healthz = warp::path("healthz").and(warp::path::end()).map(|| "ok");
    let readyz = warp::path("readyz").and(warp::path::end()).map(move || {
        if ready.get() {
            warp::reply::with_status("ok", warp::http::StatusCode::OK)
        } else {
            warp::reply::with_status("not ready", warp::http::StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    Ok(warp::serve(healthz.or(readyz)).incoming(listener).run())
}
