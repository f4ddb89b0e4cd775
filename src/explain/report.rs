//! `services` (the Services as programmed on this node) and `report` (per Service and access
//! path, what happens to the client's address). Both ask [`explain`] about representative flows,
//! so they can never disagree with it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    explain_indexed, fmt_addr, port_label, EntryIndex, Explanation, Flow, Verdict, Via, View,
};
use crate::model::Endpoint;
use crate::net::Family;
use crate::proxy::PortState;

/// Filters of `nftproxy services`.
#[derive(Debug, Clone, Default)]
pub struct ServicesQuery {
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Only Services with something wrong.
    pub problems: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCounts {
    /// Ready, on this node.
    pub local: usize,
    /// Ready, on other nodes.
    pub remote: usize,
    /// Terminating (serving or not).
    pub terminating: usize,
    /// Neither ready nor terminating.
    pub not_ready: usize,
}

/// One Service port in one family, as programmed on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceLine {
    pub namespace: String,
    pub name: String,
    /// `http 80/tcp` (or `80/tcp` when unnamed).
    pub port: String,
    pub family: String,
    pub cluster_ip: String,
    pub node_port: Option<u16>,
    /// The node addresses that take the NodePort.
    pub node_port_addresses: Vec<String>,
    pub load_balancer_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub external_traffic_policy: String,
    pub internal_traffic_policy: String,
    /// ClientIP affinity timeout in seconds.
    pub session_affinity_seconds: Option<u32>,
    pub source_ranges: Vec<String>,
    pub endpoints: EndpointCounts,
    /// What cluster-wide traffic may reach, and what Local traffic on this node may reach.
    pub cluster_endpoints: Vec<String>,
    pub local_endpoints: Vec<String>,
    pub health_check_node_port: Option<u16>,
    /// What the health check answers now: `200 (2 local endpoints)` / `503 (0 local endpoints)`.
    pub health_check: Option<String>,
    /// Packets dropped / rejected for lack of (local) endpoints (live agent only).
    pub dropped: Option<u64>,
    pub rejected: Option<u64>,
    /// For a client outside the cluster: `kept`, `replaced by ADDR`, `dropped here: no local
    /// endpoint`, `rejected: no endpoint`, `dropped: source range`, or `no external entry`.
    pub client_ip_from_outside: String,
    pub problems: Vec<String>,
}

/// A client address from outside that is no pod and no node address (documentation ranges).
fn outside_client(view: &View<'_>, f: Family) -> IpAddr {
    let cands: [IpAddr; 3] = match f {
        Family::Ip => [
            IpAddr::from([203, 0, 113, 99]),
            IpAddr::from([198, 51, 100, 99]),
            IpAddr::from([192, 0, 2, 199]),
        ],
        Family::Ip6 => [
            "2001:db8:ffff::99"
                .parse()
                .unwrap_or(IpAddr::from([0u16; 8])),
            "2001:db8:fffe::99"
                .parse()
                .unwrap_or(IpAddr::from([0u16; 8])),
            "2001:db8:fffd::99"
                .parse()
                .unwrap_or(IpAddr::from([0u16; 8])),
        ],
    };
    let cluster = view.cfg.local_cidrs(view.node);
    cands
        .into_iter()
        .find(|a| !cluster.iter().any(|n| n.contains(a)) && !view.local_addrs.contains(a))
        .unwrap_or(cands[0])
}

/// A pod address on this node: the first host of its pod CIDR (else of the cluster CIDR).
fn pod_client(view: &View<'_>, f: Family) -> Option<IpAddr> {
    let fam = |n: &&ipnet::IpNet| n.addr().is_ipv4() == (f == Family::Ip);
    let net = view
        .node
        .pod_cidrs
        .iter()
        .find(fam)
        .or_else(|| view.cfg.cluster_cidrs.iter().find(fam))?;
    net.hosts().nth(9)
}

fn counts(eps: &[Endpoint]) -> EndpointCounts {
    let mut c = EndpointCounts::default();
    for e in eps {
        if e.ready && e.local {
            c.local += 1;
        } else if e.ready {
            c.remote += 1;
        } else if e.terminating {
            c.terminating += 1;
        } else {
            c.not_ready += 1;
        }
    }
    c
}

/// The outcome for the client address in a few words.
fn client_ip(ex: &Explanation, src: IpAddr) -> String {
    match ex.verdict {
        Verdict::Forward => match &ex.source_seen_by_endpoint {
            Some(s) if *s == src.to_string() => "kept".into(),
            Some(s) => format!("replaced by {s}"),
            None => "replaced by a node address".into(),
        },
        Verdict::Drop => {
            if ex
                .steps
                .iter()
                .any(|s| s.text.contains("loadBalancerSourceRanges"))
            {
                "dropped: not in loadBalancerSourceRanges".into()
            } else {
                "dropped here: no local endpoint".into()
            }
        }
        Verdict::Reject => "rejected: no endpoint".into(),
        Verdict::NotAService => "not handled".into(),
    }
}

fn nodeport_targets(view: &View<'_>, f: Family) -> Vec<IpAddr> {
    view.cfg
        .nodeport
        .resolve(view.node)
        .iter()
        .filter(|n| n.addr().is_ipv4() == (f == Family::Ip))
        .map(|n| {
            if n.prefix_len() == n.max_prefix_len() {
                n.addr()
            } else {
                view.local_addrs
                    .iter()
                    .copied()
                    .find(|a| n.contains(a))
                    .unwrap_or(n.addr())
            }
        })
        .collect()
}

fn flow(src: IpAddr, dst: IpAddr, port: u16, ps: &PortState, via: Via) -> Flow {
    Flow {
        src,
        src_port: None,
        dst,
        port,
        proto: ps.sp.key.proto,
        via: Some(via),
    }
}

/// The first external entry point of a port (LB IP, external IP, NodePort on a node address).
fn outside_entry(view: &View<'_>, ps: &PortState, f: Family) -> Option<(IpAddr, u16)> {
    ps.sp
        .lb_ips
        .first()
        .or_else(|| ps.sp.external_ips.first())
        .map(|ip| (*ip, ps.sp.port))
        .or_else(|| {
            let np = ps.sp.node_port?;
            nodeport_targets(view, f).first().map(|a| (*a, np))
        })
}

/// The Services as programmed on this node, one line per Service port and family.
pub fn services(view: &View<'_>, q: &ServicesQuery) -> Vec<ServiceLine> {
    let index = EntryIndex::new(view.state);
    let mut out = Vec::new();
    for (f, fs) in &view.state.families {
        for ps in fs.ports.values() {
            let sp = &ps.sp;
            if q.namespace
                .as_ref()
                .is_some_and(|n| *n != sp.key.service.namespace)
                || q.name.as_ref().is_some_and(|n| *n != sp.key.service.name)
            {
                continue;
            }
            let eps = (view.endpoints)(&sp.key.service, *f)
                .remove(&(sp.key.port_name.clone(), sp.key.proto))
                .unwrap_or_default();
            let client = match outside_entry(view, ps, *f) {
                Some((dst, port)) => {
                    let src = outside_client(view, *f);
                    client_ip(
                        &explain_indexed(view, &index, &flow(src, dst, port, ps, Via::Outside)),
                        src,
                    )
                }
                None => "no external entry".into(),
            };
            let mut problems = Vec::new();
            if ps.chosen.cluster.is_empty() && ps.chosen.local.is_empty() {
                problems.push("no usable endpoint: traffic is rejected".to_string());
            }
            if sp.external_local && sp.has_external_entries() && ps.chosen.local.is_empty() {
                problems.push(format!(
                    "externalTrafficPolicy Local and no ready endpoint on {}: outside traffic is dropped here",
                    view.node.name
                ));
            }
            if sp.internal_local && ps.chosen.local.is_empty() {
                problems.push(format!(
                    "internalTrafficPolicy Local and no endpoint on {}: ClusterIP traffic from here fails",
                    view.node.name
                ));
            }
            if !sp.lb_ips.is_empty() && !sp.external_local {
                problems.push(
                    "load balancer IP without a health check (externalTrafficPolicy Cluster): the client address is replaced".into(),
                );
            }
            if q.problems && problems.is_empty() {
                continue;
            }
            let counters = view.counters.map(|c| c(&sp.key.service)).unwrap_or(None);
            out.push(ServiceLine {
                namespace: sp.key.service.namespace.clone(),
                name: sp.key.service.name.clone(),
                port: if sp.key.port_name.is_empty() {
                    format!("{}/{}", sp.port, sp.key.proto.keyword())
                } else {
                    format!(
                        "{} {}/{}",
                        sp.key.port_name,
                        sp.port,
                        sp.key.proto.keyword()
                    )
                },
                family: match f {
                    Family::Ip => "IPv4",
                    Family::Ip6 => "IPv6",
                }
                .into(),
                cluster_ip: sp.cluster_ip.to_string(),
                node_port: sp.node_port,
                node_port_addresses: if sp.node_port.is_some() {
                    nodeport_targets(view, *f)
                        .iter()
                        .map(|a| a.to_string())
                        .collect()
                } else {
                    Vec::new()
                },
                load_balancer_ips: sp.lb_ips.iter().map(|a| a.to_string()).collect(),
                external_ips: sp.external_ips.iter().map(|a| a.to_string()).collect(),
                external_traffic_policy: if sp.external_local {
                    "Local"
                } else {
                    "Cluster"
                }
                .into(),
                internal_traffic_policy: if sp.internal_local {
                    "Local"
                } else {
                    "Cluster"
                }
                .into(),
                session_affinity_seconds: sp.affinity_secs,
                source_ranges: sp.source_ranges.iter().map(|n| n.to_string()).collect(),
                endpoints: counts(&eps),
                cluster_endpoints: ps
                    .chosen
                    .cluster
                    .iter()
                    .map(|(a, p)| fmt_addr(*a, *p))
                    .collect(),
                local_endpoints: ps
                    .chosen
                    .local
                    .iter()
                    .map(|(a, p)| fmt_addr(*a, *p))
                    .collect(),
                health_check_node_port: sp.health_check_node_port,
                health_check: sp.health_check_node_port.map(|_| {
                    let n = ps.chosen.local_ready;
                    format!(
                        "{} ({n} local endpoint{})",
                        if n > 0 { 200 } else { 503 },
                        if n == 1 { "" } else { "s" }
                    )
                }),
                dropped: counters.map(|c| c.0),
                rejected: counters.map(|c| c.1),
                client_ip_from_outside: client,
                problems,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.port, &a.family).cmp(&(
            &b.namespace,
            &b.name,
            &b.port,
            &b.family,
        ))
    });
    out
}

/// One access path of one Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRow {
    /// `namespace/name:port/protocol`.
    pub service: String,
    /// `outside -> LB IP 192.0.2.10:80`, `pod -> ClusterIP`, `hairpin`, ...
    pub path: String,
    /// `kept`, `replaced by ADDR`, `dropped here: no local endpoint`, ...
    pub client_ip: String,
    pub verdict: Verdict,
    /// Something an operator should look at, in a sentence.
    pub flag: Option<String>,
}

/// Per Service port and access path: is the client address kept, replaced (by what) or dropped
/// on this node?
pub fn report(view: &View<'_>) -> Vec<ReportRow> {
    let index = EntryIndex::new(view.state);
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (f, fs) in &view.state.families {
        let outside = outside_client(view, *f);
        let pod = pod_client(view, *f);
        let node_ip = view.node.primary(*f);
        for ps in fs.ports.values() {
            let sp = &ps.sp;
            let label = port_label(ps);
            if !seen.insert((label.clone(), *f)) {
                continue;
            }
            let mut paths: Vec<(String, Flow)> = Vec::new();
            for ip in &sp.lb_ips {
                paths.push((
                    format!("outside -> LB IP {}", fmt_addr(*ip, sp.port)),
                    flow(outside, *ip, sp.port, ps, Via::Outside),
                ));
                if let Some(p) = pod {
                    paths.push((
                        format!("pod -> LB IP {}", fmt_addr(*ip, sp.port)),
                        flow(p, *ip, sp.port, ps, Via::Pod),
                    ));
                }
            }
            if let Some(np) = sp.node_port {
                for a in nodeport_targets(view, *f).into_iter().take(1) {
                    paths.push((
                        format!("outside -> NodePort {}", fmt_addr(a, np)),
                        flow(outside, a, np, ps, Via::Outside),
                    ));
                }
            }
            for ip in &sp.external_ips {
                paths.push((
                    format!("outside -> external IP {}", fmt_addr(*ip, sp.port)),
                    flow(outside, *ip, sp.port, ps, Via::Outside),
                ));
            }
            if let Some(p) = pod {
                paths.push((
                    format!("pod -> ClusterIP {}", fmt_addr(sp.cluster_ip, sp.port)),
                    flow(p, sp.cluster_ip, sp.port, ps, Via::Pod),
                ));
            }
            if let Some(n) = node_ip {
                paths.push((
                    format!("node -> ClusterIP {}", fmt_addr(sp.cluster_ip, sp.port)),
                    flow(n, sp.cluster_ip, sp.port, ps, Via::Node),
                ));
            }
            if let Some(ep) = ps.local_ips.first() {
                paths.push((
                    format!("hairpin: endpoint {ep} -> its own ClusterIP"),
                    flow(*ep, sp.cluster_ip, sp.port, ps, Via::Pod),
                ));
            }
            for (path, fl) in paths {
                let ex = explain_indexed(view, &index, &fl);
                let mut client = client_ip(&ex, fl.src);
                if path.starts_with("hairpin") && ex.verdict == Verdict::Forward {
                    client = match ex.sources_by_endpoint.iter().find(|(e, _)| {
                        e.starts_with(&format!("{}:", fl.src))
                            || e.starts_with(&format!("[{}]:", fl.src))
                    }) {
                        Some((_, s)) => format!("to itself: replaced by {s}"),
                        None => client,
                    };
                }
                let outside_path = path.starts_with("outside");
                let flag = if outside_path && ex.verdict == Verdict::Drop && sp.external_local {
                    Some(format!(
                        "externalTrafficPolicy Local and no ready endpoint on {}: outside clients sent here are dropped{}",
                        view.node.name,
                        sp.health_check_node_port
                            .map(|h| format!(" (the health check on :{h} answers 503: the load balancer must use it)"))
                            .unwrap_or_default()
                    ))
                } else if outside_path && ex.masquerade && sp.key.proto == crate::net::Proto::Udp {
                    Some("UDP from outside is masqueraded: STUN, QUIC, SIP and DNS servers see a node address".into())
                } else if outside_path && path.contains("LB IP") && !sp.external_local {
                    Some(
                        "load balancer IP without a health check (externalTrafficPolicy Cluster)"
                            .into(),
                    )
                } else {
                    None
                };
                out.push(ReportRow {
                    service: label.clone(),
                    path,
                    client_ip: client,
                    verdict: ex.verdict,
                    flag,
                });
            }
        }
    }
    out
}
