//! Reading Kubernetes objects from YAML/JSON files (`nftproxy render`, tests, the demo).

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::Deserialize;

use crate::model::NodeInfo;

#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub service_cidrs: Vec<ServiceCIDR>,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{kind} {name}: {source}")]
    Object {
        kind: String,
        name: String,
        source: serde_json::Error,
    },
}

impl Objects {
    /// The node a file's objects are rendered for: the named one, else the only Node in the
    /// file (an unknown name gives a Node with only that name).
    pub fn node_info(&self, name: Option<&str>) -> NodeInfo {
        let objs = self;
        let found = match name {
            Some(n) => objs
                .nodes
                .iter()
                .find(|x| x.metadata.name.as_deref() == Some(n)),
            None if objs.nodes.len() == 1 => objs.nodes.first(),
            None => None,
        };
        match found {
            Some(n) => NodeInfo::from_node(n),
            None => NodeInfo {
                name: name.unwrap_or_default().to_string(),
                ..Default::default()
            },
        }
    }

    /// Parse multi-document YAML or JSON (a JSON document is valid YAML): single objects, `List`s
    /// and arrays. Unknown kinds are ignored.
    pub fn parse(text: &str) -> Result<Objects, ObjectsError> {
        let mut out = Objects::default();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = serde_json::Value::deserialize(doc)?;
            out.add_value(v)?;
        }
        Ok(out)
    }

    fn add_value(&mut self, v: serde_json::Value) -> Result<(), ObjectsError> {
        match v {
            serde_json::Value::Null => Ok(()),
            serde_json::Value::Array(items) => {
                items.into_iter().try_for_each(|i| self.add_value(i))
            }
            serde_json::Value::Object(ref m)
                if m.get("kind")
                    .and_then(|k| k.as_str())
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                let items = m
                    .get("items")
                    .and_then(|i| i.as_array())
                    .cloned()
                    .unwrap_or_default();
                items.into_iter().try_for_each(|i| self.add_value(i))
            }
            serde_json::Value::Object(ref m) => {
                let kind = m
                    .get("kind")
                    .and_then(|k| k.as_str())
                    .unwrap_or("")
                    .to_string();
                let name = m
                    .get("metadata")
                    .and_then(|md| md.get("name"))
                    .and_then(|n| n.as_str())
                    .unwrap_or("")
                    .to_string();
                let err = |source| ObjectsError::Object {
                    kind: kind.clone(),
                    name: name.clone(),
                    source,
                };
                match kind.as_str() {
                    "Service" => self
                        .services
                        .push(serde_json::from_value(v.clone()).map_err(err)?),
                    "EndpointSlice" => self
                        .slices
                        .push(serde_json::from_value(v.clone()).map_err(err)?),
                    "Node" => self
                        .nodes
                        .push(serde_json::from_value(v.clone()).map_err(err)?),
                    "ServiceCIDR" => self
                        .service_cidrs
                        .push(serde_json::from_value(v.clone()).map_err(err)?),
                    _ => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
