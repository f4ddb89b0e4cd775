//! The list and watch of one kind read as protobuf ([`super::protobuf`]): the same state
//! machine and events as kube-runtime's watcher (which only speaks JSON), so everything after
//! it (the relist on 410 Gone, the backoff, the fallback from streamed to paged lists, the
//! inbox) is shared with the JSON path.
//!
//! - No resource version: a streaming list (one watch with `sendInitialEvents=true`, its
//!   initial objects ended by a bookmark annotated `k8s.io/initial-events-end`; no
//!   `resourceVersion`, i.e. a consistent read, as client-go's reflector asks), or pages of
//!   500 (`resourceVersion=0`: from the watch cache, as kube-runtime's `any_semantic`); then
//!   `Init`, `InitApply`..., `InitDone`.
//! - Then watches from the last resource version (bookmarks on), reopened when the server ends
//!   one (`timeoutSeconds`) or nothing arrives for that long; an ERROR event 410 drops the
//!   resource version, so the next step lists again.
//! - An answer that is not protobuf (a server or proxy that ignores `Accept`), or 406/415, is
//!   reported as a 406 start failure, on which `watch::streaming_or_paging` moves this kind to
//!   JSON for good.
//!
//! Frames of a protobuf watch: a 4-byte big-endian length, then a `metav1.WatchEvent` (not
//! enveloped) whose object holds the enveloped object (`k8s\0` + `runtime.Unknown`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as pb_meta;
use kube::client::Body;
use kube::runtime::watcher::{self, Event};
use kube::Client;
use prost::Message;

use super::protobuf::{self, PbError, PbKind, CONTENT_TYPE};
use super::watch::Listing;

/// The server ends a watch after this long (kube-runtime's and client-go's default)...
const WATCH_TIMEOUT_S: u32 = 290;
/// ...and one silent for a little longer is taken for a dead connection.
const IDLE: Duration = Duration::from_secs(WATCH_TIMEOUT_S as u64 + 5);
/// The annotation on the bookmark that ends a streaming list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
/// A list or watch answered in another encoding than protobuf (see the module comment).
pub const NOT_PROTOBUF: u16 = 406;
/// No Service or EndpointSlice comes near this (the API server's own limit on an object is
/// 1.5 MiB in etcd): a longer frame is a broken stream, not an allocation to make.
const MAX_FRAME: usize = 64 << 20;

type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, kube::Error>> + Send>>;

struct Watch<K> {
    client: Client,
    selector: Option<String>,
    page: u32,
    listing: Listing,
    /// Where the next watch starts; None: list first.
    rv: Option<String>,
    /// The open watch: its body and what has arrived of the next frame.
    body: Option<(Chunks, BytesMut)>,
    /// Frames the open watch has delivered (with bookmarks on, every watch that lasts has
    /// some: one that ends without any is reported, so that the backoff applies).
    frames: usize,
    /// The open watch is a streaming list still sending its initial objects.
    initial: bool,
    /// Paging through a list: the next page's token.
    next_page: Option<String>,
    queue: VecDeque<Result<Event<K>, watcher::Error>>,
}

/// The watch of kind `K` as protobuf, configured as `cfg` (label selector, page size) and
/// listed as `listing` says.
pub fn stream<K>(
    client: Client,
    cfg: &watcher::Config,
    listing: Listing,
) -> BoxStream<'static, Result<Event<K>, watcher::Error>>
where
    K: PbKind + Send + 'static,
{
    let w = Watch::<K> {
        client,
        selector: cfg.label_selector.clone(),
        page: cfg.page_size.unwrap_or(500),
        listing,
        rv: None,
        body: None,
        frames: 0,
        initial: false,
        next_page: None,
        queue: VecDeque::new(),
    };
    futures::stream::unfold(w, |mut w| async move {
        let ev = w.step().await;
        Some((ev, w))
    })
    .boxed()
}

/// An object's resource version; an empty one is none (a watch from "" starts at "now").
fn version(meta: Option<&pb_meta::ObjectMeta>) -> Option<String> {
    meta.and_then(|m| m.resource_version.clone())
        .filter(|v| !v.is_empty())
}

fn pb_error(e: PbError) -> kube::Error {
    kube::Error::Service(Box::new(e))
}

fn api_error(code: u16, reason: &str, message: String) -> kube::Error {
    kube::Error::Api(Box::new(kube::core::Status {
        code,
        reason: reason.into(),
        message,
        ..kube::core::Status::default()
    }))
}

fn content_type(res: &http::Response<Body>) -> String {
    res.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

impl<K: PbKind + Send + 'static> Watch<K> {
    /// One event (or error) of the watch; trampolines over steps that yield nothing.
    async fn step(&mut self) -> Result<Event<K>, watcher::Error> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return ev;
            }
            if self.body.is_some() {
                match self.frame().await {
                    None if self.frames == 0 => {
                        self.close();
                        return Err(watcher::Error::WatchFailed(api_error(
                            500,
                            "EmptyWatch",
                            "the watch ended before it sent anything".into(),
                        )));
                    }
                    None => {
                        // The server ended the watch (or it went silent): watch again from
                        // where it was; a streaming list cut short is listed again.
                        self.close();
                    }
                    Some(Err(e)) => {
                        self.close();
                        return Err(watcher::Error::WatchFailed(e));
                    }
                    Some(Ok(frame)) => match self.event(&frame) {
                        Ok(Some(ev)) => return Ok(ev),
                        Ok(None) => {}
                        Err(e) => return Err(e),
                    },
                }
                continue;
            }
            match (self.rv.clone(), self.listing) {
                (Some(rv), _) => {
                    let query = [
                        ("watch", "1"),
                        ("resourceVersion", rv.as_str()),
                        ("allowWatchBookmarks", "true"),
                    ];
                    match self.open(&query).await {
                        Ok(()) => {}
                        Err(kube::Error::Api(s)) if s.code == 410 => {
                            self.rv = None;
                            return Err(watcher::Error::WatchError(s));
                        }
                        Err(e) => return Err(watcher::Error::WatchStartFailed(e)),
                    }
                }
                (None, Listing::Streaming) => {
                    let query = [
                        ("watch", "1"),
                        ("sendInitialEvents", "true"),
                        ("resourceVersionMatch", "NotOlderThan"),
                        ("allowWatchBookmarks", "true"),
                    ];
                    self.open(&query)
                        .await
                        .map_err(watcher::Error::WatchStartFailed)?;
                    self.initial = true;
                    return Ok(Event::Init);
                }
                (None, Listing::Paging) => self.list_page().await?,
            }
        }
    }

    fn close(&mut self) {
        self.body = None;
        if self.initial {
            self.initial = false;
            self.rv = None;
        }
    }

    /// A GET of the collection with `query` (and the selector), answered in protobuf.
    async fn get(&mut self, query: &[(&str, &str)]) -> Result<http::Response<Body>, kube::Error> {
        let mut q: Vec<(&str, &str)> = query.to_vec();
        if let Some(s) = self.selector.as_deref() {
            q.push(("labelSelector", s));
        }
        let qs = serde_urlencoded::to_string(&q).map_err(|e| kube::Error::Service(Box::new(e)))?;
        let req = http::Request::get(format!("{}?{qs}", K::PATH))
            .header(http::header::ACCEPT, CONTENT_TYPE)
            .body(Body::empty())
            .map_err(kube::Error::HttpError)?;
        let res = self.client.send(req).await?;
        let ct = content_type(&res);
        let code = res.status().as_u16();
        if matches!(code, 406 | 415) {
            return Err(api_error(
                NOT_PROTOBUF,
                "NotAcceptable",
                format!("the API server answered {code} to a protobuf request"),
            ));
        }
        if !res.status().is_success() {
            let body = res.into_body().collect().await?.to_bytes();
            let status = if ct.starts_with(CONTENT_TYPE) {
                protobuf::decode::<pb_meta::Status>(&body, "Status")
                    .ok()
                    .map(protobuf::status)
            } else {
                serde_json::from_slice::<kube::core::Status>(&body).ok()
            };
            let mut status = status.unwrap_or_else(|| kube::core::Status {
                message: String::from_utf8_lossy(&body).into_owned(),
                ..kube::core::Status::default()
            });
            if status.code == 0 {
                status.code = code;
            }
            return Err(kube::Error::Api(Box::new(status)));
        }
        if !ct.starts_with(CONTENT_TYPE) {
            return Err(api_error(
                NOT_PROTOBUF,
                "NotAcceptable",
                format!("the API server answered a protobuf request with {ct:?}"),
            ));
        }
        Ok(res)
    }

    /// Open a watch with `query`.
    async fn open(&mut self, query: &[(&str, &str)]) -> Result<(), kube::Error> {
        let timeout = WATCH_TIMEOUT_S.to_string();
        let mut q = query.to_vec();
        q.push(("timeoutSeconds", timeout.as_str()));
        let res = self.get(&q).await?;
        let chunks: Chunks = Box::pin(res.into_body().into_data_stream());
        self.body = Some((chunks, BytesMut::new()));
        self.frames = 0;
        Ok(())
    }

    /// The next frame of the open watch; None when it ended or went silent.
    async fn frame(&mut self) -> Option<Result<Bytes, kube::Error>> {
        let (chunks, buf) = self.body.as_mut()?;
        loop {
            if buf.len() >= 4 {
                let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if n > MAX_FRAME {
                    return Some(Err(api_error(
                        500,
                        "BadFrame",
                        format!("a watch frame of {n} bytes"),
                    )));
                }
                if buf.len() >= 4 + n {
                    self.frames += 1;
                    buf.advance(4);
                    return Some(Ok(buf.split_to(n).freeze()));
                }
                buf.reserve(4 + n - buf.len());
            }
            match tokio::time::timeout(IDLE, chunks.next()).await {
                Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => return Some(Err(e)),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// One watch event. An object that does not decode is reported and skipped; the watch
    /// goes on (bad input never stops the others).
    fn event(&mut self, frame: &[u8]) -> Result<Option<Event<K>>, watcher::Error> {
        let bad = |e: PbError| watcher::Error::WatchFailed(pb_error(e));
        let ev = pb_meta::WatchEvent::decode(frame).map_err(|e| bad(e.into()))?;
        let raw = ev.object.and_then(|o| o.raw).unwrap_or_default();
        let kind = ev.r#type.unwrap_or_default();
        match kind.as_str() {
            "ERROR" => {
                let status = protobuf::status(
                    protobuf::decode::<pb_meta::Status>(&raw, "Status").map_err(bad)?,
                );
                self.close();
                if status.code == 410 {
                    self.rv = None;
                }
                Err(watcher::Error::WatchError(Box::new(status)))
            }
            "BOOKMARK" => {
                let obj: K::Pb = protobuf::decode(&raw, K::KIND).map_err(bad)?;
                let meta = K::meta(&obj);
                let rv = version(meta);
                if self.initial {
                    let end = meta
                        .and_then(|m| m.annotations.get(INITIAL_EVENTS_END))
                        .is_some_and(|v| v == "true");
                    if !end {
                        return Ok(None);
                    }
                    let Some(rv) = rv else {
                        // Nowhere to watch from: list again (as kube-runtime does).
                        self.close();
                        return Err(watcher::Error::NoResourceVersion);
                    };
                    self.initial = false;
                    self.rv = Some(rv);
                    return Ok(Some(Event::InitDone));
                }
                if let Some(rv) = rv {
                    self.rv = Some(rv);
                }
                Ok(None)
            }
            "DELETED" if self.initial => {
                // A streaming list's initial events only add (kube-runtime drops these too).
                tracing::warn!(
                    kind = K::KIND,
                    "a deletion among a streamed list's initial objects; ignored"
                );
                Ok(None)
            }
            "ADDED" | "MODIFIED" | "DELETED" => {
                let obj: K::Pb = protobuf::decode(&raw, K::KIND).map_err(bad)?;
                // The initial objects of a streaming list come in no order of resource
                // version: only the bookmark that ends them says where the watch is.
                if !self.initial {
                    match version(K::meta(&obj)) {
                        Some(rv) => self.rv = Some(rv),
                        None => {
                            // Watching on from an unknown point could miss changes: list again.
                            self.close();
                            self.rv = None;
                            return Err(watcher::Error::NoResourceVersion);
                        }
                    }
                }
                let k = K::from_pb(obj);
                Ok(Some(match (kind.as_str(), self.initial) {
                    ("DELETED", _) => Event::Delete(k),
                    (_, true) => Event::InitApply(k),
                    _ => Event::Apply(k),
                }))
            }
            other => Err(watcher::Error::WatchFailed(api_error(
                500,
                "UnknownEvent",
                format!("unknown watch event type {other:?}"),
            ))),
        }
    }

    /// One page of a paged list: its objects queued (after `Init` on the first page, then
    /// `InitDone` on the last).
    async fn list_page(&mut self) -> Result<(), watcher::Error> {
        let limit = self.page.to_string();
        let token = self.next_page.take();
        let mut q = vec![("limit", limit.as_str())];
        match token.as_deref() {
            Some(t) => q.push(("continue", t)),
            None => q.push(("resourceVersion", "0")),
        }
        let list = async {
            let res = self.get(&q).await?;
            let body = res.into_body().collect().await?.to_bytes();
            protobuf::decode::<K::List>(&body, K::LIST_KIND).map_err(pb_error)
        }
        .await
        .map_err(watcher::Error::InitialListFailed)?;
        let (meta, items) = K::list(list);
        if token.is_none() {
            self.queue.push_back(Ok(Event::Init));
        }
        self.queue.extend(
            items
                .into_iter()
                .map(|o| Ok(Event::InitApply(K::from_pb(o)))),
        );
        let meta = meta.unwrap_or_default();
        match meta.r#continue.filter(|c| !c.is_empty()) {
            Some(c) => self.next_page = Some(c),
            None => match meta.resource_version.filter(|v| !v.is_empty()) {
                Some(rv) => {
                    self.rv = Some(rv);
                    self.queue.push_back(Ok(Event::InitDone));
                }
                None => self.queue.push_back(Err(watcher::Error::NoResourceVersion)),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use k8s_openapi::api::core::v1::Service;
    use k8s_pb::api::core::v1 as pb_core;
    use k8s_pb::apimachinery::pkg::runtime::{RawExtension, TypeMeta, Unknown};

    use super::*;
    use crate::lock::lock;

    type Chunks = http_body_util::StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
    >;

    struct Reply {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    }

    /// An API server that answers each request with the next scripted reply (500 when none is
    /// left), its bodies cut into 7-byte chunks so that frames straddle them.
    #[derive(Clone, Default)]
    struct Fake {
        replies: Arc<Mutex<VecDeque<Reply>>>,
        asked: Arc<Mutex<Vec<String>>>,
    }

    impl tower::Service<http::Request<Body>> for Fake {
        type Response = http::Response<Chunks>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            lock(&self.asked).push(req.uri().to_string());
            let r = lock(&self.replies).pop_front().unwrap_or(Reply {
                status: 500,
                content_type: "text/plain",
                body: b"no more replies".to_vec(),
            });
            let chunks: Vec<_> = r
                .body
                .chunks(7)
                .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            std::future::ready(Ok(http::Response::builder()
                .status(r.status)
                .header(http::header::CONTENT_TYPE, r.content_type)
                .body(http_body_util::StreamBody::new(futures::stream::iter(
                    chunks,
                )))
                .unwrap()))
        }
    }

    const WATCH: &str = "application/vnd.kubernetes.protobuf;stream=watch";

    fn enveloped(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let mut out = b"k8s\0".to_vec();
        Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        }
        .encode(&mut out)
        .unwrap();
        out
    }

    fn svc(name: &str, rv: &str) -> pb_core::Service {
        pb_core::Service {
            metadata: Some(pb_meta::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            }),
            spec: Some(pb_core::ServiceSpec {
                cluster_ip: Some("172.30.0.1".into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn bookmark(rv: &str, end: bool) -> pb_core::Service {
        let mut b = pb_core::Service {
            metadata: Some(pb_meta::ObjectMeta {
                resource_version: Some(rv.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        if end {
            if let Some(m) = b.metadata.as_mut() {
                m.annotations
                    .insert(INITIAL_EVENTS_END.into(), "true".into());
            }
        }
        b
    }

    fn status(code: i32) -> Vec<u8> {
        enveloped(
            "Status",
            pb_meta::Status {
                status: Some("Failure".into()),
                code: Some(code),
                reason: Some("Scripted".into()),
                message: Some(format!("scripted {code}")),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    fn event(ty: &str, raw: Vec<u8>) -> Vec<u8> {
        let ev = pb_meta::WatchEvent {
            r#type: Some(ty.into()),
            object: Some(RawExtension { raw: Some(raw) }),
        }
        .encode_to_vec();
        let mut out = (ev.len() as u32).to_be_bytes().to_vec();
        out.extend(ev);
        out
    }

    fn obj(ty: &str, s: pb_core::Service) -> Vec<u8> {
        event(ty, enveloped("Service", s.encode_to_vec()))
    }

    fn watch(frames: &[Vec<u8>]) -> Reply {
        Reply {
            status: 200,
            content_type: WATCH,
            body: frames.concat(),
        }
    }

    fn list(items: &[pb_core::Service], next: &str, rv: &str) -> Reply {
        let l = pb_core::ServiceList {
            metadata: Some(pb_meta::ListMeta {
                resource_version: Some(rv.into()),
                r#continue: Some(next.into()),
                ..Default::default()
            }),
            items: items.to_vec(),
        };
        Reply {
            status: 200,
            content_type: CONTENT_TYPE,
            body: enveloped("ServiceList", l.encode_to_vec()),
        }
    }

    /// The first `n` events of the protobuf watch of Services over `replies`, shown as text,
    /// and the requests it made.
    async fn run(listing: Listing, replies: Vec<Reply>, n: usize) -> (Vec<String>, Vec<String>) {
        let fake = Fake::default();
        lock(&fake.replies).extend(replies);
        let client = Client::new(fake.clone(), "default");
        let cfg = watcher::Config::default().labels("a=b").page_size(2);
        let got: Vec<_> = stream::<Service>(client, &cfg, listing)
            .take(n)
            .collect()
            .await;
        let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
        let shown = got
            .iter()
            .map(|e| match e {
                Ok(Event::Init) => "Init".to_string(),
                Ok(Event::InitApply(o)) => format!("InitApply {}", name(o)),
                Ok(Event::InitDone) => "InitDone".into(),
                Ok(Event::Apply(o)) => format!("Apply {}", name(o)),
                Ok(Event::Delete(o)) => format!("Delete {}", name(o)),
                Err(watcher::Error::WatchError(s)) => format!("watch error {}", s.code),
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(s)))
                | Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) => {
                    format!("start failed {} {}", s.code, s.message)
                }
                Err(watcher::Error::WatchFailed(_)) => "watch failed".into(),
                Err(e) => format!("error {e}"),
            })
            .collect();
        let asked = lock(&fake.asked).clone();
        (shown, asked)
    }

    #[tokio::test]
    async fn a_streamed_list_then_changes_then_a_relist_after_410() {
        let replies = vec![
            watch(&[
                obj("ADDED", svc("a", "5")),
                obj("ADDED", svc("b", "3")),
                obj("BOOKMARK", bookmark("10", true)),
                obj("MODIFIED", svc("a", "11")),
                obj("BOOKMARK", bookmark("11", false)),
                obj("DELETED", svc("b", "12")),
            ]),
            // The server ended that watch: resumed from the last resource version.
            watch(&[event("ERROR", status(410))]),
            watch(&[
                obj("ADDED", svc("a", "20")),
                obj("BOOKMARK", bookmark("21", true)),
            ]),
        ];
        let (got, asked) = run(Listing::Streaming, replies, 10).await;
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "InitApply b",
                "InitDone",
                "Apply a",
                "Delete b",
                "watch error 410",
                "Init",
                "InitApply a",
                "InitDone"
            ]
        );
        assert_eq!(asked.len(), 3, "{asked:?}");
        for a in &asked {
            assert!(
                a.starts_with("/api/v1/services?watch=1&") && a.contains("labelSelector=a%3Db"),
                "{a}"
            );
        }
        assert!(asked[0].contains("sendInitialEvents=true&resourceVersionMatch=NotOlderThan"));
        assert!(asked[1].contains("resourceVersion=12&allowWatchBookmarks=true"));
        assert!(asked[2].contains("sendInitialEvents=true"));
    }

    #[tokio::test]
    async fn a_paged_list_then_a_watch_from_its_version() {
        let replies = vec![
            list(&[svc("a", "1"), svc("b", "2")], "t1", ""),
            list(&[svc("c", "3")], "", "30"),
            watch(&[
                obj("ADDED", svc("d", "31")),
                obj("BOOKMARK", bookmark("40", false)),
            ]),
            watch(&[]),
        ];
        let (got, asked) = run(Listing::Paging, replies, 7).await;
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "InitApply b",
                "InitApply c",
                "InitDone",
                "Apply d",
                // The next watch ended at once, without a frame: reported (backoff).
                "watch failed"
            ]
        );
        assert!(
            asked[0].contains("limit=2&resourceVersion=0"),
            "{}",
            asked[0]
        );
        assert!(asked[1].contains("limit=2&continue=t1"), "{}", asked[1]);
        assert!(
            asked[2].contains("watch=1&resourceVersion=30"),
            "{}",
            asked[2]
        );
        // A bookmark moves the resource version on.
        assert!(
            asked[3].contains("watch=1&resourceVersion=40"),
            "{}",
            asked[3]
        );
    }

    #[tokio::test]
    async fn answers_in_json_or_refusals_are_not_protobuf() {
        for reply in [
            Reply {
                status: 200,
                content_type: "application/json",
                body: b"{}".to_vec(),
            },
            Reply {
                status: 406,
                content_type: "application/json",
                body: b"{}".to_vec(),
            },
        ] {
            let (got, _) = run(Listing::Streaming, vec![reply], 1).await;
            assert!(got[0].starts_with("start failed 406"), "{got:?}");
        }
        // A refusal in protobuf is read as the Status it is.
        let (got, _) = run(
            Listing::Paging,
            vec![Reply {
                status: 403,
                content_type: CONTENT_TYPE,
                body: status(403),
            }],
            1,
        )
        .await;
        assert_eq!(got, ["start failed 403 scripted 403"]);
    }

    #[tokio::test]
    async fn an_object_that_does_not_decode_is_reported_and_skipped() {
        let replies = vec![watch(&[
            event("ADDED", b"k8s\0garbage".to_vec()),
            obj("ADDED", svc("a", "1")),
            obj("BOOKMARK", bookmark("2", true)),
        ])];
        let (got, asked) = run(Listing::Streaming, replies, 4).await;
        assert_eq!(got, ["Init", "watch failed", "InitApply a", "InitDone"]);
        assert_eq!(asked.len(), 1);
    }

    #[tokio::test]
    async fn a_list_end_without_a_version_or_an_oversized_frame_starts_over() {
        let mut huge = (u32::try_from(MAX_FRAME).unwrap() + 1)
            .to_be_bytes()
            .to_vec();
        huge.extend([0u8; 16]);
        let replies = vec![
            watch(&[
                obj("ADDED", svc("a", "1")),
                // Not the list's to take away: ignored.
                obj("DELETED", svc("a", "1")),
                obj("BOOKMARK", bookmark("", true)),
            ]),
            watch(&[obj("ADDED", svc("b", "1")), huge]),
            watch(&[
                obj("ADDED", svc("c", "1")),
                obj("BOOKMARK", bookmark("7", true)),
            ]),
        ];
        let (got, asked) = run(Listing::Streaming, replies, 10).await;
        assert_eq!(
            got,
            [
                "Init",
                "InitApply a",
                "error no metadata.resourceVersion in watch result (does resource support watch?)",
                "Init",
                "InitApply b",
                "watch failed",
                "Init",
                "InitApply c",
                "InitDone",
                // The next watch (from 7) gets no reply script: 500.
                "start failed 500 no more replies"
            ]
        );
        assert!(asked
            .iter()
            .take(3)
            .all(|a| a.contains("sendInitialEvents=true")));
        assert!(asked[3].contains("resourceVersion=7"), "{}", asked[3]);
    }

    #[tokio::test]
    async fn a_streamed_list_cut_short_is_listed_again() {
        let replies = vec![
            watch(&[obj("ADDED", svc("a", "1"))]),
            watch(&[
                obj("ADDED", svc("a", "1")),
                obj("BOOKMARK", bookmark("2", true)),
            ]),
        ];
        let (got, asked) = run(Listing::Streaming, replies, 5).await;
        assert_eq!(
            got,
            ["Init", "InitApply a", "Init", "InitApply a", "InitDone"]
        );
        assert!(asked[1].contains("sendInitialEvents=true"), "{}", asked[1]);
    }
}
