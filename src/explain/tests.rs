use super::*;

/// node-a of the shared test cluster (tests/flows/cluster.yaml), offline.
fn with_view<R>(f: impl FnOnce(&View<'_>) -> R) -> R {
    let objs = crate::testutil::cluster_objects();
    let node = objs.node_info(Some("node-a"));
    let cfg = crate::testutil::proxy_config("node-a");
    offline(&objs, &cfg, &node, f).expect("compiles")
}

fn ex(from: &str, to: &str, via: Option<&str>) -> Explanation {
    with_view(|v| explain(v, &Flow::parse(from, to, via).expect("flow")))
}

const NODE_A: &str = "192.168.0.2";

/// (what, from, to, via, verdict, service, endpoints, source seen by the endpoint)
type Row<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Verdict,
    Option<&'a str>,
    &'a [&'a str],
    Option<&'a str>,
);

/// DESIGN §2 row by row: the verdict, the Service, the endpoints, the source the endpoint sees.
#[test]
fn predictions_for_every_row() {
    #[rustfmt::skip]
    let rows: &[Row<'_>] = &[
        ("pod -> ClusterIP", "10.0.1.50", "172.30.0.10:80", None, Verdict::Forward, Some("ns/web:p/tcp"), &["10.0.1.1:8080", "10.0.2.1:8080"], Some("10.0.1.50")),
        ("outside -> ClusterIP", "203.0.113.5", "172.30.0.10:80", None, Verdict::Forward, Some("ns/web:p/tcp"), &["10.0.1.1:8080", "10.0.2.1:8080"], Some(NODE_A)),
        ("node -> ClusterIP", NODE_A, "172.30.0.10:80", None, Verdict::Forward, Some("ns/web:p/tcp"), &["10.0.1.1:8080", "10.0.2.1:8080"], Some(NODE_A)),
        ("ETP Cluster LB", "203.0.113.5", "192.0.2.11:80", None, Verdict::Forward, Some("ns/lb-cluster:p/tcp"), &["10.0.2.2:8080"], Some(NODE_A)),
        ("ETP Cluster NodePort", "203.0.113.5", "192.168.0.2:30011", None, Verdict::Forward, Some("ns/lb-cluster:p/tcp"), &["10.0.2.2:8080"], Some(NODE_A)),
        ("ETP Local LB, outside", "203.0.113.5", "192.0.2.12:80", None, Verdict::Forward, Some("ns/lb-local:p/tcp"), &["10.0.1.3:8080"], Some("203.0.113.5")),
        ("ETP Local NodePort, outside", "203.0.113.5", "192.168.0.2:30012", None, Verdict::Forward, Some("ns/lb-local:p/tcp"), &["10.0.1.3:8080"], Some("203.0.113.5")),
        ("ETP Local LB, pod", "10.0.2.50", "192.0.2.12:80", Some("pod"), Verdict::Forward, Some("ns/lb-local:p/tcp"), &["10.0.1.3:8080", "10.0.2.3:8080"], Some("10.0.2.50")),
        ("ETP Local LB, node", NODE_A, "192.0.2.12:80", None, Verdict::Forward, Some("ns/lb-local:p/tcp"), &["10.0.1.3:8080", "10.0.2.3:8080"], Some(NODE_A)),
        ("ETP Local, none local: LB drops", "203.0.113.5", "192.0.2.13:80", None, Verdict::Drop, Some("ns/lb-local-remote:p/tcp"), &[], None),
        ("ETP Local, none local: NodePort drops", "203.0.113.5", "192.168.0.2:30013", None, Verdict::Drop, Some("ns/lb-local-remote:p/tcp"), &[], None),
        ("ETP Local, none local: pods still reach it", "10.0.1.50", "192.0.2.13:80", None, Verdict::Forward, Some("ns/lb-local-remote:p/tcp"), &["10.0.2.4:8080"], Some("10.0.1.50")),
        ("no endpoints: ClusterIP rejects", "10.0.1.50", "172.30.0.14:80", None, Verdict::Reject, Some("ns/empty:p/tcp"), &[], None),
        ("no endpoints: NodePort rejects", "203.0.113.5", "192.168.0.2:30014", None, Verdict::Reject, Some("ns/empty:p/tcp"), &[], None),
        ("ITP Local", "10.0.1.50", "172.30.0.15:80", None, Verdict::Forward, Some("ns/itp-local:p/tcp"), &["10.0.1.5:8080"], Some("10.0.1.50")),
        ("ITP Local elsewhere only: drop", "10.0.1.50", "172.30.0.16:80", None, Verdict::Drop, Some("ns/itp-local-remote:p/tcp"), &[], None),
        ("source range allows", "203.0.113.5", "192.0.2.17:80", None, Verdict::Forward, Some("ns/ranges:p/tcp"), &["10.0.2.7:8080"], Some(NODE_A)),
        ("source range drops", "203.0.113.200", "192.0.2.17:80", None, Verdict::Drop, Some("ns/ranges:p/tcp"), &[], None),
        ("externalIP", "203.0.113.5", "192.0.2.18:80", None, Verdict::Forward, Some("ns/eip:p/tcp"), &["10.0.2.8:8080"], Some(NODE_A)),
        ("UDP", "10.0.1.50", "172.30.0.20:53/udp", None, Verdict::Forward, None, &["10.0.2.12:5353"], Some("10.0.1.50")),
        ("undefined port: reject", "10.0.1.50", "172.30.0.20:53/tcp", None, Verdict::Reject, None, &[], None),
        ("unallocated service IP: drop", "10.0.1.50", "172.30.5.5:80", None, Verdict::Drop, None, &[], None),
        ("terminating fallback", "10.0.1.50", "172.30.0.21:80", None, Verdict::Forward, None, &["10.0.2.13:8080"], Some("10.0.1.50")),
        ("not a service", "10.0.1.50", "203.0.113.9:443", None, Verdict::NotAService, None, &[], None),
        ("IPv6 pod -> ClusterIP", "fd00:10::99", "[fd00:30::22]:80", None, Verdict::Forward, None, &["[fd00:10::1]:8080"], Some("fd00:10::99")),
        ("IPv6 outside -> ClusterIP", "2001:db8::5", "[fd00:30::22]:80", None, Verdict::Forward, None, &["[fd00:10::1]:8080"], Some("fd00:168::2")),
    ];
    let mut bad = Vec::new();
    for (what, from, to, via, verdict, service, endpoints, seen) in rows {
        let e = ex(from, to, *via);
        let got = (
            e.verdict,
            service.map(|_| e.service.clone().unwrap_or_default()),
            e.endpoints.clone(),
            e.source_seen_by_endpoint.clone(),
        );
        let want = (
            *verdict,
            service.map(str::to_string),
            endpoints.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            seen.map(str::to_string),
        );
        if got != want {
            bad.push(format!(
                "{what}: got {got:?}, want {want:?}\n{}",
                serde_json::to_string_pretty(&e).unwrap_or_default()
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn steps_name_the_element_and_the_field() {
    let e = ex("203.0.113.5", "192.0.2.11:80", None);
    let entry = e
        .steps
        .iter()
        .find(|s| s.text.contains("load balancer IP of ns/lb-cluster:p/tcp"))
        .expect("entry step");
    assert_eq!(
        entry.nft.as_deref(),
        Some("set external element 192.0.2.11 . tcp . 80")
    );
    assert!(entry
        .field
        .as_deref()
        .is_some_and(|f| f.contains("status.loadBalancer")));
    assert!(e.masquerade);
    assert!(e
        .steps
        .iter()
        .any(|s| s.field.as_deref() == Some("spec.externalTrafficPolicy")));
    let advice = e.advice.expect("advice");
    assert!(
        advice.contains("externalTrafficPolicy is Cluster"),
        "{advice}"
    );
    assert!(advice.contains(NODE_A), "{advice}");

    // Local without a local endpoint: the drop, its counter element, and the health check.
    let e = ex("203.0.113.5", "192.0.2.13:80", None);
    let drop = e
        .steps
        .iter()
        .find(|s| s.text.contains("dropped"))
        .expect("drop step");
    assert_eq!(
        drop.nft.as_deref(),
        Some("set no-endpoint-drop element 192.0.2.13 . tcp . 80")
    );
    assert!(
        e.advice
            .as_deref()
            .is_some_and(|a| a.contains(":32013/healthz")),
        "{:?}",
        e.advice
    );

    // Source ranges: the drop names the field and the advice the fix.
    let e = ex("203.0.113.200", "192.0.2.17:80", None);
    assert!(e
        .steps
        .iter()
        .any(|s| s.field.as_deref() == Some("spec.loadBalancerSourceRanges")));
    assert!(e
        .advice
        .as_deref()
        .is_some_and(|a| a.contains("203.0.113.200/32")));

    // No endpoints: reject, and the advice points at the slices.
    let e = ex("10.0.1.50", "172.30.0.14:80", None);
    assert!(e
        .advice
        .as_deref()
        .is_some_and(|a| a.contains("kubernetes.io/service-name=empty")));
}

/// Found by the prediction-vs-kernel test: a pod of another node calling this node's NodePort
/// of a Local Service is short-circuited (it is in the cluster CIDR) to every endpoint,
/// unmasqueraded; the one on a third host answers the client directly, which drops the reply.
#[test]
fn remote_pod_short_circuit_to_another_host_cannot_answer() {
    let e = ex("10.0.2.50", "192.168.0.2:30012", Some("outside"));
    assert_eq!(e.verdict, Verdict::Forward);
    assert_eq!(e.endpoints, vec!["10.0.1.3:8080".to_string()]);
    assert_eq!(e.unreachable_endpoints, vec!["10.0.2.3:8080".to_string()]);
    assert!(
        e.advice.as_deref().is_some_and(|a| a.contains("NodeCIDR")),
        "{:?}",
        e.advice
    );
    // The same client on this node is fine: every endpoint answers.
    let e = ex("10.0.1.50", "192.168.0.2:30012", Some("pod"));
    assert!(e.unreachable_endpoints.is_empty());
    assert_eq!(e.endpoints.len(), 2);
}

#[test]
fn hairpin_and_affinity_are_said() {
    let e = ex("10.0.1.1", "172.30.0.10:80", Some("pod"));
    assert_eq!(e.verdict, Verdict::Forward);
    assert_eq!(
        e.sources_by_endpoint
            .get("10.0.1.1:8080")
            .map(String::as_str),
        Some(NODE_A)
    );
    assert_eq!(
        e.sources_by_endpoint
            .get("10.0.2.1:8080")
            .map(String::as_str),
        Some("10.0.1.1")
    );
    assert_eq!(e.source_seen_by_endpoint, None, "they differ");
    assert!(!e.masquerade, "only the hairpin endpoint is masqueraded");
    assert!(e.steps.iter().any(|s| s.text.starts_with("hairpin")));

    let e = ex("10.0.1.50", "172.30.0.19:80", None);
    assert_eq!(e.endpoints.len(), 3);
    assert!(e
        .steps
        .iter()
        .any(|s| s.text.contains("sessionAffinity ClientIP")));
}

#[test]
fn endpoint_conditions_are_explained() {
    // lb-local-remote from outside: its endpoint is on node-b.
    let e = ex("10.0.1.50", "172.30.0.21:80", None);
    let text: Vec<&str> = e.steps.iter().map(|s| s.text.as_str()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("terminating but still serving")),
        "{text:#?}"
    );
}

#[test]
fn flow_parsing() {
    let f = Flow::parse("10.0.0.1:5555", "[fd00::1]:80/udp", None);
    assert_eq!(
        f,
        Err(ExplainError::Families(
            "10.0.0.1".parse().unwrap(),
            "fd00::1".parse().unwrap()
        ))
    );
    let f = Flow::parse("fd00::2", "[fd00::1]:53/udp", Some("outside")).expect("ok");
    assert_eq!(
        (f.port, f.proto, f.via),
        (53, Proto::Udp, Some(Via::Outside))
    );
    assert!(matches!(
        Flow::parse("x", "1.2.3.4:80", None),
        Err(ExplainError::From(_))
    ));
    assert!(matches!(
        Flow::parse("1.1.1.1", "1.2.3.4", None),
        Err(ExplainError::To(_))
    ));
    assert!(matches!(
        Flow::parse("1.1.1.1", "1.2.3.4:80/icmp", None),
        Err(ExplainError::To(_))
    ));
    assert!(matches!(
        Flow::parse("1.1.1.1", "1.2.3.4:80", Some("moon")),
        Err(ExplainError::Via(_))
    ));
}

#[test]
fn services_and_report_agree_with_explain() {
    with_view(|v| {
        let lines = services(v, &ServicesQuery::default());
        let lb_local = lines
            .iter()
            .find(|l| l.name == "lb-local" && l.family == "IPv4")
            .expect("lb-local");
        assert_eq!(lb_local.client_ip_from_outside, "kept");
        assert_eq!(
            lb_local.health_check.as_deref(),
            Some("200 (1 local endpoint)")
        );
        let remote = lines
            .iter()
            .find(|l| l.name == "lb-local-remote")
            .expect("line");
        assert_eq!(
            remote.client_ip_from_outside,
            "dropped here: no local endpoint"
        );
        assert_eq!(
            remote.health_check.as_deref(),
            Some("503 (0 local endpoints)")
        );
        let cluster = lines.iter().find(|l| l.name == "lb-cluster").expect("line");
        assert_eq!(
            cluster.client_ip_from_outside,
            format!("replaced by {NODE_A}")
        );
        let web = lines.iter().find(|l| l.name == "web").expect("line");
        assert_eq!(web.client_ip_from_outside, "no external entry");

        let problems = services(
            v,
            &ServicesQuery {
                problems: true,
                ..Default::default()
            },
        );
        let names: BTreeSet<&str> = problems.iter().map(|l| l.name.as_str()).collect();
        for want in ["empty", "lb-local-remote", "itp-local-remote", "lb-cluster"] {
            assert!(names.contains(want), "{want} not flagged: {names:?}");
        }
        assert!(
            !names.contains("web") && !names.contains("lb-local"),
            "{names:?}"
        );

        let rows = report(v);
        let row = |svc: &str, path: &str| {
            rows.iter()
                .find(|r| r.service == svc && r.path.starts_with(path))
                .unwrap_or_else(|| panic!("{svc} {path}: {rows:#?}"))
        };
        assert_eq!(
            row("ns/lb-local:p/tcp", "outside -> LB IP").client_ip,
            "kept"
        );
        assert_eq!(
            row("ns/lb-cluster:p/tcp", "outside -> LB IP").client_ip,
            format!("replaced by {NODE_A}")
        );
        assert!(row("ns/lb-cluster:p/tcp", "outside -> LB IP")
            .flag
            .is_some());
        let dropped = row("ns/lb-local-remote:p/tcp", "outside -> LB IP");
        assert_eq!(dropped.client_ip, "dropped here: no local endpoint");
        assert!(dropped
            .flag
            .as_deref()
            .is_some_and(|f| f.contains(":32013")));
        assert_eq!(
            row("ns/lb-local-remote:p/tcp", "pod -> LB IP").client_ip,
            "kept"
        );
        assert_eq!(row("ns/web:p/tcp", "pod -> ClusterIP").client_ip, "kept");
        // The node itself: masqueraded to the address it already sends from.
        assert_eq!(row("ns/web:p/tcp", "node -> ClusterIP").client_ip, "kept");
        assert!(row("ns/web:p/tcp", "hairpin")
            .client_ip
            .starts_with("to itself: replaced by"));
    });
}

#[test]
#[ignore = "prints examples"]
fn print_examples() {
    for (f, t) in [
        ("203.0.113.5", "192.0.2.11:80"),
        ("203.0.113.5", "192.0.2.13:80"),
        ("10.0.1.1", "172.30.0.10:80"),
        ("10.0.1.50", "172.30.0.21:80"),
    ] {
        println!("{}", serde_json::to_string_pretty(&ex(f, t, None)).unwrap());
    }
}
