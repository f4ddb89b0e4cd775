//! `nftproxy run`: wires the watchers, the sync loop, the kernel, the health servers and metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::apply::netlink::NetlinkApplier;
use crate::apply::{Applier, FaultInjecting};
use crate::cmd::args::RunArgs;
use crate::conntrack::{Conntrack, DisabledConntrack, NetlinkConntrack};
use crate::k8s::client::{client, unreachable_api_message, ApiAddress};
use crate::k8s::events::Events;
use crate::k8s::watch;
use crate::lock::lock;
use crate::observe::agent::{AgentObserver, HealthProbe, HealthServers, HealthState, ProblemLog};
use crate::observe::health::agent::AgentHealth;
use crate::observe::health::service::{Servers, TcpBinder};
use crate::observe::metrics::{self, Metrics};
use crate::pipeline::Engine;
use crate::sync::{SharedStatus, SyncConfig, Syncer};

mod desired;
use desired::DesiredSource;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(#[from] crate::cmd::args::ConfigError),
    #[error(transparent)]
    Client(#[from] crate::k8s::client::ClientError),
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
            lock(&status).bootstrap = message;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        lock(&status).bootstrap = None;
    });
}

/// Set the conntrack sysctls as kube-proxy does at start. A failure (a container without the
/// privilege, /proc/sys or /sys read-only, a network namespace that is not the node's) is an
/// error line and a Warning event on the Node, not a reason to stop proxying.
fn set_conntrack_sysctls(args: &RunArgs, events: &Events, node: &str) {
    if let Err(e) = conntrack_sysctls(args) {
        events.warn(crate::k8s::events::Warning {
            kind: "Node".into(),
            namespace: String::new(),
            name: node.to_string(),
            reason: "FailedToSetConntrackSysctls".into(),
            note: e.to_string(),
        });
    }
}

/// Set the conntrack sysctls, logging each change (or the error).
pub fn conntrack_sysctls(args: &RunArgs) -> Result<(), crate::conntrack::sysctl::SysctlError> {
    use crate::conntrack::sysctl::{cpus, Sysctls};
    match Sysctls::node().apply(&args.conntrack(), cpus()) {
        Ok(applied) => {
            for c in applied.changes {
                tracing::info!(sysctl = %c.file, from = c.from, to = c.to, "set conntrack sysctl");
            }
            if let Some(why) = applied.skipped {
                tracing::warn!("conntrack table size not set: {why}");
            }
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "conntrack sysctls not set");
            Err(e)
        }
    }
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
    tracing::info!(node = %cfg.node_name, version = env!("CARGO_PKG_VERSION"), "starting nftproxy");
    // Once, as /configz serves it: what this agent runs with after file, flags and defaults.
    tracing::info!(config = %args.configz(&cfg)["kubeproxy.config.k8s.io"], "effective configuration");
    preflight()?;
    let applier = FaultInjecting {
        inner: NetlinkApplier::new()?,
        path: args.fault_inject_file.clone(),
    };
    if let Some(p) = &args.fault_inject_file {
        tracing::warn!(file = %p.display(), "fault injection enabled: commits fail while this file exists");
    }
    let conntrack: Box<dyn Conntrack> = match NetlinkConntrack::new() {
        Ok(c) => Box::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "conntrack netlink unavailable; stale UDP flows will not be cleaned");
            Box::new(DisabledConntrack)
        }
    };
    let metrics = Arc::new(Metrics::new());
    let (client, api) = client(
        args.kubeconfig.as_deref(),
        args.master.as_deref(),
        Some(metrics.clone()),
        Some(args.rate_limit()),
    )
    .await?;
    let events = Events::start(client.clone(), &cfg.node_name);
    set_conntrack_sysctls(&args, &events, &cfg.node_name);
    let status: SharedStatus = Arc::default();
    // Until the first sync, the start itself is the pending change (liveness covers a stuck start).
    lock(&status).pending_since = Some(tokio::time::Instant::now());
    let node_eligible = Arc::new(Mutex::new(true));
    let health = AgentHealth {
        status: status.clone(),
        sync_period: args.sync_period,
        node_eligible: node_eligible.clone(),
        metrics: Some(metrics.clone()),
    };
    let hard_fail = args.bind_address_hard_fail;
    let h = health.clone();
    listen(args.healthz_bind_address, hard_fail, "health", move |l| {
        crate::observe::health::agent::serve(l, h);
    })
    .await?;
    let (m, configz) = (metrics.clone(), args.configz(&cfg));
    listen(args.metrics_bind_address, hard_fail, "metrics", move |l| {
        metrics::serve(l, m, configz);
    })
    .await?;

    let (changes_tx, changes_rx) = mpsc::channel(1);
    let lists_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    spawn_api_probe(api, status.clone(), lists_done.clone());
    let started = std::time::SystemTime::now();
    let listing = match args.initial_lists {
        crate::cmd::args::InitialLists::Auto => watch::Listing::Streaming,
        crate::cmd::args::InitialLists::Paging => watch::Listing::Paging,
    };
    let encoding = args
        .kube_api_content_type
        .unwrap_or(watch::Encoding::Protobuf);
    let stores = watch::start(
        client,
        &cfg.node_name,
        listing,
        encoding,
        changes_tx.clone(),
    )
    .await;
    let engine = Arc::new(Mutex::new(Engine::default()));
    tokio::spawn(desired::absorb_first_lists(
        stores.clone(),
        cfg.clone(),
        engine.clone(),
    ));
    {
        let (ready, done) = (stores.ready.clone(), lists_done);
        tokio::spawn(async move {
            while !ready.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    events.started(&cfg.node_name);
    if !stores.wait_ready(args.initial_sync_timeout).await {
        tracing::warn!(timeout = ?args.initial_sync_timeout, "initial lists incomplete; serving health and waiting for them (existing rules stay)");
    }

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
    let sync_cfg = SyncConfig {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        counter_period: Some(Duration::from_secs(10)),
        split_elements: args.max_transaction_elements,
        ..SyncConfig::default()
    };
    let portid = applier.inner.portid();
    let mut syncer = Syncer::new(sync_cfg, applier, status);
    match spawn_monitor(portid) {
        Ok((rx, switch)) => {
            syncer = syncer
                .with_monitor(rx)
                .with_quiet_switch(std::sync::Arc::new(switch), crate::sync::QUIET_ELEMENTS)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to nftables change notifications; outside changes are found by the periodic check only")
        }
    }
    let mut observer = AgentObserver {
        metrics: metrics.clone(),
        health: health_servers,
        node_eligible,
        events: events.clone(),
        conntrack,
        node: cfg.node_name.clone(),
        owners: None,
        applied: None,
    };
    if !args.debug_socket.as_os_str().is_empty() {
        let applied: crate::observe::debug::SharedApplied = Arc::default();
        observer.applied = Some(applied.clone());
        let e = engine.clone();
        let debug = crate::observe::debug::Debug {
            applied,
            cfg: cfg.clone(),
            endpoints: Arc::new(move |s, f| lock(&e).endpoints(s, f)),
            metrics: metrics.clone(),
        };
        // Explaining is a convenience: without the socket the agent still proxies.
        match crate::observe::debug::serve(&args.debug_socket, debug) {
            Ok(()) => {
                tracing::info!(socket = %args.debug_socket.display(), "debug endpoints (explain, services, report, ruleset) on the local socket")
            }
            Err(e) => tracing::warn!(error = %e, "no debug endpoints"),
        }
    }
    let mut source = DesiredSource {
        stores,
        cfg,
        problems: ProblemLog::default(),
        metrics,
        events,
        engine,
        started,
    };
    syncer
        .run(changes_rx, move || source.compute(), &mut observer)
        .await;
    drop(changes_tx);
    Ok(())
}

/// Watch the kernel's nftables notifications on a thread of its own (the socket blocks) and
/// pass foreign changes of our tables to the sync loop.
fn spawn_monitor(
    own_portid: u32,
) -> Result<
    (
        mpsc::Receiver<crate::apply::monitor::Notice>,
        crate::apply::monitor::Listening,
    ),
    nftproxy_nl::NlError,
> {
    let mut m = crate::apply::monitor::Monitor::open(crate::nft::ir::TABLE_NAME, own_portid)?;
    let switch = m.switch();
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
    Ok((rx, switch))
}

/// kube-proxy's policy for its health and metrics ports (kubernetes
/// `cmd/kube-proxy/app/server.go`, serveHealthz / serveMetrics: `wait.Until(..., 5s)`, and an
/// error that ends the process only with bindAddressHardFail): a port that cannot be bound is
/// logged and retried every 5 s. That is what lets nftproxy start next to a running kube-proxy
/// during a migration (both want :10256 and :10249 on the node) and take the ports over once
/// kube-proxy is gone.
async fn listen(
    addr: std::net::SocketAddr,
    hard_fail: bool,
    what: &'static str,
    serve: impl FnOnce(tokio::net::TcpListener) + Send + 'static,
) -> Result<(), AgentError> {
    let error = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            serve(l);
            return Ok(());
        }
        Err(error) if hard_fail => return Err(AgentError::Listen { addr, error }),
        Err(error) => error,
    };
    tracing::error!(
        %addr,
        error = %error,
        "{what} server: cannot listen; retrying every 5 s (is kube-proxy still running on this \
         node? --bind-address-hard-fail exits instead)"
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(%addr, "{what} server: listening now");
                    serve(l);
                    return;
                }
                Err(e) => tracing::debug!(%addr, error = %e, "{what} server: still cannot listen"),
            }
        }
    });
    Ok(())
}

/// Retry health ports that could not be bound, every 5 s, without waiting for a sync.
fn spawn_health_retry(health: HealthServers, events: Events) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let mut h = lock(&health);
            if h.failing {
                h.reconcile(&events);
            }
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

    /// A port another process holds (kube-proxy during a migration): the default retries and
    /// serves once the port is free; --bind-address-hard-fail ends the start instead.
    #[tokio::test(start_paused = true)]
    async fn a_busy_port_is_retried_unless_hard_fail() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        assert!(matches!(
            listen(addr, true, "test", |_| {}).await,
            Err(AgentError::Listen { .. })
        ));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        listen(addr, false, "test", move |l| {
            let _ = tx.send(l.local_addr().ok());
        })
        .await
        .expect("soft failure");
        assert!(rx.try_recv().is_err(), "served while the port was taken");
        drop(holder);
        let served = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("listening within one retry");
        assert_eq!(served, Some(Some(addr)));
    }
}
