//! What this node does with a flow, and why: `explain`, `services` and `report`.
//!
//! Nothing here decides anything. The verdict, the endpoints and the masquerade come from the
//! packet tracer run over the ruleset as applied (the IR the sync loop committed, or what
//! `render` would commit offline); the Service a set element belongs to comes from compile's
//! own entry keys; the endpoints chosen come from the proxy state (upstream's endpoint choice,
//! `proxy::choose`); the endpoint conditions come from the model's merge of the Service's
//! EndpointSlices. This module only puts those facts into words, naming the nftables element and
//! the Kubernetes field behind each step.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, NodeInfo, PortEndpoints, ServiceName};
use crate::net::{Family, Proto};
use crate::nft::ir::{Action, Ruleset, Value};
use crate::nft::names;
use crate::pipeline::config::ProxyConfig;
use crate::proxy::{PortState, ProxyState};
use crate::trace::{Hop, Origin, Outcome, Packet, Traced, Tracer};

mod report;
pub use report::{report, services, ReportRow, ServiceLine, ServicesQuery};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("--from {0:?}: expected IP or IP:PORT ([v6]:PORT)")]
    From(String),
    #[error("--to {0:?}: expected IP:PORT[/tcp|udp|sctp] ([v6]:PORT for IPv6)")]
    To(String),
    #[error("--via {0:?}: expected pod, node or outside")]
    Via(String),
    #[error("--from {0} and --to {1} are of different IP families")]
    Families(IpAddr, IpAddr),
}

/// Where the flow enters the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// From a pod on this node (arrives on a pod interface).
    Pod,
    /// From a process on the node itself.
    Node,
    /// From outside: another host, a load balancer, a pod on another node.
    Outside,
}

impl std::str::FromStr for Via {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Via, ExplainError> {
        match s {
            "pod" => Ok(Via::Pod),
            "node" => Ok(Via::Node),
            "outside" => Ok(Via::Outside),
            other => Err(ExplainError::Via(other.to_string())),
        }
    }
}

/// The first packet of a connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// None: worked out from the source address.
    pub via: Option<Via>,
}

fn split_port(s: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((ip, None));
    }
    let sa: std::net::SocketAddr = s.parse().ok()?;
    Some((sa.ip(), Some(sa.port())))
}

impl Flow {
    /// `--from IP[:PORT] --to IP:PORT[/proto] [--via pod|node|outside]`.
    pub fn parse(from: &str, to: &str, via: Option<&str>) -> Result<Flow, ExplainError> {
        let (src, src_port) = split_port(from).ok_or_else(|| ExplainError::From(from.into()))?;
        let (addr, proto) = match to.rsplit_once('/') {
            Some((a, p)) => (
                a,
                crate::nft::template::parse_proto(p).ok_or_else(|| ExplainError::To(to.into()))?,
            ),
            None => (to, Proto::Tcp),
        };
        let (dst, port) = match split_port(addr) {
            Some((ip, Some(port))) => (ip, port),
            _ => return Err(ExplainError::To(to.into())),
        };
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(ExplainError::Families(src, dst));
        }
        Ok(Flow {
            src,
            src_port,
            dst,
            port,
            proto,
            via: via.map(str::parse).transpose()?,
        })
    }
}

/// Packets (dropped, rejected) for lack of (local) endpoints, per Service.
pub type CountersOf<'a> = dyn Fn(&ServiceName) -> Option<(u64, u64)> + 'a;

/// What the node knows, as applied: the ruleset and proxy state the sync loop committed (or, offline,
/// what `render` would commit), the node and the agent's settings.
pub struct View<'a> {
    pub ruleset: &'a Ruleset,
    pub state: &'a ProxyState,
    pub node: &'a NodeInfo,
    pub cfg: &'a ProxyConfig,
    /// Every address of this node (what `fib daddr type local` matches). Offline: its
    /// InternalIPs.
    pub local_addrs: &'a [IpAddr],
    /// A Service's endpoints in one family as its EndpointSlices list them (the model's merge).
    pub endpoints: &'a dyn Fn(&ServiceName, Family) -> PortEndpoints,
    /// The source address the node's masquerade gives a packet to this endpoint (the address
    /// of the interface the route leaves by). Offline: the node's primary address.
    pub masquerade_source: &'a dyn Fn(IpAddr) -> Option<IpAddr>,
    /// Packets dropped and rejected for a Service for lack of (local) endpoints, from the
    /// agent's counter reads (None offline).
    pub counters: Option<&'a CountersOf<'a>>,
}

/// EndpointSlices grouped by their Service once (offline answers ask for one Service's
/// endpoints per port: a scan of every slice each time would make `services` quadratic).
pub struct SlicesByService<'s> {
    by: std::collections::HashMap<
        ServiceName,
        Vec<&'s k8s_openapi::api::discovery::v1::EndpointSlice>,
    >,
}

impl<'s> SlicesByService<'s> {
    pub fn new(
        slices: impl IntoIterator<Item = &'s k8s_openapi::api::discovery::v1::EndpointSlice>,
    ) -> SlicesByService<'s> {
        let mut by: std::collections::HashMap<ServiceName, Vec<_>> = Default::default();
        for s in slices {
            let Some(name) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::model::SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let svc = ServiceName {
                namespace: s
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                name: name.clone(),
            };
            by.entry(svc).or_default().push(s);
        }
        // Slices in name order, as the pipeline merges them.
        for v in by.values_mut() {
            v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        SlicesByService { by }
    }

    /// A Service's endpoints in one family: the model's reading of each slice and its merge.
    pub fn endpoints(&self, node: &str, svc: &ServiceName, f: Family) -> PortEndpoints {
        let mut ignored = Vec::new();
        let infos: Vec<crate::model::SliceInfo> = self
            .by
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|s| crate::model::slice_info(s, node, &mut ignored))
            .filter(|i| i.family == f)
            .collect();
        crate::model::merge_slices(&infos)
    }
}

/// Offline: what `render` would program for these objects on `node`, as a [`View`] (local
/// addresses: the node's InternalIPs; masquerade source: its primary address).
pub fn offline<R>(
    objs: &crate::k8s::objects::Objects,
    cfg: &ProxyConfig,
    node: &NodeInfo,
    f: impl FnOnce(&View<'_>) -> R,
) -> Result<R, crate::nft::compile::CompileError> {
    let fs = crate::pipeline::from_objects(objs, cfg, node)?;
    let slices = SlicesByService::new(&objs.slices);
    let endpoints = |svc: &ServiceName, fam: Family| slices.endpoints(&node.name, svc, fam);
    let masq = |ep: IpAddr| {
        node.primary(if ep.is_ipv4() {
            Family::Ip
        } else {
            Family::Ip6
        })
    };
    let view = View {
        ruleset: &fs.ruleset,
        state: &fs.state,
        node,
        cfg,
        local_addrs: &node.internal_ips,
        endpoints: &endpoints,
        masquerade_source: &masq,
        counters: None,
    };
    Ok(f(&view))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Forward,
    Drop,
    Reject,
    NotAService,
}

/// One step of the decision path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub text: String,
    /// The nftables object that decided it: `set clusterip element 10.96.0.10 . tcp . 80`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft: Option<String>,
    /// The Kubernetes field (or agent setting) behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

fn step(text: String, nft: Option<String>, field: Option<&str>) -> Step {
    Step {
        text,
        nft,
        field: field.map(str::to_string),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The flow as understood: `203.0.113.5 -> 192.0.2.10:80/tcp (outside)`.
    pub flow: String,
    pub node: String,
    pub verdict: Verdict,
    /// `namespace/name:port/protocol` (the port's name, or its number when unnamed).
    pub service: Option<String>,
    /// `IP:PORT` of every endpoint this flow can reach.
    pub endpoints: Vec<String>,
    /// The source address the endpoint sees (when every endpoint sees the same one).
    pub source_seen_by_endpoint: Option<String>,
    /// Per endpoint, the source address it sees (hairpin makes them differ).
    pub sources_by_endpoint: BTreeMap<String, String>,
    /// Endpoints the kernel sends this flow to whose answers cannot come back: unmasqueraded
    /// traffic that arrived from another host, sent on to an endpoint on another host, is
    /// answered straight to the client, which drops the reply (not the address it called).
    #[serde(default)]
    pub unreachable_endpoints: Vec<String>,
    pub masquerade: bool,
    pub steps: Vec<Step>,
    pub advice: Option<String>,
}

fn fmt_addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Addr(a) => a.to_string(),
        Value::Prefix(n) => n.to_string(),
        Value::Proto(p) => p.keyword().to_string(),
        Value::Port(p) => p.to_string(),
        Value::Slot(s) => s.to_string(),
        Value::Ifname(n) => format!("\"{n}\""),
    }
}

fn fmt_key(k: &[Value]) -> String {
    k.iter().map(fmt_value).collect::<Vec<_>>().join(" . ")
}

fn element(set: &str, key: &[Value]) -> Option<String> {
    Some(format!("set {set} element {}", fmt_key(key)))
}

/// The port's display name: `ns/name:http/tcp`, or `ns/name:80/tcp` when unnamed.
pub fn port_label(ps: &PortState) -> String {
    let name = if ps.sp.key.port_name.is_empty() {
        ps.sp.port.to_string()
    } else {
        ps.sp.key.port_name.clone()
    };
    format!(
        "{}:{}/{}",
        ps.sp.key.service,
        name,
        ps.sp.key.proto.keyword()
    )
}

/// Sets whose keys are a service port's entry keys (compile's `entry_keys`).
const ENTRY_SETS: &[&str] = &[
    names::CLUSTERIP,
    names::CLUSTERIP_LOCAL,
    names::EXTERNAL,
    names::EXTERNAL_LOCAL,
    names::NODEPORT,
    names::NODEPORT_LOCAL,
    names::FIREWALL,
    names::NO_ENDPOINT_REJECT,
    names::NO_ENDPOINT_DROP,
    names::NODEPORT_NO_ENDPOINT_REJECT,
    names::NODEPORT_NO_ENDPOINT_DROP,
];

/// Which port state an entry key belongs to (compile's own entry keys decide), and which
/// Service has a ClusterIP: built once per answer, so that `services` and `report`, which explain
/// a flow per Service port, stay linear in the number of ports.
pub struct EntryIndex<'a> {
    entries: std::collections::HashMap<(Family, Vec<Value>), &'a PortState>,
    cluster_ips: std::collections::HashMap<IpAddr, &'a PortState>,
}

impl<'a> EntryIndex<'a> {
    pub fn new(state: &'a ProxyState) -> EntryIndex<'a> {
        let mut entries = std::collections::HashMap::new();
        let mut cluster_ips = std::collections::HashMap::new();
        for (f, fs) in &state.families {
            for ps in fs.ports.values() {
                for k in crate::nft::compile::entry_keys(&ps.sp) {
                    entries.entry((*f, k)).or_insert(ps.as_ref());
                }
                cluster_ips.entry(ps.sp.cluster_ip).or_insert(ps.as_ref());
            }
        }
        EntryIndex {
            entries,
            cluster_ips,
        }
    }

    fn owner(&self, f: Family, key: &[Value]) -> Option<&'a PortState> {
        self.entries.get(&(f, key.to_vec())).copied()
    }

    fn by_cluster_ip(&self, ip: IpAddr) -> Option<&'a PortState> {
        self.cluster_ips.get(&ip).copied()
    }
}

fn infer_via(view: &View<'_>, flow: &Flow) -> Via {
    let elsewhere = !view.node.pod_cidrs.is_empty()
        && !view.node.pod_cidrs.iter().any(|n| n.contains(&flow.src));
    if view.local_addrs.contains(&flow.src) {
        Via::Node
    } else if elsewhere {
        // A pod address of another node: it reaches this node from outside.
        Via::Outside
    } else if view
        .cfg
        .local_cidrs(view.node)
        .iter()
        .any(|n| n.contains(&flow.src))
    {
        Via::Pod
    } else {
        Via::Outside
    }
}

/// An interface name the node's pods would send from (interface detection modes), or a name
/// that is no pod interface.
fn iif_for(view: &View<'_>, via: Via) -> String {
    let pod = view
        .cfg
        .local_ifaces()
        .first()
        .map(|i| i.replace('*', "0"))
        .filter(|i| !i.is_empty());
    match via {
        Via::Node => String::new(),
        Via::Pod => pod.unwrap_or_else(|| "pod0".into()),
        Via::Outside => {
            let prefix = view.cfg.pod_interface.as_str();
            if !prefix.is_empty() && "eth0".starts_with(prefix) {
                "uplink0".into()
            } else {
                "eth0".into()
            }
        }
    }
}

/// What kind of entry point `dst` is for this port.
fn entry_kind(ps: &PortState, dst: IpAddr, nodeport: bool) -> (&'static str, &'static str) {
    if nodeport {
        ("NodePort", "spec.ports[].nodePort")
    } else if ps.sp.cluster_ip == dst {
        ("ClusterIP", "spec.clusterIPs")
    } else if ps.sp.lb_ips.contains(&dst) {
        (
            "load balancer IP",
            "status.loadBalancer.ingress[].ip (ipMode VIP)",
        )
    } else {
        ("external IP", "spec.externalIPs")
    }
}

fn etp(ps: &PortState) -> &'static str {
    if ps.sp.external_local {
        "Local"
    } else {
        "Cluster"
    }
}

/// Why each endpoint is or is not among the candidates.
fn endpoint_steps(
    ps: &PortState,
    eps: &[Endpoint],
    local_set: bool,
    chosen: &BTreeSet<(IpAddr, u16)>,
) -> Vec<Step> {
    let any_ready = eps.iter().any(|e| e.ready);
    let any_local_ready = eps.iter().any(|e| e.ready && e.local);
    let mut out = Vec::new();
    let which = if local_set {
        "this node's endpoints"
    } else {
        "endpoints anywhere in the cluster"
    };
    out.push(step(
        format!(
            "the EndpointSlices of {} list {} endpoint(s) for this port; this flow may use {which}",
            ps.sp.key.service,
            eps.len(),
        ),
        None,
        Some("EndpointSlice endpoints[].conditions, nodeName"),
    ));
    for e in eps {
        let at = fmt_addr(e.ip, e.port);
        let place = if e.local {
            "on this node"
        } else {
            "on another node"
        };
        let why = if chosen.contains(&(e.ip, e.port)) {
            if e.ready {
                format!("candidate: ready, {place}")
            } else {
                format!("candidate: terminating but still serving, {place} (no ready endpoint {}, so terminating ones take the traffic)", if local_set { "on this node" } else { "anywhere" })
            }
        } else if local_set && !e.local {
            format!("not used: {place}, and this traffic may only use this node's endpoints")
        } else if !(e.ready || e.serving && e.terminating) {
            format!("not used: not ready ({place})")
        } else if !e.ready {
            let ready_exists = if local_set {
                any_local_ready
            } else {
                any_ready
            };
            if ready_exists {
                format!("not used: terminating ({place}); terminating endpoints serve only when none is ready")
            } else {
                format!("not used: terminating ({place})")
            }
        } else if !e.zone_hints.is_empty() || !e.node_hints.is_empty() {
            format!(
                "not used: topology hints send it elsewhere (zones {:?}, nodes {:?}; {place})",
                e.zone_hints, e.node_hints
            )
        } else {
            format!("not used ({place})")
        };
        out.push(step(format!("  {at}: {why}"), None, None));
    }
    out
}

/// Explain one flow on this node.
pub fn explain(view: &View<'_>, flow: &Flow) -> Explanation {
    explain_indexed(view, &EntryIndex::new(view.state), flow)
}

/// [`explain`] with an index built once for many flows.
pub fn explain_indexed(view: &View<'_>, index: &EntryIndex<'_>, flow: &Flow) -> Explanation {
    let family = if flow.dst.is_ipv4() {
        Family::Ip
    } else {
        Family::Ip6
    };
    let via = flow.via.unwrap_or_else(|| infer_via(view, flow));
    let via_word = match via {
        Via::Pod => "pod",
        Via::Node => "node",
        Via::Outside => "outside",
    };
    let flow_text = format!(
        "{} -> {}/{} (from {via_word})",
        match flow.src_port {
            Some(p) => fmt_addr(flow.src, p),
            None => flow.src.to_string(),
        },
        fmt_addr(flow.dst, flow.port),
        flow.proto.keyword()
    );
    let mut ex = Explanation {
        flow: flow_text,
        node: view.node.name.clone(),
        verdict: Verdict::NotAService,
        service: None,
        endpoints: Vec::new(),
        source_seen_by_endpoint: None,
        sources_by_endpoint: BTreeMap::new(),
        unreachable_endpoints: Vec::new(),
        masquerade: false,
        steps: Vec::new(),
        advice: None,
    };
    let origin_text = match via {
        Via::Pod => format!(
            "the packet comes from a pod on node {} (source {})",
            view.node.name, flow.src
        ),
        Via::Node => format!(
            "the packet is sent by a process on node {} (source {})",
            view.node.name, flow.src
        ),
        Via::Outside => format!(
            "the packet arrives at node {} from outside it (source {})",
            view.node.name, flow.src
        ),
    };
    ex.steps.push(step(origin_text, None, None));
    let Some(table) = view.ruleset.tables.get(&family) else {
        ex.steps.push(step(
            format!(
                "this node programs no {} table: nothing handles this flow",
                family.keyword()
            ),
            None,
            None,
        ));
        return ex;
    };
    let local: Vec<IpAddr> = view
        .local_addrs
        .iter()
        .copied()
        .filter(|a| a.is_ipv4() == flow.dst.is_ipv4())
        .collect();
    let tracer = Tracer::new(family, table, &local);
    let packet = Packet {
        origin: if via == Via::Node {
            Origin::Local
        } else {
            Origin::Remote
        },
        src: flow.src,
        dst: flow.dst,
        proto: flow.proto,
        dport: flow.port,
        iif: iif_for(view, via),
    };
    let traced = tracer.trace_paths(&packet);
    let Some(first) = traced.first() else {
        return ex;
    };

    // The Service: the first entry-set element on the path (compile's entry keys say whose).
    let mut ps: Option<&PortState> = None;
    let mut nodeport = false;
    for h in &first.path {
        for (set, key, negate) in &h.lookups {
            if *negate {
                continue;
            }
            if ENTRY_SETS.contains(&set.as_str()) && ps.is_none() {
                ps = index.owner(family, key);
                nodeport |= key.len() == 2;
            }
        }
    }
    let unknown_port = first.path.iter().any(|h| {
        h.lookups
            .iter()
            .any(|(s, _, n)| s == names::CLUSTER_IPS && !n)
    });
    if ps.is_none() && unknown_port {
        if let Some(other) = index.by_cluster_ip(flow.dst) {
            ex.service = Some(other.sp.key.service.to_string());
        }
    }
    if let Some(p) = ps {
        ex.service = Some(port_label(p));
    }

    // The decision path, hop by hop (the first path; where paths differ, at the endpoint
    // choice, the candidates are listed together).
    let mut masq_reason_given = false;
    let mut picked_local = false;
    for h in &first.path {
        if let Some(s) = describe(view, flow, h, ps, nodeport, &mut picked_local) {
            if s.text.starts_with("marked for masquerade") {
                masq_reason_given = true;
            }
            ex.steps.push(s);
        }
        if h.dnat.is_some() {
            break;
        }
    }

    let outcomes: Vec<&Traced> = traced.iter().collect();
    let accepted: Vec<(IpAddr, u16, bool)> = outcomes
        .iter()
        .filter_map(|t| match t.outcome {
            Outcome::Accept {
                dst,
                port,
                masquerade,
            } => Some((dst, port, masquerade)),
            _ => None,
        })
        .collect();
    let dnat = first.path.iter().any(|h| h.dnat.is_some());
    ex.verdict = if outcomes.iter().any(|t| t.outcome == Outcome::Reject) {
        Verdict::Reject
    } else if outcomes.iter().any(|t| t.outcome == Outcome::Drop) {
        Verdict::Drop
    } else if dnat {
        Verdict::Forward
    } else {
        Verdict::NotAService
    };

    if ex.verdict == Verdict::Forward {
        if let Some(p) = ps {
            let chosen: BTreeSet<(IpAddr, u16)> = if picked_local {
                p.chosen.local.iter().copied().collect()
            } else {
                p.chosen.cluster.iter().copied().collect()
            };
            let eps = (view.endpoints)(&p.sp.key.service, family)
                .remove(&(p.sp.key.port_name.clone(), p.sp.key.proto))
                .unwrap_or_default();
            ex.steps
                .extend(endpoint_steps(p, &eps, picked_local, &chosen));
        }
        let slots = first
            .path
            .iter()
            .find_map(|h| h.dnat.as_ref().map(|(k, _, _)| (h, k.clone())));
        let cands: BTreeSet<(IpAddr, u16)> = accepted.iter().map(|(a, p, _)| (*a, *p)).collect();
        if let Some((h, key)) = slots {
            let map = match &h.action {
                Action::DnatMap { map, .. } => map.clone(),
                _ => String::new(),
            };
            let entry = fmt_key(&key[..key.len().saturating_sub(1)]);
            ex.steps.push(step(
                format!(
                    "one of {} endpoint(s) is chosen at random for each new connection: {}",
                    cands.len(),
                    cands
                        .iter()
                        .map(|(a, p)| fmt_addr(*a, *p))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some(format!(
                    "map {map} elements {entry} . 0..{} (numgen random mod {})",
                    cands.len().saturating_sub(1),
                    cands.len()
                )),
                None,
            ));
        }
        if let Some(secs) = ps.and_then(|p| p.sp.affinity_secs) {
            let amap = if nodeport {
                names::NP_AFFINITY
            } else {
                names::IP_AFFINITY
            };
            ex.steps.push(step(
                format!(
                    "sessionAffinity ClientIP: later connections from {} within {secs} s go to the endpoint this one got",
                    flow.src
                ),
                Some(format!("map {amap} (written by chain {})", names::AFFINITY_UPDATE)),
                Some("spec.sessionAffinity, spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
            ));
        }
        for (a, p, m) in &accepted {
            let seen = if *m {
                (view.masquerade_source)(*a)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "a node address".into())
            } else {
                flow.src.to_string()
            };
            ex.sources_by_endpoint.insert(fmt_addr(*a, *p), seen);
        }
        // Asymmetric return path: arrived from another host, not masqueraded, sent on to
        // another host. The endpoint answers the client directly (a pod address, or whatever
        // route that host has), so the client sees a reply from an address it did not call.
        let remote_unmasqueraded: BTreeSet<(IpAddr, u16)> = if via == Via::Outside {
            accepted
                .iter()
                .filter(|(a, _, m)| {
                    !*m && *a != flow.src && ps.is_some_and(|p| !p.local_ips.contains(a))
                })
                .map(|(a, p, _)| (*a, *p))
                .collect()
        } else {
            BTreeSet::new()
        };
        if !remote_unmasqueraded.is_empty() {
            let list: Vec<String> = remote_unmasqueraded
                .iter()
                .map(|(a, p)| fmt_addr(*a, *p))
                .collect();
            ex.steps.push(step(
                format!(
                    "{} on another node would answer {} directly, not through this node: the client drops that reply, so connections that land there fail (the short-circuit for pod sources assumes the pod runs on this node)",
                    list.join(", "),
                    flow.src
                ),
                None,
                Some("detectLocalMode / --cluster-cidr"),
            ));
            ex.unreachable_endpoints = list;
        }
        ex.endpoints = cands
            .iter()
            .filter(|c| !remote_unmasqueraded.contains(c))
            .map(|(a, p)| fmt_addr(*a, *p))
            .collect();
        let seen: BTreeSet<&String> = ex.sources_by_endpoint.values().collect();
        if seen.len() == 1 {
            ex.source_seen_by_endpoint = seen.into_iter().next().cloned();
        }
        // Masquerade as the non-hairpin endpoints get it (hairpin is said separately).
        let hairpin: BTreeSet<(IpAddr, u16)> = accepted
            .iter()
            .filter(|(a, _, m)| *m && *a == flow.src)
            .map(|(a, p, _)| (*a, *p))
            .collect();
        ex.masquerade = accepted
            .iter()
            .filter(|(a, p, _)| !hairpin.contains(&(*a, *p)))
            .any(|(_, _, m)| *m)
            || (!accepted.is_empty() && accepted.iter().all(|(_, _, m)| *m));
        if ex.masquerade {
            let to = ex
                .source_seen_by_endpoint
                .clone()
                .unwrap_or_else(|| "the node's address toward each endpoint".into());
            if !masq_reason_given {
                ex.steps
                    .push(step("marked for masquerade".into(), None, None));
            }
            ex.steps.push(step(
                format!(
                    "after the endpoint is chosen, the source {} is replaced by {to} (masquerade fully-random): the endpoint does not see the client's address",
                    flow.src
                ),
                Some(format!("chain {} (mark 0x{:x})", names::MASQUERADING, 1u32 << view.cfg.masquerade_bit)),
                None,
            ));
        } else {
            ex.steps.push(step(
                format!("the source address is kept: the endpoint sees {}", flow.src),
                None,
                None,
            ));
        }
        for (a, p) in &hairpin {
            let seen = ex
                .sources_by_endpoint
                .get(&fmt_addr(*a, *p))
                .cloned()
                .unwrap_or_default();
            ex.steps.push(step(
                format!(
                    "hairpin: if the connection lands on {} (the client itself), its source is replaced by {seen} so that the reply comes back through the node",
                    fmt_addr(*a, *p)
                ),
                element(names::HAIRPIN, &[Value::Addr(*a), Value::Addr(*a)]),
                None,
            ));
        }
    } else {
        // Drop, reject or nothing: the hops above said why; say so when nothing matched.
        if ex.verdict == Verdict::NotAService && ex.service.is_none() {
            ex.steps.push(step(
                format!(
                    "no Service on this node has {}/{}: nftproxy does not touch the packet; the node routes or delivers it as usual",
                    fmt_addr(flow.dst, flow.port),
                    flow.proto.keyword()
                ),
                None,
                Some("spec.clusterIPs, spec.externalIPs, status.loadBalancer.ingress, spec.ports[].nodePort"),
            ));
        }
    }
    ex.advice = advice(view, flow, via, &ex, ps, nodeport);
    ex
}

/// One hop in words; None for hops that decide nothing worth saying.
fn describe(
    view: &View<'_>,
    flow: &Flow,
    h: &Hop,
    ps: Option<&PortState>,
    nodeport: bool,
    picked_local: &mut bool,
) -> Option<Step> {
    let svc = ps.map(|p| p.sp.key.service.to_string()).unwrap_or_default();
    let first_lookup = h
        .lookups
        .iter()
        .find(|(_, _, n)| !n)
        .map(|(s, k, _)| (s, k));
    let negated = h.lookups.iter().find(|(_, _, n)| *n);
    let to = fmt_addr(flow.dst, flow.port);
    let proto = flow.proto.keyword();
    match (h.chain.as_str(), &h.action) {
        (names::SERVICES, Action::Goto(target)) => {
            let (set, key) = first_lookup?;
            let p = ps?;
            let (kind, field) = entry_kind(p, flow.dst, false);
            let policy = match target.as_str() {
                names::CLUSTERIP => "internalTrafficPolicy Cluster".to_string(),
                names::CLUSTERIP_LOCAL => "internalTrafficPolicy Local".to_string(),
                _ => format!("externalTrafficPolicy {}", etp(p)),
            };
            Some(step(
                format!("{to}/{proto} is the {kind} of {} ({policy})", port_label(p)),
                element(set, key),
                Some(field),
            ))
        }
        (names::SERVICES, Action::Jump(t)) if t == names::NODEPORTS => Some(step(
            format!(
                "{} is an address of this node that takes NodePorts",
                flow.dst
            ),
            element(names::NODEPORT_ADDRS, &[Value::Addr(flow.dst)]),
            Some("--nodeport-addresses / nodePortAddresses"),
        )),
        (names::NODEPORTS, Action::Goto(_)) => {
            let (set, key) = first_lookup?;
            let p = ps?;
            Some(step(
                format!(
                    "port {}/{proto} is the NodePort of {} (externalTrafficPolicy {})",
                    flow.port,
                    port_label(p),
                    etp(p)
                ),
                element(set, key),
                Some("spec.ports[].nodePort, spec.externalTrafficPolicy"),
            ))
        }
        (_, Action::Jump(t)) if t == names::MARK_FOR_MASQUERADE => {
            let why = match (h.chain.as_str(), negated) {
                (names::CLUSTERIP | names::CLUSTERIP_LOCAL, Some((s, _, _)))
                    if s == names::CLUSTER_CIDRS =>
                {
                    format!(
                        "marked for masquerade: the source {} is not a pod address (not in {}), so replies must come back through this node",
                        flow.src,
                        fmt_nets(&view.cfg.local_cidrs(view.node))
                    )
                }
                (names::CLUSTERIP | names::CLUSTERIP_LOCAL, Some((s, _, _)))
                    if s == names::LOCAL_IFACES =>
                {
                    "marked for masquerade: the packet did not come in on a pod interface, so replies must come back through this node".to_string()
                }
                (names::CLUSTERIP | names::CLUSTERIP_LOCAL, None) => {
                    "marked for masquerade: --masquerade-all".to_string()
                }
                (names::EXTERNAL, _) | (names::NODEPORT_CLUSTER, _) => format!(
                    "marked for masquerade: externalTrafficPolicy Cluster sends outside traffic to any endpoint and replaces its source with the node's address ({svc})"
                ),
                _ => format!(
                    "marked for masquerade: the source {} is this node itself",
                    flow.src
                ),
            };
            let field = match (h.chain.as_str(), negated) {
                (_, Some((s, _, _))) if s == names::CLUSTER_CIDRS => {
                    Some("--cluster-cidr / clusterCIDR, detectLocalMode")
                }
                (_, Some(_)) => Some("detectLocalMode, detectLocal.*"),
                (names::EXTERNAL, _) | (names::NODEPORT_CLUSTER, _) => {
                    Some("spec.externalTrafficPolicy")
                }
                (names::CLUSTERIP | names::CLUSTERIP_LOCAL, None) => {
                    Some("--masquerade-all / nftables.masqueradeAll")
                }
                _ => None,
            };
            Some(step(
                why,
                negated.map(|(s, k, _)| format!("set {s} (no element matches {})", fmt_key(k))),
                field,
            ))
        }
        (names::EXTERNAL_LOCAL | names::NODEPORT_LOCAL, Action::Goto(t)) => {
            let cluster = t.ends_with("-cluster");
            *picked_local = !cluster;
            let text = if !cluster {
                format!(
                    "externalTrafficPolicy Local: a client from outside reaches only this node's endpoints and keeps its address ({svc})"
                )
            } else if h.lookups.iter().any(|(s, _, _)| s == names::CLUSTER_CIDRS || s == names::LOCAL_IFACES) {
                "the source is a pod: it short-circuits to every endpoint of the Service, unmasqueraded (externalTrafficPolicy applies to outside clients only)".to_string()
            } else {
                "the source is this node: it short-circuits to every endpoint of the Service".to_string()
            };
            Some(step(
                text,
                first_lookup.and_then(|(s, k)| element(s, k)),
                Some("spec.externalTrafficPolicy"),
            ))
        }
        (names::CLUSTERIP | names::CLUSTERIP_LOCAL, Action::Goto(t)) => {
            *picked_local = t.ends_with("-local");
            if *picked_local {
                Some(step(
                    format!("internalTrafficPolicy Local: only this node's endpoints of {svc}"),
                    None,
                    Some("spec.internalTrafficPolicy"),
                ))
            } else {
                None
            }
        }
        (names::FIREWALL_CHECK, Action::Drop) => Some(step(
            format!(
                "{} is not in loadBalancerSourceRanges of {svc}: dropped before any endpoint is chosen",
                flow.src
            ),
            first_lookup.and_then(|(s, k)| element(s, k)),
            Some("spec.loadBalancerSourceRanges"),
        )),
        (names::ENDPOINTS_CHECK | names::NODEPORT_ENDPOINTS_CHECK, Action::Reject) => Some(step(
            format!(
                "{svc} has no endpoint that can serve {}: rejected (TCP reset / ICMP port unreachable), counted on the element",
                if nodeport { "this NodePort" } else { "this address" }
            ),
            h.lookups.last().and_then(|(s, k, _)| element(s, k)),
            Some("EndpointSlice endpoints[].conditions"),
        )),
        (names::ENDPOINTS_CHECK | names::NODEPORT_ENDPOINTS_CHECK, Action::Drop) => {
            let local_ready = ps.map(|p| p.chosen.local_ready).unwrap_or(0);
            Some(step(
                format!(
                    "{svc} has no ready endpoint on node {} ({local_ready} local) while its policy is Local: dropped silently here, counted on the element",
                    view.node.name
                ),
                h.lookups.last().and_then(|(s, k, _)| element(s, k)),
                Some("spec.externalTrafficPolicy / spec.internalTrafficPolicy"),
            ))
        }
        (names::CLUSTER_IPS_CHECK, Action::Reject) => Some(step(
            format!(
                "{} is a ClusterIP{} but no port of it is {}/{proto}: rejected",
                flow.dst,
                if svc.is_empty() { String::new() } else { format!(" ({svc})") },
                flow.port
            ),
            element(names::CLUSTER_IPS, &[Value::Addr(flow.dst)]),
            Some("spec.ports"),
        )),
        (names::CLUSTER_IPS_CHECK, Action::Drop) => Some(step(
            format!(
                "{} lies in a ServiceCIDR but no Service has it: dropped",
                flow.dst
            ),
            first_lookup.and_then(|(s, k)| element(s, k)),
            Some("ServiceCIDR spec.cidrs"),
        )),
        _ => None,
    }
}

fn fmt_nets(n: &[ipnet::IpNet]) -> String {
    if n.is_empty() {
        "any pod CIDR (none configured)".into()
    } else {
        n.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One sentence where there is something to do.
fn advice(
    view: &View<'_>,
    flow: &Flow,
    via: Via,
    ex: &Explanation,
    ps: Option<&PortState>,
    nodeport: bool,
) -> Option<String> {
    let p = ps?;
    let svc = &p.sp.key.service;
    let external = nodeport || p.sp.cluster_ip != flow.dst;
    let udp = if p.sp.key.proto == Proto::Udp {
        " UDP protocols (STUN, QUIC, SIP, DNS) care most."
    } else {
        ""
    };
    if !ex.unreachable_endpoints.is_empty() {
        return Some(format!(
            "{} is a pod address of another node, and nftproxy treats pod sources as local ({}): use detectLocalMode NodeCIDR (then only this node's pods short-circuit), or have the client call the Service's ClusterIP ({}) instead",
            flow.src,
            fmt_nets(&view.cfg.local_cidrs(view.node)),
            p.sp.cluster_ip
        ));
    }
    match ex.verdict {
        Verdict::Forward if ex.masquerade && external && via == Via::Outside => {
            let seen = ex
                .source_seen_by_endpoint
                .clone()
                .unwrap_or_else(|| "a node address".into());
            let lb = !p.sp.lb_ips.is_empty();
            Some(if lb {
                format!(
                    "the pod will see {seen} because externalTrafficPolicy is Cluster; set `externalTrafficPolicy: Local` on {svc} and point your load balancer's health check at the healthCheckNodePort it gets (/healthz on every node): only nodes with a ready endpoint answer 200.{udp}"
                )
            } else {
                format!(
                    "the pod will see {seen} because externalTrafficPolicy is Cluster; with `externalTrafficPolicy: Local` on {svc} it sees {}, but then only nodes with a ready endpoint of it answer: send clients only there.{udp}",
                    flow.src
                )
            })
        }
        Verdict::Forward if ex.masquerade && !external && via == Via::Pod => Some(format!(
            "the pod's address {} is not in the pod CIDRs nftproxy knows ({}): set clusterCIDR / --cluster-cidr (or detectLocalMode) to cover it, and the endpoint will see it",
            flow.src,
            fmt_nets(&view.cfg.local_cidrs(view.node))
        )),
        Verdict::Drop if p.sp.external_local || p.sp.internal_local => {
            Some(match p.sp.health_check_node_port {
                Some(hc) if external => format!(
                    "node {} has no ready endpoint of {svc}; a load balancer must not send here: its health check on :{hc}/healthz answers 503 on this node now (use it), or run an endpoint on this node",
                    view.node.name
                ),
                _ if external => format!(
                    "node {} has no ready endpoint of {svc} and externalTrafficPolicy is Local: send this traffic only to nodes that run one, or use Cluster (the pod then sees a node address)",
                    view.node.name
                ),
                _ => format!(
                    "internalTrafficPolicy Local: node {} runs no ready endpoint of {svc}; run one here (a DaemonSet) or use Cluster",
                    view.node.name
                ),
            })
        }
        Verdict::Drop if !p.sp.source_ranges.is_empty() => Some(format!(
            "add {}/{} to spec.loadBalancerSourceRanges of {svc} if this client should reach it",
            flow.src,
            if flow.src.is_ipv4() { 32 } else { 128 }
        )),
        Verdict::Reject => Some(format!(
            "no endpoint of {svc} is ready: check its pods' readiness (kubectl get endpointslices -n {} -l kubernetes.io/service-name={})",
            svc.namespace, svc.name
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
