//! Prometheus metrics (`--metrics-bind-address`): `/metrics` with nftproxy's own metrics
//! (`nftproxy_*`), kube-proxy's (`kubeproxy_*`, `rest_client_*`, see [`kubeproxy`]) and the
//! process metrics; `/proxyMode` and `/configz` as kube-proxy serves them.

pub mod kubeproxy;
pub mod process;

use crate::lock::lock;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::net::Family as IpFamily;
use crate::nft::ir::{Element, Value};
use crate::proxy::ProxyState;
use crate::sync::{Report, SyncKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub namespace: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabel {
    pub kind: String,
}

/// Every metric nftproxy exports. Names and meanings are listed in the README.
pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Family<KindLabel, Histogram>,
    pub sync_failures: Family<KindLabel, Counter>,
    pub last_success: Gauge<f64, AtomicU64>,
    pub programming_latency: Histogram,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub ruleset_size: Family<ObjectLabel, Gauge>,
    pub services_without_local_endpoints: Gauge,
    pub healthcheck_responses: Family<CodeLabel, Counter>,
    pub no_local_endpoint_drops: Family<ServiceLabel, Counter>,
    pub no_endpoint_rejects: Family<ServiceLabel, Counter>,
    pub conntrack_deleted: Counter,
    pub bad_objects: Counter,
    pub affinity_cleanup_failures: Counter,
    /// Times the kernel was found to differ from what was applied (each then repaired).
    pub ruleset_drift: Counter,
    /// kube-proxy's metrics under its names.
    pub kp: kubeproxy::KubeProxyMetrics,
    process: process::ProcessMetrics,
    /// Last counter value seen per (set, element): nft counters restart when an element is re-added.
    seen: Mutex<BTreeMap<(IpFamily, String, Element), u64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: String,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let kp = kubeproxy::KubeProxyMetrics::register(&mut root);
        let process = process::ProcessMetrics::register(&mut root);
        let registry = root.sub_registry_with_prefix("nftproxy");
        let m = Metrics {
            registry: Registry::default(),
            kp,
            process,
            sync_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            sync_failures: Family::default(),
            last_success: Gauge::default(),
            programming_latency: Histogram::new(latency_buckets()),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            ruleset_size: Family::default(),
            services_without_local_endpoints: Gauge::default(),
            healthcheck_responses: Family::default(),
            no_local_endpoint_drops: Family::default(),
            no_endpoint_rejects: Family::default(),
            conntrack_deleted: Counter::default(),
            bad_objects: Counter::default(),
            affinity_cleanup_failures: Counter::default(),
            ruleset_drift: Counter::default(),
            seen: Mutex::new(BTreeMap::new()),
        };
        registry.register(
            "sync_duration_seconds",
            "Time to compute, plan and commit one sync, by kind (full, partial)",
            m.sync_duration.clone(),
        );
        registry.register(
            "sync_failures",
            "Syncs whose commit failed, by kind",
            m.sync_failures.clone(),
        );
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            m.last_success.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice change (endpoints.kubernetes.io/last-change-trigger-time) to its commit",
            m.programming_latency.clone(),
        );
        registry.register(
            "ruleset_drift",
            "Times nftproxy's tables in the kernel were found to differ from what it applied (changed from outside, or a lost commit); each is repaired",
            m.ruleset_drift.clone(),
        );
        registry.register(
            "services",
            "Service ports programmed (all families)",
            m.services.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints programmed (all families, cluster and local sets)",
            m.endpoints.clone(),
        );
        registry.register(
            "ruleset_objects",
            "Size of the programmed ruleset, by kind (chains, rules, elements)",
            m.ruleset_size.clone(),
        );
        registry.register(
            "services_without_local_endpoints",
            "externalTrafficPolicy Local service ports with no ready endpoint on this node",
            m.services_without_local_endpoints.clone(),
        );
        registry.register(
            "healthcheck_responses",
            "healthCheckNodePort answers, by HTTP code",
            m.healthcheck_responses.clone(),
        );
        registry.register(
            "no_local_endpoint_drops_packets",
            "Packets dropped because a Local-policy service has no endpoint on this node (or internalTrafficPolicy Local with none here)",
            m.no_local_endpoint_drops.clone(),
        );
        registry.register(
            "no_endpoint_rejects_packets",
            "Packets rejected because the service has no endpoints at all",
            m.no_endpoint_rejects.clone(),
        );
        registry.register(
            "conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted",
            m.conntrack_deleted.clone(),
        );
        registry.register(
            "bad_objects",
            "Objects or fields skipped as malformed",
            m.bad_objects.clone(),
        );
        registry.register(
            "affinity_cleanup_failures",
            "Failed deletions of ClientIP affinity entries pointing at gone endpoints (retried)",
            m.affinity_cleanup_failures.clone(),
        );
        // nftproxy's version, not Kubernetes' (kubernetes_build_info would trip the
        // kubernetes-mixin's KubeVersionMismatch alert).
        let build: Family<BuildLabel, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("build_info", "nftproxy's version; the value is 1", build);
        for kind in ["full", "partial"] {
            let _ = m
                .sync_failures
                .get_or_create(&KindLabel { kind: kind.into() });
        }
        Metrics {
            registry: root,
            ..m
        }
    }

    /// A periodic check found the rules in place: as good as a sync for "last synced" alerts.
    pub fn checked(&self) {
        self.kp.last_timestamp.set(unix_now());
    }

    /// A change was accepted for the next sync.
    pub fn queued(&self) {
        self.kp.last_queued_timestamp.set(unix_now());
    }

    /// The agent health server answered `/healthz` (`livez == false`) or `/livez`.
    pub fn health_answered(&self, livez: bool, code: u16) {
        let fam = if livez {
            &self.kp.livez
        } else {
            &self.kp.healthz
        };
        fam.get_or_create(&kubeproxy::CodeLabel {
            code: code.to_string(),
        })
        .inc();
    }

    pub fn record_sync(&self, r: &Report) {
        self.sync_duration
            .get_or_create(&KindLabel {
                kind: r.kind.as_str().into(),
            })
            .observe(r.duration.as_secs_f64());
        let now = unix_now();
        self.last_success.set(now);
        let secs = r.duration.as_secs_f64();
        self.kp.sync_duration.observe(secs);
        match r.kind {
            SyncKind::Full => self.kp.sync_full_duration.observe(secs),
            SyncKind::Partial => self.kp.sync_partial_duration.observe(secs),
        }
        self.kp.last_timestamp.set(now);
        self.kp
            .service_changes_total
            .inc_by(r.changes.services as u64);
        self.kp
            .endpoint_changes_total
            .inc_by(r.changes.slices as u64);
        self.kp.service_changes_pending.set(0);
        self.kp.endpoint_changes_pending.set(0);
        let (mut svc, mut eps, mut without_local) = (0i64, 0i64, 0i64);
        // kube-proxy's nftables proxier counts, per family and service port, the Local-policy
        // ports that have endpoints somewhere but none on this node (with none anywhere the
        // port rejects instead); nftproxy sums the families.
        let mut no_local = [0i64; 2];
        for fs in r.state.families.values() {
            for ps in fs.ports.values() {
                svc += 1;
                eps += (ps.chosen.cluster.len() + ps.chosen.local.len()) as i64;
                if ps.sp.external_local && ps.chosen.local_ready == 0 {
                    without_local += 1;
                }
                if ps.chosen.has_any && ps.chosen.local.is_empty() {
                    no_local[0] += i64::from(ps.sp.internal_local);
                    no_local[1] += i64::from(ps.sp.external_local);
                }
            }
        }
        for (policy, n) in ["internal", "external"].into_iter().zip(no_local) {
            self.kp
                .no_local_endpoints
                .get_or_create(&kubeproxy::TrafficPolicyLabel {
                    traffic_policy: policy.into(),
                })
                .set(n);
        }
        self.services.set(svc);
        self.endpoints.set(eps);
        self.services_without_local_endpoints.set(without_local);
        for (k, v) in [
            ("chains", r.ruleset_chains),
            ("rules", r.ruleset_rules),
            ("elements", r.ruleset_elements),
        ] {
            self.ruleset_size
                .get_or_create(&ObjectLabel { kind: k.into() })
                .set(v as i64);
        }
    }

    pub fn record_failure(&self, e: &crate::sync::SyncError) {
        self.sync_failures
            .get_or_create(&KindLabel {
                kind: e.kind.as_str().into(),
            })
            .inc();
        self.kp.sync_failures.inc();
        self.kp
            .service_changes_pending
            .set(e.pending.services as i64);
        self.kp
            .endpoint_changes_pending
            .set(e.pending.slices as i64);
    }

    /// A trigger time of a change this commit made visible.
    pub fn programmed(&self, latency: std::time::Duration) {
        let s = latency.as_secs_f64();
        self.programming_latency.observe(s);
        self.kp.network_programming.observe(s);
    }

    /// Fold element counters of a no-endpoint set into the per-service counters.
    pub fn record_counters(
        &self,
        family: IpFamily,
        set: &str,
        drops: bool,
        elements: &[(Element, Option<(u64, u64)>)],
        owners: &BTreeMap<Vec<Value>, ServiceLabel>,
    ) {
        let mut seen = lock(&self.seen);
        for (e, c) in elements {
            let Some((packets, _)) = c else { continue };
            let key = (family, set.to_string(), e.clone());
            let last = seen.insert(key, *packets).unwrap_or(0);
            // A counter smaller than before belongs to a re-added element: count it from zero.
            let delta = if *packets >= last {
                packets - last
            } else {
                *packets
            };
            if delta == 0 {
                continue;
            }
            if let Some(label) = owners.get(e.key()) {
                let fam = if drops {
                    &self.no_local_endpoint_drops
                } else {
                    &self.no_endpoint_rejects
                };
                fam.get_or_create(label).inc_by(delta);
            }
        }
    }

    pub fn encode(&self) -> String {
        self.process.update();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl crate::k8s::client::RequestSink for Metrics {
    fn request(&self, method: &str, host: &str, code: &str, latency: std::time::Duration) {
        self.kp
            .requests
            .get_or_create(&kubeproxy::RequestLabel {
                code: code.into(),
                host: host.into(),
                method: method.into(),
            })
            .inc();
        self.kp
            .request_duration
            .get_or_create(&kubeproxy::LatencyLabel {
                verb: method.into(),
                host: host.into(),
            })
            .observe(latency.as_secs_f64());
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Entry key (as in the no-endpoint sets) -> owning service, per family.
pub type Owners = BTreeMap<IpFamily, BTreeMap<Vec<Value>, ServiceLabel>>;

/// The owners of the entry points of ports without (local) endpoints: the only ones the
/// no-endpoint sets can hold.
pub fn entry_owners(state: &ProxyState) -> Owners {
    let mut out: BTreeMap<IpFamily, BTreeMap<Vec<Value>, ServiceLabel>> = BTreeMap::new();
    for (f, fs) in &state.families {
        let m = out.entry(*f).or_default();
        // Only ports that can be in a no-endpoint set: the scan stays cheap at any size.
        for ps in fs.ports.values().filter(|ps| {
            let c = &ps.chosen;
            c.cluster.is_empty()
                || ((ps.sp.internal_local || ps.sp.external_local) && c.local.is_empty())
        }) {
            let sp = &ps.sp;
            let label = ServiceLabel {
                namespace: sp.key.service.namespace.clone(),
                service: sp.key.service.name.clone(),
            };
            for key in crate::nft::compile::entry_keys(sp) {
                m.insert(key, label.clone());
            }
        }
    }
    out
}

/// The metrics port's routes: `/metrics`, and kube-proxy's `/proxyMode` (the bare mode, no
/// newline) and `/configz` (`{"kubeproxy.config.k8s.io": <the effective configuration>}`),
/// as in kubernetes `cmd/kube-proxy/app/server.go` (`serveMetrics`).
pub fn router(m: Arc<Metrics>, configz: serde_json::Value) -> axum::Router {
    let configz = Arc::new(configz.to_string());
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/proxyMode",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    ],
                    "nftables",
                )
            }),
        )
        .route(
            "/configz",
            get(move || {
                let body = configz.clone();
                async move {
                    (
                        [
                            (header::CONTENT_TYPE, "application/json"),
                            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                        ],
                        body.to_string(),
                    )
                }
            }),
        )
}

/// Serve the metrics port on a bound listener.
pub fn serve(
    listener: tokio::net::TcpListener,
    m: Arc<Metrics>,
    configz: serde_json::Value,
) -> tokio::task::JoinHandle<()> {
    let app = router(m, configz);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_monotonic_across_element_readds() {
        let m = Metrics::new();
        let key = vec![Value::Proto(crate::net::Proto::Tcp), Value::Port(30013)];
        let owners: BTreeMap<Vec<Value>, ServiceLabel> = [(
            key.clone(),
            ServiceLabel {
                namespace: "ns".into(),
                service: "s".into(),
            },
        )]
        .into();
        let e = Element::new(key, None);
        m.record_counters(
            IpFamily::Ip,
            "nodeport-no-endpoint-drop",
            true,
            &[(e.clone(), Some((5, 300)))],
            &owners,
        );
        m.record_counters(
            IpFamily::Ip,
            "nodeport-no-endpoint-drop",
            true,
            &[(e.clone(), Some((7, 400)))],
            &owners,
        );
        m.record_counters(
            IpFamily::Ip,
            "nodeport-no-endpoint-drop",
            true,
            &[(e.clone(), Some((2, 100)))],
            &owners,
        );
        let text = m.encode();
        assert!(
            text.contains(
                r#"nftproxy_no_local_endpoint_drops_packets_total{namespace="ns",service="s"} 9"#
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE nftproxy_network_programming_duration_seconds histogram"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
