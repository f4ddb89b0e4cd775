//! The agent's debug endpoints, on a unix socket (reachable on the node and through `kubectl
//! exec` only, never from the network): `/debug/services`, `/debug/explain`, `/debug/report` and
//! `/debug/ruleset`. They answer from what the sync loop last committed (the Report's ruleset and
//! proxy state) through `explain`, the same code the offline commands run.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::explain::{self, Flow, ServicesQuery, View};
use crate::lock::lock;
use crate::model::{NodeInfo, PortEndpoints, ServiceName};
use crate::net::Family;
use crate::nft::ir::Ruleset;
use crate::observe::metrics::{Metrics, ServiceLabel};
use crate::pipeline::config::ProxyConfig;
use crate::proxy::ProxyState;

/// Where the agent listens unless `--debug-socket` says otherwise (empty: no debug endpoints).
pub const DEFAULT_SOCKET: &str = "/run/nftproxy/debug.sock";

/// What the last commit put in the kernel.
#[derive(Clone)]
pub struct Applied {
    pub ruleset: Ruleset,
    pub state: Arc<ProxyState>,
    pub node: NodeInfo,
}

/// Shared between the observer (writes after each commit) and the debug server (reads).
pub type SharedApplied = Arc<Mutex<Option<Applied>>>;

/// A Service's endpoints as the model read them (the pipeline engine).
pub type EndpointsOf = Arc<dyn Fn(&ServiceName, Family) -> PortEndpoints + Send + Sync>;

#[derive(Clone)]
pub struct Debug {
    pub applied: SharedApplied,
    pub cfg: ProxyConfig,
    pub endpoints: EndpointsOf,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error("debug socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every address of this node's network namespace (the agent runs in it).
fn local_addrs() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|v| v.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// The source address the kernel picks toward `ep` (what masquerade gives the packet): a UDP
/// socket connected there sends nothing, its local address is the route's source.
fn route_source(ep: IpAddr) -> Option<IpAddr> {
    let any: IpAddr = if ep.is_ipv4() {
        IpAddr::from([0u8, 0, 0, 0])
    } else {
        IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
    };
    let s = std::net::UdpSocket::bind((any, 0)).ok()?;
    s.connect((ep, 9)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

impl Debug {
    /// Run `f` over the view of the last commit; None before the first one.
    fn with_view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> Option<R> {
        let applied = lock(&self.applied).clone()?;
        let addrs = local_addrs();
        let endpoints = |s: &ServiceName, fam: Family| (self.endpoints)(s, fam);
        let counters = |s: &ServiceName| {
            let label = ServiceLabel {
                namespace: s.namespace.clone(),
                service: s.name.clone(),
            };
            Some((
                self.metrics
                    .no_local_endpoint_drops
                    .get_or_create(&label)
                    .get(),
                self.metrics.no_endpoint_rejects.get_or_create(&label).get(),
            ))
        };
        let view = View {
            ruleset: &applied.ruleset,
            state: &applied.state,
            node: &applied.node,
            cfg: &self.cfg,
            local_addrs: &addrs,
            endpoints: &endpoints,
            masquerade_source: &route_source,
            counters: Some(&counters),
        };
        Some(f(&view))
    }
}

fn not_yet() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "nothing committed yet: the agent is waiting for its first sync\n",
    )
        .into_response()
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_string_pretty(v) {
        Ok(s) => ([("content-type", "application/json")], s + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ExplainQuery {
    from: String,
    to: String,
    via: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct SvcQuery {
    namespace: Option<String>,
    name: Option<String>,
    #[serde(default)]
    problems: bool,
}

pub fn router(d: Debug) -> Router {
    Router::new()
        .route(
            "/debug/explain",
            get(
                |State(d): State<Debug>, Query(q): Query<ExplainQuery>| async move {
                    match Flow::parse(&q.from, &q.to, q.via.as_deref()) {
                        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
                        Ok(flow) => d
                            .with_view(|v| json(&explain::explain(v, &flow)))
                            .unwrap_or_else(not_yet),
                    }
                },
            ),
        )
        .route(
            "/debug/services",
            get(
                |State(d): State<Debug>, Query(q): Query<SvcQuery>| async move {
                    let q = ServicesQuery {
                        namespace: q.namespace,
                        name: q.name,
                        problems: q.problems,
                    };
                    d.with_view(|v| json(&explain::services(v, &q)))
                        .unwrap_or_else(not_yet)
                },
            ),
        )
        .route(
            "/debug/report",
            get(|State(d): State<Debug>| async move {
                d.with_view(|v| json(&explain::report(v)))
                    .unwrap_or_else(not_yet)
            }),
        )
        .route(
            "/debug/ruleset",
            get(|State(d): State<Debug>| async move {
                match lock(&d.applied).as_ref() {
                    Some(a) => crate::nft::render::ruleset(&a.ruleset).into_response(),
                    None => not_yet(),
                }
            }),
        )
        .with_state(d)
}

/// Listen on `path` (its directory is created; a stale socket file from an earlier run is
/// replaced) and serve until the process ends.
pub fn serve(path: &Path, d: Debug) -> Result<(), DebugError> {
    let err = |source| DebugError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    // Root only: the endpoints reveal the node's Services and addresses.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    let app = router(d);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "debug server stopped");
        }
    });
    Ok(())
}
