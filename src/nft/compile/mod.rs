//! ProxyState -> Ruleset. Pure and deterministic.
//!
//! The skeleton comes from `nft-templates/skeleton.nft`; per-service state becomes set and map
//! elements. The only state-dependent skeleton parts are one set + one rule per endpoint count in
//! use (`numgen random mod N` needs N in the rule) and per ClientIP affinity timeout in use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::OnceLock;

use ipnet::IpNet;

use super::ir::{
    Action, Chain, Decl, Element, Family, Field, FieldType, Match, Proto, Rule, Ruleset, SetDef,
    Table, Value,
};
use super::template::{self, Template};
use crate::proxy::{Backend, PortState, ProxyState};

/// The node-level settings compile needs (from flags and the Node object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileConfig {
    /// `1 << --masquerade-bit`.
    pub masquerade_mark: u32,
    pub masquerade_all: bool,
    /// `--cluster-cidr`: pod CIDRs of all families.
    pub cluster_cidrs: Vec<IpNet>,
    /// Addresses accepting NodePorts, per family (already resolved from `--nodeport-addresses`).
    pub nodeport_cidrs: Vec<IpNet>,
    /// This node's addresses (source-range allowance for LB IPs).
    pub node_ips: Vec<IpAddr>,
    /// Families to program.
    pub families: Vec<Family>,
}

impl Default for CompileConfig {
    fn default() -> Self {
        CompileConfig {
            masquerade_mark: 1 << 14,
            masquerade_all: false,
            cluster_cidrs: Vec::new(),
            nodeport_cidrs: Vec::new(),
            node_ips: Vec::new(),
            families: vec![Family::Ip, Family::Ip6],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Template(#[from] template::TemplateError),
}

/// The mark constant the skeleton text uses for the masquerade bit.
const TEMPLATE_MASQ_MARK: u32 = 0x4000;

/// Endpoint counts whose pick rules always exist, so that typical scale changes stay element-only.
pub const PRESET_COUNTS: std::ops::RangeInclusive<usize> = 1..=8;

fn skeleton() -> Result<&'static Template, CompileError> {
    static SKELETON: OnceLock<Result<Template, template::TemplateError>> = OnceLock::new();
    SKELETON
        .get_or_init(|| template::parse(template::SKELETON))
        .as_ref()
        .map_err(|e| CompileError::Template(e.clone()))
}

impl Clone for template::TemplateError {
    fn clone(&self) -> Self {
        template::TemplateError {
            line: self.line,
            msg: self.msg.clone(),
        }
    }
}

/// The four endpoint-choice paths: entry kind (address entry / NodePort) x endpoint set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Pick {
    IpCluster,
    IpLocal,
    NpCluster,
    NpLocal,
}

impl Pick {
    const ALL: [Pick; 4] = [
        Pick::IpCluster,
        Pick::IpLocal,
        Pick::NpCluster,
        Pick::NpLocal,
    ];
    fn stem(self) -> &'static str {
        match self {
            Pick::IpCluster => "ip-cluster",
            Pick::IpLocal => "ip-local",
            Pick::NpCluster => "np-cluster",
            Pick::NpLocal => "np-local",
        }
    }
    fn chain(self) -> String {
        format!("pick-{}", self.stem())
    }
    fn count_set(self, n: usize) -> String {
        format!("{}-n{n}", self.stem())
    }
    fn backends(self) -> String {
        format!("{}-backends", self.stem())
    }
    fn nodeport(self) -> bool {
        matches!(self, Pick::NpCluster | Pick::NpLocal)
    }
    fn entry_key(self) -> Vec<Field> {
        if self.nodeport() {
            vec![Field::L4proto, Field::ThDport]
        } else {
            vec![Field::Daddr, Field::L4proto, Field::ThDport]
        }
    }
}

fn entry_types(f: Family, nodeport: bool) -> Vec<FieldType> {
    if nodeport {
        vec![FieldType::InetProto, FieldType::InetService]
    } else {
        vec![f.addr_type(), FieldType::InetProto, FieldType::InetService]
    }
}

fn plain_set(types: Vec<FieldType>) -> SetDef {
    SetDef::plain(Decl::Type(types))
}

/// Builds one family's table.
struct Builder {
    family: Family,
    table: Table,
    /// Endpoint counts in use per pick path.
    counts: BTreeMap<Pick, BTreeSet<usize>>,
    /// Affinity timeouts in use (address entries / NodePorts).
    affinity: BTreeMap<bool, BTreeSet<u32>>,
    /// Entry points already taken, and by whom: two Services claiming the same address:port
    /// (or NodePort) is bad input; the first keeps it, the later one is reported and skipped
    /// rather than turning into duplicate elements that would fail every commit.
    claimed: BTreeMap<Vec<Value>, crate::model::PortKey>,
    problems: Vec<crate::model::Problem>,
}

impl Builder {
    fn add(&mut self, set: &str, key: Vec<Value>, value: Option<Vec<Value>>) {
        self.table
            .elements
            .entry(set.to_string())
            .or_default()
            .insert(Element { key, value });
    }

    fn entry_key(&self, addr: Option<IpAddr>, proto: Proto, port: u16) -> Vec<Value> {
        let mut k = Vec::with_capacity(3);
        if let Some(a) = addr {
            k.push(Value::Addr(a));
        }
        k.push(Value::Proto(proto));
        k.push(Value::Port(port));
        k
    }

    /// Put an entry on a pick path: its count set and its slots.
    fn pick(&mut self, pick: Pick, entry: &[Value], backends: &[Backend]) {
        let n = backends.len();
        self.counts.entry(pick).or_default().insert(n);
        self.add(&pick.count_set(n), entry.to_vec(), None);
        let map = pick.backends();
        for (slot, (ip, port)) in backends.iter().enumerate() {
            let mut k = entry.to_vec();
            k.push(Value::Slot(slot as u32));
            self.add(&map, k, Some(vec![Value::Addr(*ip), Value::Port(*port)]));
        }
    }

    /// Take an entry point for `sp`; false (and a problem) when another port has it.
    fn claim(&mut self, entry: &[Value], sp: &crate::model::ServicePort) -> bool {
        match self.claimed.get(entry) {
            Some(owner) if *owner != sp.key => {
                let what = entry
                    .iter()
                    .map(super::render::value)
                    .collect::<Vec<_>>()
                    .join(" . ");
                self.problems.push(crate::model::Problem {
                    object: format!("Service {}", sp.key.service),
                    reason: format!("entry {what} is already used by {owner}; skipped"),
                });
                false
            }
            _ => {
                self.claimed.insert(entry.to_vec(), sp.key.clone());
                true
            }
        }
    }

    fn port(&mut self, ps: &PortState, cfg: &CompileConfig) {
        let sp = &ps.sp;
        let c = &ps.chosen;
        let proto = sp.key.proto;
        let cip = self.entry_key(Some(sp.cluster_ip), proto, sp.port);
        if !self.claim(&cip, sp) {
            return;
        }
        self.add("cluster-ips", vec![Value::Addr(sp.cluster_ip)], None);

        // ClusterIP: internal traffic policy decides the endpoint set.
        if sp.internal_local {
            self.add("clusterip-local", cip.clone(), None);
            if !c.local.is_empty() {
                self.pick(Pick::IpLocal, &cip, &c.local);
            } else if c.has_any {
                self.add("no-endpoint-drop", cip.clone(), None);
            } else {
                self.add("no-endpoint-reject", cip.clone(), None);
            }
        } else {
            self.add("clusterip", cip.clone(), None);
            if !c.cluster.is_empty() {
                self.pick(Pick::IpCluster, &cip, &c.cluster);
            } else {
                self.add("no-endpoint-reject", cip.clone(), None);
            }
        }

        // External entries: externalIPs, LB IPs, NodePort.
        let mut externals: Vec<(Vec<Value>, bool)> = sp
            .external_ips
            .iter()
            .chain(sp.lb_ips.iter())
            .map(|ip| (self.entry_key(Some(*ip), proto, sp.port), false))
            .collect();
        if let Some(np) = sp.node_port {
            externals.push((self.entry_key(None, proto, np), true));
        }
        externals.retain(|(entry, _)| self.claim(entry, sp));
        for (entry, nodeport) in &externals {
            let (cluster_pick, local_pick) = if *nodeport {
                (Pick::NpCluster, Pick::NpLocal)
            } else {
                (Pick::IpCluster, Pick::IpLocal)
            };
            let (reject, drop) = if *nodeport {
                ("nodeport-no-endpoint-reject", "nodeport-no-endpoint-drop")
            } else {
                ("no-endpoint-reject", "no-endpoint-drop")
            };
            let class = match (*nodeport, sp.external_local) {
                (false, false) => "external",
                (false, true) => "external-local",
                (true, false) => "nodeport",
                (true, true) => "nodeport-local",
            };
            self.add(class, entry.clone(), None);
            if c.cluster.is_empty() {
                self.add(reject, entry.clone(), None);
                continue;
            }
            self.pick(cluster_pick, entry, &c.cluster);
            if sp.external_local {
                if c.local.is_empty() {
                    self.add(drop, entry.clone(), None);
                } else {
                    self.pick(local_pick, entry, &c.local);
                }
            }
        }

        // Source ranges guard LB IPs only.
        if !sp.source_ranges.is_empty() {
            let allow_node = sp
                .source_ranges
                .iter()
                .any(|r| cfg.node_ips.iter().any(|ip| r.contains(ip)));
            for lb in &sp.lb_ips {
                let entry = self.entry_key(Some(*lb), proto, sp.port);
                self.add("firewall", entry.clone(), None);
                let mut ranges: Vec<IpNet> = sp.source_ranges.clone();
                if allow_node {
                    ranges.push(IpNet::from(*lb));
                }
                for r in IpNet::aggregate(&ranges) {
                    let mut k = entry.clone();
                    k.push(Value::Prefix(r));
                    self.add("firewall-allow", k, None);
                }
            }
        }

        if let Some(t) = sp.affinity_secs {
            self.affinity.entry(false).or_default().insert(t);
            let set = format!("ip-affinity-t{t}");
            self.add(&set, cip, None);
            for (entry, nodeport) in externals {
                if nodeport {
                    self.affinity.entry(true).or_default().insert(t);
                    self.add(&format!("np-affinity-t{t}"), entry, None);
                } else {
                    self.add(&set, entry, None);
                }
            }
        }

        for ip in &ps.local_ips {
            self.add("hairpin", vec![Value::Addr(*ip), Value::Addr(*ip)], None);
        }
    }
}

fn family_nets(f: Family, nets: &[IpNet]) -> Vec<IpNet> {
    let v: Vec<IpNet> = nets
        .iter()
        .filter(|n| {
            matches!(
                (n, f),
                (IpNet::V4(_), Family::Ip) | (IpNet::V6(_), Family::Ip6)
            )
        })
        .map(|n| n.trunc())
        .collect();
    IpNet::aggregate(&v)
}

/// Remove `hole` from `nets` (NodePorts never listen on loopback).
pub fn subtract(nets: &[IpNet], hole: &IpNet) -> Vec<IpNet> {
    let mut out = Vec::new();
    let mut todo: Vec<IpNet> = nets.to_vec();
    while let Some(n) = todo.pop() {
        if hole.contains(&n) {
            continue;
        }
        if !n.contains(hole) {
            out.push(n);
            continue;
        }
        match n.subnets(n.prefix_len() + 1) {
            Ok(halves) => todo.extend(halves),
            Err(_) => out.push(n),
        }
    }
    IpNet::aggregate(&out)
}

fn loopback(f: Family) -> IpNet {
    match f {
        Family::Ip => IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default(),
        ),
        Family::Ip6 => {
            IpNet::V6(ipnet::Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).unwrap_or_default())
        }
    }
}

fn instantiate_skeleton(f: Family, cfg: &CompileConfig, tpl: &Template) -> Table {
    let mut t = Table::default();
    let has_cluster_cidr = cfg.cluster_cidrs.iter().any(|n| {
        matches!(
            (n, f),
            (IpNet::V4(_), Family::Ip) | (IpNet::V6(_), Family::Ip6)
        )
    });
    let holds = |name: &str| match name {
        "masquerade-all" => cfg.masquerade_all,
        "cluster-cidr" => has_cluster_cidr,
        _ => false,
    };
    for s in &tpl.sets {
        let mut def = s.def.clone();
        if let Decl::Type(ts) = &mut def.key {
            for x in ts.iter_mut() {
                if *x == FieldType::Ipv4Addr {
                    *x = f.addr_type();
                }
            }
        }
        if let Some(Decl::Type(ts)) = &mut def.data {
            for x in ts.iter_mut() {
                if *x == FieldType::Ipv4Addr {
                    *x = f.addr_type();
                }
            }
        }
        t.sets.insert(s.name.clone(), def);
        if !s.elements.is_empty() {
            t.elements.insert(
                s.name.clone(),
                s.elements
                    .iter()
                    .map(|k| Element {
                        key: k.clone(),
                        value: None,
                    })
                    .collect(),
            );
        }
    }
    let mark = |b: u32| {
        if b == TEMPLATE_MASQ_MARK {
            cfg.masquerade_mark
        } else {
            b
        }
    };
    for c in &tpl.chains {
        let rules = c
            .rules
            .iter()
            .filter(|r| r.when.iter().all(|cond| holds(&cond.name) != cond.negate))
            .map(|r| {
                let mut rule = r.rule.clone();
                for m in rule.matches.iter_mut() {
                    if let Match::MarkUnset(b) = m {
                        *b = mark(*b);
                    }
                }
                rule.action = match rule.action {
                    Action::MarkOr(b) => Action::MarkOr(mark(b)),
                    Action::MarkXor(b) => Action::MarkXor(mark(b)),
                    other => other,
                };
                rule
            })
            .collect();
        t.chains.insert(
            c.name.clone(),
            Chain {
                base: c.base.clone(),
                rules,
            },
        );
    }
    t
}

/// The definition of the affinity maps (as the skeleton declares them).
pub fn affinity_def(f: Family, nodeport: bool) -> SetDef {
    let name = if nodeport {
        "np-affinity"
    } else {
        "ip-affinity"
    };
    match skeleton()
        .ok()
        .and_then(|t| t.sets.iter().find(|s| s.name == name))
    {
        Some(s) => {
            let t = instantiate_skeleton(
                f,
                &CompileConfig::default(),
                &Template {
                    sets: vec![s.clone()],
                    chains: vec![],
                },
            );
            t.sets.get(name).cloned().unwrap_or_else(|| s.def.clone())
        }
        None => plain_set(vec![]),
    }
}

/// Compile the desired ruleset.
pub fn compile(state: &ProxyState, cfg: &CompileConfig) -> Result<Ruleset, CompileError> {
    compile_checked(state, cfg).map(|(rs, _)| rs)
}

/// Compile, also returning the conflicts found (entry points claimed by two Services).
pub fn compile_checked(
    state: &ProxyState,
    cfg: &CompileConfig,
) -> Result<(Ruleset, Vec<crate::model::Problem>), CompileError> {
    let tpl = skeleton()?;
    let mut rs = Ruleset::default();
    let mut problems = Vec::new();
    for &f in &cfg.families {
        let mut b = Builder {
            family: f,
            table: instantiate_skeleton(f, cfg, tpl),
            counts: BTreeMap::new(),
            affinity: BTreeMap::new(),
            claimed: BTreeMap::new(),
            problems: Vec::new(),
        };
        for n in PRESET_COUNTS {
            for p in Pick::ALL {
                b.counts.entry(p).or_default().insert(n);
            }
        }
        for net in family_nets(f, &cfg.cluster_cidrs) {
            b.add("cluster-cidrs", vec![Value::Prefix(net)], None);
        }
        for net in subtract(&family_nets(f, &cfg.nodeport_cidrs), &loopback(f)) {
            b.add("nodeport-addrs", vec![Value::Prefix(net)], None);
        }
        if let Some(fs) = state.families.get(&f) {
            for net in family_nets(f, &fs.service_cidrs) {
                b.add("service-cidrs", vec![Value::Prefix(net)], None);
            }
            for ps in fs.ports.values() {
                b.port(ps, cfg);
            }
        }
        b.finish();
        problems.append(&mut b.problems);
        rs.tables.insert(f, b.table);
    }
    Ok((rs, problems))
}

impl Builder {
    /// Add the count sets and pick rules, and the affinity timeout sets and update rules.
    fn finish(&mut self) {
        let f = self.family;
        for (pick, counts) in &self.counts {
            let types = entry_types(f, pick.nodeport());
            let chain = pick.chain();
            for &n in counts {
                if n == 0 {
                    continue;
                }
                let set = pick.count_set(n);
                self.table
                    .sets
                    .insert(set.clone(), plain_set(types.clone()));
                let mut key = pick.entry_key();
                key.push(Field::Numgen(n as u32));
                let rule = Rule {
                    matches: vec![
                        Match::Lookup {
                            key: pick.entry_key(),
                            set,
                            negate: false,
                        },
                        Match::Lookup {
                            key: vec![Field::L4proto],
                            set: "l4protos".into(),
                            negate: false,
                        },
                    ],
                    action: Action::DnatMap {
                        key,
                        map: pick.backends(),
                    },
                };
                if let Some(c) = self.table.chains.get_mut(&chain) {
                    c.rules.push(rule);
                }
            }
        }
        for (nodeport, timeouts) in &self.affinity {
            for &t in timeouts {
                let (set, map) = if *nodeport {
                    (format!("np-affinity-t{t}"), "np-affinity")
                } else {
                    (format!("ip-affinity-t{t}"), "ip-affinity")
                };
                self.table
                    .sets
                    .insert(set.clone(), plain_set(entry_types(f, *nodeport)));
                let (entry, key) = if *nodeport {
                    (
                        vec![Field::L4proto, Field::CtOrigProtoDst],
                        vec![Field::CtOrigSaddr, Field::L4proto, Field::CtOrigProtoDst],
                    )
                } else {
                    (
                        vec![Field::CtOrigDaddr, Field::L4proto, Field::CtOrigProtoDst],
                        vec![
                            Field::CtOrigSaddr,
                            Field::CtOrigDaddr,
                            Field::L4proto,
                            Field::CtOrigProtoDst,
                        ],
                    )
                };
                // One rule per protocol: `ct original proto-dst` only has a type once nft knows
                // the protocol, and a named protocol set does not give it that.
                let mut rules = Vec::new();
                for proto in Proto::ALL {
                    let mut matches = vec![Match::L4protoIs(proto)];
                    if *nodeport {
                        matches.push(Match::Lookup {
                            key: vec![Field::CtOrigDaddr],
                            set: "nodeport-addrs".into(),
                            negate: false,
                        });
                    }
                    matches.push(Match::Lookup {
                        key: entry.clone(),
                        set: set.clone(),
                        negate: false,
                    });
                    rules.push(Rule {
                        matches,
                        action: Action::UpdateTimeout {
                            set: map.into(),
                            key: key.clone(),
                            timeout_secs: t,
                            value: vec![Field::Daddr, Field::ThDport],
                        },
                    });
                }
                if let Some(c) = self.table.chains.get_mut("affinity-update") {
                    c.rules.extend(rules);
                }
            }
        }
    }
}
