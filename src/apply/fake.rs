//! An in-memory applier at least as strict as the kernel: transactions are atomic, references
//! are checked (rules to sets and chains, deletes of things in use), duplicate and missing
//! elements fail, elements must fit their set's type, interval elements must not overlap.
//! Failures can be injected, and the table can be changed "from outside" to test self-heal.

use std::collections::VecDeque;

use super::{Applier, ApplyError};
use crate::net::Family;
use crate::nft::ir::{
    Action, Decl, Element, Field, FieldType, Match, Rule, Ruleset, SetDef, Table, Value,
};
use crate::nft::tx::{Op, Transaction};

#[derive(Debug, Default)]
pub struct FakeApplier {
    pub state: Ruleset,
    pub generation: u32,
    /// Errors to return from the next `apply` calls, in order (without changing anything).
    pub fail: VecDeque<ApplyError>,
    /// Every transaction that committed.
    pub committed: Vec<Transaction>,
    /// Number of apply calls, committed or not.
    pub calls: usize,
    /// Errors for particular apply calls (1-based call number), for a failure after successes.
    pub fail_call: std::collections::BTreeMap<usize, ApplyError>,
}

fn what(op: &Op) -> String {
    match op {
        Op::AddTable(f) => format!("add table {} nftproxy", f.keyword()),
        Op::DeleteTable(f) => format!("delete table {} nftproxy", f.keyword()),
        Op::AddChain { family, name, .. } => format!("add chain {} {name}", family.keyword()),
        Op::FlushChain { family, name } => format!("flush chain {} {name}", family.keyword()),
        Op::DeleteChain { family, name } => format!("delete chain {} {name}", family.keyword()),
        Op::AddRule { family, chain, .. } => format!("add rule {} {chain}", family.keyword()),
        Op::AddSet { family, name, .. } => format!("add set {} {name}", family.keyword()),
        Op::DeleteSet { family, name } => format!("delete set {} {name}", family.keyword()),
        Op::FlushSet { family, name } => format!("flush set {} {name}", family.keyword()),
        Op::AddElements { family, set, .. } => format!("add element {} {set}", family.keyword()),
        Op::DeleteElements { family, set, .. } => {
            format!("delete element {} {set}", family.keyword())
        }
    }
}

fn field_type(f: Family, x: &Field) -> FieldType {
    match x {
        Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => FieldType::addr(f),
        Field::L4proto => FieldType::InetProto,
        Field::ThDport | Field::CtOrigProtoDst => FieldType::InetService,
        Field::Numgen(_) => FieldType::Slot,
        Field::Iifname => FieldType::Ifname,
    }
}

fn decl_types(f: Family, d: &Decl) -> Vec<FieldType> {
    match d {
        Decl::Type(t) => t.clone(),
        Decl::Typeof(fs) => fs.iter().map(|x| field_type(f, x)).collect(),
    }
}

fn value_fits(v: &Value, t: FieldType, interval: bool) -> bool {
    match (v, t) {
        (Value::Addr(std::net::IpAddr::V4(_)), FieldType::Ipv4Addr)
        | (Value::Addr(std::net::IpAddr::V6(_)), FieldType::Ipv6Addr) => true,
        (Value::Prefix(ipnet::IpNet::V4(_)), FieldType::Ipv4Addr)
        | (Value::Prefix(ipnet::IpNet::V6(_)), FieldType::Ipv6Addr) => interval,
        (Value::Proto(_), FieldType::InetProto)
        | (Value::Port(_), FieldType::InetService)
        | (Value::Slot(_), FieldType::Slot) => true,
        // A name prefix (`"veth*"`) only in an interval set, as in the kernel.
        (Value::Ifname(n), FieldType::Ifname) => interval || !n.ends_with('*'),
        _ => false,
    }
}

fn invalid(op: &Op, detail: impl Into<String>) -> ApplyError {
    ApplyError::Invalid {
        what: what(op),
        detail: detail.into(),
    }
}

/// Interval elements as (start, end) per component for overlap checks.
fn overlaps(a: &Element, b: &Element) -> bool {
    a.key().len() == b.key().len()
        && a.key().iter().zip(b.key()).all(|(x, y)| match (x, y) {
            (Value::Prefix(p), Value::Prefix(q)) => p.contains(q) || q.contains(p),
            (Value::Prefix(p), Value::Addr(a)) | (Value::Addr(a), Value::Prefix(p)) => {
                p.contains(a)
            }
            (Value::Ifname(p), Value::Ifname(q)) => {
                let stem = |s: &str| s.strip_suffix('*').map(str::to_string);
                match (stem(p), stem(q)) {
                    (Some(a), Some(b)) => a.starts_with(&b) || b.starts_with(&a),
                    (Some(a), None) => q.starts_with(&a),
                    (None, Some(b)) => p.starts_with(&b),
                    (None, None) => p == q,
                }
            }
            (x, y) => x == y,
        })
}

impl FakeApplier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Delete a table behind nftproxy's back (someone ran `nft delete table`).
    pub fn external_delete_table(&mut self, f: Family) {
        self.state.tables.remove(&f);
        self.generation += 1;
    }

    /// Someone flushed one of our chains.
    pub fn external_flush_chain(&mut self, f: Family, chain: &str) {
        if let Some(c) = self
            .state
            .tables
            .get_mut(&f)
            .and_then(|t| t.chains.get_mut(chain))
        {
            c.rules.clear();
        }
        self.generation += 1;
    }

    /// Someone flushed one of our sets.
    pub fn external_flush_set(&mut self, f: Family, set: &str) {
        if let Some(e) = self
            .state
            .tables
            .get_mut(&f)
            .and_then(|t| t.elements.get_mut(set))
        {
            e.clear();
        }
        self.generation += 1;
    }

    /// Someone deleted one element of one of our sets.
    pub fn external_delete_element(&mut self, f: Family, set: &str, e: &Element) {
        if let Some(els) = self
            .state
            .tables
            .get_mut(&f)
            .and_then(|t| t.elements.get_mut(set))
        {
            els.remove(e);
        }
        self.generation += 1;
    }

    /// The packet path added an element (`update @set`, as the affinity maps are written).
    pub fn packet_path_add_element(&mut self, f: Family, set: &str, e: Element) {
        if let Some(t) = self.state.tables.get_mut(&f) {
            t.elements.entry(set.to_string()).or_default().insert(e);
        }
    }

    /// Some other component committed something in this network namespace.
    pub fn external_commit(&mut self) {
        self.generation += 1;
    }

    fn table<'a>(state: &'a mut Ruleset, op: &Op, f: Family) -> Result<&'a mut Table, ApplyError> {
        state
            .tables
            .get_mut(&f)
            .ok_or_else(|| ApplyError::NotFound { what: what(op) })
    }

    /// An element operation carries the set definition it was built for (the netlink applier
    /// encodes the elements by it): one that differs from the table's would be encoded wrongly
    /// for the kernel's set, so it is refused here as a bug.
    fn check_def(op: &Op, op_def: &SetDef, table_def: &SetDef) -> Result<(), ApplyError> {
        if op_def != table_def {
            return Err(ApplyError::Invalid {
                what: what(op),
                detail: format!(
                    "the operation's set definition {op_def:?} differs from the table's {table_def:?}"
                ),
            });
        }
        Ok(())
    }

    fn check_rule(t: &Table, f: Family, op: &Op, rule: &Rule) -> Result<(), ApplyError> {
        let check_lookup =
            |key: &[Field], set: &str, want_map: Option<bool>| -> Result<(), ApplyError> {
                let def = t.sets.get(set).ok_or_else(|| ApplyError::NotFound {
                    what: format!("{}: set {set}", what(op)),
                })?;
                let kt = decl_types(f, &def.key);
                let have: Vec<FieldType> = key.iter().map(|x| field_type(f, x)).collect();
                if kt != have {
                    return Err(invalid(
                        op,
                        format!("key {have:?} does not match set {set} {kt:?}"),
                    ));
                }
                if let Some(m) = want_map {
                    if def.data.is_some() != m {
                        return Err(invalid(op, format!("{set}: map/set mismatch")));
                    }
                }
                Ok(())
            };
        for m in &rule.matches {
            if let Match::Lookup { key, set, .. } = m {
                check_lookup(key, set, Some(false))?;
            }
        }
        match &rule.action {
            Action::Jump(c) | Action::Goto(c) => match t.chains.get(c) {
                None => {
                    return Err(ApplyError::NotFound {
                        what: format!("{}: chain {c}", what(op)),
                    })
                }
                Some(ch) if ch.base.is_some() => {
                    return Err(invalid(op, format!("jump to base chain {c}")))
                }
                Some(_) => {}
            },
            Action::DnatMap { key, map } => check_lookup(key, map, Some(true))?,
            Action::UpdateTimeout { set, key, .. } => {
                check_lookup(key, set, Some(true))?;
                if !t.sets.get(set).is_some_and(|d| d.flags.timeout) {
                    return Err(invalid(op, format!("update of {set} without timeout flag")));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn check_element(f: Family, op: &Op, def: &SetDef, e: &Element) -> Result<(), ApplyError> {
        let kt = decl_types(f, &def.key);
        if e.key().len() != kt.len()
            || !e
                .key()
                .iter()
                .zip(&kt)
                .all(|(v, t)| value_fits(v, *t, def.flags.interval))
        {
            return Err(invalid(
                op,
                format!("element key {:?} does not fit {kt:?}", e.key()),
            ));
        }
        match (&def.data, e.value()) {
            (None, None) => Ok(()),
            (Some(d), Some(v)) => {
                let dt = decl_types(f, d);
                if v.len() == dt.len() && v.iter().zip(&dt).all(|(v, t)| value_fits(v, *t, false)) {
                    Ok(())
                } else {
                    Err(invalid(
                        op,
                        format!("element value {v:?} does not fit {dt:?}"),
                    ))
                }
            }
            _ => Err(invalid(op, "element value presence does not match the set")),
        }
    }

    fn referenced(t: &Table, set: Option<&str>, chain: Option<&str>) -> bool {
        t.chains.values().flat_map(|c| c.rules.iter()).any(|r| {
            let uses_set = set.is_some_and(|s| {
                r.matches
                    .iter()
                    .any(|m| matches!(m, Match::Lookup { set, .. } if set == s))
                    || matches!(&r.action, Action::DnatMap { map, .. } if map == s)
                    || matches!(&r.action, Action::UpdateTimeout { set, .. } if set == s)
            });
            let uses_chain = chain
                .is_some_and(|c| matches!(&r.action, Action::Jump(x) | Action::Goto(x) if x == c));
            uses_set || uses_chain
        })
    }

    fn apply_op(state: &mut Ruleset, op: &Op) -> Result<(), ApplyError> {
        match op {
            Op::AddTable(f) => {
                state.tables.entry(*f).or_default();
            }
            Op::DeleteTable(f) => {
                state
                    .tables
                    .remove(f)
                    .ok_or_else(|| ApplyError::NotFound { what: what(op) })?;
            }
            Op::AddChain { family, name, base } => {
                let t = Self::table(state, op, *family)?;
                match t.chains.get(name) {
                    Some(c) if c.base != *base => {
                        return Err(ApplyError::Exists { what: what(op) })
                    }
                    Some(_) => {}
                    None => {
                        t.chains.insert(
                            name.clone(),
                            crate::nft::ir::Chain {
                                base: base.clone(),
                                rules: Vec::new(),
                            },
                        );
                    }
                }
            }
            Op::FlushChain { family, name } => {
                let t = Self::table(state, op, *family)?;
                t.chains
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NotFound { what: what(op) })?
                    .rules
                    .clear();
            }
            Op::DeleteChain { family, name } => {
                let t = Self::table(state, op, *family)?;
                let c = t
                    .chains
                    .get(name)
                    .ok_or_else(|| ApplyError::NotFound { what: what(op) })?;
                if !c.rules.is_empty() || Self::referenced(t, None, Some(name)) {
                    return Err(ApplyError::Busy { what: what(op) });
                }
                t.chains.remove(name);
            }
            Op::AddRule {
                family,
                chain,
                rule,
            } => {
                let t = Self::table(state, op, *family)?;
                Self::check_rule(t, *family, op, rule)?;
                t.chains
                    .get_mut(chain)
                    .ok_or_else(|| ApplyError::NotFound { what: what(op) })?
                    .rules
                    .push(rule.clone());
            }
            Op::AddSet { family, name, def } => {
                let t = Self::table(state, op, *family)?;
                match t.sets.get(name) {
                    Some(d) if d != def => return Err(ApplyError::Exists { what: what(op) }),
                    Some(_) => {}
                    None => {
                        t.sets.insert(name.clone(), def.clone());
                    }
                }
            }
            Op::DeleteSet { family, name } => {
                let t = Self::table(state, op, *family)?;
                if !t.sets.contains_key(name) {
                    return Err(ApplyError::NotFound { what: what(op) });
                }
                if Self::referenced(t, Some(name), None) {
                    return Err(ApplyError::Busy { what: what(op) });
                }
                t.sets.remove(name);
                t.elements.remove(name);
            }
            Op::FlushSet { family, name } => {
                let t = Self::table(state, op, *family)?;
                if !t.sets.contains_key(name) {
                    return Err(ApplyError::NotFound { what: what(op) });
                }
                t.elements.remove(name);
            }
            Op::AddElements {
                family,
                set,
                def: op_def,
                elements,
            } => {
                let t = Self::table(state, op, *family)?;
                let def = t
                    .sets
                    .get(set)
                    .cloned()
                    .ok_or_else(|| ApplyError::NotFound { what: what(op) })?;
                Self::check_def(op, op_def, &def)?;
                let els = t.elements.entry(set.clone()).or_default();
                for e in elements {
                    Self::check_element(*family, op, &def, e)?;
                    let clash = if def.flags.interval {
                        els.iter().any(|x| overlaps(x, e))
                    } else {
                        els.iter().any(|x| x.key() == e.key())
                    };
                    if clash {
                        return Err(ApplyError::Exists {
                            what: format!("{}: {}", what(op), crate::nft::render::element(e)),
                        });
                    }
                    els.insert(e.clone());
                }
            }
            Op::DeleteElements {
                family,
                set,
                def: op_def,
                elements,
            } => {
                let t = Self::table(state, op, *family)?;
                let Some(def) = t.sets.get(set) else {
                    return Err(ApplyError::NotFound { what: what(op) });
                };
                Self::check_def(op, op_def, def)?;
                let els = t.elements.entry(set.clone()).or_default();
                for e in elements {
                    // The kernel deletes by key; the value in the request is ignored.
                    let Some(found) = els.iter().find(|x| x.key() == e.key()).cloned() else {
                        return Err(ApplyError::NotFound {
                            what: format!("{}: {}", what(op), crate::nft::render::element(e)),
                        });
                    };
                    els.remove(&found);
                }
            }
        }
        Ok(())
    }

    fn committed_table(&self, family: Family) -> Result<&Table, ApplyError> {
        self.state
            .tables
            .get(&family)
            .ok_or_else(|| ApplyError::NotFound {
                what: format!("table {}", family.keyword()),
            })
    }

    /// The committed state as nft text.
    pub fn dump(&self) -> String {
        crate::nft::render::ruleset(&self.state)
    }
}

impl Applier for FakeApplier {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        self.calls += 1;
        if let Some(e) = self.fail_call.remove(&self.calls) {
            return Err(e);
        }
        if let Some(e) = self.fail.pop_front() {
            return Err(e);
        }
        let mut next = self.state.clone();
        for op in &tx.ops {
            Self::apply_op(&mut next, op)?;
        }
        self.state = next;
        self.generation += 1;
        self.committed.push(tx.clone());
        Ok(())
    }

    fn generation(&mut self) -> Result<u32, ApplyError> {
        Ok(self.generation)
    }

    fn skeleton(&mut self, family: Family) -> Result<super::Skeleton, ApplyError> {
        let t = self.committed_table(family)?;
        Ok(super::Skeleton::of(t))
    }

    fn table_exists(&mut self, family: Family) -> Result<bool, ApplyError> {
        Ok(self.state.tables.contains_key(&family))
    }

    fn list_elements(
        &mut self,
        family: Family,
        set: &str,
    ) -> Result<Vec<super::Counted>, ApplyError> {
        let t = self.committed_table(family)?;
        let def = t.sets.get(set).ok_or_else(|| ApplyError::NotFound {
            what: format!("set {set}"),
        })?;
        let counter = def.flags.counter;
        Ok(t.elements
            .get(set)
            .map(|e| {
                e.iter()
                    .map(|e| (e.clone(), counter.then_some((0, 0))))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn read_table(
        &mut self,
        family: Family,
        like: &Table,
        sets: Option<&std::collections::BTreeSet<String>>,
    ) -> Result<Option<super::KernelTable>, ApplyError> {
        Ok(self
            .state
            .tables
            .get(&family)
            .map(|have| super::KernelTable::compare(have, like, sets)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{compile, plan};

    /// An element operation built for another definition of the set (here: its interval flag
    /// flipped) is refused, as the kernel would mis-encode it; the same elements with the
    /// table's definition are accepted.
    #[test]
    fn an_element_op_for_another_set_definition_is_refused() {
        let state = crate::testutil::node_a_state(&crate::testutil::cluster_objects());
        let rs = compile::compile(&state, &compile::CompileConfig::default()).expect("compile");
        let mut fake = FakeApplier::new();
        fake.apply(&plan::full(&rs)).expect("full");
        let t = &fake.state.tables[&Family::Ip];
        let (set, def) = t
            .sets
            .iter()
            .find(|(n, _)| t.elements.get(*n).is_some_and(|e| !e.is_empty()))
            .map(|(n, d)| (n.clone(), d.clone()))
            .expect("a set with elements");
        let elements: Vec<Element> = t.elements[&set].iter().take(1).cloned().collect();
        let mut other = def.clone();
        other.flags.interval = !other.flags.interval;
        let del = |def: SetDef| Transaction {
            ops: vec![Op::DeleteElements {
                family: Family::Ip,
                set: set.clone(),
                def,
                elements: elements.clone().into(),
            }],
        };
        assert!(matches!(
            fake.apply(&del(other)),
            Err(ApplyError::Invalid { .. })
        ));
        fake.apply(&del(def)).expect("the table's own definition");
    }
}
