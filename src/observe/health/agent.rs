//! The agent health server (`--healthz-bind-address`): `/livez` fails when an accepted change has
//! waited more than 2x sync-period without being applied; `/healthz` also fails before the first
//! successful sync and when the Node is going away (deleting, or tainted by the autoscaler), so a
//! load balancer stops sending new traffic to it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::time::Instant;

use crate::lock::lock;
use crate::sync::SharedStatus;

/// Inputs of the health decision at one moment.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub now: Instant,
    pub wall_now: SystemTime,
    pub last_success: Option<Instant>,
    pub pending_since: Option<Instant>,
    pub sync_period: Duration,
    pub node_eligible: bool,
    /// Drift found in the kernel and not (yet) shown repaired.
    pub drift: Option<String>,
    /// The agent cannot reach the API server at the only address it was given (see
    /// `cmd::run::unreachable_api_message`).
    pub bootstrap: Option<String>,
}

fn rfc3339(now_i: Instant, now_w: SystemTime, at: Option<Instant>) -> String {
    match at {
        Some(t) => humantime::format_rfc3339_millis(now_w - now_i.duration_since(t)).to_string(),
        None => String::new(),
    }
}

/// Whether the proxy keeps up: no accepted change older than 2x sync-period is still waiting,
/// and it is not stuck at start on an API address nothing will make reachable.
pub fn proxy_healthy(i: &Inputs) -> bool {
    i.bootstrap.is_none()
        && i.pending_since
            .is_none_or(|p| i.now.duration_since(p) <= i.sync_period * 2)
}

/// `/livez`: (status, JSON body).
pub fn livez(i: &Inputs) -> (StatusCode, String) {
    let healthy = proxy_healthy(i);
    let mut body = serde_json::json!({
        "lastUpdated": rfc3339(i.now, i.wall_now, i.last_success),
        "currentTime": humantime::format_rfc3339_millis(i.wall_now).to_string(),
        "healthy": healthy,
    });
    if let Some(b) = &i.bootstrap {
        body["error"] = b.clone().into();
    }
    (
        if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body.to_string(),
    )
}

/// `/healthz`: (status, JSON body).
pub fn healthz(i: &Inputs) -> (StatusCode, String) {
    // A kernel that differs from the API in a way the agent could not repair is not healthy:
    // traffic to this node may go where no Service says.
    let healthy = proxy_healthy(i) && i.last_success.is_some() && i.drift.is_none();
    let ok = healthy && i.node_eligible;
    let mut body = serde_json::json!({
        "lastUpdated": rfc3339(i.now, i.wall_now, i.last_success),
        "currentTime": humantime::format_rfc3339_millis(i.wall_now).to_string(),
        "healthy": healthy,
        "nodeEligible": i.node_eligible,
    });
    if let Some(d) = &i.drift {
        body["unrepairedDrift"] = d.clone().into();
    }
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body.to_string(),
    )
}

/// What the server reads each request.
#[derive(Clone)]
pub struct AgentHealth {
    pub status: SharedStatus,
    pub sync_period: Duration,
    pub node_eligible: Arc<Mutex<bool>>,
    /// Counts the answers (kube-proxy's `kubeproxy_proxy_healthz_total`, `..._livez_total`).
    pub metrics: Option<Arc<crate::observe::metrics::Metrics>>,
}

impl AgentHealth {
    pub fn inputs(&self) -> Inputs {
        let st = lock(&self.status).clone();
        Inputs {
            now: Instant::now(),
            wall_now: SystemTime::now(),
            last_success: st.last_success,
            pending_since: st.pending_since,
            sync_period: self.sync_period,
            node_eligible: *lock(&self.node_eligible),
            drift: st.drift,
            bootstrap: st.bootstrap,
        }
    }

    /// Whether the whole proxy is healthy (service health answers include it).
    pub fn healthy(&self) -> bool {
        proxy_healthy(&self.inputs())
    }
}

fn json(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub fn router(h: AgentHealth) -> Router {
    let h2 = h.clone();
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let h = h.clone();
                async move {
                    let (c, b) = healthz(&h.inputs());
                    if let Some(m) = &h.metrics {
                        m.health_answered(false, c.as_u16());
                    }
                    json(c, b)
                }
            }),
        )
        .route(
            "/livez",
            get(move || {
                let h = h2.clone();
                async move {
                    let (c, b) = livez(&h.inputs());
                    if let Some(m) = &h.metrics {
                        m.health_answered(true, c.as_u16());
                    }
                    json(c, b)
                }
            }),
        )
}

/// Serve on a bound listener until the process ends.
pub fn serve(listener: tokio::net::TcpListener, h: AgentHealth) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(h)).await {
            tracing::error!(error = %e, "agent health server stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(last: Option<u64>, pending: Option<u64>, eligible: bool) -> Inputs {
        let now = Instant::now();
        Inputs {
            now,
            wall_now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            last_success: last.map(|s| now - Duration::from_secs(s)),
            pending_since: pending.map(|s| now - Duration::from_secs(s)),
            sync_period: Duration::from_secs(30),
            node_eligible: eligible,
            drift: None,
            bootstrap: None,
        }
    }

    #[test]
    fn health_table() {
        // (last success ago, pending since ago, node eligible) -> (livez, healthz)
        let cases = [
            (Some(5), None, true, 200, 200),
            (Some(5), Some(59), true, 200, 200),
            (Some(100), Some(61), true, 503, 503),
            (None, None, true, 200, 503),
            (Some(5), None, false, 200, 503),
        ];
        for (last, pending, eligible, live, ready) in cases {
            let i = inputs(last, pending, eligible);
            assert_eq!(
                livez(&i).0.as_u16(),
                live,
                "{last:?} {pending:?} {eligible}"
            );
            assert_eq!(
                healthz(&i).0.as_u16(),
                ready,
                "{last:?} {pending:?} {eligible}"
            );
        }
        let body: serde_json::Value =
            serde_json::from_str(&healthz(&inputs(Some(5), None, false)).1).unwrap();
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(body["healthy"], true);
        assert_eq!(body["currentTime"], "2027-01-15T08:00:00.000Z");
        assert_eq!(body["lastUpdated"], "2027-01-15T07:59:55.000Z");
    }

    #[test]
    fn unrepaired_drift_fails_healthz_and_a_stuck_start_fails_both() {
        let mut i = inputs(Some(5), None, true);
        i.drift = Some("ip set clusterip: 3 missing".into());
        assert_eq!((livez(&i).0.as_u16(), healthz(&i).0.as_u16()), (200, 503));
        let body: serde_json::Value = serde_json::from_str(&healthz(&i).1).unwrap();
        assert_eq!(body["unrepairedDrift"], "ip set clusterip: 3 missing");
        let mut i = inputs(None, Some(1), true);
        i.bootstrap = Some("cannot reach the API server".into());
        assert_eq!((livez(&i).0.as_u16(), healthz(&i).0.as_u16()), (503, 503));
        let body: serde_json::Value = serde_json::from_str(&livez(&i).1).unwrap();
        assert_eq!(body["error"], "cannot reach the API server");
    }
}
