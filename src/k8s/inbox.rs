//! The inbox between the watches and the pipeline: per kind, the latest version of each changed
//! object (or a whole relist), waiting for the engine to take it.

use rustc_hash::FxHashMap as HashMap;
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

impl Inbox {
    /// A bounded piece of the first lists for the engine to model while the rest arrives: at
    /// most `n` EndpointSlices and the Services they belong to. A Service's port states are
    /// built from the Service and its slices together, so a Service taken without them would
    /// be built twice; Services whose slices have not come yet stay for later (the lists come
    /// sorted by namespace and name, so a Service and its slices arrive close together).
    pub fn take_piece(&mut self, n: usize) -> (Batch<ReadService>, Batch<ReadSlice>) {
        let slices = self.slices.take_at_most(n);
        let owners: Vec<ObjKey> = slices
            .changed
            .values()
            .flatten()
            .filter_map(|s| s.info.as_ref())
            .map(|i| (i.service.namespace.clone(), i.service.name.clone()))
            .collect();
        (self.services.take_keys(&owners), slices)
    }
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
///
/// The first list is different: the engine's model is still empty, so each listed object is
/// simply a change, and is handed out as one while the list is still arriving (the agent
/// models and compiles the first pages while later ones come; nothing is programmed before
/// the list is complete). Only a first list that restarts (its watch failed midway) is
/// buffered whole, as every relist is: the objects of the broken attempt may have been taken
/// already, and only a complete list can say which of them are gone.
#[derive(Debug)]
pub struct Pending<K> {
    changed: HashMap<ObjKey, Option<K>>,
    /// A relist being received (between Init and InitDone).
    relisting: Option<HashMap<ObjKey, K>>,
    /// A complete relist the engine has not taken yet (later events are folded into it).
    replaced: Option<HashMap<ObjKey, K>>,
    /// Where the first list is.
    first: First,
    /// The first list has completed.
    pub listed: bool,
}

/// The first list of a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum First {
    /// Not begun.
    Waiting,
    /// Arriving, handed out as changes.
    Streaming,
    /// Complete, or restarted (and then buffered as a relist).
    Over,
}

impl<K> Default for Pending<K> {
    fn default() -> Self {
        Pending {
            changed: HashMap::default(),
            relisting: None,
            replaced: None,
            first: First::Waiting,
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
            changed: HashMap::default(),
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
            changed: HashMap::default(),
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
            Event::Init => {
                if self.first == First::Waiting {
                    self.first = First::Streaming;
                } else {
                    self.first = First::Over;
                    self.relisting = Some(HashMap::default());
                }
            }
            Event::InitApply(o) => match (&mut self.relisting, self.first) {
                (None, First::Streaming) => {
                    self.changed.insert(o.key(), Some(o));
                }
                (r, _) => {
                    r.get_or_insert_with(HashMap::default).insert(o.key(), o);
                }
            },
            Event::InitDone => {
                self.first = First::Over;
                if let Some(all) = self.relisting.take() {
                    // The new list supersedes every change before it.
                    self.replaced = Some(all);
                    self.changed.clear();
                }
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

    /// The changes of the objects `keys` names (none while a relist is pending: it is taken
    /// whole).
    pub fn take_keys<'a>(&mut self, keys: impl IntoIterator<Item = &'a ObjKey>) -> Batch<K> {
        if self.replaced.is_some() {
            return Batch::default();
        }
        Batch {
            replaced: None,
            changed: keys
                .into_iter()
                .filter_map(|k| self.changed.remove_entry(k))
                .collect(),
        }
    }

    /// Like [`Pending::take`], but at most `n` changed objects (a pending relist is taken
    /// whole with everything): a bounded piece of work for the engine.
    pub fn take_at_most(&mut self, n: usize) -> Batch<K> {
        if self.replaced.is_some() || self.changed.len() <= n {
            return self.take();
        }
        let keys: Vec<ObjKey> = self.changed.keys().take(n).cloned().collect();
        let changed = keys
            .into_iter()
            .filter_map(|k| self.changed.remove_entry(&k))
            .collect();
        Batch {
            replaced: None,
            changed,
        }
    }
}

pub fn key_of(meta: &kube::api::ObjectMeta) -> ObjKey {
    crate::model::object_key(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    #[derive(Debug, Clone, PartialEq)]
    struct O(&'static str, u32);

    impl Keyed for O {
        fn key(&self) -> ObjKey {
            ("ns".into(), self.0.into())
        }
    }

    fn keys<K>(m: &HashMap<ObjKey, K>) -> Vec<String> {
        let mut k: Vec<String> = m.keys().map(|k| k.1.clone()).collect();
        k.sort();
        k
    }

    #[test]
    fn the_first_list_is_handed_out_as_changes_while_it_arrives() {
        let mut p = Pending::default();
        p.event(Event::Init);
        p.event(Event::InitApply(O("a", 1)));
        let b = p.take();
        assert!(b.replaced.is_none());
        assert_eq!(keys(&b.changed), ["a"]);
        p.event(Event::InitApply(O("b", 1)));
        assert!(!p.listed);
        p.event(Event::InitDone);
        assert!(p.listed);
        let b = p.take();
        assert!(b.replaced.is_none(), "the engine already has a");
        assert_eq!(keys(&b.changed), ["b"]);
    }

    #[test]
    fn take_at_most_hands_out_bounded_pieces_of_changes() {
        let mut p = Pending::default();
        p.event(Event::Init);
        for name in ["a", "b", "c", "d", "e"] {
            p.event(Event::InitApply(O(name, 1)));
        }
        let mut seen = Vec::new();
        while !p.is_empty() {
            let b = p.take_at_most(2);
            assert!(b.replaced.is_none() && (1..=2).contains(&b.changed.len()));
            seen.extend(keys(&b.changed));
        }
        seen.sort();
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        // A pending relist goes whole, with the changes after it.
        p.event(Event::InitDone);
        p.event(Event::Init);
        for name in ["a", "b", "c"] {
            p.event(Event::InitApply(O(name, 2)));
        }
        p.event(Event::InitDone);
        let b = p.take_at_most(1);
        assert_eq!(b.replaced.as_ref().map(|r| r.len()), Some(3));
    }

    #[test]
    fn a_restarted_first_list_and_every_relist_are_buffered_whole() {
        let mut p = Pending::default();
        p.event(Event::Init);
        p.event(Event::InitApply(O("a", 1)));
        p.event(Event::InitApply(O("gone", 1)));
        let _ = p.take(); // the engine took both
                          // The watch failed midway and lists again: "gone" was deleted meanwhile.
        p.event(Event::Init);
        p.event(Event::InitApply(O("a", 2)));
        assert!(
            p.is_empty(),
            "nothing is handed out before the list is complete"
        );
        p.event(Event::InitDone);
        let b = p.take();
        assert_eq!(b.replaced.as_ref().map(keys), Some(vec!["a".to_string()]));
        assert!(b.changed.is_empty());
        // A later relist (410 Gone) replaces too, superseding changes before it.
        p.event(Event::Apply(O("x", 1)));
        p.event(Event::Init);
        p.event(Event::InitApply(O("a", 3)));
        p.event(Event::InitDone);
        p.event(Event::Apply(O("y", 1)));
        let b = p.take();
        assert_eq!(
            b.replaced.as_ref().map(keys),
            Some(vec!["a".to_string(), "y".to_string()])
        );
        assert!(b.changed.is_empty());
    }
}
