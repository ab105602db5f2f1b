//! Watched stores: the operator and the helper read the cluster from memory kept current by
//! watches (reflectors), and call the API only to change something.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use tokio::sync::Notify;

/// A watch on one object by name (`metadata.name=<name>`).
pub fn by_name(name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

/// A store of `K` and the future that keeps it current (and wakes `wake` on every change).
pub fn reflect<K>(api: Api<K>, cfg: watcher::Config, wake: Arc<Notify>) -> (Store<K>, futures::future::BoxFuture<'static, ()>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    let fut = watcher(api, cfg)
        .default_backoff()
        .reflect(writer)
        .for_each(move |ev| {
            if let Err(e) = ev {
                tracing::warn!("watching {kind}: {e}");
            }
            wake.notify_one();
            futures::future::ready(())
        })
        .boxed();
    (reader, fut)
}
