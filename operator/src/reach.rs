//! Whether the operator reaches an apiserver: what `/readyz` answers, and which of the
//! apiservers it was given (`--apiserver`, tried in order) a session uses.
//!
//! A replica that reaches no apiserver is not Ready, and says so in its log once when that
//! starts and once when it ends, not at every retry. The decisions are pure ([`Reach`]);
//! [`first_answering`] and [`watch`] are the I/O around them.

use std::time::Duration;

use crate::health::Ready;

/// How long one look at an apiserver (GET /version) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time between two looks while a session runs.
pub const PROBE_PERIOD: Duration = Duration::from_secs(5);
/// Failed looks in a row after which a session with other apiservers to try ends, so the
/// next one starts from the first of the list that answers.
pub const SWITCH_AFTER_FAILURES: u32 = 3;

/// What a change of reachability is worth a log line for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The first failure after a success (or at start): the reason, logged once.
    Lost(String),
    /// The first success after failures: how many looks failed.
    Back { failures: u32 },
}

/// The outcomes of the looks so far.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    failures: u32,
    /// Whether a look ever succeeded (the first failure at start is a change too).
    seen_ok: bool,
}

impl Reach {
    /// Records one look; returns the change to log, if any.
    pub fn observe(&mut self, outcome: &Result<(), String>) -> Option<Change> {
        match outcome {
            Ok(()) => {
                let change = (self.failures > 0).then_some(Change::Back { failures: self.failures });
                self.failures = 0;
                self.seen_ok = true;
                change
            }
            Err(why) => {
                self.failures += 1;
                (self.failures == 1).then(|| Change::Lost(why.clone()))
            }
        }
    }

    /// Looks failed in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Ready: the last look succeeded.
    pub fn ready(&self) -> bool {
        self.seen_ok && self.failures == 0
    }
}

/// One look: GET /version within [`PROBE_TIMEOUT`]. `Err`: why not, for the log.
pub async fn look(client: &kube::Client) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    }
}

/// A look while running: GET of the operator's own election Lease (what every replica reads
/// anyway; one not there yet is an answer too), so an idle operator reads nothing but Leases.
pub async fn look_at_lease(client: &kube::Client) -> Result<(), String> {
    let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), crate::api::NAMESPACE);
    match tokio::time::timeout(PROBE_TIMEOUT, api.get_opt(crate::api::OPERATOR_LEASE)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    }
}

/// An error and its causes on one line (kube's own message hides why a connect failed).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out = format!("{out}: {s}");
        }
        cause = c.source();
    }
    out
}

/// The first of `candidates` (tried in order) whose client answers a look, with its index;
/// `Err`: every candidate's reason, in order.
pub async fn first_answering<C>(candidates: Vec<(String, C)>, client: impl Fn(&C) -> &kube::Client) -> Result<(usize, String, C), Vec<(String, String)>> {
    let mut why = Vec::new();
    for (i, (url, c)) in candidates.into_iter().enumerate() {
        match look(client(&c)).await {
            Ok(()) => return Ok((i, url, c)),
            Err(e) => why.push((url, e)),
        }
    }
    Err(why)
}

/// Why no apiserver of the list answered, one line.
pub fn none_answered(why: &[(String, String)]) -> String {
    let each: Vec<String> = why.iter().map(|(url, e)| format!("{url}: {e}")).collect();
    format!("no apiserver answers ({})", each.join("; "))
}

/// Looks at `client`'s apiserver every [`PROBE_PERIOD`] for as long as the session runs,
/// keeping `ready` true exactly while the last look succeeded and logging each change once.
/// Resolves when [`SWITCH_AFTER_FAILURES`] looks failed in a row and `switch` is set (other
/// apiservers to try); otherwise never.
pub async fn watch(client: kube::Client, apiserver: String, ready: Ready, switch: bool) {
    let mut reach = Reach { failures: 0, seen_ok: true };
    loop {
        tokio::time::sleep(PROBE_PERIOD).await;
        let outcome = look_at_lease(&client).await;
        match reach.observe(&outcome) {
            Some(Change::Lost(why)) => tracing::warn!(%apiserver, "apiserver unreachable: {why}; not ready until it answers"),
            Some(Change::Back { failures }) => tracing::info!(%apiserver, "apiserver answers again after {failures} failed looks: ready"),
            None => {}
        }
        ready.set(reach.ready());
        if switch && reach.failures() >= SWITCH_AFTER_FAILURES {
            tracing::warn!(%apiserver, "{SWITCH_AFTER_FAILURES} looks failed in a row: trying the apiservers in order again");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_outage_is_logged_once_and_its_end_once() {
        let mut r = Reach::default();
        assert!(!r.ready(), "not ready before the first look");
        let down: Result<(), String> = Err("connect refused".into());
        assert_eq!(r.observe(&down), Some(Change::Lost("connect refused".into())));
        for _ in 0..10 {
            assert_eq!(r.observe(&Err("another reason".into())), None, "one line per outage, not per retry");
            assert!(!r.ready());
        }
        assert_eq!(r.failures(), 11);
        assert_eq!(r.observe(&Ok(())), Some(Change::Back { failures: 11 }));
        assert!(r.ready());
        assert_eq!(r.observe(&Ok(())), None);
        assert_eq!(r.observe(&down), Some(Change::Lost("connect refused".into())), "a new outage is logged again");
        assert!(!r.ready());
    }

    #[test]
    fn none_answered_names_every_apiserver_in_order() {
        let why =
            vec![("https://10.0.0.1:6443".to_string(), "connect refused".to_string()), ("https://lb:6443".to_string(), "no answer within 3s".to_string())];
        assert_eq!(none_answered(&why), "no apiserver answers (https://10.0.0.1:6443: connect refused; https://lb:6443: no answer within 3s)");
    }
}
