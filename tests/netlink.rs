//! The netlink encoder and the text renderer produce the same ruleset: apply each scenario with
//! the real applier in a fresh network namespace and compare `nft list table` with the rendered
//! text. Then a partial sync on top, and the same conformance steps on the fake.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::collections::BTreeSet;

use nftproxy::apply::fake::FakeApplier;
use nftproxy::apply::netlink::NetlinkApplier;
use nftproxy::apply::{Applier, ApplyError};
use nftproxy::net::Family;
use nftproxy::nft::ir::Ruleset;
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
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn netlink_ruleset_lists_as_the_rendered_text() {
    common::require_root();
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
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn fake_and_kernel_agree() {
    common::require_root();
    let path = common::root().join("tests/flows/cluster.yaml");
    let rs = common::compile_file(&path, "node-a");
    let mut objs = common::load_objects(&path);
    objs.services
        .retain(|s| s.metadata.name.as_deref() != Some("web"));
    let node = objs.node_info(Some("node-a"));
    let (changed, _) =
        nftproxy::pipeline::from_objects(&objs, &common::proxy_config("node-a"), &node)
            .map(|o| (o.ruleset, o.problems))
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

/// Reading our tables back from the kernel finds no drift right after a commit (rules compare
/// in the kernel's encoding, elements decode to the IR), and finds and repairs each kind of
/// change made with `nft` from outside: a flushed map, a deleted element, a foreign element, a
/// flushed chain, a foreign rule. The repair is the plan from the kernel's view.
#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn kernel_read_back_sees_and_repairs_outside_changes() {
    use nftproxy::sync::drift::kernel_view;
    common::require_root();
    for path in scenario_files() {
        let rs = common::compile_file(&path, "");
        let name = path.display().to_string();
        common::in_netns(move || {
            let mut a = NetlinkApplier::new().expect("netlink");
            a.apply(&plan::full(&rs)).expect("apply");
            let read = |a: &mut NetlinkApplier| {
                rs.tables
                    .iter()
                    .map(|(f, t)| (*f, a.read_table(*f, t, None).expect("read back")))
                    .collect()
            };
            let d = kernel_view(&rs, &read(&mut a), None, None);
            assert!(
                d.is_empty(),
                "{name}: drift right after a commit: {:?}",
                d.findings
            );
            let set_with = |min: usize| {
                rs.tables[&Family::Ip]
                    .elements
                    .iter()
                    .filter(|(n, e)| {
                        e.len() >= min && !rs.tables[&Family::Ip].sets[*n].runtime_owned()
                    })
                    .map(|(n, e)| (n.clone(), e.iter().next().cloned().expect("element")))
                    .next()
            };
            let mut changes: Vec<Vec<String>> = vec![
                vec!["flush chain ip nftproxy services".into()],
                vec!["add rule ip nftproxy services counter accept".into()],
                // Empty chains: invisible to a dump of rules (one a previous agent flushed and
                // did not delete, and a base chain that would drop every packet it sees).
                vec!["add chain ip nftproxy leftover".into()],
                vec![
                    "add chain ip nftproxy intruder { type filter hook input priority 0 ; policy drop ; }"
                        .into(),
                ],
            ];
            if let Some((set, e)) = set_with(2) {
                changes.push(vec![format!("flush set ip nftproxy {set}")]);
                let el = render::element(&e);
                changes.push(vec![format!("delete element ip nftproxy {set} {{ {el} }}")]);
            }
            if rs.tables[&Family::Ip].sets.contains_key("cluster-ips") {
                changes.push(vec![
                    "add element ip nftproxy cluster-ips { 172.30.250.250 }".into(),
                ]);
            }
            for cmd in changes {
                let args: Vec<&str> = cmd[0].split(' ').collect();
                common::nft(&args, None);
                let d = kernel_view(&rs, &read(&mut a), None, None);
                assert!(!d.is_empty(), "{name}: `nft {}` not seen", cmd[0]);
                assert!(!d.needs_full);
                let p = plan::partial(&d.view, &rs, &d.leftover_chains);
                a.apply(&p.tx)
                    .unwrap_or_else(|e| panic!("{name}: repair of `{}`: {e}", cmd[0]));
                let d = kernel_view(&rs, &read(&mut a), None, None);
                assert!(
                    d.is_empty(),
                    "{name}: after repairing `{}`: {:?}",
                    cmd[0],
                    d.findings
                );
                let listed = listing(&rs.tables.keys().copied().collect::<Vec<_>>());
                assert!(
                    render::normalise(&listed) == render::normalise(&render::ruleset(&rs)),
                    "{name}: after repairing `{}`:\n{}",
                    cmd[0],
                    render::diff(&listed, &render::ruleset(&rs))
                );
            }
        });
    }
}

/// The interface detect-local modes (`iifname` matches against an `ifname` interval set holding
/// `"veth*"` or `"cbr0"`): nft lists exactly what was rendered, the fake holds what the kernel
/// holds, and the read-back finds no drift.
#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn interface_detect_local_modes_program_as_nft_reads_them() {
    use nftproxy::pipeline::config::DetectLocal;
    use nftproxy::sync::drift::kernel_view;
    common::require_root();
    for (mode, iface) in [
        (DetectLocal::InterfaceNamePrefix, "veth"),
        (DetectLocal::BridgeInterface, "cbr0"),
    ] {
        let rs = common::interface_mode_ruleset(mode, iface);
        let text = render::ruleset(&rs);
        assert!(text.contains("iifname != @local-ifaces"), "{text}");
        let mut fake = FakeApplier::new();
        fake.apply(&plan::full(&rs)).expect("fake apply");
        let families: Vec<Family> = rs.tables.keys().copied().collect();
        let (listed, drift) = common::in_netns(move || {
            let mut a = NetlinkApplier::new().expect("netlink");
            a.apply(&plan::full(&rs)).expect("apply");
            let read = rs
                .tables
                .iter()
                .map(|(f, t)| (*f, a.read_table(*f, t, None).expect("read back")))
                .collect();
            (
                listing(&families),
                kernel_view(&rs, &read, None, None).findings,
            )
        });
        assert!(
            render::normalise(&listed) == render::normalise(&text),
            "{mode:?}: listed (-) vs rendered (+):\n{}",
            render::diff(&listed, &text)
        );
        assert!(drift.is_empty(), "{mode:?}: {drift:?}");
        assert_eq!(
            render::normalise(&fake.dump()),
            render::normalise(&text),
            "{mode:?}: the fake"
        );
    }
}
