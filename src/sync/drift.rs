//! Drift: what the kernel holds of our tables, as against what nftproxy believes it applied.
//!
//! Pure. The sync loop reads the kernel back ([`crate::apply::Applier::read_table`]) and hands
//! the result here; [`kernel_view`] turns it into a ruleset that describes the kernel *as far as
//! the planner needs*, and lists what differs. Planning from that view to the desired ruleset
//! gives exactly the repair: missing elements are added, foreign ones deleted, a flushed chain
//! refilled, a chain with foreign rules flushed and refilled, a missing set recreated. Only a set
//! whose definition was changed from outside needs the whole table rebuilt.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::apply::KernelTable;
use crate::model::PortKey;
use crate::net::Family;
use crate::nft::ir::{Action, Chain, Decl, Element, Ruleset, SetDef, Table, Value};
use crate::nft::render;
use crate::proxy::ProxyState;

/// Elements named in a finding, at most (the counts are always complete).
const EXAMPLES: usize = 3;

/// One difference between the kernel and what nftproxy applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub family: Family,
    /// `table`, `set NAME`, `chain NAME`.
    pub object: String,
    /// What differs, in words, with a few example elements.
    pub detail: String,
    /// Service ports whose entries differ (as far as they can be told from the elements).
    pub services: BTreeSet<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.family.keyword(),
            self.object,
            self.detail
        )?;
        if !self.services.is_empty() {
            let names: Vec<&str> = self.services.iter().map(String::as_str).collect();
            write!(f, " (services: {})", names.join(", "))?;
        }
        Ok(())
    }
}

/// One element in the kernel and not in the reference, or the other way round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementDiff {
    pub family: Family,
    pub set: String,
    pub element: Element,
    /// In the reference, not in the kernel (else: in the kernel only).
    pub missing: bool,
}

/// The kernel as the planner should see it, and what differs from what was applied.
#[derive(Debug, Clone, Default)]
pub struct Drift {
    pub view: Ruleset,
    pub findings: Vec<Finding>,
    /// Every element that differs.
    pub elements: Vec<ElementDiff>,
    /// A set definition was changed from outside: only a full rebuild repairs it.
    pub needs_full: bool,
    pub missing_elements: usize,
    pub extra_elements: usize,
    /// Empty chains the kernel holds and the ruleset does not (in the view, empty): the sync
    /// loop deletes them after the grace period, like the chains it flushes itself.
    pub leftover_chains: BTreeSet<(Family, String)>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Which Service port an element's key belongs to: entries are keyed by address . protocol .
/// port (ClusterIP, external IPs, LB IPs, backends), NodePorts by protocol . port.
pub struct Owners(HashMap<(Family, Vec<Value>), PortKey>);

impl Owners {
    pub fn of(state: &ProxyState) -> Owners {
        let mut m = HashMap::new();
        for (f, fs) in &state.families {
            for ps in fs.ports.values() {
                for key in crate::nft::compile::entry_keys(&ps.sp) {
                    m.insert((*f, key), ps.sp.key.clone());
                }
            }
        }
        Owners(m)
    }

    pub fn owner(&self, f: Family, key: &[Value]) -> Option<&PortKey> {
        for n in [3usize, 2] {
            if key.len() >= n {
                if let Some(k) = self.0.get(&(f, key[..n].to_vec())) {
                    return Some(k);
                }
            }
        }
        None
    }
}

/// A rule list that differs from `rules` and is not empty: stands for "rules nftproxy did not
/// write", so the planner flushes the chain before refilling it.
fn foreign_rules(rules: &[crate::nft::ir::Rule]) -> Vec<crate::nft::ir::Rule> {
    let marker = crate::nft::ir::Rule {
        matches: Vec::new(),
        action: Action::Return,
    };
    let mut out = rules.to_vec();
    out.push(marker);
    out
}

/// Compare the kernel (`kernel`, per family: None when our table is missing) with `applied`.
/// `read` names the sets whose elements were read, per family (None: every set); the others
/// are taken as applied. `state` only names the Services in the findings.
pub fn kernel_view(
    applied: &Ruleset,
    kernel: &BTreeMap<Family, Option<KernelTable>>,
    read: Option<&BTreeMap<Family, BTreeSet<String>>>,
    state: Option<&ProxyState>,
) -> Drift {
    let mut d = Drift {
        view: applied.clone(),
        ..Drift::default()
    };
    let owners = std::cell::OnceCell::new();
    for (f, want) in &applied.tables {
        let Some(k) = kernel.get(f) else { continue };
        let Some(k) = k else {
            d.view.tables.remove(f);
            d.findings.push(Finding {
                family: *f,
                object: "table".into(),
                detail: "missing (deleted from outside)".into(),
                services: BTreeSet::new(),
            });
            continue;
        };
        let mut view = Table {
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
            elements: BTreeMap::new(),
        };
        for (name, def) in &want.sets {
            if k.missing_sets.contains(name) {
                d.findings.push(Finding {
                    family: *f,
                    object: format!("set {name}"),
                    detail: "missing".into(),
                    services: BTreeSet::new(),
                });
                continue;
            }
            if k.changed_sets.contains(name) {
                d.needs_full = true;
                d.findings.push(Finding {
                    family: *f,
                    object: format!("set {name}"),
                    detail: "definition changed".into(),
                    services: BTreeSet::new(),
                });
            }
            view.sets.insert(name.clone(), def.clone());
            let believed = want.elements.get(name).cloned().unwrap_or_default();
            let was_read = read.and_then(|r| r.get(f)).is_none_or(|r| r.contains(name));
            let Some(have) = k.elements.get(name).filter(|_| was_read) else {
                view.elements.insert(name.clone(), believed);
                continue;
            };
            let have: crate::nft::ir::Elements = have.iter().cloned().collect();
            if have != believed {
                let missing: Vec<&Element> =
                    believed.iter().filter(|e| !have.contains(*e)).collect();
                let extra: Vec<&Element> = have.iter().filter(|e| !believed.contains(*e)).collect();
                d.missing_elements += missing.len();
                d.extra_elements += extra.len();
                for (els, is_missing) in [(&missing, true), (&extra, false)] {
                    d.elements.extend(els.iter().map(|e| ElementDiff {
                        family: *f,
                        set: name.clone(),
                        element: (*e).clone(),
                        missing: is_missing,
                    }));
                }
                let owners = owners.get_or_init(|| state.map(Owners::of));
                let mut services = BTreeSet::new();
                if let Some(o) = owners {
                    for e in missing.iter().chain(&extra).take(64) {
                        if let Some(k) = o.owner(*f, e.key()) {
                            services.insert(k.to_string());
                        }
                    }
                }
                let examples = |els: &[&Element]| -> String {
                    els.iter()
                        .take(EXAMPLES)
                        .map(|e| render::element(e))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!(
                        "{} missing ({})",
                        missing.len(),
                        examples(&missing)
                    ));
                }
                if !extra.is_empty() {
                    parts.push(format!("{} extra ({})", extra.len(), examples(&extra)));
                }
                d.findings.push(Finding {
                    family: *f,
                    object: format!("set {name}"),
                    detail: parts.join("; "),
                    services,
                });
            }
            view.elements.insert(name.clone(), have);
        }
        for name in &k.extra_sets {
            // Only the name matters to the planner (it deletes the set).
            view.sets
                .insert(name.clone(), SetDef::plain(Decl::Type(Vec::new())));
            d.findings.push(Finding {
                family: *f,
                object: format!("set {name}"),
                detail: "not ours (added from outside)".into(),
                services: BTreeSet::new(),
            });
        }
        for (name, chain) in &want.chains {
            match k.changed_chains.get(name) {
                None => {
                    view.chains.insert(name.clone(), chain.clone());
                }
                Some(0) => {
                    // Flushed (or deleted): the planner creates it if needed and refills it.
                    d.findings.push(Finding {
                        family: *f,
                        object: format!("chain {name}"),
                        detail: format!("{} rules missing (flushed or deleted)", chain.rules.len()),
                        services: BTreeSet::new(),
                    });
                }
                Some(n) => {
                    view.chains.insert(
                        name.clone(),
                        Chain {
                            base: chain.base.clone(),
                            rules: foreign_rules(&chain.rules),
                        },
                    );
                    d.findings.push(Finding {
                        family: *f,
                        object: format!("chain {name}"),
                        detail: format!(
                            "holds {n} rules, {} expected, or other rules",
                            chain.rules.len()
                        ),
                        services: BTreeSet::new(),
                    });
                }
            }
        }
        for (name, n) in &k.changed_chains {
            if want.chains.contains_key(name) {
                continue;
            }
            view.chains.insert(
                name.clone(),
                Chain {
                    base: None,
                    rules: foreign_rules(&[]),
                },
            );
            d.findings.push(Finding {
                family: *f,
                object: format!("chain {name}"),
                detail: format!("not ours ({n} rules added from outside)"),
                services: BTreeSet::new(),
            });
        }
        for name in &k.extra_empty_chains {
            view.chains.insert(
                name.clone(),
                Chain {
                    base: None,
                    rules: Vec::new(),
                },
            );
            d.leftover_chains.insert((*f, name.clone()));
            d.findings.push(Finding {
                family: *f,
                object: format!("chain {name}"),
                detail: "empty and not ours (left over by an earlier agent, or added from outside)"
                    .into(),
                services: BTreeSet::new(),
            });
        }
        d.view.tables.insert(*f, view);
    }
    d
}

/// The elements of `set` with the backends of each entry renumbered in sorted order, when
/// `set` is a backends map: two rulesets that differ only in which slot holds which backend
/// (history, not API objects: see `pipeline::stable_slots`) compare equal this way.
pub fn canonical_slots(set: &str, elements: Vec<Element>) -> Vec<Element> {
    if !crate::nft::compile::is_backends_map(set) {
        return elements;
    }
    let mut by_entry: BTreeMap<Vec<Value>, Vec<Vec<Value>>> = BTreeMap::new();
    let mut other = Vec::new();
    for e in elements {
        match (e.key().split_last(), e.value()) {
            (Some((Value::Slot(_), entry)), Some(v)) => {
                by_entry.entry(entry.to_vec()).or_default().push(v.to_vec())
            }
            _ => other.push(e),
        }
    }
    for (entry, mut values) in by_entry {
        values.sort();
        for (i, v) in values.into_iter().enumerate() {
            let mut key = entry.clone();
            key.push(Value::Slot(i as u32));
            other.push(Element::map(&key, &v));
        }
    }
    other
}

/// A ruleset with every backends map in canonical slot order.
pub fn canonical_ruleset(rs: &Ruleset) -> Ruleset {
    let mut out = rs.clone();
    for t in out.tables.values_mut() {
        for (name, els) in t.elements.iter_mut() {
            if crate::nft::compile::is_backends_map(name) {
                *els = canonical_slots(name, els.iter().cloned().collect())
                    .into_iter()
                    .collect();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::fake::FakeApplier;
    use crate::apply::Applier;
    use crate::nft::ir::Rule;
    use crate::nft::plan;
    use crate::nft::tx::{Op, Transaction};

    fn applied() -> (FakeApplier, Ruleset, ProxyState) {
        let objs = crate::testutil::cluster_objects();
        let state = crate::testutil::node_a_state(&objs);
        let cfg = crate::nft::compile::CompileConfig {
            cluster_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")],
            ..crate::nft::compile::CompileConfig::default()
        };
        let rs = crate::nft::compile::compile(&state, &cfg).expect("compile");
        let mut fake = FakeApplier::new();
        fake.apply(&plan::full(&rs)).expect("full");
        (fake, rs, state)
    }

    fn read(fake: &mut FakeApplier, rs: &Ruleset) -> BTreeMap<Family, Option<KernelTable>> {
        rs.tables
            .iter()
            .map(|(f, t)| (*f, fake.read_table(*f, t, None).expect("read")))
            .collect()
    }

    /// Change the fake "from outside", detect it, repair it with the plan from the view, and
    /// check that the repair is the delta only and leaves the kernel equal to what was applied.
    fn repairs(change: impl FnOnce(&mut FakeApplier, &Ruleset), max_ops: usize) -> Drift {
        let (mut fake, rs, state) = applied();
        assert!(kernel_view(&rs, &read(&mut fake, &rs), None, Some(&state)).is_empty());
        change(&mut fake, &rs);
        let d = kernel_view(&rs, &read(&mut fake, &rs), None, Some(&state));
        assert!(!d.is_empty(), "the change is seen");
        assert!(!d.needs_full);
        let p = plan::partial(&d.view, &rs, &BTreeSet::new());
        assert!(!p.needs_full);
        assert!(p.tx.ops.len() <= max_ops, "only the delta: {:?}", p.tx.ops);
        fake.apply(&p.tx).expect("repair applies on a strict fake");
        assert_eq!(
            render::normalise(&fake.dump()),
            render::normalise(&render::ruleset(&rs))
        );
        assert!(kernel_view(&rs, &read(&mut fake, &rs), None, Some(&state)).is_empty());
        d
    }

    fn busiest_set(rs: &Ruleset) -> (Family, String) {
        rs.tables
            .iter()
            .flat_map(|(f, t)| {
                t.elements
                    .iter()
                    .filter(|(n, _)| !t.sets[*n].runtime_owned())
                    .map(move |(n, e)| (e.len(), *f, n.clone()))
            })
            .max()
            .map(|(_, f, n)| (f, n))
            .expect("a set with elements")
    }

    #[test]
    fn a_flushed_set_is_refilled() {
        let d = repairs(
            |fake, rs| {
                let (f, set) = busiest_set(rs);
                fake.apply(&Transaction {
                    ops: vec![Op::FlushSet {
                        family: f,
                        name: set,
                    }],
                })
                .expect("flush");
            },
            1,
        );
        assert!(d.missing_elements > 1);
        assert!(!d.findings[0].services.is_empty(), "{:?}", d.findings);
    }

    #[test]
    fn deleted_and_foreign_elements_are_repaired() {
        repairs(
            |fake, rs| {
                let (f, set) = busiest_set(rs);
                let t = &rs.tables[&f];
                let def = t.sets[&set].clone();
                let gone = t.elements[&set].iter().next().cloned().expect("element");
                // A foreign element: the same key shape, a port nothing uses.
                let mut key = gone.key().to_vec();
                for v in key.iter_mut() {
                    if let Value::Port(p) = v {
                        *p = 9;
                    }
                }
                let one = Element::new(key, gone.value().map(<[Value]>::to_vec));
                fake.apply(&Transaction {
                    ops: vec![
                        Op::DeleteElements {
                            family: f,
                            set: set.clone(),
                            def: def.clone(),
                            elements: crate::nft::ir::Elements::unit(gone),
                        },
                        Op::AddElements {
                            family: f,
                            set,
                            def,
                            elements: crate::nft::ir::Elements::unit(one),
                        },
                    ],
                })
                .expect("outside change");
            },
            2,
        );
    }

    #[test]
    fn flushed_and_foreign_rules_are_repaired() {
        // A flushed chain is refilled.
        repairs(
            |fake, _| {
                fake.apply(&Transaction {
                    ops: vec![Op::FlushChain {
                        family: Family::Ip,
                        name: "services".into(),
                    }],
                })
                .expect("flush");
            },
            16,
        );
        // A rule added to one of our chains: the chain is flushed and refilled.
        repairs(
            |fake, _| {
                fake.apply(&Transaction {
                    ops: vec![Op::AddRule {
                        family: Family::Ip,
                        chain: "services".into(),
                        rule: Rule {
                            matches: vec![],
                            action: Action::Drop,
                        },
                    }],
                })
                .expect("add rule");
            },
            16,
        );
    }

    #[test]
    fn a_deleted_table_is_recreated() {
        let d = repairs(
            |fake, _| {
                fake.apply(&Transaction {
                    ops: vec![Op::DeleteTable(Family::Ip)],
                })
                .expect("delete");
            },
            usize::MAX,
        );
        assert_eq!(d.findings[0].object, "table");
    }

    #[test]
    fn only_the_sets_read_are_compared() {
        let (mut fake, rs, _) = applied();
        let (f, set) = busiest_set(&rs);
        fake.apply(&Transaction {
            ops: vec![Op::FlushSet {
                family: f,
                name: set.clone(),
            }],
        })
        .expect("flush");
        let other: BTreeMap<Family, BTreeSet<String>> =
            [(f, BTreeSet::from(["nothing".to_string()]))].into();
        let k = rs
            .tables
            .iter()
            .map(|(fam, t)| {
                let only = other.get(fam).cloned().unwrap_or_default();
                (*fam, fake.read_table(*fam, t, Some(&only)).expect("read"))
            })
            .collect();
        assert!(kernel_view(&rs, &k, Some(&other), None).is_empty());
        let k = read(&mut fake, &rs);
        assert!(!kernel_view(&rs, &k, None, None).is_empty());
    }
}
