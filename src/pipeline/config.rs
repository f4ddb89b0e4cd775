//! The settings that shape the ruleset, validated: where NodePorts listen, what is masqueraded.
//! Built once from the command line or the configuration file (`cmd`), then turned into the
//! compiler's [`CompileConfig`] for the current Node.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::NodeInfo;
use crate::net::Family;
use crate::nft::compile::CompileConfig;

/// A `--nodeport-addresses` entry that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum NodePortAddressError {
    #[error("--nodeport-addresses: {0:?} is neither a CIDR nor `primary`")]
    Invalid(String),
    /// kube-proxy's nftables mode logs "--nodeport-addresses includes localhost but localhost
    /// NodePorts are not supported" and serves nothing there; a list of only such entries would
    /// silently serve NodePorts nowhere, so it is refused.
    #[error("--nodeport-addresses: {0} is loopback only: NodePorts are never served on localhost (as in kube-proxy's nftables mode); use `primary` or the node's own CIDRs")]
    Loopback(String),
}

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
                let net = r
                    .parse::<IpNet>()
                    .map_err(|_| NodePortAddressError::Invalid(r.to_string()))?
                    .trunc();
                // Entirely loopback (127.0.0.0/8 and inside it, ::1/128).
                if net.network().is_loopback() && net.broadcast().is_loopback() {
                    return Err(NodePortAddressError::Loopback(net.to_string()));
                }
                out.cidrs.push(net);
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

/// How traffic from this node's pods is told apart from other traffic (kube-proxy's
/// `--detect-local-mode`): pod traffic to a ClusterIP is not masqueraded, and pod traffic to an
/// externalTrafficPolicy Local entry goes to every endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DetectLocal {
    /// ClusterCIDR when cluster CIDRs are given, else NodeCIDR: works with no configuration on
    /// clusters whose Nodes carry `spec.podCIDRs` (kube-proxy's empty mode means ClusterCIDR,
    /// which without a CIDR detects nothing).
    #[default]
    Auto,
    /// Sources in `--cluster-cidr` are pods.
    ClusterCidr,
    /// Sources in this Node's `spec.podCIDRs` are pods (followed as the Node changes).
    NodeCidr,
    /// Packets arriving on the bridge named by `pod_interface` come from pods.
    BridgeInterface,
    /// Packets arriving on interfaces whose name starts with `pod_interface` come from pods.
    InterfaceNamePrefix,
}

impl DetectLocal {
    /// kube-proxy's spelling (`--detect-local-mode`, `detectLocalMode`); the interface-based
    /// modes are refused with the reason.
    pub fn parse(s: &str) -> Result<DetectLocal, String> {
        match s {
            "" => Ok(DetectLocal::Auto),
            "ClusterCIDR" => Ok(DetectLocal::ClusterCidr),
            "NodeCIDR" => Ok(DetectLocal::NodeCidr),
            "BridgeInterface" => Ok(DetectLocal::BridgeInterface),
            "InterfaceNamePrefix" => Ok(DetectLocal::InterfaceNamePrefix),
            other => Err(format!(
                "{other:?} is not a detect-local mode (ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix)"
            )),
        }
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
    pub detect_local: DetectLocal,
    /// The bridge (BridgeInterface) or the name prefix (InterfaceNamePrefix) of pod
    /// interfaces; unused by the CIDR modes.
    pub pod_interface: String,
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

    /// The CIDRs whose sources are this node's pods, by the detect-local mode.
    pub fn local_cidrs(&self, node: &NodeInfo) -> Vec<IpNet> {
        match self.detect_local {
            DetectLocal::ClusterCidr => self.cluster_cidrs.clone(),
            DetectLocal::NodeCidr => node.pod_cidrs.clone(),
            DetectLocal::Auto if !self.cluster_cidrs.is_empty() => self.cluster_cidrs.clone(),
            DetectLocal::Auto => node.pod_cidrs.clone(),
            DetectLocal::BridgeInterface | DetectLocal::InterfaceNamePrefix => Vec::new(),
        }
    }

    /// The interfaces pod traffic arrives on, by the detect-local mode (`"veth*"` for a name
    /// prefix, as nft writes it).
    pub fn local_ifaces(&self) -> Vec<String> {
        match self.detect_local {
            DetectLocal::BridgeInterface => vec![self.pod_interface.clone()],
            DetectLocal::InterfaceNamePrefix => vec![format!("{}*", self.pod_interface)],
            _ => Vec::new(),
        }
    }

    pub fn compile_config(&self, node: &NodeInfo) -> CompileConfig {
        CompileConfig {
            masquerade_mark: 1u32 << self.masquerade_bit,
            masquerade_all: self.masquerade_all,
            cluster_cidrs: self.local_cidrs(node),
            local_ifaces: self.local_ifaces(),
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
    fn detect_local_modes() {
        let node = NodeInfo {
            pod_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
            ..NodeInfo::default()
        };
        let mut cfg = ProxyConfig {
            node_name: "n".into(),
            cluster_cidrs: vec![],
            masquerade_all: false,
            masquerade_bit: 14,
            nodeport: NodePortAddresses::parse(&[]).unwrap(),
            detect_local: DetectLocal::Auto,
            pod_interface: String::new(),
        };
        // No cluster CIDR: the Node's pod CIDRs, with no configuration.
        assert_eq!(cfg.local_cidrs(&node), node.pod_cidrs);
        cfg.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
        assert_eq!(cfg.local_cidrs(&node), cfg.cluster_cidrs);
        cfg.detect_local = DetectLocal::NodeCidr;
        assert_eq!(cfg.local_cidrs(&node), node.pod_cidrs);
        cfg.detect_local = DetectLocal::ClusterCidr;
        cfg.cluster_cidrs.clear();
        assert!(cfg.local_cidrs(&node).is_empty());
        assert_eq!(DetectLocal::parse("NodeCIDR"), Ok(DetectLocal::NodeCidr));
        assert_eq!(
            DetectLocal::parse("BridgeInterface"),
            Ok(DetectLocal::BridgeInterface)
        );
        cfg.detect_local = DetectLocal::InterfaceNamePrefix;
        cfg.pod_interface = "veth".into();
        assert!(cfg.local_cidrs(&node).is_empty());
        assert_eq!(cfg.local_ifaces(), vec!["veth*".to_string()]);
        cfg.detect_local = DetectLocal::BridgeInterface;
        cfg.pod_interface = "cbr0".into();
        assert_eq!(cfg.local_ifaces(), vec!["cbr0".to_string()]);
        assert!(DetectLocal::parse("nodecidr").is_err());
        for lo in ["127.0.0.0/8", "127.0.0.1/32", "::1/128"] {
            assert!(matches!(
                NodePortAddresses::parse(&[lo.into()]),
                Err(NodePortAddressError::Loopback(_))
            ));
        }
        assert!(NodePortAddresses::parse(&["0.0.0.0/0".into()]).is_ok());
    }

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
