//! The inbox between the watches and the pipeline: per kind, the latest version of each changed
//! object (or a whole relist), waiting for the engine to take it.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{ReadService, ReadSlice};

/// Services and EndpointSlices as delivered by their watches, already read into what the model
/// keeps (the watch reads each object as it arrives and drops it), waiting for the engine:
/// there is no store of whole objects, not even during a list.
#[derive(Debug, Default)]
pub struct Inbox {
    pub services: Pending<ReadService>,
    pub slices: Pending<ReadSlice>,
}

/// What a watched object is filed under.
pub trait Keyed {
    fn key(&self) -> ObjKey;
}

impl Keyed for Service {
    fn key(&self) -> ObjKey {
        key_of(&self.metadata)
    }
}

impl Keyed for EndpointSlice {
    fn key(&self) -> ObjKey {
        key_of(&self.metadata)
    }
}

impl Keyed for ReadService {
    fn key(&self) -> ObjKey {
        self.key.clone()
    }
}

impl Keyed for ReadSlice {
    fn key(&self) -> ObjKey {
        self.key.clone()
    }
}

pub type SharedInbox = Arc<std::sync::Mutex<Inbox>>;

/// Namespace and name of an object.
pub type ObjKey = (String, String);

/// What a watch delivered for one kind since the engine last looked: the latest version of each
/// changed object (None: deleted), or, after a relist, the whole new list. The engine keeps only
/// its reduced model, so the objects are dropped once modelled: the agent holds no second copy
/// of the cluster's Services and EndpointSlices.
#[derive(Debug)]
pub struct Pending<K> {
    changed: HashMap<ObjKey, Option<K>>,
    /// A relist being received (between Init and InitDone).
    relisting: Option<HashMap<ObjKey, K>>,
    /// A complete relist the engine has not taken yet (later events are folded into it).
    replaced: Option<HashMap<ObjKey, K>>,
    /// The first list has completed.
    pub listed: bool,
}

impl<K> Default for Pending<K> {
    fn default() -> Self {
        Pending {
            changed: HashMap::new(),
            relisting: None,
            replaced: None,
            listed: false,
        }
    }
}

/// What the engine takes from a [`Pending`].
#[derive(Debug)]
pub struct Batch<K> {
    /// Every object of the kind (a relist); `changed` is empty then.
    pub replaced: Option<HashMap<ObjKey, K>>,
    pub changed: HashMap<ObjKey, Option<K>>,
}

impl<K> Default for Batch<K> {
    fn default() -> Self {
        Batch {
            replaced: None,
            changed: HashMap::new(),
        }
    }
}

impl<K> Batch<K> {
    pub fn is_empty(&self) -> bool {
        self.replaced.is_none() && self.changed.is_empty()
    }

    /// A complete list.
    pub fn all(objects: impl IntoIterator<Item = K>) -> Batch<K>
    where
        K: Keyed,
    {
        Batch {
            replaced: Some(objects.into_iter().map(|o| (o.key(), o)).collect()),
            changed: HashMap::new(),
        }
    }
}

impl<K: Keyed> Pending<K> {
    /// Record one watch event.
    pub fn event(&mut self, ev: kube::runtime::watcher::Event<K>) {
        use kube::runtime::watcher::Event;
        match ev {
            Event::Apply(o) => {
                let key = o.key();
                match &mut self.replaced {
                    Some(all) => {
                        all.insert(key, o);
                    }
                    None => {
                        self.changed.insert(key, Some(o));
                    }
                }
            }
            Event::Delete(o) => {
                let key = o.key();
                match &mut self.replaced {
                    Some(all) => {
                        all.remove(&key);
                    }
                    None => {
                        self.changed.insert(key, None);
                    }
                }
            }
            Event::Init => self.relisting = Some(HashMap::new()),
            Event::InitApply(o) => {
                self.relisting
                    .get_or_insert_with(HashMap::new)
                    .insert(o.key(), o);
            }
            Event::InitDone => {
                // The new list supersedes every change before it.
                self.replaced = Some(self.relisting.take().unwrap_or_default());
                self.changed.clear();
                self.listed = true;
            }
        }
    }

    pub fn take(&mut self) -> Batch<K> {
        Batch {
            replaced: self.replaced.take(),
            changed: std::mem::take(&mut self.changed),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.replaced.is_none() && self.changed.is_empty()
    }
}

pub fn key_of(meta: &kube::api::ObjectMeta) -> ObjKey {
    crate::model::object_key(meta)
}
