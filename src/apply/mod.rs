//! The edge where transactions meet the kernel. `Applier` is the seam: `netlink` talks to the
//! kernel, `fake` is an in-memory stand-in at least as strict as the kernel.

pub mod fake;
pub mod monitor;
pub mod netlink;
pub mod preflight;

use std::collections::{BTreeMap, BTreeSet};

use crate::net::Family;
use crate::nft::ir::{Element, Table};
use crate::nft::tx::Transaction;

/// Kernel errno classes that decide what the sync loop does next.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An object the transaction expected is missing (ENOENT): the table was changed from outside.
    #[error("{what}: not found (changed from outside?)")]
    NotFound { what: String },
    /// An object the transaction creates already exists (EEXIST).
    #[error("{what}: already exists")]
    Exists { what: String },
    /// Something still refers to the object (EBUSY), e.g. deleting a chain that is jumped to.
    #[error("{what}: still in use")]
    Busy { what: String },
    /// The kernel rejected the content (EINVAL, EOPNOTSUPP, ...): a bug in nftproxy.
    #[error("{what}: rejected by the kernel: {detail}")]
    Invalid { what: String, detail: String },
    /// Missing privileges or kernel support.
    #[error("{what}: permission denied or unsupported: {detail}")]
    Unsupported { what: String, detail: String },
    /// nftproxy could not encode an operation or decode what the kernel holds: a bug, or a
    /// kernel form this version does not know.
    #[error("{what}: {source}")]
    Lower {
        what: String,
        #[source]
        source: netlink::LowerError,
    },
    /// Socket-level trouble (ENOBUFS, EINTR, ...); retrying may help.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: nftproxy_nl::NlError,
    },
    /// A failure injected on purpose (tests, `--fault-inject-file`).
    #[error("fault injected: {0}")]
    Injected(String),
    /// The thread that runs the blocking netlink calls failed.
    #[error("apply thread: {0}")]
    Thread(String),
}

impl ApplyError {
    /// An object the operation needs is missing (changed from outside, or an entry that
    /// expired between a dump and a delete).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApplyError::NotFound { .. })
    }

    /// Whether the same operation may succeed when tried again unchanged (transient kernel or
    /// socket trouble); the others need a new plan or a fix.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApplyError::Io { .. } | ApplyError::Busy { .. } | ApplyError::Injected(_)
        )
    }
}

/// A cheap fingerprint of a table's skeleton: rules per chain (chains that have rules) and set
/// names. Reading it lists no elements; comparing it with what was applied notices flushed or
/// deleted chains, rules and sets changed from outside.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Skeleton {
    pub rules: std::collections::BTreeMap<String, usize>,
    pub sets: std::collections::BTreeSet<String>,
}

impl Skeleton {
    pub fn of(t: &crate::nft::ir::Table) -> Skeleton {
        Skeleton {
            rules: t
                .chains
                .iter()
                .filter(|(_, c)| !c.rules.is_empty())
                .map(|(n, c)| (n.clone(), c.rules.len()))
                .collect(),
            sets: t.sets.keys().cloned().collect(),
        }
    }
}

/// What the kernel holds of one of our tables, read back against the table nftproxy means to
/// have there (`like`). Set definitions and rules are compared where they are read (a rule by
/// its kernel encoding, so two spellings of one rule are equal); elements are returned for the
/// caller to diff, because only the caller knows what it believes it applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelTable {
    /// Elements of the sets read (those of `like` present with `like`'s definition, not runtime
    /// owned, and asked for). Counters are dropped.
    pub elements: BTreeMap<String, Vec<Element>>,
    /// Sets of `like` present in the kernel with another definition.
    pub changed_sets: BTreeSet<String>,
    /// Sets of `like` missing from the kernel.
    pub missing_sets: BTreeSet<String>,
    /// Sets in the kernel that `like` does not have.
    pub extra_sets: BTreeSet<String>,
    /// Chains whose rules differ from `like`'s, with the number of rules the kernel holds
    /// (0: flushed or deleted). Includes chains with rules that `like` does not have.
    pub changed_chains: BTreeMap<String, usize>,
    /// Chains in the kernel that `like` does not have and that hold no rules: a chain flushed
    /// as stale whose deletion (after its grace period) never came, because the agent stopped
    /// in between, or one added from outside. A dump of rules cannot show them.
    pub extra_empty_chains: BTreeSet<String>,
}

impl KernelTable {
    /// Compare a table held as IR (the fake's committed state) with `like`.
    pub fn compare(have: &Table, like: &Table, sets: Option<&BTreeSet<String>>) -> KernelTable {
        let mut out = KernelTable::default();
        for (name, def) in &like.sets {
            match have.sets.get(name) {
                None => {
                    out.missing_sets.insert(name.clone());
                }
                Some(d) if d != def => {
                    out.changed_sets.insert(name.clone());
                }
                Some(_) => {
                    if def.runtime_owned() || sets.is_some_and(|s| !s.contains(name)) {
                        continue;
                    }
                    let els = have
                        .elements
                        .get(name)
                        .map(|e| e.iter().cloned().collect())
                        .unwrap_or_default();
                    out.elements.insert(name.clone(), els);
                }
            }
        }
        out.extra_sets = have
            .sets
            .keys()
            .filter(|n| !like.sets.contains_key(*n))
            .cloned()
            .collect();
        for (name, chain) in &have.chains {
            let same = like
                .chains
                .get(name)
                .is_some_and(|c| c.rules == chain.rules);
            if !same && !chain.rules.is_empty() {
                out.changed_chains.insert(name.clone(), chain.rules.len());
            } else if chain.rules.is_empty() && !like.chains.contains_key(name) {
                out.extra_empty_chains.insert(name.clone());
            }
        }
        for (name, chain) in &like.chains {
            let held = have.chains.get(name);
            if held.is_none()
                || (!chain.rules.is_empty() && held.is_some_and(|c| c.rules.is_empty()))
            {
                out.changed_chains.insert(name.clone(), 0);
            }
        }
        out
    }
}

/// A set element with its counter (packets, bytes) when the set counts.
pub type Counted = (Element, Option<(u64, u64)>);

/// Applies transactions atomically and answers the few questions the sync loop asks of the
/// kernel. Implementations are called from a blocking thread.
pub trait Applier: Send {
    /// Commit every op of `tx` in one atomic batch, or none of them.
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError>;
    /// The ruleset generation id (changes with every commit by anyone in this network namespace).
    fn generation(&mut self) -> Result<u32, ApplyError>;
    /// Whether our table of `family` exists.
    fn table_exists(&mut self, family: Family) -> Result<bool, ApplyError>;
    /// The skeleton fingerprint of our table of `family`.
    fn skeleton(&mut self, family: Family) -> Result<Skeleton, ApplyError>;
    /// Dump the elements of one set (targeted; never the whole table). Counters, if any, are
    /// returned as (packets, bytes).
    fn list_elements(&mut self, family: Family, set: &str) -> Result<Vec<Counted>, ApplyError>;
    /// Read our table of `family` back against `like` (None: the table does not exist).
    /// `sets` limits which sets' elements are read (None: all of `like`'s); rules and set
    /// definitions are always compared.
    fn read_table(
        &mut self,
        family: Family,
        like: &Table,
        sets: Option<&BTreeSet<String>>,
    ) -> Result<Option<KernelTable>, ApplyError>;
}

/// A test seam on the real applier: while the file at `path` exists, every `apply` fails (and
/// nothing is sent), so end-to-end tests can make commits fail on purpose (`--fault-inject-file`).
pub struct FaultInjecting<A> {
    pub inner: A,
    pub path: Option<std::path::PathBuf>,
}

impl<A: Applier> Applier for FaultInjecting<A> {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if let Some(p) = self.path.as_ref().filter(|p| p.exists()) {
            return Err(ApplyError::Injected(format!("{} exists", p.display())));
        }
        self.inner.apply(tx)
    }
    fn generation(&mut self) -> Result<u32, ApplyError> {
        self.inner.generation()
    }
    fn table_exists(&mut self, family: Family) -> Result<bool, ApplyError> {
        self.inner.table_exists(family)
    }
    fn skeleton(&mut self, family: Family) -> Result<Skeleton, ApplyError> {
        self.inner.skeleton(family)
    }
    fn list_elements(&mut self, family: Family, set: &str) -> Result<Vec<Counted>, ApplyError> {
        self.inner.list_elements(family, set)
    }
    fn read_table(
        &mut self,
        family: Family,
        like: &Table,
        sets: Option<&BTreeSet<String>>,
    ) -> Result<Option<KernelTable>, ApplyError> {
        self.inner.read_table(family, like, sets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_file_fails_applies_while_it_exists() {
        let path = std::env::temp_dir().join(format!("nftproxy-fault-{}", std::process::id()));
        let mut a = FaultInjecting {
            inner: fake::FakeApplier::new(),
            path: Some(path.clone()),
        };
        let tx = Transaction {
            ops: vec![crate::nft::tx::Op::AddTable(Family::Ip)],
        };
        a.apply(&tx).expect("no file: applies");
        std::fs::write(&path, b"").expect("create");
        assert!(matches!(a.apply(&tx), Err(ApplyError::Injected(_))));
        assert_eq!(a.inner.calls, 1, "nothing reached the applier");
        std::fs::remove_file(&path).expect("remove");
        a.apply(&tx).expect("applies again");
    }
}
