//! Per-service health servers on `healthCheckNodePort` (LoadBalancer Services with
//! externalTrafficPolicy Local). A load balancer probes every node and sends traffic only where
//! the answer is 200: this node has at least one ready local endpoint and the proxy is healthy.
//!
//! The set of servers follows the applied state: opened, moved (port change) and closed only
//! after the matching ruleset was committed. A port that cannot be bound is reported and retried
//! at the next update; it never affects the other servers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::model::ServiceName;

/// The answer for one probe.
pub fn response(
    svc: &ServiceName,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, Vec<(&'static str, String)>, String) {
    let ok = local_endpoints > 0 && proxy_healthy;
    let body = serde_json::json!({
        "service": {"namespace": svc.namespace, "name": svc.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let headers = vec![
        ("content-type", "application/json".to_string()),
        ("x-content-type-options", "nosniff".to_string()),
        (
            "x-load-balancing-endpoint-weight",
            local_endpoints.to_string(),
        ),
    ];
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        headers,
        body.to_string(),
    )
}

/// What one server answers with; shared with its handler and updated in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Count {
    pub local_endpoints: usize,
}

pub type SharedCount = Arc<RwLock<Count>>;

/// Reports each answer (metrics) and whether the proxy as a whole is healthy.
pub trait Probe: Send + Sync + 'static {
    fn proxy_healthy(&self) -> bool;
    fn answered(&self, code: u16);
}

/// Opens listeners; the real one binds TCP sockets, tests use a fake.
pub trait Binder: Send {
    type Handle: Send;
    fn bind(
        &mut self,
        addrs: &[SocketAddr],
        svc: &ServiceName,
        count: SharedCount,
    ) -> std::io::Result<Self::Handle>;
    fn close(&mut self, handle: Self::Handle);
}

/// Binds real sockets and serves them with axum.
pub struct TcpBinder<P: Probe> {
    pub probe: Arc<P>,
}

pub struct TcpHandle {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<P: Probe> Binder for TcpBinder<P> {
    type Handle = TcpHandle;
    fn bind(
        &mut self,
        addrs: &[SocketAddr],
        svc: &ServiceName,
        count: SharedCount,
    ) -> std::io::Result<TcpHandle> {
        // An address that is not (yet) on the node is skipped as long as another one works:
        // dual-stack nodes get their second address later than the first.
        let mut listeners = Vec::new();
        let mut first_error = None;
        for a in addrs {
            match std::net::TcpListener::bind(a).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                Ok(l) => listeners.push(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::debug!(addr = %a, error = %e, "health check address not on this node");
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        if listeners.is_empty() {
            return Err(first_error.unwrap_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::AddrNotAvailable,
                    "no address to listen on",
                )
            }));
        }
        let mut tasks = Vec::new();
        for l in listeners {
            let listener = tokio::net::TcpListener::from_std(l)?;
            let (svc, count, probe) = (svc.clone(), count.clone(), self.probe.clone());
            let app = axum::Router::new().fallback(move || {
                let (svc, count, probe) = (svc.clone(), count.clone(), probe.clone());
                async move {
                    let n = count.read().map(|c| c.local_endpoints).unwrap_or(0);
                    let (code, headers, body) = response(&svc, n, probe.proxy_healthy());
                    probe.answered(code.as_u16());
                    let mut r: Response = (code, body).into_response();
                    for (k, v) in headers {
                        if let Ok(v) = HeaderValue::from_str(&v) {
                            r.headers_mut().insert(HeaderName::from_static(k), v);
                        }
                    }
                    r
                }
            });
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(error = %e, "health check server stopped");
                }
            }));
        }
        Ok(TcpHandle { tasks })
    }
    fn close(&mut self, handle: TcpHandle) {
        for t in handle.tasks {
            t.abort();
        }
    }
}

/// One wanted server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub port: u16,
    pub local_endpoints: usize,
}

struct Open<H> {
    port: u16,
    count: SharedCount,
    handle: H,
}

/// A bind failure to report (log line and Warning Event on the Service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindFailure {
    pub service: ServiceName,
    pub port: u16,
    pub error: String,
}

/// The set of servers, kept in step with the applied state.
pub struct Servers<B: Binder> {
    binder: B,
    /// Addresses to listen on (port filled in per service).
    addrs: Vec<IpAddr>,
    open: BTreeMap<ServiceName, Open<B::Handle>>,
}

impl<B: Binder> Servers<B> {
    pub fn new(binder: B, addrs: Vec<IpAddr>) -> Self {
        Servers {
            binder,
            addrs,
            open: BTreeMap::new(),
        }
    }

    /// Change the listen addresses (the Node's addresses changed): every server is reopened.
    pub fn set_addrs(&mut self, addrs: Vec<IpAddr>) -> Vec<BindFailure> {
        if addrs == self.addrs {
            return Vec::new();
        }
        self.addrs = addrs;
        let wanted: BTreeMap<ServiceName, Wanted> = self
            .open
            .iter()
            .map(|(k, o)| {
                (
                    k.clone(),
                    Wanted {
                        port: o.port,
                        local_endpoints: o.count.read().map(|c| c.local_endpoints).unwrap_or(0),
                    },
                )
            })
            .collect();
        for (_, o) in std::mem::take(&mut self.open) {
            self.binder.close(o.handle);
        }
        self.update(&wanted)
    }

    /// Open, move, update and close servers so that exactly `wanted` are served. Returns the
    /// bind failures (retried on the next call).
    pub fn update(&mut self, wanted: &BTreeMap<ServiceName, Wanted>) -> Vec<BindFailure> {
        let gone: Vec<ServiceName> = self
            .open
            .keys()
            .filter(|k| wanted.get(*k).is_none_or(|w| w.port != self.open[*k].port))
            .cloned()
            .collect();
        for k in gone {
            if let Some(o) = self.open.remove(&k) {
                self.binder.close(o.handle);
            }
        }
        let mut failures = Vec::new();
        for (svc, w) in wanted {
            if let Some(o) = self.open.get(svc) {
                if let Ok(mut c) = o.count.write() {
                    c.local_endpoints = w.local_endpoints;
                }
                continue;
            }
            let count: SharedCount = Arc::new(RwLock::new(Count {
                local_endpoints: w.local_endpoints,
            }));
            let addrs: Vec<SocketAddr> = self
                .addrs
                .iter()
                .map(|ip| SocketAddr::new(*ip, w.port))
                .collect();
            match self.binder.bind(&addrs, svc, count.clone()) {
                Ok(handle) => {
                    self.open.insert(
                        svc.clone(),
                        Open {
                            port: w.port,
                            count,
                            handle,
                        },
                    );
                }
                Err(e) => failures.push(BindFailure {
                    service: svc.clone(),
                    port: w.port,
                    error: e.to_string(),
                }),
            }
        }
        failures
    }

    /// Ports currently served, per service.
    pub fn ports(&self) -> BTreeMap<ServiceName, u16> {
        self.open.iter().map(|(k, o)| (k.clone(), o.port)).collect()
    }

    /// The count a service's server answers with now.
    pub fn count(&self, svc: &ServiceName) -> Option<usize> {
        self.open
            .get(svc)
            .and_then(|o| o.count.read().ok().map(|c| c.local_endpoints))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[derive(Default)]
    struct FakeBinder {
        bound: BTreeSet<SocketAddr>,
        refuse: BTreeSet<u16>,
        log: Vec<String>,
    }

    impl Binder for FakeBinder {
        type Handle = Vec<SocketAddr>;
        fn bind(
            &mut self,
            addrs: &[SocketAddr],
            svc: &ServiceName,
            _: SharedCount,
        ) -> std::io::Result<Vec<SocketAddr>> {
            if addrs
                .iter()
                .any(|a| self.refuse.contains(&a.port()) || self.bound.contains(a))
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "address in use",
                ));
            }
            self.bound.extend(addrs.iter().copied());
            self.log.push(format!("open {svc} {}", addrs[0].port()));
            Ok(addrs.to_vec())
        }
        fn close(&mut self, h: Vec<SocketAddr>) {
            self.log.push(format!("close {}", h[0].port()));
            for a in h {
                self.bound.remove(&a);
            }
        }
    }

    fn svc(n: &str) -> ServiceName {
        ServiceName {
            namespace: "ns".into(),
            name: n.into(),
        }
    }

    #[test]
    fn responses() {
        let (c, h, b) = response(&svc("a"), 2, true);
        assert_eq!(c, StatusCode::OK);
        assert!(h.contains(&("x-load-balancing-endpoint-weight", "2".to_string())));
        assert!(h.contains(&("x-content-type-options", "nosniff".to_string())));
        assert!(h.contains(&("content-type", "application/json".to_string())));
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "ns", "name": "a"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(
            response(&svc("a"), 0, true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            response(&svc("a"), 3, false).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn open_move_close_and_retry() {
        let ip: IpAddr = "192.168.0.2".parse().unwrap();
        let mut s = Servers::new(FakeBinder::default(), vec![ip]);
        let w = |entries: &[(&str, u16, usize)]| -> BTreeMap<ServiceName, Wanted> {
            entries
                .iter()
                .map(|(n, p, c)| {
                    (
                        svc(n),
                        Wanted {
                            port: *p,
                            local_endpoints: *c,
                        },
                    )
                })
                .collect()
        };
        assert!(s.update(&w(&[("a", 32000, 1), ("b", 32001, 0)])).is_empty());
        assert_eq!(s.ports().len(), 2);
        // count changes are in place, no reopen
        assert!(s.update(&w(&[("a", 32000, 3), ("b", 32001, 0)])).is_empty());
        assert_eq!(s.count(&svc("a")), Some(3));
        // port change: old closed, new opened
        assert!(s.update(&w(&[("a", 32005, 3), ("b", 32001, 0)])).is_empty());
        assert_eq!(s.ports()[&svc("a")], 32005);
        assert!(!s.binder.bound.contains(&SocketAddr::new(ip, 32000)));
        // deleted service closes
        assert!(s.update(&w(&[("a", 32005, 3)])).is_empty());
        assert_eq!(s.binder.bound.len(), 1);
        // bind failure is reported, others unaffected, retried next time
        s.binder.refuse.insert(32009);
        let f = s.update(&w(&[("a", 32005, 3), ("c", 32009, 1)]));
        assert_eq!(
            f,
            vec![BindFailure {
                service: svc("c"),
                port: 32009,
                error: "address in use".into()
            }]
        );
        assert_eq!(s.ports().len(), 1);
        s.binder.refuse.clear();
        assert!(s.update(&w(&[("a", 32005, 3), ("c", 32009, 1)])).is_empty());
        assert_eq!(s.ports().len(), 2);
        assert_eq!(
            s.binder
                .log
                .iter()
                .filter(|l| l.starts_with("close"))
                .count(),
            2
        );
    }
}
