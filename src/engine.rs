//! The incremental pipeline. Watch events name the objects that changed; only their Services are
//! re-read, re-modelled, given new endpoint choices and re-compiled, so a change costs the size of
//! the changed Services, not of the cluster. Anything that touches every Service (a relist, a
//! change of this Node or of the ServiceCIDRs) rebuilds from scratch.
//!
//! The incremental result is always exactly what the from-scratch path gives for the same
//! objects; `tests` hold it to that over random change sequences.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{self, PortKey, Problem, ServiceName, ServicePort, SliceInfo};
use crate::nft::compile::{self, CompileConfig, CompileError, Compiled};
use crate::nft::ir::{Family, Ruleset};
use crate::proxy::{self, ProxyState};
use crate::snapshot::NodeInfo;

/// Namespace and name of an object.
pub type ObjKey = (String, String);

/// Where the engine reads the current version of a changed object.
pub trait Source {
    fn service(&self, key: &ObjKey) -> Option<Arc<Service>>;
    fn slice(&self, key: &ObjKey) -> Option<Arc<EndpointSlice>>;
}

/// The objects named by watch events since the last computation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// A relist replaced a store: everything may have changed (also objects deleted meanwhile).
    pub all: bool,
    pub services: BTreeSet<ObjKey>,
    pub slices: BTreeSet<ObjKey>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty() && self.slices.is_empty()
    }
}

pub fn key_of(meta: &kube::api::ObjectMeta) -> ObjKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
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
    services: HashMap<ServiceName, Vec<ServicePort>>,
    slices: HashMap<ObjKey, SliceInfo>,
    /// The slices of each Service and family, in name order (merging is order-sensitive only
    /// for duplicates, and then deterministic).
    by_service: HashMap<(ServiceName, Family), BTreeSet<ObjKey>>,
    problems: HashMap<(Kind, ObjKey), Vec<Problem>>,
    state: ProxyState,
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
            state.families.entry(f).or_default().service_cidrs = cidrs
                .iter()
                .filter(|n| {
                    matches!(
                        (n, f),
                        (IpNet::V4(_), Family::Ip) | (IpNet::V6(_), Family::Ip6)
                    )
                })
                .copied()
                .collect();
        }
        Model {
            node: node.clone(),
            cidrs: cidrs.to_vec(),
            services: HashMap::new(),
            slices: HashMap::new(),
            by_service: HashMap::new(),
            problems: HashMap::new(),
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
        let all: Vec<ServiceName> = m.services.keys().cloned().collect();
        for s in &all {
            m.rebuild_service(s);
        }
        m
    }

    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn cidrs(&self) -> &[IpNet] {
        &self.cidrs
    }

    /// Every problem of the current objects.
    pub fn problems(&self) -> Vec<Problem> {
        self.problems.values().flatten().cloned().collect()
    }

    /// Re-read one Service (None: deleted).
    fn read_service(&mut self, key: &ObjKey, svc: Option<&Service>) {
        let name = svc_name(key);
        self.problems.remove(&(Kind::Service, key.clone()));
        self.services.remove(&name);
        if let Some(svc) = svc {
            let mut p = Vec::new();
            let ports = model::service_ports(svc, &mut p);
            if !ports.is_empty() {
                self.services.insert(name, ports);
            }
            if !p.is_empty() {
                self.problems.insert((Kind::Service, key.clone()), p);
            }
        }
    }

    /// Re-read one EndpointSlice (None: deleted). Returns the Services it belonged to, before
    /// and after.
    fn read_slice(&mut self, key: &ObjKey, slice: Option<&EndpointSlice>) -> Vec<ServiceName> {
        let mut touched = Vec::new();
        self.problems.remove(&(Kind::Slice, key.clone()));
        if let Some(old) = self.slices.remove(key) {
            let idx = (old.service.clone(), old.family);
            if let Some(set) = self.by_service.get_mut(&idx) {
                set.remove(key);
                if set.is_empty() {
                    self.by_service.remove(&idx);
                }
            }
            touched.push(old.service);
        }
        if let Some(slice) = slice {
            let mut p = Vec::new();
            if let Some(info) = model::slice_info(slice, &self.node.name, &mut p) {
                self.by_service
                    .entry((info.service.clone(), info.family))
                    .or_default()
                    .insert(key.clone());
                touched.push(info.service.clone());
                self.slices.insert(key.clone(), info);
            }
            if !p.is_empty() {
                self.problems.insert((Kind::Slice, key.clone()), p);
            }
        }
        touched
    }

    /// Recompute the port states of one Service from its ports and slices.
    fn rebuild_service(&mut self, svc: &ServiceName) {
        for fs in self.state.families.values_mut() {
            let keys: Vec<PortKey> = compile::service_ports(&fs.ports, svc)
                .map(|ps| ps.sp.key.clone())
                .collect();
            for k in keys {
                fs.ports.remove(&k);
            }
        }
        let Some(ports) = self.services.get(svc) else {
            return;
        };
        let mut merged = BTreeMap::new();
        for sp in ports {
            let eps = merged.entry(sp.family).or_insert_with(|| {
                self.by_service
                    .get(&(svc.clone(), sp.family))
                    .map(|keys| model::merge_slices(keys.iter().filter_map(|k| self.slices.get(k))))
            });
            let ps =
                proxy::port_state(sp, eps.as_ref(), &self.node.name, self.node.zone.as_deref());
            self.state
                .families
                .entry(sp.family)
                .or_default()
                .ports
                .insert(sp.key.clone(), ps);
        }
    }

    /// Apply the changes named in `dirty` (read from `src`); returns the Services whose port
    /// states may have changed.
    pub fn update(&mut self, src: &dyn Source, dirty: &Dirty) -> BTreeSet<ServiceName> {
        let mut touched = BTreeSet::new();
        for key in &dirty.slices {
            let obj = src.slice(key);
            touched.extend(self.read_slice(key, obj.as_deref()));
        }
        for key in &dirty.services {
            let obj = src.service(key);
            self.read_service(key, obj.as_deref());
            touched.insert(svc_name(key));
        }
        for s in &touched {
            self.rebuild_service(s);
        }
        touched
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
    current: Option<(Model, Compiled)>,
}

impl Engine {
    /// Forget everything: the next computation rebuilds from the full lists.
    pub fn reset(&mut self) {
        self.current = None;
    }

    /// Bring the desired state up to date. `all` lists every object and is only called when
    /// a rebuild is needed (first run, relist, Node or ServiceCIDR change).
    pub fn compute(
        &mut self,
        src: &dyn Source,
        dirty: &Dirty,
        all: impl FnOnce() -> (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>),
        node: &NodeInfo,
        cidrs: &[IpNet],
        cfg: &CompileConfig,
    ) -> Result<Output, CompileError> {
        let reuse = self.current.take().filter(|(m, c)| {
            !dirty.all && m.node() == node && m.cidrs() == cidrs && c.config() == cfg
        });
        let (model, compiled, rebuilt, changed) = match reuse {
            Some((mut model, mut compiled)) => {
                let old = model.state().clone();
                let changed = model.update(src, dirty);
                let rebuilt = match compiled.update(&old, model.state(), &changed) {
                    Ok(r) => r,
                    Err(e) => {
                        self.current = None;
                        return Err(e);
                    }
                };
                (model, compiled, rebuilt, changed.len())
            }
            None => {
                let (services, slices) = all();
                let model = Model::from_objects(
                    services.iter().map(|s| s.as_ref()),
                    slices.iter().map(|s| s.as_ref()),
                    cidrs,
                    node,
                );
                let compiled = Compiled::new(model.state(), cfg)?;
                let n = model.services.len();
                (model, compiled, true, n)
            }
        };
        let mut problems = model.problems();
        problems.extend(compiled.problems());
        let out = Output {
            ruleset: compiled.ruleset().clone(),
            state: Arc::new(model.state().clone()),
            problems,
            rebuilt,
            changed,
        };
        self.current = Some((model, compiled));
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
