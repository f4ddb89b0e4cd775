//! Which UDP conntrack entries went stale with a sync: a UDP service port that lost an endpoint
//! (or had none and gained some) keeps steering existing flows to the old destination until
//! conntrack forgets them, which for DNS and statsd clients reusing their source port is never.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::conntrack::StaleFlow;
use crate::nft::ir::Proto;
use crate::proxy::{PortState, ProxyState};

fn serving(ps: &PortState) -> BTreeSet<IpAddr> {
    ps.chosen
        .cluster
        .iter()
        .chain(ps.chosen.local.iter())
        .map(|(ip, _)| *ip)
        .collect()
}

/// The flows to clean after moving from `previous` to `current`.
pub fn stale_udp_flows(previous: Option<&ProxyState>, current: &ProxyState) -> Vec<StaleFlow> {
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
        for (key, ps) in &fs.ports {
            if key.proto != Proto::Udp {
                continue;
            }
            let Some(old) = old_fs.ports.get(key) else {
                continue;
            };
            let (before, now) = (serving(old), serving(ps));
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
                out.push(StaleFlow {
                    dst: None,
                    port: np,
                    family: *f,
                    keep: keep.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Objects;

    fn state(objs: &Objects) -> ProxyState {
        let node = crate::render_cmd::pick_node(objs, Some("node-a"));
        let mut p = Vec::new();
        crate::snapshot::proxy_state(&objs.services, &objs.slices, &[], &node, &mut p)
    }

    #[test]
    fn only_udp_ports_that_lost_endpoints() {
        let mut objs = Objects::parse(include_str!("../tests/flows/cluster.yaml")).unwrap();
        let before = state(&objs);
        assert!(
            stale_udp_flows(None, &before).is_empty(),
            "no flush on start"
        );
        assert!(stale_udp_flows(Some(&before), &before).is_empty());
        // The UDP service loses its endpoint; a TCP service loses one too.
        for s in objs.slices.iter_mut() {
            let n = s.metadata.name.clone().unwrap_or_default();
            if n == "dns-ipv4" || n == "web-ipv4" {
                s.endpoints.pop();
            }
        }
        let after = state(&objs);
        let flows = stale_udp_flows(Some(&before), &after);
        assert_eq!(
            flows,
            vec![StaleFlow {
                dst: Some("172.30.0.20".parse().unwrap()),
                port: 53,
                family: crate::nft::ir::Family::Ip,
                keep: vec![]
            }]
        );
        // Gaining an endpoint from none also cleans (entries to the bare ClusterIP).
        let flows = stale_udp_flows(Some(&after), &before);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].keep, vec!["10.0.2.12".parse::<IpAddr>().unwrap()]);
    }
}
