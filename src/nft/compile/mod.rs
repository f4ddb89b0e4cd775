//! ProxyState -> Ruleset. Pure and deterministic.
//!
//! The skeleton comes from `nft-templates/skeleton.nft`; per-service state becomes set and map
//! elements. The only state-dependent skeleton parts are one set + one rule per endpoint count in
//! use (`numgen random mod N` needs N in the rule) and per ClientIP affinity timeout in use.

use crate::nft::names;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::OnceLock;

use rustc_hash::FxHashMap;

use ipnet::IpNet;

use super::ir::{
    Action, Chain, Decl, Element, Field, FieldType, Match, Rule, Ruleset, SetDef, Table, Value,
};
use super::template::{self, Template};
use crate::model::{PortKey, ServiceName};
use crate::net::{Family, Proto};
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
    /// Interfaces this node's pods send from (a bridge, or `"veth*"` for a name prefix): the
    /// interface detect-local modes; empty with the CIDR ones.
    pub local_ifaces: Vec<String>,
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
            local_ifaces: Vec::new(),
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
    /// The chain that picks among `n` backends: its one rule is the only one binding the
    /// backends map for that count (see `FamilyTable::finish`).
    fn count_chain(self, n: usize) -> String {
        format!("pick-{}-n{n}", self.stem())
    }
    fn backends(self) -> &'static str {
        match self {
            Pick::IpCluster => names::IP_CLUSTER_BACKENDS,
            Pick::IpLocal => names::IP_LOCAL_BACKENDS,
            Pick::NpCluster => names::NP_CLUSTER_BACKENDS,
            Pick::NpLocal => names::NP_LOCAL_BACKENDS,
        }
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
        vec![
            FieldType::addr(f),
            FieldType::InetProto,
            FieldType::InetService,
        ]
    }
}

fn plain_set(types: Vec<FieldType>) -> SetDef {
    SetDef::plain(Decl::Type(types))
}

/// A set's name: a constant for most sets, built for per-count and per-timeout ones.
type SetName = std::borrow::Cow<'static, str>;

/// What one service port puts into its family's table: elements, the pick rules and affinity
/// timeouts it needs. A pure function of the port's state, so
/// removing a port recomputes its old contribution instead of remembering it.
#[derive(Debug, Default)]
struct Contribution {
    /// Set names are mostly constants: no allocation per element for those.
    elements: Vec<(SetName, Element)>,
    counts: Vec<(Pick, usize)>,
    affinity: Vec<(bool, u32)>,
}

impl Contribution {
    fn add(&mut self, set: impl Into<SetName>, key: &[Value], value: Option<&[Value]>) {
        self.elements.push((set.into(), Element::build(key, value)));
    }

    /// Put an entry on a pick path: its count set and its slots.
    fn pick(&mut self, pick: Pick, entry: &[Value], backends: &[Backend]) {
        let n = backends.len();
        self.counts.push((pick, n));
        self.add(pick.count_set(n), entry, None);
        let map = pick.backends();
        // One key buffer for every slot: each element copies it into its own block.
        let mut k = Vec::with_capacity(entry.len() + 1);
        k.extend_from_slice(entry);
        k.push(Value::Slot(0));
        for (slot, (ip, port)) in backends.iter().enumerate() {
            if let Some(last) = k.last_mut() {
                *last = Value::Slot(slot as u32);
            }
            self.add(map, &k, Some(&[Value::Addr(*ip), Value::Port(*port)]));
        }
    }
}

fn entry_key(addr: Option<IpAddr>, proto: Proto, port: u16) -> Vec<Value> {
    let mut k = Vec::with_capacity(3);
    if let Some(a) = addr {
        k.push(Value::Addr(a));
    }
    k.push(Value::Proto(proto));
    k.push(Value::Port(port));
    k
}

/// The contribution of one service port. `claim` is asked for every entry point before it is
/// used and answers whether this port may have it.
fn contribute(
    ps: &PortState,
    cfg: &CompileConfig,
    claim: &mut dyn FnMut(&[Value], &PortKey) -> bool,
) -> Contribution {
    let mut out = Contribution::default();
    let sp = &ps.sp;
    let c = &ps.chosen;
    let proto = sp.key.proto;
    let cip = entry_key(Some(sp.cluster_ip), proto, sp.port);
    if !claim(&cip, &sp.key) {
        return out;
    }
    out.add(names::CLUSTER_IPS, &[Value::Addr(sp.cluster_ip)], None);

    // ClusterIP: internal traffic policy decides the endpoint set.
    if sp.internal_local {
        out.add(names::CLUSTERIP_LOCAL, &cip, None);
        if !c.local.is_empty() {
            out.pick(Pick::IpLocal, &cip, &c.local);
        } else if c.has_any {
            out.add(names::NO_ENDPOINT_DROP, &cip, None);
        } else {
            out.add(names::NO_ENDPOINT_REJECT, &cip, None);
        }
    } else {
        out.add(names::CLUSTERIP, &cip, None);
        if !c.cluster.is_empty() {
            out.pick(Pick::IpCluster, &cip, &c.cluster);
        } else {
            out.add(names::NO_ENDPOINT_REJECT, &cip, None);
        }
    }

    // External entries: externalIPs, LB IPs, NodePort.
    // Each with whether it is a NodePort, and the LB IP when it is one (source ranges guard
    // those only).
    let mut externals: Vec<(Vec<Value>, bool, Option<IpAddr>)> = sp
        .external_ips
        .iter()
        .map(|ip| (entry_key(Some(*ip), proto, sp.port), false, None))
        .chain(
            sp.lb_ips
                .iter()
                .map(|ip| (entry_key(Some(*ip), proto, sp.port), false, Some(*ip))),
        )
        .collect();
    if let Some(np) = sp.node_port {
        externals.push((entry_key(None, proto, np), true, None));
    }
    externals.retain(|(entry, _, _)| claim(entry, &sp.key));
    for (entry, nodeport, _) in &externals {
        let (cluster_pick, local_pick) = if *nodeport {
            (Pick::NpCluster, Pick::NpLocal)
        } else {
            (Pick::IpCluster, Pick::IpLocal)
        };
        let (reject, drop) = if *nodeport {
            (
                names::NODEPORT_NO_ENDPOINT_REJECT,
                names::NODEPORT_NO_ENDPOINT_DROP,
            )
        } else {
            (names::NO_ENDPOINT_REJECT, names::NO_ENDPOINT_DROP)
        };
        let class = match (*nodeport, sp.external_local) {
            (false, false) => names::EXTERNAL,
            (false, true) => names::EXTERNAL_LOCAL,
            (true, false) => names::NODEPORT,
            (true, true) => names::NODEPORT_LOCAL,
        };
        out.add(class, entry, None);
        if c.cluster.is_empty() {
            out.add(reject, entry, None);
            continue;
        }
        out.pick(cluster_pick, entry, &c.cluster);
        if sp.external_local {
            if c.local.is_empty() {
                out.add(drop, entry, None);
            } else {
                out.pick(local_pick, entry, &c.local);
            }
        }
    }

    // Source ranges guard LB IPs only, and only those this port won: the ranges of a Service
    // that lost an LB IP:port to another must not apply to the winner's traffic (and would
    // overlap the winner's intervals, which the kernel refuses, failing every commit).
    if !sp.source_ranges.is_empty() {
        let allow_node = sp
            .source_ranges
            .iter()
            .any(|r| cfg.node_ips.iter().any(|ip| r.contains(ip)));
        for (entry, _, lb) in &externals {
            let Some(lb) = lb else {
                continue;
            };
            out.add(names::FIREWALL, entry, None);
            let mut ranges: Vec<IpNet> = sp.source_ranges.clone();
            if allow_node {
                ranges.push(IpNet::from(*lb));
            }
            for r in IpNet::aggregate(&ranges) {
                let mut k = Vec::with_capacity(entry.len() + 1);
                k.extend_from_slice(entry);
                k.push(Value::Prefix(r));
                out.add(names::FIREWALL_ALLOW, &k, None);
            }
        }
    }

    if let Some(t) = sp.affinity_secs {
        out.affinity.push((false, t));
        let set = format!("ip-affinity-t{t}");
        out.add(set.clone(), &cip, None);
        for (entry, nodeport, _) in externals {
            if nodeport {
                out.affinity.push((true, t));
                out.add(format!("np-affinity-t{t}"), &entry, None);
            } else {
                out.add(set.clone(), &entry, None);
            }
        }
    }

    for ip in &ps.local_ips {
        out.add(names::HAIRPIN, &[Value::Addr(*ip), Value::Addr(*ip)], None);
    }
    out
}

/// One family's table plus the bookkeeping that lets it change one Service at a time.
#[derive(Debug, Clone)]
struct FamilyTable {
    family: Family,
    table: Table,
    /// Rules of the chains that get generated rules appended (pick paths, affinity updates).
    base_rules: BTreeMap<String, Vec<Rule>>,
    /// Users of each endpoint count per pick path (the presets hold one use forever).
    counts: BTreeMap<(Pick, usize), usize>,
    /// Users of each affinity timeout (address entries / NodePorts).
    affinity: BTreeMap<(bool, u32), usize>,
    /// Elements wanted more than once (one cluster IP for several ports, one endpoint IP in
    /// several Services' hairpin lists): the uses beyond the first.
    dups: FxHashMap<(SetName, Element), u32>,
    /// While compiling everything: entry points and the port owning each. Two Services claiming
    /// the same address:port (or NodePort) is bad input; the first (in port order) keeps it, the
    /// later one is reported and skipped rather than turning into duplicate elements that would
    /// fail every commit. Emptied afterwards: later changes find an entry's owner in the entry
    /// class sets (`entry_taken`), so the map does not cost memory for the agent's lifetime.
    claims: HashMap<Vec<Value>, PortKey>,
    /// Services involved in such a conflict: a change to one of them is compiled from scratch,
    /// because who wins depends on every claimant.
    contested: BTreeSet<ServiceName>,
    problems: Vec<crate::model::Problem>,
    /// Generated rules (count sets, affinity sets) must be rebuilt.
    rules_dirty: bool,
}

impl FamilyTable {
    fn new(f: Family, cfg: &CompileConfig, tpl: &Template, service_cidrs: &[IpNet]) -> Self {
        let table = instantiate_skeleton(f, cfg, tpl);
        let base_rules = Pick::ALL
            .iter()
            .map(|p| p.chain())
            .chain(std::iter::once(AFFINITY_CHAIN.to_string()))
            .filter_map(|c| table.chains.get(&c).map(|ch| (c, ch.rules.clone())))
            .collect();
        let mut ft = FamilyTable {
            family: f,
            table,
            base_rules,
            counts: BTreeMap::new(),
            affinity: BTreeMap::new(),
            dups: FxHashMap::default(),
            claims: HashMap::new(),
            contested: BTreeSet::new(),
            problems: Vec::new(),
            rules_dirty: true,
        };
        for n in PRESET_COUNTS {
            for p in Pick::ALL {
                ft.counts.insert((p, n), 1);
            }
        }
        for net in family_nets(f, &cfg.cluster_cidrs) {
            ft.insert(names::CLUSTER_CIDRS, vec![Value::Prefix(net)]);
        }
        for net in subtract(&family_nets(f, &cfg.nodeport_cidrs), &loopback(f)) {
            ft.insert(names::NODEPORT_ADDRS, vec![Value::Prefix(net)]);
        }
        for net in family_nets(f, service_cidrs) {
            ft.insert(names::SERVICE_CIDRS, vec![Value::Prefix(net)]);
        }
        for name in &cfg.local_ifaces {
            ft.insert(
                names::LOCAL_IFACES,
                vec![Value::Ifname(name.as_str().into())],
            );
        }
        ft
    }

    fn insert(&mut self, set: &'static str, key: Vec<Value>) {
        self.add_element(SetName::Borrowed(set), Element::set(&key));
    }

    fn add_element(&mut self, set: SetName, e: Element) {
        let els = match self.table.elements.get_mut(&*set) {
            Some(els) => els,
            None => self.table.elements.entry(set.to_string()).or_default(),
        };
        // One lookup: insert hands back the element it replaced (equal to `e`).
        if let Some(e) = els.insert(e) {
            *self.dups.entry((set, e)).or_default() += 1;
        }
    }

    fn remove_element(&mut self, set: SetName, e: Element) {
        let key = (set, e);
        if let Some(n) = self.dups.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.dups.remove(&key);
            }
            return;
        }
        let (set, e) = key;
        if let Some(els) = self.table.elements.get_mut(&*set) {
            els.remove(&e);
            // An emptied set has no entry, exactly as if it had never been filled.
            if els.is_empty() {
                self.table.elements.remove(&*set);
            }
        }
    }

    fn add(&mut self, c: Contribution) {
        for (set, e) in c.elements {
            self.add_element(set, e);
        }
        for k in c.counts {
            let n = self.counts.entry(k).or_default();
            *n += 1;
            self.rules_dirty |= *n == 1;
        }
        for k in c.affinity {
            let n = self.affinity.entry(k).or_default();
            *n += 1;
            self.rules_dirty |= *n == 1;
        }
    }

    fn remove(&mut self, c: Contribution) {
        for (set, e) in c.elements {
            self.remove_element(set, e);
        }
        for k in c.counts {
            if let Some(n) = self.counts.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&k);
                    self.rules_dirty = true;
                }
            }
        }
        for k in c.affinity {
            if let Some(n) = self.affinity.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.affinity.remove(&k);
                    self.rules_dirty = true;
                }
            }
        }
    }

    /// Compile a port for the full fold: first claimant wins, conflicts are reported.
    fn fold_port(&mut self, ps: &PortState, cfg: &CompileConfig) {
        let (claims, problems, contested) =
            (&mut self.claims, &mut self.problems, &mut self.contested);
        let c = contribute(ps, cfg, &mut |entry, port| {
            match claims.get(entry) {
                Some(owner) if owner != port => {
                    let what = entry
                        .iter()
                        .map(super::render::value)
                        .collect::<Vec<_>>()
                        .join(" . ");
                    problems.push(crate::model::Problem {
                        object: crate::model::ObjectRef::new(
                            "Service",
                            &port.service.namespace,
                            &port.service.name,
                        ),
                        reason: format!("entry {what} is already used by {owner}; skipped"),
                    });
                    contested.insert(owner.service.clone());
                    contested.insert(port.service.clone());
                    false
                }
                _ => {
                    // Taken at once: a later entry of this same port must see it.
                    claims.insert(entry.to_vec(), port.clone());
                    true
                }
            }
        });
        self.add(c);
    }

    /// Whether some port already uses this entry point: every claimed entry is in one of the
    /// entry class sets.
    fn entry_taken(&self, entry: &[Value]) -> bool {
        let classes: &[&str] = if matches!(entry.first(), Some(Value::Addr(_))) {
            &[
                names::CLUSTERIP,
                names::CLUSTERIP_LOCAL,
                names::EXTERNAL,
                names::EXTERNAL_LOCAL,
            ]
        } else {
            &[names::NODEPORT, names::NODEPORT_LOCAL]
        };
        let probe = Element::set(entry);
        classes.iter().any(|c| {
            self.table
                .elements
                .get(*c)
                .is_some_and(|els| els.contains(&probe))
        })
    }
}

const AFFINITY_CHAIN: &str = names::AFFINITY_UPDATE;

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
        "local-iface" => !cfg.local_ifaces.is_empty(),
        _ => false,
    };
    for s in &tpl.sets {
        let mut def = s.def.clone();
        if let Decl::Type(ts) = &mut def.key {
            for x in ts.iter_mut() {
                if *x == FieldType::Ipv4Addr {
                    *x = FieldType::addr(f);
                }
            }
        }
        if let Some(Decl::Type(ts)) = &mut def.data {
            for x in ts.iter_mut() {
                if *x == FieldType::Ipv4Addr {
                    *x = FieldType::addr(f);
                }
            }
        }
        t.sets.insert(s.name.clone(), def);
        if !s.elements.is_empty() {
            t.elements.insert(
                s.name.clone(),
                s.elements.iter().map(|k| Element::set(k)).collect(),
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

/// The keys a service port's entry points have in the entry sets: address . protocol . port
/// for its ClusterIP, external IPs and LB IPs, and protocol . NodePort.
pub fn entry_keys(sp: &crate::model::ServicePort) -> impl Iterator<Item = Vec<Value>> + '_ {
    let proto = Value::Proto(sp.key.proto);
    let by_ip = std::iter::once(&sp.cluster_ip)
        .chain(&sp.external_ips)
        .chain(&sp.lb_ips)
        .map({
            let proto = proto.clone();
            move |ip| vec![Value::Addr(*ip), proto.clone(), Value::Port(sp.port)]
        });
    by_ip.chain(sp.node_port.map(move |np| vec![proto, Value::Port(np)]))
}

/// Whether `set` is one of the maps from (entry . numgen slot) to a backend. Which slot holds
/// which backend depends on history (survivors keep their slots), not on the API objects.
pub fn is_backends_map(set: &str) -> bool {
    Pick::ALL.iter().any(|p| p.backends() == set)
}

/// The definition of the affinity maps (as the skeleton declares them).
pub fn affinity_def(f: Family, nodeport: bool) -> SetDef {
    let name = if nodeport {
        names::NP_AFFINITY
    } else {
        names::IP_AFFINITY
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
    let c = Compiled::new(state, cfg)?;
    let problems = c.problems();
    Ok((c.ruleset, problems))
}

/// A compiled ruleset that can be brought up to date one Service at a time. The result is
/// always exactly what [`compile_checked`] gives for the same state (a property test holds it to
/// that); a change is just cheaper: its cost is the size of the changed Services, not of the
/// cluster.
#[derive(Debug, Clone)]
pub struct Compiled {
    cfg: CompileConfig,
    ruleset: Ruleset,
    families: BTreeMap<Family, FamilyTable>,
}

/// The ports of one Service in a port map (keys sort by Service first).
pub fn service_ports<'a>(
    ports: &'a imbl::OrdMap<PortKey, std::sync::Arc<PortState>>,
    svc: &'a ServiceName,
) -> impl Iterator<Item = &'a PortState> + 'a {
    let from = PortKey {
        service: svc.clone(),
        port_name: String::new(),
        proto: Proto::Tcp,
    };
    ports
        .range(from..)
        .take_while(move |(k, _)| &k.service == svc)
        .map(|(_, v)| v.as_ref())
}

impl Compiled {
    /// Compile everything.
    pub fn new(state: &ProxyState, cfg: &CompileConfig) -> Result<Compiled, CompileError> {
        let tpl = skeleton()?;
        let mut families = BTreeMap::new();
        for &f in &cfg.families {
            let fs = state.families.get(&f);
            let cidrs = fs.map(|s| s.service_cidrs.as_slice()).unwrap_or(&[]);
            let mut ft = FamilyTable::new(f, cfg, tpl, cidrs);
            for ps in fs.iter().flat_map(|s| s.ports.values()) {
                ft.fold_port(ps, cfg);
            }
            ft.claims = HashMap::new();
            ft.finish();
            families.insert(f, ft);
        }
        let mut c = Compiled {
            cfg: cfg.clone(),
            ruleset: Ruleset::default(),
            families,
        };
        c.publish();
        Ok(c)
    }

    /// The compiled ruleset (a copy of it is cheap: elements are persistent sets).
    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    pub fn config(&self) -> &CompileConfig {
        &self.cfg
    }

    /// Entry points claimed by two Services, as problems.
    pub fn problems(&self) -> Vec<crate::model::Problem> {
        self.families
            .values()
            .flat_map(|f| f.problems.iter().cloned())
            .collect()
    }

    fn publish(&mut self) {
        self.ruleset.tables = self
            .families
            .iter()
            .map(|(f, ft)| (*f, ft.table.clone()))
            .collect();
    }

    /// Bring the ruleset from `old` to `new`, where only the Services in `changed` differ
    /// (their ports are read from both states). Falls back to a full compile when a changed
    /// Service is involved in an entry-point conflict. Returns whether it had to.
    pub fn update(
        &mut self,
        old: &ProxyState,
        new: &ProxyState,
        changed: &BTreeSet<ServiceName>,
    ) -> Result<bool, CompileError> {
        if old.families.iter().any(|(f, o)| {
            new.families
                .get(f)
                .is_none_or(|n| n.service_cidrs != o.service_cidrs)
        }) || self.incremental(old, new, changed).is_none()
        {
            *self = Compiled::new(new, &self.cfg)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn incremental(
        &mut self,
        old: &ProxyState,
        new: &ProxyState,
        changed: &BTreeSet<ServiceName>,
    ) -> Option<()> {
        let cfg = self.cfg.clone();
        let empty = imbl::OrdMap::new();
        for (f, ft) in self.families.iter_mut() {
            if changed.iter().any(|s| ft.contested.contains(s)) {
                return None;
            }
            let old_ports = old.families.get(f).map(|s| &s.ports).unwrap_or(&empty);
            let new_ports = new.families.get(f).map(|s| &s.ports).unwrap_or(&empty);
            // Backend slots are applied as a net change: a Service with 1,000 endpoints of which
            // one changed touches 2 elements of the (large, shared) backend maps, not 2,000.
            let mut backends: FxHashMap<(SetName, Element), i64> = FxHashMap::default();
            let mut split = |c: &mut Contribution, sign: i64| {
                let (b, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut c.elements)
                    .into_iter()
                    .partition(|(set, _)| is_backends_map(set));
                c.elements = rest;
                for k in b {
                    *backends.entry(k).or_default() += sign;
                }
            };
            for svc in changed {
                for ps in service_ports(old_ports, svc) {
                    // Not contested, so every claim was won: the old contribution is exact.
                    let mut c = contribute(ps, &cfg, &mut |_, _| true);
                    split(&mut c, -1);
                    ft.remove(c);
                }
            }
            for svc in changed {
                // A Service that had no ports (new, as every Service of a first list modelled
                // while it arrives) has no slots to keep: its backends go straight in. The
                // elements are counted, so the order of adds and removes does not matter.
                let new_here = service_ports(old_ports, svc).next().is_none();
                for ps in service_ports(new_ports, svc) {
                    // An entry already in use means a conflict: who wins depends on every
                    // claimant, so the caller compiles everything.
                    let mut conflict = false;
                    let table: &FamilyTable = ft;
                    let mut c = contribute(ps, &cfg, &mut |entry, _| {
                        conflict |= table.entry_taken(entry);
                        true
                    });
                    if conflict {
                        return None;
                    }
                    if !new_here {
                        split(&mut c, 1);
                    }
                    ft.add(c);
                }
            }
            for ((set, e), n) in backends {
                for _ in 0..n.unsigned_abs() {
                    if n > 0 {
                        ft.add_element(set.clone(), e.clone());
                    } else {
                        ft.remove_element(set.clone(), e.clone());
                    }
                }
            }
            ft.finish();
        }
        self.publish();
        Some(())
    }
}

impl FamilyTable {
    /// Rebuild the generated parts of the skeleton from the counts and timeouts in use: one
    /// count set + pick rule per endpoint count, one timeout set + update rules per affinity
    /// timeout. Only when a count or timeout came or went.
    fn finish(&mut self) {
        if !self.rules_dirty {
            return;
        }
        self.rules_dirty = false;
        let f = self.family;
        for (chain, rules) in &self.base_rules {
            if let Some(c) = self.table.chains.get_mut(chain) {
                c.rules = rules.clone();
            }
        }
        // Generated sets: drop those no longer used (their elements are gone with their users).
        let wanted: BTreeSet<String> = self
            .counts
            .keys()
            .filter(|(_, n)| *n > 0)
            .map(|(p, n)| p.count_set(*n))
            .chain(self.affinity.keys().map(|(np, t)| affinity_set(*np, *t)))
            .collect();
        self.table
            .sets
            .retain(|name, _| !generated_set(name) || wanted.contains(name));
        let wanted_chains: BTreeSet<String> = self
            .counts
            .keys()
            .filter(|(_, n)| *n > 0)
            .map(|(p, n)| p.count_chain(*n))
            .collect();
        self.table
            .chains
            .retain(|name, _| !generated_chain(name) || wanted_chains.contains(name));
        // Each count's dnat rule sits alone in a chain of its own, reached by a `goto` from
        // the pick chain. Adding a rule that looks up a map makes the kernel walk every element
        // of that map (`nf_tables_bind_set`; measured on 6.18: ~0.2 us per element, each time,
        // even with the map already bound in the same chain). Were the dnat rules in the pick
        // chain itself, a count coming or going would re-add all of them (the chain is
        // rewritten whole) and walk the shared backends map once per count in use: 0.55 s at
        // 250,000 backends, 3.2 s at 1.25 million. This way the pick chain's rules only look up
        // the small count sets, and a new count walks the map once; a count going away, never.
        for &(pick, n) in self.counts.keys() {
            if n == 0 {
                continue;
            }
            let types = entry_types(f, pick.nodeport());
            let set = pick.count_set(n);
            self.table
                .sets
                .insert(set.clone(), plain_set(types.clone()));
            let chain = pick.count_chain(n);
            let mut key = pick.entry_key();
            key.push(Field::Numgen(n as u32));
            let dnat = Rule {
                matches: vec![Match::Lookup {
                    key: vec![Field::L4proto],
                    set: names::L4PROTOS.into(),
                    negate: false,
                }],
                action: Action::DnatMap {
                    key,
                    map: pick.backends().to_string(),
                },
            };
            self.table.chains.insert(
                chain.clone(),
                Chain {
                    base: None,
                    rules: vec![dnat],
                },
            );
            let rule = Rule {
                matches: vec![Match::Lookup {
                    key: pick.entry_key(),
                    set,
                    negate: false,
                }],
                action: Action::Goto(chain),
            };
            if let Some(c) = self.table.chains.get_mut(&pick.chain()) {
                c.rules.push(rule);
            }
        }
        for &(nodeport, t) in self.affinity.keys() {
            let set = affinity_set(nodeport, t);
            let map = if nodeport {
                names::NP_AFFINITY
            } else {
                names::IP_AFFINITY
            };
            self.table
                .sets
                .insert(set.clone(), plain_set(entry_types(f, nodeport)));
            let (entry, key) = if nodeport {
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
                if nodeport {
                    matches.push(Match::Lookup {
                        key: vec![Field::CtOrigDaddr],
                        set: names::NODEPORT_ADDRS.into(),
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
            if let Some(c) = self.table.chains.get_mut(AFFINITY_CHAIN) {
                c.rules.extend(rules);
            }
        }
    }
}

fn affinity_set(nodeport: bool, t: u32) -> String {
    if nodeport {
        format!("np-affinity-t{t}")
    } else {
        format!("ip-affinity-t{t}")
    }
}

/// Chains that exist only while an endpoint count is in use.
fn generated_chain(name: &str) -> bool {
    Pick::ALL.iter().any(|p| {
        name.strip_prefix(&format!("pick-{}-n", p.stem()))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Sets that exist only while an endpoint count or affinity timeout is in use.
fn generated_set(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    Pick::ALL
        .iter()
        .any(|p| numbered(&format!("{}-n", p.stem())))
        || numbered("ip-affinity-t")
        || numbered("np-affinity-t")
}

mod owners;
pub use owners::Owners;

#[cfg(test)]
mod tests;
