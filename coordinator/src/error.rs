//! The coordinator's error type. Each variant names what is wrong and,
//! where there is one, what to do.

use pgfleet_proto::ParseError;

use crate::client::AgentCallError;
use crate::inventory::{InventoryError, UnknownName};
use crate::ops::exec::MoveError;
use crate::journal::JournalError;
use crate::rebuild::RebuildError;
use crate::sync::SyncError;

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
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Move(#[from] MoveError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Cancelled(#[from] crate::ops::ctx::Cancelled),
    #[error("{message}")]
    Remote { message: String, exit_code: u32 },
    #[error("{message}")]
    NotLeader { leader: String, message: String },
    #[error("{0}")]
    Usage(String),
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
            CoordinatorError::Sync(s) => s.is_usage(),
            CoordinatorError::Move(m) => m.is_usage(),
            CoordinatorError::Usage(_) => true,
            CoordinatorError::Journal(_) => false,
            // The agent refused what was asked as invalid: bad input too.
            CoordinatorError::Agent(a) => a.is_invalid_argument(),
            CoordinatorError::Output(_) | CoordinatorError::Cancelled(_) => false,
            CoordinatorError::Remote { exit_code, .. } => *exit_code == 2,
            CoordinatorError::NotLeader { .. } => false,
        }
    }

    /// The gRPC code of this error, every kind named (no catch-all): bad
    /// input INVALID_ARGUMENT, an unknown name NOT_FOUND, a refusal
    /// FAILED_PRECONDITION, a held lock ABORTED, an unreachable agent or
    /// etcd UNAVAILABLE (DESIGN.md, "Both doors, one check").
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CoordinatorError::Inventory(_) => Code::FailedPrecondition,
            CoordinatorError::UnknownName(_) => Code::NotFound,
            CoordinatorError::InvalidArgument(_) | CoordinatorError::Usage(_) => Code::InvalidArgument,
            CoordinatorError::Agent(e) => e.code(),
            CoordinatorError::Rebuild(e) => e.code(),
            CoordinatorError::Sync(e) => e.code(),
            CoordinatorError::Move(e) => e.code(),
            CoordinatorError::Journal(e) => e.code(),
            CoordinatorError::Cancelled(_) => Code::Cancelled,
            CoordinatorError::Remote { exit_code: 2, .. } => Code::InvalidArgument,
            CoordinatorError::Remote { .. } => Code::Unknown,
            CoordinatorError::NotLeader { .. } => Code::Unavailable,
            CoordinatorError::Output(_) => Code::Internal,
        }
    }

    /// Stopped by CancelOperation at a safe point.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            CoordinatorError::Cancelled(_)
                | CoordinatorError::Rebuild(crate::rebuild::RebuildError::Cancelled(_))
                | CoordinatorError::Move(crate::ops::exec::MoveError::Cancelled(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn refusals_locks_and_unreachable_agents_have_their_own_codes() {
        let busy = CoordinatorError::Journal(JournalError::Busy { cluster: "main".into(), holder: "op".into() });
        assert_eq!(busy.code(), Code::Aborted);
        let refused = CoordinatorError::Move(MoveError::Refused("no".into()));
        assert_eq!(refused.code(), Code::FailedPrecondition);
        let gone = CoordinatorError::Agent(AgentCallError::Unreachable {
            node: "n".into(),
            endpoint: "https://x".into(),
            reason: "refused".into(),
        });
        assert_eq!(gone.code(), Code::Unavailable);
        let unknown = CoordinatorError::UnknownName(UnknownName { kind: "node", name: "x".into(), known: Vec::new() });
        assert_eq!(unknown.code(), Code::NotFound);
        assert_eq!(CoordinatorError::Usage("bad".into()).code(), Code::InvalidArgument);
    }
}
