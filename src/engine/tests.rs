//! The incremental engine against the from-scratch path, over random change sequences that
//! include conflicts (shared cluster IPs and NodePorts), endpoint counts beyond the presets,
//! affinity timeouts coming and going, both families, deletions and slices moving between
//! Services.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::apply::fake::FakeApplier;
use crate::apply::Applier;
use crate::nft::{plan, render};

#[derive(Default)]
struct Objs {
    services: BTreeMap<ObjKey, Service>,
    slices: BTreeMap<ObjKey, EndpointSlice>,
}

/// What the watches deliver between two computations.
#[derive(Default)]
struct Delivered {
    services: Batch<Service>,
    slices: Batch<EndpointSlice>,
}

impl Objs {
    fn lists(&self) -> (Batch<Service>, Batch<EndpointSlice>) {
        (
            Batch::all(self.services.values().cloned()),
            Batch::all(self.slices.values().cloned()),
        )
    }
}

#[derive(Debug, Clone)]
struct SvcSpec {
    ip: u8,
    ports: Vec<(u8, bool)>,
    node_port: Option<u8>,
    lb: Option<u8>,
    local: bool,
    itp_local: bool,
    affinity: Option<u32>,
    v6: bool,
    ranges: bool,
}

#[derive(Debug, Clone)]
struct SliceSpec {
    service: u8,
    v6: bool,
    endpoints: Vec<(u8, bool, bool, bool)>,
    udp: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Service(u8, Option<SvcSpec>),
    Slice(u8, Option<SliceSpec>),
}

/// A one-port ClusterIP Service spec.
fn plain(ip: u8) -> SvcSpec {
    SvcSpec {
        ip,
        ports: vec![(0, false)],
        node_port: None,
        lb: None,
        local: false,
        itp_local: false,
        affinity: None,
        v6: false,
        ranges: false,
    }
}

fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        0u8..6,
        prop::collection::vec((0u8..3, any::<bool>()), 1..3),
        prop::option::of(0u8..4),
        prop::option::of(0u8..3),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::option::of(prop::sample::select(vec![10u32, 10800])),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(ip, ports, node_port, lb, local, itp_local, affinity, v6, ranges)| SvcSpec {
                ip,
                ports,
                node_port,
                lb,
                local,
                itp_local,
                affinity,
                v6,
                ranges,
            },
        )
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        0u8..8,
        prop::bool::weighted(0.3),
        prop::collection::vec(
            (
                0u8..14,
                any::<bool>(),
                prop::bool::weighted(0.8),
                any::<bool>(),
            ),
            0..12,
        ),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(service, v6, endpoints, udp)| SliceSpec {
            service,
            v6,
            endpoints,
            udp,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..8, prop::option::weighted(0.85, svc_spec())).prop_map(|(i, s)| Op::Service(i, s)),
        (0u8..10, prop::option::weighted(0.85, slice_spec())).prop_map(|(i, s)| Op::Slice(i, s)),
    ]
}

fn ns(i: u8) -> String {
    format!("ns{}", i % 2)
}

fn service(i: u8, s: &SvcSpec) -> Service {
    let ip = if s.v6 {
        format!("fd00:96::{}", s.ip + 1)
    } else {
        format!("10.96.0.{}", s.ip + 1)
    };
    let ports: Vec<_> = s
        .ports
        .iter()
        .enumerate()
        .map(|(j, (p, udp))| {
            let mut v = serde_json::json!({"name": format!("p{j}"), "port": 80 + u16::from(*p),
                "protocol": if *udp { "UDP" } else { "TCP" }});
            if let (Some(np), 0) = (s.node_port, j) {
                v["nodePort"] = serde_json::json!(30000 + u16::from(np));
            }
            v
        })
        .collect();
    let lb = s.lb.is_some() || s.node_port.is_some();
    let mut spec = serde_json::json!({
        "clusterIP": ip, "clusterIPs": [ip], "ports": ports,
        "type": if s.lb.is_some() { "LoadBalancer" } else if lb { "NodePort" } else { "ClusterIP" },
        "externalTrafficPolicy": if s.local && lb { "Local" } else { "Cluster" },
        "internalTrafficPolicy": if s.itp_local { "Local" } else { "Cluster" },
        "ipFamilies": [if s.v6 { "IPv6" } else { "IPv4" }],
    });
    if let Some(t) = s.affinity {
        spec["sessionAffinity"] = "ClientIP".into();
        spec["sessionAffinityConfig"] = serde_json::json!({"clientIP": {"timeoutSeconds": t}});
    }
    if s.lb.is_some() && s.local {
        spec["healthCheckNodePort"] = serde_json::json!(32000 + u16::from(i));
    }
    if s.ranges {
        spec["loadBalancerSourceRanges"] = serde_json::json!(["203.0.113.0/24"]);
    }
    let mut v = serde_json::json!({
        "metadata": {"namespace": ns(i), "name": format!("s{i}")},
        "spec": spec,
    });
    if let Some(l) = s.lb {
        let lbip = if s.v6 {
            format!("fd00:99::{}", l + 1)
        } else {
            format!("192.0.2.{}", l + 1)
        };
        v["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": lbip}]}});
    }
    serde_json::from_value(v).expect("service")
}

fn slice(i: u8, s: &SliceSpec) -> EndpointSlice {
    let eps: Vec<_> = s
        .endpoints
        .iter()
        .map(|(a, ready, terminating, local)| {
            let addr = if s.v6 {
                format!("fd00:10::{}", a + 1)
            } else {
                format!("10.0.0.{}", a + 1)
            };
            serde_json::json!({"addresses": [addr],
                "conditions": {"ready": *ready && !*terminating, "serving": *ready, "terminating": *terminating},
                "nodeName": if *local { "node-a" } else { "node-b" }})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns(s.service), "name": format!("e{i}"),
            "labels": {"kubernetes.io/service-name": format!("s{}", s.service)}},
        "addressType": if s.v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": "p0", "port": 8080, "protocol": if s.udp { "UDP" } else { "TCP" }},
                  {"name": "p1", "port": 8081, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .expect("slice")
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        internal_ips: vec!["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        ineligible: false,
    }
}

fn cfg() -> CompileConfig {
    CompileConfig {
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        nodeport_cidrs: vec!["192.168.0.2/32".parse().unwrap()],
        node_ips: node().internal_ips,
        ..CompileConfig::default()
    }
}

fn from_scratch(o: &Objs) -> (ProxyState, Ruleset, BTreeSet<(String, String)>) {
    let m = Model::from_objects(o.services.values(), o.slices.values(), &[], &node());
    let c = Compiled::new(m.state(), &cfg()).expect("compile");
    let problems = m
        .problems()
        .into_iter()
        .chain(c.problems())
        .map(|p| (p.object, p.reason))
        .collect();
    (m.state().clone(), c.ruleset().clone(), problems)
}

/// The state with every chosen backend list in sorted order (as a from-scratch build has it).
fn sorted_backends(s: &ProxyState) -> ProxyState {
    let mut s = s.clone();
    for fs in s.families.values_mut() {
        let keys: Vec<PortKey> = fs.ports.keys().cloned().collect();
        for k in keys {
            if let Some(ps) = fs.ports.get_mut(&k) {
                let ps = Arc::make_mut(ps);
                ps.chosen.cluster.sort();
                ps.chosen.local.sort();
            }
        }
    }
    s
}

/// The ruleset with each entry's backends renumbered in sorted order.
fn sorted_slots(r: &Ruleset) -> Ruleset {
    use crate::nft::ir::{Element, Value};
    let mut r = r.clone();
    for t in r.tables.values_mut() {
        for (name, els) in t.elements.iter_mut() {
            if !name.ends_with("-backends") {
                continue;
            }
            let mut by_entry: BTreeMap<Vec<Value>, Vec<Vec<Value>>> = BTreeMap::new();
            for e in els.iter() {
                let entry = e.key[..e.key.len() - 1].to_vec();
                by_entry
                    .entry(entry)
                    .or_default()
                    .push(e.value.clone().unwrap_or_default());
            }
            *els = by_entry
                .into_iter()
                .flat_map(|(entry, mut values)| {
                    values.sort();
                    values.into_iter().enumerate().map(move |(i, v)| {
                        let mut key = entry.clone();
                        key.push(Value::Slot(i as u32));
                        Element {
                            key,
                            value: Some(v),
                        }
                    })
                })
                .collect();
        }
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_from_scratch(
        initial in prop::collection::vec(op(), 0..12),
        steps in prop::collection::vec(prop::collection::vec(op(), 1..4), 1..14),
        relist_at in prop::option::of(0usize..14),
    ) {
        let mut objs = Objs::default();
        let apply = |objs: &mut Objs, op: &Op, d: &mut Delivered| match op {
            Op::Service(i, s) => {
                let key = (ns(*i), format!("s{i}"));
                match s {
                    Some(s) => {
                        let o = service(*i, s);
                        objs.services.insert(key.clone(), o.clone());
                        d.services.changed.insert(key, Some(o));
                    }
                    None => {
                        objs.services.remove(&key);
                        d.services.changed.insert(key, None);
                    }
                }
            }
            Op::Slice(i, s) => {
                // A slice keeps its namespace: moving it means deleting it there.
                let old_ns = objs.slices.keys().find(|k| k.1 == format!("e{i}")).cloned();
                if let Some(k) = old_ns {
                    objs.slices.remove(&k);
                    d.slices.changed.insert(k, None);
                }
                if let Some(s) = s {
                    let key = (ns(s.service), format!("e{i}"));
                    let o = slice(*i, s);
                    objs.slices.insert(key.clone(), o.clone());
                    d.slices.changed.insert(key, Some(o));
                }
            }
        };
        let mut d = Delivered::default();
        for op in &initial {
            apply(&mut objs, op, &mut d);
        }
        let mut engine = Engine::default();
        let (svcs, slices) = objs.lists();
        let first = engine.compute(svcs, slices, &node(), &[], &cfg()).expect("first");
        prop_assert!(first.rebuilt);
        let mut fake = FakeApplier::new();
        fake.apply(&plan::full(&first.ruleset)).expect("full apply");
        let mut applied = first.ruleset;
        for (n, step) in steps.iter().enumerate() {
            let mut d = Delivered::default();
            for op in step {
                apply(&mut objs, op, &mut d);
            }
            if relist_at == Some(n) {
                // A relist delivers the whole list instead of the changes.
                let (svcs, slices) = objs.lists();
                d = Delivered { services: svcs, slices };
            }
            let out = engine
                .compute(d.services, d.slices, &node(), &[], &cfg())
                .expect("compute");
            let (state, ruleset, problems) = from_scratch(&objs);
            // Equal up to which slot each backend holds (the engine keeps slots stable).
            prop_assert_eq!(sorted_backends(&out.state), state);
            prop_assert_eq!(sorted_slots(&out.ruleset), ruleset);
            let got: BTreeSet<(String, String)> =
                out.problems.iter().map(|p| (p.object.clone(), p.reason.clone())).collect();
            prop_assert_eq!(got, problems);
            // And the plan between successive outputs brings a strict kernel there.
            let p = plan::partial(&applied, &out.ruleset, &BTreeSet::new());
            prop_assert!(!p.needs_full);
            fake.apply(&p.tx).expect("partial apply");
            applied = plan::after(&applied, &out.ruleset, &p);
            prop_assert_eq!(render::normalise(&fake.dump()), render::normalise(&render::ruleset(&out.ruleset)));
        }
    }
}

#[test]
fn a_change_recompiles_only_its_service() {
    let mut objs = Objs::default();
    for i in 0..6u8 {
        let spec = plain(i);
        objs.services
            .insert((ns(i), format!("s{i}")), service(i, &spec));
    }
    let mut engine = Engine::default();
    let (svcs, slices) = objs.lists();
    let first = engine
        .compute(svcs, slices, &node(), &[], &cfg())
        .expect("first");
    assert!(first.rebuilt);
    let spec = SliceSpec {
        service: 3,
        v6: false,
        endpoints: vec![(1, true, false, false)],
        udp: false,
    };
    let key = (ns(3), "e0".to_string());
    let mut d = Delivered::default();
    d.slices.changed.insert(key, Some(slice(0, &spec)));
    let out = engine
        .compute(d.services, d.slices, &node(), &[], &cfg())
        .expect("update");
    assert!(!out.rebuilt);
    assert_eq!(out.changed, 1);
    let p = plan::partial(&first.ruleset, &out.ruleset, &BTreeSet::new());
    // reject entry out, count-set entry and one backend in.
    assert_eq!(p.tx.element_count(), 3, "{:?}", p.tx);
    assert_eq!(p.tx.skeleton_ops(), 0);
    // A new zone redoes every endpoint choice; new node addresses recompile everything.
    let mut zoned = node();
    zoned.zone = Some("z1".into());
    let out = engine
        .compute(Batch::default(), Batch::default(), &zoned, &[], &cfg())
        .expect("zone");
    assert!(out.rebuilt);
    assert_eq!(out.changed, 6);
}

#[test]
fn pending_folds_events_and_relists() {
    use kube::runtime::watcher::Event;
    let spec = plain(0);
    let (a, b) = (service(0, &spec), service(1, &spec));
    let mut p: Pending<Service> = Pending::default();
    p.event(Event::Apply(a.clone()));
    p.event(Event::Delete(a.clone()));
    let batch = p.take();
    assert!(batch.replaced.is_none());
    assert_eq!(batch.changed.len(), 1, "the latest version per object");
    assert!(batch.changed.values().all(|o| o.is_none()));
    assert!(p.take().is_empty());
    // A relist replaces everything; events after it (before the engine looks) fold into it.
    p.event(Event::Apply(b.clone()));
    p.event(Event::Init);
    p.event(Event::InitApply(a.clone()));
    assert!(!p.listed);
    p.event(Event::InitDone);
    assert!(p.listed);
    p.event(Event::Apply(b.clone()));
    p.event(Event::Delete(a));
    let batch = p.take();
    assert!(batch.changed.is_empty());
    let all = batch.replaced.expect("relist");
    assert_eq!(
        all.keys().cloned().collect::<Vec<_>>(),
        vec![key_of(&b.metadata)]
    );
}

#[test]
fn replacing_one_endpoint_rewrites_one_slot() {
    let mut objs = Objs::default();
    let spec = plain(0);
    objs.services
        .insert((ns(0), "s0".into()), service(0, &spec));
    let mut eps: Vec<(u8, bool, bool, bool)> = (0..12).map(|a| (a, true, false, false)).collect();
    let sl = |eps: &[(u8, bool, bool, bool)]| {
        slice(
            0,
            &SliceSpec {
                service: 0,
                v6: false,
                endpoints: eps.to_vec(),
                udp: false,
            },
        )
    };
    objs.slices.insert((ns(0), "e0".into()), sl(&eps));
    let mut engine = Engine::default();
    let (svcs, slices) = objs.lists();
    let first = engine
        .compute(svcs, slices, &node(), &[], &cfg())
        .expect("first");
    let mut applied = first.ruleset;
    // The 2nd endpoint (sorted) is replaced by one that sorts last; then one is removed (the
    // last slot's backend moves into the hole); then the removed one comes back.
    for (change, want) in [(0usize, 2usize), (1, 3), (2, 1)] {
        match change {
            0 => eps[1].0 = 13,
            1 => {
                eps.remove(3);
            }
            _ => eps.push((3, true, false, false)),
        }
        let mut d = Delivered::default();
        d.slices
            .changed
            .insert((ns(0), "e0".into()), Some(sl(&eps)));
        let out = engine
            .compute(d.services, d.slices, &node(), &[], &cfg())
            .expect("update");
        let p = plan::partial(&applied, &out.ruleset, &BTreeSet::new());
        let backend_ops: usize =
            p.tx.ops
                .iter()
                .map(|op| match op {
                    crate::nft::tx::Op::AddElements { set, elements, .. }
                    | crate::nft::tx::Op::DeleteElements { set, elements, .. }
                        if set.ends_with("-backends") =>
                    {
                        elements.len()
                    }
                    _ => 0,
                })
                .sum();
        assert_eq!(backend_ops, want, "change {change}: {:?}", p.tx);
        applied = out.ruleset;
    }
}

#[test]
fn stable_slots_keep_survivors_in_place() {
    let b = |i: u8| -> Backend { (std::net::IpAddr::from([10, 0, 0, i]), 80) };
    let old = vec![b(1), b(2), b(3), b(4)];
    assert_eq!(
        stable_slots(&old, &[b(1), b(3), b(4), b(9)]),
        vec![b(1), b(9), b(3), b(4)]
    );
    // Shrinking: the survivor beyond the end moves into the hole.
    assert_eq!(
        stable_slots(&old, &[b(1), b(3), b(4)]),
        vec![b(1), b(4), b(3)]
    );
    assert_eq!(stable_slots(&[], &[b(2), b(1)]), vec![b(2), b(1)]);
    assert_eq!(stable_slots(&old, &[]), Vec::<Backend>::new());
}

#[test]
fn service_cidrs_are_split_by_family() {
    let cidrs: Vec<IpNet> = vec![
        "172.30.0.0/16".parse().unwrap(),
        "fd00:30::/112".parse().unwrap(),
    ];
    let m = Model::from_objects([], [], &cidrs, &node());
    assert_eq!(
        m.state().families[&Family::Ip].service_cidrs,
        vec![cidrs[0]]
    );
    assert_eq!(
        m.state().families[&Family::Ip6].service_cidrs,
        vec![cidrs[1]]
    );
    // A change of them is a rebuild.
    let mut engine = Engine::default();
    let (s, e) = Objs::default().lists();
    engine.compute(s, e, &node(), &[], &cfg()).expect("first");
    let out = engine
        .compute(Batch::default(), Batch::default(), &node(), &cidrs, &cfg())
        .expect("cidrs");
    assert!(out.rebuilt);
    assert_eq!(
        out.state.families[&Family::Ip6].service_cidrs,
        vec![cidrs[1]]
    );
}

/// Regression: a dual-stack Service kept only one family after a slice-only change (the previous
/// port states were keyed without their family, so the IPv6 side overwrote the IPv4 side).
#[test]
fn dual_stack_survives_a_slice_change() {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ns0", "name": "ds"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9", "fd00:96::9"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "p0", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
    }))
    .expect("service");
    let slice = |v6: bool, last: u8| -> EndpointSlice {
        let addr = if v6 {
            format!("fd00:10::{last}")
        } else {
            format!("10.0.0.{last}")
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns0", "name": if v6 { "ds-v6" } else { "ds-v4" },
                "labels": {"kubernetes.io/service-name": "ds"}},
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr], "conditions": {"ready": true}, "nodeName": "node-b"}],
        }))
        .expect("slice")
    };
    for v6_changes in [false, true] {
        let mut objs = Objs::default();
        objs.services
            .insert(("ns0".into(), "ds".into()), svc.clone());
        objs.slices
            .insert(("ns0".into(), "ds-v4".into()), slice(false, 1));
        objs.slices
            .insert(("ns0".into(), "ds-v6".into()), slice(true, 1));
        let mut engine = Engine::default();
        let (s, e) = objs.lists();
        engine.compute(s, e, &node(), &[], &cfg()).expect("first");
        let changed = slice(v6_changes, 2);
        let key = key_of(&changed.metadata);
        objs.slices.insert(key.clone(), changed.clone());
        let mut d = Delivered::default();
        d.slices.changed.insert(key, Some(changed));
        let out = engine
            .compute(d.services, d.slices, &node(), &[], &cfg())
            .expect("update");
        for f in [Family::Ip, Family::Ip6] {
            assert_eq!(
                out.state.families[&f].ports.len(),
                1,
                "{f:?} side kept after a change of the {} slice",
                if v6_changes { "IPv6" } else { "IPv4" }
            );
        }
        let (state, ruleset, _) = from_scratch(&objs);
        assert_eq!(sorted_backends(&out.state), state);
        assert_eq!(sorted_slots(&out.ruleset), ruleset);
    }
}
