//! Watches and stores: Services, EndpointSlices, this Node, and ServiceCIDRs when served.
//!
//! kube-runtime's watcher is the state machine (list, watch, relist after 410 Gone, backoff on
//! errors); reflectors keep the stores. Every event nudges the sync loop. Managed fields are
//! dropped before objects are stored: nftproxy never reads them and they are most of an object.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
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
use crate::k8s::pbwatch;
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
    /// True once the Node and ServiceCIDR stores hold their initial lists (what the model is
    /// computed against: work done on the Services before would be redone).
    pub others_listed: tokio::sync::watch::Receiver<bool>,
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
            // Taints (the autoscaler's), and the pod CIDRs: detect-local NodeCIDR (the shipped
            // configuration) and Auto without --cluster-cidr take this node's pods from them.
            *s = k8s_openapi::api::core::v1::NodeSpec {
                taints: s.taints.take(),
                pod_cidr: s.pod_cidr.take(),
                pod_cidrs: s.pod_cidrs.take(),
                ..Default::default()
            };
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
    listing: Listing,
    changes: mpsc::Sender<()>,
) -> Store<K>
where
    K: Watched,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watch_stream(name, api, cfg, listing, None));
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
    listing: Listing,
    changes: mpsc::Sender<()>,
    inbox: SharedInbox,
    slot: fn(&mut Inbox) -> &mut Pending<T>,
    read: impl Fn(&K) -> T + Send + 'static,
    listed: tokio::sync::watch::Sender<bool>,
    protobuf: Option<Protobuf<K>>,
) where
    K: Watched,
    T: Keyed + 'static,
{
    drive(
        name,
        watch_stream(name, api, cfg, listing, protobuf),
        changes,
        move |ev| {
            let done = matches!(ev, watcher::Event::InitDone);
            // Read outside the lock: the sync loop takes the inbox while a page is being read.
            let ev = read_event(ev, &read);
            slot(&mut lock(&inbox)).event(ev);
            if done {
                listed.send_replace(true);
            }
        },
    );
}

/// How a watch receives its initial lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// One watch request with `sendInitialEvents=true` (a "streaming list", KEP-3157): the API
    /// server sends the objects one by one from its watch cache and ends the list with a
    /// bookmark, so the agent reads each object while the server is still sending the next,
    /// with no round trip per page. kube-apiserver 1.36 serves it by default.
    Streaming,
    /// Paginated list requests (500 objects each), then a watch: what every API server serves.
    Paging,
}

impl Listing {
    fn config(self, paged: watcher::Config) -> watcher::Config {
        match self {
            Listing::Streaming => paged.streaming_lists(),
            Listing::Paging => paged,
        }
    }
}

/// How the API server's answers are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/vnd.kubernetes.protobuf` (kube-proxy's default): Services and
    /// EndpointSlices only ([`super::pbwatch`]); every other kind is read as JSON.
    Protobuf,
    Json,
}

impl Encoding {
    /// As kube-proxy's `clientConnection.contentType` names it.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => crate::k8s::protobuf::CONTENT_TYPE,
            Encoding::Json => "application/json",
        }
    }
}

/// The protobuf watch of a kind ([`pbwatch::stream`]), for the kinds that have one.
pub type Protobuf<K> = fn(
    Client,
    &watcher::Config,
    Listing,
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// Whether a protobuf list or watch found the API server answering in another encoding (or
/// refusing protobuf): that kind is read as JSON from then on.
fn refuses_protobuf<K>(ev: &Result<watcher::Event<K>, watcher::Error>) -> Option<String> {
    match ev {
        Err(
            watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::InitialListFailed(kube::Error::Api(s)),
        ) if s.code == pbwatch::NOT_PROTOBUF => Some(s.message.clone()),
        _ => None,
    }
}

/// Whether a streaming list attempt says the API server will not stream: it rejected the
/// request as invalid (kube-apiserver before 1.27, or with the WatchList feature gate off,
/// answers 422 Invalid: `sendInitialEvents is forbidden for watch unless the WatchList feature
/// gate is enabled`; older ones `resourceVersionMatch is forbidden for watch`), or a streamed
/// list restarted before its end with no error in between (a server or proxy in between that
/// dropped the parameter and never sends the end-of-list bookmark would otherwise restart
/// forever).
fn refuses_streaming<K>(
    ev: &Result<watcher::Event<K>, watcher::Error>,
    mid_list: bool,
) -> Option<String> {
    match ev {
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(s)))
            if matches!(s.code, 400 | 422) =>
        {
            Some(format!("{} {}: {}", s.code, s.reason, s.message))
        }
        Ok(watcher::Event::Init) if mid_list => {
            Some("the streamed list restarted before its end".into())
        }
        _ => None,
    }
}

/// The initial lists of `make`'s watcher read as `first` says, its answers in `encoding`;
/// falling back to JSON for good when the API server does not answer in protobuf (see
/// [`refuses_protobuf`]), and from streamed to paged lists for good when it refuses to stream
/// (see [`refuses_streaming`]). A refusal itself is not passed on: the fallback starts at
/// once, without the error backoff.
pub fn streaming_or_paging<K, S>(
    name: &'static str,
    first: Listing,
    encoding: Encoding,
    make: impl Fn(Listing, Encoding) -> S + Send + 'static,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    struct State<S, F> {
        inner: std::pin::Pin<Box<S>>,
        listing: Listing,
        encoding: Encoding,
        mid_list: bool,
        objects: usize,
        make: F,
    }
    let start = State {
        inner: Box::pin(make(first, encoding)),
        listing: first,
        encoding,
        mid_list: false,
        objects: 0,
        make,
    };
    futures::stream::unfold(start, move |mut st| async move {
        loop {
            let ev = st.inner.next().await?;
            if st.encoding == Encoding::Protobuf {
                if let Some(why) = refuses_protobuf(&ev) {
                    tracing::info!(resource = name, reason = %why, "the API server does not answer in protobuf; reading JSON from now on");
                    st.encoding = Encoding::Json;
                    st.inner = Box::pin((st.make)(st.listing, st.encoding));
                    st.mid_list = false;
                    continue;
                }
            }
            if st.listing == Listing::Streaming {
                if let Some(why) = refuses_streaming(&ev, st.mid_list) {
                    tracing::info!(resource = name, reason = %why, "the API server does not stream initial lists; paging them from now on");
                    st.listing = Listing::Paging;
                    st.inner = Box::pin((st.make)(st.listing, st.encoding));
                    st.mid_list = false;
                    continue;
                }
            }
            match &ev {
                Ok(watcher::Event::Init) => {
                    st.mid_list = true;
                    st.objects = 0;
                }
                Ok(watcher::Event::InitApply(_)) => st.objects += 1,
                Ok(watcher::Event::InitDone) => {
                    st.mid_list = false;
                    tracing::info!(resource = name, listing = ?st.listing, objects = st.objects, encoding = ?st.encoding, "list received");
                }
                // A streamed list restarted after an error (a broken connection, an API server
                // restart, a 504 while its cache catches up) says nothing about streaming.
                Err(_) => st.mid_list = false,
                _ => {}
            }
            return Some((ev, st));
        }
    })
}

/// The watch of one kind: list (streamed where served, unless `listing` says paging) + watch
/// with relists, backoff, and slimmed objects. `cfg` is the paging configuration; `protobuf`,
/// when given, reads the kind as protobuf (falling back to JSON).
fn watch_stream<K>(
    name: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    listing: Listing,
    protobuf: Option<Protobuf<K>>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Watched,
{
    // A 410 Gone (our resource version expired, e.g. after an API server restart) means "relist
    // now", as client-go does: the first one in a row skips the backoff, which after an outage
    // has grown to seconds. A second 410 without progress in between is backed off as usual.
    let mut gone_before = false;
    let encoding = match protobuf {
        Some(_) => Encoding::Protobuf,
        None => Encoding::Json,
    };
    streaming_or_paging(name, listing, encoding, move |listing, encoding| {
        match (encoding, protobuf) {
            (Encoding::Protobuf, Some(pb)) => pb(api.clone().into_client(), &cfg, listing),
            _ => watcher(api.clone(), listing.config(cfg.clone())).boxed(),
        }
    })
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

/// Start every watch, their initial lists read as `listing` says. Each event sends a nudge on
/// `changes`.
pub async fn start(
    client: Client,
    node_name: &str,
    listing: Listing,
    encoding: Encoding,
    changes: mpsc::Sender<()>,
) -> Stores {
    let ready_nudge = changes.clone();
    let protobuf = encoding == Encoding::Protobuf;
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
        listing,
        changes.clone(),
        inbox.clone(),
        |i| &mut i.services,
        ReadService::read,
        svc_listed_tx,
        protobuf.then_some(pbwatch::stream::<Service> as Protobuf<Service>),
    );
    watch_into(
        "endpointslices",
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default()
            .labels(SLICE_SELECTOR)
            .page_size(page)
            .any_semantic(),
        listing,
        changes.clone(),
        inbox.clone(),
        |i| &mut i.slices,
        {
            let node = node_name.to_string();
            move |s: &EndpointSlice| ReadSlice::read(s, &node)
        },
        slice_listed_tx,
        protobuf.then_some(pbwatch::stream::<EndpointSlice> as Protobuf<EndpointSlice>),
    );
    // The Node and ServiceCIDRs are small: kept in stores and compared whole on every sync.
    let node = reflect(
        "node",
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        listing,
        changes.clone(),
    );
    let service_cidrs = if service_cidrs_served(&client).await {
        Some(reflect(
            "servicecidrs",
            Api::<ServiceCIDR>::all(client.clone()),
            watcher::Config::default(),
            listing,
            changes,
        ))
    } else {
        None
    };
    // The ONLY waiter on the stores' readiness: a kube-runtime Store wakes just the last task
    // that polled `wait_until_ready`, so two concurrent waiters can hang one of them.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (complete_tx, complete) = tokio::sync::watch::channel(false);
    let (others_tx, others_listed) = tokio::sync::watch::channel(false);
    let (r, n, c) = (ready.clone(), node.clone(), service_cidrs.clone());
    tokio::spawn(async move {
        let lists = async {
            if svc_listed.wait_for(|l| *l).await.is_ok()
                && slice_listed.wait_for(|l| *l).await.is_ok()
            {
                // Operators (and the benchmark) read the cold start's split from this line:
                // lists before it, the rest of the compute and the first commit after it.
                tracing::info!("initial Service and EndpointSlice lists received");
                r.store(true, std::sync::atomic::Ordering::SeqCst);
                // The watchers' own nudges may have come before the flag: sync now.
                let _ = ready_nudge.try_send(());
            }
        };
        let others = async {
            let _ = n.wait_until_ready().await;
            if let Some(c) = c {
                let _ = c.wait_until_ready().await;
            }
            others_tx.send_replace(true);
        };
        tokio::join!(lists, others);
        let _ = complete_tx.send(true);
    });
    Stores {
        inbox,
        node,
        service_cidrs,
        ready,
        others_listed,
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
    use kube::core::Status;
    use watcher::Event;

    type Ev = Result<Event<&'static str>, watcher::Error>;

    fn api_error(code: u16, reason: &str) -> Ev {
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(
            Status::failure("refused", reason).with_code(code).boxed(),
        )))
    }

    /// Runs `streaming_or_paging` over scripted watchers: what came out (errors as their
    /// code) and which listings were asked for.
    fn run(streaming: Vec<Ev>, paging: Vec<Ev>) -> (Vec<String>, Vec<Listing>) {
        let (shown, asked) = run_as(Encoding::Json, move |l, _| match l {
            Listing::Streaming => streaming.iter().map(clone_ev).collect(),
            Listing::Paging => paging.iter().map(clone_ev).collect(),
        });
        (shown, asked.into_iter().map(|(l, _)| l).collect())
    }

    /// The same, starting in `encoding`, each watcher's events scripted by `script`.
    fn run_as(
        encoding: Encoding,
        script: impl Fn(Listing, Encoding) -> Vec<Ev> + Send + 'static,
    ) -> (Vec<String>, Vec<(Listing, Encoding)>) {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = asked.clone();
        let out = streaming_or_paging("test", Listing::Streaming, encoding, move |l, e| {
            lock(&a).push((l, e));
            futures::stream::iter(script(l, e))
        });
        let got = futures::executor::block_on(out.collect::<Vec<_>>());
        let shown = got
            .iter()
            .map(|e| match e {
                Ok(Event::Init) => "Init".to_string(),
                Ok(Event::InitApply(o)) => format!("InitApply {o}"),
                Ok(Event::InitDone) => "InitDone".to_string(),
                Ok(Event::Apply(o)) => format!("Apply {o}"),
                Ok(Event::Delete(o)) => format!("Delete {o}"),
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) => {
                    format!("error {}", s.code)
                }
                Err(e) => format!("error {e}"),
            })
            .collect();
        let asked = lock(&asked).clone();
        (shown, asked)
    }

    fn clone_ev(e: &Ev) -> Ev {
        match e {
            Ok(ev) => Ok(ev.clone()),
            Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) => Err(
                watcher::Error::WatchStartFailed(kube::Error::Api(s.clone())),
            ),
            Err(_) => Err(watcher::Error::NoResourceVersion),
        }
    }

    fn list(objs: &[&'static str]) -> Vec<Ev> {
        std::iter::once(Ok(Event::Init))
            .chain(objs.iter().map(|o| Ok(Event::InitApply(*o))))
            .chain([Ok(Event::InitDone)])
            .collect()
    }

    #[test]
    fn a_served_streaming_list_is_used_as_is() {
        let mut streamed = list(&["a", "b"]);
        streamed.push(Ok(Event::Apply("c")));
        // A later relist (after 410 Gone) streams again: not a refusal.
        streamed.extend(list(&["a"]));
        let (got, asked) = run(streamed, list(&["never"]));
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "InitApply b",
                "InitDone",
                "Apply c",
                "Init",
                "InitApply a",
                "InitDone"
            ]
        );
        assert_eq!(asked, [Listing::Streaming]);
    }

    #[test]
    fn a_refused_streaming_list_falls_back_to_paging_at_once() {
        for code in [400, 422] {
            let (got, asked) = run(vec![api_error(code, "Invalid")], list(&["a"]));
            assert_eq!(got, ["Init", "InitApply a", "InitDone"], "{code}");
            assert_eq!(asked, [Listing::Streaming, Listing::Paging]);
        }
    }

    #[test]
    fn a_server_not_answering_in_protobuf_is_read_as_json_with_the_same_listing() {
        use Encoding::{Json, Protobuf};
        // Protobuf refused (406); then JSON streaming refused (422): JSON pages.
        let (got, asked) = run_as(Protobuf, |l, e| match (l, e) {
            (_, Protobuf) => vec![api_error(pbwatch::NOT_PROTOBUF, "NotAcceptable")],
            (Listing::Streaming, Json) => vec![api_error(422, "Invalid")],
            (Listing::Paging, Json) => list(&["a"]),
        });
        assert_eq!(got, ["Init", "InitApply a", "InitDone"]);
        assert_eq!(
            asked,
            [
                (Listing::Streaming, Protobuf),
                (Listing::Streaming, Json),
                (Listing::Paging, Json)
            ]
        );
        // Served: protobuf all along.
        let (got, asked) = run_as(Protobuf, |l, e| match (l, e) {
            (Listing::Streaming, Protobuf) => list(&["a"]),
            _ => list(&["never"]),
        });
        assert_eq!(got, ["Init", "InitApply a", "InitDone"]);
        assert_eq!(asked, [(Listing::Streaming, Protobuf)]);
    }

    #[test]
    fn a_streamed_list_restarted_after_an_error_keeps_streaming() {
        let mut streamed = vec![Ok(Event::Init), Ok(Event::InitApply("a"))];
        streamed.push(api_error(500, "InternalError"));
        streamed.extend(list(&["a", "b"]));
        let (got, asked) = run(streamed, list(&["never"]));
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "error 500",
                "Init",
                "InitApply a",
                "InitApply b",
                "InitDone"
            ]
        );
        assert_eq!(asked, [Listing::Streaming]);
        // Restarted without an error in between: the end-of-list bookmark never came.
        let mut streamed = vec![Ok(Event::Init), Ok(Event::InitApply("a"))];
        streamed.extend(list(&["a"]));
        let (_, asked) = run(streamed, list(&["a"]));
        assert_eq!(asked, [Listing::Streaming, Listing::Paging]);
    }

    #[test]
    fn paging_asked_for_is_all_there_is() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = asked.clone();
        let out = streaming_or_paging("test", Listing::Paging, Encoding::Json, move |l, _| {
            lock(&a).push(l);
            futures::stream::iter(vec![api_error(422, "Invalid")])
        });
        let got = futures::executor::block_on(out.collect::<Vec<_>>());
        assert_eq!(got.len(), 1, "a paged list's errors are passed on");
        assert_eq!(*lock(&asked), [Listing::Paging]);
    }

    #[test]
    fn other_errors_are_not_a_refusal() {
        // 403: RBAC would refuse a paged list as well; 500: the server is unwell.
        for code in [403, 500] {
            let mut streamed = vec![api_error(code, "Forbidden")];
            streamed.extend(list(&["a"]));
            let (got, asked) = run(streamed, list(&["never"]));
            assert_eq!(
                got,
                [
                    format!("error {code}"),
                    "Init".into(),
                    "InitApply a".into(),
                    "InitDone".into()
                ]
            );
            assert_eq!(asked, [Listing::Streaming]);
        }
    }

    #[test]
    fn a_streamed_list_that_restarts_before_its_end_falls_back_to_paging() {
        // A server that drops sendInitialEvents sends the objects and never the end bookmark:
        // the watch times out and the list starts again, forever.
        let mut streamed = vec![Ok(Event::Init), Ok(Event::InitApply("a"))];
        streamed.extend(list(&["a"]));
        let (got, asked) = run(streamed, list(&["a", "b"]));
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "Init",
                "InitApply a",
                "InitApply b",
                "InitDone"
            ]
        );
        assert_eq!(asked, [Listing::Streaming, Listing::Paging]);
    }

    #[test]
    fn slimming_changes_nothing_nftproxy_reads() {
        let mut objs = crate::testutil::cluster_objects();
        // Every field NodeInfo reads is set: the pod CIDRs (both forms), the autoscaler's
        // taint (besides the fixture's addresses and zone label).
        for n in objs.nodes.iter_mut() {
            let spec = n.spec.get_or_insert_with(Default::default);
            spec.pod_cidr = Some("10.244.1.0/24".into());
            spec.pod_cidrs = Some(vec!["10.244.1.0/24".into(), "fd00:10:244:1::/64".into()]);
            spec.taints = Some(vec![k8s_openapi::api::core::v1::Taint {
                key: crate::model::AUTOSCALER_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]);
        }
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
        let (whole, slimmed) = (state(&objs), state(&slim));
        assert_eq!(whole.1.pod_cidrs.len(), 2, "{:?}", whole.1);
        assert!(whole.1.ineligible);
        assert_eq!(whole, slimmed);
    }
}
