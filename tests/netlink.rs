//! The netlink encoder and the text renderer produce the same ruleset: apply each scenario with
//! the real applier in a fresh network namespace and compare `nft list table` with the rendered
//! text. Then a partial sync on top, and the same conformance steps on the fake.

mod common;

use std::collections::BTreeSet;

use nftproxy::apply::fake::FakeApplier;
use nftproxy::apply::netlink::NetlinkApplier;
use nftproxy::apply::{Applier, ApplyError};
use nftproxy::nft::ir::{Family, Ruleset};
use nftproxy::nft::{plan, render};

fn listing(families: &[Family]) -> String {
    families
        .iter()
        .map(|f| common::nft(&["list", "table", f.keyword(), "nftproxy"], None))
        .collect()
}

fn scenario_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = ["tests/scenarios", "tests/flows"]
        .iter()
        .flat_map(|d| std::fs::read_dir(common::root().join(d)).expect("dir"))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn netlink_ruleset_lists_as_the_rendered_text() {
    if !common::privileged() {
        return;
    }
    for path in scenario_files() {
        let rs = common::compile_file(&path, "");
        let text = render::ruleset(&rs);
        let families: Vec<Family> = rs.tables.keys().copied().collect();
        let listed = common::in_netns(move || {
            let mut a = NetlinkApplier::new().expect("netlink");
            a.apply(&plan::full(&rs)).expect("apply");
            listing(&families)
        });
        assert!(
            render::normalise(&listed) == render::normalise(&text),
            "{}: listed (-) vs rendered (+):\n{}",
            path.display(),
            render::diff(&listed, &text)
        );
    }
}

/// The same steps on any applier: the conformance suite that keeps the fake honest.
fn conformance<A: Applier>(a: &mut A, rs: &Ruleset, changed: &Ruleset) -> Vec<String> {
    let mut log = Vec::new();
    let g0 = a.generation().expect("generation");
    a.apply(&plan::full(rs)).expect("full");
    log.push(format!(
        "exists {}",
        a.table_exists(Family::Ip).expect("exists")
    ));
    log.push(format!(
        "generation moved {}",
        a.generation().expect("generation") != g0
    ));
    let p = plan::partial(rs, changed, &BTreeSet::new());
    a.apply(&p.tx).expect("partial");
    // Re-applying the same delta must fail atomically (elements exist / are gone).
    let again = a.apply(&p.tx);
    log.push(format!(
        "reapply {:?}",
        again.as_ref().map_err(std::mem::discriminant)
    ));
    let sk = a.skeleton(Family::Ip).expect("skeleton");
    log.push(format!(
        "skeleton matches {}",
        sk == nftproxy::apply::Skeleton::of(&changed.tables[&Family::Ip])
    ));
    log.push(format!(
        "skeleton rules {}",
        sk.rules.values().sum::<usize>()
    ));
    let mut els: Vec<String> = a
        .list_elements(Family::Ip, "clusterip")
        .expect("list")
        .into_iter()
        .map(|(e, _)| render::element(&e))
        .collect();
    els.sort();
    log.push(format!("clusterip {els:?}"));
    let counters = a
        .list_elements(Family::Ip, "no-endpoint-reject")
        .expect("list");
    log.push(format!(
        "counters {}",
        counters.iter().all(|(_, c)| c.is_some())
    ));
    let gen_before = a.generation().expect("generation");
    let bad = nftproxy::nft::tx::Transaction {
        ops: vec![nftproxy::nft::tx::Op::DeleteChain {
            family: Family::Ip,
            name: "services".into(),
        }],
    };
    log.push(format!(
        "busy {}",
        matches!(a.apply(&bad), Err(ApplyError::Busy { .. }))
    ));
    log.push(format!(
        "atomic {}",
        a.generation().expect("generation") == gen_before
    ));
    log
}

#[test]
fn fake_and_kernel_agree() {
    if !common::privileged() {
        return;
    }
    let path = common::root().join("tests/flows/cluster.yaml");
    let rs = common::compile_file(&path, "node-a");
    let mut objs = common::load_objects(&path);
    objs.services
        .retain(|s| s.metadata.name.as_deref() != Some("web"));
    let node = nftproxy::render_cmd::pick_node(&objs, Some("node-a"));
    let (changed, _) =
        nftproxy::render_cmd::compile_objects(&objs, &common::proxy_config("node-a"), &node)
            .expect("compile");
    let (rs2, changed2) = (rs.clone(), changed.clone());
    let kernel = common::in_netns(move || {
        conformance(
            &mut NetlinkApplier::new().expect("netlink"),
            &rs2,
            &changed2,
        )
    });
    let fake = conformance(&mut FakeApplier::new(), &rs, &changed);
    assert_eq!(kernel, fake);
    assert!(
        fake.contains(&"skeleton matches true".to_string()),
        "{fake:?}"
    );
}
