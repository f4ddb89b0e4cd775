//! Applied ruleset vs desired ruleset -> the minimal transaction. Pure.
//!
//! Routine changes become element additions and deletions only. Chains whose rules change are
//! flushed and refilled in the same transaction; chains that are no longer wanted are flushed at
//! once and deleted in a later transaction (kernels before 6.2 notice unreferenced chains late,
//! so a delete in the same batch can fail with EBUSY).

use std::collections::{BTreeMap, BTreeSet};

use imbl::ordset::DiffItem;

use super::ir::{Element, Elements, Ruleset, Table};
use super::tx::{Group, Op, Transaction};
use crate::net::Family;

/// Create a whole table from nothing (after `AddTable`).
fn create_table(f: Family, t: &Table, ops: &mut Vec<Op>) {
    for (name, def) in &t.sets {
        ops.push(Op::AddSet {
            family: f,
            name: name.clone(),
            def: def.clone(),
        });
    }
    for (name, chain) in &t.chains {
        ops.push(Op::AddChain {
            family: f,
            name: name.clone(),
            base: chain.base.clone(),
        });
    }
    for (name, chain) in &t.chains {
        for rule in &chain.rules {
            ops.push(Op::AddRule {
                family: f,
                chain: name.clone(),
                rule: rule.clone(),
            });
        }
    }
    // Elements last, into sets the rules have already bound. A rule that binds a map walks
    // every element already in it (nf_tables_bind_set checks each for loops, kernel 6.x);
    // an element added to a bound map is checked alone. Elements first cost a walk of the
    // whole backend map per binding chain: 8% of a 50,000-Service cold start's CPU.
    for (name, els) in &t.elements {
        if let (Some(def), false) = (t.sets.get(name), els.is_empty()) {
            ops.push(Op::AddElements {
                family: f,
                set: name.clone(),
                def: def.clone(),
                // Shared with the desired ruleset (an imbl set: O(1) to clone), not copied:
                // a full sync of 50,000 Services would otherwise hold 400,000 elements twice.
                elements: els.clone(),
            });
        }
    }
}

/// Replace every nftproxy table atomically, whatever the kernel holds now: `add table` makes
/// the `delete table` safe when the table is missing. Families not desired are removed.
pub fn full(desired: &Ruleset) -> Transaction {
    let mut ops = Vec::new();
    for f in [Family::Ip, Family::Ip6] {
        ops.push(Op::AddTable(f));
        ops.push(Op::DeleteTable(f));
        if let Some(t) = desired.tables.get(&f) {
            ops.push(Op::AddTable(f));
            create_table(f, t, &mut ops);
        }
    }
    Transaction { ops }
}

/// Whether a transaction may be committed as several (`split`): it only creates (tables, sets,
/// chains, rules) and changes elements. A full rebuild (which deletes the table first) qualifies
/// only where the kernel holds none of our tables; the caller checks that.
pub fn splittable(tx: &Transaction, fresh: bool) -> bool {
    tx.ops.iter().all(|op| match op {
        Op::AddSet { .. } | Op::AddChain { .. } | Op::AddElements { .. } => true,
        Op::DeleteElements { .. } => true,
        Op::AddTable(_) | Op::DeleteTable(_) | Op::AddRule { .. } => fresh,
        Op::FlushChain { .. }
        | Op::DeleteChain { .. }
        | Op::DeleteSet { .. }
        | Op::FlushSet { .. } => false,
    })
}

/// Commit `tx` as several transactions of at most about `max` element changes each, handing
/// them to `emit` in order; returns how many were emitted (stops at the first error).
///
/// One transaction holds the kernel (and the CPU that sends it) for its whole length: a
/// 50,000-Service cold start is 400,000 elements, ~1 s in one `sendmsg` (kernel 6.x), during
/// which a task woken on that CPU waits. Cut into pieces, each commit is short and whatever
/// waits runs in between.
///
/// The first transaction holds every non-element op (in order: tables, sets, chains, rules)
/// and the `Skeleton` elements, then `Any` elements and the first groups; the rest follow by
/// `group`, whole groups per transaction (a group larger than `max` is a transaction of its
/// own). Every intermediate ruleset thus shows each group exactly as before or exactly as
/// after. Within a transaction, ops keep their order in `tx` (deletions before additions).
/// Only for a `tx` that `splittable` accepts.
pub fn split<E>(
    tx: &Transaction,
    group: &dyn Fn(Family, &str, &Element) -> Group,
    max: usize,
    emit: &mut dyn FnMut(Transaction) -> Result<(), E>,
) -> Result<usize, E> {
    let mut head = Vec::new();
    let mut head_elements: Vec<(usize, Vec<&Element>)> = Vec::new();
    // (group, op index, element); `Any` elements sort first.
    let mut grouped: Vec<(Group, u32, &Element)> = Vec::new();
    for (i, op) in tx.ops.iter().enumerate() {
        let (Op::AddElements {
            family,
            set,
            elements,
            ..
        }
        | Op::DeleteElements {
            family,
            set,
            elements,
            ..
        }) = op
        else {
            head.push(op.clone());
            continue;
        };
        let mut skeleton = Vec::new();
        for e in elements {
            match group(*family, set, e) {
                Group::Skeleton => skeleton.push(e),
                g => grouped.push((g, i as u32, e)),
            }
        }
        if !skeleton.is_empty() {
            head_elements.push((i, skeleton));
        }
    }
    for (i, els) in head_elements {
        head.push(with_elements(&tx.ops[i], els.into_iter()));
    }
    // Stable: within a group, op order (and each op's element order) stays.
    grouped.sort_by_key(|(g, i, _)| (*g, *i));
    let mut sent = 0;
    let mut ops = head;
    let mut start = 0;
    while start < grouped.len() {
        // Whole groups up to `max` (at least one group).
        let mut end = start;
        while end < grouped.len() {
            let g = grouped[end].0;
            let mut next = end;
            while next < grouped.len() && grouped[next].0 == g {
                next += 1;
            }
            let any = g == Group::Any;
            if end > start && !any && next - start > max {
                break;
            }
            end = next;
        }
        let mut piece: Vec<(u32, &Element)> = grouped[start..end]
            .iter()
            .map(|(_, i, e)| (*i, *e))
            .collect();
        piece.sort_by_key(|(i, _)| *i);
        let mut at = 0;
        while at < piece.len() {
            let i = piece[at].0;
            let mut to = at;
            while to < piece.len() && piece[to].0 == i {
                to += 1;
            }
            ops.push(with_elements(
                &tx.ops[i as usize],
                piece[at..to].iter().map(|(_, e)| *e),
            ));
            at = to;
        }
        emit(Transaction {
            ops: std::mem::take(&mut ops),
        })?;
        sent += 1;
        start = end;
    }
    if !ops.is_empty() {
        emit(Transaction { ops })?;
        sent += 1;
    }
    Ok(sent)
}

/// `op` (an element op) with only `els` of its elements.
fn with_elements<'a>(op: &Op, els: impl Iterator<Item = &'a Element>) -> Op {
    // Cloning an op shares its element set (a persistent set: O(1)); it is then replaced.
    let mut out = op.clone();
    if let Op::AddElements { elements, .. } | Op::DeleteElements { elements, .. } = &mut out {
        *elements = els.cloned().collect();
    }
    out
}

/// The result of a partial plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub tx: Transaction,
    /// Chains flushed by this transaction because nothing wants them any more; delete them
    /// in a transaction at least a second later (pass them back as `delete_due`).
    pub flushed_stale: Vec<(Family, String)>,
    /// A set changed its definition: only a full rebuild can do that.
    pub needs_full: bool,
}

/// The delta from `applied` (what the kernel holds, as far as nftproxy knows) to `desired`.
/// `delete_due` names stale (already flushed) chains whose grace period is over.
pub fn partial(
    applied: &Ruleset,
    desired: &Ruleset,
    delete_due: &BTreeSet<(Family, String)>,
) -> Plan {
    let mut plan = Plan::default();
    let ops = &mut plan.tx.ops;
    for f in [Family::Ip, Family::Ip6] {
        match (applied.tables.get(&f), desired.tables.get(&f)) {
            (None, None) => {}
            (None, Some(d)) => {
                ops.push(Op::AddTable(f));
                create_table(f, d, ops);
            }
            (Some(_), None) => ops.push(Op::DeleteTable(f)),
            (Some(a), Some(d)) => {
                if a.sets
                    .iter()
                    .any(|(n, def)| d.sets.get(n).is_some_and(|dd| dd != def))
                {
                    plan.needs_full = true;
                    continue;
                }
                // New sets first: new rules and elements refer to them.
                for (name, def) in &d.sets {
                    if !a.sets.contains_key(name) {
                        ops.push(Op::AddSet {
                            family: f,
                            name: name.clone(),
                            def: def.clone(),
                        });
                    }
                }
                // Element deletions, then additions (a changed map value is delete + add).
                let empty = Elements::new();
                let mut adds = Vec::new();
                for (name, def) in &d.sets {
                    if def.runtime_owned() {
                        continue;
                    }
                    let have = if a.sets.contains_key(name) {
                        a.elements.get(name).unwrap_or(&empty)
                    } else {
                        &empty
                    };
                    let want = d.elements.get(name).unwrap_or(&empty);
                    // Structural diff: versions that share nodes are compared only where they
                    // differ, so a routine change costs its own size, not the set's.
                    let (mut del, mut add): (Vec<Element>, Vec<Element>) = (Vec::new(), Vec::new());
                    for d in have.diff(want) {
                        match d {
                            DiffItem::Add(e) => add.push(e.clone()),
                            DiffItem::Remove(e) => del.push(e.clone()),
                        }
                    }
                    if !del.is_empty() {
                        ops.push(Op::DeleteElements {
                            family: f,
                            set: name.clone(),
                            def: def.clone(),
                            elements: del.into_iter().collect(),
                        });
                    }
                    if !add.is_empty() {
                        adds.push(Op::AddElements {
                            family: f,
                            set: name.clone(),
                            def: def.clone(),
                            elements: add.into_iter().collect(),
                        });
                    }
                }
                ops.extend(adds);
                for (name, chain) in &d.chains {
                    if !a.chains.contains_key(name) {
                        ops.push(Op::AddChain {
                            family: f,
                            name: name.clone(),
                            base: chain.base.clone(),
                        });
                    }
                }
                for (name, chain) in &d.chains {
                    match a.chains.get(name) {
                        Some(old) if old.rules == chain.rules && old.base == chain.base => {}
                        Some(old) if old.base != chain.base => {
                            plan.needs_full = true;
                        }
                        other => {
                            if other.is_some_and(|o| !o.rules.is_empty()) {
                                ops.push(Op::FlushChain {
                                    family: f,
                                    name: name.clone(),
                                });
                            }
                            for rule in &chain.rules {
                                ops.push(Op::AddRule {
                                    family: f,
                                    chain: name.clone(),
                                    rule: rule.clone(),
                                });
                            }
                        }
                    }
                }
                for (name, chain) in &a.chains {
                    if d.chains.contains_key(name) {
                        continue;
                    }
                    if !chain.rules.is_empty() {
                        ops.push(Op::FlushChain {
                            family: f,
                            name: name.clone(),
                        });
                        plan.flushed_stale.push((f, name.clone()));
                    } else if delete_due.contains(&(f, name.clone())) {
                        ops.push(Op::DeleteChain {
                            family: f,
                            name: name.clone(),
                        });
                    }
                }
                // Sets last: the rules that used them are gone by now in this batch.
                for name in a.sets.keys() {
                    if !d.sets.contains_key(name) {
                        ops.push(Op::DeleteSet {
                            family: f,
                            name: name.clone(),
                        });
                    }
                }
            }
        }
    }
    plan
}

/// What the kernel holds after `tx` committed on top of `applied`, without asking it.
/// Stale chains stay (empty) until deleted.
pub fn after(applied: &Ruleset, desired: &Ruleset, plan: &Plan) -> Ruleset {
    let mut out = desired.clone();
    for (f, a) in &applied.tables {
        let Some(t) = out.tables.get_mut(f) else {
            continue;
        };
        for (name, chain) in &a.chains {
            if t.chains.contains_key(name) {
                continue;
            }
            let deleted = plan.tx.ops.iter().any(|op| matches!(op, super::tx::Op::DeleteChain { family, name: n } if family == f && n == name));
            if !deleted {
                let mut empty = chain.clone();
                empty.rules.clear();
                t.chains.insert(name.clone(), empty);
            }
        }
    }
    out
}

/// Count of elements per set, for logs and metrics.
pub fn element_counts(r: &Ruleset) -> BTreeMap<(Family, String), usize> {
    r.tables
        .iter()
        .flat_map(|(f, t)| {
            t.elements
                .iter()
                .map(move |(n, e)| ((*f, n.clone()), e.len()))
        })
        .collect()
}
