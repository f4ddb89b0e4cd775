//! `nftproxy diff`: the live tables on this node against what `run` would program now.
//!
//! The desired ruleset comes from the same code as `render` (objects from a file, or listed from
//! the API once); the kernel is read back exactly as the agent's drift check reads it, and the
//! comparison is the agent's ([`crate::sync::drift::kernel_view`]). Nothing is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;

use super::args::DiffArgs;
use crate::apply::{Applier, ApplyError, KernelTable};
use crate::net::Family;
use crate::nft::ir::Ruleset;
use crate::nft::render;
use crate::pipeline::{self, FromScratch};
use crate::proxy::ProxyState;
use crate::sync::drift::{self, Owners};

/// Heading for differences that belong to no Service port (rules, set definitions, tables, and
/// elements whose key names no entry point).
const SKELETON: &str = "(ruleset)";

/// The differences, grouped per Service port (`namespace/name:port/protocol`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The text `diff` prints: one heading per Service port, `-` for what the kernel lacks,
    /// `+` for what it has and should not, `~` for what differs.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (g, lines) in &self.groups {
            let _ = writeln!(out, "{g}");
            for l in lines {
                let _ = writeln!(out, "  {l}");
            }
        }
        out
    }
}

/// Our tables as read back, per family (None: missing).
pub type KernelTables = BTreeMap<Family, Option<KernelTable>>;

/// Read our tables (every family the desired ruleset has, and any other family's table that
/// exists though it should not).
pub fn read_kernel(
    a: &mut dyn Applier,
    desired: &Ruleset,
) -> Result<(KernelTables, Vec<Family>), ApplyError> {
    let mut kernel = BTreeMap::new();
    for (f, t) in &desired.tables {
        kernel.insert(*f, a.read_table(*f, t, None)?);
    }
    let mut extra_tables = Vec::new();
    for f in [Family::Ip, Family::Ip6] {
        if !desired.tables.contains_key(&f) && a.table_exists(f)? {
            extra_tables.push(f);
        }
    }
    Ok((kernel, extra_tables))
}

/// Compare. Pure.
pub fn compare(
    desired: &Ruleset,
    kernel: &KernelTables,
    extra_tables: &[Family],
    state: &ProxyState,
) -> Report {
    // Which slot holds which backend is history (the agent keeps survivors in place), not
    // something the API decides: compare backends maps in canonical slot order.
    let desired = &drift::canonical_ruleset(desired);
    let kernel: KernelTables = kernel
        .iter()
        .map(|(f, t)| {
            let t = t.clone().map(|mut t| {
                for (set, els) in t.elements.iter_mut() {
                    *els = drift::canonical_slots(set, std::mem::take(els));
                }
                t
            });
            (*f, t)
        })
        .collect();
    let d = drift::kernel_view(desired, &kernel, None, None);
    let owners = Owners::of(state);
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &d.elements {
        let group = owners
            .owner(e.family, e.element.key())
            .map(|k| k.to_string())
            .unwrap_or_else(|| SKELETON.to_string());
        groups.entry(group).or_default().insert(format!(
            "{} {} {} element {}",
            if e.missing { "-" } else { "+" },
            e.family.keyword(),
            e.set,
            render::element(&e.element)
        ));
    }
    for f in &d.findings {
        // Element findings are listed element by element above.
        let elements_only = f.object.starts_with("set ")
            && d.elements
                .iter()
                .any(|e| e.family == f.family && f.object == format!("set {}", e.set));
        if elements_only {
            continue;
        }
        let sign = if f.detail.starts_with("missing") {
            "-"
        } else if f.detail.starts_with("not ours") {
            "+"
        } else {
            "~"
        };
        groups
            .entry(SKELETON.to_string())
            .or_default()
            .insert(format!(
                "{sign} {} {}: {}",
                f.family.keyword(),
                f.object,
                f.detail
            ));
    }
    for f in extra_tables {
        groups
            .entry(SKELETON.to_string())
            .or_default()
            .insert(format!(
                "+ {} table: exists, nothing to program there",
                f.keyword()
            ));
    }
    Report {
        groups: groups
            .into_iter()
            .map(|(g, lines)| (g, lines.into_iter().collect()))
            .collect(),
    }
}

/// List what `run` would watch, once: Services and EndpointSlices (with the agent's label
/// selectors), this Node, and ServiceCIDRs where the API serves them.
pub async fn list_objects(
    client: kube::Client,
    node: &str,
) -> Result<crate::k8s::objects::Objects, kube::Error> {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    use kube::api::{Api, ListParams};
    let svc = ListParams::default().labels(crate::k8s::watch::SERVICE_SELECTOR);
    let eps = ListParams::default().labels(crate::k8s::watch::SLICE_SELECTOR);
    let services = Api::<Service>::all(client.clone()).list(&svc).await?.items;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&eps)
        .await?
        .items;
    let nodes = Api::<Node>::all(client.clone())
        .get_opt(node)
        .await?
        .into_iter()
        .collect();
    let service_cidrs = match Api::<ServiceCIDR>::all(client)
        .list(&ListParams::default())
        .await
    {
        Ok(l) => l.items,
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(crate::k8s::objects::Objects {
        services,
        slices,
        nodes,
        service_cidrs,
    })
}

/// `nftproxy diff`: exit 0 when the kernel holds what `run` would program, 1 when not, 2 when
/// the comparison could not be made.
pub fn diff(args: DiffArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("nftproxy diff: {e}");
        ExitCode::from(2)
    };
    let mut cfg = match args.proxy.proxy_config() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let objs = match &args.file {
        Some(f) => match super::read_objects(f) {
            Ok(o) => o,
            Err(e) => return fail(e),
        },
        None => match super::list_from_api(
            args.kubeconfig.as_deref(),
            args.master.as_deref(),
            &cfg.node_name,
        ) {
            Ok(o) => o,
            Err(e) => return fail(e),
        },
    };
    // From a file, like `render`: the named node, else the file's only Node.
    let node = match &args.file {
        Some(_) => objs.node_info(args.proxy.hostname_override.as_deref()),
        None => objs.node_info(Some(&cfg.node_name)),
    };
    cfg.node_name = node.name.clone();
    let FromScratch {
        ruleset: desired,
        state,
        problems,
    } = match pipeline::from_objects(&objs, &cfg, &node) {
        Ok(x) => x,
        Err(e) => return fail(e.to_string()),
    };
    for p in problems {
        eprintln!("skipped: {}: {}", p.object, p.reason);
    }
    let mut applier = match crate::apply::netlink::NetlinkApplier::new() {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let (kernel, extra) = match read_kernel(&mut applier, &desired) {
        Ok(k) => k,
        Err(e) => return fail(e.to_string()),
    };
    let report = compare(&desired, &kernel, &extra, &state);
    if report.is_empty() {
        println!("no differences: the kernel holds what nftproxy would program");
        ExitCode::SUCCESS
    } else {
        print!("{}", report.text());
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::fake::FakeApplier;
    use crate::nft::ir::Value;
    use crate::nft::plan;
    use crate::nft::tx::{Op, Transaction};

    fn setup() -> (FakeApplier, Ruleset, ProxyState) {
        let objs = crate::testutil::cluster_objects();
        let state = crate::testutil::node_a_state(&objs);
        let rs = crate::nft::compile::compile(&state, &Default::default()).expect("compile");
        let mut fake = FakeApplier::new();
        fake.apply(&plan::full(&rs)).expect("apply");
        (fake, rs, state)
    }

    #[test]
    fn equal_tables_have_no_difference() {
        let (mut fake, rs, state) = setup();
        let (k, extra) = read_kernel(&mut fake, &rs).expect("read");
        assert!(compare(&rs, &k, &extra, &state).is_empty());
    }

    #[test]
    fn differences_are_grouped_by_service_port() {
        let (mut fake, rs, state) = setup();
        // The ClusterIP entry of one Service port disappears; a foreign rule appears.
        let t = &rs.tables[&Family::Ip];
        let set = if t.elements.get("clusterip").is_some_and(|e| !e.is_empty()) {
            "clusterip"
        } else {
            "clusterip-local"
        };
        let gone = t.elements[set].iter().next().cloned().expect("entry");
        let port = state.families[&Family::Ip]
            .ports
            .values()
            .find(|ps| {
                gone.key().first() == Some(&Value::Addr(ps.sp.cluster_ip))
                    && gone.key().get(2) == Some(&Value::Port(ps.sp.port))
            })
            .map(|ps| ps.sp.key.to_string())
            .expect("owner");
        fake.apply(&Transaction {
            ops: vec![
                Op::DeleteElements {
                    family: Family::Ip,
                    set: set.into(),
                    def: t.sets[set].clone(),
                    elements: crate::nft::ir::Elements::unit(gone.clone()),
                },
                Op::AddRule {
                    family: Family::Ip,
                    chain: "services".into(),
                    rule: crate::nft::ir::Rule {
                        matches: vec![],
                        action: crate::nft::ir::Action::Drop,
                    },
                },
            ],
        })
        .expect("outside change");
        let (k, extra) = read_kernel(&mut fake, &rs).expect("read");
        let r = compare(&rs, &k, &extra, &state);
        let text = r.text();
        assert_eq!(
            r.groups[&port],
            vec![format!("- ip {set} element {}", render::element(&gone))],
            "{text}"
        );
        assert!(
            r.groups[SKELETON][0].starts_with("~ ip chain services"),
            "{text}"
        );
        // A table that should not exist.
        let (k, _) = read_kernel(&mut fake, &rs).expect("read");
        let mut only_v6 = rs.clone();
        only_v6.tables.remove(&Family::Ip);
        let (_, extra) = read_kernel(&mut fake, &only_v6).expect("read");
        assert_eq!(extra, vec![Family::Ip]);
        assert!(compare(&only_v6, &k, &extra, &state)
            .text()
            .contains("+ ip table"));
    }
}
