//! nftproxy: a kube-proxy replacement that programs nftables.
//!
//! The modules in pipeline order (ARCHITECTURE.md has the diagram and the rules each keeps):
//! `k8s` (watches, inbox, objects, events) -> `model` (objects to service ports and endpoints)
//! -> `proxy` (endpoint choice) -> `pipeline` (the incremental engine) -> `nft` (IR, compile,
//! plan, render) -> `apply` (one atomic netlink batch) -> `sync` (the loop, the only kernel
//! writer) -> `observe` (health, metrics: read the sync's Reports). `net` is the vocabulary they
//! share; `cmd` wires them into commands; `conntrack` serves sync; `trace` (a packet tracer over
//! the IR) serves the tests and `explain` (what a flow does on this node, and why).

pub mod apply;
pub mod cmd;
pub mod conntrack;
pub mod explain;
pub mod k8s;
pub mod lock;
pub mod model;
pub mod net;
pub mod nft;
pub mod observe;
pub mod pipeline;
pub mod proxy;
pub mod sync;
#[doc(hidden)]
pub mod testutil;
pub mod trace;
