//! Who is calling, whether they may, and the audit trail of changes
//! (DESIGN.md invariant 10): the shared implementation in pgfleet-proto, with
//! the agent's table of which RPC needs which access.

use pgfleet_proto::identity::agent_method_access;
use tonic::Status;

pub use pgfleet_proto::auth::{Audit, Caller, caller_of};

/// Whether `caller` may call the agent RPC `method`.
pub fn authorize(caller: &Caller, method: &'static str) -> Result<(), Status> {
    pgfleet_proto::auth::authorize(caller, method, agent_method_access(method))
}
