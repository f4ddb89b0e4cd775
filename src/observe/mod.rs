//! What the node shows the outside: health-check servers and metrics. Everything here reads the
//! sync loop's `Report`s; nothing here writes the kernel.

pub mod agent;
pub mod health;
pub mod metrics;
