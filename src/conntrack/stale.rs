//! Which UDP conntrack entries went stale with a sync: a UDP service port that lost an endpoint
//! (or had none and gained some) keeps steering existing flows to the old destination until
//! conntrack forgets them, which for DNS and statsd clients reusing their source port is never.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::conntrack::StaleFlow;
use crate::net::Proto;
use crate::proxy::{PortState, ProxyState};

fn serving(ps: &PortState) -> BTreeSet<IpAddr> {
    ps.chosen
        .cluster
        .iter()
        .chain(ps.chosen.local.iter())
        .map(|(ip, _)| *ip)
        .collect()
}

/// The flows to clean after moving from `previous` to `current`. NodePort flows are matched on
/// `nodeport_ips` (this node's NodePort addresses); `None` means "any local address" and is
/// only used when those are not single addresses (a pod's own UDP flow to a remote host on the
/// same port number would match it too).
pub fn stale_udp_flows(
    previous: Option<&ProxyState>,
    current: &ProxyState,
    nodeport_ips: Option<&[IpAddr]>,
) -> Vec<StaleFlow> {
    // Without a previous state (start-up) nothing is known to be stale: conntrack is not flushed on
    // restart.
    let Some(previous) = previous else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (f, fs) in &current.families {
        let Some(old_fs) = previous.families.get(f) else {
            continue;
        };
        // Only ports that changed: the maps share everything else, and the diff skips it. A
        // port that is new (a new Service, or a port added to one) had no endpoints before: a
        // client that sent to its address earlier (a DNS client started before its Service)
        // holds an entry that was never translated, and keeps it alive as long as it sends.
        for d in old_fs.ports.diff(&fs.ports) {
            let (key, before, ps) = match d {
                imbl::ordmap::DiffItem::Update {
                    old: (key, old),
                    new: (_, ps),
                } => (key, serving(old), ps),
                imbl::ordmap::DiffItem::Add(key, ps) => (key, BTreeSet::new(), ps),
                imbl::ordmap::DiffItem::Remove(..) => continue,
            };
            if key.proto != Proto::Udp {
                continue;
            }
            let now = serving(ps);
            let lost = before.difference(&now).next().is_some();
            let gained_from_none = before.is_empty() && !now.is_empty();
            if !lost && !gained_from_none {
                continue;
            }
            let keep: Vec<IpAddr> = now.into_iter().collect();
            let sp = &ps.sp;
            for ip in std::iter::once(&sp.cluster_ip)
                .chain(&sp.external_ips)
                .chain(&sp.lb_ips)
            {
                out.push(StaleFlow {
                    dst: Some(*ip),
                    port: sp.port,
                    family: *f,
                    keep: keep.clone(),
                });
            }
            if let Some(np) = sp.node_port {
                match nodeport_ips {
                    Some(ips) => {
                        for ip in ips.iter().filter(|ip| crate::net::Family::of(ip) == *f) {
                            out.push(StaleFlow {
                                dst: Some(*ip),
                                port: np,
                                family: *f,
                                keep: keep.clone(),
                            });
                        }
                    }
                    None => out.push(StaleFlow {
                        dst: None,
                        port: np,
                        family: *f,
                        keep: keep.clone(),
                    }),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::node_a_state as state;

    #[test]
    fn only_udp_ports_that_lost_endpoints() {
        let mut objs = crate::testutil::cluster_objects();
        let before = state(&objs);
        assert!(
            stale_udp_flows(None, &before, None).is_empty(),
            "no flush on start"
        );
        assert!(stale_udp_flows(Some(&before), &before, None).is_empty());
        // The UDP service loses its endpoint; a TCP service loses one too.
        for s in objs.slices.iter_mut() {
            let n = s.metadata.name.clone().unwrap_or_default();
            if n == "dns-ipv4" || n == "web-ipv4" {
                s.endpoints.pop();
            }
        }
        let after = state(&objs);
        let flows = stale_udp_flows(Some(&before), &after, None);
        assert_eq!(
            flows,
            vec![StaleFlow {
                dst: Some("172.30.0.20".parse().unwrap()),
                port: 53,
                family: crate::net::Family::Ip,
                keep: vec![]
            }]
        );
        // Gaining an endpoint from none also cleans (entries to the bare ClusterIP).
        let flows = stale_udp_flows(Some(&after), &before, None);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].keep, vec!["10.0.2.12".parse::<IpAddr>().unwrap()]);
    }

    /// A new UDP Service with endpoints cleans the entries to its addresses (made by clients
    /// that sent before it existed: never translated, kept alive by their own traffic); a new
    /// one without endpoints has nothing to clean yet.
    #[test]
    fn a_new_udp_service_with_endpoints_cleans_its_addresses() {
        let mut objs = crate::testutil::cluster_objects();
        let dns = |n: Option<&str>| n.is_some_and(|n| n == "dns" || n.starts_with("dns-"));
        let (svcs, slices) = (objs.services.clone(), objs.slices.clone());
        objs.services.retain(|s| !dns(s.metadata.name.as_deref()));
        objs.slices.retain(|s| !dns(s.metadata.name.as_deref()));
        let without = state(&objs);
        objs.services = svcs;
        let no_endpoints = state(&objs);
        objs.slices = slices;
        let with = state(&objs);
        assert!(stale_udp_flows(Some(&without), &no_endpoints, None).is_empty());
        let flows = stale_udp_flows(Some(&without), &with, None);
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].dst, Some("172.30.0.20".parse().unwrap()));
        assert_eq!((flows[0].port, flows[0].keep.len()), (53, 1));
        // Then its endpoints come: the same cleaning, as before.
        assert_eq!(stale_udp_flows(Some(&no_endpoints), &with, None), flows);
    }

    #[test]
    fn nodeport_flows_use_the_node_addresses_when_known() {
        let mut objs = crate::testutil::cluster_objects();
        for s in objs
            .services
            .iter_mut()
            .filter(|s| s.metadata.name.as_deref() == Some("dns"))
        {
            let spec = s.spec.as_mut().unwrap();
            spec.type_ = Some("NodePort".into());
            spec.ports.as_mut().unwrap()[0].node_port = Some(30053);
        }
        let before = state(&objs);
        for s in objs
            .slices
            .iter_mut()
            .filter(|s| s.metadata.name.as_deref() == Some("dns-ipv4"))
        {
            s.endpoints.clear();
        }
        let after = state(&objs);
        let node: IpAddr = "192.168.0.2".parse().unwrap();
        let flows = stale_udp_flows(
            Some(&before),
            &after,
            Some(&[node, "fd00:168::2".parse().unwrap()]),
        );
        let np: Vec<_> = flows.iter().filter(|f| f.port == 30053).collect();
        assert_eq!(np.len(), 1, "one per address of the family: {flows:?}");
        assert_eq!(np[0].dst, Some(node));
        let any = stale_udp_flows(Some(&before), &after, None);
        assert!(any.iter().any(|f| f.port == 30053 && f.dst.is_none()));
    }
}
