//! Stale UDP conntrack cleanup over ctnetlink (DESIGN §2 "Sync", last bullet).
//!
//! UDP has no teardown: DNAT is decided on the first packet of a flow and recorded in its conntrack
//! entry, and every later packet of the same 5-tuple follows that entry until it times out. Chatty
//! clients (a resolver reusing its source port, statsd) refresh the entry forever, so when a UDP
//! service port loses endpoints their traffic stays pinned to the dead pod. The sync loop therefore
//! hands a [`Conntrack`] the affected service ports ([`StaleFlow`]) and it deletes the entries whose
//! ORIGINAL destination is the service address and port and whose REPLY source (the endpoint the
//! flow was DNATed to, or the service address itself when it was not DNATed at all) is not an
//! endpoint that still serves.
//!
//! [`NetlinkConntrack`] speaks ctnetlink on one `NETLINK_NETFILTER` socket, no `conntrack` binary:
//! per call it dumps the table once per address family involved (asking the kernel to send only
//! UDP entries), selects in user space, and deletes each selected entry by its original tuple, its
//! zone and its conntrack id. Sending the id makes the kernel refuse (ENOENT) when the tuple now
//! belongs to a *new* entry created between the dump and the delete, which may well point at a
//! healthy endpoint: only the exact entries that were judged stale are ever deleted.
//!
//! Messages are built and parsed by hand on byte buffers with safe code; the socket itself is
//! `nftproxy-nl`'s `RawSocket`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::net::Family;

pub mod stale;
pub mod sysctl;

/// A UDP flow steering rule to clean: conntrack entries whose ORIGINAL destination is `dst:port`
/// (a ClusterIP/externalIP/LB IP with its service port, or any local address with a NodePort when
/// `dst` is None) and whose REPLY source address is NOT in `keep` (the endpoints still serving).
///
/// When one call carries both a flow with a concrete `dst` and a wildcard (`dst: None`) flow on the
/// same port, an entry whose destination equals that `dst` is judged by the concrete flow only (the
/// way kube-proxy gives service IPs precedence over NodePorts): a NodePort that happens to equal
/// another service's port must not kill that service's healthy flows. Several flows with the same
/// (`dst`, `port`) keep the union of their `keep` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleFlow {
    pub dst: Option<IpAddr>,
    pub port: u16,
    pub family: Family,
    pub keep: Vec<IpAddr>,
}

/// Errors of [`Conntrack::delete_stale`].
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// A caller bug caught before anything was deleted.
    #[error("invalid stale flow {flow:?}: {reason}")]
    InvalidFlow {
        flow: StaleFlow,
        reason: &'static str,
    },
    #[error("conntrack netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("conntrack netlink: no reply from the kernel within {0} s")]
    Timeout(u64),
    #[error("kernel refused conntrack {op}: {} (errno {errno})", std::io::Error::from_raw_os_error(*.errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("malformed ctnetlink message: {0}")]
    Malformed(String),
}

/// Deletes stale UDP conntrack entries. `Send` so the sync loop can own it on any thread.
pub trait Conntrack: Send {
    /// Deletes the conntrack entries selected by `flows` (see [`StaleFlow`]) and returns how many
    /// were deleted. Entries that vanish before they can be deleted are not counted and are not
    /// an error.
    fn delete_stale(&mut self, flows: &[StaleFlow]) -> Result<usize, ConntrackError>;
}

/// Records calls, for the sync loop tests. Deletes nothing and always answers `Ok(0)`.
#[derive(Debug, Default, Clone)]
pub struct FakeConntrack {
    pub calls: Vec<Vec<StaleFlow>>,
}

impl FakeConntrack {
    pub fn new() -> FakeConntrack {
        FakeConntrack::default()
    }
}

impl Conntrack for FakeConntrack {
    fn delete_stale(&mut self, flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
        self.calls.push(flows.to_vec());
        Ok(0)
    }
}

/// Conntrack cleanup switched off (no ctnetlink on this node): keeps nothing, deletes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct DisabledConntrack;

impl Conntrack for DisabledConntrack {
    fn delete_stale(&mut self, _flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
        Ok(0)
    }
}

mod netlink;
mod select;
mod wire;

pub use netlink::NetlinkConntrack;
use select::*;
use wire::*;

#[cfg(test)]
mod tests;
