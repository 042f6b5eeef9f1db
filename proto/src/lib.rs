//! pgfleet's wire contract.
//!
//! The generated gRPC code for `pgfleet.agent.v1` and `pgfleet.coordinator.v1`,
//! and the validated types both sides share. Untrusted strings become these
//! types once, at the RPC edge (`SlotName::parse`), and only the types travel
//! further: the agent's domain code never sees a raw slot name.

pub mod auth;
pub mod identity;
pub mod major;
pub mod notify;
mod redact;
pub mod secret;
pub mod sync;
pub mod tls;
pub mod types;

/// The primary's lease (agent RPC HoldLease), as both sides count it.
pub mod lease {
    use std::time::Duration;

    /// The agent fences its server this long before the ttl runs out, so
    /// that it is stopped before the coordinator may promote another.
    pub const FENCE_BUDGET: Duration = Duration::from_secs(2);
    /// Shorter leaves too little between renewals (every second) and the
    /// fence.
    pub const MIN_TTL: Duration = Duration::from_secs(4);
    pub const MAX_TTL: Duration = Duration::from_secs(600);
}

pub use types::{ClusterName, Lsn, NodeName, OperationId, ParseError, RoleName, SlotName, one_line, shown, shown_max};

/// `pgfleet.agent.v1`: the agent's API.
pub mod agent {
    pub mod v1 {
        #![allow(missing_docs, clippy::all, missing_debug_implementations)]
        tonic::include_proto!("pgfleet.agent.v1");
    }
}

/// `pgfleet.coordinator.v1`: the coordinator's API.
pub mod coordinator {
    pub mod v1 {
        #![allow(missing_docs, clippy::all, missing_debug_implementations)]
        tonic::include_proto!("pgfleet.coordinator.v1");
    }
}

/// An argv (a `PlanStep`'s) on one line, quoted the way a shell user would
/// type it. For reading only: pgfleet never runs anything through a shell.
pub fn shell_words<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| {
            let a = a.as_ref();
            let plain = !a.is_empty()
                && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
            if plain {
                a.to_owned()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Encoded `FileDescriptorSet` of every pgfleet .proto, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pgfleet_descriptor.bin"));
