//! The API client: which server it talks to and where that address came from, so that an
//! unreachable `kubernetes` Service address (which only a running proxy makes reachable) can be
//! explained instead of waited on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kube::Client;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The API server the client talks to, and where its address came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAddress {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub source: ApiSource,
}

/// Where the API server address came from: it decides what an unreachable API means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSource {
    /// `--master` / `NFTPROXY_MASTER`.
    Master,
    /// A kubeconfig file.
    Kubeconfig,
    /// The in-cluster `KUBERNETES_SERVICE_HOST`: the `kubernetes` Service, which on a node
    /// without kube-proxy only nftproxy itself programs.
    ServiceEnv,
}

/// Told about every finished API request (client-go's `rest_client_*` metrics): method, host,
/// status code (`<error>` when no response came) and latency to the response headers.
pub trait RequestSink: Send + Sync + 'static {
    fn request(&self, method: &str, host: &str, code: &str, latency: Duration);
}

/// client-go's client-side rate limit (kube-proxy's `--kube-api-qps`/`--kube-api-burst`,
/// `clientConnection.qps`/`burst`): a token bucket shared by every clone of the client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub qps: f64,
    pub burst: u32,
}

impl RateLimit {
    /// kube-proxy's defaults (v1alpha1 `clientConnection`): 5 requests per second, bursts of 10.
    pub const KUBE_PROXY: RateLimit = RateLimit {
        qps: 5.0,
        burst: 10,
    };
}

#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    /// Take a token now, or say when one will be there.
    fn take(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let refill = now.duration_since(self.at).as_secs_f64() * self.limit.qps;
        self.tokens = (self.tokens + refill).min(f64::from(self.limit.burst.max(1)));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(now + Duration::from_secs_f64((1.0 - self.tokens) / self.limit.qps))
        }
    }
}

/// A list's further page (`continue=`). client-go lists through the API server's watch cache
/// (resourceVersion 0), which answers a whole list in one response: one request, one token of
/// the rate limit. The watcher here pages (500 objects a page, so no response holds 50,000
/// Services at once); its further pages are part of that one list, so they take no token.
/// Counting them cost a 10k-Service cold start 7 s at kube-proxy's 5 requests per second.
fn is_further_page<B>(req: &http::Request<B>) -> bool {
    req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.starts_with("continue=") && kv.len() > 9)
    })
}

/// The tower service that rate-limits the client stack's requests and reports each of them
/// to a [`RequestSink`].
struct Observed<S> {
    inner: S,
    sink: Option<Arc<dyn RequestSink>>,
    host: Arc<str>,
    bucket: Option<Arc<std::sync::Mutex<Bucket>>>,
}

impl<S: Clone> Clone for Observed<S> {
    fn clone(&self) -> Self {
        Observed {
            inner: self.inner.clone(),
            sink: self.sink.clone(),
            host: self.host.clone(),
            bucket: self.bucket.clone(),
        }
    }
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for Observed<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    /// The token is taken here, where the request is known (a list's further pages take none),
    /// and waited for in the returned future before the inner future is first polled: the
    /// client stack's futures are lazy (hyper sends when polled), so nothing leaves before.
    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let bucket = self.bucket.clone().filter(|_| !is_further_page(&req));
        let method = req.method().as_str().to_string();
        let (sink, host) = (self.sink.clone(), self.host.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            if let Some(b) = bucket {
                loop {
                    let at = crate::lock::lock(&b).take(tokio::time::Instant::now());
                    match at {
                        None => break,
                        Some(at) => tokio::time::sleep_until(at).await,
                    }
                }
            }
            // client-go's request latency starts when the request is sent, after the limiter.
            let started = tokio::time::Instant::now();
            let r = fut.await;
            if let Some(sink) = sink {
                let code = match &r {
                    Ok(resp) => resp.status().as_str().to_string(),
                    Err(_) => "<error>".to_string(),
                };
                sink.request(&method, &host, &code, started.elapsed());
            }
            r
        })
    }
}

pub async fn client(
    kubeconfig: Option<&std::path::Path>,
    master: Option<&str>,
    sink: Option<Arc<dyn RequestSink>>,
    limit: Option<RateLimit>,
) -> Result<(Client, ApiAddress), ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ClientError::Kubeconfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ClientError::Kubeconfig(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ClientError::Kubeconfig(e.to_string()))?,
    };
    let source = match master.filter(|m| !m.is_empty()) {
        Some(m) => {
            config.cluster_url = m
                .parse()
                .map_err(|e| ClientError::Kubeconfig(format!("--master {m:?}: {e}")))?;
            ApiSource::Master
        }
        None if kubeconfig.is_none()
            && std::env::var("KUBERNETES_SERVICE_HOST").is_ok_and(|h| {
                config
                    .cluster_url
                    .host()
                    .is_some_and(|u| u.trim_matches(|c| c == '[' || c == ']') == h)
            }) =>
        {
            ApiSource::ServiceEnv
        }
        None => ApiSource::Kubeconfig,
    };
    let u = &config.cluster_url;
    let addr = ApiAddress {
        url: u.to_string(),
        host: u
            .host()
            .unwrap_or_default()
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
        port: u.port_u16().unwrap_or(if u.scheme_str() == Some("http") {
            80
        } else {
            443
        }),
        source,
    };
    tracing::info!(server = %addr.url, source = ?addr.source, "API server");
    // client-go's `host` label: the server's host:port as written in the URL.
    let host: Arc<str> = match u.port_u16() {
        Some(p) => format!("{}:{p}", u.host().unwrap_or_default()),
        None => u.host().unwrap_or_default().to_string(),
    }
    .into();
    let builder = kube::client::ClientBuilder::try_from(config)?;
    let bucket = limit.filter(|l| l.qps > 0.0).map(|limit| {
        Arc::new(std::sync::Mutex::new(Bucket {
            limit,
            tokens: f64::from(limit.burst.max(1)),
            at: tokio::time::Instant::now(),
        }))
    });
    let client = builder
        .with_layer(&tower::layer::layer_fn(move |inner| Observed {
            inner,
            sink: sink.clone(),
            host: host.clone(),
            bucket: bucket.clone(),
        }))
        .build();
    Ok((client, addr))
}

/// What to say when the API server cannot be reached at `url` (None: nothing to add to the
/// watchers' own retry lines). Pure.
pub fn unreachable_api_message(url: &str, source: &ApiSource, error: &str) -> Option<String> {
    match source {
        ApiSource::ServiceEnv => Some(format!(
            "cannot reach the API server at {url} ({error}): that address is the `kubernetes` \
             Service (KUBERNETES_SERVICE_HOST), which nothing on this node programs before \
             nftproxy has listed the Services (no kube-proxy); give nftproxy the API server's \
             real address: key apiServer in ConfigMap kube-system/nftproxy, or --master \
             (NFTPROXY_MASTER); /livez fails until the API answers"
        )),
        ApiSource::Master | ApiSource::Kubeconfig => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_qps() {
        let now = tokio::time::Instant::now();
        let mut b = Bucket {
            limit: RateLimit {
                qps: 5.0,
                burst: 10,
            },
            tokens: 10.0,
            at: now,
        };
        for _ in 0..10 {
            assert_eq!(b.take(now), None);
        }
        let next = b.take(now).expect("the 11th waits");
        assert_eq!(next - now, Duration::from_millis(200));
        assert_eq!(b.take(next), None, "a token after 1/qps");
    }

    #[test]
    fn further_list_pages_take_no_token() {
        let page = |uri: &str| http::Request::get(uri).body(()).expect("request");
        assert!(is_further_page(&page(
            "/api/v1/services?limit=500&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MTJ9"
        )));
        assert!(!is_further_page(&page("/api/v1/services?limit=500")));
        assert!(!is_further_page(&page(
            "/api/v1/services?limit=500&continue="
        )));
        assert!(!is_further_page(&page("/api/v1/services?watch=true")));
    }

    /// Through the layer: a list of 20 pages costs one token; the next list waits for the
    /// bucket (burst 1, 1 request per second).
    #[tokio::test(start_paused = true)]
    async fn a_paged_list_is_one_request_for_the_rate_limit() {
        #[derive(Clone)]
        struct Ok200;
        impl tower::Service<http::Request<()>> for Ok200 {
            type Response = http::Response<()>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<http::Response<()>, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: http::Request<()>) -> Self::Future {
                std::future::ready(Ok(http::Response::new(())))
            }
        }
        let mut svc = Observed {
            inner: Ok200,
            sink: None,
            host: Arc::from("h"),
            bucket: Some(Arc::new(std::sync::Mutex::new(Bucket {
                limit: RateLimit { qps: 1.0, burst: 1 },
                tokens: 1.0,
                at: tokio::time::Instant::now(),
            }))),
        };
        let req = |uri: &str| http::Request::get(uri).body(()).expect("request");
        let t0 = tokio::time::Instant::now();
        for i in 0..20 {
            let uri = if i == 0 {
                "/api/v1/services?limit=500".to_string()
            } else {
                format!("/api/v1/services?limit=500&continue=page{i}")
            };
            std::future::poll_fn(|cx| tower::Service::poll_ready(&mut svc, cx))
                .await
                .expect("ready");
            tower::Service::call(&mut svc, req(&uri))
                .await
                .expect("answer");
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the pages waited");
        std::future::poll_fn(|cx| tower::Service::poll_ready(&mut svc, cx))
            .await
            .expect("ready");
        tower::Service::call(&mut svc, req("/api/v1/endpointslices?limit=500"))
            .await
            .expect("answer");
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(1),
            "the next list waits for a token"
        );
    }

    #[test]
    fn an_unreachable_service_address_is_explained() {
        let m = unreachable_api_message(
            "https://10.96.0.1:443/",
            &ApiSource::ServiceEnv,
            "connection refused",
        )
        .expect("explained");
        for part in [
            "10.96.0.1",
            "connection refused",
            "`kubernetes` Service",
            "ConfigMap kube-system/nftproxy",
            "--master",
            "/livez",
        ] {
            assert!(m.contains(part), "{part}: {m}");
        }
        // An address the operator chose: the watchers' retry lines say enough.
        for s in [ApiSource::Master, ApiSource::Kubeconfig] {
            assert!(unreachable_api_message("https://api:6443/", &s, "refused").is_none());
        }
    }

    #[tokio::test]
    async fn master_overrides_the_kubeconfig_server() {
        let dir = std::env::temp_dir().join(format!("nftproxy-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = dir.join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://10.96.0.1:443'}\n\
             users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
             current-context: x\n",
        )
        .unwrap();
        let (_, a) = client(Some(&kc), None, None, None).await.expect("client");
        assert_eq!(
            (a.host.as_str(), a.port, &a.source),
            ("10.96.0.1", 443, &ApiSource::Kubeconfig)
        );
        let (_, a) = client(Some(&kc), Some("https://192.168.0.1:6443"), None, None)
            .await
            .expect("client");
        assert_eq!(
            (a.host.as_str(), a.port, &a.source),
            ("192.168.0.1", 6443, &ApiSource::Master)
        );
        assert!(client(Some(&kc), Some("not a url ::"), None, None)
            .await
            .is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
