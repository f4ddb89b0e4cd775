//! The agent's observer of the sync loop: turns each [`Report`] into metrics, health-check
//! servers, programming latency, stale UDP conntrack cleanup and Warning Events. It reads Reports
//! and the counters the loop hands it; it never touches nftables.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use imbl::ordmap::DiffItem;

use crate::conntrack::Conntrack;
use crate::k8s::events::{Events, Warning};
use crate::lock::lock;
use crate::model::{ObjectRef, ServiceName};
use crate::net::Family;
use crate::observe::health::agent::AgentHealth;
use crate::observe::health::service::{Probe, Servers, TcpBinder, Wanted};
use crate::observe::metrics::{self, Metrics};
use crate::proxy::ProxyState;
use crate::sync::{Counters, Observer, Report, SyncError, SyncKind};

/// Problems are logged once per (object, reason), not on every sync.
#[derive(Default)]
pub struct ProblemLog {
    seen: BTreeSet<(ObjectRef, String)>,
}

impl ProblemLog {
    pub fn report(
        &mut self,
        problems: Vec<crate::model::Problem>,
        metrics: &Metrics,
        events: &Events,
    ) {
        let now: BTreeSet<(ObjectRef, String)> =
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

pub struct HealthProbe {
    pub health: AgentHealth,
    pub metrics: Arc<Metrics>,
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

pub type HealthServers = Arc<Mutex<HealthState>>;

/// The health servers and what they should serve (kept to retry failed binds between syncs).
pub struct HealthState {
    pub servers: Servers<TcpBinder<HealthProbe>>,
    pub wanted: BTreeMap<ServiceName, Wanted>,
    pub failing: bool,
    pub node: String,
}

impl HealthState {
    pub fn reconcile(&mut self, events: &Events) {
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

/// What the agent does with each sync's [`Report`]: metrics, health servers, programming
/// latency, stale UDP conntrack entries, Warning Events. It reads Reports only.
pub struct AgentObserver {
    pub metrics: Arc<Metrics>,
    pub health: HealthServers,
    /// Whether this node takes new traffic, for /healthz (from the Report's node facts).
    pub node_eligible: Arc<Mutex<bool>>,
    pub events: Events,
    pub conntrack: Box<dyn Conntrack>,
    pub node: String,
    /// Entry owners of the last state whose counters were read (rebuilt when the state moves).
    pub owners: Option<(Arc<ProxyState>, Arc<metrics::Owners>)>,
    /// What the last commit applied, for the debug endpoints (None: they are off).
    pub applied: Option<crate::observe::debug::SharedApplied>,
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
        if let Some(a) = &self.applied {
            *lock(a) = Some(crate::observe::debug::Applied {
                ruleset: r.ruleset.clone(),
                state: r.state.clone(),
                node: r.node.info.clone(),
            });
        }
        let now = SystemTime::now();
        for t in &r.triggers {
            if let Ok(d) = now.duration_since(*t) {
                self.metrics.programmed(d);
            }
        }
        *lock(&self.node_eligible) = !r.node.ineligible;
        {
            let mut h = lock(&self.health);
            // Moving every server to new addresses; failures are retried by reconcile.
            let _ = h.servers.set_addrs(r.node.health_addrs.clone());
            update_wanted(&mut h.wanted, r.previous.as_deref(), &r.state);
            h.reconcile(&self.events);
        }
        let nodeport_ips = r.node.nodeport_ips.clone();
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
    fn failed(&mut self, error: &SyncError) {
        self.metrics.record_failure(error);
    }
    fn cleanup_failed(&mut self, _error: &str) {
        self.metrics.affinity_cleanup_failures.inc();
        self.metrics.kp.cleanup_failures.inc();
    }
    fn queued(&mut self) {
        self.metrics.queued();
    }
    fn checked(&mut self) {
        self.metrics.checked();
    }
    fn counters(&mut self, read: &[Counters], state: &Arc<ProxyState>) {
        let owners = match &self.owners {
            Some((s, o)) if Arc::ptr_eq(s, state) => o.clone(),
            _ => {
                let o = Arc::new(metrics::entry_owners(state));
                self.owners = Some((state.clone(), o.clone()));
                o
            }
        };
        for c in read {
            if let Some(own) = owners.get(&c.family) {
                self.metrics
                    .record_counters(c.family, c.set, c.drops, &c.elements, own);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::node_a_state as state;

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
    }
}
