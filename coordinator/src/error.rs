//! The coordinator's error type. Each variant names what is wrong and,
//! where there is one, what to do.

use pgfleet_proto::ParseError;

use crate::client::AgentCallError;
use crate::inventory::{InventoryError, UnknownName};
use crate::rebuild::RebuildError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    UnknownName(#[from] UnknownName),
    #[error(transparent)]
    InvalidArgument(#[from] ParseError),
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl CoordinatorError {
    /// Bad input (a name, a path, the inventory): the command changed nothing
    /// and the caller must fix what they typed.
    pub fn is_usage(&self) -> bool {
        match self {
            CoordinatorError::Inventory(_)
            | CoordinatorError::UnknownName(_)
            | CoordinatorError::InvalidArgument(_) => true,
            CoordinatorError::Rebuild(r) => r.is_usage(),
            CoordinatorError::Agent(_) | CoordinatorError::Output(_) => false,
        }
    }
}
