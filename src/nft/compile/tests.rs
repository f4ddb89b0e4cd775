//! Compile table tests (set membership per Service shape) and regressions found by the
//! engine's property test (`pipeline::tests`).

use k8s_openapi::api::core::v1::Service;

use crate::nft::ir::Ruleset;

use super::*;
use crate::apply::fake::FakeApplier;
use crate::apply::Applier;
use crate::model::NodeInfo;
use crate::nft::plan;
use crate::pipeline::Model;

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        internal_ips: vec!["192.168.0.2".parse().expect("ip")],
        ..NodeInfo::default()
    }
}

fn lb_service(name: &str, cluster_ip: &str, ranges: &[&str]) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ns0", "name": name},
        "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"name": "p0", "port": 80, "protocol": "TCP"}],
            "loadBalancerSourceRanges": ranges},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}},
    }))
    .expect("service")
}

/// Regression: two LoadBalancer Services with one LB IP:port (bad input, reported as a
/// conflict) each put their source ranges on that entry. The loser's ranges applied to the
/// winner's traffic, and overlapping intervals (192.168.0.0/24 and 192.168.0.3/32) made the
/// kernel refuse every commit.
#[test]
fn a_conflicting_lb_service_adds_no_source_ranges() {
    let a = lb_service("a", "172.30.0.1", &["192.168.0.3/32"]);
    let b = lb_service("b", "172.30.0.2", &["192.168.0.0/24"]);
    let cfg = CompileConfig {
        node_ips: node().internal_ips,
        families: vec![Family::Ip],
        ..CompileConfig::default()
    };
    let m = Model::from_objects([&a, &b], [], &[], &node());
    let c = Compiled::new(m.state(), &cfg).expect("compile");
    assert_eq!(c.problems().len(), 1, "{:?}", c.problems());
    let allow: Vec<String> = c.ruleset().tables[&Family::Ip]
        .elements
        .get("firewall-allow")
        .map(|els| {
            els.iter()
                .map(|e| {
                    e.key()
                        .iter()
                        .map(crate::nft::render::value)
                        .collect::<Vec<_>>()
                        .join(" . ")
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(allow, vec!["192.0.2.1 . tcp . 80 . 192.168.0.3"]);
    FakeApplier::new()
        .apply(&plan::full(c.ruleset()))
        .expect("the commit succeeds");
}

/// One row of the table: a Service (type, policies, affinity) and its endpoints on node-a or
/// elsewhere, and the elements it must put in the sets that decide its traffic.
struct Row {
    name: &'static str,
    spec: serde_json::Value,
    /// (address, node, ready, serving, terminating)
    endpoints: &'static [(&'static str, &'static str, bool, bool, bool)],
    want: &'static [(&'static str, &'static [&'static str])],
}

fn rendered(rs: &Ruleset, set: &str) -> Vec<String> {
    let mut out: Vec<String> = rs.tables[&Family::Ip]
        .elements
        .get(set)
        .map(|els| els.iter().map(crate::nft::render::element).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Table test of the compiler's set membership per Service shape: entry points, the
/// no-endpoint verdicts (reject when there are none anywhere, drop when only the policy rules
/// them out), Local-policy sets, affinity and backends.
#[test]
fn set_membership_by_service_shape() {
    use serde_json::json;
    let rows = [
        Row {
            name: "ClusterIP, ready endpoints",
            spec: json!({"type": "ClusterIP"}),
            endpoints: &[("10.0.1.1", "node-b", true, true, false), ("10.0.1.2", "node-a", true, true, false)],
            want: &[
                ("clusterip", &["172.30.0.1 . tcp . 80"]),
                ("no-endpoint-reject", &[]),
                ("no-endpoint-drop", &[]),
                ("ip-cluster-backends", &["172.30.0.1 . tcp . 80 . 0 : 10.0.1.1 . 8080", "172.30.0.1 . tcp . 80 . 1 : 10.0.1.2 . 8080"]),
            ],
        },
        Row {
            name: "ClusterIP, no endpoints: reject",
            spec: json!({"type": "ClusterIP"}),
            endpoints: &[],
            want: &[("no-endpoint-reject", &["172.30.0.1 . tcp . 80"]), ("ip-cluster-backends", &[])],
        },
        Row {
            name: "ClusterIP, only not-ready endpoints: reject",
            spec: json!({"type": "ClusterIP"}),
            endpoints: &[("10.0.1.1", "node-b", false, false, false)],
            want: &[("no-endpoint-reject", &["172.30.0.1 . tcp . 80"])],
        },
        Row {
            name: "ClusterIP, only terminating serving endpoints: used as a fallback",
            spec: json!({"type": "ClusterIP"}),
            endpoints: &[("10.0.1.1", "node-b", false, true, true)],
            want: &[
                ("no-endpoint-reject", &[]),
                ("ip-cluster-backends", &["172.30.0.1 . tcp . 80 . 0 : 10.0.1.1 . 8080"]),
            ],
        },
        Row {
            name: "NodePort, externalTrafficPolicy Local, endpoints elsewhere only: drop outside traffic",
            spec: json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                         "ports": [{"name": "p0", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
            endpoints: &[("10.0.1.1", "node-b", true, true, false)],
            want: &[
                // Local-policy NodePorts dispatch through their own set, not the cluster one.
                ("nodeport", &[]),
                ("nodeport-local", &["tcp . 30080"]),
                ("nodeport-no-endpoint-drop", &["tcp . 30080"]),
                ("nodeport-no-endpoint-reject", &[]),
                ("no-endpoint-reject", &[]),
            ],
        },
        Row {
            name: "internalTrafficPolicy Local, endpoints elsewhere only: drop",
            spec: json!({"type": "ClusterIP", "internalTrafficPolicy": "Local"}),
            endpoints: &[("10.0.1.1", "node-b", true, true, false)],
            want: &[
                ("clusterip-local", &["172.30.0.1 . tcp . 80"]),
                ("no-endpoint-drop", &["172.30.0.1 . tcp . 80"]),
                ("no-endpoint-reject", &[]),
            ],
        },
        Row {
            name: "ClientIP affinity: the entry is in the affinity dispatch",
            spec: json!({"type": "ClusterIP", "sessionAffinity": "ClientIP",
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
            endpoints: &[("10.0.1.1", "node-b", true, true, false)],
            want: &[("ip-cluster-backends", &["172.30.0.1 . tcp . 80 . 0 : 10.0.1.1 . 8080"])],
        },
    ];
    let cfg = CompileConfig {
        node_ips: node().internal_ips,
        families: vec![Family::Ip],
        cluster_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")],
        nodeport_cidrs: vec!["192.168.0.2/32".parse().expect("cidr")],
        ..CompileConfig::default()
    };
    let mut failures = Vec::new();
    for row in &rows {
        let mut spec = row.spec.clone();
        spec["clusterIP"] = json!("172.30.0.1");
        spec["clusterIPs"] = json!(["172.30.0.1"]);
        if spec.get("ports").is_none() {
            spec["ports"] = json!([{"name": "p0", "port": 80, "protocol": "TCP"}]);
        }
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "s"}, "spec": spec,
        }))
        .expect("service");
        let eps: Vec<serde_json::Value> = row
            .endpoints
            .iter()
            .map(|(ip, n, r, s, t)| {
                json!({"addresses": [ip], "nodeName": n,
                "conditions": {"ready": r, "serving": s, "terminating": t}})
            })
            .collect();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        }))
        .expect("slice");
        let m = Model::from_objects([&svc], [&slice], &[], &node());
        let (rs, problems) = compile_checked(m.state(), &cfg).expect("compile");
        assert!(problems.is_empty(), "{}: {problems:?}", row.name);
        for (set, want) in row.want {
            let got = rendered(&rs, set);
            let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            want.sort();
            if got != want {
                failures.push(format!(
                    "{}: set {set}: got {got:?}, want {want:?}",
                    row.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A ruleset at 50,000 Services holds ~1.5 million values in ~400,000 elements: their size is
/// most of the agent's settled memory. 24 bytes a value; an element is one pointer to its key
/// and value, stored together in one exactly sized block, and a length (24 bytes in its set's
/// tree node; it was 48, plus a second heap block).
#[test]
fn elements_are_compact() {
    assert!(
        std::mem::size_of::<Value>() <= 24,
        "{}",
        std::mem::size_of::<Value>()
    );
    assert!(
        std::mem::size_of::<Element>() <= 24,
        "{}",
        std::mem::size_of::<Element>()
    );
    let cfg = CompileConfig {
        node_ips: node().internal_ips,
        families: vec![Family::Ip],
        ..CompileConfig::default()
    };
    let objs = crate::testutil::cluster_objects();
    let m = Model::from_objects(objs.services.iter(), objs.slices.iter(), &[], &node());
    let c = Compiled::new(m.state(), &cfg).expect("compile");
    let mut seen = 0;
    for (set, els) in &c.ruleset().tables[&Family::Ip].elements {
        for e in els {
            let again = Element::new(e.key().to_vec(), e.value().map(<[Value]>::to_vec));
            assert_eq!(&again, e, "{set}");
            seen += usize::from(is_backends_map(set) && e.key().len() == 4);
        }
    }
    assert!(seen > 0, "no backend slots compiled");
}

/// Regression (found by the property test in CI): a Service whose externalIP is another
/// Service's ClusterIP. The other Service's cluster-ips element rejects every port of that
/// address the services map does not take, so it must go into the same transaction of a split
/// commit as the first Service's entry points, or that Service is seen rejecting its external
/// traffic before its own elements arrive. Likewise a NodePort and an external IP on the node's
/// address with the NodePort's number (found once the generator had node addresses).
#[test]
fn services_reached_by_each_others_elements_share_a_group() {
    let svc = |name: &str, ip: &str, proto: &str, external: &[&str]| -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns0", "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                "ports": [{"name": "p0", "port": 80, "protocol": proto}],
                "externalIPs": external},
        }))
        .expect("service")
    };
    let a = svc("a", "172.30.0.1", "TCP", &[]);
    let b = svc("b", "172.30.0.2", "UDP", &["172.30.0.1"]);
    let c = svc("c", "172.30.0.3", "UDP", &["198.51.100.1"]);
    // A NodePort, and an external IP that is the node's address on the NodePort's number.
    let mut d = svc("d", "172.30.0.4", "TCP", &[]);
    if let Some(spec) = d.spec.as_mut() {
        spec.type_ = Some("NodePort".into());
        if let Some(p) = spec.ports.as_mut().and_then(|p| p.first_mut()) {
            p.node_port = Some(30000);
        }
    }
    let mut e = svc("e", "172.30.0.5", "TCP", &["192.168.0.2"]);
    if let Some(p) = e
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
        .and_then(|p| p.first_mut())
    {
        p.port = 30000;
    }
    let m = Model::from_objects([&a, &b, &c, &d, &e], [], &[], &node());
    let owners = Owners::new([m.state()]);
    let addr = |s: &str| Value::Addr(s.parse().expect("ip"));
    let el = |key: Vec<Value>| Element::new(key, None);
    let a_ip = owners.group(names::CLUSTER_IPS, &el(vec![addr("172.30.0.1")]));
    let b_external = owners.group(
        names::NO_ENDPOINT_REJECT,
        &el(vec![
            addr("172.30.0.1"),
            Value::Proto(Proto::Udp),
            Value::Port(80),
        ]),
    );
    let c_ip = owners.group(names::CLUSTER_IPS, &el(vec![addr("172.30.0.3")]));
    assert_eq!(a_ip, b_external);
    // An external IP nobody has as ClusterIP links no one.
    assert_ne!(a_ip, c_ip);
    // The external entry point takes the NodePort's port on the node's address first.
    let d_nodeport = owners.group(
        names::NODEPORT,
        &el(vec![Value::Proto(Proto::Tcp), Value::Port(30000)]),
    );
    let e_external = owners.group(
        names::EXTERNAL,
        &el(vec![
            addr("192.168.0.2"),
            Value::Proto(Proto::Tcp),
            Value::Port(30000),
        ]),
    );
    assert_eq!(d_nodeport, e_external);
    assert_ne!(d_nodeport, a_ip);
}
