//! What the Node and the ServiceCIDR objects tell the proxy: this node's name, zone, addresses and
//! eligibility, and the cluster's Service CIDRs.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use crate::model::{self, Problem};
use crate::net::Family;

/// What the node tells us about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// InternalIP addresses, first per family is the primary one.
    pub internal_ips: Vec<IpAddr>,
    /// Deletion in progress or marked for removal by the cluster autoscaler.
    pub ineligible: bool,
    /// `spec.podCIDRs` (else `spec.podCIDR`): this node's pod addresses (detect-local NodeCIDR).
    pub pod_cidrs: Vec<IpNet>,
}

pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeInfo {
    pub fn from_node(node: &Node) -> NodeInfo {
        let name = node.metadata.name.clone().unwrap_or_default();
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(model::ZONE_LABEL))
            .cloned();
        let mut internal_ips = Vec::new();
        for a in node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
        {
            if a.type_ == "InternalIP" {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    internal_ips.push(ip);
                }
            }
        }
        let tainted = node
            .spec
            .iter()
            .flat_map(|s| s.taints.iter().flatten())
            .any(|t| t.key == AUTOSCALER_TAINT);
        let spec = node.spec.as_ref();
        let mut raw: Vec<&String> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .map(|c| c.iter().collect())
            .unwrap_or_default();
        if raw.is_empty() {
            raw.extend(spec.and_then(|s| s.pod_cidr.as_ref()));
        }
        NodeInfo {
            name,
            zone,
            internal_ips,
            ineligible: node.metadata.deletion_timestamp.is_some() || tainted,
            pod_cidrs: raw
                .into_iter()
                .filter_map(|c| c.parse::<IpNet>().ok().map(|n| n.trunc()))
                .collect(),
        }
    }

    pub fn primary(&self, f: Family) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == f)
    }
}

/// Service CIDRs from ServiceCIDR objects (spec.cidrs).
pub fn service_cidrs(objs: &[ServiceCIDR], problems: &mut Vec<Problem>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for o in objs {
        for raw in o.spec.iter().flat_map(|s| s.cidrs.iter().flatten()) {
            match raw.parse::<IpNet>() {
                Ok(n) => out.push(n.trunc()),
                Err(_) => problems.push(Problem {
                    object: model::ObjectRef::new(
                        "ServiceCIDR",
                        "",
                        o.metadata.name.as_deref().unwrap_or(""),
                    ),
                    reason: format!("bad CIDR {raw:?} skipped"),
                }),
            }
        }
    }
    out
}
