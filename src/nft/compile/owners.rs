//! Which Service each element of a compiled ruleset belongs to, so a big commit can be cut into
//! transactions that each add, change or remove whole Services (`plan::split`).
//!
//! Every per-Service element is keyed by an entry point (address . protocol . port, or
//! protocol . NodePort), possibly with one more component (a numgen slot, a source range), or
//! is a ClusterIP alone. The owner of an entry point is the Service whose port has it, in the
//! old or the new state. Services that share an entry point (one deleted and another created
//! with its address in the same sync, or two claiming one address:port) become one group: a
//! transaction that changed the entry without the rest of either Service would show a Service
//! half programmed.

use std::hash::{Hash, Hasher};

use rustc_hash::{FxHashMap, FxHasher};

use super::{entry_keys, is_backends_map};
use crate::model::ServiceName;
use crate::nft::ir::{Element, Value};
use crate::nft::names;
use crate::nft::tx::Group;
use crate::proxy::ProxyState;

/// Entry points -> Service groups, for one commit. Entry points are kept as hashes: a collision
/// only puts two Services into one group (fewer, larger transactions), never an element into a
/// wrong place, since the groups only decide the order of a commit whose end state is fixed.
#[derive(Debug, Default)]
pub struct Owners {
    entries: FxHashMap<u64, u32>,
    /// Union-find over Service ids; flattened after building, so `parent[i]` is the root.
    parent: Vec<u32>,
}

fn hash(entry: &[Value]) -> u64 {
    let mut h = FxHasher::default();
    entry.hash(&mut h);
    h.finish()
}

impl Owners {
    /// The owners of every entry point in `states` (typically the state being committed and the
    /// one committed before).
    pub fn new<'a>(states: impl IntoIterator<Item = &'a ProxyState>) -> Owners {
        let mut o = Owners::default();
        let mut ids: FxHashMap<&'a ServiceName, u32> = FxHashMap::default();
        // Elements of other kinds that reach this Service's entry points: linked once every
        // entry point is known (`reach`).
        let mut reach: Vec<(u64, u32)> = Vec::new();
        for state in states {
            for fs in state.families.values() {
                for (key, ps) in &fs.ports {
                    let next = ids.len() as u32;
                    let id = *ids.entry(&key.service).or_insert(next);
                    if id as usize == o.parent.len() {
                        o.parent.push(id);
                    }
                    o.claim(hash(&[Value::Addr(ps.sp.cluster_ip)]), id);
                    for entry in entry_keys(&ps.sp) {
                        if let [addr, proto, port] = entry.as_slice() {
                            // The cluster-ips element (a ClusterIP alone) rejects every port
                            // of its address that the services map does not take: it reaches
                            // the external and LoadBalancer IP entry points of any other
                            // Service on that address.
                            reach.push((hash(std::slice::from_ref(addr)), id));
                            // A NodePort (protocol . port) takes that port on every local
                            // address that no external entry point takes first: it reaches an
                            // external or LoadBalancer IP that is a node address (externalIPs
                            // set to node IPs, ServiceLB-style LoadBalancer status).
                            reach.push((hash(&[proto.clone(), port.clone()]), id));
                        }
                        o.claim(hash(&entry), id);
                    }
                }
            }
        }
        // Such Services go into the same transactions, or one would be seen half programmed
        // (rejecting, or taken by the other's NodePort) before its own elements arrive. A
        // ClusterIP alone and a NodePort are the only two-or-fewer-part keys an entry point is
        // claimed as, so only those link; a port that merely equals some NodePort's number on
        // an address that is no node's merges two groups for nothing, which costs nothing.
        for (k, id) in reach {
            if o.entries.contains_key(&k) {
                o.claim(k, id);
            }
        }
        for i in 0..o.parent.len() {
            let root = o.root(i as u32);
            o.parent[i] = root;
        }
        o
    }

    fn root(&self, mut i: u32) -> u32 {
        while self.parent[i as usize] != i {
            i = self.parent[i as usize];
        }
        i
    }

    fn claim(&mut self, entry: u64, id: u32) {
        match self.entries.get(&entry) {
            None => {
                self.entries.insert(entry, id);
            }
            Some(&other) => {
                let (a, b) = (self.root(other), self.root(id));
                if a != b {
                    // The smaller id is the root: deterministic groups.
                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                    self.parent[hi as usize] = lo;
                }
            }
        }
    }

    /// The group of one element of `set`.
    pub fn group(&self, set: &str, e: &Element) -> Group {
        let key = e.key();
        let entry = match set {
            names::L4PROTOS
            | names::CLUSTER_CIDRS
            | names::LOCAL_IFACES
            | names::NODEPORT_ADDRS
            | names::SERVICE_CIDRS => return Group::Skeleton,
            // Marks for masquerade only traffic DNATed to a local endpoint from itself.
            names::HAIRPIN => return Group::Any,
            s if is_backends_map(s) || s == names::FIREWALL_ALLOW => {
                &key[..key.len().saturating_sub(1)]
            }
            _ => key,
        };
        let h = hash(entry);
        match self.entries.get(&h) {
            Some(&id) => Group::Of(u64::from(self.parent[id as usize])),
            // Not an entry point of either state (cannot happen for a ruleset compiled from
            // them): its own group, apart from every Service id.
            None => Group::Of(h | 1 << 63),
        }
    }
}
