//! The incremental engine against the from-scratch path, over long random change sequences
//! from `gen` (Services of every type and family order, EndpointSlices in every condition,
//! Node and ServiceCIDR changes, relists, conflicts). After every step: the engine's state,
//! ruleset and problems equal a from-scratch build of the same objects, Node and ServiceCIDRs;
//! and the partial plan from the previous output, applied to the strict fake kernel, leaves
//! exactly the rendered ruleset.
//!
//! How much it explores: `PROPTEST_CASES` cases (default [`CASES`]), each up to
//! `NFTPROXY_PROP_STEPS` steps (default [`STEPS`]) of 1-4 changes each. The defaults run in
//! about 20 s in a debug build. A release build does a step in about 2 ms; a long run (this
//! one takes 2-3 hours on two cores):
//!
//! ```text
//! PROPTEST_CASES=20000 NFTPROXY_PROP_STEPS=400 \
//!     cargo test --release --lib pipeline::tests::incremental_equals_from_scratch
//! ```
//!
//! A failure prints the shrunk sequence and records its seed in
//! `proptest-regressions/engine/tests.txt` (check that in: it is re-run first next time).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::apply::fake::FakeApplier;
use crate::apply::Applier;
use crate::k8s::inbox::{Inbox, Pending};
use crate::model::{ReadService, ReadSlice};
use std::net::IpAddr;

use crate::nft::compile::{entry_keys, Owners};
use crate::nft::ir::Value;
use crate::nft::tx::Transaction;
use crate::nft::{names, plan, render};
use crate::trace::{Origin, Outcome, Packet, Tracer};

#[derive(Default, Clone)]
struct Objs {
    services: BTreeMap<ObjKey, Service>,
    slices: BTreeMap<ObjKey, EndpointSlice>,
}

/// What the watches deliver between two computations.
#[derive(Default)]
struct Delivered {
    services: Batch<Service>,
    slices: Batch<EndpointSlice>,
}

impl Objs {
    fn lists(&self) -> (Batch<Service>, Batch<EndpointSlice>) {
        (
            Batch::all(self.services.values().cloned()),
            Batch::all(self.slices.values().cloned()),
        )
    }
}

use super::gen::{self, Flags, NodeSpec, Op, SliceSpec, SvcSpec};

/// Everything the engine is given: the objects, the Node and the ServiceCIDRs; and the watch
/// events not yet taken, folded as the agent's inbox folds them.
#[derive(Default)]
struct World {
    objs: Objs,
    node: NodeSpec,
    cidrs: u8,
    /// Read as the agent's watches read them: the engine under test never sees an object, the
    /// from-scratch oracle reads the objects themselves.
    inbox: Inbox,
}

fn read_svc(
    ev: kube::runtime::watcher::Event<Service>,
) -> kube::runtime::watcher::Event<ReadService> {
    crate::k8s::watch::read_event(&ev, ReadService::read)
}

fn read_slice(
    ev: kube::runtime::watcher::Event<EndpointSlice>,
) -> kube::runtime::watcher::Event<ReadSlice> {
    crate::k8s::watch::read_event(&ev, |s| ReadSlice::read(s, gen::NODE))
}

impl World {
    /// Apply one change and record the watch events it causes.
    fn apply(&mut self, op: &Op) {
        use kube::runtime::watcher::Event;
        match op {
            Op::Service(i, s) => {
                let key = gen::service_key(*i);
                match s {
                    Some(s) => {
                        let o = gen::service(*i, s);
                        self.objs.services.insert(key, o.clone());
                        self.inbox.services.event(read_svc(Event::Apply(o)));
                    }
                    // A watch reports the deletion of an object it knew, with its last state.
                    None => {
                        if let Some(o) = self.objs.services.remove(&key) {
                            self.inbox.services.event(read_svc(Event::Delete(o)));
                        }
                    }
                }
            }
            Op::Slice(i, s) => {
                let key = gen::slice_key(*i);
                match s {
                    Some(s) => {
                        let o = gen::slice(*i, s);
                        self.objs.slices.insert(key, o.clone());
                        self.inbox.slices.event(read_slice(Event::Apply(o)));
                    }
                    None => {
                        if let Some(o) = self.objs.slices.remove(&key) {
                            self.inbox.slices.event(read_slice(Event::Delete(o)));
                        }
                    }
                }
            }
            Op::Node(n) => self.node = n.clone(),
            Op::Cidrs(c) => self.cidrs = *c,
            Op::Relist(which) => self.relist(*which != 1, *which != 0),
        }
    }

    /// A watch restarts: the whole list arrives again (events after it fold into it).
    fn relist(&mut self, services: bool, slices: bool) {
        use kube::runtime::watcher::Event;
        if services {
            self.inbox.services.event(read_svc(Event::Init));
            for o in self.objs.services.values() {
                self.inbox
                    .services
                    .event(read_svc(Event::InitApply(o.clone())));
            }
            self.inbox.services.event(read_svc(Event::InitDone));
        }
        if slices {
            self.inbox.slices.event(read_slice(Event::Init));
            for o in self.objs.slices.values() {
                self.inbox
                    .slices
                    .event(read_slice(Event::InitApply(o.clone())));
            }
            self.inbox.slices.event(read_slice(Event::InitDone));
        }
    }
}

/// How the agent's first lists arrive in a property-test case: streamed as changes, modelled
/// and compiled at random points while they arrive, possibly against a Node and ServiceCIDRs
/// that are not yet the final ones, and possibly restarted midway (the watch broke) after
/// more changes happened.
#[derive(Debug, Clone)]
struct FirstLists {
    /// Where (modulo the number of events) the engine absorbs what came so far.
    absorb_at: Vec<u16>,
    /// A first attempt that breaks off after this many events (modulo), before `more` ops.
    restart: Option<(u16, Vec<Op>)>,
    /// The Node and ServiceCIDRs of the early absorbs (else the final ones).
    early_node: Option<NodeSpec>,
    early_cidrs: Option<u8>,
    /// Objects of each kind one absorb takes at most (the agent's pieces).
    piece: usize,
}

fn first_lists() -> impl Strategy<Value = FirstLists> {
    (
        prop::collection::vec(any::<u16>(), 0..6),
        prop::option::of((any::<u16>(), prop::collection::vec(gen::op(), 1..8))),
        prop::option::of(gen::node_spec()),
        prop::option::of(0..gen::CIDR_CHOICES),
        prop_oneof![1..4usize, Just(usize::MAX)],
    )
        .prop_map(
            |(absorb_at, restart, early_node, early_cidrs, piece)| FirstLists {
                absorb_at,
                restart,
                early_node,
                early_cidrs,
                piece,
            },
        )
}

/// One event of either watch during the first lists.
enum ListEvent {
    Service(Box<kube::runtime::watcher::Event<Service>>),
    Slice(Box<kube::runtime::watcher::Event<EndpointSlice>>),
}

/// The events of complete lists of `objs`: each kind's Init, then their objects interleaved,
/// then each kind's InitDone.
fn list_events(objs: &Objs) -> Vec<ListEvent> {
    use kube::runtime::watcher::Event;
    let mut out = vec![
        ListEvent::Service(Box::new(Event::Init)),
        ListEvent::Slice(Box::new(Event::Init)),
    ];
    let mut svcs = objs.services.values();
    let mut slices = objs.slices.values();
    loop {
        let (a, b) = (svcs.next(), slices.next());
        if a.is_none() && b.is_none() {
            break;
        }
        out.extend(a.map(|o| ListEvent::Service(Box::new(Event::InitApply(o.clone())))));
        out.extend(b.map(|o| ListEvent::Slice(Box::new(Event::InitApply(o.clone())))));
    }
    out.push(ListEvent::Service(Box::new(Event::InitDone)));
    out.push(ListEvent::Slice(Box::new(Event::InitDone)));
    out
}

impl World {
    /// Deliver the first lists as the agent's watches do, with the engine absorbing at the
    /// given points; the world's objects end as the lists say.
    fn first_lists(&mut self, first: &FirstLists, engine: &mut Engine, pc: &ProxyConfig) -> usize {
        // Nothing was delivered before the watches started.
        self.inbox = Inbox::default();
        let mut events = Vec::new();
        if let Some((at, more)) = &first.restart {
            let broken = list_events(&self.objs);
            let n = *at as usize % broken.len().max(1);
            // Only the start of the broken attempt arrives (no InitDone: it broke).
            events.extend(broken.into_iter().take(n).filter(|e| {
                !matches!(
                    e,
                    ListEvent::Service(e) if matches!(**e, kube::runtime::watcher::Event::InitDone)
                ) && !matches!(
                    e,
                    ListEvent::Slice(e) if matches!(**e, kube::runtime::watcher::Event::InitDone)
                )
            }));
            for op in more {
                self.apply(op);
            }
            self.inbox = Inbox::default();
        }
        events.extend(list_events(&self.objs));
        let len = events.len() + 1;
        let at: BTreeSet<usize> = first.absorb_at.iter().map(|a| *a as usize % len).collect();
        let mut absorbs = 0;
        for (i, ev) in events.into_iter().enumerate() {
            if at.contains(&i) {
                let node = first.early_node.as_ref().unwrap_or(&self.node).info();
                let cidrs = gen::service_cidrs(first.early_cidrs.unwrap_or(self.cidrs));
                let (services, slices) = self.inbox.take_piece(first.piece);
                engine
                    .compute(services, slices, &node, &cidrs, &pc.compile_config(&node))
                    .expect("absorb");
                absorbs += 1;
            }
            match ev {
                ListEvent::Service(e) => self.inbox.services.event(read_svc(*e)),
                ListEvent::Slice(e) => self.inbox.slices.event(read_slice(*e)),
            }
        }
        absorbs
    }
}

/// Default number of cases; `PROPTEST_CASES` overrides it.
const CASES: u32 = 24;
/// Default largest number of steps (engine computations) per case; `NFTPROXY_PROP_STEPS`
/// overrides it.
const STEPS: usize = 160;

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A one-port ClusterIP IPv4 Service spec.
fn plain(ip: u8) -> SvcSpec {
    SvcSpec {
        ty: gen::SvcType::ClusterIp,
        families: gen::Families::V4,
        ip,
        ports: vec![gen::PortSpec {
            port: 0,
            proto: gen::Proto::Tcp,
            node_port: None,
        }],
        unnamed: false,
        etp_local: None,
        itp_local: None,
        affinity: gen::Affinity::None,
        external_ips: vec![],
        ingress: vec![],
        source_ranges: vec![],
        health_check: None,
        other_proxy: false,
        unchecked: false,
    }
}

/// An IPv4 slice for Service `s{service}` with ready endpoints 10.0.0.(a+1) on another node,
/// port `p0` TCP.
fn ready_slice(service: u8, addrs: &[u8]) -> SliceSpec {
    SliceSpec {
        service: Some(service),
        extra_label: 0,
        addr_type: gen::AddrType::V4,
        ports: vec![gen::SlicePort {
            name: 0,
            port: 0,
            proto: gen::Proto::Tcp,
        }],
        endpoints: addrs
            .iter()
            .map(|a| gen::EpSpec {
                addr: *a,
                second: None,
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
                node: 1,
                zone: None,
                zone_hint: None,
                node_hint: None,
            })
            .collect(),
        hints: gen::Hints::None,
        terminating: false,
    }
}

fn node() -> NodeInfo {
    NodeSpec::default().info()
}

fn cfg() -> CompileConfig {
    Flags {
        masquerade_all: false,
        nodeport_addresses: 0,
        detect_local: 0,
    }
    .proxy_config()
    .compile_config(&node())
}

fn from_scratch(
    o: &Objs,
    node: &NodeInfo,
    cidrs: &[IpNet],
    cfg: &CompileConfig,
) -> (ProxyState, Ruleset, BTreeSet<(String, String)>) {
    let m = Model::from_objects(o.services.values(), o.slices.values(), cidrs, node);
    let c = Compiled::new(m.state(), cfg).expect("compile");
    let problems = m
        .problems()
        .into_iter()
        .chain(c.problems())
        .map(|p| (p.object.to_string(), p.reason))
        .collect();
    (m.state().clone(), c.ruleset().clone(), problems)
}

/// The state with every chosen backend list in sorted order (as a from-scratch build has it).
fn sorted_backends(s: &ProxyState) -> ProxyState {
    let mut s = s.clone();
    for fs in s.families.values_mut() {
        let keys: Vec<PortKey> = fs.ports.keys().cloned().collect();
        for k in keys {
            if let Some(ps) = fs.ports.get_mut(&k) {
                let ps = Arc::make_mut(ps);
                ps.chosen.cluster.sort();
                ps.chosen.local.sort();
            }
        }
    }
    s
}

/// The ruleset with each entry's backends renumbered in sorted order.
fn sorted_slots(r: &Ruleset) -> Ruleset {
    use crate::nft::ir::{Element, Value};
    let mut r = r.clone();
    for t in r.tables.values_mut() {
        for (name, els) in t.elements.iter_mut() {
            if !name.ends_with("-backends") {
                continue;
            }
            let mut by_entry: BTreeMap<Vec<Value>, Vec<Vec<Value>>> = BTreeMap::new();
            for e in els.iter() {
                let entry = e.key()[..e.key().len() - 1].to_vec();
                by_entry
                    .entry(entry)
                    .or_default()
                    .push(e.value().unwrap_or_default().to_vec());
            }
            *els = by_entry
                .into_iter()
                .flat_map(|(entry, mut values)| {
                    values.sort();
                    values.into_iter().enumerate().map(move |(i, v)| {
                        let mut key = entry.clone();
                        key.push(Value::Slot(i as u32));
                        Element::new(key, Some(v))
                    })
                })
                .collect();
        }
    }
    r
}

/// The CompileConfig the agent derives from the Node (as `ProxyConfig::compile_config` does
/// for every sync) follows the Node's addresses: a Node whose addresses change must not leave
/// NodePorts or the source-range allowance on the old ones.
fn check_config(cfg: &CompileConfig, node: &NodeInfo, flags: &Flags) -> Result<(), TestCaseError> {
    prop_assert_eq!(&cfg.node_ips, &node.internal_ips);
    let primaries: Vec<Family> = [Family::Ip, Family::Ip6]
        .into_iter()
        .filter(|f| node.primary(*f).is_some())
        .collect();
    if primaries.is_empty() {
        prop_assert_eq!(&cfg.families, &vec![Family::Ip]);
    } else {
        prop_assert_eq!(&cfg.families, &primaries);
    }
    if flags.nodeport_addresses == 0 {
        let want: Vec<IpNet> = primaries
            .iter()
            .filter_map(|f| node.primary(*f))
            .map(IpNet::from)
            .collect();
        prop_assert_eq!(&cfg.nodeport_cidrs, &want);
    }
    Ok(())
}

/// Compute from what the world delivered and hold the output to the from-scratch build of the
/// world's objects (equal up to which slot each backend holds: the engine keeps slots stable).
fn compute_checked(
    engine: &mut Engine,
    world: &mut World,
    pc: &ProxyConfig,
    flags: &Flags,
) -> Result<Output, TestCaseError> {
    let node = world.node.info();
    let cfg = pc.compile_config(&node);
    check_config(&cfg, &node, flags)?;
    let cidrs = gen::service_cidrs(world.cidrs);
    let out = engine
        .compute(
            world.inbox.services.take(),
            world.inbox.slices.take(),
            &node,
            &cidrs,
            &cfg,
        )
        .expect("compute");
    let (state, ruleset, problems) = from_scratch(&world.objs, &node, &cidrs, &cfg);
    prop_assert_eq!(sorted_backends(&out.state), state);
    prop_assert_eq!(sorted_slots(&out.ruleset), ruleset);
    let got: BTreeSet<(String, String)> = out
        .problems
        .iter()
        .map(|p| (p.object.to_string(), p.reason.clone()))
        .collect();
    prop_assert_eq!(got, problems);
    Ok(out)
}

/// What every Service of `states` does, entry point by entry point, for a client outside the
/// node and for a process on it (None: the family's table is missing).
fn behaviour(
    rs: &Ruleset,
    states: &[&ProxyState],
    cfg: &CompileConfig,
) -> BTreeMap<ServiceName, Vec<Option<BTreeSet<Outcome>>>> {
    let mut entries: BTreeMap<(ServiceName, Family), BTreeSet<Vec<Value>>> = BTreeMap::new();
    for st in states {
        for (f, fs) in &st.families {
            for (k, ps) in &fs.ports {
                entries
                    .entry((k.service.clone(), *f))
                    .or_default()
                    .extend(entry_keys(&ps.sp));
            }
        }
    }
    let mut out: BTreeMap<ServiceName, Vec<Option<BTreeSet<Outcome>>>> = BTreeMap::new();
    for ((svc, f), es) in entries {
        let local: Vec<IpAddr> = cfg
            .node_ips
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == (f == Family::Ip))
            .collect();
        let client: IpAddr = match f {
            Family::Ip => "203.0.113.9".parse().expect("ip"),
            Family::Ip6 => "2001:db8::9".parse().expect("ip"),
        };
        let tracer = rs.tables.get(&f).map(|t| Tracer::new(f, t, &local));
        let v = out.entry(svc).or_default();
        for e in es {
            let (dst, proto, port) = match e.as_slice() {
                [Value::Addr(a), Value::Proto(p), Value::Port(n)] => (*a, *p, *n),
                [Value::Proto(p), Value::Port(n)] => match local.first() {
                    Some(a) => (*a, *p, *n),
                    None => continue,
                },
                _ => continue,
            };
            for (origin, src, iif) in [
                (Origin::Remote, client, "eth9"),
                (Origin::Local, local.first().copied().unwrap_or(client), ""),
            ] {
                let p = Packet {
                    origin,
                    src,
                    dst,
                    proto,
                    dport: port,
                    iif: iif.into(),
                };
                v.push(tracer.as_ref().map(|t| t.trace(&p)));
            }
        }
    }
    out
}

/// The node-level sets that are not any Service's (Service CIDRs, NodePort addresses, ...).
fn node_sets(rs: &Ruleset) -> Vec<(Family, &'static str, Option<&crate::nft::ir::Elements>)> {
    let mut v = Vec::new();
    for (f, t) in &rs.tables {
        for set in [
            names::L4PROTOS,
            names::CLUSTER_CIDRS,
            names::LOCAL_IFACES,
            names::NODEPORT_ADDRS,
            names::SERVICE_CIDRS,
        ] {
            v.push((*f, set, t.elements.get(set)));
        }
    }
    v
}

/// Commit `tx` to the fake split into transactions of about `max` elements (as the sync loop
/// does), checking after each that every Service behaves exactly as before the commit or
/// exactly as after it, all of its entry points at once. `before` is what the fake held (for a
/// build from nothing: the same node without Services). The check needs the same node-level
/// sets before and after (a Service CIDR that changes alters how an absent Service's address
/// is treated); without them only the end state is checked, by the caller.
#[allow(clippy::too_many_arguments)]
fn apply_split_checked(
    fake: &mut FakeApplier,
    tx: &Transaction,
    max: usize,
    before: &Ruleset,
    after: &Ruleset,
    states: [&ProxyState; 2],
    cfg: &CompileConfig,
) -> Result<usize, TestCaseError> {
    let owners = Owners::new(states);
    let check = node_sets(before) == node_sets(after);
    let (was, will) = if check {
        (
            behaviour(before, &states, cfg),
            behaviour(after, &states, cfg),
        )
    } else {
        Default::default()
    };
    let mut sent = 0;
    plan::split(tx, &|_, set, e| owners.group(set, e), max, &mut |t| {
        fake.apply(&t).expect("split apply");
        sent += 1;
        if check {
            let now = behaviour(&fake.state, &states, cfg);
            for (svc, b) in &now {
                prop_assert!(
                    Some(b) == was.get(svc) || Some(b) == will.get(svc),
                    "after transaction {} of a split commit, {} is neither as before nor as after:\nnow {:?}\nbefore {:?}\nafter {:?}",
                    sent, svc, b, was.get(svc), will.get(svc)
                );
            }
        }
        Ok(())
    })?;
    Ok(sent)
}

proptest! {
    // Cases: PROPTEST_CASES (default CASES); steps per case: up to NFTPROXY_PROP_STEPS
    // (default STEPS). See the module comment for a long run.
    #![proptest_config(ProptestConfig {
        cases: env_or("PROPTEST_CASES", CASES),
        // Each case is hundreds of computations, so shrinking is bounded (the failures seen so
        // far shrank to two steps well within it).
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    /// The incremental engine gives exactly what the from-scratch path gives for the same
    /// objects, Node and ServiceCIDRs, after every step of a long random change sequence; and
    /// the partial plan between successive outputs brings a strict fake kernel there.
    #[test]
    fn incremental_equals_from_scratch(
        flags in gen::flags(),
        start_node in gen::node_spec(),
        start_cidrs in 0..gen::CIDR_CHOICES,
        initial in prop::collection::vec(gen::op(), 0..24),
        first in first_lists(),
        steps in prop::collection::vec(
            prop::collection::vec(gen::op(), 1..5),
            1..=env_or("NFTPROXY_PROP_STEPS", STEPS).max(1),
        ),
        split in prop::option::weighted(0.7, 1usize..24),
    ) {
        let pc = flags.proxy_config();
        let mut world = World { node: start_node, cidrs: start_cidrs, ..World::default() };
        for op in &initial {
            world.apply(op);
        }
        // The first lists arrive as the agent's watches deliver them, partly modelled while
        // they arrive; the first computation then completes them.
        let mut engine = Engine::default();
        let absorbs = world.first_lists(&first, &mut engine, &pc);
        let first = compute_checked(&mut engine, &mut world, &pc, &flags)?;
        prop_assert!(first.rebuilt || absorbs > 0);
        let mut fake = FakeApplier::new();
        let node = world.node.info();
        let cfg = pc.compile_config(&node);
        let full = plan::full(&first.ruleset);
        match split {
            // Split as the sync loop commits a cold start (every Service whole or absent after
            // each transaction); or in one.
            Some(max) => {
                prop_assert!(plan::splittable(&full, true));
                let mut nothing = (*first.state).clone();
                for fs in nothing.families.values_mut() {
                    fs.ports = imbl::OrdMap::new();
                }
                let none = compile::compile(&nothing, &cfg).expect("compile");
                apply_split_checked(&mut fake, &full, max, &none, &first.ruleset, [first.state.as_ref(), &nothing], &cfg)?;
                prop_assert_eq!(
                    render::normalise(&fake.dump()),
                    render::normalise(&render::ruleset(&first.ruleset))
                );
            }
            None => fake.apply(&full).expect("full apply"),
        }
        let mut applied = first.ruleset.clone();
        let mut last = first.ruleset;
        let mut last_state = first.state;
        // Chains flushed because nothing wants them any more (an endpoint count gone): the
        // sync loop deletes them a grace period later, here one step later.
        let mut stale: BTreeSet<(Family, String)> = BTreeSet::new();
        for step in &steps {
            for op in step {
                world.apply(op);
            }
            let out = compute_checked(&mut engine, &mut world, &pc, &flags)?;
            // And the plan between successive outputs brings a strict kernel there.
            let p = plan::partial(&applied, &out.ruleset, &stale);
            prop_assert!(!p.needs_full);
            if p.tx.is_empty() {
                // Nothing to do must mean nothing changed: the kernel already holds the last
                // (checked) output. Cheaper than rendering both again.
                prop_assert_eq!(&out.ruleset, &last);
            } else {
                match split {
                    Some(max) if plan::splittable(&p.tx, false) => {
                        let cfg = pc.compile_config(&world.node.info());
                        apply_split_checked(&mut fake, &p.tx, max, &applied, &out.ruleset, [out.state.as_ref(), last_state.as_ref()], &cfg)?;
                    }
                    _ => fake.apply(&p.tx).expect("partial apply"),
                }
            }
            // The kernel holds the output plus the chains flushed and not yet deleted.
            let next = plan::after(&applied, &out.ruleset, &p);
            if !p.tx.is_empty() {
                prop_assert_eq!(
                    render::normalise(&fake.dump()),
                    render::normalise(&render::ruleset(&next))
                );
            }
            for (f, t) in &next.tables {
                let wanted = &out.ruleset.tables[f];
                for (name, chain) in &t.chains {
                    prop_assert!(
                        wanted.chains.contains_key(name) || chain.rules.is_empty(),
                        "chain {name} kept with rules though nothing wants it"
                    );
                }
            }
            stale = p.flushed_stale.iter().cloned().collect();
            applied = next;
            last = out.ruleset;
            last_state = out.state;
        }
    }
}

#[test]
fn a_change_recompiles_only_its_service() {
    let mut objs = Objs::default();
    for i in 0..6u8 {
        objs.services
            .insert(gen::service_key(i), gen::service(i, &plain(i)));
    }
    let mut engine = Engine::default();
    let (svcs, slices) = objs.lists();
    let first = engine
        .compute(svcs, slices, &node(), &[], &cfg())
        .expect("first");
    assert!(first.rebuilt);
    // Slice key 0 lives in ns0, as Service key 3 (ns0/s3) does.
    let key = gen::slice_key(0);
    let mut d = Delivered::default();
    d.slices
        .changed
        .insert(key, Some(gen::slice(0, &ready_slice(3, &[1]))));
    let out = engine
        .compute(d.services, d.slices, &node(), &[], &cfg())
        .expect("update");
    assert!(!out.rebuilt);
    assert_eq!(out.changed, 1);
    let p = plan::partial(&first.ruleset, &out.ruleset, &BTreeSet::new());
    // reject entry out, count-set entry and one backend in.
    assert_eq!(p.tx.element_count(), 3, "{:?}", p.tx);
    assert_eq!(p.tx.skeleton_ops(), 0);
    // A new zone redoes every endpoint choice; new node addresses recompile everything.
    let mut zoned = node();
    zoned.zone = Some("z1".into());
    let out = engine
        .compute(
            Batch::<Service>::default(),
            Batch::<EndpointSlice>::default(),
            &zoned,
            &[],
            &cfg(),
        )
        .expect("zone");
    assert!(out.rebuilt);
    assert_eq!(out.changed, 6);
}

#[test]
fn pending_folds_events_and_relists() {
    use kube::runtime::watcher::Event;
    let spec = plain(0);
    let (a, b) = (gen::service(0, &spec), gen::service(1, &spec));
    let mut p: Pending<Service> = Pending::default();
    // The first list (empty here; a first list is handed out as changes).
    p.event(Event::Init);
    p.event(Event::InitDone);
    p.event(Event::Apply(a.clone()));
    p.event(Event::Delete(a.clone()));
    let batch = p.take();
    assert!(batch.replaced.is_none());
    assert_eq!(batch.changed.len(), 1, "the latest version per object");
    assert!(batch.changed.values().all(|o| o.is_none()));
    assert!(p.take().is_empty());
    // A relist replaces everything; events after it (before the engine looks) fold into it.
    p.event(Event::Apply(b.clone()));
    p.event(Event::Init);
    p.event(Event::InitApply(a.clone()));
    p.event(Event::InitDone);
    p.event(Event::Apply(b.clone()));
    p.event(Event::Delete(a));
    let batch = p.take();
    assert!(batch.changed.is_empty());
    let all = batch.replaced.expect("relist");
    assert_eq!(
        all.keys().cloned().collect::<Vec<_>>(),
        vec![key_of(&b.metadata)]
    );
}

#[test]
fn replacing_one_endpoint_rewrites_one_slot() {
    let mut objs = Objs::default();
    objs.services
        .insert(gen::service_key(0), gen::service(0, &plain(0)));
    let mut eps: Vec<u8> = (0..12).collect();
    let sl = |eps: &[u8]| gen::slice(0, &ready_slice(0, eps));
    objs.slices.insert(gen::slice_key(0), sl(&eps));
    let mut engine = Engine::default();
    let (svcs, slices) = objs.lists();
    let first = engine
        .compute(svcs, slices, &node(), &[], &cfg())
        .expect("first");
    let mut applied = first.ruleset;
    // The 2nd endpoint (sorted) is replaced by one that sorts last; then one is removed (the
    // last slot's backend moves into the hole); then the removed one comes back.
    for (change, want) in [(0usize, 2usize), (1, 3), (2, 1)] {
        match change {
            0 => eps[1] = 13,
            1 => {
                eps.remove(3);
            }
            _ => eps.push(3),
        }
        let mut d = Delivered::default();
        d.slices.changed.insert(gen::slice_key(0), Some(sl(&eps)));
        let out = engine
            .compute(d.services, d.slices, &node(), &[], &cfg())
            .expect("update");
        let p = plan::partial(&applied, &out.ruleset, &BTreeSet::new());
        let backend_ops: usize =
            p.tx.ops
                .iter()
                .map(|op| match op {
                    crate::nft::tx::Op::AddElements { set, elements, .. }
                    | crate::nft::tx::Op::DeleteElements { set, elements, .. }
                        if set.ends_with("-backends") =>
                    {
                        elements.len()
                    }
                    _ => 0,
                })
                .sum();
        assert_eq!(backend_ops, want, "change {change}: {:?}", p.tx);
        applied = out.ruleset;
    }
}

#[test]
fn stable_slots_keep_survivors_in_place() {
    let b = |i: u8| -> Backend { (std::net::IpAddr::from([10, 0, 0, i]), 80) };
    let old = vec![b(1), b(2), b(3), b(4)];
    assert_eq!(
        stable_slots(&old, &[b(1), b(3), b(4), b(9)]),
        vec![b(1), b(9), b(3), b(4)]
    );
    // Shrinking: the survivor beyond the end moves into the hole.
    assert_eq!(
        stable_slots(&old, &[b(1), b(3), b(4)]),
        vec![b(1), b(4), b(3)]
    );
    assert_eq!(stable_slots(&[], &[b(2), b(1)]), vec![b(2), b(1)]);
    assert_eq!(stable_slots(&old, &[]), Vec::<Backend>::new());
}

#[test]
fn service_cidrs_are_split_by_family() {
    let cidrs: Vec<IpNet> = vec![
        "172.30.0.0/16".parse().unwrap(),
        "fd00:30::/112".parse().unwrap(),
    ];
    let m = Model::from_objects([], [], &cidrs, &node());
    assert_eq!(
        m.state().families[&Family::Ip].service_cidrs,
        vec![cidrs[0]]
    );
    assert_eq!(
        m.state().families[&Family::Ip6].service_cidrs,
        vec![cidrs[1]]
    );
    // A change of them is a rebuild.
    let mut engine = Engine::default();
    let (s, e) = Objs::default().lists();
    engine.compute(s, e, &node(), &[], &cfg()).expect("first");
    let out = engine
        .compute(
            Batch::<Service>::default(),
            Batch::<EndpointSlice>::default(),
            &node(),
            &cidrs,
            &cfg(),
        )
        .expect("cidrs");
    assert!(out.rebuilt);
    assert_eq!(
        out.state.families[&Family::Ip6].service_cidrs,
        vec![cidrs[1]]
    );
}

/// Regression: a dual-stack Service kept only one family after a slice-only change (the previous
/// port states were keyed without their family, so the IPv6 side overwrote the IPv4 side).
#[test]
fn dual_stack_survives_a_slice_change() {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ns0", "name": "ds"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9", "fd00:96::9"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "p0", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
    }))
    .expect("service");
    let slice = |v6: bool, last: u8| -> EndpointSlice {
        let addr = if v6 {
            format!("fd00:10::{last}")
        } else {
            format!("10.0.0.{last}")
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns0", "name": if v6 { "ds-v6" } else { "ds-v4" },
                "labels": {"kubernetes.io/service-name": "ds"}},
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr], "conditions": {"ready": true}, "nodeName": "node-b"}],
        }))
        .expect("slice")
    };
    for v6_changes in [false, true] {
        let mut objs = Objs::default();
        objs.services
            .insert(("ns0".into(), "ds".into()), svc.clone());
        objs.slices
            .insert(("ns0".into(), "ds-v4".into()), slice(false, 1));
        objs.slices
            .insert(("ns0".into(), "ds-v6".into()), slice(true, 1));
        let mut engine = Engine::default();
        let (s, e) = objs.lists();
        engine.compute(s, e, &node(), &[], &cfg()).expect("first");
        let changed = slice(v6_changes, 2);
        let key = key_of(&changed.metadata);
        objs.slices.insert(key.clone(), changed.clone());
        let mut d = Delivered::default();
        d.slices.changed.insert(key, Some(changed));
        let out = engine
            .compute(d.services, d.slices, &node(), &[], &cfg())
            .expect("update");
        for f in [Family::Ip, Family::Ip6] {
            assert_eq!(
                out.state.families[&f].ports.len(),
                1,
                "{f:?} side kept after a change of the {} slice",
                if v6_changes { "IPv6" } else { "IPv4" }
            );
        }
        let (state, ruleset, _) = from_scratch(&objs, &node(), &[], &cfg());
        assert_eq!(sorted_backends(&out.state), state);
        assert_eq!(sorted_slots(&out.ruleset), ruleset);
    }
}

/// The API accepts a Service with any number of ports and kube-proxy programs them all (nftproxy
/// once skipped a Service with more than 1,000): ports with endpoints get backends, the others
/// reject.
#[test]
fn a_service_with_1500_ports_is_programmed() {
    use crate::nft::ir::Value;
    let ports: Vec<_> = (1..=1500u16)
        .map(|i| serde_json::json!({"name": format!("p{i}"), "port": i, "protocol": "TCP"}))
        .collect();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ns0", "name": "many"},
        "spec": {"clusterIP": "172.30.0.9", "clusterIPs": ["172.30.0.9"], "ports": ports},
    }))
    .expect("service");
    // Endpoints for every third port.
    let slice_ports: Vec<_> = (1..=1500u16)
        .filter(|i| i % 3 == 0)
        .map(|i| serde_json::json!({"name": format!("p{i}"), "port": 10000 + i, "protocol": "TCP"}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ns0", "name": "many-1",
            "labels": {"kubernetes.io/service-name": "many"}},
        "addressType": "IPv4",
        "ports": slice_ports,
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
    }))
    .expect("slice");
    let mut engine = Engine::default();
    let out = engine
        .compute(Batch::all([svc]), Batch::all([slice]), &node(), &[], &cfg())
        .expect("compute");
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let table = &out.ruleset.tables[&Family::Ip];
    let ports_in = |set: &str| -> BTreeSet<u16> {
        table
            .elements
            .get(set)
            .into_iter()
            .flat_map(|els| els.iter())
            .filter_map(|e| match e.key().get(2) {
                Some(Value::Port(p)) => Some(*p),
                _ => None,
            })
            .collect()
    };
    assert_eq!(ports_in("clusterip").len(), 1500);
    let served: BTreeSet<u16> = (1..=1500).filter(|i| i % 3 == 0).collect();
    assert_eq!(ports_in("ip-cluster-backends"), served);
    let rejected: BTreeSet<u16> = (1..=1500).filter(|i| i % 3 != 0).collect();
    assert_eq!(ports_in("no-endpoint-reject"), rejected);
    let mut fake = FakeApplier::new();
    fake.apply(&plan::full(&out.ruleset)).expect("full apply");
}

/// The shapes of state the property test must reach for its verdict to mean something.
const SHAPES: &[&str] = &[
    "dual-stack Service",
    "dual-stack Service, IPv6 first",
    "more endpoints than the preset counts",
    "terminating fallback",
    "topology hints narrow the choice",
    "internalTrafficPolicy Local drops",
    "externalTrafficPolicy Local with local endpoints",
    "source ranges allowing the node",
    "ClientIP affinity",
    "slice of a Service that does not exist",
    "entry point conflict",
    "bad port reported",
];

/// Record which of [`SHAPES`] the model (and its compile) shows.
fn shapes_of(
    m: &Model,
    objs: &Objs,
    node: &NodeInfo,
    cfg: &CompileConfig,
    seen: &mut BTreeMap<&'static str, usize>,
) {
    let mut hit = |s: &'static str| *seen.entry(s).or_default() += 1;
    let names = |f: Family| -> BTreeSet<ServiceName> {
        m.state().families[&f]
            .ports
            .keys()
            .map(|k| k.service.clone())
            .collect()
    };
    let both: BTreeSet<ServiceName> = names(Family::Ip)
        .intersection(&names(Family::Ip6))
        .cloned()
        .collect();
    if !both.is_empty() {
        hit("dual-stack Service");
    }
    if both.iter().any(|n| {
        objs.services
            .get(&(n.namespace.clone(), n.name.clone()))
            .and_then(|s| s.spec.as_ref()?.ip_families.as_ref()?.first().cloned())
            .as_deref()
            == Some("IPv6")
    }) {
        hit("dual-stack Service, IPv6 first");
    }
    for (f, fs) in &m.state().families {
        for ps in fs.ports.values() {
            let (sp, c) = (&ps.sp, &ps.chosen);
            let merged = m
                .by_service
                .get(&(sp.key.service.clone(), *f))
                .map(|keys| model::merge_slices(keys.iter().filter_map(|k| m.slices.get(k))))
                .unwrap_or_default();
            let eps = merged
                .get(&(sp.key.port_name.clone(), sp.key.proto))
                .cloned()
                .unwrap_or_default();
            let ready = eps.iter().filter(|e| e.ready).count();
            if c.cluster.len() > *compile::PRESET_COUNTS.end() {
                hit("more endpoints than the preset counts");
            }
            if ready == 0 && !c.cluster.is_empty() {
                hit("terminating fallback");
            }
            if !c.cluster.is_empty() && c.cluster.len() < ready {
                hit("topology hints narrow the choice");
            }
            if sp.internal_local && c.local.is_empty() && c.has_any {
                hit("internalTrafficPolicy Local drops");
            }
            if sp.external_local && sp.has_external_entries() && !c.local.is_empty() {
                hit("externalTrafficPolicy Local with local endpoints");
            }
            if !sp.lb_ips.is_empty()
                && sp
                    .source_ranges
                    .iter()
                    .any(|r| node.internal_ips.iter().any(|ip| r.contains(ip)))
            {
                hit("source ranges allowing the node");
            }
            if sp.affinity_secs.is_some() {
                hit("ClientIP affinity");
            }
        }
    }
    if m.by_service.keys().any(|(s, _)| {
        !objs
            .services
            .contains_key(&(s.namespace.clone(), s.name.clone()))
    }) {
        hit("slice of a Service that does not exist");
    }
    if m.problems()
        .iter()
        .any(|p| p.reason.contains("unsupported protocol"))
    {
        hit("bad port reported");
    }
    if m.problems()
        .iter()
        .any(|p| p.reason.contains("unsupported protocol"))
    {
        hit("bad port reported");
    }
    let c = Compiled::new(m.state(), cfg).expect("compile");
    if c.problems()
        .iter()
        .any(|p| p.reason.contains("already used"))
    {
        hit("entry point conflict");
    }
}

/// A guard on the generator itself: a fixed sample of its sequences reaches every shape in
/// [`SHAPES`]. If a change to the generator stops producing, say, dual-stack Services, this
/// fails instead of the property test silently testing less.
#[test]
fn the_generator_reaches_the_shapes_that_matter() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let sequence = prop::collection::vec(prop::collection::vec(gen::op(), 1..5), 40);
    let pc = Flags {
        masquerade_all: false,
        nodeport_addresses: 0,
        detect_local: 0,
    }
    .proxy_config();
    let mut seen = BTreeMap::new();
    for _ in 0..16 {
        let steps = sequence.new_tree(&mut runner).expect("sequence").current();
        let mut world = World::default();
        for step in &steps {
            for op in step {
                world.apply(op);
            }
            let node = world.node.info();
            let m = Model::from_objects(
                world.objs.services.values(),
                world.objs.slices.values(),
                &gen::service_cidrs(world.cidrs),
                &node,
            );
            shapes_of(&m, &world.objs, &node, &pc.compile_config(&node), &mut seen);
        }
    }
    let missing: Vec<&&str> = SHAPES.iter().filter(|s| !seen.contains_key(*s)).collect();
    assert!(
        missing.is_empty(),
        "never reached: {missing:?}; reached: {seen:?}"
    );
}
