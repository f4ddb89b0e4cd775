//! kube-proxy's own metrics, under its names, labels and buckets, so that what already watches
//! kube-proxy keeps working: kube-prometheus-stack and the kubernetes-mixin dashboard ("Kubernetes
//! / Proxy": rules sync rate and latency, network programming, API requests, memory, CPU) and
//! alerts, Datadog's and netdata's kube-proxy checks. Reference: kubernetes
//! `pkg/proxy/metrics/metrics.go` (`RegisterMetrics`, nftables mode) and component-base's
//! `metrics/prometheus/restclient`. nftproxy commits both families in one transaction, so the
//! sync metrics carry no `ip_family` label (as before kube-proxy 1.33).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub code: String,
    pub host: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabel {
    pub verb: String,
    pub host: String,
}

/// `metrics.ExponentialBuckets(0.001, 2, 15)`: 1 ms to 16.384 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// `MergeBuckets(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59), LinearBuckets(60, 5, 12),
/// LinearBuckets(120, 30, 7))`; component-base's MergeBuckets starts from a 0 bucket.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b.sort_by(f64::total_cmp);
    b.dedup();
    b
}

/// client-go's `rest_client_request_duration_seconds` buckets.
fn request_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
    ]
    .into_iter()
}

pub struct KubeProxyMetrics {
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub last_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub network_programming: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    /// A gauge despite its name, as in kube-proxy.
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    pub sync_failures: Counter,
    pub cleanup_failures: Counter,
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
    pub requests: Family<RequestLabel, Counter>,
    pub request_duration: Family<LatencyLabel, Histogram>,
}

impl KubeProxyMetrics {
    /// Create and register under `kubeproxy_` (and the client metrics under `rest_client_`);
    /// every series without a free label exists from the start, at 0.
    pub fn register(root: &mut Registry) -> KubeProxyMetrics {
        let m = KubeProxyMetrics {
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            last_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            network_programming: Histogram::new(network_programming_buckets()),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            sync_failures: Counter::default(),
            cleanup_failures: Counter::default(),
            healthz: Family::default(),
            livez: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(request_buckets())),
        };
        for policy in ["internal", "external"] {
            // get_or_create makes the series exist (at 0) from the start.
            let _ = m.no_local_endpoints.get_or_create(&TrafficPolicyLabel {
                traffic_policy: policy.into(),
            });
        }
        for code in ["200", "503"] {
            let l = CodeLabel { code: code.into() };
            let _ = m.healthz.get_or_create(&l);
            let _ = m.livez.get_or_create(&l);
        }
        let kp = root.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        kp.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        kp.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_timestamp.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        kp.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        kp.register(
            "sync_proxy_rules_nftables_sync_failures",
            "Cumulative proxy nftables sync failures",
            m.sync_failures.clone(),
        );
        kp.register(
            "sync_proxy_rules_nftables_cleanup_failures",
            "Cumulative proxy nftables cleanup failures",
            m.cleanup_failures.clone(),
        );
        kp.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        kp.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );
        let rc = root.sub_registry_with_prefix("rest_client");
        rc.register(
            "requests",
            "Number of HTTP requests, partitioned by status code, method, and host.",
            m.requests.clone(),
        );
        rc.register(
            "request_duration_seconds",
            "Request latency in seconds. Broken down by verb, and host.",
            m.request_duration.clone(),
        );
        m
    }
}
