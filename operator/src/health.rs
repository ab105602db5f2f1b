//! The HTTP endpoints of a process, for the kubelet's probes and for Prometheus:
//! `/healthz` (the process is alive and serving), `/readyz` (what "ready" means is the
//! caller's: for the operator a working API client and the CRD there, followers too, since
//! readiness is not leadership) and `/metrics` (the text exposition format). Used by the
//! operator (`--health-addr`) and the node-helper (`--metrics-addr`).

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

/// What the endpoints answer: whether the process is ready, and the metrics text.
#[derive(Clone)]
pub struct Endpoints {
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

/// The address could not be listened on: the message names it, what is wrong and the flag
/// that sets it.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve /healthz, /readyz and /metrics on {addr}: {why}; choose another address with {flag}")]
pub struct ServeError {
    pub addr: SocketAddr,
    pub flag: &'static str,
    pub why: String,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` (failing here, not later, when the port is taken) and returns the server.
/// `flag`: the option that sets the address, for the error message.
pub async fn serve(addr: SocketAddr, flag: &'static str, endpoints: Endpoints) -> Result<impl std::future::Future<Output = ()>, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| {
        let why = match source.kind() {
            std::io::ErrorKind::AddrInUse => "the address is already in use (another process listens on that port)".to_string(),
            std::io::ErrorKind::AddrNotAvailable => "no interface of this host has that address".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied (a port below 1024 needs privileges)".to_string(),
            _ => source.to_string(),
        };
        ServeError { addr, flag, why, source }
    })?;
    let healthz = warp::path("healthz").and(warp::path::end()).map(|| "ok");
    let ready = endpoints.ready.clone();
    let readyz = warp::path("readyz").and(warp::path::end()).map(move || {
        if ready() {
            warp::reply::with_status("ok", warp::http::StatusCode::OK)
        } else {
            warp::reply::with_status("not ready", warp::http::StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    let render = endpoints.metrics.clone();
    let metrics = warp::path("metrics").and(warp::path::end()).map(move || warp::reply::with_header(render(), "content-type", crate::metrics::CONTENT_TYPE));
    let routes = warp::get().and(healthz.or(readyz).or(metrics));
    Ok(warp::serve(routes).incoming(listener).run())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(ready: bool) -> Endpoints {
        Endpoints { ready: Arc::new(move || ready), metrics: Arc::new(|| "# TYPE x gauge\nx 1\n".into()) }
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_naming_the_address_not_a_panic() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = match serve(addr, "--metrics-addr", endpoints(true)).await {
            Ok(_) => panic!("served on {addr}, which is taken"),
            Err(e) => e,
        };
        assert_eq!(err.source.kind(), std::io::ErrorKind::AddrInUse);
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()) && msg.contains("already in use") && msg.contains("--metrics-addr"), "{msg}");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_healthz_readyz_and_metrics() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let server = serve(free, "--health-addr", endpoints(false)).await.unwrap();
        let task = tokio::spawn(server);
        let healthz = get(free, "/healthz").await;
        assert!(healthz.starts_with("HTTP/1.1 200") && healthz.ends_with("ok"), "{healthz}");
        let readyz = get(free, "/readyz").await;
        assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
        let metrics = get(free, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("text/plain; version=0.0.4") && metrics.ends_with("x 1\n"), "{metrics}");
        task.abort();
    }
}
