//! Who may call what on the control channel (DESIGN.md invariant 10).
//!
//! Every certificate the fleet CA issues names its holder in the subject's
//! common name and its role in the organizational unit. Agents authorize
//! each call from the verified client certificate: a reader may only look,
//! an admin may change things, an agent certificate is for serving only.

use std::fmt;

/// The organizational unit values pgfleet writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertRole {
    /// Serves the agent API (server certificate).
    Agent,
    /// Operators and systems that change the fleet.
    Admin,
    /// Monitoring and dashboards: read-only calls.
    Reader,
}

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Agent => "agent",
            CertRole::Admin => "admin",
            CertRole::Reader => "reader",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(CertRole::Agent),
            "admin" => Some(CertRole::Admin),
            "reader" => Some(CertRole::Reader),
            _ => None,
        }
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Status, replication, slots, WAL, settings, watching a job.
    Read,
    /// Anything that changes a node.
    Change,
}

/// The access each agent RPC needs. A method missing here is refused.
pub fn agent_method_access(method: &str) -> Option<Access> {
    Some(match method {
        "GetStatus" | "GetReplication" | "GetWal" | "GetSettings" | "WatchJob" => Access::Read,
        // Probe changes nothing, but makes the agent connect out: admin.
        "DropSlot" | "PrepareUpstream" | "StartRebuild" | "SetSynchronousStandbys"
        | "ConfigureStandby" | "Fence" | "Unfence" | "Promote" | "CreateSlot" | "Rewind" | "Probe"
        | "StartCrashed" | "HoldLease" | "EnableSlotSync" => {
            Access::Change
        }
        _ => return None,
    })
}

impl CertRole {
    pub fn may(self, access: Access) -> bool {
        match (self, access) {
            (CertRole::Admin, _) => true,
            (CertRole::Reader, Access::Read) => true,
            (CertRole::Reader, Access::Change) => false,
            (CertRole::Agent, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_only_look_admins_change_agents_only_serve() {
        assert!(CertRole::Reader.may(Access::Read));
        assert!(!CertRole::Reader.may(Access::Change));
        assert!(CertRole::Admin.may(Access::Change));
        assert!(!CertRole::Agent.may(Access::Read));
        assert_eq!(agent_method_access("DropSlot"), Some(Access::Change));
        assert_eq!(agent_method_access("GetStatus"), Some(Access::Read));
        assert_eq!(agent_method_access("Bogus"), None);
        for r in [CertRole::Agent, CertRole::Admin, CertRole::Reader] {
            assert_eq!(CertRole::parse(r.as_str()), Some(r));
        }
    }
}
