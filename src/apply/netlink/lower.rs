//! Transaction lowering: one IR transaction to one netlink batch.

use super::*;

// ---------------------------------------------------------------------------------------------
// Transaction lowering
// ---------------------------------------------------------------------------------------------

pub(super) struct Lowering<'a> {
    pub(super) table: &'a str,
    pub(super) batch: Batch,
    /// Batch-local ids of sets created in this batch (never reused within a batch: the kernel
    /// resolves an id by searching the batch's pending set creations).
    pub(super) set_ids: HashMap<(Family, String), u32>,
    pub(super) next_set_id: u32,
    /// Layouts of sets declared so far in this transaction.
    pub(super) declared: HashMap<(Family, String), SetLayout>,
    /// Interval flag of every set the transaction declares, wherever it does.
    pub(super) tx_interval: HashMap<(Family, String), bool>,
    /// rbtree sets known to be empty at this point of the batch (created or flushed, nothing
    /// added since): nft puts its leading "interval end at 0" element into those.
    pub(super) empty: HashSet<(Family, String)>,
    pub(super) known: &'a HashMap<(Family, String), KnownSet>,
    /// For each element message: which op element each kernel element came from.
    pub(super) elem_origin: HashMap<u32, Vec<Option<usize>>>,
}

impl<'a> Lowering<'a> {
    pub(super) fn new(
        table: &'a str,
        first_seq: u32,
        known: &'a HashMap<(Family, String), KnownSet>,
        tx: &Transaction,
    ) -> Lowering<'a> {
        let tx_interval = tx
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::AddSet { family, name, def } => {
                    Some(((*family, name.clone()), def.flags.interval))
                }
                _ => None,
            })
            .collect();
        Lowering {
            table,
            batch: Batch::new(first_seq),
            set_ids: HashMap::new(),
            next_set_id: 1,
            declared: HashMap::new(),
            tx_interval,
            empty: HashSet::new(),
            known,
            elem_origin: HashMap::new(),
        }
    }

    pub(super) fn push(
        &mut self,
        cmd: Cmd,
        family: Family,
        flags: u16,
        p: Payload<'_>,
        tag: usize,
    ) -> Result<u32, LowerError> {
        self.batch
            .push(cmd, nfproto(family), flags, p, tag)
            .map_err(nlerr)
    }

    pub(super) fn set_id(&self, family: Family, name: &str) -> Option<u32> {
        self.set_ids.get(&(family, name.to_string())).copied()
    }

    /// The element-list carrier for `set`.
    pub(super) fn elems_carrier(&self, family: Family, set: &str) -> Result<nl::Set, LowerError> {
        let mut s = nl::Set::new(nfproto(family), self.table, set).map_err(nlerr)?;
        if let Some(id) = self.set_id(family, set) {
            s.set_id(id);
        }
        Ok(s)
    }

    /// Send `elems` in as many messages as the per-message budget requires.
    pub(super) fn push_elems(
        &mut self,
        cmd: Cmd,
        flags: u16,
        family: Family,
        set: &str,
        elems: Vec<KElem>,
        tag: usize,
    ) -> Result<(), LowerError> {
        self.stream_elems(cmd, flags, family, set, tag, |out| {
            elems.into_iter().try_for_each(out)
        })
    }

    /// Send the elements `make` produces, each packed as soon as it is made and every full
    /// message's libnftnl objects freed once written into the batch: the batch holds only the
    /// wire bytes, never a second copy of a big set as objects.
    pub(super) fn stream_elems(
        &mut self,
        cmd: Cmd,
        flags: u16,
        family: Family,
        set: &str,
        tag: usize,
        make: impl FnOnce(&mut dyn FnMut(KElem) -> Result<(), LowerError>) -> Result<(), LowerError>,
    ) -> Result<(), LowerError> {
        let mut carrier = self.elems_carrier(family, set)?;
        let mut origins = Vec::new();
        make(&mut |k: KElem| {
            if carrier.elem_count() > 0
                && carrier.elems_bound() + k.elem.bound() > nl::ELEMS_PER_MSG_BUDGET
            {
                let seq = self.push(cmd, family, flags, Payload::SetElems(&carrier), tag)?;
                self.elem_origin.insert(seq, std::mem::take(&mut origins));
                carrier = self.elems_carrier(family, set)?;
            }
            origins.push(k.origin);
            carrier.push_elem(k.elem);
            Ok(())
        })?;
        if carrier.elem_count() > 0 {
            let seq = self.push(cmd, family, flags, Payload::SetElems(&carrier), tag)?;
            self.elem_origin.insert(seq, origins);
        }
        Ok(())
    }

    pub(super) fn op(&mut self, tag: usize, op: &Op) -> Result<(), LowerError> {
        let table = self.table;
        match op {
            Op::AddTable(f) => {
                let mut t = nl::Table::new(nfproto(*f), table).map_err(nlerr)?;
                t.set_flags(0);
                self.push(Cmd::NewTable, *f, NLM_F_CREATE, Payload::Table(&t), tag)?;
            }
            Op::DeleteTable(f) => {
                let t = nl::Table::new(nfproto(*f), table).map_err(nlerr)?;
                self.push(Cmd::DelTable, *f, 0, Payload::Table(&t), tag)?;
                self.set_ids.retain(|(fam, _), _| fam != f);
                self.declared.retain(|(fam, _), _| fam != f);
                self.empty.retain(|(fam, _)| fam != f);
            }
            Op::AddChain { family, name, base } => {
                let c = chain_object(*family, table, name, base.as_ref()).map_err(nlerr)?;
                self.push(
                    Cmd::NewChain,
                    *family,
                    NLM_F_CREATE,
                    Payload::Chain(&c),
                    tag,
                )?;
            }
            Op::FlushChain { family, name } => {
                // DELRULE naming only the chain deletes all of its rules.
                let r = nl::Rule::new(nfproto(*family), table, name).map_err(nlerr)?;
                self.push(Cmd::DelRule, *family, 0, Payload::Rule(&r), tag)?;
            }
            Op::DeleteChain { family, name } => {
                let c = nl::Chain::new(nfproto(*family), table, name).map_err(nlerr)?;
                self.push(Cmd::DelChain, *family, 0, Payload::Chain(&c), tag)?;
            }
            Op::AddRule {
                family,
                chain,
                rule,
            } => {
                let fam = *family;
                let lookup = |set: &str| SetRef {
                    id: self.set_id(fam, set),
                    interval: match self.declared.get(&(fam, set.to_string())) {
                        Some(l) => l.interval,
                        // A set declared later in this transaction still decides the encoding.
                        None => match self.tx_interval.get(&(fam, set.to_string())) {
                            Some(i) => *i,
                            None => self
                                .known
                                .get(&(fam, set.to_string()))
                                .is_some_and(|k| k.interval),
                        },
                    },
                };
                let r = lower_rule(fam, table, chain, rule, &lookup)?;
                self.push(
                    Cmd::NewRule,
                    fam,
                    NLM_F_CREATE | NLM_F_APPEND,
                    Payload::Rule(&r),
                    tag,
                )?;
            }
            Op::AddSet { family, name, def } => {
                let layout = SetLayout::from_def(*family, def)?;
                let id = self.next_set_id;
                self.next_set_id += 1;
                let s = layout.declaration(def, table, name, id).map_err(nlerr)?;
                self.push(Cmd::NewSet, *family, NLM_F_CREATE, Payload::Set(&s), tag)?;
                self.set_ids.insert((*family, name.clone()), id);
                if layout.rbtree() {
                    self.empty.insert((*family, name.clone()));
                }
                self.declared.insert((*family, name.clone()), layout);
            }
            Op::DeleteSet { family, name } => {
                let s = nl::Set::new(nfproto(*family), table, name).map_err(nlerr)?;
                self.push(Cmd::DelSet, *family, 0, Payload::Set(&s), tag)?;
                let key = (*family, name.clone());
                self.set_ids.remove(&key);
                self.declared.remove(&key);
                self.empty.remove(&key);
            }
            Op::FlushSet { family, name } => {
                // DELSETELEM without an element list deletes every element.
                let s = self.elems_carrier(*family, name)?;
                self.push(Cmd::DelSetElem, *family, 0, Payload::SetElems(&s), tag)?;
                let is_rbtree = match self.declared.get(&(*family, name.clone())) {
                    Some(l) => l.rbtree(),
                    None => self
                        .known
                        .get(&(*family, name.clone()))
                        .is_some_and(|k| k.rbtree),
                };
                if is_rbtree {
                    self.empty.insert((*family, name.clone()));
                }
            }
            Op::AddElements {
                family,
                set,
                def,
                elements,
            } => {
                if elements.is_empty() {
                    return Ok(());
                }
                let layout = SetLayout::from_def(*family, def)?;
                if layout.rbtree() && self.empty.remove(&(*family, set.clone())) {
                    self.leading_interval_end(&layout, *family, set, elements, tag)?;
                }
                self.stream_elems(
                    Cmd::NewSetElem,
                    NLM_F_CREATE | NLM_F_EXCL,
                    *family,
                    set,
                    tag,
                    |out| kernel_elements(&layout, elements, true, out),
                )?;
            }
            Op::DeleteElements {
                family,
                set,
                def,
                elements,
            } => {
                if elements.is_empty() {
                    return Ok(());
                }
                let layout = SetLayout::from_def(*family, def)?;
                self.stream_elems(Cmd::DelSetElem, 0, *family, set, tag, |out| {
                    kernel_elements(&layout, elements, false, out)
                })?;
            }
        }
        Ok(())
    }

    /// nft's first-segment quirk: elements added to an empty rbtree set are preceded by an
    /// `interval end` element at 0 unless the lowest interval starts at 0. It goes in its own
    /// message without NLM_F_EXCL, so that a set which already holds one (an "added" set may
    /// have existed before) does not turn this into EEXIST.
    pub(super) fn leading_interval_end(
        &mut self,
        layout: &SetLayout,
        family: Family,
        set: &str,
        elements: &crate::nft::ir::Elements,
        tag: usize,
    ) -> Result<(), LowerError> {
        let comp = &layout.key.comps[0];
        let mut lowest: Option<Vec<u8>> = None;
        for e in elements {
            if let Some(v) = e.key().first() {
                let (lo, _) = value_range(v, comp)?;
                if lowest.as_ref().is_none_or(|l| lo < *l) {
                    lowest = Some(lo);
                }
            }
        }
        let zero = vec![0u8; layout.key.len()];
        if lowest.is_none_or(|l| l == zero) {
            return Ok(());
        }
        let mut e = nl::SetElem::new().map_err(nlerr)?;
        e.set_key(&zero).map_err(nlerr)?;
        e.set_flags(NFT_SET_ELEM_INTERVAL_END);
        self.push_elems(
            Cmd::NewSetElem,
            NLM_F_CREATE,
            family,
            set,
            vec![KElem {
                elem: e,
                origin: None,
            }],
            tag,
        )
    }
}
