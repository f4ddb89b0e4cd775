//! Kubernetes objects -> service ports and endpoints. Pure: no IO, no clock.
//!
//! Everything malformed is reported as a [`Problem`] naming the object and the reason, and skipped;
//! one bad object never disturbs another.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::net::{Family, Proto};

pub mod node;
pub use node::{service_cidrs, NodeInfo, AUTOSCALER_TAINT};

/// Label that hands a Service to another proxy implementation.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label set on EndpointSlices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label naming its zone (topology hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Upstream's default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_SECS: u32 = 10800;
/// The API server caps a slice at 1000 endpoints; anything larger did not come from it.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// Something in an object that nftproxy could not use. The caller logs it (and may emit an Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The object the problem is in (Events are written to it).
    pub object: ObjectRef,
    pub reason: String,
}

/// A Kubernetes object by kind, namespace and name; shown as `Service ns/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: &'static str,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &'static str, namespace: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Identity of a Service: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Identity of a service port: (namespace, name, port name, protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub service: ServiceName,
    pub port_name: String,
    pub proto: Proto,
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.service,
            self.port_name,
            self.proto.keyword()
        )
    }
}

/// One port of a Service in one address family, with every address it is reachable on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub key: PortKey,
    pub family: Family,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// externalTrafficPolicy: Local on a Service that has external entry points.
    pub external_local: bool,
    /// internalTrafficPolicy: Local.
    pub internal_local: bool,
    /// ClientIP session affinity timeout.
    pub affinity_secs: Option<u32>,
    /// healthCheckNodePort (LoadBalancer + Local).
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    pub fn has_external_entries(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }
}

/// One endpoint of a service port, as the EndpointSlices describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` equals ours).
    pub local: bool,
    /// Zones this endpoint is hinted for; empty = no zone hints.
    pub zone_hints: Vec<String>,
    /// Nodes this endpoint is hinted for; empty = no node hints.
    pub node_hints: Vec<String>,
}

/// Endpoints of one Service in one family, merged over all its slices, per (port name, protocol).
pub type PortEndpoints = BTreeMap<(String, Proto), Vec<Endpoint>>;

/// Record that something in `object` was skipped, and why.
fn bad(problems: &mut Vec<Problem>, object: &ObjectRef, reason: impl Into<String>) {
    problems.push(Problem {
        object: object.clone(),
        reason: reason.into(),
    });
}

fn svc_object(ns: &str, name: &str) -> ObjectRef {
    ObjectRef::new("Service", ns, name)
}

fn parse_proto(p: Option<&str>) -> Result<Proto, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Proto::Tcp),
        "UDP" => Ok(Proto::Udp),
        "SCTP" => Ok(Proto::Sctp),
        other => Err(format!("unsupported protocol {other:?}")),
    }
}

fn parse_port(p: i32, what: &str) -> Result<u16, String> {
    if (1..=65535).contains(&p) {
        Ok(p as u16)
    } else {
        Err(format!("{what} {p} out of range 1-65535"))
    }
}

/// Namespace and name of an object (namespace "default" when unset, as the API fills it in).
pub fn object_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A Service read once, as its watch delivers it: what the agent keeps instead of the object.
/// A listed Service is kilobytes of k8s-openapi strings and maps, its service ports a fraction
/// of that; reading each object as it arrives keeps a cold start's lists from ever holding the
/// whole cluster as objects (at 10,000 Services x 5, 84 MiB of the agent's peak).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadService {
    pub key: (String, String),
    pub ports: Vec<ServicePort>,
    pub problems: Vec<Problem>,
}

impl ReadService {
    pub fn read(svc: &Service) -> ReadService {
        let mut problems = Vec::new();
        let ports = service_ports(svc, &mut problems);
        ReadService {
            key: object_key(&svc.metadata),
            ports,
            problems,
        }
    }
}

/// An EndpointSlice read once, as its watch delivers it (see [`ReadService`]). `node` is this
/// node's name, fixed for the agent's life: the watch of its Node selects it by that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSlice {
    pub key: (String, String),
    pub info: Option<SliceInfo>,
    pub problems: Vec<Problem>,
    /// The slice's [`TRIGGER_ANNOTATION`] (network programming latency starts there).
    pub trigger: Option<std::time::SystemTime>,
}

impl ReadSlice {
    pub fn read(slice: &EndpointSlice, node: &str) -> ReadSlice {
        let mut problems = Vec::new();
        let info = slice_info(slice, node, &mut problems);
        ReadSlice {
            key: object_key(&slice.metadata),
            info,
            problems,
            trigger: trigger_time(slice),
        }
    }
}

/// Parse an IP the way the API server stores them; leading zeros and surrounding space are bad input.
fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok()
}

/// Turn a Service into its service ports, one per (port, family). Services nftproxy does not
/// proxy (headless, ExternalName, another proxy's) give an empty list without a problem.
pub fn service_ports(svc: &Service, problems: &mut Vec<Problem>) -> Vec<ServicePort> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let Some(name) = svc.metadata.name.as_deref() else {
        problems.push(Problem {
            object: ObjectRef::new("Service", "", "<unnamed>"),
            reason: "no metadata.name".into(),
        });
        return Vec::new();
    };
    let object = svc_object(ns, name);
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return Vec::new();
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Vec::new();
    }
    let Some(by_family) = cluster_ips(spec, &object, problems) else {
        return Vec::new(); // headless or not yet allocated
    };
    let node_port_type = matches!(svc_type, "NodePort" | "LoadBalancer");
    let external_ips = parse_ips(
        spec.external_ips.iter().flatten(),
        "externalIP",
        &object,
        problems,
    );
    let (lb_ips, source_ranges) = if svc_type == "LoadBalancer" {
        (
            ingress_ips(svc, &object, problems),
            source_ranges(spec, &object, problems),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let has_external = node_port_type || !external_ips.is_empty();
    let external_local = has_external && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_secs = affinity(spec, &object, problems);
    let health_check_node_port = if svc_type == "LoadBalancer" && external_local {
        spec.health_check_node_port
            .and_then(|p| parse_port(p, "healthCheckNodePort").ok())
    } else {
        None
    };
    let service = ServiceName {
        namespace: ns.to_string(),
        name: name.to_string(),
    };
    // No cap on the number of ports: the API accepts any number and kube-proxy programs them
    // all; each costs a few elements, like a Service of its own.
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in spec.ports.as_deref().unwrap_or_default() {
        let Some((port_name, proto, port, node_port)) =
            read_port(p, node_port_type, &mut seen, &object, problems)
        else {
            continue;
        };
        for (family, cluster_ip) in &by_family {
            let in_family = |ip: &&IpAddr| Family::of(ip) == *family;
            out.push(ServicePort {
                key: PortKey {
                    service: service.clone(),
                    port_name: port_name.clone(),
                    proto,
                },
                family: *family,
                cluster_ip: *cluster_ip,
                port,
                node_port,
                external_ips: external_ips.iter().filter(in_family).copied().collect(),
                lb_ips: lb_ips.iter().filter(in_family).copied().collect(),
                source_ranges: source_ranges
                    .iter()
                    .filter(|n| Family::of(&n.addr()) == *family)
                    .copied()
                    .collect(),
                external_local,
                internal_local,
                affinity_secs,
                health_check_node_port,
            });
        }
    }
    out
}

/// The first ClusterIP of each family (`clusterIPs`, else the legacy `clusterIP`); None for a
/// headless Service or one not allocated yet.
fn cluster_ips(
    spec: &ServiceSpec,
    object: &ObjectRef,
    problems: &mut Vec<Problem>,
) -> Option<BTreeMap<Family, IpAddr>> {
    let mut raws: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raws.is_empty() {
        raws.extend(spec.cluster_ip.as_deref());
    }
    if raws.is_empty() || raws.iter().any(|ip| *ip == "None" || ip.is_empty()) {
        return None;
    }
    let mut by_family: BTreeMap<Family, IpAddr> = BTreeMap::new();
    for raw in raws {
        match parse_ip(raw) {
            Some(ip) => {
                by_family.entry(Family::of(&ip)).or_insert(ip);
            }
            None => bad(problems, object, format!("bad clusterIP {raw:?}")),
        }
    }
    Some(by_family)
}

/// Addresses of a list field; a bad one is reported and skipped.
fn parse_ips<'a>(
    raws: impl IntoIterator<Item = &'a String>,
    field: &str,
    object: &ObjectRef,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for raw in raws {
        match parse_ip(raw) {
            Some(ip) => out.push(ip),
            None => bad(problems, object, format!("bad {field} {raw:?} skipped")),
        }
    }
    out
}

/// The load balancer's ingress IPs that reach this node addressed to themselves: not those of
/// ipMode Proxy (the load balancer proxies; traffic arrives addressed to the node), not
/// hostname-only entries.
fn ingress_ips(svc: &Service, object: &ObjectRef, problems: &mut Vec<Problem>) -> Vec<IpAddr> {
    let raws: Vec<&String> = svc
        .status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ing| ing.ip.as_ref())
        .collect();
    parse_ips(raws, "load balancer ingress IP", object, problems)
}

fn source_ranges(
    spec: &ServiceSpec,
    object: &ObjectRef,
    problems: &mut Vec<Problem>,
) -> Vec<IpNet> {
    let mut out = Vec::new();
    for raw in spec.load_balancer_source_ranges.iter().flatten() {
        match raw.trim().parse::<IpNet>() {
            Ok(net) => out.push(net.trunc()),
            Err(_) => bad(
                problems,
                object,
                format!("bad loadBalancerSourceRange {raw:?} skipped"),
            ),
        }
    }
    out
}

/// The ClientIP affinity timeout, or None without affinity.
fn affinity(spec: &ServiceSpec, object: &ObjectRef, problems: &mut Vec<Problem>) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let t = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .unwrap_or(DEFAULT_AFFINITY_SECS as i32);
    if (1..=86400).contains(&t) {
        Some(t as u32)
    } else {
        bad(
            problems,
            object,
            format!(
                "sessionAffinity timeout {t} out of range 1-86400; using {DEFAULT_AFFINITY_SECS}"
            ),
        );
        Some(DEFAULT_AFFINITY_SECS)
    }
}

/// One entry of `spec.ports`: name, protocol, port and NodePort; None (reported) when it
/// cannot be served or repeats an earlier (name, protocol).
fn read_port(
    p: &k8s_openapi::api::core::v1::ServicePort,
    node_port_type: bool,
    seen: &mut std::collections::BTreeSet<(String, Proto)>,
    object: &ObjectRef,
    problems: &mut Vec<Problem>,
) -> Option<(String, Proto, u16, Option<u16>)> {
    let port_name = p.name.clone().unwrap_or_default();
    let skipped = |e: String| format!("port {port_name:?}: {e}; port skipped");
    let proto = match parse_proto(p.protocol.as_deref()) {
        Ok(proto) => proto,
        Err(e) => {
            bad(problems, object, skipped(e));
            return None;
        }
    };
    let port = match parse_port(p.port, "port") {
        Ok(port) => port,
        Err(e) => {
            bad(problems, object, skipped(e));
            return None;
        }
    };
    if !seen.insert((port_name.clone(), proto)) {
        bad(
            problems,
            object,
            format!(
                "duplicate port {port_name:?}/{}; later one skipped",
                proto.keyword()
            ),
        );
        return None;
    }
    let node_port = match p.node_port {
        Some(np) if node_port_type && np != 0 => match parse_port(np, "nodePort") {
            Ok(np) => Some(np),
            Err(e) => {
                bad(
                    problems,
                    object,
                    format!("port {port_name:?}: {e}; NodePort skipped"),
                );
                None
            }
        },
        _ => None,
    };
    Some((port_name, proto, port, node_port))
}

/// What one EndpointSlice contributes: its Service, family and endpoints per (port name, protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: ServiceName,
    pub family: Family,
    /// Endpoints per (port name, protocol). A Vec, not a map: a slice has a port or two, and
    /// the agent keeps one of these per slice in the cluster.
    pub ports: Vec<((String, Proto), Vec<Endpoint>)>,
}

/// Read one EndpointSlice. `node` is this node's name (endpoint locality).
pub fn slice_info(
    slice: &EndpointSlice,
    node: &str,
    problems: &mut Vec<Problem>,
) -> Option<SliceInfo> {
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    let name = slice.metadata.name.as_deref().unwrap_or("<unnamed>");
    let object = ObjectRef::new("EndpointSlice", ns, name);
    let labels = slice.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return None;
    }
    let Some(svc_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return None; // not managed for a Service (custom slices without the label are ignored upstream too)
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::Ip,
        "IPv6" => Family::Ip6,
        _ => return None, // FQDN
    };
    if slice.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
        problems.push(Problem {
            object,
            reason: format!(
                "{} endpoints, more than the API allows ({MAX_ENDPOINTS_PER_SLICE}); slice skipped",
                slice.endpoints.len()
            ),
        });
        return None;
    }
    let mut eps = Vec::new();
    for ep in &slice.endpoints {
        let Some(raw) = ep.addresses.first() else {
            bad(problems, &object, "endpoint without addresses skipped");
            continue;
        };
        let Some(ip) = parse_ip(raw).filter(|ip| Family::of(ip) == family) else {
            bad(
                problems,
                &object,
                format!(
                    "bad {} endpoint address {raw:?} skipped",
                    slice.address_type
                ),
            );
            continue;
        };
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        eps.push((
            ip,
            ready,
            serving,
            terminating,
            ep.node_name.as_deref() == Some(node),
            hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>())
                .unwrap_or_default(),
            hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>())
                .unwrap_or_default(),
        ));
    }
    let mut ports: PortEndpoints = BTreeMap::new();
    for p in slice.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        let proto = match parse_proto(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(e) => {
                bad(
                    problems,
                    &object,
                    format!("port {port_name:?}: {e}; port skipped"),
                );
                continue;
            }
        };
        let Some(port) = p.port else {
            bad(
                problems,
                &object,
                format!("port {port_name:?} without a number skipped"),
            );
            continue;
        };
        let port = match parse_port(port, "port") {
            Ok(port) => port,
            Err(e) => {
                bad(
                    problems,
                    &object,
                    format!("port {port_name:?}: {e}; port skipped"),
                );
                continue;
            }
        };
        let list = ports.entry((port_name, proto)).or_default();
        for (ip, ready, serving, terminating, local, zone_hints, node_hints) in &eps {
            list.push(Endpoint {
                ip: *ip,
                port,
                ready: *ready,
                serving: *serving,
                terminating: *terminating,
                local: *local,
                zone_hints: zone_hints.clone(),
                node_hints: node_hints.clone(),
            });
        }
    }
    Some(SliceInfo {
        service: ServiceName {
            namespace: ns.to_string(),
            name: svc_name.clone(),
        },
        family,
        ports: ports.into_iter().collect(),
    })
}

/// Merge the slices of one Service and family. An ip:port listed twice keeps the
/// non-terminating copy (a pod moving between slices is briefly in both).
pub fn merge_slices<'a>(slices: impl IntoIterator<Item = &'a SliceInfo>) -> PortEndpoints {
    let mut merged: PortEndpoints = BTreeMap::new();
    // Position of each ip:port per port key: a Service may have 1,000s of endpoints.
    let mut at: rustc_hash::FxHashMap<(&(String, Proto), IpAddr, u16), usize> =
        rustc_hash::FxHashMap::default();
    for s in slices {
        for (k, eps) in &s.ports {
            let list = merged.entry(k.clone()).or_default();
            for ep in eps {
                match at.get(&(k, ep.ip, ep.port)) {
                    Some(&i) => {
                        if list[i].terminating && !ep.terminating {
                            list[i] = ep.clone();
                        }
                    }
                    None => {
                        at.insert((k, ep.ip, ep.port), list.len());
                        list.push(ep.clone());
                    }
                }
            }
        }
    }
    for list in merged.values_mut() {
        list.sort_by_key(|e| (e.ip, e.port));
    }
    merged
}

/// The annotation the EndpointSlice controller sets to when the change it reflects was made.
pub const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// When the change a slice reflects was made (network programming latency starts there).
pub fn trigger_time(slice: &EndpointSlice) -> Option<std::time::SystemTime> {
    let raw = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_ANNOTATION)?;
    humantime::parse_rfc3339_weak(raw).ok()
}

#[cfg(test)]
mod tests;
