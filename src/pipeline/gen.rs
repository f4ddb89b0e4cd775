//! Random Services, EndpointSlices, Nodes and ServiceCIDRs for the engine's property test.
//!
//! The aim is to span what the Kubernetes API accepts, not the cases someone thought of: a
//! property test is only as good as its generator (a dual-stack bug went unseen because the old
//! generator never made a dual-stack Service). Values come from small pools on purpose, so
//! that keys, addresses, NodePorts and names collide: objects replace each other, slices arrive
//! before their Service, NodePorts are shared (a conflict) and reused after a deletion,
//! endpoints are listed in two slices.
//!
//! Where the API validates something inside one object (unique port names, unique
//! port/protocol and NodePort/protocol pairs, a name on every port of a multi-port Service,
//! healthCheckNodePort only on LoadBalancer + Local), the generator stays valid, except for a
//! few `unchecked` Services with duplicate ports (bad input from a file). What only the
//! allocators prevent across objects (two Services with one ClusterIP or NodePort) is
//! generated on purpose: nftproxy must survive it.
//!
//! Address plan (upstream style): pods 10.0.0.0/8 and fd00:10::/64, Services 172.30.0.0/16
//! and fd00:30::/112, nodes 192.168.0.0/24 and fd00:192::/64, external clients
//! 203.0.113.0/24, externalIPs 198.51.100.0/24 and 2001:db8:e::/64, LB IPs 192.0.2.0/24 and
//! 2001:db8:b::/64.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::ObjKey;
use crate::model::NodeInfo;
use crate::pipeline::config::{DetectLocal, NodePortAddresses, ProxyConfig};

/// This node's name.
pub const NODE: &str = "node-a";
/// Another node's name (endpoints there are not local).
const OTHER_NODE: &str = "node-b";
const ZONES: [&str; 2] = ["z1", "z2"];
/// Service keys: four names in each of two namespaces.
pub const SERVICES: u8 = 8;
/// Slice keys: six names in each of the two namespaces.
pub const SLICES: u8 = 12;

/// Namespace and name of Service key `i`.
pub fn service_key(i: u8) -> ObjKey {
    (format!("ns{}", i / 4), format!("s{}", i % 4))
}

/// Namespace and name of slice key `i`. A slice's namespace is part of its key, so its label
/// can only name Services of that namespace.
pub fn slice_key(i: u8) -> ObjKey {
    (format!("ns{}", i / 6), format!("e{}", i % 6))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvcType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    Headless,
    ExternalName,
}

/// `ipFamilies`, in order (the first family's IP is `clusterIP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    V4,
    V6,
    V4V6,
    V6V4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    /// Not a Service protocol: bad input (the API refuses it; a file may hold it). The port is
    /// skipped and reported, so objects with problems come and go too (and a Service whose
    /// ports are all bad has a problem but no ports).
    Icmp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
            Proto::Icmp => "ICMP",
        }
    }
}

fn proto() -> impl Strategy<Value = Proto> {
    prop_oneof![
        15 => Just(Proto::Tcp),
        9 => Just(Proto::Udp),
        3 => Just(Proto::Sctp),
        1 => Just(Proto::Icmp),
    ]
}

/// An optional boolean: unset, true or false (conditions, policies).
fn tri() -> impl Strategy<Value = Option<bool>> {
    prop_oneof![Just(None), Just(Some(true)), Just(Some(false))]
}

#[derive(Debug, Clone)]
pub struct PortSpec {
    /// The Service port: [`service_port`] of this.
    pub port: u8,
    pub proto: Proto,
    /// 30000 + this (NodePort and LoadBalancer only; absent = not allocated, as with
    /// `allocateLoadBalancerNodePorts: false`).
    pub node_port: Option<u8>,
}

#[derive(Debug, Clone)]
pub enum Affinity {
    None,
    /// ClientIP without sessionAffinityConfig (the default timeout applies).
    NoConfig,
    /// ClientIP with a config that leaves the timeout out.
    NoTimeout,
    Secs(u32),
}

#[derive(Debug, Clone)]
pub struct Ingress {
    /// Index into [`LB_IPS`]; None = hostname-only.
    pub ip: Option<u8>,
    /// `ipMode`: absent, VIP or Proxy.
    pub mode: Option<&'static str>,
}

pub const EXTERNAL_IPS: [&str; 7] = [
    "198.51.100.1",
    "198.51.100.2",
    "2001:db8:e::1",
    "2001:db8:e::2",
    // A ClusterIP of another Service: an entry-point conflict across kinds.
    "172.30.0.1",
    // The node's own addresses (NodeSpec v4/v6 = 0), as operators set externalIPs to node IPs:
    // the entry point shadows NodePorts on that address.
    "192.168.0.2",
    "fd00:192::2",
];
/// The last two are node addresses, as ServiceLB-style controllers report them.
pub const LB_IPS: [&str; 6] = [
    "192.0.2.1",
    "192.0.2.2",
    "2001:db8:b::1",
    "2001:db8:b::2",
    "192.168.0.2",
    "fd00:192::2",
];
pub const SOURCE_RANGES: [&str; 6] = [
    "203.0.113.0/24",
    // Covers every node IP: LB IPs are then allowed as sources.
    "192.168.0.0/24",
    // Covers one of the node's possible IPv4 addresses only.
    "192.168.0.3/32",
    "2001:db8:c::/48",
    "fd00:192::/64",
    // Not truncated: the model truncates it.
    "203.0.113.7/24",
];

#[derive(Debug, Clone)]
pub struct SvcSpec {
    pub ty: SvcType,
    pub families: Families,
    /// ClusterIPs 172.30.0.(ip+1) / fd00:30::(ip+1): shared by two Services now and then.
    pub ip: u8,
    pub ports: Vec<PortSpec>,
    /// A single port without a name (the API allows that for one port only).
    pub unnamed: bool,
    /// externalTrafficPolicy Local (Some(false): Cluster; None: unset).
    pub etp_local: Option<bool>,
    /// internalTrafficPolicy Local (Some(false): Cluster; None: unset).
    pub itp_local: Option<bool>,
    pub affinity: Affinity,
    pub external_ips: Vec<u8>,
    pub ingress: Vec<Ingress>,
    pub source_ranges: Vec<u8>,
    /// healthCheckNodePort 32000 + this (LoadBalancer + Local only).
    pub health_check: Option<u8>,
    /// The service-proxy-name label: another proxy owns the Service.
    pub other_proxy: bool,
    /// Skip the API's per-object checks on ports (duplicate port/protocol or NodePort/protocol
    /// pairs): bad input nftproxy must still survive (`render` reads files, not the API).
    pub unchecked: bool,
}

fn svc_type() -> impl Strategy<Value = SvcType> {
    prop_oneof![
        4 => Just(SvcType::ClusterIp),
        3 => Just(SvcType::NodePort),
        4 => Just(SvcType::LoadBalancer),
        1 => Just(SvcType::Headless),
        1 => Just(SvcType::ExternalName),
    ]
}

fn families() -> impl Strategy<Value = Families> {
    prop_oneof![
        3 => Just(Families::V4),
        2 => Just(Families::V6),
        2 => Just(Families::V4V6),
        2 => Just(Families::V6V4),
    ]
}

fn affinity() -> impl Strategy<Value = Affinity> {
    prop_oneof![
        6 => Just(Affinity::None),
        1 => Just(Affinity::NoConfig),
        1 => Just(Affinity::NoTimeout),
        3 => prop::sample::select(vec![1u32, 10, 10800, 86400]).prop_map(Affinity::Secs),
    ]
}

fn ingress() -> impl Strategy<Value = Ingress> {
    (
        prop::option::weighted(0.85, 0..LB_IPS.len() as u8),
        prop::sample::select(vec![None, Some("VIP"), Some("Proxy")]),
    )
        .prop_map(|(ip, mode)| Ingress { ip, mode })
}

pub fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        (svc_type(), families(), 0u8..8),
        (
            prop::collection::vec(
                (0u8..5, proto(), prop::option::weighted(0.85, 0u8..6)).prop_map(
                    |(port, proto, node_port)| PortSpec {
                        port,
                        proto,
                        node_port,
                    },
                ),
                1..6,
            ),
            prop::bool::weighted(0.3),
        ),
        (tri(), tri(), affinity()),
        (
            prop::collection::vec(0..EXTERNAL_IPS.len() as u8, 0..3),
            prop::collection::vec(ingress(), 0..4),
            prop::collection::vec(0..SOURCE_RANGES.len() as u8, 0..3),
        ),
        (
            prop::option::weighted(0.8, 0u8..3),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.05),
        ),
    )
        .prop_map(
            |(
                (ty, families, ip),
                (ports, unnamed),
                (etp_local, itp_local, affinity),
                (external_ips, ingress, source_ranges),
                (health_check, other_proxy, unchecked),
            )| SvcSpec {
                ty,
                families,
                ip,
                ports,
                unnamed,
                etp_local,
                itp_local,
                affinity,
                external_ips,
                ingress,
                source_ranges,
                health_check,
                other_proxy,
                unchecked,
            },
        )
}

/// Service ports 80-83, and 30000: the number of a NodePort (another Service's, or its own).
fn service_port(i: u8) -> u16 {
    match i {
        4 => 30000,
        i => 80 + u16::from(i),
    }
}

fn cluster_ip(v6: bool, i: u8) -> String {
    if v6 {
        format!("fd00:30::{}", i + 1)
    } else {
        format!("172.30.0.{}", i + 1)
    }
}

/// The Service `s` under key `i`, as the API server would hand it out.
pub fn service(i: u8, s: &SvcSpec) -> Service {
    let (ns, name) = service_key(i);
    let fams: &[bool] = match s.families {
        Families::V4 => &[false],
        Families::V6 => &[true],
        Families::V4V6 => &[false, true],
        Families::V6V4 => &[true, false],
    };
    let node_ports = matches!(s.ty, SvcType::NodePort | SvcType::LoadBalancer);
    // The API rejects a second port with the same port/protocol, or the same NodePort and
    // protocol: drop such duplicates (or their NodePort) rather than generate invalid objects.
    let mut seen = std::collections::BTreeSet::new();
    let mut seen_np = std::collections::BTreeSet::new();
    let mut ports = Vec::new();
    for p in &s.ports {
        if !seen.insert((p.port, p.proto.name())) && !s.unchecked {
            continue;
        }
        let mut v = json!({"port": service_port(p.port), "protocol": p.proto.name(),
            "targetPort": 8080 + u16::from(p.port)});
        if !(s.unnamed && s.ports.len() == 1) {
            v["name"] = json!(format!("p{}", ports.len()));
        }
        if let Some(np) = p.node_port.filter(|_| node_ports) {
            if seen_np.insert((np, p.proto.name())) || s.unchecked {
                v["nodePort"] = json!(30000 + u16::from(np));
            }
        }
        ports.push(v);
    }
    let mut spec = json!({
        "type": match s.ty {
            SvcType::ClusterIp | SvcType::Headless => "ClusterIP",
            SvcType::NodePort => "NodePort",
            SvcType::LoadBalancer => "LoadBalancer",
            SvcType::ExternalName => "ExternalName",
        },
        "ports": ports,
    });
    match s.ty {
        SvcType::ExternalName => {
            spec["externalName"] = json!("db.example.com");
        }
        SvcType::Headless => {
            spec["clusterIP"] = json!("None");
            spec["clusterIPs"] = json!(["None"]);
        }
        _ => {
            let ips: Vec<String> = fams.iter().map(|v6| cluster_ip(*v6, s.ip)).collect();
            spec["clusterIP"] = json!(ips[0]);
            spec["clusterIPs"] = json!(ips);
        }
    }
    if s.ty != SvcType::ExternalName {
        spec["ipFamilies"] = json!(fams
            .iter()
            .map(|v6| if *v6 { "IPv6" } else { "IPv4" })
            .collect::<Vec<_>>());
        spec["ipFamilyPolicy"] = json!(if fams.len() == 2 {
            "RequireDualStack"
        } else {
            "SingleStack"
        });
    }
    // The API takes externalTrafficPolicy on externally accessible Services: NodePort,
    // LoadBalancer, and ClusterIP with externalIPs.
    let external = node_ports || (s.ty == SvcType::ClusterIp && !s.external_ips.is_empty());
    if external {
        if let Some(local) = s.etp_local {
            spec["externalTrafficPolicy"] = json!(if local { "Local" } else { "Cluster" });
        }
    }
    if let Some(local) = s.itp_local {
        spec["internalTrafficPolicy"] = json!(if local { "Local" } else { "Cluster" });
    }
    match s.affinity {
        Affinity::None => {}
        Affinity::NoConfig => spec["sessionAffinity"] = json!("ClientIP"),
        Affinity::NoTimeout => {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {}});
        }
        Affinity::Secs(t) => {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
    }
    if !s.external_ips.is_empty() {
        spec["externalIPs"] = json!(s
            .external_ips
            .iter()
            .map(|i| EXTERNAL_IPS[usize::from(*i)])
            .collect::<Vec<_>>());
    }
    let lb = s.ty == SvcType::LoadBalancer;
    if lb && !s.source_ranges.is_empty() {
        spec["loadBalancerSourceRanges"] = json!(s
            .source_ranges
            .iter()
            .map(|i| SOURCE_RANGES[usize::from(*i)])
            .collect::<Vec<_>>());
    }
    if lb && s.etp_local == Some(true) {
        if let Some(hc) = s.health_check {
            spec["healthCheckNodePort"] = json!(32000 + u16::from(hc));
        }
    }
    let mut meta = json!({"namespace": ns, "name": name});
    if s.other_proxy {
        meta["labels"] = json!({crate::model::SERVICE_PROXY_NAME_LABEL: "other-proxy"});
    }
    let mut v = json!({"metadata": meta, "spec": spec});
    if lb && !s.ingress.is_empty() {
        let ingress: Vec<Value> = s
            .ingress
            .iter()
            .map(|g| {
                let mut e = match g.ip {
                    Some(ip) => json!({"ip": LB_IPS[usize::from(ip)]}),
                    None => json!({"hostname": "lb.example.com"}),
                };
                if let Some(m) = g.mode {
                    e["ipMode"] = json!(m);
                }
                e
            })
            .collect();
        v["status"] = json!({"loadBalancer": {"ingress": ingress}});
    }
    serde_json::from_value(v).expect("generated Service")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrType {
    V4,
    V6,
    Fqdn,
}

/// How a slice's endpoints carry topology hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hints {
    None,
    /// Every endpoint has zone hints.
    Zones,
    /// Every endpoint has node hints.
    Nodes,
    /// Every endpoint has both.
    Both,
    /// Each endpoint has whatever it drew (some have none).
    Partial,
}

#[derive(Debug, Clone)]
pub struct EpSpec {
    /// Index into the family's pod address pool (small enough that one address is often in
    /// two slices of a Service).
    pub addr: u8,
    /// A second address (only the first counts).
    pub second: Option<u8>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// 0: this node, 1: another, 2: absent.
    pub node: u8,
    pub zone: Option<u8>,
    /// Zone hint: zone index (2 = a zone no node has).
    pub zone_hint: Option<u8>,
    /// Node hint: 0 this node, 1 another.
    pub node_hint: Option<u8>,
}

#[derive(Debug, Clone)]
pub struct SlicePort {
    /// 0..3: the names `p0`..`p2` the Services use; 3: unnamed; 4: a name no Service has.
    pub name: u8,
    pub port: u8,
    pub proto: Proto,
}

#[derive(Debug, Clone)]
pub struct SliceSpec {
    /// The Service named by the label (`s0`..`s4`; there is no `s4`). None: no label (not
    /// managed for a Service, ignored).
    pub service: Option<u8>,
    /// 1: the headless label (the control plane sets it on a headless Service's slices);
    /// 2: the service-proxy-name label (another proxy's); 0: neither.
    pub extra_label: u8,
    pub addr_type: AddrType,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EpSpec>,
    pub hints: Hints,
    /// A rollout in progress: every endpoint is terminating and not ready (serving as drawn),
    /// so the terminating fallback is reached, not just drawn endpoint by endpoint.
    pub terminating: bool,
}

fn ep_spec() -> impl Strategy<Value = EpSpec> {
    (
        (0u8..24, prop::option::weighted(0.1, 0u8..24)),
        (tri(), tri(), tri()),
        prop_oneof![3 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)],
        prop::option::of(0u8..2),
        (prop::option::of(0u8..3), prop::option::of(0u8..2)),
    )
        .prop_map(
            |(
                (addr, second),
                (ready, serving, terminating),
                node,
                zone,
                (zone_hint, node_hint),
            )| EpSpec {
                addr,
                second,
                ready,
                serving,
                terminating,
                node,
                zone,
                zone_hint,
                node_hint,
            },
        )
}

pub fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        prop::option::weighted(0.95, 0u8..5),
        prop_oneof![30 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop_oneof![5 => Just(AddrType::V4), 4 => Just(AddrType::V6), 1 => Just(AddrType::Fqdn)],
        prop::collection::vec(
            (
                prop_oneof![6 => 0u8..3, 1 => Just(3u8), 1 => Just(4u8)],
                0u8..3,
                proto(),
            )
                .prop_map(|(name, port, proto)| SlicePort { name, port, proto }),
            0..4,
        ),
        // Mostly small, sometimes more than the preset endpoint counts (1..=8) in one slice.
        prop_oneof![
            4 => prop::collection::vec(ep_spec(), 0..6),
            1 => prop::collection::vec(ep_spec(), 6..16),
        ],
        prop_oneof![
            4 => Just(Hints::None),
            1 => Just(Hints::Zones),
            1 => Just(Hints::Nodes),
            1 => Just(Hints::Both),
            1 => Just(Hints::Partial),
        ],
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(service, extra_label, addr_type, ports, endpoints, hints, terminating)| SliceSpec {
                service,
                extra_label,
                addr_type,
                ports,
                endpoints,
                hints,
                terminating,
            },
        )
}

/// The EndpointSlice `s` under key `i`.
pub fn slice(i: u8, s: &SliceSpec) -> EndpointSlice {
    let (ns, name) = slice_key(i);
    let eps: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let addr = |a: u8| match s.addr_type {
                AddrType::V4 => format!("10.0.0.{}", a + 1),
                AddrType::V6 => format!("fd00:10::{}", a + 1),
                AddrType::Fqdn => format!("pod{a}.example.com"),
            };
            let addrs: Vec<String> = std::iter::once(e.addr).chain(e.second).map(addr).collect();
            let (ready, terminating) = if s.terminating {
                (Some(false), Some(true))
            } else {
                (e.ready, e.terminating)
            };
            let mut cond = serde_json::Map::new();
            for (k, v) in [
                ("ready", ready),
                ("serving", e.serving),
                ("terminating", terminating),
            ] {
                if let Some(v) = v {
                    cond.insert(k.into(), json!(v));
                }
            }
            let mut v = json!({"addresses": addrs, "conditions": cond});
            match e.node {
                0 => v["nodeName"] = json!(NODE),
                1 => v["nodeName"] = json!(OTHER_NODE),
                _ => {}
            }
            if let Some(z) = e.zone {
                v["zone"] = json!(ZONES[usize::from(z)]);
            }
            let zone_hint = |z: u8| ZONES.get(usize::from(z)).copied().unwrap_or("z-none");
            let node_hint = |n: u8| if n == 0 { NODE } else { OTHER_NODE };
            let (zones, nodes) = match s.hints {
                Hints::None => (None, None),
                Hints::Zones => (Some(zone_hint(e.zone_hint.unwrap_or(0))), None),
                Hints::Nodes => (None, Some(node_hint(e.node_hint.unwrap_or(0)))),
                Hints::Both => (
                    Some(zone_hint(e.zone_hint.unwrap_or(0))),
                    Some(node_hint(e.node_hint.unwrap_or(0))),
                ),
                Hints::Partial => (e.zone_hint.map(zone_hint), e.node_hint.map(node_hint)),
            };
            if zones.is_some() || nodes.is_some() {
                let mut h = json!({});
                if let Some(z) = zones {
                    h["forZones"] = json!([{"name": z}]);
                }
                if let Some(n) = nodes {
                    h["forNodes"] = json!([{"name": n}]);
                }
                v["hints"] = h;
            }
            v
        })
        .collect();
    // The API refuses two ports of one name in a slice: keep the first.
    let mut names = std::collections::BTreeSet::new();
    let ports: Vec<Value> = s
        .ports
        .iter()
        .filter(|p| names.insert(p.name))
        .map(|p| {
            let mut v = json!({"port": 8080 + u16::from(p.port), "protocol": p.proto.name()});
            match p.name {
                0..=2 => v["name"] = json!(format!("p{}", p.name)),
                3 => {}
                _ => v["name"] = json!("metrics"),
            }
            v
        })
        .collect();
    let mut labels = serde_json::Map::new();
    if let Some(svc) = s.service {
        labels.insert(
            crate::model::SERVICE_NAME_LABEL.into(),
            json!(format!("s{svc}")),
        );
    }
    match s.extra_label {
        1 => {
            labels.insert(crate::model::HEADLESS_LABEL.into(), json!(""));
        }
        2 => {
            labels.insert(
                crate::model::SERVICE_PROXY_NAME_LABEL.into(),
                json!("other-proxy"),
            );
        }
        _ => {}
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "addressType": match s.addr_type {
            AddrType::V4 => "IPv4",
            AddrType::V6 => "IPv6",
            AddrType::Fqdn => "FQDN",
        },
        "ports": ports,
        "endpoints": eps,
    }))
    .expect("generated EndpointSlice")
}

/// What the Node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub zone: Option<u8>,
    /// InternalIP 192.168.0.(2+this).
    pub v4: Option<u8>,
    /// InternalIP fd00:192::(2+this).
    pub v6: Option<u8>,
    /// The IPv6 address is listed first.
    pub v6_first: bool,
    /// Tainted for removal by the cluster autoscaler (the ruleset stays as it is).
    pub draining: bool,
    /// spec.podCIDRs: 0 none, 1 IPv4 (10.0.(1+i).0/24), 2 both families, 3 legacy podCIDR only.
    pub pod_cidrs: (u8, u8),
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            zone: None,
            v4: Some(0),
            v6: Some(0),
            v6_first: false,
            draining: false,
            pod_cidrs: (0, 0),
        }
    }
}

pub fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        prop::option::of(0u8..2),
        prop::option::weighted(0.9, 0u8..2),
        prop::option::weighted(0.8, 0u8..2),
        any::<bool>(),
        prop::bool::weighted(0.1),
        (0u8..4, 0u8..2),
    )
        .prop_map(|(zone, v4, v6, v6_first, draining, pod_cidrs)| NodeSpec {
            zone,
            v4,
            v6,
            v6_first,
            draining,
            pod_cidrs,
        })
}

impl NodeSpec {
    /// The NodeInfo the agent derives from such a Node object.
    pub fn info(&self) -> NodeInfo {
        let mut addresses = Vec::new();
        if let Some(i) = self.v4 {
            addresses
                .push(json!({"type": "InternalIP", "address": format!("192.168.0.{}", 2 + i)}));
        }
        if let Some(i) = self.v6 {
            let a = json!({"type": "InternalIP", "address": format!("fd00:192::{}", 2 + i)});
            if self.v6_first {
                addresses.insert(0, a);
            } else {
                addresses.push(a);
            }
        }
        addresses.push(json!({"type": "Hostname", "address": NODE}));
        let mut meta = json!({"name": NODE});
        if let Some(z) = self.zone {
            meta["labels"] = json!({crate::model::ZONE_LABEL: ZONES[usize::from(z)]});
        }
        let mut node = json!({"metadata": meta, "status": {"addresses": addresses}, "spec": {}});
        if self.draining {
            node["spec"]["taints"] = json!([{"key": crate::model::AUTOSCALER_TAINT,
                "effect": "NoSchedule"}]);
        }
        let (kind, i) = self.pod_cidrs;
        let v4 = format!("10.0.{}.0/24", 1 + i);
        let v6 = format!("fd00:10::{:x}:0/112", 1 + i);
        match kind {
            1 => node["spec"]["podCIDRs"] = json!([v4]),
            2 => node["spec"]["podCIDRs"] = json!([v4, v6]),
            3 => node["spec"]["podCIDR"] = json!(v4),
            _ => {}
        }
        let node: k8s_openapi::api::core::v1::Node =
            serde_json::from_value(node).expect("generated Node");
        NodeInfo::from_node(&node)
    }
}

/// How many ServiceCIDR sets [`service_cidrs`] knows.
pub const CIDR_CHOICES: u8 = 6;

/// The ServiceCIDRs in effect (the `cidrs` argument of `Engine::compute`), by index.
pub fn service_cidrs(i: u8) -> Vec<IpNet> {
    let all: &[&str] = match i % CIDR_CHOICES {
        0 => &[],
        1 => &["172.30.0.0/16"],
        2 => &["172.30.0.0/16", "fd00:30::/112"],
        3 => &["fd00:30::/112"],
        // Two ranges of one family (a ServiceCIDR added to extend the first).
        4 => &["172.30.0.0/24", "172.30.1.0/24", "fd00:30::/112"],
        // ServiceCIDRs may overlap (e.g. while one replaces another), or repeat.
        _ => &[
            "172.30.0.0/16",
            "172.30.0.0/24",
            "fd00:30::/112",
            "fd00:30::/112",
        ],
    };
    all.iter()
        .map(|c| c.parse().expect("service CIDR"))
        .collect()
}

/// The agent's flags, fixed for one run.
#[derive(Debug, Clone)]
pub struct Flags {
    pub masquerade_all: bool,
    /// 0: `primary`, 1: the node subnets, 2: everything.
    pub nodeport_addresses: u8,
    /// 0: ClusterCIDR, 1: NodeCIDR (the Node's podCIDRs, changing with it), 2: auto with no
    /// cluster CIDR (NodeCIDR), 3: InterfaceNamePrefix veth, 4: BridgeInterface cbr0.
    pub detect_local: u8,
}

pub fn flags() -> impl Strategy<Value = Flags> {
    (any::<bool>(), 0u8..3, 0u8..5).prop_map(
        |(masquerade_all, nodeport_addresses, detect_local)| Flags {
            masquerade_all,
            nodeport_addresses,
            detect_local,
        },
    )
}

impl Flags {
    pub fn proxy_config(&self) -> ProxyConfig {
        let np: Vec<String> = match self.nodeport_addresses {
            0 => vec!["primary".into()],
            1 => vec!["192.168.0.0/24".into(), "fd00:192::/64".into()],
            _ => vec!["0.0.0.0/0".into(), "::/0".into()],
        };
        let (detect_local, cluster_cidrs, pod_interface) = match self.detect_local {
            0 => (
                DetectLocal::ClusterCidr,
                vec!["10.0.0.0/8", "fd00:10::/64"],
                "",
            ),
            1 => (DetectLocal::NodeCidr, vec!["10.0.0.0/8"], ""),
            2 => (DetectLocal::Auto, vec![], ""),
            3 => (DetectLocal::InterfaceNamePrefix, vec![], "veth"),
            _ => (DetectLocal::BridgeInterface, vec!["10.0.0.0/8"], "cbr0"),
        };
        ProxyConfig {
            node_name: NODE.into(),
            cluster_cidrs: cluster_cidrs
                .into_iter()
                .map(|c| c.parse().expect("cidr"))
                .collect(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: 14,
            nodeport: NodePortAddresses::parse(&np).expect("nodeport addresses"),
            detect_local,
            pod_interface: pod_interface.into(),
        }
    }
}

/// One change the watches (or the environment) deliver.
#[derive(Debug, Clone)]
pub enum Op {
    Service(u8, Option<SvcSpec>),
    Slice(u8, Option<SliceSpec>),
    Node(NodeSpec),
    Cidrs(u8),
    /// The watch of Services (0), slices (1) or both (2) relists: the whole list is delivered.
    Relist(u8),
}

pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (0..SERVICES, prop::option::weighted(0.85, svc_spec())).prop_map(|(i, s)| Op::Service(i, s)),
        50 => (0..SLICES, prop::option::weighted(0.85, slice_spec())).prop_map(|(i, s)| Op::Slice(i, s)),
        3 => node_spec().prop_map(Op::Node),
        2 => (0..CIDR_CHOICES).prop_map(Op::Cidrs),
        2 => (0u8..3).prop_map(Op::Relist),
    ]
}
