//! Typed nftables ruleset: the one representation that `compile` produces, `render` prints,
//! `plan` diffs, the fake applier stores, the netlink encoder lowers and the packet tracer runs.
//!
//! It deliberately models only the handful of expressions nftproxy uses. Every construct here has
//! one canonical text form (the one `nft list table` prints with nft 1.0.6), so the rendered text and
//! the kernel's listing can be compared after normalisation.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::net::{Family, Proto};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn keyword(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChainType {
    Filter,
    Nat,
}

impl ChainType {
    pub fn keyword(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// A packet or conntrack field used as (part of) a lookup key or a map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `ip saddr` / `ip6 saddr`
    Saddr,
    /// `ip daddr` / `ip6 daddr`
    Daddr,
    /// `meta l4proto`
    L4proto,
    /// `th dport`
    ThDport,
    /// `ct original ip saddr`
    CtOrigSaddr,
    /// `ct original ip daddr`
    CtOrigDaddr,
    /// `ct original proto-dst`
    CtOrigProtoDst,
    /// `numgen random mod N`: a slot number in `0..N`.
    Numgen(u32),
    /// `iifname`: the name of the interface the packet came in on.
    Iifname,
}

/// Element field types, with their wire length in bytes (before 4-byte register padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FieldType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
    /// A 32-bit integer that only a `typeof` declaration can name (numgen slots).
    Slot,
    /// An interface name (`ifname`, 16 bytes, NUL-padded).
    Ifname,
}

// A byte length, not a container: there is no emptiness to ask about.
#[allow(clippy::len_without_is_empty)]
impl FieldType {
    /// The address type of a family.
    pub fn addr(f: Family) -> FieldType {
        match f {
            Family::Ip => FieldType::Ipv4Addr,
            Family::Ip6 => FieldType::Ipv6Addr,
        }
    }
    /// Bytes on the wire (before register padding).
    pub fn len(self) -> usize {
        match self {
            FieldType::Ipv4Addr => 4,
            FieldType::Ipv6Addr => 16,
            FieldType::InetProto => 1,
            FieldType::InetService => 2,
            FieldType::Slot => 4,
            FieldType::Ifname => 16,
        }
    }
}

/// How a set declares its key or data: by type names or, when a component has no type name,
/// by the expressions it is matched with (`typeof`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Decl {
    Type(Vec<FieldType>),
    /// typeof: the fields whose values the key holds. A `Numgen` field is printed with the
    /// canonical modulus 65536.
    Typeof(Vec<Field>),
}

/// One component of an element key or value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Addr(IpAddr),
    /// A CIDR range; only in interval sets, and only as the last key component of a concatenation.
    Prefix(ipnet::IpNet),
    Proto(Proto),
    Port(u16),
    Slot(u32),
    /// An interface name; a trailing `*` makes it a prefix (only in interval sets).
    /// Boxed: a `String` would make every `Value` 32 bytes instead of 24, and a ruleset at
    /// 50,000 Services holds ~1.5 million of them (for a handful of interface names).
    Ifname(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    pub key: Vec<Value>,
    /// Map value; `None` for plain sets.
    pub value: Option<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SetFlags {
    pub interval: bool,
    /// Elements may carry a timeout and be added from the packet path (`update @set`).
    pub timeout: bool,
    /// Every element carries a counter (read back for drop/reject statistics).
    pub counter: bool,
}

/// A named set or map. Elements are held separately (see [`Table::elements`]) so that a skeleton
/// comparison never has to look at them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetDef {
    pub key: Decl,
    pub data: Option<Decl>,
    pub flags: SetFlags,
    /// Maximum number of elements (nft gives sets filled from the packet path 65535 by default).
    pub size: Option<u32>,
    /// Elements written into the set by nft itself at creation (small constant sets).
    pub constant: bool,
}

impl SetDef {
    /// A set keyed by `key`, without data, flags or size.
    pub fn plain(key: Decl) -> SetDef {
        SetDef {
            key,
            data: None,
            flags: SetFlags::default(),
            size: None,
            constant: false,
        }
    }

    /// Elements of timeout sets are written by the packet path (affinity), not by nftproxy:
    /// plans never add or remove them.
    pub fn runtime_owned(&self) -> bool {
        self.flags.timeout
    }
}

/// A condition of a rule. All conditions of a rule must hold for its action to run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `ct state new`
    CtStateNew,
    /// `ct status dnat`
    CtStatusDnat,
    /// `<key> @set` or `<key> != @set`
    Lookup {
        key: Vec<Field>,
        set: String,
        negate: bool,
    },
    /// `fib daddr type local`
    FibDaddrLocal,
    /// `fib saddr type local`
    FibSaddrLocal,
    /// `meta mark & BITS == 0x00000000`
    MarkUnset(u32),
    /// `meta l4proto tcp`: gives nft the protocol context `ct original proto-dst` needs.
    L4protoIs(Proto),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Jump(String),
    Goto(String),
    Return,
    Drop,
    Reject,
    /// `meta mark set meta mark | BITS`
    MarkOr(u32),
    /// `meta mark set meta mark ^ BITS`
    MarkXor(u32),
    /// `masquerade fully-random`
    Masquerade,
    /// `dnat ip to <key> map @map` (the map's value is address . port)
    DnatMap {
        key: Vec<Field>,
        map: String,
    },
    /// `update @set { <key> timeout Ns : <value> }`
    UpdateTimeout {
        set: String,
        key: Vec<Field>,
        timeout_secs: u32,
        value: Vec<Field>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// The elements of one set. A persistent (structurally shared) set: a copy of a 250,000-element
/// set costs nothing, and the diff of two versions that share structure only visits what
/// changed, so the sync loop can keep the applied ruleset and diff it against the desired one
/// in time proportional to the change.
pub type Elements = imbl::OrdSet<Element>;

/// One nftables table as nftproxy wants it: the skeleton (chains, set declarations) plus the
/// elements of every set. `BTreeMap`s keep rendering and diffs deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub sets: BTreeMap<String, SetDef>,
    pub chains: BTreeMap<String, Chain>,
    pub elements: BTreeMap<String, Elements>,
}

/// The ruleset nftproxy owns: one table per family it serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub tables: BTreeMap<Family, Table>,
}

pub const TABLE_NAME: &str = "nftproxy";
