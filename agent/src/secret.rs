//! The agent's passwords in memory: the type shared with the coordinator.

pub use pgfleet_proto::secret::{Secret, SecretError};
