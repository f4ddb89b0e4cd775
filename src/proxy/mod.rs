//! Endpoint choice and the desired proxy state. Pure: snapshot in, `ProxyState` out.
//!
//! This follows upstream kube-proxy's `CategorizeEndpoints` exactly (topology only when every
//! ready endpoint carries hints and one is hinted for us; terminating fallback; local selection
//! ignores topology).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Endpoint, PortEndpoints, PortKey, ServicePort};
use crate::net::Family;

/// An endpoint address chosen for the data path.
pub type Backend = (IpAddr, u16);

/// Which topology filter applies to a service port's cluster endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    Node,
    Zone,
}

fn topology_mode(eps: &[Endpoint], node: &str, zone: Option<&str>) -> Topology {
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    for ep in eps.iter().filter(|e| e.ready) {
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == node) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)) {
            for_zone = true;
        }
    }
    if all_node_hints && for_node {
        return Topology::Node;
    }
    if all_zone_hints && for_zone {
        return Topology::Zone;
    }
    Topology::None
}

/// The outcome of endpoint choice for one service port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chosen {
    /// Endpoints for traffic that may go anywhere in the cluster.
    pub cluster: Vec<Backend>,
    /// Endpoints on this node (only computed when a Local policy needs them).
    pub local: Vec<Backend>,
    /// Some endpoint anywhere can serve (decides drop vs reject when the chosen set is empty).
    pub has_any: bool,
    /// Ready (not terminating) local endpoints: what the health check port reports.
    pub local_ready: usize,
}

/// Upstream's CategorizeEndpoints for one service port.
pub fn choose(sp: &ServicePort, eps: &[Endpoint], node: &str, zone: Option<&str>) -> Chosen {
    // Even with externalTrafficPolicy Local, cluster endpoints serve the pod and node short-circuits.
    let uses_cluster = !sp.internal_local || sp.has_external_entries();
    let uses_local = sp.internal_local || sp.external_local;
    let mut out = Chosen::default();
    let backends = |f: &dyn Fn(&Endpoint) -> bool| -> Vec<Backend> {
        let set: BTreeSet<Backend> = eps
            .iter()
            .filter(|e| f(e))
            .map(|e| (e.ip, e.port))
            .collect();
        set.into_iter().collect()
    };
    if uses_cluster {
        let topo = topology_mode(eps, node, zone);
        let available = |e: &Endpoint| match topo {
            Topology::None => true,
            Topology::Node => e.node_hints.iter().any(|n| n == node),
            Topology::Zone => zone.is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
        };
        out.cluster = backends(&|e| e.ready && available(e));
        if out.cluster.is_empty() {
            out.cluster = backends(&|e| e.serving && e.terminating);
        }
    }
    // Upstream's pre-scan for Local policies counts serving+terminating endpoints anywhere too
    // (pkg/proxy/topology.go, CategorizeEndpoints): with only those elsewhere, Local traffic
    // here is dropped (someone could serve it), not rejected.
    out.has_any = !out.cluster.is_empty()
        || eps
            .iter()
            .any(|e| e.ready || (uses_local && e.serving && e.terminating));
    out.local_ready = eps
        .iter()
        .filter(|e| e.local && e.ready)
        .map(|e| (e.ip, e.port))
        .collect::<BTreeSet<_>>()
        .len();
    if uses_local {
        out.local = if out.local_ready > 0 {
            backends(&|e| e.local && e.ready)
        } else {
            backends(&|e| e.local && e.serving && e.terminating)
        };
    }
    out
}

/// Everything the data path needs for one service port in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortState {
    pub sp: ServicePort,
    pub chosen: Chosen,
    /// Every endpoint IP of this port on this node (hairpin masquerade).
    pub local_ips: Vec<IpAddr>,
}

/// The proxy state of one family.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FamilyState {
    /// Persistent map: a snapshot of the state is a cheap copy, and the diff of two snapshots
    /// (what the observers act on after a sync) visits only what changed.
    /// Values are shared: copying a tree node on the first change after a snapshot then costs
    /// reference counts, not deep copies of 64 port states.
    pub ports: imbl::OrdMap<PortKey, std::sync::Arc<PortState>>,
    /// Service CIDRs of this family (from ServiceCIDR objects); unallocated IPs in them are dropped.
    pub service_cidrs: Vec<IpNet>,
}

/// The desired proxy state: what compile turns into a ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyState {
    pub families: BTreeMap<Family, FamilyState>,
}

/// Build one port's state from its Service port and the merged endpoints of its Service.
pub fn port_state(
    sp: &ServicePort,
    endpoints: Option<&PortEndpoints>,
    node: &str,
    zone: Option<&str>,
) -> PortState {
    let empty = Vec::new();
    let eps = endpoints
        .and_then(|m| m.get(&(sp.key.port_name.clone(), sp.key.proto)))
        .unwrap_or(&empty);
    let chosen = choose(sp, eps, node, zone);
    let local_ips = eps
        .iter()
        .filter(|e| e.local)
        .map(|e| e.ip)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    PortState {
        sp: sp.clone(),
        chosen,
        local_ips,
    }
}

#[cfg(test)]
mod tests;
