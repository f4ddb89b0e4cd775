//! [`Applier`] over nf_tables netlink: lowers a [`Transaction`] into ONE batch and reads back what
//! the sync loop asks for. All FFI lives in [`super::nl`]; this module is IR knowledge only.
//!
//! The encoding reproduces what nft 1.0.6 sends for the canonical text of the same IR (the text
//! `nft::render` prints), so that `nft list table` shows the same ruleset whichever way it was
//! loaded. The details were taken from `nft --debug=netlink,mnl` and from dumps of nft-created
//! sets, and are pinned by the tests in `tests.rs` (unit tests against captured nft
//! bytes, and privileged tests that load the same ruleset both ways and compare the kernel
//! state):
//! - registers: nft allocates 32-bit register slots from 1, a non-concatenated expression takes
//!   a whole 16-byte register, a concatenation exactly its padded size, and a slot number is sent
//!   as a 128-bit register number when it is 16-byte aligned (`reg 1`, `reg 2`) and as a 32-bit
//!   one otherwise (`reg 9`, `reg 13`);
//! - host-endian key parts (`meta l4proto`, `numgen`) looked up in an interval set get a
//!   `byteorder hton` after their load (for a lone key only when wider than one byte), and their
//!   element values are stored big-endian;
//! - set user data records key/data byte order and, for `typeof` sets, the expressions, so
//!   `nft list` prints `typeof …` again; `type a . b` records an empty concatenation;
//! - plain interval sets (rbtree) hold start elements and `interval end` elements at last+1; a
//!   range that runs to the top of the key space has no end element but an "open" flag in the
//!   element user data; when elements go into an empty set, nft first adds an `interval end`
//!   element at 0 (the "0.0.0.0 quirk"). We do the same when the set is known to be empty, i.e.
//!   created or flushed earlier in the same batch (we never list a set to find out);
//! - concatenated interval sets (pipapo) carry `NFT_SET_CONCAT`, the field lengths in
//!   `NFTA_SET_DESC_CONCAT`, and a key plus `KEY_END` per element.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::time::Instant;

use super::{Applier, ApplyError};
use crate::net::{Family, Proto};
use crate::nft::ir::{
    Action, BaseChain, ChainType, Decl, Element, Field, FieldType, Hook, Match, Rule, SetDef,
    Table, Value,
};
use crate::nft::tx::{Op, Transaction};
use nftproxy_nl::{
    self as nl, consts::*, flags::*, Batch, Cmd, Expr, KernelError, NlError, Payload,
};

/// nft's datatype ids (`enum datatypes`), stored in `NFTA_SET_KEY_TYPE`/`DATA_TYPE`; a
/// concatenation stacks them 6 bits apart, first component highest.
const TYPE_INVALID: u32 = 0;
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// nft's `ifname` datatype (`TYPE_IFNAME` in nft's datatype.h).
const TYPE_IFNAME: u32 = 41;
const TYPE_BITS: u32 = 6;

/// nft's `enum byteorder` as stored in the set user data.
const BYTEORDER_INVALID: u32 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;

/// nft's expression type ids (`enum expr_types`) used in `typeof` user data.
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
const EXPR_CT: u32 = 12;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;
/// nft's protocol description ids and header field ids for payload expressions.
const PROTO_DESC_TH: u32 = 11;
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_IP6: u32 = 13;
const IPHDR_SADDR: u32 = 11;
const IPHDR_DADDR: u32 = 12;
const IP6HDR_SADDR: u32 = 8;
const IP6HDR_DADDR: u32 = 9;
const THDR_DPORT: u32 = 2;
/// `typeof` prints every numgen with this modulus, whatever the rules use.
const TYPEOF_NUMGEN_MOD: u32 = 65536;

/// nft 1.0.6's `NFNL_MSG_BATCH` encoding of a kube-proxy style ruleset over netlink. Owns its
/// socket; call it from a blocking thread (the kernel does the work inside `sendmsg`).
#[derive(Debug)]
pub struct NetlinkApplier {
    sock: nl::Socket,
    table: String,
    /// Whether sets we created or looked up are interval sets: a rule's lookup encoding depends
    /// on it (see the module docs), and the set may come from an earlier transaction.
    interval_sets: HashMap<(Family, String), KnownSet>,
    last_stats: Option<BatchStats>,
}

/// Elements of a set with their counters, as [`Applier::list_elements`] returns them.
type Listed = Vec<(Element, Option<(u64, u64)>)>;

/// Size and timing of the last batch sent (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    pub ops: usize,
    /// Messages between BATCH_BEGIN and BATCH_END.
    pub messages: usize,
    /// Bytes handed to the one `sendmsg`.
    pub bytes: usize,
    /// Time spent lowering the transaction into the buffer.
    pub build: Duration,
    /// Time inside `sendmsg` plus reading the error reports: the kernel's work.
    pub kernel: Duration,
}

/// What the encoding of lookups and flushes needs to know about an existing set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KnownSet {
    interval: bool,
    /// Plain (non-concatenated) interval set.
    rbtree: bool,
}

impl KnownSet {
    fn of_flags(flags: u32) -> KnownSet {
        let interval = flags & NFT_SET_INTERVAL != 0;
        KnownSet {
            interval,
            rbtree: interval && flags & NFT_SET_CONCAT == 0,
        }
    }
}

impl NetlinkApplier {
    /// An applier for the `nftproxy` tables, in the caller's network namespace.
    pub fn new() -> Result<NetlinkApplier, ApplyError> {
        NetlinkApplier::with_table(crate::nft::ir::TABLE_NAME)
    }

    /// An applier for tables named `table` (tests, or a side-by-side install).
    pub fn with_table(table: &str) -> Result<NetlinkApplier, ApplyError> {
        let sock = nl::Socket::open().map_err(|e| io_error("open netlink socket", e))?;
        Ok(NetlinkApplier {
            sock,
            table: table.to_string(),
            interval_sets: HashMap::new(),
            last_stats: None,
        })
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The netlink port id of this applier's socket: the kernel's change notifications carry
    /// it, which tells the echoes of our own commits from other writers' changes.
    pub fn portid(&self) -> u32 {
        self.sock.portid()
    }

    /// Size and timing of the last batch that reached the kernel (successful or not).
    pub fn last_stats(&self) -> Option<BatchStats> {
        self.last_stats
    }

    /// Interval flags of sets referenced by host-endian lookup keys that this transaction does
    /// not declare: asked from the kernel once, then remembered.
    fn resolve_referenced_sets(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        let declared: HashSet<(Family, &str)> = tx
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::AddSet { family, name, .. } => Some((*family, name.as_str())),
                _ => None,
            })
            .collect();
        let mut wanted = Vec::new();
        for op in &tx.ops {
            if let Op::AddRule { family, rule, .. } = op {
                for (set, key) in rule_set_keys(rule) {
                    let known = self.interval_sets.contains_key(&(*family, set.to_string()));
                    if key.iter().any(|f| host_endian(*f))
                        && !declared.contains(&(*family, set))
                        && !known
                    {
                        wanted.push((*family, set.to_string()));
                    }
                }
            }
        }
        for (family, set) in wanted {
            match self.sock.get_set(nfproto(family), &self.table, &set) {
                Ok(info) => {
                    self.interval_sets
                        .insert((family, set), KnownSet::of_flags(info.flags));
                }
                // A missing set makes the rule fail in the kernel, with a better error.
                Err(NlError::Kernel(e)) if e.errno == libc::ENOENT => {}
                Err(e) => return Err(io_error("look up set", e)),
            }
        }
        Ok(())
    }
}

/// The sets a rule refers to, with the key it uses for each.
fn rule_set_keys(rule: &Rule) -> Vec<(&str, &[Field])> {
    let mut out: Vec<(&str, &[Field])> = Vec::new();
    for m in &rule.matches {
        if let Match::Lookup { key, set, .. } = m {
            out.push((set, key));
        }
    }
    match &rule.action {
        Action::DnatMap { key, map } => out.push((map, key)),
        Action::UpdateTimeout { set, key, .. } => out.push((set, key)),
        _ => {}
    }
    out
}

/// A transaction lowered into one netlink batch, not sent yet.
struct Lowered {
    batch: nl::Batch,
    elem_origin: HashMap<u32, Vec<Option<usize>>>,
    build: std::time::Duration,
}

/// Lower `tx` into a batch whose messages are numbered from `first_seq`.
fn lower(
    table: &str,
    first_seq: u32,
    known: &HashMap<(Family, String), KnownSet>,
    tx: &Transaction,
) -> Result<Lowered, ApplyError> {
    let started = Instant::now();
    let mut low = Lowering::new(table, first_seq, known, tx);
    for (i, op) in tx.ops.iter().enumerate() {
        low.op(i, op).map_err(|source| ApplyError::Lower {
            what: describe(op, table),
            source,
        })?;
    }
    let Lowering {
        mut batch,
        elem_origin,
        ..
    } = low;
    batch.end();
    Ok(Lowered {
        batch,
        elem_origin,
        build: started.elapsed(),
    })
}

impl NetlinkApplier {
    /// Send a lowered batch (numbered from the socket's next sequence number) and learn from
    /// what it created.
    fn send(&mut self, tx: &Transaction, low: Lowered) -> Result<(), ApplyError> {
        let Lowered {
            batch,
            elem_origin,
            build,
        } = low;
        let sent = Instant::now();
        self.sock.reserve_seqs(batch.seq_span());
        let errors = self
            .sock
            .send_batch(&batch)
            .map_err(|e| io_error("send batch", e))?;
        self.last_stats = Some(BatchStats {
            ops: tx.ops.len(),
            messages: batch.message_count(),
            bytes: batch.len(),
            build,
            kernel: sent.elapsed(),
        });
        tracing::debug!(stats = ?self.last_stats, errors = errors.len(), "netlink batch sent");
        if let Some(first) = errors.first() {
            return Err(classify(first, &batch, tx, &self.table, &elem_origin));
        }
        for op in &tx.ops {
            match op {
                Op::AddSet { family, name, def } => {
                    let concat = match &def.key {
                        Decl::Type(t) => t.len() > 1,
                        Decl::Typeof(f) => f.len() > 1,
                    };
                    let interval = def.flags.interval;
                    self.interval_sets.insert(
                        (*family, name.clone()),
                        KnownSet {
                            interval,
                            rbtree: interval && !concat,
                        },
                    );
                }
                Op::DeleteSet { family, name } => {
                    self.interval_sets.remove(&(*family, name.clone()));
                }
                Op::DeleteTable(family) => self.interval_sets.retain(|(f, _), _| f != family),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Applier for NetlinkApplier {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        self.resolve_referenced_sets(tx)?;
        let low = lower(&self.table, self.sock.peek_seq(), &self.interval_sets, tx)?;
        self.send(tx, low)
    }

    fn generation(&mut self) -> Result<u32, ApplyError> {
        self.sock
            .generation()
            .map_err(|e| nl_error("get generation", e))
    }

    fn skeleton(&mut self, family: Family) -> Result<super::Skeleton, ApplyError> {
        let what = format!("list rules and sets {} {}", family.keyword(), self.table);
        let rules = self
            .sock
            .dump_rules(nfproto(family), &self.table)
            .map_err(|e| nl_error(&what, e))?;
        let sets = self
            .sock
            .dump_sets(nfproto(family), &self.table)
            .map_err(|e| nl_error(&what, e))?;
        let mut sk = super::Skeleton::default();
        for (chain, _) in rules {
            *sk.rules.entry(chain).or_default() += 1;
        }
        // Anonymous sets belong to rules, not to the skeleton.
        sk.sets = sets
            .into_iter()
            .map(|s| s.name)
            .filter(|n| !n.starts_with("__"))
            .collect();
        Ok(sk)
    }

    fn table_exists(&mut self, family: Family) -> Result<bool, ApplyError> {
        let what = format!("get table {} {}", family.keyword(), self.table);
        self.sock
            .table_exists(nfproto(family), &self.table)
            .map_err(|e| nl_error(&what, e))
    }

    fn list_elements(
        &mut self,
        family: Family,
        set: &str,
    ) -> Result<Vec<(Element, Option<(u64, u64)>)>, ApplyError> {
        let what = format!("list set {} {} {}", family.keyword(), self.table, set);
        let info = self
            .sock
            .get_set(nfproto(family), &self.table, set)
            .map_err(|e| nl_error(&what, e))?;
        let layout = SetLayout::from_kernel(family, &info).map_err(|source| ApplyError::Lower {
            what: what.clone(),
            source,
        })?;
        let elems = self
            .sock
            .dump_elems(nfproto(family), &self.table, set)
            .map_err(|e| nl_error(&what, e))?;
        let counters = info.expr_names.iter().any(|n| n == "counter");
        layout
            .decode(&elems, counters)
            .map_err(|source| ApplyError::Lower { what, source })
    }
    fn read_table(
        &mut self,
        family: Family,
        like: &Table,
        sets: Option<&std::collections::BTreeSet<String>>,
    ) -> Result<Option<super::KernelTable>, ApplyError> {
        let what = format!("read back table {} {}", family.keyword(), self.table);
        if !self.table_exists(family)? {
            return Ok(None);
        }
        let fam = nfproto(family);
        let infos = self
            .sock
            .dump_sets(fam, &self.table)
            .map_err(|e| nl_error(&what, e))?;
        let mut out = super::KernelTable::default();
        let by_name: HashMap<&str, &nl::SetInfo> = infos
            .iter()
            .filter(|i| !i.name.starts_with("__"))
            .map(|i| (i.name.as_str(), i))
            .collect();
        for (name, def) in &like.sets {
            let Some(info) = by_name.get(name.as_str()) else {
                out.missing_sets.insert(name.clone());
                continue;
            };
            let layout =
                SetLayout::from_kernel(family, info).map_err(|source| ApplyError::Lower {
                    what: format!("{what}: set {name}"),
                    source,
                })?;
            let counters = info.expr_names.iter().any(|n| n == "counter");
            let same = SetLayout::from_def(family, def).is_ok_and(|l| l == layout)
                && (info.flags & NFT_SET_TIMEOUT != 0) == def.flags.timeout
                && counters == def.flags.counter;
            if !same {
                out.changed_sets.insert(name.clone());
                continue;
            }
            if def.runtime_owned() || sets.is_some_and(|s| !s.contains(name)) {
                continue;
            }
            let elems = self
                .sock
                .dump_elems(fam, &self.table, name)
                .map_err(|e| nl_error(&what, e))?;
            let listed = layout
                .decode(&elems, counters)
                .map_err(|source| ApplyError::Lower {
                    what: format!("{what}: set {name}"),
                    source,
                })?;
            out.elements
                .insert(name.clone(), listed.into_iter().map(|(e, _)| e).collect());
        }
        out.extra_sets = by_name
            .keys()
            .filter(|n| !like.sets.contains_key(**n))
            .map(|n| n.to_string())
            .collect();
        // Rules are compared in the kernel's encoding: ours are lowered exactly as a commit would
        // lower them, then printed by libnftnl like the dumped ones.
        let mut kernel_rules: std::collections::BTreeMap<String, Vec<Vec<String>>> =
            std::collections::BTreeMap::new();
        for (chain, exprs) in self
            .sock
            .dump_rules(fam, &self.table)
            .map_err(|e| nl_error(&what, e))?
        {
            kernel_rules
                .entry(chain)
                .or_default()
                .push(exprs.iter().map(|e| canonical_expr(e)).collect());
        }
        // Chains, empty ones included: a dump of rules shows only chains that hold some.
        let mut kernel_chains: std::collections::BTreeSet<String> = self
            .sock
            .dump_chains(fam, &self.table)
            .map_err(|e| nl_error(&what, e))?
            .into_iter()
            .collect();
        let lookup = |set: &str| SetRef {
            id: None,
            interval: like.sets.get(set).is_some_and(|d| d.flags.interval),
        };
        for (name, chain) in &like.chains {
            let held = kernel_chains.remove(name);
            let have = kernel_rules.remove(name).unwrap_or_default();
            let mut want: Vec<Vec<String>> = Vec::with_capacity(chain.rules.len());
            for r in &chain.rules {
                let lowered =
                    lower_rule(family, &self.table, name, r, &lookup).map_err(|source| {
                        ApplyError::Lower {
                            what: format!("{what}: chain {name}"),
                            source,
                        }
                    })?;
                want.push(
                    lowered
                        .expr_texts()
                        .iter()
                        .map(|e| canonical_expr(e))
                        .collect(),
                );
            }
            if have != want || !held {
                out.changed_chains.insert(name.clone(), have.len());
            }
        }
        for (name, rules) in kernel_rules {
            kernel_chains.remove(&name);
            out.changed_chains.insert(name, rules.len());
        }
        out.extra_empty_chains = kernel_chains;
        Ok(Some(out))
    }
}

/// An expression's text with what the kernel adds on a dump removed: a lookup dumps its
/// (zero) flags attribute, which a rule being built does not carry yet (kernel 6.x).
/// The same for nat: the kernel fills in a range's upper ends (equal to the lower ones) and the
/// range flags those ends imply (`NF_NAT_RANGE_MAP_IPS` | `NF_NAT_RANGE_PROTO_SPECIFIED`) when
/// it stores the rule (nft_nat_init, kernel 5.x/6.x).
fn canonical_expr(text: &str) -> String {
    if text.starts_with("[ lookup ") {
        if let Some(head) = text.strip_suffix(" 0x0 ]") {
            return format!("{head} ]");
        }
    }
    if !text.starts_with("[ nat ") {
        return text.to_string();
    }
    let toks: Vec<&str> = text.split(' ').collect();
    let reg_after = |key: &str| {
        toks.windows(3)
            .find(|w| w[0] == key && w[1] == "reg")
            .map(|w| w[2])
    };
    let (addr, proto) = (reg_after("addr_min"), reg_after("proto_min"));
    let implied = u32::from(addr.is_some()) | (u32::from(proto.is_some()) << 1);
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let same_as = match t {
            "addr_max" => Some(addr),
            "proto_max" => Some(proto),
            _ => None,
        };
        if let Some(min) = same_as {
            if toks.get(i + 1) == Some(&"reg") && toks.get(i + 2).copied() == min {
                i += 3;
                continue;
            }
        }
        if t == "flags" && toks.get(i + 1) == Some(&format!("0x{implied:x}").as_str()) {
            i += 2;
            continue;
        }
        out.push(t);
        i += 1;
    }
    out.join(" ")
}

/// Delete whole tables (what `nftproxy cleanup` does), each in its own batch so that a missing
/// one (ENOENT, ignored) does not abort the others. Returns how many existed and were deleted.
pub fn delete_tables(tables: &[(Family, &str)]) -> Result<usize, ApplyError> {
    let mut sock = nl::Socket::open().map_err(|e| io_error("open netlink socket", e))?;
    let mut deleted = 0;
    for (family, name) in tables {
        let what = format!("delete table {} {}", family.keyword(), name);
        let mut batch = Batch::new(sock.peek_seq());
        let t = nl::Table::new(nfproto(*family), name).map_err(|e| nl_error(&what, e))?;
        batch
            .push(Cmd::DelTable, nfproto(*family), 0, Payload::Table(&t), 0)
            .map_err(|e| nl_error(&what, e))?;
        batch.end();
        sock.reserve_seqs(batch.seq_span());
        let errors = sock.send_batch(&batch).map_err(|e| io_error(&what, e))?;
        match errors.first() {
            None => deleted += 1,
            Some(e) if e.errno == libc::ENOENT => {}
            Some(e) => return Err(errno_error(what, e)),
        }
    }
    Ok(deleted)
}

/// The usual cleanup: the `nftproxy` table of both families.
pub fn delete_nftproxy_tables() -> Result<usize, ApplyError> {
    delete_tables(&[
        (Family::Ip, crate::nft::ir::TABLE_NAME),
        (Family::Ip6, crate::nft::ir::TABLE_NAME),
    ])
}

mod elements;
mod errors;
mod layout;
mod lower;
mod rules;

use elements::*;
pub use errors::LowerError;
use errors::*;
use layout::*;
use lower::*;
use rules::*;

#[cfg(test)]
mod tests;
