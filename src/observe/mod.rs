//! What the node shows the outside: health-check servers, metrics and (on a local socket) the
//! debug endpoints. Everything here reads the
//! sync loop's `Report`s; nothing here writes the kernel.

pub mod agent;
pub mod debug;
pub mod health;
pub mod metrics;
