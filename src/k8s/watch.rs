//! Watches and stores: Services, EndpointSlices, this Node, and ServiceCIDRs when served.
//!
//! kube-runtime's watcher is the state machine (list, watch, relist after 410 Gone, backoff on
//! errors); reflectors keep the stores. Every event nudges the sync loop. Managed fields are
//! dropped before objects are stored: nftproxy never reads them and they are most of an object.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use crate::k8s::inbox::{Inbox, Keyed, Pending, SharedInbox};
use crate::lock::lock;
use crate::model::{ReadService, ReadSlice};

/// Upstream kube-proxy's selector: Services and slices handed to another proxy, and headless
/// Services' slices, are not ours.
pub const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";
pub const SLICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// What the sync loop reads: the Service and EndpointSlice changes, and the Node and
/// ServiceCIDR stores.
#[derive(Clone)]
pub struct Stores {
    pub inbox: SharedInbox,
    pub node: Store<Node>,
    /// None when the API does not serve networking.k8s.io/v1 ServiceCIDRs.
    pub service_cidrs: Option<Store<ServiceCIDR>>,
    /// Set once Services and EndpointSlices hold their initial lists. Until then nothing is
    /// programmed: an agent restarting while the API is down keeps the rules it left.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// True once every store (also the Node and ServiceCIDRs) holds its initial list.
    complete: tokio::sync::watch::Receiver<bool>,
}

impl Stores {
    /// Wait until every store holds its initial list, at most `timeout`. Returns whether all were
    /// ready (the agent goes on either way: never wait forever).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.complete.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Drive a reflector and nudge `changes` on every event. The reflector has updated its store
/// before the event reaches `on_event`.
fn drive<K>(
    name: &'static str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changes: mpsc::Sender<()>,
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut s = std::pin::pin!(stream);
        while let Some(ev) = s.next().await {
            if let Ok(ev) = &ev {
                on_event(ev);
            }
            match ev {
                Ok(watcher::Event::InitApply(_) | watcher::Event::Init) => {}
                Ok(_) => {
                    // A full channel already holds a nudge: the sync loop reads all stores anyway.
                    let _ = changes.try_send(());
                }
                Err(e) => {
                    tracing::warn!(resource = name, error = %e, "watch error; retrying with backoff")
                }
            }
        }
    })
}

/// What a watched kind must be: a typed API object (k8s-openapi's kinds have no dynamic type)
/// that can be slimmed and decoded.
pub trait Watched:
    Resource<DynamicType = ()>
    + Slim
    + Clone
    + Send
    + Sync
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Slim
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + 'static
{
}

/// Drop what nftproxy never reads before an object is stored: at 50,000 Services the stores are
/// most of the agent's memory, and managed fields, pod references and node images are most of
/// an object.
pub trait Slim {
    fn slim(&mut self);
}

fn slim_meta(m: &mut kube::api::ObjectMeta, keep_annotation: Option<&str>) {
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    m.creation_timestamp = None;
    m.annotations = match (m.annotations.take(), keep_annotation) {
        (Some(mut a), Some(k)) => a
            .remove(k)
            .map(|v| [(k.to_string(), v)].into_iter().collect()),
        _ => None,
    };
}

impl Slim for Service {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata, None);
        if let Some(s) = self.spec.as_mut() {
            s.selector = None;
        }
        if let Some(st) = self.status.as_mut() {
            st.conditions = None;
        }
    }
}

impl Slim for EndpointSlice {
    fn slim(&mut self) {
        slim_meta(
            &mut self.metadata,
            Some("endpoints.kubernetes.io/last-change-trigger-time"),
        );
        for e in self.endpoints.iter_mut() {
            e.target_ref = None;
            e.hostname = None;
            e.deprecated_topology = None;
        }
    }
}

impl Slim for Node {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata, None);
        if let Some(st) = self.status.as_mut() {
            let addresses = st.addresses.take();
            *st = Default::default();
            st.addresses = addresses;
        }
        if let Some(s) = self.spec.as_mut() {
            let taints = s.taints.take();
            *s = Default::default();
            s.taints = taints;
        }
    }
}

impl Slim for ServiceCIDR {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata, None);
        self.status = None;
    }
}

fn reflect<K>(
    name: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    changes: mpsc::Sender<()>,
) -> Store<K>
where
    K: Watched,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watch_stream(name, api, cfg));
    drive(name, stream, changes, |_| {});
    reader
}

/// The same event with its object read by `read`.
pub fn read_event<K, T>(ev: &watcher::Event<K>, read: impl Fn(&K) -> T) -> watcher::Event<T> {
    use watcher::Event;
    match ev {
        Event::Apply(o) => Event::Apply(read(o)),
        Event::Delete(o) => Event::Delete(read(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(read(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// Watch `api` into the inbox slot `slot`, each object read by `read` as it arrives and then
/// dropped; `listed` turns true after the first complete list.
#[allow(clippy::too_many_arguments)]
fn watch_into<K, T>(
    name: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    changes: mpsc::Sender<()>,
    inbox: SharedInbox,
    slot: fn(&mut Inbox) -> &mut Pending<T>,
    read: impl Fn(&K) -> T + Send + 'static,
    listed: tokio::sync::watch::Sender<bool>,
) where
    K: Watched,
    T: Keyed + 'static,
{
    drive(name, watch_stream(name, api, cfg), changes, move |ev| {
        let done = matches!(ev, watcher::Event::InitDone);
        // Read outside the lock: the sync loop takes the inbox while a page is being read.
        let ev = read_event(ev, &read);
        slot(&mut lock(&inbox)).event(ev);
        if done {
            listed.send_replace(true);
        }
    });
}

/// The watch of one kind: list+watch with relists, backoff, and slimmed objects.
fn watch_stream<K>(
    name: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Watched,
{
    // A 410 Gone (our resource version expired, e.g. after an API server restart) means "relist
    // now", as client-go does: the first one in a row skips the backoff, which after an outage
    // has grown to seconds. A second 410 without progress in between is backed off as usual.
    let mut gone_before = false;
    watcher(api, cfg)
        .filter(move |ev| {
            let gone = matches!(ev, Err(watcher::Error::WatchError(s)) if s.code == 410);
            let relist_now = gone && !gone_before;
            gone_before = gone || (gone_before && ev.is_err());
            if relist_now {
                tracing::info!(resource = name, "resource version expired; relisting now");
            }
            std::future::ready(!relist_now)
        })
        .default_backoff()
        .modify(Slim::slim)
}

/// Whether the API serves ServiceCIDRs (a 404 turns the feature off instead of a watch error loop).
async fn service_cidrs_served(client: &Client) -> bool {
    let api: Api<ServiceCIDR> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::info!("the API does not serve networking.k8s.io/v1 ServiceCIDRs; unallocated-ClusterIP drops are off");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not probe ServiceCIDRs; watching them anyway");
            true
        }
    }
}

/// Start every watch. Each event sends a nudge on `changes`.
pub async fn start(client: Client, node_name: &str, changes: mpsc::Sender<()>) -> Stores {
    let ready_nudge = changes.clone();
    let page = 500;
    let inbox: SharedInbox = Arc::default();
    let (svc_listed_tx, mut svc_listed) = tokio::sync::watch::channel(false);
    let (slice_listed_tx, mut slice_listed) = tokio::sync::watch::channel(false);
    watch_into(
        "services",
        Api::<Service>::all(client.clone()),
        watcher::Config::default()
            .labels(SERVICE_SELECTOR)
            .page_size(page)
            .any_semantic(),
        changes.clone(),
        inbox.clone(),
        |i| &mut i.services,
        ReadService::read,
        svc_listed_tx,
    );
    watch_into(
        "endpointslices",
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default()
            .labels(SLICE_SELECTOR)
            .page_size(page)
            .any_semantic(),
        changes.clone(),
        inbox.clone(),
        |i| &mut i.slices,
        {
            let node = node_name.to_string();
            move |s: &EndpointSlice| ReadSlice::read(s, &node)
        },
        slice_listed_tx,
    );
    // The Node and ServiceCIDRs are small: kept in stores and compared whole on every sync.
    let node = reflect(
        "node",
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        changes.clone(),
    );
    let service_cidrs = if service_cidrs_served(&client).await {
        Some(reflect(
            "servicecidrs",
            Api::<ServiceCIDR>::all(client.clone()),
            watcher::Config::default(),
            changes,
        ))
    } else {
        None
    };
    // The ONLY waiter on the stores' readiness: a kube-runtime Store wakes just the last task
    // that polled `wait_until_ready`, so two concurrent waiters can hang one of them.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (complete_tx, complete) = tokio::sync::watch::channel(false);
    let (r, n, c) = (ready.clone(), node.clone(), service_cidrs.clone());
    tokio::spawn(async move {
        if svc_listed.wait_for(|l| *l).await.is_ok() && slice_listed.wait_for(|l| *l).await.is_ok()
        {
            // Operators (and the benchmark) read the cold start's split from this line: lists
            // before it, compute and the first commit after it.
            tracing::info!("initial Service and EndpointSlice lists received");
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            // The watchers' own nudges may have come before the flag: sync now.
            let _ = ready_nudge.try_send(());
        }
        let _ = n.wait_until_ready().await;
        if let Some(c) = c {
            let _ = c.wait_until_ready().await;
        }
        let _ = complete_tx.send(true);
    });
    Stores {
        inbox,
        node,
        service_cidrs,
        ready,
        complete,
    }
}

/// Name of an object for logs.
pub fn name<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::objects::Objects;
    use crate::model::NodeInfo;

    #[test]
    fn slimming_changes_nothing_nftproxy_reads() {
        let objs = crate::testutil::cluster_objects();
        let mut slim = objs.clone();
        for s in slim.services.iter_mut() {
            s.slim();
        }
        for s in slim.slices.iter_mut() {
            s.metadata.annotations = Some(
                [
                    (
                        "endpoints.kubernetes.io/last-change-trigger-time".to_string(),
                        "2026-01-01T00:00:00Z".to_string(),
                    ),
                    ("other".to_string(), "x".to_string()),
                ]
                .into(),
            );
            s.slim();
            assert_eq!(
                s.metadata.annotations.as_ref().map(|a| a.len()),
                Some(1),
                "the trigger time stays"
            );
        }
        for n in slim.nodes.iter_mut() {
            n.slim();
        }
        let state = |o: &Objects| {
            let node = NodeInfo::from_node(&o.nodes[0]);
            let mut p = Vec::new();
            (
                crate::pipeline::proxy_state(&o.services, &o.slices, &[], &node, &mut p),
                node,
            )
        };
        assert_eq!(state(&objs), state(&slim));
    }
}
