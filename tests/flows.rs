//! Semantics, not text: trace first packets through the generated ruleset (DESIGN §2, row by row).
//! The scenario and its address plan are in tests/flows/cluster.yaml; the ruleset is node-a's.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use nftproxy::net::{Family, Proto};
use nftproxy::nft::ir::Ruleset;
use nftproxy::trace::{Origin, Outcome, Packet, Tracer};

const NODE_A: &str = "192.168.0.2";

fn ruleset(masquerade_all: bool) -> Ruleset {
    let path = common::root().join("tests/flows/cluster.yaml");
    let objs = common::load_objects(&path);
    let node = objs.node_info(Some("node-a"));
    let mut cfg = common::proxy_config("node-a");
    cfg.masquerade_all = masquerade_all;
    let (rs, problems) = nftproxy::pipeline::from_objects(&objs, &cfg, &node)
        .map(|o| (o.ruleset, o.problems))
        .expect("compile");
    assert!(problems.is_empty(), "{problems:?}");
    rs
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Expected outcomes: "10.0.1.1:8080" / "10.0.1.1:8080 masq" / "drop" / "reject" / "pass 1.2.3.4:80".
fn expect(specs: &[&str]) -> BTreeSet<Outcome> {
    specs
        .iter()
        .map(|s| match *s {
            "drop" => Outcome::Drop,
            "reject" => Outcome::Reject,
            other => {
                let masq = other.ends_with(" masq");
                let addr = other.trim_end_matches(" masq");
                let (a, p) = addr.rsplit_once(':').unwrap();
                Outcome::Accept {
                    dst: ip(a.trim_start_matches('[').trim_end_matches(']')),
                    port: p.parse().unwrap(),
                    masquerade: masq,
                }
            }
        })
        .collect()
}

fn pkt(origin: Origin, src: &str, dst: &str, proto: Proto, dport: u16) -> Packet {
    Packet {
        origin,
        src: ip(src),
        dst: ip(dst),
        proto,
        dport,
        // Pods' traffic arrives on their veth; everything else on the node's uplink.
        iif: if src.starts_with("10.") || src.starts_with("fd00:10:") {
            "veth-pod".into()
        } else {
            "eth0".into()
        },
    }
}

use Origin::{Local, Remote};
use Proto::{Sctp, Tcp, Udp};

#[test]
fn flows_through_node_a() {
    let rs = ruleset(false);
    let t4 = Tracer::new(Family::Ip, &rs.tables[&Family::Ip], &[ip(NODE_A)]);
    let t6 = Tracer::new(Family::Ip6, &rs.tables[&Family::Ip6], &[ip("fd00:168::2")]);
    #[rustfmt::skip]
    let cases: &[(&str, Packet, &[&str])] = &[
        ("pod -> ClusterIP: any endpoint, pod IP kept", pkt(Remote, "10.0.1.50", "172.30.0.10", Tcp, 80), &["10.0.1.1:8080", "10.0.2.1:8080"]),
        ("off-cluster source -> ClusterIP: masqueraded", pkt(Remote, "203.0.113.5", "172.30.0.10", Tcp, 80), &["10.0.1.1:8080 masq", "10.0.2.1:8080 masq"]),
        ("node itself -> ClusterIP: masqueraded", pkt(Local, NODE_A, "172.30.0.10", Tcp, 80), &["10.0.1.1:8080 masq", "10.0.2.1:8080 masq"]),
        ("hairpin: endpoint reaching itself is masqueraded", pkt(Remote, "10.0.1.1", "172.30.0.10", Tcp, 80), &["10.0.1.1:8080 masq", "10.0.2.1:8080"]),
        ("ETP Cluster LB IP: masqueraded", pkt(Remote, "203.0.113.5", "192.0.2.11", Tcp, 80), &["10.0.2.2:8080 masq"]),
        ("ETP Cluster NodePort: masqueraded", pkt(Remote, "203.0.113.5", NODE_A, Tcp, 30011), &["10.0.2.2:8080 masq"]),
        ("ETP Local LB IP from outside: local endpoint, client IP kept", pkt(Remote, "203.0.113.5", "192.0.2.12", Tcp, 80), &["10.0.1.3:8080"]),
        ("ETP Local NodePort from outside: local endpoint, client IP kept", pkt(Remote, "203.0.113.5", NODE_A, Tcp, 30012), &["10.0.1.3:8080"]),
        ("ETP Local LB IP from a pod: short-circuit to all endpoints", pkt(Remote, "10.0.2.50", "192.0.2.12", Tcp, 80), &["10.0.1.3:8080", "10.0.2.3:8080"]),
        ("ETP Local LB IP from the node: all endpoints, masqueraded", pkt(Local, NODE_A, "192.0.2.12", Tcp, 80), &["10.0.1.3:8080 masq", "10.0.2.3:8080 masq"]),
        ("ETP Local NodePort from the node: all endpoints, masqueraded", pkt(Local, NODE_A, NODE_A, Tcp, 30012), &["10.0.1.3:8080 masq", "10.0.2.3:8080 masq"]),
        ("ETP Local ClusterIP: cluster endpoints", pkt(Remote, "10.0.1.50", "172.30.0.12", Tcp, 80), &["10.0.1.3:8080", "10.0.2.3:8080"]),
        ("ETP Local, no local endpoint: LB IP drops outside traffic", pkt(Remote, "203.0.113.5", "192.0.2.13", Tcp, 80), &["drop"]),
        ("ETP Local, no local endpoint: NodePort drops outside traffic", pkt(Remote, "203.0.113.5", NODE_A, Tcp, 30013), &["drop"]),
        ("ETP Local, no local endpoint: pods still reach it (no blackhole)", pkt(Remote, "10.0.1.50", "192.0.2.13", Tcp, 80), &["10.0.2.4:8080"]),
        ("no endpoints: ClusterIP rejects", pkt(Remote, "10.0.1.50", "172.30.0.14", Tcp, 80), &["reject"]),
        ("no endpoints: LB IP rejects", pkt(Remote, "203.0.113.5", "192.0.2.14", Tcp, 80), &["reject"]),
        ("no endpoints: NodePort rejects", pkt(Remote, "203.0.113.5", NODE_A, Tcp, 30014), &["reject"]),
        ("no endpoints: rejected for local clients too", pkt(Local, NODE_A, "172.30.0.14", Tcp, 80), &["reject"]),
        ("ITP Local: only the local endpoint", pkt(Remote, "10.0.1.50", "172.30.0.15", Tcp, 80), &["10.0.1.5:8080"]),
        ("ITP Local, endpoints only elsewhere: drop", pkt(Remote, "10.0.1.50", "172.30.0.16", Tcp, 80), &["drop"]),
        ("source ranges: allowed source", pkt(Remote, "203.0.113.5", "192.0.2.17", Tcp, 80), &["10.0.2.7:8080 masq"]),
        ("source ranges: other source dropped", pkt(Remote, "203.0.113.200", "192.0.2.17", Tcp, 80), &["drop"]),
        ("source ranges do not guard the NodePort", pkt(Remote, "203.0.113.200", NODE_A, Tcp, 30017), &["10.0.2.7:8080 masq"]),
        ("source ranges do not guard the ClusterIP", pkt(Remote, "10.0.1.50", "172.30.0.17", Tcp, 80), &["10.0.2.7:8080"]),
        ("externalIP: masqueraded under Cluster policy", pkt(Remote, "203.0.113.5", "192.0.2.18", Tcp, 80), &["10.0.2.8:8080 masq"]),
        ("UDP service", pkt(Remote, "10.0.1.50", "172.30.0.20", Udp, 53), &["10.0.2.12:5353"]),
        ("SCTP service", pkt(Remote, "10.0.1.50", "172.30.0.23", Sctp, 80), &["10.0.2.15:8080"]),
        ("valid ClusterIP, undefined port: reject", pkt(Remote, "10.0.1.50", "172.30.0.20", Tcp, 53), &["reject"]),
        ("unallocated IP in the service CIDR: drop", pkt(Remote, "10.0.1.50", "172.30.5.5", Tcp, 80), &["drop"]),
        ("only terminating endpoints: serving ones used", pkt(Remote, "10.0.1.50", "172.30.0.21", Tcp, 80), &["10.0.2.13:8080"]),
        ("NodePorts never on loopback", pkt(Local, "127.0.0.1", "127.0.0.1", Tcp, 30011), &["127.0.0.1:30011"]),
        ("NodePort on a non-NodePort address: untouched", pkt(Remote, "203.0.113.5", "192.168.0.99", Tcp, 30011), &["192.168.0.99:30011"]),
        ("traffic elsewhere: untouched", pkt(Remote, "10.0.1.50", "203.0.113.9", Tcp, 443), &["203.0.113.9:443"]),
        ("dual-stack Service, IPv4 side", pkt(Remote, "10.0.1.50", "172.30.0.22", Tcp, 80), &["10.0.1.22:8080"]),
    ];
    let mut failures = Vec::new();
    for (what, p, want) in cases {
        let got = t4.trace(p);
        if got != expect(want) {
            failures.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    }
    let cases6: &[(&str, Packet, &[&str])] = &[
        (
            "IPv6 pod -> ClusterIP",
            pkt(Remote, "fd00:10::99", "fd00:30::22", Tcp, 80),
            &["[fd00:10::1]:8080"],
        ),
        (
            "IPv6 outside -> ClusterIP: masqueraded",
            pkt(Remote, "2001:db8::5", "fd00:30::22", Tcp, 80),
            &["[fd00:10::1]:8080 masq"],
        ),
        (
            "IPv6 valid ClusterIP, undefined port",
            pkt(Remote, "fd00:10::99", "fd00:30::22", Tcp, 81),
            &["reject"],
        ),
    ];
    for (what, p, want) in cases6 {
        let got = t6.trace(p);
        if got != expect(want) {
            failures.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} flows wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn masquerade_all_masquerades_pod_traffic_to_clusterips_only() {
    let rs = ruleset(true);
    let t = Tracer::new(Family::Ip, &rs.tables[&Family::Ip], &[ip(NODE_A)]);
    assert_eq!(
        t.trace(&pkt(Remote, "10.0.1.50", "172.30.0.10", Tcp, 80)),
        expect(&["10.0.1.1:8080 masq", "10.0.2.1:8080 masq"])
    );
    assert_eq!(
        t.trace(&pkt(Remote, "10.0.1.50", "192.0.2.12", Tcp, 80)),
        expect(&["10.0.1.3:8080", "10.0.2.3:8080"]),
        "ETP Local pod short-circuit stays unmasqueraded"
    );
}

#[test]
fn client_ip_affinity_sticks_per_client() {
    let rs = ruleset(false);
    let t = Tracer::new(Family::Ip, &rs.tables[&Family::Ip], &[ip(NODE_A)]);
    let first = t.trace(&pkt(Remote, "10.0.1.50", "172.30.0.19", Tcp, 80));
    assert_eq!(
        first.len(),
        3,
        "a new client may land on any endpoint: {first:?}"
    );
    let again = t.trace(&pkt(Remote, "10.0.1.50", "172.30.0.19", Tcp, 80));
    assert_eq!(again.len(), 1, "the same client sticks: {again:?}");
    assert!(first.is_superset(&again));
    assert_eq!(
        t.trace(&pkt(Remote, "10.0.1.51", "172.30.0.19", Tcp, 80))
            .len(),
        3,
        "another client is free"
    );
    let web = t.trace(&pkt(Remote, "10.0.1.50", "172.30.0.10", Tcp, 80));
    assert_eq!(web.len(), 2, "affinity is per service: {web:?}");
    t.expire();
    assert_eq!(
        t.trace(&pkt(Remote, "10.0.1.50", "172.30.0.19", Tcp, 80))
            .len(),
        3,
        "expired affinity"
    );
}

/// The interface detect-local modes decide like the CIDR mode: what arrives on a pod interface
/// (`veth*`, or the bridge) is pod traffic, everything else is not.
#[test]
fn interface_detect_local_modes_trace_like_the_cidr_mode() {
    use nftproxy::pipeline::config::DetectLocal;
    use Origin::*;
    use Proto::*;
    for (mode, iface) in [
        (DetectLocal::InterfaceNamePrefix, "veth"),
        (DetectLocal::BridgeInterface, "veth-pod"),
    ] {
        let rs = common::interface_mode_ruleset(mode, iface);
        let t4 = Tracer::new(Family::Ip, &rs.tables[&Family::Ip], &[ip(NODE_A)]);
        #[rustfmt::skip]
        let cases: &[(&str, Packet, &[&str])] = &[
            ("pod -> ClusterIP: pod IP kept", pkt(Remote, "10.0.1.50", "172.30.0.10", Tcp, 80), &["10.0.1.1:8080", "10.0.2.1:8080"]),
            ("off-cluster source -> ClusterIP: masqueraded", pkt(Remote, "203.0.113.5", "172.30.0.10", Tcp, 80), &["10.0.1.1:8080 masq", "10.0.2.1:8080 masq"]),
            ("node itself -> ClusterIP: masqueraded", pkt(Local, NODE_A, "172.30.0.10", Tcp, 80), &["10.0.1.1:8080 masq", "10.0.2.1:8080 masq"]),
            ("ETP Local LB IP from outside: local endpoint, client IP kept", pkt(Remote, "203.0.113.5", "192.0.2.12", Tcp, 80), &["10.0.1.3:8080"]),
            ("ETP Local LB IP from a pod: short-circuit to all endpoints", pkt(Remote, "10.0.2.50", "192.0.2.12", Tcp, 80), &["10.0.1.3:8080", "10.0.2.3:8080"]),
            ("ETP Local NodePort from a pod: all endpoints", pkt(Remote, "10.0.2.50", NODE_A, Tcp, 30012), &["10.0.1.3:8080", "10.0.2.3:8080"]),
        ];
        for (what, p, want) in cases {
            assert_eq!(t4.trace(p), expect(want), "{mode:?}: {what}");
        }
        // A packet from a pod address that arrives on the uplink is not pod traffic here.
        let mut spoofed = pkt(Remote, "10.0.1.50", "172.30.0.10", Tcp, 80);
        spoofed.iif = "eth0".into();
        assert_eq!(
            t4.trace(&spoofed),
            expect(&["10.0.1.1:8080 masq", "10.0.2.1:8080 masq"]),
            "{mode:?}"
        );
    }
}
