//! The settings that shape the ruleset, validated: where NodePorts listen, what is masqueraded.
//! Built once from the command line or the configuration file (`cmd`), then turned into the
//! compiler's [`CompileConfig`] for the current Node.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::NodeInfo;
use crate::net::Family;
use crate::nft::compile::CompileConfig;

/// A `--nodeport-addresses` entry that is neither a CIDR nor a keyword.
#[derive(Debug, thiserror::Error)]
#[error("--nodeport-addresses: {0:?} is neither a CIDR nor `primary`")]
pub struct NodePortAddressError(pub String);

/// Where NodePorts listen, before the Node's addresses are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortAddresses {
    pub primary: bool,
    pub cidrs: Vec<IpNet>,
}

impl NodePortAddresses {
    pub fn parse(raw: &[String]) -> Result<Self, NodePortAddressError> {
        let mut out = NodePortAddresses {
            primary: false,
            cidrs: Vec::new(),
        };
        for r in raw.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            if r == "primary" {
                out.primary = true;
            } else {
                out.cidrs.push(
                    r.parse::<IpNet>()
                        .map_err(|_| NodePortAddressError(r.to_string()))?
                        .trunc(),
                );
            }
        }
        if out.cidrs.is_empty() {
            out.primary = true;
        }
        Ok(out)
    }

    /// Resolve against the node: `primary` becomes the InternalIP of each family.
    pub fn resolve(&self, node: &NodeInfo) -> Vec<IpNet> {
        let mut out = self.cidrs.clone();
        if self.primary {
            for f in [Family::Ip, Family::Ip6] {
                if let Some(ip) = node.primary(f) {
                    out.push(IpNet::from(ip));
                }
            }
        }
        out
    }

    /// Whether NodePorts accept every address of `f` (health servers then bind the wildcard).
    pub fn matches_all(&self, f: Family) -> bool {
        self.cidrs.iter().any(|n| {
            n.prefix_len() == 0
                && matches!(
                    (n, f),
                    (IpNet::V4(_), Family::Ip) | (IpNet::V6(_), Family::Ip6)
                )
        })
    }
}

/// Validated, immutable settings shaping the ruleset.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub masquerade_bit: u32,
    pub nodeport: NodePortAddresses,
}

impl ProxyConfig {
    /// The families this node serves: those it has an InternalIP of (both on dual-stack); with no
    /// addresses known yet, IPv4 only.
    pub fn families(node: &NodeInfo) -> Vec<Family> {
        let fams: Vec<Family> = [Family::Ip, Family::Ip6]
            .into_iter()
            .filter(|f| node.primary(*f).is_some())
            .collect();
        if fams.is_empty() {
            vec![Family::Ip]
        } else {
            fams
        }
    }

    /// The addresses the healthCheckNodePort servers listen on: where NodePorts are served.
    pub fn health_addrs(&self, node: &NodeInfo) -> Vec<IpAddr> {
        let cfg = self;
        let all4 = cfg.nodeport.matches_all(Family::Ip);
        let all6 = cfg.nodeport.matches_all(Family::Ip6);
        let mut out = Vec::new();
        if all4 {
            out.push(IpAddr::from([0u8, 0, 0, 0]));
        }
        if all6 {
            out.push(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED));
        }
        for net in cfg.nodeport.resolve(node) {
            let host = net.prefix_len() == net.max_prefix_len();
            let covered = match net.addr() {
                IpAddr::V4(_) => all4,
                IpAddr::V6(_) => all6,
            };
            if covered || net.addr().is_loopback() {
                continue;
            }
            if host {
                out.push(net.addr());
            } else if !out
                .iter()
                .any(|a| a.is_unspecified() && a.is_ipv4() == net.addr().is_ipv4())
            {
                // A CIDR (not a single address): listen everywhere for that family.
                out.push(if net.addr().is_ipv4() {
                    IpAddr::from([0u8, 0, 0, 0])
                } else {
                    IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
                });
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The NodePort addresses on `node` when they are single addresses (None: CIDRs, which
    /// mean any address of the node).
    pub fn nodeport_ips(&self, node: &NodeInfo) -> Option<Vec<IpAddr>> {
        let nets = self.nodeport.resolve(node);
        nets.iter()
            .all(|n| n.prefix_len() == n.max_prefix_len())
            .then(|| nets.iter().map(|n| n.addr()).collect())
    }

    pub fn compile_config(&self, node: &NodeInfo) -> CompileConfig {
        CompileConfig {
            masquerade_mark: 1u32 << self.masquerade_bit,
            masquerade_all: self.masquerade_all,
            cluster_cidrs: self.cluster_cidrs.clone(),
            nodeport_cidrs: self.nodeport.resolve(node),
            node_ips: node.internal_ips.clone(),
            families: Self::families(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_addresses() {
        let n = NodeInfo {
            internal_ips: vec!["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            ..Default::default()
        };
        let p = NodePortAddresses::parse(&["primary".into()]).unwrap();
        assert_eq!(
            p.resolve(&n),
            vec![
                "192.168.0.2/32".parse::<IpNet>().unwrap(),
                "fd00::2/128".parse().unwrap()
            ]
        );
        let c = NodePortAddresses::parse(&["0.0.0.0/0".into()]).unwrap();
        assert!(c.matches_all(Family::Ip) && !c.matches_all(Family::Ip6));
        assert!(NodePortAddresses::parse(&["nope".into()]).is_err());
    }
}
