//! `nftproxy run`: wires the watchers, the sync loop, the kernel, the health servers and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use imbl::ordmap::DiffItem;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use tokio::sync::mpsc;

use crate::apply::netlink::NetlinkApplier;
use crate::apply::{Applier, FaultInjecting};

/// The kernel applier with its test seam.
type AgentApplier = FaultInjecting<NetlinkApplier>;
use crate::cmd::args::RunArgs;
use crate::k8s::events::{Events, Warning};
use crate::k8s::watch::{self, Stores};
use crate::model::ServiceName;
use crate::model::{self, NodeInfo};
use crate::net::Family;
use crate::observe::health::agent::AgentHealth;
use crate::observe::health::service::{Probe, Servers, TcpBinder, Wanted};
use crate::observe::metrics::{self, Metrics};
use crate::pipeline::config::ProxyConfig;
use crate::proxy::ProxyState;
use crate::sync::{Desired, Observer, Report, SharedStatus, SyncConfig, SyncKind, Syncer};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(#[from] crate::cmd::args::ConfigError),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("netlink: {0}")]
    Netlink(#[from] crate::apply::ApplyError),
    #[error("preflight: {0}")]
    Preflight(#[from] crate::apply::preflight::PreflightError),
    #[error("the configuration file {} changed; exiting to restart with it", .0.display())]
    ConfigChanged(std::path::PathBuf),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
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

/// Build the API client the way every Kubernetes client does: an explicit kubeconfig, else
/// in-cluster service account, else $KUBECONFIG, else ~/.kube/config; `master` replaces the
/// server address (credentials stay).
pub async fn client(
    kubeconfig: Option<&std::path::Path>,
    master: Option<&str>,
) -> Result<(Client, ApiAddress), AgentError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Kubeconfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::Kubeconfig(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| AgentError::Kubeconfig(e.to_string()))?,
    };
    let source = match master.filter(|m| !m.is_empty()) {
        Some(m) => {
            config.cluster_url = m
                .parse()
                .map_err(|e| AgentError::Kubeconfig(format!("--master {m:?}: {e}")))?;
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
    Ok((Client::try_from(config)?, addr))
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

/// Until the initial lists are in, try a TCP connection to the API server every few seconds.
/// When the address is the `kubernetes` Service IP and it does not answer, say so once, clearly,
/// and fail /livez (the status's `bootstrap` field) rather than wait in silence: restarting with
/// the right address is then the operator's move, and the log says which.
fn spawn_api_probe(
    api: ApiAddress,
    status: SharedStatus,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    tokio::spawn(async move {
        let mut said = false;
        while !ready.load(std::sync::atomic::Ordering::SeqCst) {
            let attempt = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect((api.host.as_str(), api.port)),
            )
            .await;
            let error = match attempt {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("no answer within 3s".to_string()),
            };
            let message = error
                .as_deref()
                .and_then(|e| unreachable_api_message(&api.url, &api.source, e));
            if let Some(m) = &message {
                if !said {
                    tracing::error!("{m}");
                    said = true;
                }
            } else if said {
                tracing::info!(server = %api.url, "the API server answers now");
                said = false;
            }
            if let Ok(mut st) = status.lock() {
                st.bootstrap = message;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if let Ok(mut st) = status.lock() {
            st.bootstrap = None;
        }
    });
}

/// Problems are logged once per (object, reason), not on every sync.
#[derive(Default)]
struct ProblemLog {
    seen: BTreeSet<(String, String)>,
}

impl ProblemLog {
    fn report(&mut self, problems: Vec<crate::model::Problem>, metrics: &Metrics, events: &Events) {
        let now: BTreeSet<(String, String)> =
            problems.into_iter().map(|p| (p.object, p.reason)).collect();
        for (object, reason) in now.difference(&self.seen) {
            tracing::warn!(object = %object, reason = %reason, "skipped bad input");
            metrics.bad_objects.inc();
            if let Some(w) = Warning::from_problem(object, reason) {
                events.warn(w);
            }
        }
        self.seen = now;
    }
}

/// EndpointSlice change trigger times waiting for the commit that programs them (network
/// programming latency). Only slices that changed are looked at; a trigger time from before the
/// last commit was already programmed (the slice changed in a way that did not move it).
#[derive(Default)]
struct Triggers {
    pending: Vec<SystemTime>,
    last_commit: Option<SystemTime>,
}

const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl Triggers {
    fn scan<'a>(&mut self, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        for s in slices {
            let Some(raw) = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_ANNOTATION))
            else {
                continue;
            };
            let Ok(t) = humantime::parse_rfc3339_weak(raw) else {
                continue;
            };
            if self.last_commit.is_none_or(|c| t >= c) {
                self.pending.push(t);
            }
        }
    }

    /// The pending trigger times, now programmed.
    fn committed(&mut self, now: SystemTime) -> Vec<SystemTime> {
        self.last_commit = Some(now);
        std::mem::take(&mut self.pending)
    }
}

struct HealthProbe {
    health: AgentHealth,
    metrics: Arc<Metrics>,
}

impl Probe for HealthProbe {
    fn proxy_healthy(&self) -> bool {
        self.health.healthy()
    }
    fn answered(&self, code: u16) {
        self.metrics
            .healthcheck_responses
            .get_or_create(&metrics::CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }
}

type HealthServers = Arc<Mutex<HealthState>>;

/// The health servers and what they should serve (kept to retry failed binds between syncs).
struct HealthState {
    servers: Servers<TcpBinder<HealthProbe>>,
    wanted: BTreeMap<ServiceName, Wanted>,
    failing: bool,
    node: String,
}

impl HealthState {
    fn reconcile(&mut self, events: &Events) {
        let failures = self.servers.update(&self.wanted);
        self.failing = !failures.is_empty();
        for f in failures {
            tracing::warn!(service = %f.service, port = f.port, error = %f.error, "cannot open healthCheckNodePort; retrying");
            events.warn(Warning {
                kind: "Service".into(),
                namespace: f.service.namespace.clone(),
                name: f.service.name.clone(),
                reason: "FailedToStartServiceHealthcheck".into(),
                note: format!(
                    "node {}: cannot listen on healthCheckNodePort {}: {}",
                    self.node, f.port, f.error
                ),
            });
        }
    }
}

struct AgentObserver {
    metrics: Arc<Metrics>,
    health: HealthServers,
    events: Events,
    triggers: Arc<Mutex<Triggers>>,
    latest: Arc<Mutex<Option<Arc<ProxyState>>>>,
    conntrack: Box<dyn crate::conntrack::Conntrack>,
    applier: Arc<Mutex<AgentApplier>>,
    /// This node's NodePort addresses when they are single addresses (None: CIDRs).
    nodeport_ips: Arc<Mutex<Option<Vec<IpAddr>>>>,
    node: String,
}

/// Whether an affinity service port lost an endpoint (its affinity entries may point to it).
fn affinity_lost(previous: Option<&ProxyState>, current: &ProxyState) -> bool {
    let Some(prev) = previous else { return false };
    let empty = imbl::OrdMap::new();
    prev.families.iter().any(|(f, fs)| {
        let now = current.families.get(f).map(|c| &c.ports).unwrap_or(&empty);
        fs.ports.diff(now).any(|d| match d {
            DiffItem::Remove(_, p) => p.sp.affinity_secs.is_some(),
            DiffItem::Update {
                old: (_, p),
                new: (_, n),
            } => {
                p.sp.affinity_secs.is_some()
                    && p.chosen
                        .cluster
                        .iter()
                        .chain(&p.chosen.local)
                        .any(|b| !n.chosen.cluster.contains(b) && !n.chosen.local.contains(b))
            }
            DiffItem::Add(..) => false,
        })
    })
}

/// The health server one Service wants: its healthCheckNodePort and local endpoint count.
fn wanted_for(state: &ProxyState, svc: &ServiceName) -> Option<Wanted> {
    let mut out: Option<Wanted> = None;
    for fs in state.families.values() {
        for ps in crate::nft::compile::service_ports(&fs.ports, svc) {
            if let Some(port) = ps.sp.health_check_node_port {
                let w = out.get_or_insert(Wanted {
                    port,
                    local_endpoints: 0,
                });
                w.local_endpoints = w.local_endpoints.max(ps.chosen.local_ready);
            }
        }
    }
    out
}

/// The health servers wanted by a state: one per Service with a healthCheckNodePort.
pub fn wanted_health(state: &ProxyState) -> BTreeMap<ServiceName, Wanted> {
    let mut out = BTreeMap::new();
    update_wanted(&mut out, None, state);
    out
}

/// Bring `wanted` from `previous` to `current`, looking only at the Services that changed.
fn update_wanted(
    wanted: &mut BTreeMap<ServiceName, Wanted>,
    previous: Option<&ProxyState>,
    current: &ProxyState,
) {
    let changed: BTreeSet<ServiceName> = match previous {
        None => {
            wanted.clear();
            current
                .families
                .values()
                .flat_map(|fs| fs.ports.keys().map(|k| k.service.clone()))
                .collect()
        }
        Some(prev) => {
            let empty = imbl::OrdMap::new();
            let mut out = BTreeSet::new();
            for f in [Family::Ip, Family::Ip6] {
                let a = prev.families.get(&f).map(|s| &s.ports).unwrap_or(&empty);
                let b = current.families.get(&f).map(|s| &s.ports).unwrap_or(&empty);
                for d in a.diff(b) {
                    let k = match d {
                        DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
                        DiffItem::Update { new: (k, _), .. } => k,
                    };
                    out.insert(k.service.clone());
                }
            }
            out
        }
    };
    for svc in changed {
        match wanted_for(current, &svc) {
            Some(w) => {
                wanted.insert(svc, w);
            }
            None => {
                wanted.remove(&svc);
            }
        }
    }
}

impl Observer for AgentObserver {
    fn applied(&mut self, r: &Report) {
        self.metrics.record_sync(r);
        let now = SystemTime::now();
        for t in self
            .triggers
            .lock()
            .map(|mut t| t.committed(now))
            .unwrap_or_default()
        {
            if let Ok(d) = now.duration_since(t) {
                self.metrics.programming_latency.observe(d.as_secs_f64());
            }
        }
        if let Ok(mut h) = self.health.lock() {
            update_wanted(&mut h.wanted, r.previous.as_deref(), &r.state);
            h.reconcile(&self.events);
        }
        if let Ok(mut l) = self.latest.lock() {
            *l = Some(r.state.clone());
        }
        if affinity_lost(r.previous.as_deref(), &r.state) {
            let families: Vec<Family> = r.state.families.keys().copied().collect();
            let mut a = self.applier.lock().unwrap_or_else(|e| e.into_inner());
            match crate::sync::affinity::clean(&mut *a, &r.state, &families) {
                Ok(n) if n > 0 => tracing::info!(
                    deleted = n,
                    "removed affinity entries pointing to gone endpoints"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "affinity cleanup failed"),
            }
        }
        let nodeport_ips = self
            .nodeport_ips
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let flows = crate::conntrack::stale::stale_udp_flows(
            r.previous.as_deref(),
            &r.state,
            nodeport_ips.as_deref(),
        );
        if !flows.is_empty() {
            match self.conntrack.delete_stale(&flows) {
                Ok(n) => {
                    self.metrics.conntrack_deleted.inc_by(n as u64);
                    if n > 0 {
                        tracing::info!(deleted = n, "removed stale UDP conntrack entries");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "conntrack cleanup failed"),
            }
        }
        // Last, after this observer's own temporaries of a full sync are freed too: the heap is
        // then compact when the next change is computed.
        if r.kind == SyncKind::Full {
            release_free_memory();
        }
    }
    fn failed(&mut self, kind: SyncKind, _error: &str) {
        self.metrics.record_failure(kind);
    }
    fn drifted(&mut self, findings: &[crate::sync::drift::Finding]) {
        self.metrics.ruleset_drift.inc();
        let mut note = findings
            .iter()
            .take(3)
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        if findings.len() > 3 {
            note.push_str(&format!(" (and {} more)", findings.len() - 3));
        }
        // The API caps an event note at 1 kB.
        if note.len() > 900 {
            let mut cut = 900;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str(" ...");
        }
        self.events.warn(Warning {
            kind: "Node".into(),
            namespace: String::new(),
            name: self.node.clone(),
            reason: "NftproxyRulesetDrift".into(),
            note: format!("nftables ruleset changed from outside nftproxy, repairing: {note}"),
        });
    }
}

/// Hand the heap pages freed by a full sync back to the kernel. A full sync is the agent's peak:
/// the listed objects, the whole transaction and its netlink batch are all alive at once and
/// freed right after; glibc keeps such pages mapped, so without this the resident size after a
/// cold start stays near that peak for the life of the process.
fn release_free_memory() {
    nftproxy_nl::os::malloc_trim();
}

/// The address list the health check servers listen on.
fn health_addrs(cfg: &ProxyConfig, node: &NodeInfo) -> Vec<IpAddr> {
    let all4 = cfg.nodeport.matches_all(Family::Ip);
    let all6 = cfg.nodeport.matches_all(Family::Ip6);
    let mut out = Vec::new();
    if all4 {
        out.push(IpAddr::from([0u8, 0, 0, 0]));
    }
    if all6 {
        out.push(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED));
    }
    for net in cfg.nodeport.resolve(node) {
        let host = net.prefix_len() == net.max_prefix_len();
        let covered = match net.addr() {
            IpAddr::V4(_) => all4,
            IpAddr::V6(_) => all6,
        };
        if covered || net.addr().is_loopback() {
            continue;
        }
        if host {
            out.push(net.addr());
        } else if !out
            .iter()
            .any(|a| a.is_unspecified() && a.is_ipv4() == net.addr().is_ipv4())
        {
            // A CIDR (not a single address): listen everywhere for that family.
            out.push(if net.addr().is_ipv4() {
                IpAddr::from([0u8, 0, 0, 0])
            } else {
                IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Probe the kernel features and privileges the ruleset needs (throwaway table, nothing left).
pub fn preflight() -> Result<(), AgentError> {
    let mut probe = NetlinkApplier::with_table(crate::apply::preflight::PROBE_TABLE)?;
    crate::apply::preflight::check(&mut |tx| probe.apply(tx))?;
    Ok(())
}

/// Run the agent until SIGTERM/SIGINT. Rules stay in place on exit. The signal is honoured in
/// every phase, also while waiting for an API server that does not answer (kubelet would
/// otherwise wait out the whole grace period).
pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let config = args.config.clone();
    tokio::select! {
        r = run_until_stopped(args) => r,
        path = file_changed(config) => Err(AgentError::ConfigChanged(path)),
        _ = shutdown_signal() => {
            tracing::info!("shutting down; rules stay in place");
            Ok(())
        }
    }
}

/// Resolves when the file at `path` changes (content, or it appears or goes), like kube-proxy,
/// which exits so that it restarts with the new configuration; never without a path. Polled:
/// ConfigMap volumes change by a symlink swap that inotify on the file would miss.
async fn file_changed(path: Option<std::path::PathBuf>) -> std::path::PathBuf {
    let Some(path) = path else {
        return std::future::pending().await;
    };
    // A small file: a plain read on the runtime costs microseconds.
    let first = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if std::fs::read(&path).ok() != first {
            return path;
        }
    }
}

async fn run_until_stopped(args: RunArgs) -> Result<(), AgentError> {
    let cfg = args.proxy.proxy_config()?;
    tracing::info!(node = %cfg.node_name, "starting nftproxy");
    preflight()?;
    let applier = FaultInjecting {
        inner: NetlinkApplier::new()?,
        path: args.fault_inject_file.clone(),
    };
    if let Some(p) = &args.fault_inject_file {
        tracing::warn!(file = %p.display(), "fault injection enabled: commits fail while this file exists");
    }
    let conntrack: Box<dyn crate::conntrack::Conntrack> =
        match crate::conntrack::NetlinkConntrack::new() {
            Ok(c) => Box::new(c),
            Err(e) => {
                tracing::warn!(error = %e, "conntrack netlink unavailable; stale UDP flows will not be cleaned");
                Box::new(crate::conntrack::FakeConntrack::default())
            }
        };
    let (client, api) = client(args.kubeconfig.as_deref(), args.master.as_deref()).await?;
    let events = Events::start(client.clone(), &cfg.node_name);
    let metrics = Arc::new(Metrics::new());
    let status: SharedStatus = Arc::default();
    // Until the first sync, the start itself is the pending change (liveness covers a stuck start).
    status
        .lock()
        .map(|mut s| s.pending_since = Some(tokio::time::Instant::now()))
        .ok();
    let node_eligible = Arc::new(Mutex::new(true));
    let health = AgentHealth {
        status: status.clone(),
        sync_period: args.sync_period,
        node_eligible: node_eligible.clone(),
    };
    crate::observe::health::agent::serve(args.healthz_bind_address, health.clone())
        .await
        .map_err(|error| AgentError::Listen {
            addr: args.healthz_bind_address,
            error,
        })?;
    metrics::serve(args.metrics_bind_address, metrics.clone())
        .await
        .map_err(|error| AgentError::Listen {
            addr: args.metrics_bind_address,
            error,
        })?;

    let (changes_tx, changes_rx) = mpsc::channel(1);
    let lists_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    spawn_api_probe(api, status.clone(), lists_done.clone());
    let stores = watch::start(client, &cfg.node_name, changes_tx.clone()).await;
    {
        let (ready, done) = (stores.ready.clone(), lists_done);
        tokio::spawn(async move {
            while !ready.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    if !stores.wait_ready(args.initial_sync_timeout).await {
        tracing::warn!(timeout = ?args.initial_sync_timeout, "initial lists incomplete; serving health and waiting for them (existing rules stay)");
    }

    let triggers = Arc::new(Mutex::new(Triggers::default()));
    let latest: Arc<Mutex<Option<Arc<ProxyState>>>> = Arc::default();
    let probe = Arc::new(HealthProbe {
        health,
        metrics: metrics.clone(),
    });
    let health_servers: HealthServers = Arc::new(Mutex::new(HealthState {
        servers: Servers::new(TcpBinder { probe }, Vec::new()),
        wanted: BTreeMap::new(),
        failing: false,
        node: cfg.node_name.clone(),
    }));
    spawn_health_retry(health_servers.clone(), events.clone());
    let nodeport_ips: Arc<Mutex<Option<Vec<IpAddr>>>> = Arc::default();
    let sync_cfg = SyncConfig {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        ..SyncConfig::default()
    };
    let portid = applier.inner.portid();
    let mut syncer = Syncer::new(sync_cfg, applier, status);
    match spawn_monitor(portid) {
        Ok(rx) => syncer = syncer.with_monitor(rx),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to nftables change notifications; outside changes are found by the periodic check only")
        }
    }
    let mut observer = AgentObserver {
        metrics: metrics.clone(),
        health: health_servers,
        events: events.clone(),
        triggers: triggers.clone(),
        latest: latest.clone(),
        conntrack,
        applier: syncer.applier(),
        nodeport_ips: nodeport_ips.clone(),
        node: cfg.node_name.clone(),
    };
    spawn_counter_reader(syncer.applier(), latest, metrics.clone());

    let health_addrs_cell: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let mut ctx = DesiredCtx {
        stores,
        cfg,
        triggers,
        node_eligible,
        problems: ProblemLog::default(),
        metrics: metrics.clone(),
        events: events.clone(),
        health_addrs: health_addrs_cell.clone(),
        nodeport_ips,
        engine: crate::pipeline::Engine::default(),
    };
    let desired = move || ctx.compute();

    let sync = async move {
        struct WithAddrs<'a> {
            inner: &'a mut AgentObserver,
            addrs: Arc<Mutex<Vec<IpAddr>>>,
        }
        impl Observer for WithAddrs<'_> {
            fn applied(&mut self, r: &Report) {
                let addrs = self.addrs.lock().map(|a| a.clone()).unwrap_or_default();
                if let Ok(mut h) = self.inner.health.lock() {
                    // Moving every server to new addresses; failures are retried by reconcile.
                    let _ = h.servers.set_addrs(addrs);
                }
                self.inner.applied(r)
            }
            fn failed(&mut self, k: SyncKind, e: &str) {
                self.inner.failed(k, e)
            }
            fn drifted(&mut self, f: &[crate::sync::drift::Finding]) {
                self.inner.drifted(f)
            }
        }
        let mut obs = WithAddrs {
            inner: &mut observer,
            addrs: health_addrs_cell,
        };
        syncer.run(changes_rx, desired, &mut obs).await;
    };
    sync.await;
    drop(changes_tx);
    Ok(())
}

/// Everything the desired-state computation reads and updates.
struct DesiredCtx {
    stores: Stores,
    cfg: ProxyConfig,
    triggers: Arc<Mutex<Triggers>>,
    node_eligible: Arc<Mutex<bool>>,
    problems: ProblemLog,
    metrics: Arc<Metrics>,
    events: Events,
    health_addrs: Arc<Mutex<Vec<IpAddr>>>,
    nodeport_ips: Arc<Mutex<Option<Vec<IpAddr>>>>,
    engine: crate::pipeline::Engine,
}

impl DesiredCtx {
    fn compute(&mut self) -> Option<Desired> {
        if !self.stores.ready.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(
                "waiting for the initial lists of Services and EndpointSlices; existing rules stay"
            );
            return None;
        }
        let node = self
            .stores
            .node
            .state()
            .into_iter()
            .next()
            .map(|n| NodeInfo::from_node(&n))
            .unwrap_or_else(|| NodeInfo {
                name: self.cfg.node_name.clone(),
                ..Default::default()
            });
        if let Ok(mut e) = self.node_eligible.lock() {
            *e = !node.ineligible;
        }
        let (services, slices) = match self.stores.inbox.lock() {
            Ok(mut i) => (i.services.take(), i.slices.take()),
            Err(_) => return None,
        };
        if let Ok(mut t) = self.triggers.lock() {
            // Changes only: a relist's trigger times were programmed before (or by the start).
            t.scan(slices.changed.values().flatten());
        }
        let (relist, changed_services, changed_slices) = (
            services.replaced.is_some() || slices.replaced.is_some(),
            services.changed.len(),
            slices.changed.len(),
        );
        let mut found = Vec::new();
        let cidr_objs: Vec<_> = self
            .stores
            .service_cidrs
            .as_ref()
            .map(|s| s.state().into_iter().map(|o| (*o).clone()).collect())
            .unwrap_or_default();
        let cidrs = model::service_cidrs(&cidr_objs, &mut found);
        if let Ok(mut a) = self.health_addrs.lock() {
            *a = health_addrs(&self.cfg, &node);
        }
        if let Ok(mut n) = self.nodeport_ips.lock() {
            let nets = self.cfg.nodeport.resolve(&node);
            *n = nets
                .iter()
                .all(|n| n.prefix_len() == n.max_prefix_len())
                .then(|| nets.iter().map(|n| n.addr()).collect());
        }
        match self.engine.compute(
            services,
            slices,
            &node,
            &cidrs,
            &self.cfg.compile_config(&node),
        ) {
            Ok(out) => {
                tracing::debug!(
                    rebuilt = out.rebuilt,
                    relist,
                    services = out.changed,
                    changed_services,
                    changed_slices,
                    "desired state computed"
                );
                found.extend(out.problems);
                self.problems.report(found, &self.metrics, &self.events);
                Some(Desired {
                    ruleset: out.ruleset,
                    state: out.state,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot compile the ruleset (bug)");
                None
            }
        }
    }
}

/// Watch the kernel's nftables notifications on a thread of its own (the socket blocks) and
/// pass foreign changes of our tables to the sync loop.
fn spawn_monitor(
    own_portid: u32,
) -> Result<mpsc::Receiver<crate::apply::monitor::Notice>, nftproxy_nl::NlError> {
    let mut m = crate::apply::monitor::Monitor::open(crate::nft::ir::TABLE_NAME, own_portid)?;
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("nft-monitor".into())
        .spawn(move || loop {
            match m.wait() {
                Ok(n) => {
                    if tx.blocking_send(n).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nftables change monitor failed");
                    return;
                }
            }
        })
        .map_err(|source| nftproxy_nl::NlError::Io {
            op: "spawn monitor thread",
            source,
        })?;
    Ok(rx)
}

/// Retry health ports that could not be bound, every 5 s, without waiting for a sync.
fn spawn_health_retry(health: HealthServers, events: Events) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Ok(mut h) = health.lock() {
                if h.failing {
                    h.reconcile(&events);
                }
            }
        }
    });
}

/// Read the no-endpoint counters every 10 s (targeted set dumps, never the whole table).
fn spawn_counter_reader<A: Applier + 'static>(
    applier: Arc<Mutex<A>>,
    latest: Arc<Mutex<Option<Arc<ProxyState>>>>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        // Entry owners of the last state seen: rebuilt only when a sync changed the state.
        let mut cache: Option<(Arc<ProxyState>, Arc<metrics::Owners>)> = None;
        loop {
            tick.tick().await;
            let Some(state) = latest.lock().ok().and_then(|l| l.clone()) else {
                continue;
            };
            let owners = match &cache {
                Some((s, o)) if Arc::ptr_eq(s, &state) => o.clone(),
                _ => {
                    let o = Arc::new(metrics::entry_owners(&state));
                    cache = Some((state, o.clone()));
                    o
                }
            };
            let (a, m) = (applier.clone(), metrics.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
                for (f, own) in owners.iter() {
                    for (set, drops) in [
                        ("no-endpoint-drop", true),
                        ("nodeport-no-endpoint-drop", true),
                        ("no-endpoint-reject", false),
                        ("nodeport-no-endpoint-reject", false),
                    ] {
                        match a.list_elements(*f, set) {
                            Ok(els) => m.record_counters(*f, set, drops, &els, own),
                            Err(e) => tracing::debug!(set, error = %e, "cannot read counters"),
                        }
                    }
                }
            })
            .await;
        }
    });
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::node_a_state as state;

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
        let (_, a) = client(Some(&kc), None).await.expect("client");
        assert_eq!(
            (a.host.as_str(), a.port, &a.source),
            ("10.96.0.1", 443, &ApiSource::Kubeconfig)
        );
        let (_, a) = client(Some(&kc), Some("https://192.168.0.1:6443"))
            .await
            .expect("client");
        assert_eq!(
            (a.host.as_str(), a.port, &a.source),
            ("192.168.0.1", 6443, &ApiSource::Master)
        );
        assert!(client(Some(&kc), Some("not a url ::")).await.is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn health_wants_follow_changes_incrementally() {
        let mut objs = crate::testutil::cluster_objects();
        let before = state(&objs);
        let mut wanted = BTreeMap::new();
        update_wanted(&mut wanted, None, &before);
        assert_eq!(wanted, wanted_health(&before));
        assert!(!wanted.is_empty(), "the scenario has Local LoadBalancers");
        // Every slice loses its endpoints; some Service disappears.
        for s in objs.slices.iter_mut() {
            s.endpoints.clear();
        }
        let gone = wanted.keys().next().cloned().unwrap();
        objs.services
            .retain(|s| s.metadata.name.as_deref() != Some(gone.name.as_str()));
        let after = state(&objs);
        update_wanted(&mut wanted, Some(&before), &after);
        assert_eq!(wanted, wanted_health(&after));
        assert!(!wanted.contains_key(&gone));
        assert!(wanted.values().all(|w| w.local_endpoints == 0));
        assert!(affinity_lost(Some(&before), &after));
        assert!(!affinity_lost(Some(&after), &after));
    }
}
