//! Scenario 1 (`csr`): CSR issuance latency on the API tier, from the create call to the
//! certificate in status, for our signer and for kube-controller-manager's built-in
//! `kubernetes.io/kube-apiserver-client` signer, on one apiserver.
//!
//! Ours: the operator's signer (`kcm_operator::approver::run`, the code the operator binary
//! runs) on a task of this process, as user kcm-operator with its RBAC from manifests/base.
//! Its CSRs come from simulated masters' helpers (tokens bound to the helper DaemonSet's pods),
//! each for its master's pending step, so every one is a legitimate request that the signer
//! approves and signs itself. kcm's: the real kube-controller-manager (`--controllers=csrsigning`)
//! with the API tier's CA; the bench approves each of its CSRs as an admin would with
//! `kubectl certificate approve`, right after creating it. One watch on all CSRs times both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kcm_operator::api::{KeyAlgorithm, SIGNER_NAME};
use kcm_operator::approver::{self, SignerConfig};
use kcm_operator::identity::OPERATOR_USER;
use kcm_operator::pki::{self, NodeIdentity};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::oneshot;

use super::{AbortOnDrop, Row, Series, Summary};
use crate::apitier::sim::{self, Master};
use crate::apitier::{k8s_bin, ApiServer, Proc};

const KEY: &str = "csr";
const SEQ: &str = "CSR issuance, 100 sequential";
const CONC: &str = "CSR issuance, 20 concurrent";
const SEQUENTIAL: usize = 100;
const CONCURRENT: usize = 20;
/// Rounds of [`CONCURRENT`] at once: one round's p99 would be its single worst request.
const ROUNDS: usize = 5;
const GOAL: &str = "p99 <= 200 ms, not slower than kcm";
const GOAL_MS: f64 = 200.0;
/// The step every simulated master has under way: what our signer issues for.
const STEP: &str = "bench-rev-1";
const KCM_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// kcm's client signer refuses `server auth`: the client usages of our certificate.
const KCM_USAGES: &[&str] = &["digital signature", "key encipherment", "client auth"];
const WAIT: Duration = Duration::from_secs(30);
/// kcm's first CSR also waits for kcm to start and sync its informers.
const FIRST_WAIT: Duration = Duration::from_secs(90);

/// Whether ours meets the goal: p99 within [`GOAL_MS`] and not above kcm's p99. None when
/// either side has no figure.
pub fn goal_met(ours: &Series, kcm: Option<&Series>) -> Option<bool> {
    let (o, k) = (ours.quantile(0.99)?, kcm?.quantile(0.99)?);
    Some(o <= GOAL_MS && o <= k)
}

/// One sentence comparing the two p99s, for the note.
pub fn comparison(ours: &Series, kcm: &Series) -> String {
    match (ours.quantile(0.99), kcm.quantile(0.99)) {
        (Some(o), Some(k)) if o <= k => format!("ours p99 {o:.1} ms is not slower than kcm's {k:.1} ms"),
        (Some(o), Some(k)) => format!("ours p99 {o:.1} ms is SLOWER than kcm's {k:.1} ms ({:.1}x)", o / k),
        _ => "no p99 to compare".into(),
    }
}

/// What a CSR's status says, once it says something: issued, or why not.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Issued,
    Refused(String),
}

/// The outcome of `csr` as its status shows it; None while pending (or approved, not signed).
pub fn outcome(csr: &CertificateSigningRequest) -> Option<Outcome> {
    let st = csr.status.as_ref()?;
    if st.certificate.as_ref().is_some_and(|c| !c.0.is_empty()) {
        return Some(Outcome::Issued);
    }
    let refused = st.conditions.iter().flatten().find(|c| c.status == "True" && (c.type_ == "Denied" || c.type_ == "Failed"))?;
    Some(Outcome::Refused(format!("{} {}: {}", refused.type_, refused.reason.as_deref().unwrap_or(""), refused.message.as_deref().unwrap_or(""))))
}

/// The CSRs being waited for, by name: the watch tells each waiter when its outcome shows.
#[derive(Default)]
struct Waiters(Mutex<HashMap<String, oneshot::Sender<(Instant, Outcome)>>>);

impl Waiters {
    fn expect(&self, name: &str) -> oneshot::Receiver<(Instant, Outcome)> {
        let (tx, rx) = oneshot::channel();
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), tx);
        rx
    }
    fn seen(&self, csr: &CertificateSigningRequest) {
        let Some(o) = outcome(csr) else { return };
        if let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&csr.name_any()) {
            let _ = tx.send((Instant::now(), o));
        }
    }
    fn forget(&self, name: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}

/// Watches every CSR; `synced` fires once the watch is established (before any is timed).
async fn watch(client: Client, waiters: Arc<Waiters>, synced: oneshot::Sender<()>) {
    let mut synced = Some(synced);
    let mut events = std::pin::pin!(watcher(Api::<CertificateSigningRequest>::all(client), watcher::Config::default()));
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::InitDone) => {
                if let Some(s) = synced.take() {
                    let _ = s.send(());
                }
            }
            Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => waiters.seen(&c),
            Ok(_) => {}
            Err(e) => eprintln!("[bench csr] watching CSRs: {e}"),
        }
    }
}

/// Which signer a CSR is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Signer {
    Ours,
    Kcm,
}

/// The API tier with both signers, the simulated masters and the watch. Fields drop in
/// order: the tasks and kcm before the apiserver.
struct Bed {
    _watch: AbortOnDrop,
    _signer: AbortOnDrop,
    kcm: Result<Proc, String>,
    waiters: Arc<Waiters>,
    masters: Vec<Master>,
    /// One request per master (RSA-2048, the master's SANs): the key does not change the cost.
    pems: Vec<String>,
    alg: KeyAlgorithm,
    expiration: i32,
    admin: Client,
    _api: ApiServer,
}

impl Bed {
    async fn start() -> Result<Bed> {
        let api = ApiServer::start().await.context("starting the API tier")?;
        let admin = api.try_client()?;
        sim::install_base(&admin).await?;
        let spec = sim::minimal_spec(api.url())?;
        let (alg, expiration) = (spec.certificate.key_algorithm, i32::try_from(spec.certificate.validity_secs()).unwrap_or(i32::MAX));
        sim::create_cr(&admin, spec).await?;
        let mut masters = Vec::new();
        let mut pems = Vec::new();
        for i in 0..CONCURRENT {
            let m = sim::master_with_helper(&api, &admin, &format!("bench-m{i:02}")).await?;
            sim::set_steps(&admin, &[(&m.name, STEP, None)]).await?;
            let id = NodeIdentity { name: m.name.clone(), ips: vec!["127.0.0.1".parse()?] };
            let key = pki::generate_key(alg)?;
            pems.push(pki::make_csr(&key, &id.expected_sans())?);
            masters.push(m);
        }
        let waiters = Arc::new(Waiters::default());
        let (synced_tx, synced) = oneshot::channel();
        let watch = AbortOnDrop(tokio::spawn(watch(admin.clone(), waiters.clone(), synced_tx)));
        tokio::time::timeout(Duration::from_secs(30), synced).await.map_err(|_| anyhow!("the CSR watch did not sync in 30 s"))??;
        let signer_client = api.try_client_as(OPERATOR_USER, &[])?;
        let config = SignerConfig::new(api.ca_cert_path(), api.ca_key_path());
        let signer = AbortOnDrop(tokio::spawn(approver::run(signer_client, config, Default::default())));
        let kcm = start_kcm(&api).map_err(|e| format!("{e:#}"));
        Ok(Bed { _watch: watch, _signer: signer, kcm, waiters, masters, pems, alg, expiration, admin, _api: api })
    }

    /// Creates CSR `name` from master `m`'s helper for `signer` (approving kcm's as an admin),
    /// and returns the milliseconds from the create call to the certificate in status.
    async fn issue(&self, m: usize, name: &str, signer: Signer, wait: Duration) -> Result<f64> {
        let master = &self.masters[m];
        let pem = self.pems[m].clone();
        let csr = match signer {
            Signer::Ours => sim::csr(name, &master.name, STEP, pem, SIGNER_NAME, kcm_operator::signer::expected_usages(self.alg), Some(self.expiration)),
            Signer::Kcm => sim::csr(name, &master.name, STEP, pem, KCM_SIGNER, KCM_USAGES, Some(self.expiration)),
        };
        let seen = self.waiters.expect(name);
        let t0 = Instant::now();
        let result = async {
            let created = Api::<CertificateSigningRequest>::all(master.helper.clone()).create(&PostParams::default(), &csr).await.context("creating it")?;
            if signer == Signer::Kcm {
                approve(&self.admin, created).await?;
            }
            let (at, outcome) =
                tokio::time::timeout(wait, seen).await.map_err(|_| anyhow!("no certificate within {wait:?}"))?.context("the CSR watch ended")?;
            match outcome {
                Outcome::Issued => Ok(at.duration_since(t0).as_secs_f64() * 1000.0),
                Outcome::Refused(why) => bail!("not issued: {why}"),
            }
        }
        .await;
        self.waiters.forget(name);
        result.with_context(|| format!("CSR {name} from {}", master.name))
    }

    /// Deletes these CSRs: our signer issues one certificate per master and step.
    async fn delete(&self, names: &[String]) -> Result<()> {
        let api = Api::<CertificateSigningRequest>::all(self.admin.clone());
        for n in names {
            match api.delete(n, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting CSR {n}")),
            }
        }
        Ok(())
    }

    /// One CSR at a time on master 0, each deleted before the next; one first, not counted.
    async fn sequential(&self, signer: Signer, prefix: &str) -> Result<Vec<f64>> {
        let first = format!("{prefix}-warmup");
        self.issue(0, &first, signer, FIRST_WAIT).await?;
        self.delete(&[first]).await?;
        let mut samples = Vec::with_capacity(SEQUENTIAL);
        for i in 0..SEQUENTIAL {
            let name = format!("{prefix}-seq-{i:03}");
            samples.push(self.issue(0, &name, signer, WAIT).await?);
            self.delete(&[name]).await?;
        }
        Ok(samples)
    }

    /// [`ROUNDS`] rounds of one CSR from each of the [`CONCURRENT`] masters at once.
    async fn concurrent(&self, signer: Signer, prefix: &str) -> Result<Vec<f64>> {
        let mut samples = Vec::with_capacity(ROUNDS * CONCURRENT);
        for r in 0..ROUNDS {
            let names: Vec<String> = (0..CONCURRENT).map(|m| format!("{prefix}-conc-{r}-{m:02}")).collect();
            let results = futures::future::join_all(names.iter().enumerate().map(|(m, n)| self.issue(m, n, signer, WAIT))).await;
            for res in results {
                samples.push(res?);
            }
            self.delete(&names).await?;
        }
        Ok(samples)
    }

    /// kcm's side, or why there is none (kcm did not start, or its first CSR failed).
    async fn kcm_side(&self, run: impl std::future::Future<Output = Result<Vec<f64>>>) -> Result<Vec<f64>> {
        let kcm = self.kcm.as_ref().map_err(|e| anyhow!("kube-controller-manager did not start: {e}"))?;
        run.await.map_err(|e| anyhow!("{e:#}; kube-controller-manager log tail:\n{}", kcm.log_tail(15)))
    }
}

/// Approves `csr` as `kubectl certificate approve` does: an Approved condition, PUT on the
/// approval subresource (kubectl first GETs the object; the create returned it here).
async fn approve(admin: &Client, mut csr: CertificateSigningRequest) -> Result<()> {
    let name = csr.name_any();
    let cond = CertificateSigningRequestCondition {
        type_: "Approved".into(),
        status: "True".into(),
        reason: Some("KubectlApprove".into()),
        message: Some("This CSR was approved by kubectl certificate approve.".into()),
        last_update_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        ..Default::default()
    };
    csr.status.get_or_insert_with(Default::default).conditions.get_or_insert_with(Vec::new).push(cond);
    Api::<CertificateSigningRequest>::all(admin.clone()).replace_subresource("approval", &name, &PostParams::default(), &csr).await.context("approving it")?;
    Ok(())
}

/// kube-controller-manager with only the CSR signing controller, signing with the API
/// tier's CA (as admin: without --use-service-account-credentials kcm signs as itself, and
/// the system:kube-controller-manager role may not sign).
fn start_kcm(api: &ApiServer) -> Result<Proc> {
    let bin = k8s_bin("kube-controller-manager")?;
    let args = vec![
        format!("--kubeconfig={}", api.admin_kubeconfig_path().display()),
        "--controllers=csrsigning".into(),
        "--leader-elect=false".into(),
        format!("--cluster-signing-cert-file={}", api.ca_cert_path().display()),
        format!("--cluster-signing-key-file={}", api.ca_key_path().display()),
        // No serving: nothing here scrapes it.
        "--secure-port=0".into(),
        "--v=1".into(),
    ];
    Proc::spawn("kube-controller-manager", &bin, &args, &api.dir().join("kube-controller-manager.log"))
}

fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "a debug build of the bench"
    } else {
        "the release build of the bench"
    }
}

/// A row; `setup`: whether its note describes the whole setup (the other row points to it).
fn row(measure: &str, how: &str, setup: bool, ours: Result<Vec<f64>>, kcm: Result<Vec<f64>>) -> Row {
    let kcm_series = kcm.as_ref().ok().map(|s| Series::new("kcm", s.clone()));
    let ours = match ours {
        Ok(s) => Series::new("ours", s),
        Err(e) => {
            let base = kcm_series.as_ref().and_then(|k| Some(format!(" (kcm measured: p50 {:.1} / p99 {:.1} ms)", k.quantile(0.5)?, k.quantile(0.99)?)));
            return Row::failed(1, KEY, measure, format!("{e:#}{}", base.unwrap_or_default()));
        }
    };
    let versus = match (&kcm, &kcm_series) {
        (_, Some(k)) => comparison(&ours, k),
        (Err(e), None) => format!("baseline NOT MEASURED: {e:#}"),
        _ => String::new(),
    };
    let mut r = Row::new(1, KEY, measure, "ms", Summary::P50P99, ours);
    if let Some(k) = kcm_series {
        r = r.baseline(k);
    }
    let setup = if setup {
        format!(
            "Ours: the operator's signer (kcm_operator::approver::run, what the operator binary runs) on a task of the bench ({}), \
             as user kcm-operator with its RBAC, approving and signing itself; the CSRs (RSA-2048, the helper's labels, annotation, usages and \
             expirationSeconds) come from simulated masters' helpers (tokens bound to the helper DaemonSet's pods on control-plane Nodes), each for \
             its master's pending step, every one issued (a denial fails the row); each issued CSR is deleted before that master's next (one per \
             step). kcm: kube-controller-manager {} --controllers=csrsigning with the API tier's CA and its default client rate limit (20 qps, \
             burst 30), CSRs for {KCM_SIGNER} approved by the bench as admin right after create (PUT /approval as kubectl certificate approve, \
             without kubectl's GET). Latency: create call start to status.certificate seen on one watch of all CSRs; one CSR per signer first, \
             not counted.",
            build(),
            crate::apitier::k8s_version()
        )
    } else {
        format!("Setup as in \"1 {SEQ}\".")
    };
    r.goal(GOAL, |r| goal_met(&r.ours, r.baselines.first())).note(format!("{versus}. {how} {setup}"))
}

/// Runs the scenario: two rows, ours next to kcm's.
pub async fn run() -> Vec<Row> {
    let bed = match Bed::start().await {
        Ok(b) => b,
        Err(e) => return vec![Row::failed(1, KEY, SEQ, format!("{e:#}")), Row::failed(1, KEY, CONC, format!("{e:#}"))],
    };
    let ours_seq = bed.sequential(Signer::Ours, "ours").await;
    let kcm_seq = bed.kcm_side(bed.sequential(Signer::Kcm, "kcm")).await;
    let ours_conc = bed.concurrent(Signer::Ours, "ours").await;
    let kcm_conc = bed.kcm_side(bed.concurrent(Signer::Kcm, "kcm")).await;
    vec![
        row(SEQ, &format!("{SEQUENTIAL} CSRs one after another from one master."), true, ours_seq, kcm_seq),
        row(
            CONC,
            &format!(
                "{ROUNDS} rounds of {CONCURRENT} CSRs at once, one from each of {CONCURRENT} masters (more than a rollout makes: it gives one master \
                 a step at a time). Our signer decides one CSR at a time per master (one certificate per step), masters side by side; \
                 each decision makes its reads (CR, pod, DaemonSet, Node, KcmNode, the master's CSRs not older than the signer's last \
                 issue for it) and two writes (approval, certificate), so 20 at once share the apiserver and this machine's 2 cores."
            ),
            false,
            ours_conc,
            kcm_conc,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus;

    #[test]
    fn the_goal_needs_both_p99s_and_both_bounds() {
        let s = |v: Vec<f64>| Series::new("x", v);
        assert_eq!(goal_met(&s(vec![50.0, 120.0]), Some(&s(vec![130.0]))), Some(true));
        assert_eq!(goal_met(&s(vec![50.0, 150.0]), Some(&s(vec![120.0]))), Some(false), "slower than kcm");
        assert_eq!(goal_met(&s(vec![250.0]), Some(&s(vec![400.0]))), Some(false), "over 200 ms");
        assert_eq!(goal_met(&s(vec![50.0]), None), None);
        assert_eq!(goal_met(&s(vec![]), Some(&s(vec![1.0]))), None);
        assert!(comparison(&s(vec![30.0]), &s(vec![10.0])).contains("SLOWER"));
        assert!(comparison(&s(vec![10.0]), &s(vec![10.0])).contains("not slower"));
    }

    #[test]
    fn outcomes_from_status() {
        let mut c = CertificateSigningRequest::default();
        assert_eq!(outcome(&c), None);
        let approved = CertificateSigningRequestCondition { type_: "Approved".into(), status: "True".into(), ..Default::default() };
        c.status = Some(CertificateSigningRequestStatus { conditions: Some(vec![approved.clone()]), certificate: None });
        assert_eq!(outcome(&c), None, "approved, not signed yet");
        c.status.as_mut().unwrap().certificate = Some(k8s_openapi::ByteString(b"PEM".to_vec()));
        assert_eq!(outcome(&c), Some(Outcome::Issued));
        let denied = CertificateSigningRequestCondition {
            type_: "Denied".into(),
            status: "True".into(),
            reason: Some("NoPendingStep".into()),
            message: Some("no step".into()),
            ..Default::default()
        };
        c.status = Some(CertificateSigningRequestStatus { conditions: Some(vec![denied]), certificate: None });
        assert_eq!(outcome(&c), Some(Outcome::Refused("Denied NoPendingStep: no step".into())));
    }
}
