//! kube-proxy's configuration file (`KubeProxyConfiguration`, `kubeproxy.config.k8s.io/v1alpha1`,
//! the `config.conf` kubeadm keeps in ConfigMap `kube-system/kube-proxy`), read by `--config`.
//!
//! Every field kube-proxy's v1alpha1 type has is accepted (pkg/proxy/apis/config/v1alpha1 in
//! kubernetes, `KubeProxyConfiguration`); unknown fields and bad values are errors naming the
//! field. Fields that shape an nftables proxy are applied under the command line's flags
//! (flags win, as upstream); the others are reported once at start. Pure: text in, settings out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum KpConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// serde names the field (`unknown field \`x\``, or the path of a bad value).
    #[error("{path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("{path}: {field}: {detail}")]
    Field {
        path: String,
        field: &'static str,
        detail: String,
    },
}

/// A Go `metav1.Duration` in its text form (`30s`, `1m30s`, `2h22m`, `500ms`, `0s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NftablesSection {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: Option<GoDuration>,
    pub sync_period: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conntrack {
    pub max_per_core: Option<i64>,
    pub min: Option<i64>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Logging {
    pub format: Option<String>,
    pub verbosity: Option<u32>,
    pub flush_frequency: Option<serde_yaml::Value>,
    pub options: Option<serde_yaml::Value>,
    pub vmodule: Option<serde_yaml::Value>,
}

/// kube-proxy's v1alpha1 configuration: every field, so that a kubeadm file parses whole.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub mode: Option<String>,
    pub nftables: Option<NftablesSection>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    pub conntrack: Option<Conntrack>,
    pub client_connection: Option<ClientConnection>,
    pub hostname_override: Option<String>,
    pub oom_score_adj: Option<i32>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub logging: Option<Logging>,
    pub config_sync_period: Option<GoDuration>,
    pub enable_profiling: Option<bool>,
    pub port_range: Option<String>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub windows_run_as_service: Option<bool>,
    pub iptables: Option<serde_yaml::Value>,
    pub ipvs: Option<serde_yaml::Value>,
    pub winkernel: Option<serde_yaml::Value>,
    pub linux: Option<serde_yaml::Value>,
}

/// What the file sets that nftproxy applies (None: not set there), after validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FromFile {
    pub cluster_cidrs: Option<Vec<String>>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub healthz_bind_address: Option<std::net::SocketAddr>,
    pub metrics_bind_address: Option<std::net::SocketAddr>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<u32>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub kubeconfig: Option<String>,
    pub hostname_override: Option<String>,
    pub oom_score_adj: Option<i32>,
    /// `bindAddressHardFail`: exit instead of retrying a port that cannot be bound.
    pub bind_address_hard_fail: Option<bool>,
    pub log_json: Option<bool>,
    pub verbosity: Option<u8>,
    pub detect_local: Option<crate::pipeline::config::DetectLocal>,
    /// `clientConnection.qps` / `burst` when set (0: the default).
    pub kube_api_qps: Option<f64>,
    pub kube_api_burst: Option<u32>,
    /// `clientConnection.contentType` when set.
    pub kube_api_content_type: Option<crate::k8s::watch::Encoding>,
    /// `detectLocal.bridgeInterface` / `detectLocal.interfaceNamePrefix`.
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
    /// `conntrack.*`: set fields (null: kube-proxy's default).
    pub conntrack: ConntrackFromFile,
    /// Fields set in the file that nftproxy does not use, with why (reported once at start).
    pub ignored: Vec<String>,
}

/// The `conntrack` section's set fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackFromFile {
    pub max_per_core: Option<u64>,
    pub min: Option<u64>,
    pub tcp_established: Option<Duration>,
    pub tcp_close_wait: Option<Duration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp: Option<Duration>,
    pub udp_stream: Option<Duration>,
}

/// An `IP:PORT` or a bare IP (kube-proxy accepts both; the port then defaults).
fn bind_address(
    raw: &str,
    default_port: u16,
    path: &str,
    field: &'static str,
) -> Result<Option<std::net::SocketAddr>, KpConfigError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = raw.parse::<std::net::SocketAddr>() {
        return Ok(Some(a));
    }
    raw.trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
        .map(|ip| Some(std::net::SocketAddr::new(ip, default_port)))
        .map_err(|_| KpConfigError::Field {
            path: path.to_string(),
            field,
            detail: format!("{raw:?} is neither IP:PORT nor an IP"),
        })
}

impl KubeProxyConfiguration {
    pub fn parse(text: &str, path: &str) -> Result<KubeProxyConfiguration, KpConfigError> {
        let c: KubeProxyConfiguration =
            serde_yaml::from_str(text).map_err(|e| KpConfigError::Parse {
                path: path.to_string(),
                detail: e.to_string(),
            })?;
        if let Some(k) = c.kind.as_deref().filter(|k| *k != "KubeProxyConfiguration") {
            return Err(KpConfigError::Field {
                path: path.to_string(),
                field: "kind",
                detail: format!("{k:?}, expected KubeProxyConfiguration"),
            });
        }
        if let Some(v) = c
            .api_version
            .as_deref()
            .filter(|v| *v != "kubeproxy.config.k8s.io/v1alpha1")
        {
            return Err(KpConfigError::Field {
                path: path.to_string(),
                field: "apiVersion",
                detail: format!("{v:?}, expected kubeproxy.config.k8s.io/v1alpha1"),
            });
        }
        Ok(c)
    }

    pub fn read(path: &str) -> Result<KubeProxyConfiguration, KpConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| KpConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        KubeProxyConfiguration::parse(&text, path)
    }

    /// Validate and map to nftproxy's settings.
    pub fn settings(&self, path: &str) -> Result<FromFile, KpConfigError> {
        let field = |field: &'static str, detail: String| KpConfigError::Field {
            path: path.to_string(),
            field,
            detail,
        };
        let mut out = FromFile::default();
        let mode = self.mode.as_deref().unwrap_or("");
        if !matches!(mode, "" | "nftables") {
            let why = "nftproxy is an nftables proxy; use \"nftables\" or leave it empty";
            return Err(field("mode", format!("{mode:?}: {why}")));
        }
        if let Some(c) = self
            .cluster_cidr
            .as_deref()
            .filter(|c| !c.trim().is_empty())
        {
            let cidrs: Vec<String> = c.split(',').map(|s| s.trim().to_string()).collect();
            for x in &cidrs {
                x.parse::<ipnet::IpNet>()
                    .map_err(|_| field("clusterCIDR", format!("{x:?} is not a CIDR")))?;
            }
            out.cluster_cidrs = Some(cidrs);
        }
        if let Some(n) = self.node_port_addresses.as_ref().filter(|n| !n.is_empty()) {
            crate::pipeline::config::NodePortAddresses::parse(n)
                .map_err(|e| field("nodePortAddresses", e.to_string()))?;
            out.nodeport_addresses = Some(n.clone());
        }
        if let Some(b) = &self.healthz_bind_address {
            out.healthz_bind_address = bind_address(b, 10256, path, "healthzBindAddress")?;
        }
        if let Some(b) = &self.metrics_bind_address {
            out.metrics_bind_address = bind_address(b, 10249, path, "metricsBindAddress")?;
        }
        if let Some(n) = &self.nftables {
            out.masquerade_all = n.masquerade_all;
            if let Some(bit) = n.masquerade_bit {
                if !(0..32).contains(&bit) {
                    return Err(field(
                        "nftables.masqueradeBit",
                        format!("{bit} is not in 0..31"),
                    ));
                }
                out.masquerade_bit = Some(bit as u32);
            }
            // 0s means "the default" in kube-proxy's files.
            out.sync_period = n.sync_period.map(|d| d.0).filter(|d| !d.is_zero());
            out.min_sync_period = n.min_sync_period.map(|d| d.0).filter(|d| !d.is_zero());
        }
        if let Some(m) = self.detect_local_mode.as_deref() {
            out.detect_local = Some(
                crate::pipeline::config::DetectLocal::parse(m)
                    .map_err(|e| field("detectLocalMode", e))?,
            );
        }
        if let Some(d) = &self.detect_local {
            out.bridge_interface = d.bridge_interface.clone().filter(|v| !v.is_empty());
            out.interface_name_prefix = d.interface_name_prefix.clone().filter(|v| !v.is_empty());
        }
        use crate::pipeline::config::DetectLocal;
        match out.detect_local {
            Some(DetectLocal::BridgeInterface) if out.bridge_interface.is_none() => {
                return Err(field(
                    "detectLocal.bridgeInterface",
                    "detectLocalMode BridgeInterface needs the pods' bridge".into(),
                ))
            }
            Some(DetectLocal::InterfaceNamePrefix) if out.interface_name_prefix.is_none() => {
                return Err(field(
                    "detectLocal.interfaceNamePrefix",
                    "detectLocalMode InterfaceNamePrefix needs the pods' interface name prefix"
                        .into(),
                ))
            }
            _ => {}
        }
        if let Some(cc) = &self.client_connection {
            out.kubeconfig = cc.kubeconfig.clone().filter(|k| !k.is_empty());
            if let Some(q) = cc.qps.filter(|q| *q != 0.0) {
                if !(q > 0.0 && q.is_finite()) {
                    return Err(field(
                        "clientConnection.qps",
                        format!("{q} is not a positive rate"),
                    ));
                }
                out.kube_api_qps = Some(q);
            }
            if let Some(b) = cc.burst.filter(|b| *b != 0) {
                out.kube_api_burst = Some(u32::try_from(b).map_err(|_| {
                    field(
                        "clientConnection.burst",
                        format!("{b} is not a positive count"),
                    )
                })?);
            }
            if let Some(c) = cc.content_type.as_deref().filter(|c| !c.is_empty()) {
                out.kube_api_content_type = Some(
                    crate::cmd::args::parse_content_type(c)
                        .map_err(|e| field("clientConnection.contentType", e))?,
                );
            }
        }
        out.hostname_override = self.hostname_override.clone().filter(|h| !h.is_empty());
        out.oom_score_adj = self.oom_score_adj;
        out.bind_address_hard_fail = self.bind_address_hard_fail;
        if let Some(o) = out.oom_score_adj {
            if !(-1000..=1000).contains(&o) {
                return Err(field("oomScoreAdj", format!("{o} is not in -1000..1000")));
            }
        }
        if let Some(l) = &self.logging {
            match l.format.as_deref().unwrap_or("") {
                "" | "text" => out.log_json = l.format.as_ref().map(|_| false),
                "json" => out.log_json = Some(true),
                other => {
                    return Err(field(
                        "logging.format",
                        format!("{other:?}: use \"text\" or \"json\""),
                    ))
                }
            }
            // klog levels: 0-1 operator info, 2 changes, 4+ debug. nftproxy: 1 info, 2 debug.
            out.verbosity = l.verbosity.map(|v| match v {
                0..=1 => 1,
                2..=4 => 2,
                _ => 3,
            });
        }
        if let Some(c) = &self.conntrack {
            let count =
                |name: &'static str, v: Option<i64>| -> Result<Option<u64>, KpConfigError> {
                    v.map(|v| u64::try_from(v).map_err(|_| field(name, format!("{v} is negative"))))
                        .transpose()
                };
            out.conntrack = ConntrackFromFile {
                max_per_core: count("conntrack.maxPerCore", c.max_per_core)?,
                min: count("conntrack.min", c.min)?,
                tcp_established: c.tcp_established_timeout.map(|d| d.0),
                tcp_close_wait: c.tcp_close_wait_timeout.map(|d| d.0),
                tcp_be_liberal: c.tcp_be_liberal,
                udp: c.udp_timeout.map(|d| d.0),
                udp_stream: c.udp_stream_timeout.map(|d| d.0),
            };
        }
        if self.bind_address.as_deref().is_some_and(|b| !b.is_empty()) {
            out.ignored.push(
                "bindAddress: nftproxy serves both IP families of the node whatever it says".into(),
            );
        }
        for (name, set) in [
            ("iptables", self.iptables.is_some()),
            ("ipvs", self.ipvs.is_some()),
            ("winkernel", self.winkernel.is_some()),
            ("configSyncPeriod", self.config_sync_period.is_some()),
            ("enableProfiling", self.enable_profiling == Some(true)),
            (
                "portRange",
                self.port_range.as_deref().is_some_and(|p| !p.is_empty()),
            ),
            (
                "showHiddenMetricsForVersion",
                self.show_hidden_metrics_for_version
                    .as_deref()
                    .is_some_and(|p| !p.is_empty()),
            ),
            (
                "featureGates",
                self.feature_gates.as_ref().is_some_and(|g| !g.is_empty()),
            ),
        ] {
            if set {
                out.ignored.push(format!(
                    "{name}: does not apply to nftproxy (accepted and ignored)"
                ));
            }
        }
        Ok(out)
    }
}

/// Parse a duration as Go writes them (`30s`, `100ms`, `1m30s`, `2h22m`, `1.5h`, `0`), or plain
/// seconds (`30`): the form kube-proxy's flags and config files use.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<f64>() {
        // A bare number: seconds (a Go duration allows only "0" bare; seconds is friendlier).
        return if n.is_finite() && n >= 0.0 {
            Ok(Duration::from_secs_f64(n))
        } else {
            Err(format!("bad duration {s:?}"))
        };
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("bad duration {s:?}: a number without a unit"))?;
        let unit_end = rest[num_end..]
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .map_or(rest.len(), |i| num_end + i);
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("bad duration {s:?}"))?;
        let scale = match &rest[num_end..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => {
                return Err(format!(
                    "bad duration unit {u:?} in {s:?} (use ns, us, ms, s, m, h)"
                ))
            }
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_secs_f64(total))
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
        // Go's forms, as kube-proxy's flags and files carry them.
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h22m").unwrap(), Duration::from_secs(8520));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("1s500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        for bad in ["5x", "", "m", "1m30", "-5s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    /// What `kubeadm init` (v1.36, podSubnet 10.244.0.0/16, mode nftables) writes into ConfigMap
    /// kube-system/kube-proxy, key config.conf; the end-to-end tests start from the same file.
    const KUBEADM: &str = include_str!("../../tests/fixtures/kubeadm-config.conf");

    #[test]
    fn a_kubeadm_file_parses_whole() {
        let c = KubeProxyConfiguration::parse(KUBEADM, "config.conf").expect("parses");
        let s = c.settings("config.conf").expect("valid");
        assert_eq!(s.cluster_cidrs, Some(vec!["10.244.0.0/16".to_string()]));
        assert_eq!(
            s.kubeconfig.as_deref(),
            Some("/var/lib/kube-proxy/kubeconfig.conf")
        );
        assert_eq!(s.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(s.min_sync_period, Some(Duration::from_secs(1)));
        assert_eq!(s.healthz_bind_address, None, "empty means the default");
        assert_eq!(s.nodeport_addresses, None);
        assert_eq!(s.masquerade_bit, None);
        assert!(
            s.ignored.iter().any(|i| i.starts_with("iptables")),
            "{:?}",
            s.ignored
        );
        assert!(s.ignored.iter().any(|i| i.starts_with("bindAddress")));
    }

    #[test]
    fn sections_may_be_missing() {
        let c = KubeProxyConfiguration::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n",
            "x",
        )
        .expect("parses");
        assert_eq!(c.settings("x").expect("valid"), FromFile::default());
    }

    #[test]
    fn every_field_that_applies_is_read() {
        let text = r#"
kind: KubeProxyConfiguration
apiVersion: kubeproxy.config.k8s.io/v1alpha1
clusterCIDR: "10.244.0.0/16,fd00:10:244::/56"
nodePortAddresses: ["primary", "192.168.0.0/24"]
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1
hostnameOverride: node-7
oomScoreAdj: -999
bindAddressHardFail: true
clientConnection: {kubeconfig: /etc/kp.conf}
nftables: {masqueradeAll: true, masqueradeBit: 15, syncPeriod: 1m30s, minSyncPeriod: 250ms}
logging: {format: json, verbosity: 4}
"#;
        let s = KubeProxyConfiguration::parse(text, "f")
            .and_then(|c| c.settings("f"))
            .expect("valid");
        assert_eq!(
            s.cluster_cidrs,
            Some(vec!["10.244.0.0/16".into(), "fd00:10:244::/56".into()])
        );
        assert_eq!(
            s.nodeport_addresses,
            Some(vec!["primary".into(), "192.168.0.0/24".into()])
        );
        assert_eq!(
            s.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            s.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(s.hostname_override.as_deref(), Some("node-7"));
        assert_eq!(s.oom_score_adj, Some(-999));
        assert_eq!(s.bind_address_hard_fail, Some(true));
        assert_eq!(s.kubeconfig.as_deref(), Some("/etc/kp.conf"));
        assert_eq!((s.masquerade_all, s.masquerade_bit), (Some(true), Some(15)));
        assert_eq!(s.sync_period, Some(Duration::from_secs(90)));
        assert_eq!(s.min_sync_period, Some(Duration::from_millis(250)));
        assert_eq!((s.log_json, s.verbosity), (Some(true), Some(2)));
    }

    #[test]
    fn bad_values_and_unknown_fields_name_the_field() {
        let base = "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n";
        for (extra, want) in [
            ("mode: iptables\n", "mode"),
            ("mode: ipvs\n", "mode"),
            ("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR"),
            ("nodePortAddresses: [nonsense]\n", "nodePortAddresses"),
            ("healthzBindAddress: here\n", "healthzBindAddress"),
            ("nftables: {masqueradeBit: 40}\n", "nftables.masqueradeBit"),
            (
                "nftables: {syncPeriod: soon}\n",
                "nftables: bad duration \"soon\" at line 3",
            ),
            (
                "detectLocalMode: BridgeInterface\n",
                "detectLocal.bridgeInterface",
            ),
            ("detectLocalMode: nodecidr\n", "detectLocalMode"),
            ("oomScoreAdj: 5000\n", "oomScoreAdj"),
            ("logging: {format: xml}\n", "logging.format"),
            ("colour: blue\n", "colour"),
            ("nftables: {speed: 11}\n", "speed"),
        ] {
            let text = format!("{base}{extra}");
            let err = KubeProxyConfiguration::parse(&text, "config.conf")
                .and_then(|c| c.settings("config.conf"))
                .expect_err(extra);
            let msg = err.to_string();
            assert!(
                msg.contains(want) && msg.contains("config.conf"),
                "{extra}: {msg}"
            );
        }
        let err =
            KubeProxyConfiguration::parse("kind: KubeletConfiguration\n", "k").expect_err("kind");
        assert!(err.to_string().contains("kind"));
    }
}
