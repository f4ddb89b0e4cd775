//! The nftables layer: typed IR, transactions, and (pure) compile/render/plan.

pub mod ir;
pub mod template;
pub mod tx;
