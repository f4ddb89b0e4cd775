use super::*;
use serde_json::json;

fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("service json")
}
fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("slice json")
}

fn basic(spec: serde_json::Value) -> serde_json::Value {
    json!({"metadata": {"namespace": "ns", "name": "web"}, "spec": spec})
}

#[test]
fn clusterip_service_gives_one_port_per_family() {
    let mut p = Vec::new();
    let s = svc(basic(
        json!({"clusterIPs": ["172.30.0.10", "fd00:30::10"], "ports": [
        {"name": "http", "port": 80},
        {"name": "dns", "port": 53, "protocol": "UDP"}]}),
    ));
    let ports = service_ports(&s, &mut p);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(ports.len(), 4);
    let v4: Vec<_> = ports.iter().filter(|sp| sp.family == Family::Ip).collect();
    assert_eq!(v4[0].key.proto, Proto::Tcp);
    assert_eq!(v4[1].key.proto, Proto::Udp);
    assert_eq!(v4[0].cluster_ip.to_string(), "172.30.0.10");
    assert!(v4
        .iter()
        .all(|sp| sp.node_port.is_none() && !sp.external_local && sp.affinity_secs.is_none()));
}

#[test]
fn skipped_services() {
    let cases = [
        (
            "headless",
            basic(json!({"clusterIP": "None", "ports": [{"port": 80}]})),
        ),
        (
            "external name",
            basic(
                json!({"type": "ExternalName", "externalName": "x.example", "ports": [{"port": 80}]}),
            ),
        ),
        ("no cluster ip yet", basic(json!({"ports": [{"port": 80}]}))),
        (
            "other proxy",
            json!({"metadata": {"namespace": "ns", "name": "x", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
                   "spec": {"clusterIP": "172.30.0.1", "ports": [{"port": 80}]}}),
        ),
    ];
    for (what, v) in cases {
        let mut p = Vec::new();
        assert!(service_ports(&svc(v), &mut p).is_empty(), "{what}");
        assert!(
            p.is_empty(),
            "{what}: skipping silently is right, got {p:?}"
        );
    }
}

#[test]
fn bad_input_is_reported_and_skipped() {
    let mut p = Vec::new();
    let s = svc(basic(
        json!({"clusterIP": "172.30.0.10", "type": "LoadBalancer",
        "externalIPs": ["192.0.2.300", "192.0.2.7"],
        "loadBalancerSourceRanges": ["not-a-cidr", " 203.0.113.0/24 "],
        "ports": [{"name": "a", "port": 0}, {"name": "b", "port": 70000}, {"name": "c", "port": 81, "protocol": "ICMP"},
                  {"name": "d", "port": 82, "nodePort": 99999}, {"name": "d", "port": 83}]}),
    ));
    let ports = service_ports(&s, &mut p);
    assert_eq!(ports.len(), 1, "only port d survives");
    assert_eq!(ports[0].port, 82);
    assert_eq!(ports[0].node_port, None);
    assert_eq!(ports[0].external_ips.len(), 1);
    assert_eq!(
        ports[0].source_ranges,
        vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]
    );
    let reasons: Vec<_> = p.iter().map(|p| p.reason.as_str()).collect();
    assert_eq!(p.len(), 7, "{reasons:#?}");
    assert!(p.iter().all(|p| p.object.to_string() == "Service ns/web"));
    assert!(reasons.iter().any(|r| r.contains("192.0.2.300")));
    assert!(reasons.iter().any(|r| r.contains("70000")));
    assert!(reasons.iter().any(|r| r.contains("duplicate port")));
}

/// The API accepts any number of ports, and kube-proxy programs them all: so does nftproxy
/// (it once skipped Services with more than 1,000).
#[test]
fn many_ports_are_all_modelled() {
    let ports: Vec<_> = (1..=1500)
        .map(|i| json!({"name": format!("p{i}"), "port": i}))
        .collect();
    let mut p = Vec::new();
    let sps = service_ports(
        &svc(basic(json!({"clusterIP": "172.30.0.10", "ports": ports}))),
        &mut p,
    );
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(sps.len(), 1500);
    assert_eq!(sps[1499].port, 1500);
}

#[test]
fn load_balancer_fields() {
    let mut p = Vec::new();
    let mut v = basic(
        json!({"clusterIP": "172.30.0.10", "type": "LoadBalancer", "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 32000, "sessionAffinity": "ClientIP",
        "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8::/64"],
        "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    v["status"] = json!({"loadBalancer": {"ingress": [
        {"ip": "192.0.2.10"}, {"ip": "192.0.2.11", "ipMode": "Proxy"}, {"hostname": "lb.example"}, {"ip": "2001:db8::10"}]}});
    let ports = service_ports(&svc(v), &mut p);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(ports.len(), 1, "single-stack service");
    let sp = &ports[0];
    assert_eq!(sp.lb_ips, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(sp.source_ranges.len(), 1);
    assert!(sp.external_local);
    assert_eq!(sp.node_port, Some(30080));
    assert_eq!(sp.health_check_node_port, Some(32000));
    assert_eq!(sp.affinity_secs, Some(DEFAULT_AFFINITY_SECS));
}

#[test]
fn external_policy_needs_external_entries() {
    let mut p = Vec::new();
    let cip = service_ports(
        &svc(basic(
            json!({"clusterIP": "172.30.0.10", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
        )),
        &mut p,
    );
    assert!(
        !cip[0].external_local,
        "a plain ClusterIP service has no external traffic"
    );
    let eip = service_ports(
        &svc(basic(
            json!({"clusterIP": "172.30.0.10", "externalTrafficPolicy": "Local", "externalIPs": ["192.0.2.5"], "ports": [{"port": 80}]}),
        )),
        &mut p,
    );
    assert!(eip[0].external_local);
    let np = service_ports(
        &svc(basic(
            json!({"clusterIP": "172.30.0.10", "type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30000}]}),
        )),
        &mut p,
    );
    assert_eq!(
        np[0].node_port, None,
        "nodePort only counts on NodePort/LoadBalancer services"
    );
}

fn ep_slice(name: &str, eps: serde_json::Value) -> EndpointSlice {
    slice(
        json!({"metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}),
    )
}

#[test]
fn slice_conditions_and_locality() {
    let mut p = Vec::new();
    let s = ep_slice(
        "web-1",
        json!([
            {"addresses": ["10.0.0.1"], "nodeName": "node-a"},
            {"addresses": ["10.0.0.2"], "nodeName": "node-b", "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.3", "10.0.0.99"], "conditions": {"ready": true}, "hints": {"forZones": [{"name": "z1"}]}},
            {"addresses": ["bogus"]},
            {"addresses": ["fd00::1"]}
        ]),
    );
    let info = slice_info(&s, "node-a", &mut p).expect("slice");
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(info.service.name, "web");
    let eps = &info
        .ports
        .iter()
        .find(|(k, _)| *k == ("http".to_string(), Proto::Tcp))
        .expect("http/tcp")
        .1;
    assert_eq!(eps.len(), 3);
    assert!(eps[0].ready && eps[0].serving && !eps[0].terminating && eps[0].local);
    assert!(!eps[1].ready && eps[1].serving && eps[1].terminating && !eps[1].local);
    assert_eq!(
        eps[2].ip.to_string(),
        "10.0.0.3",
        "only addresses[0] counts"
    );
    assert_eq!(eps[2].zone_hints, vec!["z1".to_string()]);
}

#[test]
fn slices_skipped() {
    let mut p = Vec::new();
    let mut fqdn = ep_slice("f", json!([]));
    fqdn.address_type = "FQDN".into();
    assert!(slice_info(&fqdn, "n", &mut p).is_none());
    let mut unlabelled = ep_slice("u", json!([]));
    unlabelled.metadata.labels = None;
    assert!(slice_info(&unlabelled, "n", &mut p).is_none());
    assert!(p.is_empty());
    let huge: Vec<_> = (0..1001)
        .map(|i| json!({"addresses": [format!("10.1.{}.{}", i / 250, i % 250)]}))
        .collect();
    assert!(slice_info(&ep_slice("h", json!(huge)), "n", &mut p).is_none());
    assert_eq!(p.len(), 1);
}

#[test]
fn merge_prefers_non_terminating_duplicate() {
    let mut p = Vec::new();
    let a = slice_info(&ep_slice("a", json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false, "terminating": true}}])), "n", &mut p).unwrap();
    let b = slice_info(
        &ep_slice(
            "b",
            json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.0"]}]),
        ),
        "n",
        &mut p,
    )
    .unwrap();
    let merged = merge_slices([&a, &b]);
    let eps = &merged[&("http".to_string(), Proto::Tcp)];
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[0].ip.to_string(), "10.0.0.0", "sorted");
    assert!(eps[1].ready && !eps[1].terminating);
}
