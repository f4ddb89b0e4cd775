//! The Kubernetes edge: watches and their inbox, objects read from files, Events written back.

pub mod client;
pub mod events;
pub mod inbox;
pub mod objects;
pub mod pbwatch;
pub mod protobuf;
pub mod watch;
