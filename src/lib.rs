//! nftproxy: a kube-proxy replacement that programs nftables.
//!
//! Data flow: watchers -> stores -> `model` -> `proxy` (ProxyState) -> `nft::compile` (Ruleset)
//! -> `nft::plan` (Transaction) -> `apply` (one atomic netlink batch) -> health/metrics.

pub mod affinity;
pub mod agent;
pub mod apply;
pub mod config;
pub mod conntrack;
pub mod diff_cmd;
pub mod engine;
pub mod events;
pub mod health;
pub mod k8s;
pub mod kpconfig;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod objects;
pub mod preflight;
pub mod proxy;
pub mod render_cmd;
pub mod snapshot;
pub mod sync;
#[doc(hidden)]
pub mod testutil;
pub mod trace;
pub mod udp;
