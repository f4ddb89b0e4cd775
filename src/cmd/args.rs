//! Command-line flags, with kube-proxy's names and defaults.

use std::net::SocketAddr;
use std::time::Duration;

pub use super::kpconfig::parse_duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::k8s::watch::Encoding;
use crate::pipeline::config::{DetectLocal, NodePortAddressError, NodePortAddresses, ProxyConfig};

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

// Parsed once at start; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    /// What happens on this node to one flow, step by step: the entry point, the policy, the
    /// endpoints it can reach and why, whether the client's address is kept, and advice.
    Explain(ExplainArgs),
    /// The Services as programmed on this node, one line per Service port, with the client-IP
    /// verdict for outside traffic.
    #[command(visible_alias = "svc")]
    Services(ServicesArgs),
    /// Per Service and access path: is the client's address kept, replaced or dropped here?
    Report(ReportArgs),
}

/// Where `explain`, `services` and `report` get their answer: the running agent's debug socket;
/// `-f` objects offline (like `render`); with neither, the API's objects and this node's kernel.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Objects (Services, EndpointSlices, Node, ServiceCIDRs) from a file: answer offline for the
    /// node named by --node (or the file's only Node), as `render -f`.
    #[arg(short = 'f', long = "filename")]
    pub file: Option<String>,
    /// The running agent's debug socket (its --debug-socket).
    #[arg(long, default_value = crate::observe::debug::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
    /// Kubeconfig file (without an agent socket and without -f).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The API server's real address, as for `run`.
    #[arg(long, env = "NFTPROXY_MASTER")]
    pub master: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub src: SourceArgs,
    /// The client: IP or IP:PORT ([IPv6]:PORT).
    #[arg(long)]
    pub from: String,
    /// Where it connects: IP:PORT[/tcp|udp|sctp] ([IPv6]:PORT); tcp when not given.
    #[arg(long)]
    pub to: String,
    /// Where the packet enters this node: pod (a pod on it), node (a process on it) or outside.
    /// Default: from the source address (a node address, a pod CIDR, else outside).
    #[arg(long)]
    pub via: Option<String>,
    /// JSON for tools (verdict, service, endpoints, sourceSeenByEndpoint, masquerade, steps,
    /// advice).
    #[arg(long)]
    pub json: bool,
}

/// How `run` reads its initial lists of Services and EndpointSlices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitialLists {
    /// Streamed (one watch with sendInitialEvents) where the API server serves that, else paged.
    Auto,
    /// Always paged (500 objects per request), as kube-proxy does.
    Paging,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub src: SourceArgs,
    /// Only this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only Services of this name.
    pub name: Option<String>,
    /// Only Services with something wrong (no endpoints, Local without a local endpoint, a load
    /// balancer IP without a health check).
    #[arg(long)]
    pub problems: bool,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub src: SourceArgs,
    /// json or yaml (wide is the default text).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
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
    #[arg(long, env = "NODE_NAME", visible_alias = "node")]
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
    /// How this node's pod traffic is recognised: `ClusterCIDR` (sources in --cluster-cidr),
    /// `NodeCIDR` (sources in the Node's spec.podCIDRs), `BridgeInterface` (arriving on
    /// --pod-bridge-interface), `InterfaceNamePrefix` (arriving on interfaces named
    /// --pod-interface-name-prefix*). Default: ClusterCIDR when --cluster-cidr is given, else
    /// NodeCIDR.
    #[arg(long, default_value = "", value_parser = DetectLocal::parse)]
    pub detect_local_mode: DetectLocal,
    /// The pods' bridge, for --detect-local-mode BridgeInterface.
    #[arg(long, default_value = "")]
    pub pod_bridge_interface: String,
    /// The pods' interface name prefix, for --detect-local-mode InterfaceNamePrefix.
    #[arg(long, default_value = "")]
    pub pod_interface_name_prefix: String,
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
    /// How the initial lists of Services and EndpointSlices are read: `auto` streams them
    /// where the API server serves streaming lists (Kubernetes 1.27+ with the WatchList gate;
    /// on by default in 1.36) and pages them otherwise; `paging` always pages.
    #[arg(long, value_enum, default_value = "auto")]
    pub initial_lists: InitialLists,
    /// A commit of more element changes than this (a cold start, a big change) goes to the
    /// kernel as several transactions of about this many, each adding, changing or removing
    /// whole Services, so no single commit holds the kernel for long; 0 commits everything in
    /// one transaction.
    #[arg(long, default_value_t = crate::sync::SPLIT_ELEMENTS)]
    pub max_transaction_elements: usize,
    /// How long to wait for the initial lists before programming anyway.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub initial_sync_timeout: Duration,
    /// Log format (`--logging-format` is kube-proxy's spelling).
    #[arg(long, alias = "logging-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Testing only: while this file exists every commit fails (exercises retries and /livez).
    #[arg(long, hide = true)]
    pub fault_inject_file: Option<std::path::PathBuf>,
    /// Log verbosity: 0 warnings, 1 info (one line per sync), 2 debug, 3+ trace. `--v` is
    /// kube-proxy's spelling (klog levels 2-4 map to debug, 5+ to trace).
    #[arg(short = 'v', long, alias = "v", default_value_t = 1)]
    pub verbosity: u8,
    /// kube-proxy's configuration file (KubeProxyConfiguration v1alpha1, e.g. kubeadm's
    /// config.conf). Flags given on the command line win over it, as in kube-proxy. The agent
    /// exits when the file changes, so that it restarts with the new settings.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// kube-proxy's proxy mode: only `nftables` (or empty) is accepted.
    #[arg(long, value_parser = ["", "nftables"])]
    pub proxy_mode: Option<String>,
    /// The OOM score adjustment of the agent process (kube-proxy's default: -999).
    #[arg(long, default_value_t = -999, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: i32,
    /// Accepted for kube-proxy compatibility; nftproxy serves both IP families of the node.
    #[arg(long)]
    pub bind_address: Option<String>,
    /// The unix socket of the debug endpoints `nftproxy explain`, `services` and `report` ask
    /// (root only; never on the network). Empty: none.
    #[arg(long, default_value = crate::observe::debug::DEFAULT_SOCKET)]
    pub debug_socket: std::path::PathBuf,
    /// kube-proxy's `--bind-address-hard-fail`: exit when the health or metrics port cannot be
    /// bound. Without it (the default) the port is retried every 5 s, as kube-proxy does.
    #[arg(long)]
    pub bind_address_hard_fail: bool,
    /// kube-proxy's `--cleanup`: delete the tables and exit (as `nftproxy cleanup`).
    #[arg(long)]
    pub cleanup: bool,
    /// Conntrack table entries per CPU (nf_conntrack_max = this x CPUs, at least
    /// --conntrack-min; only ever raised). 0 leaves the table size alone.
    #[arg(long, default_value_t = 32768)]
    pub conntrack_max_per_core: u64,
    /// The smallest conntrack table to ask for (with --conntrack-max-per-core > 0).
    #[arg(long, default_value_t = 131072)]
    pub conntrack_min: u64,
    /// nf_conntrack_tcp_timeout_established; 0 leaves it alone.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// nf_conntrack_tcp_timeout_close_wait; 0 leaves it alone.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Set nf_conntrack_tcp_be_liberal (out-of-window TCP packets are not marked INVALID).
    #[arg(long)]
    pub conntrack_tcp_be_liberal: bool,
    /// nf_conntrack_udp_timeout; 0 leaves it alone.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,
    /// nf_conntrack_udp_timeout_stream; 0 leaves it alone.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,
    /// kube-proxy's `--init-only`: do what needs full privileges (the kernel feature probe, the
    /// conntrack sysctls) and exit.
    #[arg(long)]
    pub init_only: bool,
    /// kube-proxy's `--write-config-to`: write the effective configuration (a
    /// KubeProxyConfiguration) to this file and exit.
    #[arg(long)]
    pub write_config_to: Option<std::path::PathBuf>,
    /// Accepted for kube-proxy compatibility, not used (listed at start): nftproxy has no
    /// feature gates.
    #[arg(long)]
    pub feature_gates: Option<String>,
    /// API requests per second the client may send (client-go's rate limit; 0: the default).
    #[arg(long, default_value_t = 5.0)]
    pub kube_api_qps: f64,
    /// Requests the client may send at once before --kube-api-qps applies (0: the default).
    #[arg(long, default_value_t = 10)]
    pub kube_api_burst: u32,
    /// How Services and EndpointSlices are read: `application/vnd.kubernetes.protobuf` (the
    /// default, as kube-proxy's: half the API server's work of JSON) or `application/json`.
    /// Other kinds are always JSON; a server that does not answer in protobuf is read as JSON.
    #[arg(long, value_parser = parse_content_type)]
    pub kube_api_content_type: Option<Encoding>,
}

/// kube-proxy's `--kube-api-content-type` / `clientConnection.contentType` values.
pub fn parse_content_type(s: &str) -> Result<Encoding, String> {
    match s.split(';').next().map(str::trim) {
        Some("application/vnd.kubernetes.protobuf") => Ok(Encoding::Protobuf),
        Some("application/json") => Ok(Encoding::Json),
        _ => Err(format!(
            "{s:?}: application/vnd.kubernetes.protobuf or application/json"
        )),
    }
}

/// A duration as Go prints `metav1.Duration` values in simple cases (`30s`, `50ms`, `1m0s`).
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

impl RunArgs {
    /// The API client's rate limit (0 means kube-proxy's default, as in its config).
    pub fn rate_limit(&self) -> crate::k8s::client::RateLimit {
        use crate::k8s::client::RateLimit;
        RateLimit {
            qps: if self.kube_api_qps > 0.0 {
                self.kube_api_qps
            } else {
                RateLimit::KUBE_PROXY.qps
            },
            burst: if self.kube_api_burst > 0 {
                self.kube_api_burst
            } else {
                RateLimit::KUBE_PROXY.burst
            },
        }
    }

    /// kube-proxy flags given that nftproxy accepts but does not use, with why.
    pub fn unused_flags(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |set: bool, flag: &str, why: &str| {
            if set {
                out.push(format!("{flag}: {why}"));
            }
        };
        note(
            self.feature_gates.is_some(),
            "--feature-gates",
            "nftproxy has no feature gates",
        );
        out
    }

    /// The conntrack sysctls to set at start.
    pub fn conntrack(&self) -> crate::conntrack::sysctl::ConntrackSettings {
        crate::conntrack::sysctl::ConntrackSettings {
            max_per_core: self.conntrack_max_per_core,
            min: self.conntrack_min,
            tcp_established: self.conntrack_tcp_timeout_established,
            tcp_close_wait: self.conntrack_tcp_timeout_close_wait,
            tcp_be_liberal: self.conntrack_tcp_be_liberal,
            udp: self.conntrack_udp_timeout,
            udp_stream: self.conntrack_udp_timeout_stream,
        }
    }

    /// The effective configuration as kube-proxy's `/configz` shows it: a
    /// `KubeProxyConfiguration` (v1alpha1 field names) under `kubeproxy.config.k8s.io`.
    pub fn configz(&self, cfg: &ProxyConfig) -> serde_json::Value {
        serde_json::json!({
            "kubeproxy.config.k8s.io": {
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "mode": "nftables",
                "hostnameOverride": cfg.node_name,
                "bindAddress": self.bind_address.clone().unwrap_or_default(),
                "bindAddressHardFail": self.bind_address_hard_fail,
                "clusterCIDR": cfg.cluster_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
                "healthzBindAddress": self.healthz_bind_address.to_string(),
                "metricsBindAddress": self.metrics_bind_address.to_string(),
                "nodePortAddresses": self.proxy.nodeport_addresses,
                "detectLocalMode": match cfg.detect_local {
                    DetectLocal::Auto => "",
                    DetectLocal::ClusterCidr => "ClusterCIDR",
                    DetectLocal::NodeCidr => "NodeCIDR",
                    DetectLocal::BridgeInterface => "BridgeInterface",
                    DetectLocal::InterfaceNamePrefix => "InterfaceNamePrefix",
                },
                "detectLocal": {
                    "bridgeInterface": self.proxy.pod_bridge_interface,
                    "interfaceNamePrefix": self.proxy.pod_interface_name_prefix,
                },
                "conntrack": {
                    "maxPerCore": self.conntrack_max_per_core,
                    "min": self.conntrack_min,
                    "tcpEstablishedTimeout": go_duration(self.conntrack_tcp_timeout_established),
                    "tcpCloseWaitTimeout": go_duration(self.conntrack_tcp_timeout_close_wait),
                    "tcpBeLiberal": self.conntrack_tcp_be_liberal,
                    "udpTimeout": go_duration(self.conntrack_udp_timeout),
                    "udpStreamTimeout": go_duration(self.conntrack_udp_timeout_stream),
                },
                "oomScoreAdj": self.oom_score_adj,
                "clientConnection": {
                    "kubeconfig": self.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    "qps": self.rate_limit().qps,
                    "burst": self.rate_limit().burst,
                    "contentType": self.kube_api_content_type.unwrap_or(Encoding::Protobuf).content_type(),
                },
                "nftables": {
                    "masqueradeAll": cfg.masquerade_all,
                    "masqueradeBit": cfg.masquerade_bit,
                    "syncPeriod": go_duration(self.sync_period),
                    "minSyncPeriod": go_duration(self.min_sync_period),
                },
                "logging": {
                    "format": match self.log_format {
                        LogFormat::Text => "text",
                        LogFormat::Json => "json",
                    },
                    // klog's scale, as the file reads it back (info 1, debug 4, trace 5).
                    "verbosity": match self.verbosity {
                        0 | 1 => self.verbosity,
                        2 => 4,
                        _ => 5,
                    },
                },
            }
        })
    }

    /// Fill what the command line did not set from kube-proxy's configuration file.
    /// `from_cli(id)` tells whether flag `id` (clap's id: the field name) was given.
    pub fn apply_file(
        &mut self,
        f: &crate::cmd::kpconfig::FromFile,
        from_cli: &dyn Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        let unset = |id: &str| !from_cli(id);
        if let (Some(c), true) = (&f.cluster_cidrs, unset("cluster_cidr")) {
            self.proxy.cluster_cidr = c
                .iter()
                .map(|x| {
                    x.parse()
                        .map_err(|_| ConfigError::File(format!("clusterCIDR: {x:?}")))
                })
                .collect::<Result<_, _>>()?;
        }
        if let (Some(n), true) = (&f.nodeport_addresses, unset("nodeport_addresses")) {
            self.proxy.nodeport_addresses = n.clone();
        }
        if let (Some(h), true) = (&f.hostname_override, unset("hostname_override")) {
            self.proxy.hostname_override = Some(h.clone());
        }
        if let (Some(m), true) = (f.masquerade_all, unset("masquerade_all")) {
            self.proxy.masquerade_all = m;
        }
        if let (Some(b), true) = (f.masquerade_bit, unset("masquerade_bit")) {
            self.proxy.masquerade_bit = b;
        }
        if let (Some(d), true) = (f.detect_local, unset("detect_local_mode")) {
            self.proxy.detect_local_mode = d;
        }
        if let (Some(q), true) = (f.kube_api_qps, unset("kube_api_qps")) {
            self.kube_api_qps = q;
        }
        if let (Some(b), true) = (f.kube_api_burst, unset("kube_api_burst")) {
            self.kube_api_burst = b;
        }
        if let (Some(c), true) = (f.kube_api_content_type, unset("kube_api_content_type")) {
            self.kube_api_content_type = Some(c);
        }
        if let (Some(b), true) = (&f.bridge_interface, unset("pod_bridge_interface")) {
            self.proxy.pod_bridge_interface = b.clone();
        }
        if let (Some(p), true) = (&f.interface_name_prefix, unset("pod_interface_name_prefix")) {
            self.proxy.pod_interface_name_prefix = p.clone();
        }
        let c = &f.conntrack;
        if let (Some(v), true) = (c.max_per_core, unset("conntrack_max_per_core")) {
            self.conntrack_max_per_core = v;
        }
        if let (Some(v), true) = (c.min, unset("conntrack_min")) {
            self.conntrack_min = v;
        }
        if let (Some(v), true) = (
            c.tcp_established,
            unset("conntrack_tcp_timeout_established"),
        ) {
            self.conntrack_tcp_timeout_established = v;
        }
        if let (Some(v), true) = (c.tcp_close_wait, unset("conntrack_tcp_timeout_close_wait")) {
            self.conntrack_tcp_timeout_close_wait = v;
        }
        if let (Some(v), true) = (c.tcp_be_liberal, unset("conntrack_tcp_be_liberal")) {
            self.conntrack_tcp_be_liberal = v;
        }
        if let (Some(v), true) = (c.udp, unset("conntrack_udp_timeout")) {
            self.conntrack_udp_timeout = v;
        }
        if let (Some(v), true) = (c.udp_stream, unset("conntrack_udp_timeout_stream")) {
            self.conntrack_udp_timeout_stream = v;
        }
        if let (Some(a), true) = (f.healthz_bind_address, unset("healthz_bind_address")) {
            self.healthz_bind_address = a;
        }
        if let (Some(a), true) = (f.metrics_bind_address, unset("metrics_bind_address")) {
            self.metrics_bind_address = a;
        }
        if let (Some(d), true) = (f.sync_period, unset("sync_period")) {
            self.sync_period = d;
        }
        if let (Some(d), true) = (f.min_sync_period, unset("min_sync_period")) {
            self.min_sync_period = d;
        }
        if let (Some(k), true) = (&f.kubeconfig, unset("kubeconfig")) {
            self.kubeconfig = Some(k.into());
        }
        if let (Some(b), true) = (f.bind_address_hard_fail, unset("bind_address_hard_fail")) {
            self.bind_address_hard_fail = b;
        }
        if let (Some(o), true) = (f.oom_score_adj, unset("oom_score_adj")) {
            self.oom_score_adj = o;
        }
        if let (Some(j), true) = (f.log_json, unset("log_format")) {
            self.log_format = if j { LogFormat::Json } else { LogFormat::Text };
        }
        if let (Some(v), true) = (f.verbosity, unset("verbosity")) {
            self.verbosity = v;
        }
        Ok(())
    }
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
    /// Delete kube-proxy's leftovers instead of nftproxy's tables: its nftables tables (`ip`/`ip6
    /// kube-proxy`), its iptables chains and its IPVS servers, interface and ipsets. nftproxy's
    /// own tables stay, so this is safe next to the running agent (the last migration step).
    #[arg(long)]
    pub kube_proxy: bool,
}

/// kube-proxy's command line has no subcommand (`kube-proxy --config=... --v=2`): when the first
/// argument is a flag (other than help/version), it means `run`, so kube-proxy's DaemonSet
/// arguments work unchanged.
pub fn with_default_command(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let first = argv.get(1).and_then(|a| a.to_str()).map(str::to_string);
    if let Some(a) = first {
        let help = matches!(a.as_str(), "-h" | "--help" | "-V" | "--version");
        if a.starts_with('-') && !help {
            argv.insert(1, "run".into());
        }
    }
    argv
}

/// An interface name a detect-local mode needs: present and a valid name (at most 15 bytes).
fn required(name: &str, missing: &str) -> Result<String, ConfigError> {
    let n = name.trim();
    if n.is_empty() {
        return Err(ConfigError::DetectLocal(missing.to_string()));
    }
    if n.len() > 15 || n.contains(['*', '/', ' ']) {
        return Err(ConfigError::DetectLocal(format!(
            "{n:?} is not an interface name (at most 15 bytes, no '*', '/' or spaces)"
        )));
    }
    Ok(n.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    DetectLocal(String),
    #[error(transparent)]
    NodePortAddress(#[from] NodePortAddressError),
    #[error("configuration file: {0}")]
    File(String),
}

impl ProxyArgs {
    /// The validated settings these flags describe.
    pub fn proxy_config(&self) -> Result<ProxyConfig, ConfigError> {
        let a = self;
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
            detect_local: a.detect_local_mode,
            pod_interface: match a.detect_local_mode {
                DetectLocal::BridgeInterface => required(
                    &a.pod_bridge_interface,
                    "--detect-local-mode BridgeInterface needs --pod-bridge-interface",
                )?,
                DetectLocal::InterfaceNamePrefix => required(
                    &a.pod_interface_name_prefix,
                    "--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix",
                )?,
                _ => String::new(),
            },
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(argv: &[&str]) -> (RunArgs, clap::ArgMatches) {
        use clap::{CommandFactory, FromArgMatches};
        let argv = with_default_command(argv.iter().map(|a| a.into()).collect());
        let m = Cli::command().try_get_matches_from(argv).expect("parses");
        match Cli::from_arg_matches(&m).expect("args").command {
            Command::Run(r) => (r, m),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn kube_proxys_command_line_means_run() {
        // kubeadm's kube-proxy DaemonSet, with only the binary swapped.
        let (r, _) = run_args(&[
            "nftproxy",
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=node-1",
        ]);
        assert_eq!(
            r.config.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/config.conf"))
        );
        assert_eq!(r.proxy.hostname_override.as_deref(), Some("node-1"));
        let (r, _) = run_args(&[
            "nftproxy",
            "--v=4",
            "--proxy-mode=nftables",
            "--oom-score-adj=-998",
        ]);
        assert_eq!((r.verbosity, r.oom_score_adj), (4, -998));
        assert_eq!(r.proxy_mode.as_deref(), Some("nftables"));
        use clap::{CommandFactory, FromArgMatches};
        let bad = with_default_command(
            ["nftproxy", "--proxy-mode=iptables"]
                .iter()
                .map(|a| a.into())
                .collect(),
        );
        assert!(Cli::command()
            .try_get_matches_from(bad)
            .map(|m| Cli::from_arg_matches(&m))
            .is_err());
        // Help stays help; subcommands stay themselves.
        let help = with_default_command(vec!["nftproxy".into(), "--help".into()]);
        assert_eq!(help.len(), 2);
        let render = with_default_command(vec!["nftproxy".into(), "render".into()]);
        assert_eq!(render[1], "render");
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let file = crate::cmd::kpconfig::FromFile {
            cluster_cidrs: Some(vec!["10.244.0.0/16".into()]),
            sync_period: Some(Duration::from_secs(45)),
            min_sync_period: Some(Duration::from_secs(1)),
            kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
            hostname_override: Some("from-file".into()),
            ..Default::default()
        };
        let (mut r, m) = run_args(&[
            "nftproxy",
            "--config=f",
            "--sync-period=10s",
            "--hostname-override=flag",
        ]);
        let sub = m.subcommand_matches("run").expect("run");
        let from_cli =
            |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        r.apply_file(&file, &from_cli).expect("applies");
        assert_eq!(r.sync_period, Duration::from_secs(10), "the flag wins");
        assert_eq!(
            r.min_sync_period,
            Duration::from_secs(1),
            "the file fills the default"
        );
        assert_eq!(r.proxy.hostname_override.as_deref(), Some("flag"));
        assert_eq!(
            r.proxy.cluster_cidr,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            r.kubeconfig.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
    }
}
