//! Client-side API request counters ("idle cost"): every request a
//! [`kube::Client`] built by [`counted_client`] sends is classified by verb
//! (GET, LIST, WATCH, CREATE, UPDATE, PATCH, DELETE) and resource (`leases`,
//! `kubecontrollermanagers/status`, ...) and counted; [`spawn_reporter`] logs
//! the per-minute rates as one sorted line, e.g.
//!
//! ```text
//! api requests/min: GET leases=30 PATCH kubecontrollermanagers/status=6 WATCH kcmnodes=0.2 total=36.2
//! ```
//!
//! The counting layer sits outermost in kube's default tower stack, so it sees
//! each request once as the caller issued it: a request kube's own retry
//! layer re-sends (429/503/504) is counted once, and a WATCH is counted when
//! it is opened, however long it then streams.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Method;

/// `(verb, resource)`, e.g. `("PATCH", "kubecontrollermanagers/status")`.
pub type Key = (String, String);

/// Per-minute rates by `(verb, resource)`, see [`per_minute`].
pub type Rates = BTreeMap<Key, f64>;

/// Verb for requests whose method maps to no Kubernetes verb (HEAD, OPTIONS, ...).
pub const OTHER_VERB: &str = "OTHER";

/// Cumulative request counters shared by a client's tower stack and whoever
/// reports them. Cheap to update (one uncontended lock per request).
#[derive(Debug, Default)]
pub struct ApiCounts {
    counts: Mutex<BTreeMap<Key, u64>>,
}

/// The counters at one instant (see [`ApiCounts::snapshot`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: Instant,
    pub counts: BTreeMap<Key, u64>,
}

impl ApiCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one request.
    pub fn record(&self, verb: &str, resource: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((verb.to_owned(), resource.to_owned())).or_insert(0) += 1;
    }

    /// Classifies and counts one request (see [`classify`]).
    pub fn record_request(&self, method: &Method, path: &str, query: Option<&str>) {
        let (verb, resource) = classify(method, path, query);
        self.record(verb, &resource);
    }

    /// The cumulative counters now.
    pub fn snapshot(&self) -> Snapshot {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Snapshot { at: Instant::now(), counts }
    }
}

// ------------------------------------------------------------------ classify

/// Kubernetes verb and resource of a request, following the apiserver's own
/// request-info rules:
///
/// - `/api/v1/...` and `/apis/<group>/<version>/...`, optionally
///   `namespaces/<ns>/` (but `namespaces/<ns>/status|finalize` is a
///   subresource of the namespace), optionally the legacy `watch/` prefix,
///   then `<resource>[/<name>[/<subresource>]]`;
/// - GET with a name is GET, without a name LIST; any GET with `watch=true`
///   (`1`, `t`, `True`, ... as Go's `ParseBool`) in the query, or under the
///   legacy `watch/` prefix, is WATCH; POST is CREATE, PUT UPDATE, PATCH
///   PATCH, DELETE DELETE (also on a collection); other methods are
///   [`OTHER_VERB`];
/// - the resource is `<resource>` or `<resource>/<subresource>`
///   (`certificatesigningrequests/approval`, `serviceaccounts/token`);
/// - a non-resource path (`/version`, `/healthz`, `/openapi/v2`, and the
///   discovery paths `/api`, `/api/v1`, `/apis`, `/apis/<group>[/<version>]`)
///   keeps the method's verb (GET stays GET, never LIST/WATCH) and its path
///   (without query or trailing slash) as the resource, e.g. `("GET",
///   "/version")`; the leading `/` tells them apart from resources.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> (&'static str, String) {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => rest,
        ["apis", _group, _version, rest @ ..] if !rest.is_empty() => rest,
        _ => return (method_verb(method), format!("/{}", parts.join("/"))),
    };
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] if !rest.is_empty() => (true, rest),
        _ => (false, rest),
    };
    let rest = match rest {
        ["namespaces", _ns, next, rest @ ..] if !matches!(*next, "status" | "finalize") => {
            let mut r = vec![*next];
            r.extend_from_slice(rest);
            r
        }
        _ => rest.to_vec(),
    };
    let resource = match rest.as_slice() {
        [resource, _name, subresource, ..] => format!("{resource}/{subresource}"),
        [resource, ..] => (*resource).to_owned(),
        [] => String::new(), // unreachable: `rest` was non-empty
    };
    let named = rest.len() >= 2;
    let verb = if *method == Method::GET {
        if legacy_watch || query.is_some_and(watch_requested) {
            "WATCH"
        } else if named {
            "GET"
        } else {
            "LIST"
        }
    } else {
        method_verb(method)
    };
    (verb, resource)
}

fn method_verb(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "CREATE",
        Method::PUT => "UPDATE",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => OTHER_VERB,
    }
}

/// `watch=<true>` in a query string (Go `strconv.ParseBool` truthy values).
fn watch_requested(query: &str) -> bool {
    query.split('&').any(|kv| match kv.split_once('=') {
        Some(("watch", v)) => matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True"),
        _ => false,
    })
}

// ------------------------------------------------------------------ rates

/// Requests per minute between two snapshots of the same counters. Keys that
/// did not change are left out; a counter missing from `before` counts from
/// zero. Empty if `after` is not later than `before`.
pub fn per_minute(before: &Snapshot, after: &Snapshot) -> Rates {
    let secs = after.at.saturating_duration_since(before.at).as_secs_f64();
    if secs <= 0.0 {
        return Rates::new();
    }
    after
        .counts
        .iter()
        .filter_map(|(key, &n)| {
            let delta = n.saturating_sub(before.counts.get(key).copied().unwrap_or(0));
            (delta > 0).then(|| (key.clone(), delta as f64 * 60.0 / secs))
        })
        .collect()
}

/// One stable log line: `api requests/min: <VERB> <resource>=<rate> ...
/// total=<sum>`, sorted by verb then resource, rates with at most two
/// decimals (more only when that would print a non-zero rate as 0).
pub fn format_line(rates: &Rates) -> String {
    let mut line = String::from("api requests/min:");
    for ((verb, resource), rate) in rates {
        line.push_str(&format!(" {verb} {resource}={}", fmt_rate(*rate)));
    }
    // fold from +0.0: `sum()` of no f64s is -0.0, printed "-0"
    line.push_str(&format!(" total={}", fmt_rate(rates.values().fold(0.0, |a, b| a + b))));
    line
}

fn fmt_rate(rate: f64) -> String {
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    let s = trim(format!("{rate:.2}"));
    if s == "0" && rate > 0.0 {
        trim(format!("{rate:.6}"))
    } else {
        s
    }
}

// ------------------------------------------------------------------ client

/// Tower layer counting each request into an [`ApiCounts`], then forwarding it.
#[derive(Debug, Clone)]
pub struct CountLayer {
    counts: Arc<ApiCounts>,
}

impl CountLayer {
    pub fn new(counts: Arc<ApiCounts>) -> Self {
        CountLayer { counts }
    }
}

impl<S> tower::Layer<S> for CountLayer {
    type Service = CountService<S>;

    fn layer(&self, inner: S) -> CountService<S> {
        CountService { inner, counts: self.counts.clone() }
    }
}

/// Service made by [`CountLayer`].
#[derive(Debug, Clone)]
pub struct CountService<S> {
    inner: S,
    counts: Arc<ApiCounts>,
}

impl<S, B> tower::Service<http::Request<B>> for CountService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        self.counts.record_request(req.method(), req.uri().path(), req.uri().query());
        self.inner.call(req)
    }
}

/// A client exactly like `kube::Client::try_from(config)` (same default stack:
/// TLS, auth, timeouts, retry, headers, tracing) with a [`CountLayer`] on top,
/// and its fresh counters.
pub fn counted_client(config: kube::Config) -> Result<(kube::Client, Arc<ApiCounts>), kube::Error> {
    let counts = Arc::new(ApiCounts::new());
    let client = counted_client_with(config, counts.clone())?;
    Ok((client, counts))
}

/// Like [`counted_client`], counting into `counts` (e.g. one `ApiCounts` for
/// several clients of the same process).
pub fn counted_client_with(config: kube::Config, counts: Arc<ApiCounts>) -> Result<kube::Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&CountLayer::new(counts)).build())
}

// ------------------------------------------------------------------ reporter

/// Every `period` (a zero period is taken as one second), logs the
/// per-minute rates over that period with `tracing::info!` and a `who` field
/// (e.g. `operator`, `node-helper`), as [`format_line`]. Runs until aborted.
pub fn spawn_reporter(counts: Arc<ApiCounts>, period: Duration, who: &str) -> tokio::task::JoinHandle<()> {
    let who = who.to_owned();
    let period = if period.is_zero() { Duration::from_secs(1) } else { period };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = counts.snapshot();
        loop {
            tick.tick().await;
            let after = counts.snapshot();
            let line = format_line(&per_minute(&before, &after));
            tracing::info!(who = who.as_str(), "{line}");
            before = after;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, path: &str, query: Option<&str>) -> (&'static str, String) {
        classify(&method, path, query)
    }

    fn key(verb: &str, resource: &str) -> Key {
        (verb.to_owned(), resource.to_owned())
    }

    #[test]
    fn classify_core_and_group_resources() {
        // Lease GET by name in kube-system (leader election).
        assert_eq!(c(Method::GET, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-controller-manager", None), ("GET", "leases".into()));
        // LIST nodes (cluster-scoped core resource), with list params.
        assert_eq!(c(Method::GET, "/api/v1/nodes", None), ("LIST", "nodes".into()));
        assert_eq!(c(Method::GET, "/api/v1/nodes", Some("labelSelector=node-role.kubernetes.io%2Fcontrol-plane&limit=500")), ("LIST", "nodes".into()));
        // LIST in a namespace and across namespaces.
        assert_eq!(c(Method::GET, "/api/v1/namespaces/kube-system/pods", None), ("LIST", "pods".into()));
        assert_eq!(c(Method::GET, "/api/v1/pods", Some("fieldSelector=spec.nodeName%3Dm1")), ("LIST", "pods".into()));
        // GET of a Pod by name, its log subresource.
        assert_eq!(c(Method::GET, "/api/v1/namespaces/kcm-operator/pods/helper-x", None), ("GET", "pods".into()));
        assert_eq!(c(Method::GET, "/api/v1/namespaces/kcm-operator/pods/helper-x/log", Some("container=helper")), ("GET", "pods/log".into()));
    }

    #[test]
    fn classify_watches() {
        // kube-runtime watcher: watch=true, resourceVersion, fieldSelector, timeout.
        assert_eq!(
            c(
                Method::GET,
                "/apis/kcm.kcm-operator.io/v1alpha1/kcmnodes",
                Some("&watch=true&timeoutSeconds=290&fieldSelector=metadata.name%3Dm1&allowWatchBookmarks=true&resourceVersion=12345")
            ),
            ("WATCH", "kcmnodes".into())
        );
        assert_eq!(c(Method::GET, "/api/v1/namespaces/kube-system/pods", Some("resourceVersion=0&watch=1")), ("WATCH", "pods".into()));
        assert_eq!(c(Method::GET, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", Some("watch=True")), ("WATCH", "leases".into()));
        // watch=false / a look-alike parameter is a LIST.
        assert_eq!(c(Method::GET, "/api/v1/nodes", Some("watch=false")), ("LIST", "nodes".into()));
        assert_eq!(c(Method::GET, "/api/v1/nodes", Some("sendInitialEvents=true&xwatch=true")), ("LIST", "nodes".into()));
        // Legacy /watch/ prefix.
        assert_eq!(c(Method::GET, "/api/v1/watch/namespaces/default/pods", None), ("WATCH", "pods".into()));
        assert_eq!(c(Method::GET, "/api/v1/watch/nodes/m1", None), ("WATCH", "nodes".into()));
    }

    #[test]
    fn classify_writes_and_subresources() {
        // PATCH of the status subresource of a cluster-scoped custom resource.
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/kcm.kcm-operator.io/v1alpha1/kubecontrollermanagers/kube-controller-manager/status",
                Some("fieldManager=kcm-operator&force=true")
            ),
            ("PATCH", "kubecontrollermanagers/status".into())
        );
        // CSR approval is a PUT on the approval subresource.
        assert_eq!(
            c(Method::PUT, "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-abcde/approval", None),
            ("UPDATE", "certificatesigningrequests/approval".into())
        );
        assert_eq!(
            c(Method::PUT, "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-abcde/status", None),
            ("UPDATE", "certificatesigningrequests/status".into())
        );
        // CSR create (cluster-scoped collection).
        assert_eq!(c(Method::POST, "/apis/certificates.k8s.io/v1/certificatesigningrequests", None), ("CREATE", "certificatesigningrequests".into()));
        // TokenRequest: POST on the token subresource of a ServiceAccount.
        assert_eq!(c(Method::POST, "/api/v1/namespaces/kcm-operator/serviceaccounts/kcm-node-helper/token", None), ("CREATE", "serviceaccounts/token".into()));
        // Events POST in a namespace (core and events.k8s.io).
        assert_eq!(c(Method::POST, "/api/v1/namespaces/kube-system/events", None), ("CREATE", "events".into()));
        assert_eq!(c(Method::POST, "/apis/events.k8s.io/v1/namespaces/kube-system/events", None), ("CREATE", "events".into()));
        // Lease renew (PUT) and create.
        assert_eq!(c(Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kcm-operator", None), ("UPDATE", "leases".into()));
        assert_eq!(c(Method::POST, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", Some("fieldManager=x")), ("CREATE", "leases".into()));
        // DELETE of one object and of a collection; pod eviction.
        assert_eq!(c(Method::DELETE, "/api/v1/namespaces/kcm-operator/pods/rescue", None), ("DELETE", "pods".into()));
        assert_eq!(c(Method::DELETE, "/api/v1/namespaces/kcm-operator/pods", Some("labelSelector=a%3Db")), ("DELETE", "pods".into()));
        assert_eq!(c(Method::POST, "/api/v1/namespaces/kcm-operator/pods/p/eviction", None), ("CREATE", "pods/eviction".into()));
        // Trailing slash is ignored.
        assert_eq!(c(Method::GET, "/api/v1/nodes/", None), ("LIST", "nodes".into()));
        // Unusual methods keep the resource.
        assert_eq!(c(Method::HEAD, "/api/v1/nodes/m1", None), (OTHER_VERB, "nodes".into()));
    }

    #[test]
    fn classify_namespaces_themselves() {
        assert_eq!(c(Method::GET, "/api/v1/namespaces", None), ("LIST", "namespaces".into()));
        assert_eq!(c(Method::GET, "/api/v1/namespaces/kube-system", None), ("GET", "namespaces".into()));
        assert_eq!(c(Method::POST, "/api/v1/namespaces", None), ("CREATE", "namespaces".into()));
        assert_eq!(c(Method::DELETE, "/api/v1/namespaces/e2e-1", None), ("DELETE", "namespaces".into()));
        assert_eq!(c(Method::PUT, "/api/v1/namespaces/e2e-1/finalize", None), ("UPDATE", "namespaces/finalize".into()));
        assert_eq!(c(Method::GET, "/api/v1/namespaces/e2e-1/status", None), ("GET", "namespaces/status".into()));
        assert_eq!(c(Method::GET, "/api/v1/namespaces", Some("watch=true&fieldSelector=metadata.name%3De2e-1")), ("WATCH", "namespaces".into()));
    }

    #[test]
    fn classify_non_resource_and_discovery() {
        assert_eq!(c(Method::GET, "/version", None), ("GET", "/version".into()));
        assert_eq!(c(Method::GET, "/healthz", None), ("GET", "/healthz".into()));
        assert_eq!(c(Method::GET, "/readyz", Some("verbose")), ("GET", "/readyz".into()));
        assert_eq!(c(Method::GET, "/openapi/v2", None), ("GET", "/openapi/v2".into()));
        assert_eq!(c(Method::GET, "/api", None), ("GET", "/api".into()));
        assert_eq!(c(Method::GET, "/api/v1", None), ("GET", "/api/v1".into()));
        assert_eq!(c(Method::GET, "/apis", None), ("GET", "/apis".into()));
        assert_eq!(c(Method::GET, "/apis/kcm.kcm-operator.io", None), ("GET", "/apis/kcm.kcm-operator.io".into()));
        assert_eq!(c(Method::GET, "/apis/kcm.kcm-operator.io/v1alpha1/", Some("watch=true")), ("GET", "/apis/kcm.kcm-operator.io/v1alpha1".into()));
        assert_eq!(c(Method::GET, "/", None), ("GET", "/".into()));
        assert_eq!(c(Method::GET, "", None), ("GET", "/".into()));
    }

    #[test]
    fn counts_accumulate_and_snapshot() {
        let counts = ApiCounts::new();
        counts.record_request(&Method::GET, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/a", None);
        counts.record_request(&Method::GET, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/b", None);
        counts.record_request(&Method::GET, "/api/v1/nodes", None);
        counts.record("WATCH", "kcmnodes");
        let snap = counts.snapshot();
        let want: BTreeMap<Key, u64> = [(key("GET", "leases"), 2), (key("LIST", "nodes"), 1), (key("WATCH", "kcmnodes"), 1)].into();
        assert_eq!(snap.counts, want);
    }

    #[test]
    fn counts_from_many_threads() {
        let counts = Arc::new(ApiCounts::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counts = counts.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| counts.record("GET", "leases")))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counts.snapshot().counts[&key("GET", "leases")], 4000);
    }

    fn snap(at: Instant, entries: &[(&str, &str, u64)]) -> Snapshot {
        Snapshot { at, counts: entries.iter().map(|(v, r, n)| (key(v, r), *n)).collect() }
    }

    #[test]
    fn rates_per_minute() {
        let t0 = Instant::now();
        let before = snap(t0, &[("GET", "leases", 10), ("PATCH", "kubecontrollermanagers/status", 4), ("LIST", "nodes", 3)]);
        let after = snap(
            t0 + Duration::from_secs(300),
            &[("GET", "leases", 160), ("PATCH", "kubecontrollermanagers/status", 34), ("LIST", "nodes", 3), ("WATCH", "kcmnodes", 1)],
        );
        let rates = per_minute(&before, &after);
        let want: Rates = [(key("GET", "leases"), 30.0), (key("PATCH", "kubecontrollermanagers/status"), 6.0), (key("WATCH", "kcmnodes"), 0.2)].into();
        assert_eq!(rates, want, "unchanged LIST nodes is left out");
        assert_eq!(format_line(&rates), "api requests/min: GET leases=30 PATCH kubecontrollermanagers/status=6 WATCH kcmnodes=0.2 total=36.2");
        // Over 30 s a single request is 2/min.
        let rates = per_minute(&snap(t0, &[]), &snap(t0 + Duration::from_secs(30), &[("CREATE", "events", 1)]));
        assert_eq!(format_line(&rates), "api requests/min: CREATE events=2 total=2");
        // No time elapsed: nothing (no division by zero).
        assert!(per_minute(&after, &after).is_empty());
        assert!(per_minute(&after, &before).is_empty());
    }

    #[test]
    fn format_is_sorted_and_stable() {
        let rates: Rates = [
            (key("WATCH", "leases"), 1.0),
            (key("GET", "leases"), 12.3456),
            (key("CREATE", "certificatesigningrequests"), 1.0 / 3.0),
            (key("GET", "/version"), 0.001),
            (key("UPDATE", "certificatesigningrequests/approval"), 2.0 / 3.0),
        ]
        .into();
        assert_eq!(
            format_line(&rates),
            "api requests/min: CREATE certificatesigningrequests=0.33 GET /version=0.001 GET leases=12.35 \
             UPDATE certificatesigningrequests/approval=0.67 WATCH leases=1 total=14.35"
        );
        assert_eq!(format_line(&Rates::new()), "api requests/min: total=0");
        assert_eq!(fmt_rate(100.0), "100");
        assert_eq!(fmt_rate(0.1), "0.1");
        assert_eq!(fmt_rate(0.0), "0");
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reporter_logs_the_line_with_who() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let counts = Arc::new(ApiCounts::new());
        counts.record("GET", "leases"); // before the reporter starts: not in its first period
        let handle = spawn_reporter(counts.clone(), Duration::from_millis(200), "operator-test");
        tokio::task::yield_now().await; // let it take its first snapshot
        counts.record("PATCH", "kubecontrollermanagers/status");
        tokio::time::sleep(Duration::from_millis(300)).await;
        handle.abort();

        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line = out.lines().find(|l| l.contains("api requests/min:")).unwrap_or_else(|| panic!("no line in {out:?}"));
        assert!(line.contains("who=\"operator-test\""), "{line}");
        assert!(line.contains("PATCH kubecontrollermanagers/status="), "{line}");
        assert!(!line.contains("GET leases"), "{line}");
    }

    /// Inner service answering with the request's URI.
    struct Echo;

    impl tower::Service<http::Request<()>> for Echo {
        type Response = String;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<String, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(req.uri().to_string()))
        }
    }

    #[tokio::test]
    async fn count_layer_counts_and_forwards() {
        use tower::{Layer, Service};
        let counts = Arc::new(ApiCounts::new());
        let mut svc = CountLayer::new(counts.clone()).layer(Echo);
        let req =
            http::Request::patch("/apis/kcm.kcm-operator.io/v1alpha1/kubecontrollermanagers/kube-controller-manager/status?fieldManager=x").body(()).unwrap();
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        let resp = svc.call(req).await.unwrap();
        assert_eq!(resp, "/apis/kcm.kcm-operator.io/v1alpha1/kubecontrollermanagers/kube-controller-manager/status?fieldManager=x");
        assert_eq!(counts.snapshot().counts, [(key("PATCH", "kubecontrollermanagers/status"), 1)].into());
    }
}
