use super::*;
use crate::model::{PortKey, ServiceName};
use crate::net::Proto;

fn sp(internal_local: bool, external_local: bool, node_port: bool) -> ServicePort {
    ServicePort {
        key: PortKey {
            service: ServiceName {
                namespace: "ns".into(),
                name: "s".into(),
            },
            port_name: String::new(),
            proto: Proto::Tcp,
        },
        family: Family::Ip,
        cluster_ip: "172.30.0.1".parse().unwrap(),
        port: 80,
        node_port: node_port.then_some(30080),
        external_ips: vec![],
        lb_ips: vec![],
        source_ranges: vec![],
        external_local,
        internal_local,
        affinity_secs: None,
        health_check_node_port: None,
    }
}

/// `spec`: "<last octet><r|t|-><l|.>[z<zones>][n<nodes>]" — ready / serving+terminating / neither, local or not.
fn ep(spec: &str) -> Endpoint {
    let mut parts = spec.split(['z', 'n']);
    let head = parts.next().unwrap();
    let (num, flags) = head.split_at(head.len() - 2);
    let state = flags.as_bytes()[0];
    let hints = |tag: char| -> Vec<String> {
        spec.split_once(tag)
            .map(|(_, rest)| {
                rest.split(['z', 'n'])
                    .next()
                    .unwrap()
                    .split(',')
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    Endpoint {
        ip: format!("10.0.0.{num}").parse().unwrap(),
        port: 8080,
        ready: state == b'r',
        serving: state != b'-',
        terminating: state == b't',
        local: flags.as_bytes()[1] == b'l',
        zone_hints: hints('z').into_iter().map(|z| format!("z{z}")).collect(),
        node_hints: hints('n'),
    }
}

fn ips(b: &[Backend]) -> Vec<u8> {
    b.iter()
        .map(|(ip, _)| match ip {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        })
        .collect()
}

#[test]
fn endpoint_choice_table() {
    // (what, itp local, etp local, nodeport, zone, endpoints, cluster, local, has_any, local_ready)
    #[allow(clippy::type_complexity)]
    let cases: &[(
        &str,
        bool,
        bool,
        bool,
        Option<&str>,
        &[&str],
        &[u8],
        &[u8],
        bool,
        usize,
    )] = &[
        (
            "ready ones only",
            false,
            false,
            false,
            None,
            &["1r.", "2t.", "3-."],
            &[1],
            &[],
            true,
            0,
        ),
        (
            "terminating fallback",
            false,
            false,
            false,
            None,
            &["2t.", "3-."],
            &[2],
            &[],
            true,
            0,
        ),
        (
            "nothing serving",
            false,
            false,
            false,
            None,
            &["3-."],
            &[],
            &[],
            false,
            0,
        ),
        (
            "itp local: local ready",
            true,
            false,
            false,
            None,
            &["1rl", "2r."],
            &[],
            &[1],
            true,
            1,
        ),
        (
            "itp local: none local",
            true,
            false,
            false,
            None,
            &["2r."],
            &[],
            &[],
            true,
            0,
        ),
        (
            "itp local: local terminating fallback",
            true,
            false,
            false,
            None,
            &["1tl", "2r."],
            &[],
            &[1],
            true,
            0,
        ),
        (
            "itp local: remote terminating only (upstream counts it: drop, not reject)",
            true,
            false,
            false,
            None,
            &["2t."],
            &[],
            &[],
            true,
            0,
        ),
        (
            "etp local: both sets",
            false,
            true,
            true,
            None,
            &["1rl", "2r."],
            &[1, 2],
            &[1],
            true,
            1,
        ),
        (
            "etp local: local terminating not counted",
            false,
            true,
            true,
            None,
            &["1tl", "2r."],
            &[2],
            &[1],
            true,
            0,
        ),
        (
            "itp+etp local keeps cluster set for short-circuit",
            true,
            true,
            true,
            None,
            &["2r."],
            &[2],
            &[],
            true,
            0,
        ),
        (
            "zone hints used",
            false,
            false,
            false,
            Some("z1"),
            &["1r.z1", "2r.z2"],
            &[1],
            &[],
            true,
            0,
        ),
        (
            "zone hints ignored when one endpoint lacks them",
            false,
            false,
            false,
            Some("z1"),
            &["1r.z1", "2r."],
            &[1, 2],
            &[],
            true,
            0,
        ),
        (
            "zone hints ignored when none for our zone",
            false,
            false,
            false,
            Some("z3"),
            &["1r.z1", "2r.z2"],
            &[1, 2],
            &[],
            true,
            0,
        ),
        (
            "zone hints ignored without a node zone",
            false,
            false,
            false,
            None,
            &["1r.z1", "2r.z2"],
            &[1, 2],
            &[],
            true,
            0,
        ),
        (
            "node hints win over zone",
            false,
            false,
            false,
            Some("z1"),
            &["1r.z1nme", "2r.z1nother"],
            &[1],
            &[],
            true,
            0,
        ),
        (
            "node hints for another node fall back to zone",
            false,
            false,
            false,
            Some("z1"),
            &["1r.z1nx", "2r.z2ny"],
            &[1],
            &[],
            true,
            0,
        ),
        (
            "local choice ignores topology",
            true,
            false,
            false,
            Some("z1"),
            &["1rlz2", "2r.z1"],
            &[],
            &[1],
            true,
            1,
        ),
    ];
    for (what, itp, etp, np, zone, eps, cluster, local, has_any, local_ready) in cases {
        let eps: Vec<Endpoint> = eps.iter().map(|s| ep(s)).collect();
        let c = choose(&sp(*itp, *etp, *np), &eps, "me", *zone);
        assert_eq!(ips(&c.cluster), cluster.to_vec(), "{what}: cluster");
        assert_eq!(ips(&c.local), local.to_vec(), "{what}: local");
        assert_eq!(c.has_any, *has_any, "{what}: has_any");
        assert_eq!(c.local_ready, *local_ready, "{what}: local_ready");
    }
}

#[test]
fn port_state_takes_its_port_and_local_ips() {
    let s = sp(false, false, false);
    let mut pe: PortEndpoints = BTreeMap::new();
    pe.insert((String::new(), Proto::Tcp), vec![ep("1rl"), ep("2r.")]);
    let ps = port_state(&s, Some(&pe), "me", None);
    assert_eq!(ips(&ps.chosen.cluster), vec![1, 2]);
    assert_eq!(ps.local_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    // Another port name has no endpoints.
    let mut other = s.clone();
    other.key.port_name = "other".into();
    assert!(port_state(&other, Some(&pe), "me", None)
        .chosen
        .cluster
        .is_empty());
}
