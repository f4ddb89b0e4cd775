//! Services and EndpointSlices read as protobuf, the API server's native encoding.
//!
//! At 50,000 Services the API server spends most of a cold start encoding JSON: the Service
//! stream is 53 MB as JSON and 35 MB as protobuf, the EndpointSlice stream 69 and 35 MB, and
//! both arrive in about half the time as protobuf (measured against kube-apiserver 1.36 with
//! a streaming list each). kube-proxy asks for protobuf for the same reason; kube-runtime only
//! speaks JSON, so these two kinds have their own list and watch ([`super::pbwatch`]).
//!
//! The objects are decoded with k8s-pb's types and turned into k8s-openapi's, so the model
//! reads exactly what it reads from JSON. Go omits a non-pointer field's zero value in JSON
//! (`omitempty`) but always writes it in protobuf: those become None here, as JSON gives them;
//! pointer fields (`*string`, `*bool`) are kept as they come, an empty string included.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_pb::api::core::v1 as pb_core;
use k8s_pb::api::discovery::v1 as pb_discovery;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as pb_meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;

/// What the API server answers a protobuf request with; a watch adds `;stream=watch`.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// Every protobuf-encoded object starts with this, then a `runtime.Unknown` envelope.
const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, thiserror::Error)]
pub enum PbError {
    #[error("not a Kubernetes protobuf object (no k8s\\0 prefix)")]
    Magic,
    #[error("protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("expected a {want}, got a {got}")]
    Kind { want: &'static str, got: String },
    #[error("{0} missing")]
    Missing(&'static str),
}

/// The kind and the raw bytes inside a protobuf envelope.
pub fn envelope(bytes: &[u8]) -> Result<(String, Vec<u8>), PbError> {
    let inner = bytes.strip_prefix(MAGIC).ok_or(PbError::Magic)?;
    let u = Unknown::decode(inner)?;
    let kind = u.type_meta.and_then(|t| t.kind).unwrap_or_default();
    Ok((kind, u.raw.unwrap_or_default()))
}

/// Decode an enveloped object of kind `want`.
pub fn decode<M: Message + Default>(bytes: &[u8], want: &'static str) -> Result<M, PbError> {
    let (kind, raw) = envelope(bytes)?;
    if kind != want {
        return Err(PbError::Kind { want, got: kind });
    }
    Ok(M::decode(raw.as_slice())?)
}

/// A kind read as protobuf: its k8s-pb types and how they become k8s-openapi's.
pub trait PbKind: Sized {
    type Pb: Message + Default;
    type List: Message + Default;
    const KIND: &'static str;
    const LIST_KIND: &'static str;
    /// The collection's path across all namespaces.
    const PATH: &'static str;
    fn meta(pb: &Self::Pb) -> Option<&pb_meta::ObjectMeta>;
    fn from_pb(pb: Self::Pb) -> Self;
    fn list(list: Self::List) -> (Option<pb_meta::ListMeta>, Vec<Self::Pb>);
}

impl PbKind for core::Service {
    type Pb = pb_core::Service;
    type List = pb_core::ServiceList;
    const KIND: &'static str = "Service";
    const LIST_KIND: &'static str = "ServiceList";
    const PATH: &'static str = "/api/v1/services";
    fn meta(pb: &Self::Pb) -> Option<&pb_meta::ObjectMeta> {
        pb.metadata.as_ref()
    }
    fn from_pb(pb: Self::Pb) -> Self {
        service(pb)
    }
    fn list(list: Self::List) -> (Option<pb_meta::ListMeta>, Vec<Self::Pb>) {
        (list.metadata, list.items)
    }
}

impl PbKind for discovery::EndpointSlice {
    type Pb = pb_discovery::EndpointSlice;
    type List = pb_discovery::EndpointSliceList;
    const KIND: &'static str = "EndpointSlice";
    const LIST_KIND: &'static str = "EndpointSliceList";
    const PATH: &'static str = "/apis/discovery.k8s.io/v1/endpointslices";
    fn meta(pb: &Self::Pb) -> Option<&pb_meta::ObjectMeta> {
        pb.metadata.as_ref()
    }
    fn from_pb(pb: Self::Pb) -> Self {
        endpoint_slice(pb)
    }
    fn list(list: Self::List) -> (Option<pb_meta::ListMeta>, Vec<Self::Pb>) {
        (list.metadata, list.items)
    }
}

/// A non-pointer string: "" is what JSON omits.
fn text(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// A non-pointer number: 0 is what JSON omits.
fn number<T: Default + PartialEq>(n: Option<T>) -> Option<T> {
    n.filter(|n| *n != T::default())
}

/// A list or map: empty is what JSON omits (protobuf cannot tell nil from empty).
fn list<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn map(m: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then_some(m)
}

fn time(t: pb_meta::Time) -> Option<meta::Time> {
    let ts = k8s_openapi::jiff::Timestamp::new(t.seconds.unwrap_or(0), t.nanos.unwrap_or(0));
    ts.ok().map(meta::Time)
}

/// The metadata the agent keeps (see `watch::Slim`): the rest is dropped here already.
pub fn object_meta(m: pb_meta::ObjectMeta) -> meta::ObjectMeta {
    meta::ObjectMeta {
        name: text(m.name),
        namespace: text(m.namespace),
        uid: text(m.uid),
        resource_version: text(m.resource_version),
        generation: number(m.generation),
        deletion_timestamp: m.deletion_timestamp.and_then(time),
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        labels: map(m.labels),
        annotations: map(m.annotations),
        ..meta::ObjectMeta::default()
    }
}

pub fn service(s: pb_core::Service) -> core::Service {
    core::Service {
        metadata: object_meta(s.metadata.unwrap_or_default()),
        spec: s.spec.map(service_spec),
        status: s.status.map(|st| core::ServiceStatus {
            load_balancer: st.load_balancer.map(|lb| core::LoadBalancerStatus {
                ingress: list(lb.ingress.into_iter().map(ingress).collect()),
            }),
            // Conditions are never read (dropped by `Slim`).
            conditions: None,
        }),
    }
}

fn service_spec(s: pb_core::ServiceSpec) -> core::ServiceSpec {
    core::ServiceSpec {
        ports: list(s.ports.into_iter().map(service_port).collect()),
        // The selector is never read (dropped by `Slim`): the EndpointSlices say it all.
        selector: None,
        cluster_ip: text(s.cluster_ip),
        cluster_ips: list(s.cluster_ips),
        type_: text(s.r#type),
        external_ips: list(s.external_ips),
        session_affinity: text(s.session_affinity),
        load_balancer_ip: text(s.load_balancer_ip),
        load_balancer_source_ranges: list(s.load_balancer_source_ranges),
        external_name: text(s.external_name),
        external_traffic_policy: text(s.external_traffic_policy),
        health_check_node_port: number(s.health_check_node_port),
        publish_not_ready_addresses: s.publish_not_ready_addresses.filter(|b| *b),
        session_affinity_config: s
            .session_affinity_config
            .map(|c| core::SessionAffinityConfig {
                client_ip: c.client_ip.map(|ip| core::ClientIPConfig {
                    timeout_seconds: ip.timeout_seconds,
                }),
            }),
        ip_families: list(s.ip_families),
        ip_family_policy: s.ip_family_policy,
        allocate_load_balancer_node_ports: s.allocate_load_balancer_node_ports,
        load_balancer_class: s.load_balancer_class,
        internal_traffic_policy: s.internal_traffic_policy,
        traffic_distribution: s.traffic_distribution,
    }
}

fn service_port(p: pb_core::ServicePort) -> core::ServicePort {
    core::ServicePort {
        name: text(p.name),
        protocol: text(p.protocol),
        app_protocol: p.app_protocol,
        port: p.port.unwrap_or(0),
        target_port: p.target_port.and_then(int_or_string),
        node_port: number(p.node_port),
    }
}

/// `IntOrString` is a struct: JSON writes it even when zero, as protobuf does.
fn int_or_string(v: k8s_pb::apimachinery::pkg::util::intstr::IntOrString) -> Option<IntOrString> {
    Some(match v.r#type {
        Some(1) => IntOrString::String(v.str_val.unwrap_or_default()),
        _ => IntOrString::Int(v.int_val.unwrap_or(0)),
    })
}

fn ingress(i: pb_core::LoadBalancerIngress) -> core::LoadBalancerIngress {
    core::LoadBalancerIngress {
        ip: text(i.ip),
        hostname: text(i.hostname),
        ip_mode: i.ip_mode,
        ports: list(
            i.ports
                .into_iter()
                .map(|p| core::PortStatus {
                    port: p.port.unwrap_or(0),
                    protocol: p.protocol.unwrap_or_default(),
                    error: p.error,
                })
                .collect(),
        ),
    }
}

pub fn endpoint_slice(s: pb_discovery::EndpointSlice) -> discovery::EndpointSlice {
    discovery::EndpointSlice {
        metadata: object_meta(s.metadata.unwrap_or_default()),
        address_type: s.address_type.unwrap_or_default(),
        endpoints: s.endpoints.into_iter().map(endpoint).collect(),
        ports: list(
            s.ports
                .into_iter()
                .map(|p| discovery::EndpointPort {
                    name: p.name,
                    protocol: p.protocol,
                    port: p.port,
                    app_protocol: p.app_protocol,
                })
                .collect(),
        ),
    }
}

fn endpoint(e: pb_discovery::Endpoint) -> discovery::Endpoint {
    discovery::Endpoint {
        addresses: e.addresses,
        conditions: e.conditions.map(|c| discovery::EndpointConditions {
            ready: c.ready,
            serving: c.serving,
            terminating: c.terminating,
        }),
        // Hostname, target reference and deprecated topology are never read (`Slim`).
        hostname: None,
        target_ref: None,
        deprecated_topology: None,
        node_name: e.node_name,
        zone: e.zone,
        hints: e.hints.map(|h| discovery::EndpointHints {
            for_zones: list(
                h.for_zones
                    .into_iter()
                    .map(|z| discovery::ForZone {
                        name: z.name.unwrap_or_default(),
                    })
                    .collect(),
            ),
            for_nodes: list(
                h.for_nodes
                    .into_iter()
                    .map(|n| discovery::ForNode {
                        name: n.name.unwrap_or_default(),
                    })
                    .collect(),
            ),
        }),
    }
}

/// A `metav1.Status` (a failed request, or a watch's ERROR event) as kube's type.
pub fn status(s: pb_meta::Status) -> kube::core::Status {
    kube::core::Status {
        status: match s.status.as_deref() {
            Some("Success") => Some(kube::core::response::StatusSummary::Success),
            Some("Failure") => Some(kube::core::response::StatusSummary::Failure),
            _ => None,
        },
        code: s.code.and_then(|c| u16::try_from(c).ok()).unwrap_or(0),
        message: s.message.unwrap_or_default(),
        reason: s.reason.unwrap_or_default(),
        ..kube::core::Status::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::watch::Slim;
    use crate::model::{ReadService, ReadSlice};

    /// The JSON list's items, as kube-runtime's watcher would hand them over.
    fn json_items<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
        let v: serde_json::Value = serde_json::from_slice(bytes).expect("json");
        serde_json::from_value(v["items"].clone()).expect("items")
    }

    /// Every object a real kube-apiserver sent (src/k8s/testdata, captured by
    /// integration/bench/pbfixtures.py) reads the same from protobuf as from JSON: the whole
    /// object as the agent keeps it, and what the model reads of it.
    #[test]
    fn protobuf_reads_as_json_does() {
        let list: pb_core::ServiceList =
            decode(include_bytes!("testdata/services.pb"), "ServiceList").expect("decode");
        let from_pb: Vec<core::Service> = list.items.into_iter().map(service).collect();
        let from_json: Vec<core::Service> = json_items(include_bytes!("testdata/services.json"));
        assert_eq!(from_pb.len(), 9);
        assert_eq!(from_pb.len(), from_json.len());
        for (mut p, mut j) in from_pb.into_iter().zip(from_json) {
            p.slim();
            j.slim();
            assert_eq!(p, j);
            assert_eq!(ReadService::read(&p), ReadService::read(&j));
        }

        let list: pb_discovery::EndpointSliceList = decode(
            include_bytes!("testdata/endpointslices.pb"),
            "EndpointSliceList",
        )
        .expect("decode");
        let from_pb: Vec<discovery::EndpointSlice> =
            list.items.into_iter().map(endpoint_slice).collect();
        let from_json: Vec<discovery::EndpointSlice> =
            json_items(include_bytes!("testdata/endpointslices.json"));
        assert_eq!(from_pb.len(), 4);
        assert_eq!(from_pb.len(), from_json.len());
        for (mut p, mut j) in from_pb.into_iter().zip(from_json) {
            p.slim();
            j.slim();
            assert_eq!(p, j);
            for node in ["bench-node", "other"] {
                assert_eq!(ReadSlice::read(&p, node), ReadSlice::read(&j, node));
            }
        }
    }

    #[test]
    fn an_envelope_of_another_kind_or_no_envelope_is_refused() {
        let bytes = include_bytes!("testdata/services.pb");
        assert!(matches!(
            decode::<pb_discovery::EndpointSliceList>(bytes, "EndpointSliceList"),
            Err(PbError::Kind { .. })
        ));
        assert!(matches!(
            decode::<pb_core::ServiceList>(&bytes[4..], "ServiceList"),
            Err(PbError::Magic)
        ));
    }
}
