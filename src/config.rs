//! Command-line flags (kube-proxy's names and defaults) and the validated configuration.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::nft::compile::CompileConfig;
use crate::nft::ir::Family;
use crate::snapshot::NodeInfo;

#[derive(Debug, Parser)]
#[command(
    name = "nftproxy",
    version,
    about = "A kube-proxy replacement that programs nftables: Services and EndpointSlices to one atomic nftables ruleset per IP family."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch the API, program nftables, serve health ports and metrics.
    Run(RunArgs),
    /// Print the exact nft ruleset `run` would program for objects read from a file (offline).
    Render(RenderArgs),
    /// Delete nftproxy's nftables tables (ip and ip6). Idempotent.
    Cleanup(CleanupArgs),
    /// Compare the live nftables tables on this node with what `run` would program now, and
    /// print per Service port what is missing or extra. Reads the kernel, changes nothing.
    /// Exit status: 0 equal, 1 different, 2 error.
    Diff(DiffArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags shared by `run` and `render`: everything that shapes the ruleset.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// This node's name (endpoint locality and the Node watch). Default: $NODE_NAME, else the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    /// Pod CIDRs, comma-separated. Traffic from them is pod traffic: not masqueraded to ClusterIPs,
    /// and short-circuited to all endpoints under externalTrafficPolicy Local.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs (SNAT to the node), not only off-cluster sources.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Addresses that accept NodePort traffic: CIDRs (comma-separated), or `primary` for the
    /// Node's InternalIP per family. Loopback is never included.
    #[arg(long, value_delimiter = ',', default_value = "primary")]
    pub nodeport_addresses: Vec<String>,
    /// The fwmark bit that tags packets for masquerade (0-31).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u32).range(0..32))]
    pub masquerade_bit: u32,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Kubeconfig file. Default: in-cluster config, else $KUBECONFIG, else ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The API server's real address (`https://HOST:PORT`), overriding the kubeconfig's or the
    /// in-cluster one (kube-proxy's `--master`). A node without kube-proxy needs it: the
    /// in-cluster address is the `kubernetes` Service, which only nftproxy itself programs.
    #[arg(long, env = "NFTPROXY_MASTER")]
    pub master: Option<String>,
    /// Agent health server (/healthz, /livez).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
    /// Prometheus metrics server (/metrics).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,
    /// Full resync and self-heal interval.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// Coalescing window for bursts of changes.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// How long to wait for the initial lists before programming anyway.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub initial_sync_timeout: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Testing only: while this file exists every commit fails (exercises retries and /livez).
    #[arg(long, hide = true)]
    pub fault_inject_file: Option<std::path::PathBuf>,
    /// Log verbosity: 0 warnings, 1 info (one line per sync), 2 debug, 3+ trace.
    #[arg(short = 'v', long, default_value_t = 1)]
    pub verbosity: u8,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Objects (Services, EndpointSlices, Node, ServiceCIDRs) as YAML or JSON: multi-document,
    /// a List, or a JSON array. `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
}

#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Objects to compare with, like `render -f` (instead of listing them from the API).
    #[arg(short = 'f', long = "filename")]
    pub file: Option<String>,
    /// Kubeconfig file (when listing from the API). Default: in-cluster config, else
    /// $KUBECONFIG, else ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The API server's real address, as for `run`.
    #[arg(long, env = "NFTPROXY_MASTER")]
    pub master: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Also delete kube-proxy's nftables tables (`ip kube-proxy`, `ip6 kube-proxy`) when
    /// migrating a node from kube-proxy.
    #[arg(long)]
    pub kube_proxy: bool,
}

/// Parse `30s`, `100ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--nodeport-addresses: {0:?} is neither a CIDR nor `primary`")]
    NodePortAddress(String),
}

/// Where NodePorts listen, before the Node's addresses are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortAddresses {
    pub primary: bool,
    pub cidrs: Vec<IpNet>,
}

impl NodePortAddresses {
    pub fn parse(raw: &[String]) -> Result<Self, ConfigError> {
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
                        .map_err(|_| ConfigError::NodePortAddress(r.to_string()))?
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
    pub fn from_args(a: &ProxyArgs) -> Result<Self, ConfigError> {
        let node_name = a
            .hostname_override
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(hostname);
        Ok(ProxyConfig {
            node_name,
            cluster_cidrs: a.cluster_cidr.iter().map(|n| n.trunc()).collect(),
            masquerade_all: a.masquerade_all,
            masquerade_bit: a.masquerade_bit,
            nodeport: NodePortAddresses::parse(&a.nodeport_addresses)?,
        })
    }

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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

pub fn parse_ip_list(s: &str) -> Vec<IpAddr> {
    s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5x").is_err());
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
