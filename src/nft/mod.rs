//! The nftables layer: typed IR, transactions, and (pure) compile/render/plan.

pub mod compile;
pub mod ir;
pub mod names;
pub mod plan;
pub mod render;
pub mod template;
pub mod tx;
