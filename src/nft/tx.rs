//! A transaction: the ordered operations of one atomic commit. `plan` produces it, the appliers
//! (netlink, fake) execute it all-or-nothing.

use super::ir::{BaseChain, Elements, Rule, SetDef};
use crate::net::Family;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the table if missing (like `nft add table`; no error when it exists).
    AddTable(Family),
    /// Delete the table and everything in it (error when missing).
    DeleteTable(Family),
    /// Create a chain if missing (like `nft add chain`).
    AddChain {
        family: Family,
        name: String,
        base: Option<BaseChain>,
    },
    /// Remove every rule of a chain.
    FlushChain { family: Family, name: String },
    /// Delete an empty, unreferenced chain.
    DeleteChain { family: Family, name: String },
    /// Append a rule at the end of a chain.
    AddRule {
        family: Family,
        chain: String,
        rule: Rule,
    },
    /// Create a set or map if missing.
    AddSet {
        family: Family,
        name: String,
        def: SetDef,
    },
    /// Delete an unreferenced set.
    DeleteSet { family: Family, name: String },
    /// Remove every element of a set.
    FlushSet { family: Family, name: String },
    /// Add elements; an element that already exists is an error (EEXIST), like the kernel's
    /// `NLM_F_EXCL` create.
    AddElements {
        family: Family,
        set: String,
        def: SetDef,
        elements: Elements,
    },
    /// Delete elements; a missing element is an error (ENOENT).
    DeleteElements {
        family: Family,
        set: String,
        def: SetDef,
        elements: Elements,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transaction {
    pub ops: Vec<Op>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of element additions and deletions (what a routine partial sync is made of).
    pub fn element_count(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::AddElements { elements, .. } | Op::DeleteElements { elements, .. } => {
                    elements.len()
                }
                _ => 0,
            })
            .sum()
    }

    /// Number of operations that change chains or rules (each costs a table validation in the
    /// kernel; routine syncs should have none).
    pub fn skeleton_ops(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| {
                !matches!(
                    op,
                    Op::AddElements { .. } | Op::DeleteElements { .. } | Op::FlushSet { .. }
                )
            })
            .count()
    }
}

/// Where an element goes when a big transaction is committed as several smaller ones
/// (`plan::split`): everything of one group lands in the same transaction, so every
/// intermediate ruleset shows each group whole, as it was or as it will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// Node-level state that Services rely on (Service CIDRs, NodePort addresses, ...): with the
    /// chains and rules, before any Service.
    Skeleton,
    /// Reached only through some entry point, and harmless before it: any transaction.
    Any,
    /// One Service (or Services that share an entry point), by an opaque id.
    Of(u64),
}
