//! Health answers: the per-service `healthCheckNodePort` servers load balancers probe, and the
//! agent's own `/healthz` and `/livez`. Response functions are pure; servers are thin.

pub mod agent;
pub mod service;
