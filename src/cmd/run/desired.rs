//! The desired state for the sync loop, from the watches' inbox.

use std::sync::Arc;

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
}

impl DesiredSource {
    pub fn compute(&mut self) -> Option<Desired> {
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
        let (services, slices) = {
            let mut i = lock(&self.stores.inbox);
            (i.services.take(), i.slices.take())
        };
        // Changes only: a relist's trigger times were programmed before (or by the start).
        let triggers = slices
            .changed
            .values()
            .flatten()
            .filter_map(|s| s.trigger)
            .collect();
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
