//! Small async test utilities: polling with a deadline and `kubectl apply`-like
//! server-side apply of multi-document YAML.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::Scope;
use kube::Client;
use serde::Deserialize;

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Calls `f` every 100 ms until it returns `Some(v)` (→ `Some(v)`) or
/// `timeout` has passed (→ `None`, after printing `what` to stderr).
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            eprintln!("apitier: timed out after {timeout:?} waiting for {what}");
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Calls `f` every 100 ms until it returns `true`; panics naming `what` if
/// that does not happen within `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if poll(what, timeout, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
    .is_none()
    {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Server-side applies every object in a (multi-document) YAML text, like
/// `kubectl apply --server-side --force-conflicts -f -` with field manager
/// `e2e`. `kind: *List` documents are expanded. Namespaced objects without a
/// namespace go to `default`. Kinds that are not served yet (e.g. a CR right
/// after its CRD in the same text) are retried for up to 30 s. Returns the
/// applied objects as the server returned them.
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).context("parsing YAML document")?;
        collect(value, &mut objects)?;
    }
    let mut applied = Vec::new();
    for obj in objects {
        applied.push(apply_one(client, obj).await?);
    }
    Ok(applied)
}

fn collect(value: serde_json::Value, out: &mut Vec<serde_json::Value>) -> Result<()> {
    match value {
        serde_json::Value::Null => Ok(()),
        serde_json::Value::Object(ref m) if m.is_empty() => Ok(()),
        serde_json::Value::Object(mut m) => {
            let is_list = m.get("kind").and_then(|k| k.as_str()).is_some_and(|k| k.ends_with("List")) && m.get("items").is_some_and(|i| i.is_array());
            if is_list {
                if let Some(serde_json::Value::Array(items)) = m.remove("items") {
                    for item in items {
                        collect(item, out)?;
                    }
                }
                Ok(())
            } else {
                out.push(serde_json::Value::Object(m));
                Ok(())
            }
        }
        other => bail!("YAML document is not an object: {other}"),
    }
}

async fn apply_one(client: &Client, value: serde_json::Value) -> Result<DynamicObject> {
    let obj: DynamicObject = serde_json::from_value(value).context("YAML document is not a Kubernetes object")?;
    let types = obj.types.clone().ok_or_else(|| anyhow!("object without apiVersion/kind"))?;
    let name = obj.metadata.name.clone().ok_or_else(|| anyhow!("{} without metadata.name", types.kind))?;
    let (group, version) = match types.api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), types.api_version.clone()),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, &types.kind);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ar, caps) = loop {
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok(found) => break found,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("discovering {}/{}", types.api_version, types.kind)),
        }
    };
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = obj.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &ar)
        }
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    api.patch(&name, &PatchParams::apply("e2e").force(), &Patch::Apply(&obj)).await.with_context(|| format!("applying {} {name}", types.kind))
}
