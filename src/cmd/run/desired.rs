//! The desired state for the sync loop, from the watches' inbox.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::k8s::events::Events;
use crate::k8s::watch::Stores;
use crate::lock::lock;
use crate::model::{self, NodeInfo};
use crate::observe::agent::ProblemLog;
use crate::observe::metrics::Metrics;
use crate::pipeline::config::ProxyConfig;
use crate::pipeline::Engine;
use crate::sync::{Changes, Desired, NodeFacts};

/// The sync loop's source of desired states: takes what the watches delivered from the inbox,
/// runs the incremental pipeline on it and reports the problems it found.
pub struct DesiredSource {
    pub stores: Stores,
    pub cfg: ProxyConfig,
    pub problems: ProblemLog,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    /// Shared with the debug endpoints, which read the model's endpoints from it.
    pub engine: Arc<std::sync::Mutex<Engine>>,
    /// When the agent started: older EndpointSlice trigger times are not this agent's to
    /// measure (upstream's tracker start time), also when the first list hands its slices
    /// over as changes.
    pub started: SystemTime,
}

/// This node as the model sees it (its name alone until the Node is known).
fn node_info(stores: &Stores, cfg: &ProxyConfig) -> NodeInfo {
    stores
        .node
        .state()
        .into_iter()
        .next()
        .map(|n| NodeInfo::from_node(&n))
        .unwrap_or_else(|| NodeInfo {
            name: cfg.node_name.clone(),
            ..Default::default()
        })
}

fn service_cidrs(stores: &Stores, found: &mut Vec<model::Problem>) -> Vec<IpNet> {
    let objs: Vec<_> = stores
        .service_cidrs
        .as_ref()
        .map(|s| s.state().into_iter().map(|o| (*o).clone()).collect())
        .unwrap_or_default();
    model::service_cidrs(&objs, found)
}

/// How often the first lists' new objects are modelled and compiled while they arrive.
const ABSORB_PERIOD: Duration = Duration::from_millis(20);
/// EndpointSlices (with their Services) modelled and compiled in one piece while the first
/// lists arrive (about 0.1 s of work): once the lists are complete, the first sync waits for
/// one piece at most.
const ABSORB_PIECE: usize = 4000;

/// While the first Service and EndpointSlice lists arrive, model and compile what came so far
/// every [`ABSORB_PERIOD`] (off the async workers, which are reading the lists), so that once
/// the lists are complete the first sync computes only the last objects instead of all of
/// them. Waits for the Node and ServiceCIDRs first: the model computed against others would be
/// computed again. Ends when the lists are complete; the sync loop takes everything after.
pub async fn absorb_first_lists(
    stores: Stores,
    cfg: ProxyConfig,
    engine: Arc<std::sync::Mutex<Engine>>,
) {
    let ready = || stores.ready.load(std::sync::atomic::Ordering::SeqCst);
    let (mut absorbed, mut rounds) = (0usize, 0u32);
    let mut more = false;
    while !ready() {
        if !more {
            tokio::time::sleep(ABSORB_PERIOD).await;
        }
        if ready() || !*stores.others_listed.borrow() {
            more = false;
            continue;
        }
        let (s, c, e) = (stores.clone(), cfg.clone(), engine.clone());
        match tokio::task::spawn_blocking(move || absorb_once(&s, &c, &e)).await {
            Ok((n, rest)) => {
                absorbed += n;
                rounds += u32::from(n > 0);
                more = rest;
            }
            Err(e) => {
                tracing::error!(error = %e, "modelling the first lists failed (bug); the first sync computes everything");
                return;
            }
        }
    }
    tracing::debug!(
        services = absorbed,
        rounds,
        "modelled while the first lists arrived"
    );
}

/// Take a piece of what the watches delivered and absorb it into the engine: the Services
/// brought up to date, and whether more is waiting.
fn absorb_once(
    stores: &Stores,
    cfg: &ProxyConfig,
    engine: &std::sync::Mutex<Engine>,
) -> (usize, bool) {
    let (services, slices, rest) = {
        let mut i = lock(&stores.inbox);
        if i.slices.is_empty() {
            return (0, false);
        }
        let (s, e) = i.take_piece(ABSORB_PIECE);
        (s, e, !i.slices.is_empty())
    };
    let node = node_info(stores, cfg);
    // Problems are reported by the first sync, which reads them all from the model.
    let cidrs = service_cidrs(stores, &mut Vec::new());
    // The output is dropped: only the engine's state is wanted.
    match lock(engine).compute(services, slices, &node, &cidrs, &cfg.compile_config(&node)) {
        Ok(out) => (out.changed, rest),
        Err(e) => {
            // The engine then compiles everything at the first sync.
            tracing::error!(error = %e, "cannot compile the first lists (bug)");
            (0, rest)
        }
    }
}

impl DesiredSource {
    pub fn compute(&mut self) -> Option<Desired> {
        if !self.stores.ready.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(
                "waiting for the initial lists of Services and EndpointSlices; existing rules stay"
            );
            return None;
        }
        let node = node_info(&self.stores, &self.cfg);
        let (services, slices) = {
            let mut i = lock(&self.stores.inbox);
            (i.services.take(), i.slices.take())
        };
        // Changes only: a relist's trigger times were programmed before, and those older than
        // the agent were programmed by someone else (also when the first list's slices come
        // as changes).
        let triggers = slices
            .changed
            .values()
            .flatten()
            .filter_map(|s| s.trigger)
            .filter(|t| *t >= self.started)
            .collect();
        let (relist, changed_services, changed_slices) = (
            services.replaced.is_some() || slices.replaced.is_some(),
            services.changed.len(),
            slices.changed.len(),
        );
        let mut found = Vec::new();
        let cidrs = service_cidrs(&self.stores, &mut found);
        let facts = NodeFacts {
            ineligible: node.ineligible,
            health_addrs: self.cfg.health_addrs(&node),
            nodeport_ips: self.cfg.nodeport_ips(&node),
            info: node.clone(),
        };
        match lock(&self.engine).compute(
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
                    node: facts,
                    triggers,
                    changes: Changes {
                        services: changed_services,
                        slices: changed_slices,
                    },
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot compile the ruleset (bug)");
                None
            }
        }
    }
}
