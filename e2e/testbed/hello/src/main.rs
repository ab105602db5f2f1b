//! Prints one line (the e2e test reads it from the pod's log) and then idles forever.
use std::io::Write;

fn main() {
    let node = std::env::var("NODE_NAME").unwrap_or_else(|_| "unknown".into());
    let mut out = std::io::stdout();
    let _ = writeln!(out, "hello from a static Rust binary in a FROM-scratch image on node {node}");
    let _ = out.flush();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
