//! Prometheus metrics: a small registry of gauges, counters and histograms with labels,
//! rendered in the text exposition format 0.0.4 (`# HELP`, `# TYPE`, one line a series),
//! and the metric families of the operator ([`OperatorMetrics`], prefix `kcm_operator_`)
//! and of the node-helper ([`HelperMetrics`], prefix `kcm_node_helper_`).
//!
//! Names follow the Prometheus conventions cert-manager and kube-state-metrics users know:
//! times since the epoch end in `_seconds`, counters in `_total`, booleans are 0/1 gauges.
//! Written here rather than taken from a crate: the few families below need no more than
//! this, and the format is a page of text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::api::{KcmNodeStatus, NodeStatus};
use crate::apicount::ApiCounts;

/// The `Content-Type` of [`Registry::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    Number(f64),
    /// Observations per bucket (not cumulative; the last one is `+Inf`), their sum and count.
    Histogram {
        buckets: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Kind,
    label_names: &'static [&'static str],
    /// Upper bounds of a histogram's buckets, increasing (`+Inf` is implied).
    bounds: Vec<f64>,
    /// By label values, in the order of `label_names`.
    series: BTreeMap<Vec<String>, Value>,
}

/// The metric families of one process. Cheap to clone (shared); every update takes one
/// short lock.
#[derive(Clone, Debug, Default)]
pub struct Registry(Arc<Mutex<BTreeMap<&'static str, Family>>>);

fn valid_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, Family>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, name: &'static str, help: &'static str, kind: Kind, label_names: &'static [&'static str], bounds: &[f64]) -> Metric {
        assert!(valid_name(name, true), "metric name {name:?}");
        assert!(kind != Kind::Counter || name.ends_with("_total"), "counter {name} must end in _total");
        for l in label_names {
            assert!(valid_name(l, false) && !l.starts_with("__") && (kind != Kind::Histogram || *l != "le"), "label name {l:?} of {name}");
        }
        assert!(bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()), "buckets of {name} must increase");
        let mut families = self.lock();
        let f = families.entry(name).or_insert_with(|| Family { help, kind, label_names, bounds: bounds.to_vec(), series: BTreeMap::new() });
        assert!(f.kind == kind && f.label_names == label_names, "{name} registered twice, differently");
        Metric { registry: self.clone(), name }
    }

    /// A gauge: a value that goes up and down, set by the caller.
    pub fn gauge(&self, name: &'static str, help: &'static str, label_names: &'static [&'static str]) -> Gauge {
        Gauge(self.register(name, help, Kind::Gauge, label_names, &[]))
    }

    /// A counter (name ending in `_total`): only ever goes up, from 0 at process start.
    pub fn counter(&self, name: &'static str, help: &'static str, label_names: &'static [&'static str]) -> Counter {
        Counter(self.register(name, help, Kind::Counter, label_names, &[]))
    }

    /// A histogram with these bucket upper bounds (`+Inf` is added).
    pub fn histogram(&self, name: &'static str, help: &'static str, label_names: &'static [&'static str], bounds: &[f64]) -> Histogram {
        Histogram(self.register(name, help, Kind::Histogram, label_names, bounds))
    }

    /// The names of the series this registry can export: each family's name, and for a
    /// histogram its `_bucket`, `_sum` and `_count` series.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, f) in self.lock().iter() {
            match f.kind {
                Kind::Histogram => out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
                _ => out.push(name.to_string()),
            }
        }
        out
    }

    /// The text exposition format 0.0.4: families by name, each with its HELP and TYPE
    /// lines, then its series ordered by label values; labels sorted by name within a
    /// series (a histogram's `le` last). A family with no series is left out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in self.lock().iter().filter(|(_, f)| !f.series.is_empty()) {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(f.help));
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
            let mut order: Vec<usize> = (0..f.label_names.len()).collect();
            order.sort_by_key(|i| f.label_names[*i]);
            for (values, value) in &f.series {
                let labels: Vec<(&str, &str)> = order.iter().map(|i| (f.label_names[*i], values[*i].as_str())).collect();
                match value {
                    Value::Number(v) => series_line(&mut out, name, "", &labels, *v),
                    Value::Histogram { buckets, sum, count } => {
                        let mut cumulative = 0;
                        for (i, n) in buckets.iter().enumerate() {
                            cumulative += n;
                            let le = f.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| number(*b));
                            let mut with_le = labels.clone();
                            with_le.push(("le", &le));
                            series_line(&mut out, name, "_bucket", &with_le, cumulative as f64);
                        }
                        series_line(&mut out, name, "_sum", &labels, *sum);
                        series_line(&mut out, name, "_count", &labels, *count as f64);
                    }
                }
            }
        }
        out
    }
}

fn series_line(out: &mut String, name: &str, suffix: &str, labels: &[(&str, &str)], v: f64) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
        let _ = write!(out, "{{{}}}", inner.join(","));
    }
    let _ = writeln!(out, " {}", number(v));
}

/// A sample value or `le` bound as Prometheus writes it: `+Inf`, `-Inf`, `NaN`, or the
/// shortest decimal that reads back as the same float.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value: backslash, double quote and line feed escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// HELP text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// One family of a [`Registry`].
#[derive(Clone, Debug)]
struct Metric {
    registry: Registry,
    name: &'static str,
}

impl Metric {
    fn key(family: &Family, name: &str, labels: &[&str]) -> Vec<String> {
        assert_eq!(labels.len(), family.label_names.len(), "{name}: label values for {:?}", family.label_names);
        labels.iter().map(|s| s.to_string()).collect()
    }

    /// Runs `f` on the series of `labels` (made empty first when missing), with the
    /// family's bucket bounds.
    fn update(&self, labels: &[&str], f: impl FnOnce(&[f64], &mut Value)) {
        let mut families = self.registry.lock();
        let family = families.get_mut(self.name).expect("registered");
        let key = Self::key(family, self.name, labels);
        let empty = match family.kind {
            Kind::Histogram => Value::Histogram { buckets: vec![0; family.bounds.len() + 1], sum: 0.0, count: 0 },
            _ => Value::Number(0.0),
        };
        let Family { bounds, series, .. } = family;
        f(bounds, series.entry(key).or_insert(empty));
    }

    fn remove(&self, labels: &[&str]) {
        let mut families = self.registry.lock();
        let family = families.get_mut(self.name).expect("registered");
        let key = Self::key(family, self.name, labels);
        family.series.remove(&key);
    }

    fn retain(&self, mut keep: impl FnMut(&[String]) -> bool) {
        self.registry.lock().get_mut(self.name).expect("registered").series.retain(|k, _| keep(k));
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug)]
pub struct Gauge(Metric);

impl Gauge {
    pub fn set(&self, labels: &[&str], v: f64) {
        self.0.update(labels, |_, s| *s = Value::Number(v));
    }
    pub fn set_bool(&self, labels: &[&str], v: bool) {
        self.set(labels, if v { 1.0 } else { 0.0 });
    }
    /// Removes one series (it is no longer exported).
    pub fn remove(&self, labels: &[&str]) {
        self.0.remove(labels);
    }
    /// Keeps only the series whose label values `keep` accepts.
    pub fn retain(&self, keep: impl FnMut(&[String]) -> bool) {
        self.0.retain(keep);
    }
    /// Removes every series.
    pub fn clear(&self) {
        self.0.retain(|_| false);
    }
}

/// A count that only goes up.
#[derive(Clone, Debug)]
pub struct Counter(Metric);

impl Counter {
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }
    pub fn add(&self, labels: &[&str], v: f64) {
        assert!(v >= 0.0, "a counter only goes up");
        self.0.update(labels, |_, s| {
            if let Value::Number(n) = s {
                *n += v;
            }
        });
    }
    /// Exports the series at 0 before anything happened, so `rate()` and `increase()` see
    /// the first event.
    pub fn init(&self, labels: &[&str]) {
        self.add(labels, 0.0);
    }
    /// Mirrors a cumulative count kept elsewhere (it must only grow).
    pub fn set_total(&self, labels: &[&str], v: f64) {
        self.0.update(labels, |_, s| *s = Value::Number(v));
    }
}

/// Observations counted into buckets, with their sum and count.
#[derive(Clone, Debug)]
pub struct Histogram(Metric);

impl Histogram {
    pub fn observe(&self, labels: &[&str], v: f64) {
        self.0.update(labels, |bounds, s| {
            if let Value::Histogram { buckets, sum, count } = s {
                let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
                buckets[i] += 1;
                *sum += v;
                *count += 1;
            }
        });
    }
}

/// Copies a process's API request counters ([`ApiCounts`]) into `counter`, whose labels are
/// `prefix` then `verb` and `resource`.
fn mirror_api_counts(counter: &Counter, counts: &ApiCounts, prefix: &[&str]) {
    for ((verb, resource), n) in counts.snapshot().counts {
        let mut labels = prefix.to_vec();
        labels.extend([verb.as_str(), resource.as_str()]);
        counter.set_total(&labels, n as f64);
    }
}

/// How a rollout step ended (label `result`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepResult {
    Applied,
    Failed,
}

impl StepResult {
    pub fn as_str(self) -> &'static str {
        match self {
            StepResult::Applied => "applied",
            StepResult::Failed => "failed",
        }
    }
    pub const ALL: [StepResult; 2] = [StepResult::Applied, StepResult::Failed];
}

/// Label `reason` of `kcm_operator_csr_decisions_total` for a certificate issued.
pub const ISSUED: &str = "Issued";

/// Bucket bounds (seconds) of `kcm_operator_rollout_step_duration_seconds`: a step takes a
/// few seconds (a restart) to minutes (the CSR wait and kcm's health timeout).
pub const STEP_BUCKETS: [f64; 11] = [1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0];

/// Values of `kcm_operator_reconcile_errors_total{kind}`: which loop failed.
pub const ERROR_KINDS: [&str; 3] = ["rollout", "rescue", "signer"];

/// The operator's metrics (served on `/metrics` beside `/healthz` and `/readyz`). Series
/// labelled `node`, the conditions and `kcm_leader_present` come from the rollout and are
/// exported by the leading replica only.
#[derive(Clone, Debug)]
pub struct OperatorMetrics {
    pub registry: Registry,
    pub certificate_not_after: Gauge,
    pub certificate_next_renewal: Gauge,
    pub master_healthy: Gauge,
    pub rotations: Counter,
    pub csr_decisions: Counter,
    pub rollout_steps: Counter,
    pub rollout_step_duration: Histogram,
    pub reconcile_errors: Counter,
    pub leader: Gauge,
    pub kcm_leader_present: Gauge,
    pub condition: Gauge,
    pub api_requests: Counter,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            certificate_not_after: r.gauge(
                "kcm_operator_certificate_not_after_seconds",
                "When the kube-controller-manager certificate on this master expires (unix seconds), from its KcmNode's status.notAfter.",
                &["node"],
            ),
            certificate_next_renewal: r.gauge(
                "kcm_operator_certificate_next_renewal_seconds",
                "When the operator renews the kube-controller-manager certificate on this master (unix seconds), as in its KcmNode's spec.renewAt.",
                &["node"],
            ),
            master_healthy: r.gauge(
                "kcm_operator_master_healthy",
                "1 when this master's helper reported a healthy kube-controller-manager within the staleness limit, else 0.",
                &["node"],
            ),
            rotations: r.counter(
                "kcm_operator_rotations_total",
                "Certificate renewal steps (revisions <spec>/renew-<serial>) seen ending, by result (applied, failed).",
                &["result"],
            ),
            csr_decisions: r.counter(
                "kcm_operator_csr_decisions_total",
                "CertificateSigningRequests for the kcm signer decided by this replica, by reason: Issued, or the rule a denial names.",
                &["reason"],
            ),
            rollout_steps: r.counter(
                "kcm_operator_rollout_steps_total",
                "Rollout steps (a target revision given to a master) seen ending, by result (applied, failed).",
                &["result"],
            ),
            rollout_step_duration: r.histogram(
                "kcm_operator_rollout_step_duration_seconds",
                "Time from the operator giving a master its target revision to the master's KcmNode reporting it applied or failed.",
                &[],
                &STEP_BUCKETS,
            ),
            reconcile_errors: r.counter(
                "kcm_operator_reconcile_errors_total",
                "Failed passes of the operator's loops, by kind: rollout, rescue, signer.",
                &["kind"],
            ),
            leader: r.gauge("kcm_operator_leader", "1 when this replica leads (signs CSRs and rolls out), else 0.", &[]),
            kcm_leader_present: r.gauge(
                "kcm_operator_kcm_leader_present",
                "1 when kube-controller-manager's Lease has a live holder, else 0 (exported by the leading replica).",
                &[],
            ),
            condition: r.gauge(
                "kcm_operator_condition",
                "The KubeControllerManager's status conditions: 1 for the current status of each type, 0 for the other.",
                &["type", "status"],
            ),
            api_requests: r.counter(
                "kcm_operator_api_requests_total",
                "Kubernetes API requests this process sent, by verb and resource.",
                &["verb", "resource"],
            ),
            registry: r,
        };
        for s in StepResult::ALL {
            m.rotations.init(&[s.as_str()]);
            m.rollout_steps.init(&[s.as_str()]);
        }
        for reason in std::iter::once(ISSUED).chain(crate::signer::Rule::ALL.iter().map(|r| r.reason())) {
            m.csr_decisions.init(&[reason]);
        }
        for kind in ERROR_KINDS {
            m.reconcile_errors.init(&[kind]);
        }
        m.leader.set(&[], 0.0);
        m
    }

    /// The text for `/metrics`, with the API counters of this process as they are now.
    pub fn render(&self, counts: Option<&ApiCounts>) -> String {
        if let Some(c) = counts {
            mirror_api_counts(&self.api_requests, c, &[]);
        }
        self.registry.render()
    }

    /// The per-master series from one look at the masters: one series per master in
    /// `entries` (one entry per selected master), none for a master that is gone; a
    /// certificate time only where it is known.
    pub fn masters(&self, entries: &[NodeStatus], renewals: &BTreeMap<String, i64>, now: i64) {
        let names: BTreeSet<&str> = entries.iter().map(|n| n.name.as_str()).collect();
        for g in [&self.certificate_not_after, &self.certificate_next_renewal, &self.master_healthy] {
            g.retain(|labels| names.contains(labels[0].as_str()));
        }
        for n in entries {
            let node = [n.name.as_str()];
            match n.not_after.as_deref().and_then(crate::rollout::parse_time) {
                Some(t) => self.certificate_not_after.set(&node, t as f64),
                None => self.certificate_not_after.remove(&node),
            }
            match renewals.get(&n.name) {
                Some(t) => self.certificate_next_renewal.set(&node, *t as f64),
                None => self.certificate_next_renewal.remove(&node),
            }
            self.master_healthy.set_bool(&node, n.healthy && crate::rollout::fresh(n, now));
        }
    }

    /// The CR's conditions, `(type, status)` as the rollout sets them.
    pub fn conditions<'a>(&self, conds: impl IntoIterator<Item = (&'a str, bool)>) {
        for (type_, status) in conds {
            self.condition.set_bool(&[type_, "true"], status);
            self.condition.set_bool(&[type_, "false"], !status);
        }
    }

    /// One rollout step seen ending (see [`crate::rollout::StepTracker`]).
    pub fn step_ended(&self, revision: &str, result: StepResult, took: Option<Duration>) {
        self.rollout_steps.inc(&[result.as_str()]);
        if let Some(d) = took {
            self.rollout_step_duration.observe(&[], d.as_secs_f64());
        }
        if revision.parse::<crate::api::Revision>().is_ok_and(|r| r.renews().is_some()) {
            self.rotations.inc(&[result.as_str()]);
        }
    }

    /// This replica leads (`true`) or no longer does: a replica that stopped leading drops
    /// the series only the leader keeps current, so a stale one never outlives its leadership.
    pub fn set_leading(&self, leading: bool) {
        self.leader.set_bool(&[], leading);
        if !leading {
            for g in [&self.certificate_not_after, &self.certificate_next_renewal, &self.master_healthy, &self.kcm_leader_present, &self.condition] {
                g.clear();
            }
        }
    }
}

/// The node-helper's metrics (served on its own `/metrics`), every series labelled with
/// its master's `node`.
#[derive(Clone, Debug)]
pub struct HelperMetrics {
    pub registry: Registry,
    node: String,
    pub certificate_not_after: Gauge,
    pub healthy: Gauge,
    pub unit_active: Gauge,
    pub steps: Counter,
    pub api_requests: Counter,
}

impl HelperMetrics {
    pub fn new(node: &str) -> Self {
        let r = Registry::new();
        let m = Self {
            certificate_not_after: r.gauge(
                "kcm_node_helper_certificate_not_after_seconds",
                "When the kube-controller-manager certificate on this master expires (unix seconds), as last reported.",
                &["node"],
            ),
            healthy: r.gauge("kcm_node_helper_healthy", "1 when kube-controller-manager on this master answers /healthz, as last reported, else 0.", &["node"]),
            unit_active: r.gauge(
                "kcm_node_helper_unit_active",
                "1 when kube-controller-manager's systemd unit is active, as last reported, else 0.",
                &["node"],
            ),
            steps: r.counter("kcm_node_helper_steps_total", "Rollout steps this helper applied, by result (applied, failed).", &["node", "result"]),
            api_requests: r.counter(
                "kcm_node_helper_api_requests_total",
                "Kubernetes API requests this process sent, by verb and resource.",
                &["node", "verb", "resource"],
            ),
            node: node.to_string(),
            registry: r,
        };
        for s in StepResult::ALL {
            m.steps.init(&[node, s.as_str()]);
        }
        m
    }

    /// What the helper just reported on its KcmNode.
    pub fn report(&self, r: &KcmNodeStatus) {
        let node = [self.node.as_str()];
        match r.not_after.as_deref().and_then(crate::rollout::parse_time) {
            Some(t) => self.certificate_not_after.set(&node, t as f64),
            None => self.certificate_not_after.remove(&node),
        }
        self.healthy.set_bool(&node, r.healthy);
        self.unit_active.set_bool(&node, r.unit_active);
    }

    pub fn step(&self, result: StepResult) {
        self.steps.inc(&[self.node.as_str(), result.as_str()]);
    }

    /// The text for `/metrics`, with the API counters of this process as they are now.
    pub fn render(&self, counts: Option<&ApiCounts>) -> String {
        if let Some(c) = counts {
            mirror_api_counts(&self.api_requests, c, &[self.node.as_str()]);
        }
        self.registry.render()
    }
}

/// Every series name the operator and the helper export (alerts may name only these).
pub fn exported_names() -> Vec<String> {
    let mut names = OperatorMetrics::new().registry.names();
    names.extend(HelperMetrics::new("-").registry.names());
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn renders_the_text_format_with_help_type_sorted_escaped_labels_and_histograms() {
        let r = Registry::new();
        let g = r.gauge("b_temperature_celsius", "A gauge.\nSecond line with a \\ backslash.", &["zone", "app"]);
        let c = r.counter("a_requests_total", "A counter.", &["code"]);
        let h = r.histogram("c_duration_seconds", "A histogram.", &["step"], &[0.5, 1.0, 2.5]);
        let unused = r.gauge("d_unused", "Never set: not rendered.", &[]);
        g.set(&["north", "x\"y\\z\nw"], 21.5);
        g.set(&["east", "plain"], -3.0);
        c.inc(&["200"]);
        c.add(&["200"], 2.0);
        c.init(&["500"]);
        for v in [0.25, 0.5, 0.75, 3.0] {
            h.observe(&["apply"], v);
        }
        let _ = unused;
        let want = r#"# HELP a_requests_total A counter.
# TYPE a_requests_total counter
a_requests_total{code="200"} 3
a_requests_total{code="500"} 0
# HELP b_temperature_celsius A gauge.\nSecond line with a \\ backslash.
# TYPE b_temperature_celsius gauge
b_temperature_celsius{app="plain",zone="east"} -3
b_temperature_celsius{app="x\"y\\z\nw",zone="north"} 21.5
# HELP c_duration_seconds A histogram.
# TYPE c_duration_seconds histogram
c_duration_seconds_bucket{step="apply",le="0.5"} 2
c_duration_seconds_bucket{step="apply",le="1"} 3
c_duration_seconds_bucket{step="apply",le="2.5"} 3
c_duration_seconds_bucket{step="apply",le="+Inf"} 4
c_duration_seconds_sum{step="apply"} 4.5
c_duration_seconds_count{step="apply"} 4
"#;
        assert_eq!(r.render(), want);
        assert_eq!(
            r.names(),
            ["a_requests_total", "b_temperature_celsius", "c_duration_seconds_bucket", "c_duration_seconds_sum", "c_duration_seconds_count", "d_unused"]
        );
        g.remove(&["north", "x\"y\\z\nw"]);
        g.clear();
        assert!(!r.render().contains("b_temperature_celsius"));
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(1_800_000_000.0), "1800000000");
    }

    #[test]
    #[should_panic(expected = "must end in _total")]
    fn a_counter_without_total_is_refused() {
        Registry::new().counter("kcm_operator_rotations", "x", &[]);
    }

    fn status(name: &str, not_after: Option<&str>, healthy: bool, observed_at: i64) -> NodeStatus {
        let at = |t: i64| k8s_openapi::jiff::Timestamp::from_second(t).unwrap().to_string();
        NodeStatus {
            name: name.into(),
            report: KcmNodeStatus { not_after: not_after.map(String::from), healthy, observed_at: Some(at(observed_at)), ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn per_master_series_are_set_and_removed_when_a_master_is_gone() {
        const NOW: i64 = 1_800_000_000;
        let m = OperatorMetrics::new();
        let entries = [status("m1", Some("2027-02-01T00:00:00Z"), true, NOW - 1), status("m2", None, true, NOW - 1000), status("m3", None, false, NOW - 1)];
        let renewals: BTreeMap<String, i64> = [("m1".to_string(), 1_801_000_000)].into();
        m.masters(&entries, &renewals, NOW);
        let text = m.render(None);
        has_lines(
            &text,
            &[
                "kcm_operator_certificate_not_after_seconds{node=\"m1\"} 1801440000",
                "kcm_operator_certificate_next_renewal_seconds{node=\"m1\"} 1801000000",
                "kcm_operator_master_healthy{node=\"m1\"} 1",
                "kcm_operator_master_healthy{node=\"m2\"} 0", // its report is stale
                "kcm_operator_master_healthy{node=\"m3\"} 0",
            ],
        );
        assert!(!text.contains("not_after_seconds{node=\"m2\"}") && !text.contains("renewal_seconds{node=\"m3\"}"), "{text}");

        // m1 leaves the selection; m3 gets a certificate.
        let entries = [status("m2", None, true, NOW), status("m3", Some("2027-03-01T00:00:00Z"), true, NOW)];
        m.masters(&entries, &BTreeMap::new(), NOW);
        let text = m.render(None);
        assert!(!text.contains("node=\"m1\""), "m1's series outlived it:\n{text}");
        assert!(!text.contains("kcm_operator_certificate_next_renewal_seconds"), "{text}");
        assert!(text.contains("kcm_operator_certificate_not_after_seconds{node=\"m3\"} 1803859200"), "{text}");

        // A replica that stops leading drops them all.
        m.kcm_leader_present.set_bool(&[], true);
        m.conditions([("Degraded", true)]);
        m.set_leading(false);
        let text = m.render(None);
        assert!(!text.contains("node=") && !text.contains("kcm_operator_condition") && !text.contains("kcm_leader_present"), "{text}");
        assert!(text.contains("kcm_operator_leader 0"), "{text}");
    }

    #[test]
    fn counters_are_exported_at_zero_and_steps_count_rotations() {
        let m = OperatorMetrics::new();
        let text = m.render(None);
        has_lines(
            &text,
            &[
                "kcm_operator_rotations_total{result=\"applied\"} 0",
                "kcm_operator_rollout_steps_total{result=\"failed\"} 0",
                "kcm_operator_csr_decisions_total{reason=\"Issued\"} 0",
                "kcm_operator_csr_decisions_total{reason=\"KeyAlgorithmNotAllowed\"} 0",
                "kcm_operator_reconcile_errors_total{kind=\"signer\"} 0",
                "kcm_operator_leader 0",
            ],
        );
        m.step_ended("abc123/renew-0A", StepResult::Applied, Some(Duration::from_secs(42)));
        m.step_ended("abc123", StepResult::Failed, None);
        let counts = ApiCounts::new();
        counts.record("GET", "leases");
        counts.record("GET", "leases");
        let text = m.render(Some(&counts));
        has_lines(
            &text,
            &[
                "kcm_operator_rotations_total{result=\"applied\"} 1",
                "kcm_operator_rotations_total{result=\"failed\"} 0",
                "kcm_operator_rollout_steps_total{result=\"applied\"} 1",
                "kcm_operator_rollout_steps_total{result=\"failed\"} 1",
                "kcm_operator_rollout_step_duration_seconds_bucket{le=\"30\"} 0",
                "kcm_operator_rollout_step_duration_seconds_bucket{le=\"60\"} 1",
                "kcm_operator_rollout_step_duration_seconds_count 1",
                "kcm_operator_api_requests_total{resource=\"leases\",verb=\"GET\"} 2",
            ],
        );
    }

    #[test]
    fn helper_series_are_labelled_with_the_node() {
        let h = HelperMetrics::new("m1");
        h.report(&KcmNodeStatus { not_after: Some("2027-02-01T00:00:00Z".into()), healthy: true, unit_active: false, ..Default::default() });
        h.step(StepResult::Applied);
        let counts = ApiCounts::new();
        counts.record("PATCH", "kcmnodes/status");
        let text = h.render(Some(&counts));
        has_lines(
            &text,
            &[
                "kcm_node_helper_certificate_not_after_seconds{node=\"m1\"} 1801440000",
                "kcm_node_helper_healthy{node=\"m1\"} 1",
                "kcm_node_helper_unit_active{node=\"m1\"} 0",
                "kcm_node_helper_steps_total{node=\"m1\",result=\"applied\"} 1",
                "kcm_node_helper_steps_total{node=\"m1\",result=\"failed\"} 0",
                "kcm_node_helper_api_requests_total{node=\"m1\",resource=\"kcmnodes/status\",verb=\"PATCH\"} 1",
            ],
        );
        h.report(&KcmNodeStatus::default());
        assert!(!h.render(None).contains("certificate_not_after"));
    }

    #[test]
    fn exported_names_have_the_prefixes_and_suffixes() {
        let names = exported_names();
        assert!(names.iter().all(|n| n.starts_with("kcm_operator_") || n.starts_with("kcm_node_helper_")), "{names:?}");
        for n in ["kcm_operator_certificate_not_after_seconds", "kcm_operator_rollout_step_duration_seconds_bucket", "kcm_node_helper_healthy"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
    }
}
