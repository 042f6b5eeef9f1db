//! pgfleet coordinator: knows the fleet (the inventory), drives the agents
//! over gRPC, and presents the result to people (tables) and programs
//! (JSON). The CLI and `pgfleet serve` share this library.

// CoordinatorError carries the rebuild's failure (stderr tail, paths) by
// value: it is built once per failed command, never in a hot path.
#![allow(clippy::result_large_err)]

pub mod admit;
pub mod certs;
pub mod cli;
pub mod client;
pub mod detect;
pub mod error;
pub mod etcd;
pub mod fleet_status;
pub mod inventory;
pub mod journal;
pub mod policy;
pub mod link;
pub mod majors;
pub mod ops;
pub mod progress;
pub mod rebuild;
pub mod serve;
pub mod slots;
pub mod sync;
pub mod verify;
pub mod wal;
