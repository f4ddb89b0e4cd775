//! Multi-step: apply, change objects, and check that the partial transaction carries only the
//! delta and that the result equals a fresh compile.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::collections::BTreeSet;

use nftproxy::apply::fake::FakeApplier;
use nftproxy::apply::{Applier, ApplyError};
use nftproxy::k8s::objects::Objects;
use nftproxy::net::Family;
use nftproxy::nft::ir::Ruleset;
use nftproxy::nft::plan;
use nftproxy::nft::render;
use nftproxy::nft::tx::Op;

fn compile(objs: &Objects) -> Ruleset {
    let node = objs.node_info(Some("node-a"));
    let (rs, problems) =
        nftproxy::pipeline::from_objects(objs, &common::proxy_config("node-a"), &node)
            .map(|o| (o.ruleset, o.problems))
            .expect("compile");
    assert!(problems.is_empty(), "{problems:?}");
    rs
}

fn start() -> (Objects, FakeApplier, Ruleset) {
    let objs = common::load_objects(&common::root().join("tests/flows/cluster.yaml"));
    let rs = compile(&objs);
    let mut fake = FakeApplier::new();
    fake.apply(&plan::full(&rs)).expect("initial");
    (objs, fake, rs)
}

/// Apply the partial plan from `applied` to `desired`, check the kernel (fake) equals `desired`
/// (plus the chains flushed and not yet deleted).
fn step(fake: &mut FakeApplier, applied: &Ruleset, desired: &Ruleset) -> plan::Plan {
    step_due(fake, applied, desired, &BTreeSet::new())
}

/// `step` with the stale chains whose grace period is over.
fn step_due(
    fake: &mut FakeApplier,
    applied: &Ruleset,
    desired: &Ruleset,
    due: &BTreeSet<(Family, String)>,
) -> plan::Plan {
    let p = plan::partial(applied, desired, due);
    assert!(!p.needs_full);
    fake.apply(&p.tx).expect("partial apply");
    let after = plan::after(applied, desired, &p);
    assert_eq!(
        render::normalise(&fake.dump()),
        render::normalise(&render::ruleset(&after))
    );
    p
}

fn slice_mut<'a>(
    objs: &'a mut Objects,
    name: &str,
) -> &'a mut k8s_openapi::api::discovery::v1::EndpointSlice {
    objs.slices
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .expect("slice")
}

#[test]
fn unchanged_state_plans_nothing() {
    let (_, _, rs) = start();
    let p = plan::partial(&rs, &rs, &BTreeSet::new());
    assert!(p.tx.is_empty(), "{:?}", p.tx);
}

#[test]
fn replacing_an_endpoint_touches_only_elements() {
    let (mut objs, mut fake, rs) = start();
    slice_mut(&mut objs, "web-ipv4").endpoints[1].addresses = vec!["10.0.2.99".into()];
    let next = compile(&objs);
    let p = step(&mut fake, &rs, &next);
    assert_eq!(p.tx.skeleton_ops(), 0, "{:?}", p.tx);
    // old slot 1 out, new slot 1 in: a map value change is delete + add of the same key
    assert_eq!(p.tx.element_count(), 2, "{:?}", p.tx);
}

#[test]
fn a_new_service_touches_only_elements() {
    let (mut objs, mut fake, rs) = start();
    let mut svc = objs.services[0].clone();
    svc.metadata.name = Some("web2".into());
    svc.spec.as_mut().unwrap().cluster_ip = Some("172.30.1.1".into());
    objs.services.push(svc);
    let mut sl = objs.slices[0].clone();
    sl.metadata.name = Some("web2-1".into());
    sl.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("kubernetes.io/service-name".into(), "web2".into());
    objs.slices.push(sl);
    let next = compile(&objs);
    let p = step(&mut fake, &rs, &next);
    assert_eq!(p.tx.skeleton_ops(), 0, "{:?}", p.tx);
    // cluster-ips, clusterip, ip-cluster-n2, two backends
    assert_eq!(p.tx.element_count(), 5, "{:?}", p.tx);
}

/// Whether the plan has an op `f` accepts.
fn has(p: &plan::Plan, f: impl Fn(&Op) -> bool) -> bool {
    p.tx.ops.iter().any(f)
}

/// Rules in `tx` that look up a backends map: each makes the kernel walk every element of that
/// map when it goes in (`nf_tables_bind_set`), 0.2 us per element on 6.18.
fn backends_map_bindings(tx: &nftproxy::nft::tx::Transaction) -> Vec<String> {
    tx.ops
        .iter()
        .filter_map(|op| match op {
            Op::AddRule { chain, rule, .. } => match &rule.action {
                nftproxy::nft::ir::Action::DnatMap { map, .. } if map.ends_with("-backends") => {
                    Some(chain.clone())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_endpoint_count_binds_the_backends_map_once_and_its_removal_never() {
    let (mut objs, mut fake, rs) = start();
    let template = slice_mut(&mut objs, "web-ipv4").endpoints[0].clone();
    let s = slice_mut(&mut objs, "web-ipv4");
    for i in 0..10 {
        let mut e = template.clone();
        e.addresses = vec![format!("10.0.3.{i}")];
        s.endpoints.push(e);
    }
    let big = compile(&objs);
    let p = step(&mut fake, &rs, &big);
    assert!(
        has(
            &p,
            |op| matches!(op, Op::AddSet { name, .. } if name == "ip-cluster-n12")
        ),
        "{:?}",
        p.tx
    );
    assert!(has(
        &p,
        |op| matches!(op, Op::AddChain { name, .. } if name == "pick-ip-cluster-n12")
    ));
    // The pick chain is rewritten, but only the new count's own chain binds the map: a 13th
    // count in a cluster of 1.25 million backends costs one walk of them, not thirteen.
    assert_eq!(
        backends_map_bindings(&p.tx),
        vec!["pick-ip-cluster-n12".to_string()],
        "{:?}",
        p.tx
    );
    let applied = plan::after(&rs, &big, &p);

    // Back to 2 endpoints: the set goes now, the count's chain is flushed now and deleted once
    // due; no rule binding a map goes in.
    let (objs2, _, _) = start();
    let small = compile(&objs2);
    let p2 = step(&mut fake, &applied, &small);
    assert!(has(
        &p2,
        |op| matches!(op, Op::DeleteSet { name, .. } if name == "ip-cluster-n12")
    ));
    assert_eq!(backends_map_bindings(&p2.tx), Vec::<String>::new());
    assert_eq!(
        p2.flushed_stale,
        vec![(Family::Ip, "pick-ip-cluster-n12".to_string())]
    );
    let applied2 = plan::after(&applied, &small, &p2);
    let due: BTreeSet<_> = p2.flushed_stale.iter().cloned().collect();
    let p3 = step_due(&mut fake, &applied2, &small, &due);
    assert!(has(
        &p3,
        |op| matches!(op, Op::DeleteChain { name, .. } if name == "pick-ip-cluster-n12")
    ));
    assert_eq!(
        render::normalise(&fake.dump()),
        render::normalise(&render::ruleset(&small)),
        "after the delete the kernel holds exactly the small ruleset"
    );
}

#[test]
fn a_removed_chain_is_flushed_now_and_deleted_when_due() {
    let (_, mut fake, rs) = start();
    let mut desired = rs.clone();
    // Pretend a future skeleton dropped a chain nothing jumps to.
    let t = desired.tables.get_mut(&Family::Ip).unwrap();
    assert!(!t.chains.remove("affinity-update").unwrap().rules.is_empty());
    t.chains
        .get_mut("nat-postrouting")
        .unwrap()
        .rules
        .retain(|r| !format!("{r:?}").contains("affinity-update"));
    let p = plan::partial(&rs, &desired, &BTreeSet::new());
    assert_eq!(
        p.flushed_stale,
        vec![(Family::Ip, "affinity-update".to_string())]
    );
    assert!(
        p.tx.ops
            .iter()
            .all(|op| !matches!(op, Op::DeleteChain { .. })),
        "no delete before the grace period"
    );
    fake.apply(&p.tx).expect("apply");
    let applied = plan::after(&rs, &desired, &p);
    assert!(
        applied.tables[&Family::Ip]
            .chains
            .contains_key("affinity-update"),
        "stale chain still there"
    );
    let due: BTreeSet<_> = [(Family::Ip, "affinity-update".to_string())].into();
    let p2 = plan::partial(&applied, &desired, &due);
    assert!(p2
        .tx
        .ops
        .iter()
        .any(|op| matches!(op, Op::DeleteChain { name, .. } if name == "affinity-update")));
    fake.apply(&p2.tx).expect("delete");
    assert_eq!(
        render::normalise(&fake.dump()),
        render::normalise(&render::ruleset(&desired))
    );
}

#[test]
fn a_failed_apply_changes_nothing_and_full_sync_repairs_outside_changes() {
    let (mut objs, mut fake, rs) = start();
    let before = fake.dump();
    slice_mut(&mut objs, "web-ipv4").endpoints.pop();
    let next = compile(&objs);
    fake.fail.push_back(ApplyError::Injected("test".into()));
    let p = plan::partial(&rs, &next, &BTreeSet::new());
    assert!(fake.apply(&p.tx).is_err());
    assert_eq!(fake.dump(), before, "atomic: nothing changed");

    fake.external_delete_table(Family::Ip);
    // A partial plan against the stale belief fails in the (strict) fake...
    assert!(matches!(
        fake.apply(&p.tx),
        Err(ApplyError::NotFound { .. })
    ));
    // ...and a full sync rebuilds from scratch.
    fake.apply(&plan::full(&next)).expect("full");
    assert_eq!(
        render::normalise(&fake.dump()),
        render::normalise(&render::ruleset(&next))
    );
}

#[test]
fn the_fake_is_strict() {
    let (_, mut fake, rs) = start();
    let t = &rs.tables[&Family::Ip];
    let def = t.sets["cluster-ips"].clone();
    let dup = t.elements["cluster-ips"].iter().next().unwrap().clone();
    let add = |els: Vec<nftproxy::nft::ir::Element>| nftproxy::nft::tx::Transaction {
        ops: vec![Op::AddElements {
            family: Family::Ip,
            set: "cluster-ips".into(),
            def: def.clone(),
            elements: els.into(),
        }],
    };
    assert!(matches!(
        fake.apply(&add(vec![dup.clone()])),
        Err(ApplyError::Exists { .. })
    ));
    let del = nftproxy::nft::tx::Transaction {
        ops: vec![Op::DeleteElements {
            family: Family::Ip,
            set: "cluster-ips".into(),
            def: def.clone(),
            elements: vec![nftproxy::nft::ir::Element::new(
                vec![nftproxy::nft::ir::Value::Addr("9.9.9.9".parse().unwrap())],
                None,
            )]
            .into(),
        }],
    };
    assert!(matches!(fake.apply(&del), Err(ApplyError::NotFound { .. })));
    let busy = nftproxy::nft::tx::Transaction {
        ops: vec![Op::DeleteSet {
            family: Family::Ip,
            name: "cluster-ips".into(),
        }],
    };
    assert!(matches!(fake.apply(&busy), Err(ApplyError::Busy { .. })));
    let busy_chain = nftproxy::nft::tx::Transaction {
        ops: vec![
            Op::FlushChain {
                family: Family::Ip,
                name: "services".into(),
            },
            Op::DeleteChain {
                family: Family::Ip,
                name: "services".into(),
            },
        ],
    };
    assert!(
        matches!(fake.apply(&busy_chain), Err(ApplyError::Busy { .. })),
        "still jumped to from nat-prerouting"
    );
    let wrong = add(vec![nftproxy::nft::ir::Element::new(
        vec![nftproxy::nft::ir::Value::Port(80)],
        None,
    )]);
    assert!(matches!(
        fake.apply(&wrong),
        Err(ApplyError::Invalid { .. })
    ));
}

#[test]
fn conflicting_services_do_not_break_the_commit() {
    let (mut objs, mut fake, rs) = start();
    // A second Service claiming web's ClusterIP:port and lb-cluster's NodePort (bad input).
    let mut dup = objs
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("lb-cluster"))
        .unwrap()
        .clone();
    dup.metadata.name = Some("zz-dup".into());
    dup.spec.as_mut().unwrap().cluster_ip = Some("172.30.0.10".into());
    objs.services.push(dup);
    let node = objs.node_info(Some("node-a"));
    let (next, problems) =
        nftproxy::pipeline::from_objects(&objs, &common::proxy_config("node-a"), &node)
            .map(|o| (o.ruleset, o.problems))
            .expect("compile");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].object.to_string() == "Service ns/zz-dup"
            && problems[0].reason.contains("already used by ns/web"),
        "{problems:?}"
    );
    let p = plan::partial(&rs, &next, &BTreeSet::new());
    fake.apply(&p.tx).expect("the commit still succeeds");
    // Keep only the port's ClusterIP conflict: the NodePort of the skipped port is not claimed.
    assert_eq!(
        render::normalise(&render::ruleset(&next)),
        render::normalise(&render::ruleset(&rs)),
        "nothing of the duplicate is programmed"
    );
}
