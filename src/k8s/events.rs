//! Events: Warning Events on the objects nftproxy cannot serve (bad input, health ports that
//! cannot be bound, drift), and the Normal `Starting` event on the Node that kube-proxy emits at
//! start. Sync code hands events to a channel; a task publishes them, so the API never slows a
//! sync and an unreachable API only costs a log line.

use crate::model::ObjectRef;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// "Service", "EndpointSlice" or "Node" (namespace empty).
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
    pub note: String,
}

impl Warning {
    /// From a model problem's object string ("Service ns/name").
    pub fn from_problem(object: &ObjectRef, reason_text: &str) -> Option<Warning> {
        if !matches!(object.kind, "Service" | "EndpointSlice") {
            return None;
        }
        Some(Warning {
            kind: object.kind.into(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            reason: "NftproxyInvalidInput".into(),
            note: reason_text.into(),
        })
    }
}

/// Cheap, cloneable handle; sending never blocks (events are dropped when the queue is full).
/// One event to publish: its object, reason and note, its type and action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub event: Warning,
    pub normal: bool,
    pub action: &'static str,
}

#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Outgoing>,
}

impl Events {
    pub fn warn(&self, w: Warning) {
        self.send(Outgoing {
            event: w,
            normal: false,
            action: "Proxying",
        });
    }

    /// The Normal event kube-proxy emits on its Node when it starts (cmd/kube-proxy/app/
    /// server.go `birthCry`: reason `Starting`, action `StartKubeProxy`, no note), so that
    /// `kubectl describe node` and event-based tooling see the proxy start.
    pub fn started(&self, node: &str) {
        self.send(Outgoing {
            event: Warning {
                kind: "Node".into(),
                namespace: String::new(),
                name: node.to_string(),
                reason: "Starting".into(),
                note: String::new(),
            },
            normal: true,
            action: "StartKubeProxy",
        });
    }

    fn send(&self, o: Outgoing) {
        if self.tx.try_send(o).is_err() {
            tracing::debug!("event queue full; event dropped");
        }
    }

    /// A handle whose events go nowhere but a receiver (tests).
    pub fn channel(capacity: usize) -> (Events, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Events { tx }, rx)
    }

    /// Publish through the events API as `nftproxy` on `node`.
    pub fn start(client: Client, node: &str) -> Events {
        let (events, mut rx) = Events::channel(256);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "nftproxy".into(),
                instance: Some(node.to_string()),
            },
        );
        tokio::spawn(async move {
            while let Some(Outgoing {
                event: w,
                normal,
                action,
            }) = rx.recv().await
            {
                let api_version = if w.kind == "EndpointSlice" {
                    "discovery.k8s.io/v1"
                } else {
                    "v1"
                };
                // `kubectl describe` finds an object's events by its UID.
                let uid = uid_of(&client, &w).await;
                let reference = ObjectReference {
                    api_version: Some(api_version.into()),
                    kind: Some(w.kind.clone()),
                    // Nodes are cluster-scoped.
                    namespace: (!w.namespace.is_empty()).then(|| w.namespace.clone()),
                    name: Some(w.name.clone()),
                    uid,
                    ..Default::default()
                };
                let ev = Event {
                    type_: if normal {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    },
                    reason: w.reason.clone(),
                    note: (!w.note.is_empty()).then(|| w.note.clone()),
                    action: action.into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    tracing::debug!(error = %e, object = %format!("{}/{}", w.namespace, w.name), "cannot publish event");
                }
            }
        });
        events
    }
}

/// The UID an event's reference needs. Nodes: their name, as kubelet and kube-proxy set it for
/// node events (pkg/kubelet/kubelet.go, cmd/kube-proxy/app/server.go: `UID: types.UID(name)`),
/// which is what `kubectl describe node` looks up. Namespaced objects: read from the API (events
/// are rare; the agent keeps no copy of the objects). None when it cannot be read.
async fn uid_of(client: &Client, w: &Warning) -> Option<String> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::Api;
    let meta = match w.kind.as_str() {
        "Node" => return Some(w.name.clone()),
        "Service" => Api::<Service>::namespaced(client.clone(), &w.namespace)
            .get_metadata_opt(&w.name)
            .await
            .map(|o| o.map(|o| o.metadata)),
        "EndpointSlice" => Api::<EndpointSlice>::namespaced(client.clone(), &w.namespace)
            .get_metadata_opt(&w.name)
            .await
            .map(|o| o.map(|o| o.metadata)),
        _ => return None,
    };
    match meta {
        Ok(m) => m.and_then(|m| m.uid),
        Err(e) => {
            tracing::debug!(error = %e, kind = %w.kind, name = %w.name, "cannot read the UID for an event");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_become_warnings() {
        let w = Warning::from_problem(&ObjectRef::new("Service", "ns", "web"), "bad externalIP")
            .unwrap();
        assert_eq!(
            (
                w.kind.as_str(),
                w.namespace.as_str(),
                w.name.as_str(),
                w.note.as_str()
            ),
            ("Service", "ns", "web", "bad externalIP")
        );
        assert!(Warning::from_problem(&ObjectRef::new("ServiceCIDR", "", "x"), "bad").is_none());
    }
}
