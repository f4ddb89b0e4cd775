//! ClientIP affinity entries are written by the packet path (`update @ip-affinity` in
//! postrouting) and expire on their own; but one pointing at an endpoint that is gone would keep
//! its client on a dead pod until then. After each sync, entries whose endpoint is no longer a
//! backend of their entry point are deleted.

use crate::nft::names;
use std::collections::{BTreeMap, BTreeSet};

use imbl::ordmap::DiffItem;

use crate::apply::{Applier, ApplyError};
use crate::net::Family;
use crate::nft::ir::{Element, Value};
use crate::nft::tx::{Op, Transaction};
use crate::proxy::ProxyState;

/// Entry point key (as in the affinity maps, without the client) -> endpoints it may use.
type Valid = BTreeMap<Vec<Value>, BTreeSet<Vec<Value>>>;

/// Valid endpoints per address entry and per NodePort entry.
fn backends(state: &ProxyState, f: Family) -> (Valid, Valid) {
    let (mut ip, mut np) = (BTreeMap::new(), BTreeMap::new());
    let Some(fs) = state.families.get(&f) else {
        return (ip, np);
    };
    for ps in fs.ports.values().filter(|p| p.sp.affinity_secs.is_some()) {
        let sp = &ps.sp;
        let eps: BTreeSet<Vec<Value>> = ps
            .chosen
            .cluster
            .iter()
            .chain(&ps.chosen.local)
            .map(|(a, p)| vec![Value::Addr(*a), Value::Port(*p)])
            .collect();
        let proto = Value::Proto(sp.key.proto);
        for addr in std::iter::once(&sp.cluster_ip)
            .chain(&sp.external_ips)
            .chain(&sp.lb_ips)
        {
            ip.insert(
                vec![Value::Addr(*addr), proto.clone(), Value::Port(sp.port)],
                eps.clone(),
            );
        }
        if let Some(n) = sp.node_port {
            np.insert(vec![proto.clone(), Value::Port(n)], eps.clone());
        }
    }
    (ip, np)
}

/// Whether an affinity service port lost an endpoint (its affinity entries may point to it).
pub fn lost(prev: &ProxyState, current: &ProxyState) -> bool {
    let empty = imbl::OrdMap::new();
    prev.families.iter().any(|(f, fs)| {
        let now = current.families.get(f).map(|c| &c.ports).unwrap_or(&empty);
        fs.ports.diff(now).any(|d| match d {
            DiffItem::Remove(_, p) => p.sp.affinity_secs.is_some(),
            DiffItem::Update {
                old: (_, p),
                new: (_, n),
            } => {
                p.sp.affinity_secs.is_some()
                    && p.chosen
                        .cluster
                        .iter()
                        .chain(&p.chosen.local)
                        .any(|b| !n.chosen.cluster.contains(b) && !n.chosen.local.contains(b))
            }
            DiffItem::Add(..) => false,
        })
    })
}

/// The affinity elements that point to endpoints their entry no longer has.
pub fn stale(
    elements: &[Element],
    valid: &BTreeMap<Vec<Value>, BTreeSet<Vec<Value>>>,
) -> Vec<Element> {
    elements
        .iter()
        .filter(|e| {
            match (valid.get(&e.key()[1.min(e.key().len())..]), e.value()) {
                (Some(eps), Some(v)) => !eps.contains(v),
                // The service lost affinity or disappeared: the entry can only mislead.
                (None, _) => true,
                (Some(_), None) => false,
            }
        })
        .cloned()
        .collect()
}

/// Delete stale affinity entries of both maps of every family. Best effort: an entry that
/// expires between the dump and the delete fails the batch, which is then retried once.
pub fn clean<A: Applier>(
    a: &mut A,
    state: &ProxyState,
    families: &[Family],
) -> Result<usize, ApplyError> {
    let mut total = 0;
    for &f in families {
        let (ip, np) = backends(state, f);
        for _attempt in 0..2 {
            let mut ops = Vec::new();
            for (map, valid) in [(names::IP_AFFINITY, &ip), (names::NP_AFFINITY, &np)] {
                let els: Vec<Element> = a
                    .list_elements(f, map)?
                    .into_iter()
                    .map(|(e, _)| e)
                    .collect();
                let dead = stale(&els, valid);
                if !dead.is_empty() {
                    let def = crate::nft::compile::affinity_def(f, map == names::NP_AFFINITY);
                    ops.push(Op::DeleteElements {
                        family: f,
                        set: map.into(),
                        def,
                        elements: dead.into_iter().collect(),
                    });
                }
            }
            let n: usize = ops
                .iter()
                .map(|o| {
                    if let Op::DeleteElements { elements, .. } = o {
                        elements.len()
                    } else {
                        0
                    }
                })
                .sum();
            if n == 0 {
                break;
            }
            match a.apply(&Transaction { ops }) {
                Ok(()) => {
                    total += n;
                    break;
                }
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_affinity_port_losing_an_endpoint_is_noticed() {
        let mut objs = crate::testutil::cluster_objects();
        let before = crate::testutil::node_a_state(&objs);
        for s in objs.slices.iter_mut() {
            s.endpoints.clear();
        }
        let after = crate::testutil::node_a_state(&objs);
        assert!(lost(&before, &after));
        assert!(!lost(&after, &after));
        assert!(!lost(&before, &before));
    }

    fn v(ip: &str, port: u16) -> Vec<Value> {
        vec![Value::Addr(ip.parse().unwrap()), Value::Port(port)]
    }

    #[test]
    fn only_entries_to_gone_endpoints_are_stale() {
        let entry = vec![
            Value::Addr("172.30.0.19".parse().unwrap()),
            Value::Proto(crate::net::Proto::Tcp),
            Value::Port(80),
        ];
        let valid: BTreeMap<_, _> =
            [(entry.clone(), [v("10.0.2.9", 8080)].into_iter().collect())].into();
        let mk = |client: &str, ep: Vec<Value>| {
            let mut key = vec![Value::Addr(client.parse().unwrap())];
            key.extend(entry.clone());
            Element::new(key, Some(ep))
        };
        let keep = mk("10.0.1.50", v("10.0.2.9", 8080));
        let dead = mk("10.0.1.51", v("10.0.2.10", 8080));
        let mut other_key = vec![
            Value::Addr("10.0.1.52".parse().unwrap()),
            Value::Addr("172.30.0.99".parse().unwrap()),
            Value::Proto(crate::net::Proto::Tcp),
            Value::Port(80),
        ];
        let orphan = Element::new(std::mem::take(&mut other_key), Some(v("10.0.2.9", 8080)));
        assert_eq!(
            stale(&[keep, dead.clone(), orphan.clone()], &valid),
            vec![dead, orphan]
        );
    }
}
