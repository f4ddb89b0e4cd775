//! Which dumped conntrack entries are stale: the flows of one call indexed by family and port.

use super::*;

// ------------------------------------------------------------------------------------------------
// Selection.

/// The stale flows of one call, indexed by (family, port).
#[derive(Debug, Default)]
pub(super) struct Selector {
    /// Per (l3 family, destination port): keep sets per concrete destination, and the keep set of
    /// the wildcard (`dst: None`) flows.
    pub(super) by_port: HashMap<(u8, u16), PortRules>,
}

#[derive(Debug, Default)]
pub(super) struct PortRules {
    pub(super) exact: HashMap<IpAddr, HashSet<IpAddr>>,
    pub(super) any: Option<HashSet<IpAddr>>,
}

impl Selector {
    /// Validates every flow first, so a bad one fails the call before anything is deleted.
    pub(super) fn new(flows: &[StaleFlow]) -> Result<Selector, ConntrackError> {
        let mut sel = Selector::default();
        for f in flows {
            let invalid = |reason| ConntrackError::InvalidFlow {
                flow: f.clone(),
                reason,
            };
            if f.port == 0 {
                return Err(invalid("port 0"));
            }
            if f.dst.is_some_and(|d| family_of_addr(&d) != f.family) {
                return Err(invalid("destination address of the other family"));
            }
            let rules = sel.by_port.entry((l3_of(f.family), f.port)).or_default();
            let keep = match f.dst {
                Some(d) => rules.exact.entry(d).or_default(),
                None => rules.any.get_or_insert_with(HashSet::new),
            };
            // Keep addresses of the other family can never be a reply source here; harmless.
            keep.extend(f.keep.iter().copied());
        }
        Ok(sel)
    }

    pub(super) fn families(&self) -> Vec<u8> {
        let mut f: Vec<u8> = self.by_port.keys().map(|k| k.0).collect();
        f.sort_unstable();
        f.dedup();
        f
    }

    pub(super) fn selects(&self, e: &CtEntry) -> bool {
        if e.orig.proto != IPPROTO_UDP {
            return false;
        }
        let Some((_, dport)) = e.orig.ports else {
            return false;
        };
        let Some(rules) = self.by_port.get(&(e.orig.l3(), dport)) else {
            return false;
        };
        // A concrete destination takes precedence over the wildcard (see StaleFlow).
        let keep = match rules.exact.get(&e.orig.dst()) {
            Some(keep) => keep,
            None => match &rules.any {
                Some(keep) => keep,
                None => return false,
            },
        };
        !keep.contains(&e.reply_src)
    }
}

// ------------------------------------------------------------------------------------------------
