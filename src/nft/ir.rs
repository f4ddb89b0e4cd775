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

/// A set element: its key and, in a map, its value.
///
/// Both live in one exactly sized allocation, the key's components followed by the value's: a
/// ruleset holds one element per endpoint (1.26 million at 5,000 Services x 250 endpoints), and
/// as a key and a value with a heap block each, an element cost 48 bytes in its set's tree
/// node plus two blocks (two allocations and frees per element built, copied or dropped).
/// Ordered by key, then value (`None` first), as a (key, value) pair would be.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Element {
    parts: Box<[Value]>,
    /// How many of `parts` are the key (keys have at most four components; a u32 keeps the
    /// element at 24 bytes all the same).
    key_len: u32,
    /// Whether the element has a value (a map's element), even an empty one.
    map: bool,
}

impl Element {
    /// An element of a plain set.
    pub fn set(key: &[Value]) -> Element {
        Element::build(key, None)
    }

    /// An element of a map.
    pub fn map(key: &[Value], value: &[Value]) -> Element {
        Element::build(key, Some(value))
    }

    /// An element from a key and an optional value, as they are often built.
    pub fn new(key: Vec<Value>, value: Option<Vec<Value>>) -> Element {
        Element::build(&key, value.as_deref())
    }

    /// An element from borrowed parts (one allocation: the element's own).
    pub fn build(key: &[Value], value: Option<&[Value]>) -> Element {
        // A key of more than u32::MAX values cannot be allocated in the first place.
        let key_len = key.len() as u32;
        let parts: Box<[Value]> = key
            .iter()
            .chain(value.unwrap_or_default())
            .cloned()
            .collect();
        Element {
            parts,
            key_len,
            map: value.is_some(),
        }
    }

    pub fn key(&self) -> &[Value] {
        &self.parts[..self.key_len as usize]
    }

    /// The map value; `None` for plain sets.
    pub fn value(&self) -> Option<&[Value]> {
        self.map.then(|| &self.parts[self.key_len as usize..])
    }

    /// The same key with another value (or none).
    pub fn with_value(&self, value: Option<&[Value]>) -> Element {
        Element::build(self.key(), value)
    }
}

impl Ord for Element {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key()
            .cmp(other.key())
            .then_with(|| self.value().cmp(&other.value()))
    }
}

impl PartialOrd for Element {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Debug for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Element")
            .field("key", &self.key())
            .field("value", &self.value())
            .finish()
    }
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
