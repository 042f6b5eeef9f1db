//! pgfleet coordinator: knows the fleet (the inventory), drives the agents
//! over gRPC, and presents the result to people (tables) and programs
//! (JSON). The CLI and `pgfleet serve` share this library.

pub mod certs;
pub mod cli;
pub mod client;
pub mod error;
pub mod failover;
pub mod fleet_status;
pub mod inventory;
pub mod journal;
pub mod progress;
pub mod rebuild;
pub mod rejoin;
pub mod slots;
pub mod status_render;
pub mod sync;
pub mod table;
pub mod verify;
pub mod wal;
