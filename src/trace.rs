//! A packet tracer over the ruleset IR: where does the first packet of a new connection go?
//!
//! It walks the base chains in hook and priority order the way the kernel does, evaluating every
//! match against the table's elements, and branches on `numgen` so that the answer is the SET
//! of possible outcomes (every endpoint a connection may land on). Tests use it to check the
//! semantics of what compile generated; `explain` uses the recorded path of each outcome (the
//! rules that matched and the set elements they looked up) to say why. It never looks at
//! compile's inputs.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::net::{Family, Proto};
use crate::nft::ir::{Action, ChainType, Element, Field, Hook, Match, Table, Value};

/// Where a packet comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Arrives on an interface (prerouting).
    Remote,
    /// Sent by a process on the node (output).
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub origin: Origin,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub dport: u16,
    /// The interface a remote packet came in on (`iifname`); empty for local ones.
    pub iif: String,
}

/// What happens to the packet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Delivered to `dst:port` (after DNAT if any); `masquerade` tells whether the source
    /// address was replaced by the node's.
    Accept {
        dst: IpAddr,
        port: u16,
        masquerade: bool,
    },
    Drop,
    Reject,
}

/// One rule that matched on the way, in the order the kernel ran them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub chain: String,
    /// The rule's position in its chain.
    pub rule: usize,
    /// The set lookups the rule made (all of them held): set name, the key looked up, negated.
    pub lookups: Vec<(String, Vec<Value>, bool)>,
    pub action: Action,
    /// For a DNAT through a map (or an affinity map): the element's key, and the endpoint.
    pub dnat: Option<(Vec<Value>, IpAddr, u16)>,
}

/// One possible outcome and the path that led to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traced {
    pub outcome: Outcome,
    pub path: Vec<Hop>,
}

#[derive(Debug, Clone)]
struct State {
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    mark: u32,
    dnat: bool,
    masq: bool,
    path: Vec<Hop>,
}

enum Flow {
    Return,
    Accept,
    Drop,
    Reject,
}

/// Elements written from the packet path (key -> value).
type RuntimeMap = BTreeMap<Vec<Value>, Vec<Value>>;

/// The tracer: a table, the node's local addresses, and the runtime state of timeout maps
/// (affinity entries written by earlier packets).
pub struct Tracer<'a> {
    family: Family,
    table: &'a Table,
    local: BTreeSet<IpAddr>,
    runtime: RefCell<BTreeMap<String, RuntimeMap>>,
}

const MAX_DEPTH: usize = 32;

impl<'a> Tracer<'a> {
    pub fn new(family: Family, table: &'a Table, local_addrs: &[IpAddr]) -> Self {
        let mut local: BTreeSet<IpAddr> = local_addrs.iter().copied().collect();
        local.insert(match family {
            Family::Ip => IpAddr::from([127, 0, 0, 1]),
            Family::Ip6 => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        });
        Tracer {
            family,
            table,
            local,
            runtime: RefCell::new(BTreeMap::new()),
        }
    }

    /// Every possible outcome of a new connection's first packet. Affinity entries written along
    /// the way are kept for later calls.
    pub fn trace(&self, p: &Packet) -> BTreeSet<Outcome> {
        self.trace_paths(p).into_iter().map(|t| t.outcome).collect()
    }

    /// Every possible outcome with the path that leads to it (one per numgen slot that leads
    /// somewhere, in slot order).
    pub fn trace_paths(&self, p: &Packet) -> Vec<Traced> {
        let st = State {
            src: p.src,
            dst: p.dst,
            port: p.dport,
            mark: 0,
            dnat: false,
            masq: false,
            path: Vec::new(),
        };
        let first: &[Hook] = match p.origin {
            Origin::Remote => &[Hook::Prerouting],
            Origin::Local => &[Hook::Output],
        };
        let mut out = Vec::new();
        for (flow, st) in self.hooks(first, st, p) {
            match flow {
                Some(o) => out.push(Traced {
                    outcome: o,
                    path: st.path,
                }),
                None => {
                    // Routing decision after DNAT.
                    let local_dst = self.local.contains(&st.dst);
                    let rest: Vec<Hook> = match (p.origin, local_dst) {
                        (Origin::Remote, true) => vec![Hook::Input],
                        (Origin::Remote, false) => vec![Hook::Forward, Hook::Postrouting],
                        (Origin::Local, true) => vec![Hook::Postrouting, Hook::Input],
                        (Origin::Local, false) => vec![Hook::Postrouting],
                    };
                    for (flow, st) in self.hooks(&rest, st, p) {
                        out.push(Traced {
                            outcome: flow.unwrap_or(Outcome::Accept {
                                dst: st.dst,
                                port: st.port,
                                masquerade: st.masq,
                            }),
                            path: st.path,
                        });
                    }
                }
            }
        }
        out
    }

    /// Run the base chains of `hooks` in order; `None` = accepted so far.
    fn hooks(&self, hooks: &[Hook], st: State, p: &Packet) -> Vec<(Option<Outcome>, State)> {
        let mut states = vec![(None, st)];
        for hook in hooks {
            let mut chains: Vec<(&String, i32, ChainType)> = self
                .table
                .chains
                .iter()
                .filter_map(|(n, c)| {
                    c.base
                        .as_ref()
                        .filter(|b| b.hook == *hook)
                        .map(|b| (n, b.priority, b.kind))
                })
                .collect();
            chains.sort_by_key(|(n, prio, _)| (*prio, (*n).clone()));
            for (name, _, kind) in chains {
                let mut next = Vec::new();
                for (done, st) in states {
                    if done.is_some() {
                        next.push((done, st));
                        continue;
                    }
                    let _ = kind; // every packet we trace is the first of a new connection
                    for (flow, st) in self.chain(name, 0, st, p, 0) {
                        let done = match flow {
                            Flow::Return | Flow::Accept => None,
                            Flow::Drop => Some(Outcome::Drop),
                            Flow::Reject => Some(Outcome::Reject),
                        };
                        next.push((done, st));
                    }
                }
                states = next;
            }
        }
        states
    }

    fn field(&self, f: &Field, st: &State, p: &Packet) -> Option<Value> {
        Some(match f {
            Field::Saddr => Value::Addr(st.src),
            Field::Daddr => Value::Addr(st.dst),
            Field::L4proto => Value::Proto(p.proto),
            Field::ThDport => Value::Port(st.port),
            Field::CtOrigSaddr => Value::Addr(p.src),
            Field::CtOrigDaddr => Value::Addr(p.dst),
            Field::CtOrigProtoDst => Value::Port(p.dport),
            Field::Numgen(_) => return None,
            Field::Iifname => Value::Ifname(p.iif.as_str().into()),
        })
    }

    fn key(&self, k: &[Field], st: &State, p: &Packet) -> Option<Vec<Value>> {
        k.iter().map(|f| self.field(f, st, p)).collect()
    }

    fn contains(&self, set: &str, key: &[Value]) -> bool {
        let Some(def) = self.table.sets.get(set) else {
            return false;
        };
        if def.runtime_owned() {
            return self
                .runtime
                .borrow()
                .get(set)
                .is_some_and(|m| m.contains_key(key));
        }
        let Some(els) = self.table.elements.get(set) else {
            return false;
        };
        if def.flags.interval {
            els.iter().any(|e| element_covers(e, key))
        } else {
            first_with_key(els, key).is_some()
        }
    }

    fn map_get(&self, map: &str, key: &[Value]) -> Option<Vec<Value>> {
        let def = self.table.sets.get(map)?;
        if def.runtime_owned() {
            return self
                .runtime
                .borrow()
                .get(map)
                .and_then(|m| m.get(key))
                .cloned();
        }
        first_with_key(self.table.elements.get(map)?, key)
            .and_then(|e| e.value().map(<[Value]>::to_vec))
    }

    fn matches(&self, m: &Match, st: &State, p: &Packet) -> bool {
        match m {
            Match::CtStateNew => true,
            Match::CtStatusDnat => st.dnat,
            Match::FibDaddrLocal => self.local.contains(&st.dst),
            Match::FibSaddrLocal => self.local.contains(&st.src),
            Match::MarkUnset(bits) => st.mark & bits == 0,
            Match::L4protoIs(proto) => p.proto == *proto,
            Match::Lookup { key, set, negate } => match self.key(key, st, p) {
                Some(k) => self.contains(set, &k) != *negate,
                None => false,
            },
        }
    }

    fn chain(
        &self,
        name: &str,
        from: usize,
        mut st: State,
        p: &Packet,
        depth: usize,
    ) -> Vec<(Flow, State)> {
        let Some(chain) = self.table.chains.get(name) else {
            return vec![(Flow::Drop, st)];
        };
        if depth > MAX_DEPTH {
            return vec![(Flow::Drop, st)];
        }
        for (i, rule) in chain.rules.iter().enumerate().skip(from) {
            if !rule.matches.iter().all(|m| self.matches(m, &st, p)) {
                continue;
            }
            st.path.push(Hop {
                chain: name.to_string(),
                rule: i,
                lookups: rule
                    .matches
                    .iter()
                    .filter_map(|m| match m {
                        Match::Lookup { key, set, negate } => {
                            self.key(key, &st, p).map(|k| (set.clone(), k, *negate))
                        }
                        _ => None,
                    })
                    .collect(),
                action: rule.action.clone(),
                dnat: None,
            });
            match &rule.action {
                Action::Jump(c) => {
                    let mut out = Vec::new();
                    for (flow, s) in self.chain(c, 0, st.clone(), p, depth + 1) {
                        match flow {
                            Flow::Return => out.extend(self.chain(name, i + 1, s, p, depth)),
                            other => out.push((other, s)),
                        }
                    }
                    return out;
                }
                Action::Goto(c) => return self.chain(c, 0, st, p, depth + 1),
                Action::Return => return vec![(Flow::Return, st)],
                Action::Drop => return vec![(Flow::Drop, st)],
                Action::Reject => return vec![(Flow::Reject, st)],
                Action::MarkOr(b) => st.mark |= b,
                Action::MarkXor(b) => st.mark ^= b,
                Action::Masquerade => {
                    st.masq = true;
                    return vec![(Flow::Accept, st)];
                }
                Action::DnatMap { key, map } => {
                    let slots: Vec<Option<u32>> = match key.iter().find_map(|f| {
                        if let Field::Numgen(n) = f {
                            Some(*n)
                        } else {
                            None
                        }
                    }) {
                        Some(n) => (0..n).map(Some).collect(),
                        None => vec![None],
                    };
                    let mut out = Vec::new();
                    for slot in slots {
                        let k: Option<Vec<Value>> = key
                            .iter()
                            .map(|f| match f {
                                Field::Numgen(_) => slot.map(Value::Slot),
                                other => self.field(other, &st, p),
                            })
                            .collect();
                        if let Some((k, v)) = k.and_then(|k| self.map_get(map, &k).map(|v| (k, v)))
                        {
                            if let [Value::Addr(a), Value::Port(port)] = v.as_slice() {
                                let mut s = st.clone();
                                s.dst = *a;
                                s.port = *port;
                                s.dnat = true;
                                if let Some(h) = s.path.last_mut() {
                                    h.dnat = Some((k, *a, *port));
                                }
                                out.push((Flow::Accept, s));
                            }
                        }
                    }
                    if !out.is_empty() {
                        return out;
                    }
                    // No element: the rule did nothing (the kernel's map lookup failed).
                    st.path.pop();
                }
                Action::UpdateTimeout {
                    set, key, value, ..
                } => {
                    if let (Some(k), Some(v)) = (self.key(key, &st, p), self.key(value, &st, p)) {
                        self.runtime
                            .borrow_mut()
                            .entry(set.clone())
                            .or_default()
                            .insert(k, v);
                    }
                }
            }
        }
        vec![(Flow::Return, st)]
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Forget runtime state (affinity entries), as if they had expired.
    pub fn expire(&self) {
        self.runtime.borrow_mut().clear();
    }
}

/// The element with this key (elements sort by key, then value, `None` first): a lookup in
/// log time, as the kernel's hash does it in constant time. `explain` traces over the applied
/// ruleset, which at 50k Services holds 400k elements.
fn first_with_key<'e>(els: &'e crate::nft::ir::Elements, key: &[Value]) -> Option<&'e Element> {
    els.range(Element::set(key)..)
        .next()
        .filter(|e| e.key() == key)
}

/// Interval membership: every component equal, except prefixes, which must contain the value.
fn element_covers(e: &Element, key: &[Value]) -> bool {
    e.key().len() == key.len()
        && e.key()
            .iter()
            .zip(key)
            .all(|(have, want)| match (have, want) {
                (Value::Prefix(net), Value::Addr(a)) => IpNet::contains(net, a),
                (Value::Ifname(p), Value::Ifname(n)) => match p.strip_suffix('*') {
                    Some(prefix) => n.starts_with(prefix),
                    None => p == n,
                },
                (a, b) => a == b,
            })
}
