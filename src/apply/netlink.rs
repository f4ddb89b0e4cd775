//! [`Applier`] over nf_tables netlink: lowers a [`Transaction`] into ONE batch and reads back what
//! the sync loop asks for. All FFI lives in [`super::nl`]; this module is IR knowledge only.
//!
//! The encoding reproduces what nft 1.0.6 sends for the canonical text of the same IR (the text
//! `nft::render` prints), so that `nft list table` shows the same ruleset whichever way it was
//! loaded. The details were taken from `nft --debug=netlink,mnl` and from dumps of nft-created
//! sets, and are pinned by the tests in `netlink_tests.rs` (unit tests against captured nft
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

impl Applier for NetlinkApplier {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        self.resolve_referenced_sets(tx)?;
        let started = Instant::now();
        let mut low = Lowering::new(&self.table, self.sock.peek_seq(), &self.interval_sets, tx);
        for (i, op) in tx.ops.iter().enumerate() {
            low.op(i, op).map_err(|source| ApplyError::Lower {
                what: describe(op, &self.table),
                source,
            })?;
        }
        let Lowering {
            mut batch,
            elem_origin,
            ..
        } = low;
        batch.end();
        let built = Instant::now();
        self.sock.reserve_seqs(batch.seq_span());
        let errors = self
            .sock
            .send_batch(&batch)
            .map_err(|e| io_error("send batch", e))?;
        self.last_stats = Some(BatchStats {
            ops: tx.ops.len(),
            messages: batch.message_count(),
            bytes: batch.len(),
            build: built - started,
            kernel: built.elapsed(),
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
        let lookup = |set: &str| SetRef {
            id: None,
            interval: like.sets.get(set).is_some_and(|d| d.flags.interval),
        };
        for (name, chain) in &like.chains {
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
            if have != want {
                out.changed_chains.insert(name.clone(), have.len());
            }
        }
        for (name, rules) in kernel_rules {
            out.changed_chains.insert(name, rules.len());
        }
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

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn io_error(what: &str, e: NlError) -> ApplyError {
    ApplyError::Io {
        what: what.to_string(),
        source: e,
    }
}

/// Why an IR object could not be put into netlink form, or a kernel object read back into IR.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    /// The wrapper refused a value (a name too long, a message over its bound).
    #[error(transparent)]
    Nl(#[from] NlError),
    /// The IR holds something the lowering cannot express (a value that does not fit its
    /// field, an unsupported construct).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The kernel holds something this version cannot read back into the IR.
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// Wrapper errors of a request: kernel errnos are classified, everything else is socket trouble.
fn nl_error(what: &str, e: NlError) -> ApplyError {
    match e {
        NlError::Kernel(k) => errno_error(what.to_string(), &k),
        NlError::BadName(_) | NlError::TooLong { .. } => ApplyError::Invalid {
            what: what.to_string(),
            detail: e.to_string(),
        },
        other => io_error(what, other),
    }
}

fn errno_error(what: String, e: &KernelError) -> ApplyError {
    let detail = e.to_string();
    match e.errno {
        libc::ENOENT => ApplyError::NotFound { what },
        libc::EEXIST => ApplyError::Exists { what },
        libc::EBUSY => ApplyError::Busy { what },
        libc::EPERM | libc::EOPNOTSUPP | libc::EAFNOSUPPORT => {
            ApplyError::Unsupported { what, detail }
        }
        libc::ENOBUFS | libc::EINTR | libc::EAGAIN | libc::ENOMEM => ApplyError::Io {
            what,
            source: NlError::Kernel(e.clone()),
        },
        _ => ApplyError::Invalid { what, detail },
    }
}

/// Map the first kernel error of a batch to the op that caused it.
fn classify(
    e: &KernelError,
    batch: &Batch,
    tx: &Transaction,
    table: &str,
    elem_origin: &HashMap<u32, Vec<Option<usize>>>,
) -> ApplyError {
    let what = match batch.record(e.seq) {
        Some(rec) => match tx.ops.get(rec.tag) {
            Some(op) => {
                let mut what = describe(op, table);
                if let Some(el) = failed_element(e, batch, rec, op, elem_origin) {
                    what.push_str(&format!(" (element {el})"));
                }
                what
            }
            None => format!("message {} of the batch", e.seq),
        },
        // Errors found at commit time (e.g. table validation) are reported against BEGIN.
        None if e.seq == batch.begin_seq() => "commit of the transaction".to_string(),
        None => format!("message {} of the batch", e.seq),
    };
    errno_error(what, e)
}

/// With extended acks, the kernel points at the element attribute that failed; find which IR
/// element that came from.
fn failed_element(
    e: &KernelError,
    batch: &Batch,
    rec: &nl::MsgRecord,
    op: &Op,
    elem_origin: &HashMap<u32, Vec<Option<usize>>>,
) -> Option<String> {
    let elements = match op {
        Op::AddElements { elements, .. } | Op::DeleteElements { elements, .. } => elements,
        _ => return None,
    };
    let off = e.bad_attr_offset? as usize;
    let msg = batch.message_bytes(rec);
    // NFTA_SET_ELEM_LIST_ELEMENTS = 3
    let (_, list_off, _) = nl::message_attrs(msg)
        .into_iter()
        .find(|(ty, _, _)| *ty == 3)?;
    let idx = nl::nested_attrs(msg, list_off)
        .iter()
        .position(|(_, start, payload)| off >= *start && off < start + 4 + payload.len())?;
    let origin = (*elem_origin.get(&e.seq)?.get(idx)?)?;
    elements.get(origin).map(fmt_element)
}

/// Short description of an op for error messages, e.g. `delete chain ip nftproxy foo`.
pub fn describe(op: &Op, table: &str) -> String {
    let t = |f: &Family| format!("{} {}", f.keyword(), table);
    match op {
        Op::AddTable(f) => format!("add table {}", t(f)),
        Op::DeleteTable(f) => format!("delete table {}", t(f)),
        Op::AddChain { family, name, .. } => format!("add chain {} {name}", t(family)),
        Op::FlushChain { family, name } => format!("flush chain {} {name}", t(family)),
        Op::DeleteChain { family, name } => format!("delete chain {} {name}", t(family)),
        Op::AddRule { family, chain, .. } => format!("add rule to chain {} {chain}", t(family)),
        Op::AddSet { family, name, def } => {
            format!(
                "add {} {} {name}",
                if def.data.is_some() { "map" } else { "set" },
                t(family)
            )
        }
        Op::DeleteSet { family, name } => format!("delete set {} {name}", t(family)),
        Op::FlushSet { family, name } => format!("flush set {} {name}", t(family)),
        Op::AddElements { family, set, .. } => format!("add element to set {} {set}", t(family)),
        Op::DeleteElements { family, set, .. } => {
            format!("delete element from set {} {set}", t(family))
        }
    }
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Addr(a) => a.to_string(),
        Value::Prefix(p) => p.to_string(),
        Value::Proto(p) => p.keyword().to_string(),
        Value::Port(p) => p.to_string(),
        Value::Slot(s) => s.to_string(),
    }
}

fn fmt_values(vs: &[Value]) -> String {
    vs.iter().map(fmt_value).collect::<Vec<_>>().join(" . ")
}

fn fmt_element(e: &Element) -> String {
    match &e.value {
        Some(v) => format!("{} : {}", fmt_values(&e.key), fmt_values(v)),
        None => fmt_values(&e.key),
    }
}

// ---------------------------------------------------------------------------------------------
// Fields and set layouts
// ---------------------------------------------------------------------------------------------

fn nfproto(f: Family) -> u16 {
    match f {
        Family::Ip => NFPROTO_IPV4,
        Family::Ip6 => NFPROTO_IPV6,
    }
}

fn addr_len(f: Family) -> usize {
    match f {
        Family::Ip => 4,
        Family::Ip6 => 16,
    }
}

/// Bytes a field occupies in a register (before padding).
fn field_len(f: Field, fam: Family) -> usize {
    match f {
        Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => addr_len(fam),
        Field::L4proto => 1,
        Field::ThDport | Field::CtOrigProtoDst => 2,
        Field::Numgen(_) => 4,
    }
}

/// Fields nft treats as host byte order.
fn host_endian(f: Field) -> bool {
    matches!(f, Field::L4proto | Field::Numgen(_))
}

fn field_value_type(f: Field, fam: Family) -> FieldType {
    match f {
        Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => {
            FieldType::addr(fam)
        }
        Field::L4proto => FieldType::InetProto,
        Field::ThDport | Field::CtOrigProtoDst => FieldType::InetService,
        Field::Numgen(_) => FieldType::Slot,
    }
}

fn ct_addr_key(f: Field, fam: Family) -> u32 {
    match (f, fam) {
        (Field::CtOrigSaddr, Family::Ip) => NFT_CT_SRC_IP,
        (Field::CtOrigSaddr, Family::Ip6) => NFT_CT_SRC_IP6,
        (_, Family::Ip) => NFT_CT_DST_IP,
        (_, Family::Ip6) => NFT_CT_DST_IP6,
    }
}

/// One component of a set key or map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Comp {
    ty: FieldType,
    /// nft datatype id for `NFTA_SET_KEY_TYPE`.
    type_id: u32,
    len: usize,
    /// Byte order nft records for a lone key of this component.
    byteorder: u32,
    /// The `typeof` expression, if declared that way.
    field: Option<Field>,
}

impl Comp {
    fn of_type(ty: FieldType) -> Result<Comp, LowerError> {
        let (type_id, byteorder) = match ty {
            FieldType::Ipv4Addr => (TYPE_IPADDR, BYTEORDER_BIG),
            FieldType::Ipv6Addr => (TYPE_IP6ADDR, BYTEORDER_BIG),
            // nft's inet_proto datatype has no byte order of its own.
            FieldType::InetProto => (TYPE_INET_PROTOCOL, BYTEORDER_INVALID),
            FieldType::InetService => (TYPE_INET_SERVICE, BYTEORDER_BIG),
            FieldType::Slot => return Err(LowerError::Encode(
                "a Slot component can only be declared with typeof (nft has no type name for it)"
                    .into(),
            )),
        };
        Ok(Comp {
            ty,
            type_id,
            len: ty.len(),
            byteorder,
            field: None,
        })
    }

    fn of_field(f: Field, fam: Family) -> Comp {
        let (type_id, byteorder) = match f {
            Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => match fam {
                Family::Ip => (TYPE_IPADDR, BYTEORDER_BIG),
                Family::Ip6 => (TYPE_IP6ADDR, BYTEORDER_BIG),
            },
            Field::L4proto => (TYPE_INET_PROTOCOL, BYTEORDER_HOST),
            Field::ThDport => (TYPE_INET_SERVICE, BYTEORDER_BIG),
            // `ct original proto-dst` has no datatype in nft until a protocol is known.
            Field::CtOrigProtoDst => (TYPE_INVALID, BYTEORDER_BIG),
            Field::Numgen(_) => (TYPE_INTEGER, BYTEORDER_HOST),
        };
        Comp {
            ty: field_value_type(f, fam),
            type_id,
            len: field_len(f, fam),
            byteorder,
            field: Some(f),
        }
    }

    /// The `typeof` user data of one expression: `{0: expr type, 1: {expr data}}`.
    fn typeof_udata(f: Field, fam: Family) -> Result<nl::udata::Udata, NlError> {
        use nl::udata::Udata;
        let mut data = Udata::new();
        let ty = match f {
            Field::Saddr | Field::Daddr | Field::ThDport => {
                let (desc, field) = match (f, fam) {
                    (Field::ThDport, _) => (PROTO_DESC_TH, THDR_DPORT),
                    (Field::Saddr, Family::Ip) => (PROTO_DESC_IP, IPHDR_SADDR),
                    (Field::Saddr, Family::Ip6) => (PROTO_DESC_IP6, IP6HDR_SADDR),
                    (_, Family::Ip) => (PROTO_DESC_IP, IPHDR_DADDR),
                    (_, Family::Ip6) => (PROTO_DESC_IP6, IP6HDR_DADDR),
                };
                data.put_u32(0, desc)?.put_u32(1, field)?;
                EXPR_PAYLOAD
            }
            Field::L4proto => {
                data.put_u32(0, NFT_META_L4PROTO)?;
                EXPR_META
            }
            Field::CtOrigSaddr | Field::CtOrigDaddr | Field::CtOrigProtoDst => {
                let key = if f == Field::CtOrigProtoDst {
                    NFT_CT_PROTO_DST
                } else {
                    ct_addr_key(f, fam)
                };
                data.put_u32(0, key)?
                    .put_u32(1, u32::from(IP_CT_DIR_ORIGINAL))?;
                EXPR_CT
            }
            Field::Numgen(_) => {
                data.put_u32(0, NFT_NG_RANDOM)?
                    .put_u32(1, TYPEOF_NUMGEN_MOD)?
                    .put_u32(2, 0)?;
                EXPR_NUMGEN
            }
        };
        let mut out = Udata::new();
        out.put_u32(0, ty)?.put_nest(1, &data)?;
        Ok(out)
    }
}

/// Register space (in 32-bit slots) of a value of `len` bytes.
fn reg_slots(len: usize) -> u32 {
    len.div_ceil(4) as u32
}

/// The key or data layout of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    comps: Vec<Comp>,
    typeof_: bool,
}

impl Layout {
    fn from_decl(d: &Decl, fam: Family) -> Result<Layout, LowerError> {
        let (comps, typeof_) = match d {
            Decl::Type(ts) => (
                ts.iter()
                    .map(|t| Comp::of_type(*t))
                    .collect::<Result<Vec<_>, _>>()?,
                false,
            ),
            Decl::Typeof(fs) => (fs.iter().map(|f| Comp::of_field(*f, fam)).collect(), true),
        };
        if comps.is_empty() {
            return Err(LowerError::Encode("empty key/data declaration".into()));
        }
        if comps.len() as u32 > NFT_REG32_COUNT - 1 {
            return Err(LowerError::Encode(
                "concatenation has too many components".into(),
            ));
        }
        Ok(Layout { comps, typeof_ })
    }

    fn concat(&self) -> bool {
        self.comps.len() > 1
    }

    /// `NFTA_SET_KEY_LEN`: a lone component's own size, a concatenation's padded size.
    fn len(&self) -> usize {
        if self.concat() {
            self.comps
                .iter()
                .map(|c| reg_slots(c.len) as usize * 4)
                .sum()
        } else {
            self.comps[0].len
        }
    }

    fn type_id(&self) -> u32 {
        self.comps
            .iter()
            .fold(0, |acc, c| (acc << TYPE_BITS) | c.type_id)
    }

    fn byteorder(&self) -> u32 {
        if self.concat() {
            BYTEORDER_INVALID
        } else {
            self.comps[0].byteorder
        }
    }

    /// The `KEY_TYPEOF`/`DATA_TYPEOF` user data, if nft writes one for this declaration.
    fn typeof_udata(&self, fam: Family) -> Result<Option<nl::udata::Udata>, NlError> {
        use nl::udata::Udata;
        if !self.concat() {
            return match (self.typeof_, self.comps[0].field) {
                (true, Some(f)) => Ok(Some(Comp::typeof_udata(f, fam)?)),
                _ => Ok(None),
            };
        }
        // A concatenation always gets an entry; declared with `type`, its list stays empty.
        let mut list = Udata::new();
        if self.typeof_ {
            for (i, c) in self.comps.iter().enumerate() {
                if let Some(f) = c.field {
                    list.put_nest(i as u8, &Comp::typeof_udata(f, fam)?)?;
                }
            }
        }
        let mut out = Udata::new();
        out.put_u32(0, EXPR_CONCAT)?.put_nest(1, &list)?;
        Ok(Some(out))
    }

    /// Split `bytes` (a key or data value as stored) into components.
    fn split<'a>(&self, bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, LowerError> {
        if bytes.len() != self.len() {
            return Err(LowerError::Decode(format!(
                "value of {} bytes, layout wants {}",
                bytes.len(),
                self.len()
            )));
        }
        if !self.concat() {
            return Ok(vec![bytes]);
        }
        let mut out = Vec::with_capacity(self.comps.len());
        let mut pos = 0;
        for c in &self.comps {
            out.push(&bytes[pos..pos + c.len]);
            pos += reg_slots(c.len) as usize * 4;
        }
        Ok(out)
    }
}

/// Everything about a set that its encoding depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SetLayout {
    family: Family,
    key: Layout,
    data: Option<Layout>,
    interval: bool,
}

impl SetLayout {
    fn from_def(family: Family, def: &SetDef) -> Result<SetLayout, LowerError> {
        let key = Layout::from_decl(&def.key, family)?;
        let data = def
            .data
            .as_ref()
            .map(|d| Layout::from_decl(d, family))
            .transpose()?;
        Ok(SetLayout {
            family,
            key,
            data,
            interval: def.flags.interval,
        })
    }

    fn rbtree(&self) -> bool {
        self.interval && !self.key.concat()
    }

    fn pipapo(&self) -> bool {
        self.interval && self.key.concat()
    }

    /// The NEWSET message's set object.
    fn declaration(
        &self,
        def: &SetDef,
        table: &str,
        name: &str,
        id: u32,
    ) -> Result<nl::Set, NlError> {
        use nl::udata::{self, Udata};
        let mut s = nl::Set::new(nfproto(self.family), table, name)?;
        let mut flags = 0;
        if def.flags.interval {
            flags |= NFT_SET_INTERVAL;
            if self.key.concat() {
                flags |= NFT_SET_CONCAT;
            }
        }
        if self.data.is_some() {
            flags |= NFT_SET_MAP;
        }
        if def.flags.timeout {
            flags |= NFT_SET_TIMEOUT;
        }
        s.set_flags(flags);
        s.set_key(self.key.type_id(), self.key.len() as u32);
        if let Some(d) = &self.data {
            s.set_data(d.type_id(), d.len() as u32);
        }
        s.set_id(id);
        if let Some(size) = def.size {
            s.set_size(size);
        }
        if self.pipapo() {
            let lens: Vec<u8> = self.key.comps.iter().map(|c| c.len as u8).collect();
            s.set_desc_concat(&lens)?;
        }
        let mut ud = Udata::new();
        ud.put_u32(udata::SET_KEYBYTEORDER, self.key.byteorder())?;
        if let Some(d) = &self.data {
            ud.put_u32(udata::SET_DATABYTEORDER, d.byteorder())?;
        }
        if let Some(t) = self.key.typeof_udata(self.family)? {
            ud.put_nest(udata::SET_KEY_TYPEOF, &t)?;
        }
        if let Some(d) = &self.data {
            if let Some(t) = d.typeof_udata(self.family)? {
                ud.put_nest(udata::SET_DATA_TYPEOF, &t)?;
            }
            ud.put_u32(udata::SET_DATA_INTERVAL, 0)?;
        }
        s.set_userdata(ud.as_bytes())?;
        if def.flags.counter {
            s.push_expr(Expr::counter()?);
        }
        Ok(s)
    }

    /// Recover the layout of an existing set from its kernel attributes: the `typeof` user data
    /// when present (it names fields that have no datatype), else the datatype ids.
    fn from_kernel(family: Family, info: &nl::SetInfo) -> Result<SetLayout, LowerError> {
        use nl::udata;
        let ud = udata::parse(&info.userdata)?;
        let key = layout_from_kernel(
            family,
            info.key_type,
            info.key_len,
            udata::find(&ud, udata::SET_KEY_TYPEOF).as_deref(),
        )?;
        let data = match (info.data_type, info.data_len) {
            (Some(t), Some(l)) if info.flags & NFT_SET_MAP != 0 => Some(layout_from_kernel(
                family,
                t,
                l,
                udata::find(&ud, udata::SET_DATA_TYPEOF).as_deref(),
            )?),
            _ => None,
        };
        Ok(SetLayout {
            family,
            key,
            data,
            interval: info.flags & NFT_SET_INTERVAL != 0,
        })
    }
}

fn layout_from_kernel(
    family: Family,
    type_id: u32,
    len: u32,
    typeof_ud: Option<&[u8]>,
) -> Result<Layout, LowerError> {
    if let Some(ud) = typeof_ud {
        if let Some(fields) = typeof_fields(ud, family)? {
            let layout = Layout {
                comps: fields.iter().map(|f| Comp::of_field(*f, family)).collect(),
                typeof_: true,
            };
            if layout.len() != len as usize {
                return Err(LowerError::Encode(format!(
                    "typeof user data does not match key length {len}"
                )));
            }
            return Ok(layout);
        }
    }
    let mut ids = Vec::new();
    let mut t = type_id;
    while t != 0 {
        ids.push(t & ((1 << TYPE_BITS) - 1));
        t >>= TYPE_BITS;
    }
    ids.reverse();
    let comps = ids
        .iter()
        .map(|id| match *id {
            TYPE_IPADDR => Comp::of_type(FieldType::Ipv4Addr),
            TYPE_IP6ADDR => Comp::of_type(FieldType::Ipv6Addr),
            TYPE_INET_PROTOCOL => Comp::of_type(FieldType::InetProto),
            TYPE_INET_SERVICE => Comp::of_type(FieldType::InetService),
            TYPE_INTEGER => Ok(Comp {
                ty: FieldType::Slot,
                type_id: TYPE_INTEGER,
                len: 4,
                byteorder: BYTEORDER_HOST,
                field: None,
            }),
            other => Err(LowerError::Encode(format!(
                "datatype {other} is not one nftproxy uses"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if comps.is_empty() {
        return Err(LowerError::Encode(format!(
            "cannot decode datatype {type_id:#x}"
        )));
    }
    let layout = Layout {
        comps,
        typeof_: false,
    };
    if layout.len() != len as usize {
        return Err(LowerError::Encode(format!(
            "datatype {type_id:#x} does not match length {len}"
        )));
    }
    Ok(layout)
}

/// Parse `typeof` user data back to fields; `None` for an empty (type-declared) concatenation.
fn typeof_fields(ud: &[u8], family: Family) -> Result<Option<Vec<Field>>, LowerError> {
    use nl::udata::{as_u32, find, parse};
    let top = parse(ud)?;
    let ty = find(&top, 0)
        .and_then(|v| as_u32(&v))
        .ok_or_else(|| LowerError::Decode("typeof without expression type".into()))?;
    let data = find(&top, 1).unwrap_or_default();
    if ty == EXPR_CONCAT {
        let comps = parse(&data)?;
        if comps.is_empty() {
            return Ok(None);
        }
        let fields = comps
            .iter()
            .map(|(_, c)| typeof_field(c, family))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Some(fields));
    }
    Ok(Some(vec![typeof_field(ud, family)?]))
}

fn typeof_field(ud: &[u8], family: Family) -> Result<Field, LowerError> {
    use nl::udata::{as_u32, find, parse};
    let top = parse(ud)?;
    let ty = find(&top, 0)
        .and_then(|v| as_u32(&v))
        .ok_or_else(|| LowerError::Decode("typeof without expression type".into()))?;
    let raw = find(&top, 1).unwrap_or_default();
    let data = parse(&raw)?;
    let a = |i: u8| find(&data, i).and_then(|v| as_u32(&v));
    let unknown = || {
        LowerError::Decode(format!(
            "typeof expression {ty} {:?} is not one nftproxy uses",
            data
        ))
    };
    Ok(match ty {
        EXPR_PAYLOAD => match (a(0), a(1), family) {
            (Some(PROTO_DESC_TH), Some(THDR_DPORT), _) => Field::ThDport,
            (Some(PROTO_DESC_IP), Some(IPHDR_SADDR), Family::Ip)
            | (Some(PROTO_DESC_IP6), Some(IP6HDR_SADDR), Family::Ip6) => Field::Saddr,
            (Some(PROTO_DESC_IP), Some(IPHDR_DADDR), Family::Ip)
            | (Some(PROTO_DESC_IP6), Some(IP6HDR_DADDR), Family::Ip6) => Field::Daddr,
            _ => return Err(unknown()),
        },
        EXPR_META if a(0) == Some(NFT_META_L4PROTO) => Field::L4proto,
        EXPR_CT => match a(0) {
            Some(NFT_CT_PROTO_DST) => Field::CtOrigProtoDst,
            Some(NFT_CT_SRC_IP) | Some(NFT_CT_SRC_IP6) => Field::CtOrigSaddr,
            Some(NFT_CT_DST_IP) | Some(NFT_CT_DST_IP6) => Field::CtOrigDaddr,
            _ => return Err(unknown()),
        },
        EXPR_NUMGEN => Field::Numgen(a(1).unwrap_or(TYPEOF_NUMGEN_MOD)),
        _ => return Err(unknown()),
    })
}

// ---------------------------------------------------------------------------------------------
// Element values
// ---------------------------------------------------------------------------------------------

/// Bytes of one component value. `big_endian_ints`: host-order integers are stored big-endian
/// (interval sets, see the module docs).
fn value_bytes(v: &Value, c: &Comp, big_endian_ints: bool) -> Result<Vec<u8>, LowerError> {
    let wrong = || {
        LowerError::Encode(format!(
            "value {} does not fit a {:?} component",
            fmt_value(v),
            c.ty
        ))
    };
    match (v, c.ty) {
        (Value::Addr(IpAddr::V4(a)), FieldType::Ipv4Addr) => Ok(a.octets().to_vec()),
        (Value::Addr(IpAddr::V6(a)), FieldType::Ipv6Addr) => Ok(a.octets().to_vec()),
        (Value::Proto(p), FieldType::InetProto) => Ok(vec![p.number()]),
        (Value::Port(p), FieldType::InetService) => Ok(p.to_be_bytes().to_vec()),
        (Value::Slot(s), FieldType::Slot) => Ok(if big_endian_ints {
            s.to_be_bytes().to_vec()
        } else {
            s.to_ne_bytes().to_vec()
        }),
        (Value::Prefix(_), _) => Err(LowerError::Encode(format!(
            "prefix {} outside an interval set",
            fmt_value(v)
        ))),
        _ => Err(wrong()),
    }
}

/// First and last value of a component in an interval set.
fn value_range(v: &Value, c: &Comp) -> Result<(Vec<u8>, Vec<u8>), LowerError> {
    match (v, c.ty) {
        (Value::Prefix(ipnet::IpNet::V4(n)), FieldType::Ipv4Addr) => Ok((
            n.network().octets().to_vec(),
            n.broadcast().octets().to_vec(),
        )),
        (Value::Prefix(ipnet::IpNet::V6(n)), FieldType::Ipv6Addr) => Ok((
            n.network().octets().to_vec(),
            n.broadcast().octets().to_vec(),
        )),
        (Value::Prefix(_), _) => Err(LowerError::Encode(format!(
            "prefix {} does not fit a {:?} component",
            fmt_value(v),
            c.ty
        ))),
        _ => {
            let b = value_bytes(v, c, true)?;
            Ok((b.clone(), b))
        }
    }
}

/// Concatenate component values, each padded to 4 bytes, or return a lone one as is.
fn join(layout: &Layout, parts: &[Vec<u8>]) -> Vec<u8> {
    if !layout.concat() {
        return parts.first().cloned().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(layout.len());
    for p in parts {
        out.extend_from_slice(p);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    out
}

fn encode_values(
    vals: &[Value],
    layout: &Layout,
    big_endian_ints: bool,
) -> Result<Vec<u8>, LowerError> {
    if vals.len() != layout.comps.len() {
        return Err(LowerError::Encode(format!(
            "{} has {} components, the set wants {}",
            fmt_values(vals),
            vals.len(),
            layout.comps.len()
        )));
    }
    let parts = vals
        .iter()
        .zip(&layout.comps)
        .map(|(v, c)| value_bytes(v, c, big_endian_ints))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(join(layout, &parts))
}

/// Big-endian `x + 1`; `None` on overflow (x was the top of the key space).
fn be_increment(x: &[u8]) -> Option<Vec<u8>> {
    let mut out = x.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(out);
        }
    }
    None
}

fn be_decrement(x: &[u8]) -> Option<Vec<u8>> {
    let mut out = x.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0 {
            *b = 0xff;
        } else {
            *b -= 1;
            return Some(out);
        }
    }
    None
}

/// The kernel elements of one IR element, with the op's element index attached.
struct KElem {
    elem: nl::SetElem,
    origin: Option<usize>,
}

/// User data of an rbtree start element whose interval runs to the top (no end element).
fn interval_open_udata() -> Result<Vec<u8>, NlError> {
    let mut u = nl::udata::Udata::new();
    u.put_u32(
        nl::udata::SET_ELEM_FLAGS,
        nl::udata::SET_ELEM_F_INTERVAL_OPEN,
    )?;
    Ok(u.into_bytes())
}

fn nlerr(e: NlError) -> LowerError {
    LowerError::Nl(e)
}

/// Kernel elements for adding (`add == true`) or deleting IR elements.
fn kernel_elements(
    layout: &SetLayout,
    elements: &[Element],
    add: bool,
) -> Result<Vec<KElem>, LowerError> {
    let mut out = Vec::with_capacity(elements.len() * if layout.rbtree() { 2 } else { 1 });
    let data_of = |e: &Element| -> Result<Option<Vec<u8>>, LowerError> {
        match (&layout.data, &e.value) {
            (Some(d), Some(v)) => Ok(Some(encode_values(v, d, false)?)),
            (None, None) => Ok(None),
            (Some(_), None) => Err(LowerError::Encode(format!(
                "map element {} has no value",
                fmt_element(e)
            ))),
            (None, Some(_)) => Err(LowerError::Encode(format!(
                "set element {} has a value",
                fmt_element(e)
            ))),
        }
    };
    if layout.rbtree() {
        // nft sends intervals in ascending order, each start followed by its end.
        let mut ranges = Vec::with_capacity(elements.len());
        for (i, e) in elements.iter().enumerate() {
            if e.key.len() != 1 {
                return Err(LowerError::Encode(format!(
                    "{} has {} components, the set wants 1",
                    fmt_element(e),
                    e.key.len()
                )));
            }
            let (lo, hi) = value_range(&e.key[0], &layout.key.comps[0])?;
            ranges.push((lo, hi, i, if add { data_of(e)? } else { None }));
        }
        ranges.sort();
        for (lo, hi, i, data) in ranges {
            let mut start = nl::SetElem::new().map_err(nlerr)?;
            start.set_key(&lo).map_err(nlerr)?;
            if let Some(d) = &data {
                start.set_data(d).map_err(nlerr)?;
            }
            let end = be_increment(&hi);
            if end.is_none() && add {
                start
                    .set_userdata(&interval_open_udata().map_err(nlerr)?)
                    .map_err(nlerr)?;
            }
            out.push(KElem {
                elem: start,
                origin: Some(i),
            });
            if let Some(end) = end {
                let mut e = nl::SetElem::new().map_err(nlerr)?;
                e.set_key(&end).map_err(nlerr)?;
                e.set_flags(NFT_SET_ELEM_INTERVAL_END);
                out.push(KElem {
                    elem: e,
                    origin: Some(i),
                });
            }
        }
        return Ok(out);
    }
    for (i, e) in elements.iter().enumerate() {
        let mut k = nl::SetElem::new().map_err(nlerr)?;
        if layout.pipapo() {
            if e.key.len() != layout.key.comps.len() {
                return Err(LowerError::Encode(format!(
                    "{} has {} components, the set wants {}",
                    fmt_element(e),
                    e.key.len(),
                    layout.key.comps.len()
                )));
            }
            let (los, his): (Vec<_>, Vec<_>) = e
                .key
                .iter()
                .zip(&layout.key.comps)
                .map(|(v, c)| value_range(v, c))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            let (lo, hi) = (join(&layout.key, &los), join(&layout.key, &his));
            k.set_key(&lo).map_err(nlerr)?;
            // nft always sends KEY_END when adding, and only for real ranges when deleting.
            if add || lo != hi {
                k.set_key_end(&hi).map_err(nlerr)?;
            }
        } else {
            k.set_key(&encode_values(&e.key, &layout.key, false)?)
                .map_err(nlerr)?;
        }
        if add {
            if let Some(d) = data_of(e)? {
                k.set_data(&d).map_err(nlerr)?;
            }
        }
        out.push(KElem {
            elem: k,
            origin: Some(i),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Decoding dumped elements
// ---------------------------------------------------------------------------------------------

fn decode_comp(b: &[u8], c: &Comp, big_endian_ints: bool) -> Result<Value, LowerError> {
    let bad = || LowerError::Decode(format!("{} bytes do not decode as {:?}", b.len(), c.ty));
    Ok(match c.ty {
        FieldType::Ipv4Addr => Value::Addr(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(b).map_err(|_| bad())?,
        ))),
        FieldType::Ipv6Addr => Value::Addr(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(b).map_err(|_| bad())?,
        ))),
        FieldType::InetProto => {
            let n = *b.first().ok_or_else(bad)?;
            Value::Proto(
                Proto::ALL
                    .into_iter()
                    .find(|p| p.number() == n)
                    .ok_or_else(|| {
                        LowerError::Decode(format!("protocol {n} is not tcp/udp/sctp"))
                    })?,
            )
        }
        FieldType::InetService => Value::Port(u16::from_be_bytes(
            <[u8; 2]>::try_from(b).map_err(|_| bad())?,
        )),
        FieldType::Slot => {
            let a = <[u8; 4]>::try_from(b).map_err(|_| bad())?;
            Value::Slot(if big_endian_ints {
                u32::from_be_bytes(a)
            } else {
                u32::from_ne_bytes(a)
            })
        }
    })
}

/// A range of one component back to a value: a CIDR for addresses (`as_prefix` also for a single
/// address), the value itself when first == last.
fn decode_range(lo: &[u8], hi: &[u8], c: &Comp, as_prefix: bool) -> Result<Value, LowerError> {
    let is_addr = matches!(c.ty, FieldType::Ipv4Addr | FieldType::Ipv6Addr);
    if lo == hi && !(is_addr && as_prefix) {
        return decode_comp(lo, c, true);
    }
    if !is_addr {
        return Err(LowerError::Decode(format!(
            "range {lo:02x?}-{hi:02x?} of a {:?} component cannot be expressed",
            c.ty
        )));
    }
    // A prefix: lo and hi agree on the leading bits and then lo is all zeros, hi all ones.
    let bits = lo.len() * 8;
    let mut plen = 0;
    while plen < bits {
        let (byte, bit) = (plen / 8, 7 - plen % 8);
        if (lo[byte] >> bit) & 1 != (hi[byte] >> bit) & 1 {
            break;
        }
        plen += 1;
    }
    for i in plen..bits {
        let (byte, bit) = (i / 8, 7 - i % 8);
        if (lo[byte] >> bit) & 1 != 0 || (hi[byte] >> bit) & 1 != 1 {
            return Err(LowerError::Decode(format!(
                "range {lo:02x?}-{hi:02x?} is not a CIDR prefix"
            )));
        }
    }
    let net = match decode_comp(lo, c, true)? {
        Value::Addr(IpAddr::V4(a)) => ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(a, plen as u8).map_err(|e| LowerError::Decode(e.to_string()))?,
        ),
        Value::Addr(IpAddr::V6(a)) => ipnet::IpNet::V6(
            ipnet::Ipv6Net::new(a, plen as u8).map_err(|e| LowerError::Decode(e.to_string()))?,
        ),
        other => return Err(LowerError::Decode(format!("unexpected {other:?}"))),
    };
    Ok(Value::Prefix(net))
}

impl SetLayout {
    fn decode_data(&self, e: &nl::ElemInfo) -> Result<Option<Vec<Value>>, LowerError> {
        match (&self.data, &e.data) {
            (Some(d), Some(bytes)) => {
                let parts = d.split(bytes)?;
                Ok(Some(
                    parts
                        .iter()
                        .zip(&d.comps)
                        .map(|(b, c)| decode_comp(b, c, false))
                        .collect::<Result<Vec<_>, _>>()?,
                ))
            }
            (Some(_), None) => Err(LowerError::Decode("map element without data".into())),
            (None, _) => Ok(None),
        }
    }

    /// Kernel elements back to IR elements. In interval sets an address component is decoded as
    /// a `Prefix` (a single address as /32 or /128) when it is the set's only component or the
    /// last of a concatenation, the places where nftproxy puts CIDRs.
    fn decode(&self, elems: &[nl::ElemInfo], counters: bool) -> Result<Listed, LowerError> {
        let counter = |e: &nl::ElemInfo| {
            if counters {
                Some(e.counter.unwrap_or((0, 0)))
            } else {
                None
            }
        };
        let mut out = Vec::with_capacity(elems.len());
        if self.rbtree() {
            let c = &self.key.comps[0];
            let mut sorted: Vec<&nl::ElemInfo> = elems.iter().collect();
            // Ascending by key; at equal keys an end (of the previous range) before a start.
            sorted.sort_by(|a, b| {
                let a_start = a.flags & NFT_SET_ELEM_INTERVAL_END == 0;
                let b_start = b.flags & NFT_SET_ELEM_INTERVAL_END == 0;
                a.key.cmp(&b.key).then(a_start.cmp(&b_start))
            });
            let mut i = 0;
            while i < sorted.len() {
                let s = sorted[i];
                i += 1;
                if s.flags & NFT_SET_ELEM_INTERVAL_END != 0 {
                    // A lone end: nft's leading "0.0.0.0 interval end" element.
                    continue;
                }
                let open = s
                    .userdata
                    .as_deref()
                    .and_then(|u| {
                        nl::udata::parse(u)
                            .ok()
                            .and_then(|l| nl::udata::find(&l, nl::udata::SET_ELEM_FLAGS))
                    })
                    .and_then(|v| nl::udata::as_u32(&v))
                    .is_some_and(|f| f & nl::udata::SET_ELEM_F_INTERVAL_OPEN != 0);
                let hi = match sorted.get(i) {
                    Some(e) if !open && e.flags & NFT_SET_ELEM_INTERVAL_END != 0 => {
                        i += 1;
                        be_decrement(&e.key).ok_or_else(|| {
                            LowerError::Decode("interval end at 0 after a start".into())
                        })?
                    }
                    _ => vec![0xff; s.key.len()],
                };
                let key = decode_range(&s.key, &hi, c, true)?;
                out.push((
                    Element {
                        key: vec![key],
                        value: self.decode_data(s)?,
                    },
                    counter(s),
                ));
            }
            return Ok(out);
        }
        for e in elems {
            let key = if self.pipapo() {
                let lo = self.key.split(&e.key)?;
                let hi = match &e.key_end {
                    Some(k) => self.key.split(k)?,
                    None => lo.clone(),
                };
                let last = self.key.comps.len() - 1;
                lo.iter()
                    .zip(&hi)
                    .zip(&self.key.comps)
                    .enumerate()
                    .map(|(i, ((l, h), c))| decode_range(l, h, c, i == last))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let parts = self.key.split(&e.key)?;
                parts
                    .iter()
                    .zip(&self.key.comps)
                    .map(|(b, c)| decode_comp(b, c, false))
                    .collect::<Result<Vec<_>, _>>()?
            };
            out.push((
                Element {
                    key,
                    value: self.decode_data(e)?,
                },
                counter(e),
            ));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// nft's register numbering: slot `n` (1-based, 32-bit slots) is sent as the 128-bit register
/// `NFT_REG_1 + (n-1)/4` when 16-byte aligned, for compatibility with old kernels, and as the
/// 32-bit register `NFT_REG32_00 + (n-1)` otherwise.
fn nft_reg(slot: u32) -> u32 {
    let r = slot - 1;
    if r.is_multiple_of(4) {
        NFT_REG_1 + r / 4
    } else {
        NFT_REG32_00 + r
    }
}

/// Slots nft reserves for a key: a concatenation its padded size, anything else a whole 16-byte
/// register.
fn key_slots(fields: &[Field], fam: Family) -> u32 {
    if fields.len() > 1 {
        fields.iter().map(|f| reg_slots(field_len(*f, fam))).sum()
    } else {
        4
    }
}

/// How a lookup into some set is encoded.
struct SetRef {
    id: Option<u32>,
    interval: bool,
}

struct RuleLowering<'a> {
    family: Family,
    rule: nl::Rule,
    sets: &'a dyn Fn(&str) -> SetRef,
}

impl RuleLowering<'_> {
    fn push(&mut self, e: Result<Expr, NlError>) -> Result<(), LowerError> {
        self.rule.push(e.map_err(nlerr)?);
        Ok(())
    }

    fn load(&mut self, f: Field, slot: u32) -> Result<(), LowerError> {
        let reg = nft_reg(slot);
        let fam = self.family;
        let e = match f {
            Field::Saddr | Field::Daddr => {
                let off = match (f == Field::Saddr, fam) {
                    (true, Family::Ip) => 12,
                    (false, Family::Ip) => 16,
                    (true, Family::Ip6) => 8,
                    (false, Family::Ip6) => 24,
                };
                Expr::payload_load(NFT_PAYLOAD_NETWORK_HEADER, off, addr_len(fam) as u32, reg)
            }
            Field::ThDport => Expr::payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg),
            Field::L4proto => Expr::meta_load(NFT_META_L4PROTO, reg),
            Field::CtOrigSaddr | Field::CtOrigDaddr => {
                Expr::ct_load(ct_addr_key(f, fam), Some(IP_CT_DIR_ORIGINAL), reg)
            }
            Field::CtOrigProtoDst => Expr::ct_load(NFT_CT_PROTO_DST, Some(IP_CT_DIR_ORIGINAL), reg),
            Field::Numgen(n) => {
                if n == 0 {
                    return Err(LowerError::Encode("numgen modulus 0".into()));
                }
                Expr::numgen(reg, n, NFT_NG_RANDOM, 0)
            }
        };
        self.push(e)
    }

    /// Load a (possibly concatenated) key from `slot` on. For interval sets nft converts
    /// host-endian parts to network order right after loading them: always inside a
    /// concatenation, for a lone key only when it is wider than a byte.
    fn load_key(&mut self, fields: &[Field], slot: u32, interval: bool) -> Result<(), LowerError> {
        if fields.is_empty() {
            return Err(LowerError::Encode("empty key".into()));
        }
        if slot - 1 + key_slots(fields, self.family) > NFT_REG32_COUNT {
            return Err(LowerError::Encode(
                "key and value do not fit the 16 registers".into(),
            ));
        }
        let mut s = slot;
        for f in fields {
            self.load(*f, s)?;
            let len = field_len(*f, self.family);
            if interval && host_endian(*f) && (fields.len() > 1 || len > 1) {
                let size = if len.is_multiple_of(8) {
                    8
                } else if len.is_multiple_of(4) {
                    4
                } else {
                    2
                };
                self.push(Expr::byteorder(
                    nft_reg(s),
                    nft_reg(s),
                    NFT_BYTEORDER_HTON,
                    len as u32,
                    size,
                ))?;
            }
            s += reg_slots(len);
        }
        Ok(())
    }

    fn bit_test(
        &mut self,
        load: Result<Expr, NlError>,
        bits: u32,
        op: u32,
        want: u32,
    ) -> Result<(), LowerError> {
        let r = nft_reg(1);
        self.push(load)?;
        self.push(Expr::bitwise(
            r,
            r,
            &bits.to_ne_bytes(),
            &0u32.to_ne_bytes(),
        ))?;
        self.push(Expr::cmp(r, op, &want.to_ne_bytes()))
    }

    fn fib_local(&mut self, flag: u32) -> Result<(), LowerError> {
        let r = nft_reg(1);
        self.push(Expr::fib(flag, NFT_FIB_RESULT_ADDRTYPE, r))?;
        self.push(Expr::cmp(r, NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes()))
    }

    fn mark_set(&mut self, mask: u32, xor: u32) -> Result<(), LowerError> {
        let r = nft_reg(1);
        self.push(Expr::meta_load(NFT_META_MARK, r))?;
        self.push(Expr::bitwise(r, r, &mask.to_ne_bytes(), &xor.to_ne_bytes()))?;
        self.push(Expr::meta_set(NFT_META_MARK, r))
    }

    fn lower_match(&mut self, m: &Match) -> Result<(), LowerError> {
        match m {
            Match::CtStateNew => self.bit_test(
                Expr::ct_load(NFT_CT_STATE, None, nft_reg(1)),
                NF_CT_STATE_NEW_BIT,
                NFT_CMP_NEQ,
                0,
            ),
            Match::CtStatusDnat => self.bit_test(
                Expr::ct_load(NFT_CT_STATUS, None, nft_reg(1)),
                IPS_DST_NAT,
                NFT_CMP_NEQ,
                0,
            ),
            Match::MarkUnset(bits) => self.bit_test(
                Expr::meta_load(NFT_META_MARK, nft_reg(1)),
                *bits,
                NFT_CMP_EQ,
                0,
            ),
            Match::L4protoIs(p) => {
                let r = nft_reg(1);
                self.push(Expr::meta_load(NFT_META_L4PROTO, r))?;
                self.push(Expr::cmp(r, NFT_CMP_EQ, &[p.number()]))
            }
            Match::FibDaddrLocal => self.fib_local(NFTA_FIB_F_DADDR),
            Match::FibSaddrLocal => self.fib_local(NFTA_FIB_F_SADDR),
            Match::Lookup { key, set, negate } => {
                let r = (self.sets)(set);
                self.load_key(key, 1, r.interval)?;
                self.push(Expr::lookup(nft_reg(1), None, set, r.id, *negate))
            }
        }
    }

    fn lower_action(&mut self, a: &Action) -> Result<(), LowerError> {
        match a {
            Action::Jump(c) => self.push(Expr::verdict(NFT_JUMP, Some(c))),
            Action::Goto(c) => self.push(Expr::verdict(NFT_GOTO, Some(c))),
            Action::Return => self.push(Expr::verdict(NFT_RETURN, None)),
            Action::Drop => self.push(Expr::verdict(NF_DROP, None)),
            Action::Reject => {
                // Plain `reject`: ICMP port unreachable of the table's family.
                let code = match self.family {
                    Family::Ip => ICMP_PORT_UNREACH,
                    Family::Ip6 => ICMPV6_PORT_UNREACH,
                };
                self.push(Expr::reject(NFT_REJECT_ICMP_UNREACH, code))
            }
            Action::MarkOr(bits) => self.mark_set(!bits, *bits),
            Action::MarkXor(bits) => self.mark_set(u32::MAX, *bits),
            Action::Masquerade => self.push(Expr::masq(NF_NAT_RANGE_PROTO_RANDOM_FULLY)),
            Action::DnatMap { key, map } => {
                // The map's value (address . port) lands in the register the key started in;
                // the port follows the address's padded size.
                let r = (self.sets)(map);
                self.load_key(key, 1, r.interval)?;
                let reg = nft_reg(1);
                self.push(Expr::lookup(reg, Some(reg), map, r.id, false))?;
                let proto = nft_reg(1 + reg_slots(addr_len(self.family)));
                self.push(Expr::nat(
                    NFT_NAT_DNAT,
                    nfproto(self.family),
                    reg,
                    Some(proto),
                ))
            }
            Action::UpdateTimeout {
                set,
                key,
                timeout_secs,
                value,
            } => {
                let r = (self.sets)(set);
                self.load_key(key, 1, false)?;
                let data_slot = 1 + key_slots(key, self.family);
                self.load_key(value, data_slot, false)?;
                self.push(Expr::dynset(
                    NFT_DYNSET_OP_UPDATE,
                    nft_reg(1),
                    Some(nft_reg(data_slot)),
                    Some(u64::from(*timeout_secs) * 1000),
                    set,
                    r.id,
                ))
            }
        }
    }
}

fn lower_rule(
    family: Family,
    table: &str,
    chain: &str,
    rule: &Rule,
    sets: &dyn Fn(&str) -> SetRef,
) -> Result<nl::Rule, LowerError> {
    let mut l = RuleLowering {
        family,
        rule: nl::Rule::new(nfproto(family), table, chain).map_err(nlerr)?,
        sets,
    };
    for m in &rule.matches {
        l.lower_match(m)?;
    }
    l.lower_action(&rule.action)?;
    Ok(l.rule)
}

fn hooknum(h: Hook) -> u32 {
    match h {
        Hook::Prerouting => NF_INET_PRE_ROUTING,
        Hook::Input => NF_INET_LOCAL_IN,
        Hook::Forward => NF_INET_FORWARD,
        Hook::Output => NF_INET_LOCAL_OUT,
        Hook::Postrouting => NF_INET_POST_ROUTING,
    }
}

fn chain_object(
    family: Family,
    table: &str,
    name: &str,
    base: Option<&BaseChain>,
) -> Result<nl::Chain, NlError> {
    let mut c = nl::Chain::new(nfproto(family), table, name)?;
    if let Some(b) = base {
        let ty = match b.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        // The priority is always numeric on the wire (nft resolves `dstnat` etc. itself), which
        // also covers the ip-family nat OUTPUT chain that must be created with -100.
        c.set_base(hooknum(b.hook), b.priority, ty, NF_ACCEPT)?;
    }
    Ok(c)
}

// ---------------------------------------------------------------------------------------------
// Transaction lowering
// ---------------------------------------------------------------------------------------------

struct Lowering<'a> {
    table: &'a str,
    batch: Batch,
    /// Batch-local ids of sets created in this batch (never reused within a batch: the kernel
    /// resolves an id by searching the batch's pending set creations).
    set_ids: HashMap<(Family, String), u32>,
    next_set_id: u32,
    /// Layouts of sets declared so far in this transaction.
    declared: HashMap<(Family, String), SetLayout>,
    /// Interval flag of every set the transaction declares, wherever it does.
    tx_interval: HashMap<(Family, String), bool>,
    /// rbtree sets known to be empty at this point of the batch (created or flushed, nothing
    /// added since): nft puts its leading "interval end at 0" element into those.
    empty: HashSet<(Family, String)>,
    known: &'a HashMap<(Family, String), KnownSet>,
    /// For each element message: which op element each kernel element came from.
    elem_origin: HashMap<u32, Vec<Option<usize>>>,
}

impl<'a> Lowering<'a> {
    fn new(
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

    fn push(
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

    fn set_id(&self, family: Family, name: &str) -> Option<u32> {
        self.set_ids.get(&(family, name.to_string())).copied()
    }

    /// The element-list carrier for `set`.
    fn elems_carrier(&self, family: Family, set: &str) -> Result<nl::Set, LowerError> {
        let mut s = nl::Set::new(nfproto(family), self.table, set).map_err(nlerr)?;
        if let Some(id) = self.set_id(family, set) {
            s.set_id(id);
        }
        Ok(s)
    }

    /// Send `elems` in as many messages as the per-message budget requires.
    fn push_elems(
        &mut self,
        cmd: Cmd,
        flags: u16,
        family: Family,
        set: &str,
        elems: Vec<KElem>,
        tag: usize,
    ) -> Result<(), LowerError> {
        let mut carrier = self.elems_carrier(family, set)?;
        let mut origins = Vec::new();
        for k in elems {
            if carrier.elem_count() > 0
                && carrier.elems_bound() + k.elem.bound() > nl::ELEMS_PER_MSG_BUDGET
            {
                let seq = self.push(cmd, family, flags, Payload::SetElems(&carrier), tag)?;
                self.elem_origin.insert(seq, std::mem::take(&mut origins));
                carrier = self.elems_carrier(family, set)?;
            }
            origins.push(k.origin);
            carrier.push_elem(k.elem);
        }
        if carrier.elem_count() > 0 {
            let seq = self.push(cmd, family, flags, Payload::SetElems(&carrier), tag)?;
            self.elem_origin.insert(seq, origins);
        }
        Ok(())
    }

    fn op(&mut self, tag: usize, op: &Op) -> Result<(), LowerError> {
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
                let elems = kernel_elements(&layout, elements, true)?;
                if layout.rbtree() && self.empty.remove(&(*family, set.clone())) {
                    self.leading_interval_end(&layout, *family, set, elements, tag)?;
                }
                self.push_elems(
                    Cmd::NewSetElem,
                    NLM_F_CREATE | NLM_F_EXCL,
                    *family,
                    set,
                    elems,
                    tag,
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
                let elems = kernel_elements(&layout, elements, false)?;
                self.push_elems(Cmd::DelSetElem, 0, *family, set, elems, tag)?;
            }
        }
        Ok(())
    }

    /// nft's first-segment quirk: elements added to an empty rbtree set are preceded by an
    /// `interval end` element at 0 unless the lowest interval starts at 0. It goes in its own
    /// message without NLM_F_EXCL, so that a set which already holds one (an "added" set may
    /// have existed before) does not turn this into EEXIST.
    fn leading_interval_end(
        &mut self,
        layout: &SetLayout,
        family: Family,
        set: &str,
        elements: &[Element],
        tag: usize,
    ) -> Result<(), LowerError> {
        let comp = &layout.key.comps[0];
        let mut lowest: Option<Vec<u8>> = None;
        for e in elements {
            if let Some(v) = e.key.first() {
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

#[cfg(test)]
#[path = "netlink_tests.rs"]
mod tests;
