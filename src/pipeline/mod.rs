//! The incremental pipeline. Watch events name the objects that changed; only their Services are
//! re-read, re-modelled, given new endpoint choices and re-compiled, so a change costs the size of
//! the changed Services, not of the cluster. Anything that touches every Service (a relist, a
//! change of this Node or of the ServiceCIDRs) rebuilds from scratch.
//!
//! The incremental result is always exactly what the from-scratch path gives for the same
//! objects; `tests` hold it to that over random change sequences.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::k8s::inbox::{key_of, Batch, ObjKey};
use crate::k8s::objects::Objects;
use crate::model::NodeInfo;
use crate::model::{self, PortEndpoints, PortKey, Problem, ServiceName, ServicePort, SliceInfo};
use crate::net::Family;
use crate::nft::compile::{self, CompileConfig, CompileError, Compiled};
use crate::nft::ir::Ruleset;
use crate::proxy::{self, Backend, ProxyState};

pub mod config;
use config::ProxyConfig;

/// What the model reads a Service from: the object itself (render, explain -f, tests) or the
/// watch's reading of it as it arrived (the agent, which never keeps objects).
pub trait ServiceInput {
    fn into_ports(self, problems: &mut Vec<Problem>) -> Vec<ServicePort>;
}

impl ServiceInput for Service {
    fn into_ports(self, problems: &mut Vec<Problem>) -> Vec<ServicePort> {
        model::service_ports(&self, problems)
    }
}

impl ServiceInput for model::ReadService {
    fn into_ports(self, problems: &mut Vec<Problem>) -> Vec<ServicePort> {
        problems.extend(self.problems);
        self.ports
    }
}

impl ServiceInput for &Service {
    fn into_ports(self, problems: &mut Vec<Problem>) -> Vec<ServicePort> {
        model::service_ports(self, problems)
    }
}

/// What the model reads an EndpointSlice from (see [`ServiceInput`]). `node` is this node's
/// name; a [`model::ReadSlice`] was read with the same one.
pub trait SliceInput {
    fn into_info(self, node: &str, problems: &mut Vec<Problem>) -> Option<SliceInfo>;
}

impl SliceInput for EndpointSlice {
    fn into_info(self, node: &str, problems: &mut Vec<Problem>) -> Option<SliceInfo> {
        model::slice_info(&self, node, problems)
    }
}

impl SliceInput for &EndpointSlice {
    fn into_info(self, node: &str, problems: &mut Vec<Problem>) -> Option<SliceInfo> {
        model::slice_info(self, node, problems)
    }
}

impl SliceInput for model::ReadSlice {
    fn into_info(self, _node: &str, problems: &mut Vec<Problem>) -> Option<SliceInfo> {
        problems.extend(self.problems);
        self.info
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Service,
    Slice,
}

/// Services and EndpointSlices reduced to what the data path needs, and the proxy state built
/// from them, kept per object so that one object can change at a time.
#[derive(Debug, Clone)]
pub struct Model {
    node: NodeInfo,
    cidrs: Vec<IpNet>,
    // A Service's ports live only in `state` (each port state holds its service port).
    slices: HashMap<ObjKey, SliceInfo>,
    /// The slices of each Service and family, sorted by name (merging is order-sensitive only
    /// for duplicates, and then deterministic). A Vec: most Services have one slice.
    by_service: HashMap<(ServiceName, Family), Vec<ObjKey>>,
    /// Ports of Services re-read in this round, until their port states are rebuilt.
    fresh: HashMap<ServiceName, Vec<ServicePort>>,
    problems: HashMap<(Kind, ObjKey), Vec<Problem>>,
    state: ProxyState,
}

fn family_cidrs(f: Family, cidrs: &[IpNet]) -> Vec<IpNet> {
    cidrs
        .iter()
        .filter(|n| {
            matches!(
                (n, f),
                (IpNet::V4(_), Family::Ip) | (IpNet::V6(_), Family::Ip6)
            )
        })
        .copied()
        .collect()
}

/// Order `new` (a port's chosen backends) so that backends it shares with `old` keep their
/// positions: a backend's position is its numgen slot in the data path, so one endpoint replaced
/// rewrites one slot instead of every slot after it in sorted order. Positions stay dense
/// (`0..n`, as `numgen mod n` needs): survivors beyond the new end move into the freed holes.
pub fn stable_slots(old: &[Backend], new: &[Backend]) -> Vec<Backend> {
    let n = new.len();
    let wanted: rustc_hash::FxHashSet<&Backend> = new.iter().collect();
    let mut slots: Vec<Option<Backend>> = vec![None; n];
    let mut placed = rustc_hash::FxHashSet::default();
    for (i, b) in old.iter().enumerate().take(n) {
        if wanted.contains(b) {
            slots[i] = Some(*b);
            placed.insert(*b);
        }
    }
    let mut rest = new.iter().filter(|b| !placed.contains(*b));
    slots
        .into_iter()
        .map(|s| s.or_else(|| rest.next().copied()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_else(|| new.to_vec())
}

fn svc_name(key: &ObjKey) -> ServiceName {
    ServiceName {
        namespace: key.0.clone(),
        name: key.1.clone(),
    }
}

impl Model {
    fn empty(node: &NodeInfo, cidrs: &[IpNet]) -> Model {
        let mut state = ProxyState::default();
        for f in [Family::Ip, Family::Ip6] {
            state.families.entry(f).or_default().service_cidrs = family_cidrs(f, cidrs);
        }
        Model {
            node: node.clone(),
            cidrs: cidrs.to_vec(),
            slices: HashMap::default(),
            fresh: HashMap::default(),
            by_service: HashMap::default(),
            problems: HashMap::default(),
            state,
        }
    }

    /// Build from whole object lists.
    pub fn from_objects<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        cidrs: &[IpNet],
        node: &NodeInfo,
    ) -> Model {
        let mut m = Model::empty(node, cidrs);
        for s in services {
            m.read_service(&key_of(&s.metadata), Some(s));
        }
        for s in slices {
            m.read_slice(&key_of(&s.metadata), Some(s));
        }
        let all: Vec<ServiceName> = m.fresh.keys().cloned().collect();
        for s in &all {
            m.rebuild_service(s);
        }
        m
    }

    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    /// A Service's endpoints in one family, merged over its slices as its port states were.
    pub fn endpoints(&self, svc: &ServiceName, f: Family) -> PortEndpoints {
        let keys = self.by_service.get(&(svc.clone(), f));
        model::merge_slices(
            keys.into_iter()
                .flatten()
                .filter_map(|k| self.slices.get(k)),
        )
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn cidrs(&self) -> &[IpNet] {
        &self.cidrs
    }

    /// Every Service with ports.
    fn service_names(&self) -> BTreeSet<ServiceName> {
        self.state
            .families
            .values()
            .flat_map(|fs| fs.ports.keys().map(|k| k.service.clone()))
            .collect()
    }

    /// Every problem of the current objects.
    pub fn problems(&self) -> Vec<Problem> {
        self.problems.values().flatten().cloned().collect()
    }

    /// Re-read one Service (None: deleted).
    fn read_service(&mut self, key: &ObjKey, svc: Option<impl ServiceInput>) {
        let name = svc_name(key);
        self.problems.remove(&(Kind::Service, key.clone()));
        let mut ports = Vec::new();
        if let Some(svc) = svc {
            let mut p = Vec::new();
            ports = svc.into_ports(&mut p);
            if !p.is_empty() {
                self.problems.insert((Kind::Service, key.clone()), p);
            }
        }
        self.fresh.insert(name, ports);
    }

    /// Re-read one EndpointSlice (None: deleted). Returns the Services it belonged to, before
    /// and after.
    fn read_slice(&mut self, key: &ObjKey, slice: Option<impl SliceInput>) -> Vec<ServiceName> {
        let mut touched = Vec::new();
        self.problems.remove(&(Kind::Slice, key.clone()));
        if let Some(old) = self.slices.remove(key) {
            let idx = (old.service.clone(), old.family);
            if let Some(set) = self.by_service.get_mut(&idx) {
                set.retain(|k| k != key);
                if set.is_empty() {
                    self.by_service.remove(&idx);
                }
            }
            touched.push(old.service);
        }
        if let Some(slice) = slice {
            let mut p = Vec::new();
            if let Some(info) = slice.into_info(&self.node.name, &mut p) {
                let set = self
                    .by_service
                    .entry((info.service.clone(), info.family))
                    .or_default();
                if let Err(at) = set.binary_search(key) {
                    set.insert(at, key.clone());
                }
                touched.push(info.service.clone());
                self.slices.insert(key.clone(), info);
            }
            if !p.is_empty() {
                self.problems.insert((Kind::Slice, key.clone()), p);
            }
        }
        touched
    }

    /// Recompute the port states of one Service from its ports (re-read, or else as they are)
    /// and its slices.
    fn rebuild_service(&mut self, svc: &ServiceName) {
        let fresh = self.fresh.remove(svc);
        // Keyed by family too: a dual-stack Service has one port state per family under the
        // same PortKey, and a slice-only change must carry both sides over.
        let mut previous: BTreeMap<(Family, PortKey), Arc<proxy::PortState>> = BTreeMap::new();
        for (f, fs) in self.state.families.iter_mut() {
            let old: Vec<PortKey> = compile::service_ports(&fs.ports, svc)
                .map(|ps| ps.sp.key.clone())
                .collect();
            for k in old {
                if let Some(ps) = fs.ports.remove(&k) {
                    previous.insert((*f, k), ps);
                }
            }
        }
        let ports = fresh.unwrap_or_else(|| previous.values().map(|ps| ps.sp.clone()).collect());
        let mut merged = BTreeMap::new();
        for sp in &ports {
            let eps = merged.entry(sp.family).or_insert_with(|| {
                self.by_service
                    .get(&(svc.clone(), sp.family))
                    .map(|keys| model::merge_slices(keys.iter().filter_map(|k| self.slices.get(k))))
            });
            let mut ps =
                proxy::port_state(sp, eps.as_ref(), &self.node.name, self.node.zone.as_deref());
            if let Some(old) = previous.get(&(sp.family, sp.key.clone())) {
                ps.chosen.cluster = stable_slots(&old.chosen.cluster, &ps.chosen.cluster);
                ps.chosen.local = stable_slots(&old.chosen.local, &ps.chosen.local);
            }
            self.state
                .families
                .entry(sp.family)
                .or_default()
                .ports
                .insert(sp.key.clone(), Arc::new(ps));
        }
    }

    /// Apply what the watches delivered; returns the Services whose port states may have
    /// changed (all of them after a relist).
    pub fn apply(
        &mut self,
        services: Batch<impl ServiceInput>,
        slices: Batch<impl SliceInput>,
    ) -> BTreeSet<ServiceName> {
        let mut touched = BTreeSet::new();
        if let Some(all) = slices.replaced {
            let gone: Vec<ObjKey> = self
                .slice_keys()
                .into_iter()
                .filter(|k| !all.contains_key(k))
                .collect();
            for k in gone {
                touched.extend(self.read_slice(&k, None::<EndpointSlice>));
            }
            // By value: each object is freed once read, so a full list's objects (192 MiB of
            // them at 50k Services x 5) shrink while the model grows instead of adding to it.
            for (k, o) in all {
                touched.extend(self.read_slice(&k, Some(o)));
            }
        }
        for (k, o) in slices.changed {
            touched.extend(self.read_slice(&k, o));
        }
        if let Some(all) = services.replaced {
            let gone: Vec<ObjKey> = self
                .service_keys()
                .into_iter()
                .filter(|k| !all.contains_key(k))
                .collect();
            for k in gone {
                self.read_service(&k, None::<Service>);
                touched.insert(svc_name(&k));
            }
            for (k, o) in all {
                self.read_service(&k, Some(o));
                touched.insert(svc_name(&k));
            }
        }
        for (k, o) in services.changed {
            self.read_service(&k, o);
            touched.insert(svc_name(&k));
        }
        for s in &touched {
            self.rebuild_service(s);
        }
        touched
    }

    /// Keys of every slice known (modelled or only reported as a problem).
    fn slice_keys(&self) -> BTreeSet<ObjKey> {
        self.slices
            .keys()
            .cloned()
            .chain(
                self.problems
                    .keys()
                    .filter(|(kind, _)| *kind == Kind::Slice)
                    .map(|(_, k)| k.clone()),
            )
            .collect()
    }

    fn service_keys(&self) -> BTreeSet<ObjKey> {
        self.service_names()
            .into_iter()
            .map(|n| (n.namespace, n.name))
            .chain(
                self.problems
                    .keys()
                    .filter(|(kind, _)| *kind == Kind::Service)
                    .map(|(_, k)| k.clone()),
            )
            .collect()
    }

    /// The Node changed (zone, addresses): every endpoint choice is redone, from the model alone.
    fn set_node(&mut self, node: &NodeInfo) {
        self.node = node.clone();
        for s in &self.service_names() {
            self.rebuild_service(s);
        }
    }

    fn set_cidrs(&mut self, cidrs: &[IpNet]) {
        self.cidrs = cidrs.to_vec();
        for (f, fs) in self.state.families.iter_mut() {
            fs.service_cidrs = family_cidrs(*f, cidrs);
        }
    }
}

/// What one computation produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub ruleset: Ruleset,
    pub state: Arc<ProxyState>,
    /// Bad input and entry conflicts of the current objects.
    pub problems: Vec<Problem>,
    /// Whether everything was rebuilt (else only `changed` Services were).
    pub rebuilt: bool,
    pub changed: usize,
}

/// The model and the compiled ruleset, kept between syncs.
#[derive(Debug, Default)]
pub struct Engine {
    model: Option<Model>,
    /// None until the first compile, and after a failed one (the next compiles everything).
    compiled: Option<Compiled>,
}

impl Engine {
    /// A Service's endpoints as the model last read them (empty before the first computation).
    pub fn endpoints(&self, svc: &ServiceName, f: Family) -> PortEndpoints {
        self.model
            .as_ref()
            .map(|m| m.endpoints(svc, f))
            .unwrap_or_default()
    }

    /// Bring the desired state up to date with what the watches delivered: only the Services
    /// they touched, unless everything must be rebuilt (first compile, after a failed one, the
    /// Node, the ServiceCIDRs or the configuration changed). The engine starts from nothing:
    /// what it has been given before the first complete output must add up to complete lists
    /// of both kinds. While the first lists arrive, the agent calls this with pieces of them
    /// and throws the outputs away (nothing may be programmed from an incomplete list): the
    /// work is done by the time the lists are complete.
    pub fn compute(
        &mut self,
        services: Batch<impl ServiceInput>,
        slices: Batch<impl SliceInput>,
        node: &NodeInfo,
        cidrs: &[IpNet],
        cfg: &CompileConfig,
    ) -> Result<Output, CompileError> {
        let model = self.model.get_or_insert_with(|| Model::empty(node, cidrs));
        let compiled = self.compiled.take();
        let started = tokio::time::Instant::now();
        let old = model.state().clone();
        let mut changed = model.apply(services, slices);
        let modelled = started.elapsed();
        let mut everything = compiled.is_none();
        if model.node() != node {
            // The node's name never changes (the watch selects it by name); its zone and
            // addresses may.
            model.set_node(node);
            everything = true;
        }
        if model.cidrs() != cidrs {
            model.set_cidrs(cidrs);
            everything = true;
        }
        // On error `self.compiled` stays None: the next computation compiles everything.
        let (compiled, rebuilt) = match compiled {
            Some(mut c) if !everything && c.config() == cfg => {
                let rebuilt = c.update(&old, model.state(), &changed)?;
                (c, rebuilt)
            }
            _ => {
                changed = model.service_names();
                (Compiled::new(model.state(), cfg)?, true)
            }
        };
        let compiled_at = started.elapsed();
        let mut problems = model.problems();
        problems.extend(compiled.problems());
        let out = Output {
            ruleset: compiled.ruleset().clone(),
            state: Arc::new(model.state().clone()),
            problems,
            rebuilt,
            changed: changed.len(),
        };
        self.compiled = Some(compiled);
        tracing::debug!(
            model_ms = modelled.as_secs_f64() * 1000.0,
            compile_ms = (compiled_at - modelled).as_secs_f64() * 1000.0,
            output_ms = (started.elapsed() - compiled_at).as_secs_f64() * 1000.0,
            rebuilt,
            services = out.changed,
            "engine"
        );
        Ok(out)
    }
}

/// Build the proxy state from whole object lists (the engine's from-scratch path).
pub fn proxy_state<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    cidrs: &[IpNet],
    node: &NodeInfo,
    problems: &mut Vec<Problem>,
) -> ProxyState {
    let m = Model::from_objects(services, slices, cidrs, node);
    problems.extend(m.problems());
    m.state().clone()
}

/// The ruleset a set of objects compiles to on `node`, the proxy state it was compiled from and
/// the problems found on the way: exactly what `run` would program. The one from-scratch entry
/// used by `render`, `diff`, the tests and the benchmark.
#[derive(Debug, Clone)]
pub struct FromScratch {
    pub ruleset: Ruleset,
    pub state: ProxyState,
    pub problems: Vec<Problem>,
}

pub fn from_objects(
    objs: &Objects,
    cfg: &ProxyConfig,
    node: &NodeInfo,
) -> Result<FromScratch, CompileError> {
    let mut problems = Vec::new();
    let cidrs = model::service_cidrs(&objs.service_cidrs, &mut problems);
    let state = proxy_state(&objs.services, &objs.slices, &cidrs, node, &mut problems);
    let (ruleset, mut conflicts) = compile::compile_checked(&state, &cfg.compile_config(node))?;
    problems.append(&mut conflicts);
    Ok(FromScratch {
        ruleset,
        state,
        problems,
    })
}

#[cfg(test)]
mod tests;

/// Random objects and change sequences for the property test in `tests`.
#[cfg(test)]
mod gen;
