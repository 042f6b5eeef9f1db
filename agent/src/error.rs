//! The agent's error type and its one mapping onto gRPC status codes.

use pgfleet_proto::ParseError;
use tonic::{Code, Status};

use crate::jobs::JobError;
use crate::lease::LeaseError;
use crate::pg::{DropSlotError, PgError};
use crate::rebuild::RebuildError;
use crate::standby::StandbyError;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    InvalidArgument(#[from] ParseError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    DropSlot(#[from] DropSlotError),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Standby(#[from] StandbyError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

fn pg_code(e: &PgError) -> Code {
    match e {
        PgError::Unavailable { .. } => Code::Unavailable,
        PgError::Timeout { .. } => Code::DeadlineExceeded,
        PgError::Query { .. } => Code::Internal,
        PgError::Unexpected { .. } => Code::Internal,
    }
}

/// Most rebuild errors travel in job events, not as a Status; those raised
/// before the job starts (validation) do.
fn rebuild_code(e: &RebuildError) -> Code {
    match e {
        RebuildError::Invalid { .. } => Code::InvalidArgument,
        RebuildError::RunningPrimary
        | RebuildError::RoleUnknown { .. }
        | RebuildError::SystemIdentifierMismatch { .. }
        | RebuildError::NotEnoughSpace { .. }
        | RebuildError::UpstreamAuth { .. }
        | RebuildError::StillRunning { .. } => Code::FailedPrecondition,
        RebuildError::UpstreamUnreachable { .. } => Code::Unavailable,
        RebuildError::NotReady { .. } => Code::DeadlineExceeded,
        RebuildError::Command { .. }
        | RebuildError::Service { .. }
        | RebuildError::DataDir(_)
        | RebuildError::Passfile { .. }
        | RebuildError::AutoConf { .. }
        | RebuildError::LogFile { .. }
        | RebuildError::Basebackup { .. } => Code::Internal,
        RebuildError::Pg(pg) => pg_code(pg),
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let code = match &e {
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::Pg(pg) => pg_code(pg),
            AgentError::DropSlot(d) => match d {
                DropSlotError::NotFound(_) => Code::NotFound,
                DropSlotError::Active { .. } => Code::FailedPrecondition,
                DropSlotError::StillActive { .. } => Code::FailedPrecondition,
                DropSlotError::Pg(pg) => pg_code(pg),
            },
            AgentError::Invalid { .. } => Code::InvalidArgument,
            AgentError::Upstream(u) => match u {
                UpstreamError::Pg(pg) => pg_code(pg),
                UpstreamError::SlotActive { .. } => Code::FailedPrecondition,
                UpstreamError::DropStaleSlot { .. } => Code::FailedPrecondition,
                UpstreamError::HbaFile { .. } => Code::Internal,
                UpstreamError::HbaRejected { .. } => Code::FailedPrecondition,
                UpstreamError::HbaNotLoaded { .. } => Code::Internal,
                UpstreamError::RoleNotReplicated(_) => Code::FailedPrecondition,
                UpstreamError::RoleIsSuperuser(_) => Code::InvalidArgument,
            },
            AgentError::Rebuild(r) => rebuild_code(r),
            AgentError::Standby(s) => match s {
                StandbyError::Invalid { .. } => Code::InvalidArgument,
                StandbyError::Pg(pg) => pg_code(pg),
                StandbyError::Command { .. }
                | StandbyError::Service { .. }
                | StandbyError::File { .. }
                | StandbyError::Rewind { .. } => {
                    Code::Internal
                }
                StandbyError::RunningPrimary
                | StandbyError::NotStandby
                | StandbyError::StillRunning { .. }
                | StandbyError::SlotActive(_)
                | StandbyError::RunningForRewind
                | StandbyError::NotCleanPrimary { .. }
                | StandbyError::NotFenced
                | StandbyError::NotCrashed(_)
                | StandbyError::NoDataDir(_) => Code::FailedPrecondition,
                StandbyError::PromoteTimeout => Code::DeadlineExceeded,
            },
            AgentError::Lease(l) => match l {
                LeaseError::Ttl(_) => Code::InvalidArgument,
                LeaseError::File { .. } => Code::Internal,
            },
            AgentError::Job(j) => match j {
                JobError::AlreadyRunning { .. } => Code::AlreadyExists,
                JobError::NotFound(_) => Code::NotFound,
            },
        };
        // Every message leaves on one line, whatever a layer below put in
        // it (tonic would send a raw newline in the grpc-message header).
        Status::new(code, pgfleet_proto::one_line(&e.to_string(), 2000))
    }
}
