//! Compile regressions found by the engine's property test (`pipeline::tests`).

use k8s_openapi::api::core::v1::Service;

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
                    e.key
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
