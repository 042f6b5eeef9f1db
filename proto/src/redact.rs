//! Debug for the messages that carry the replication password: every field
//! but the password, which prints as `[SECRET]`.

use std::fmt;

use crate::agent::v1::{
    ConfigureStandbyRequest, PrepareUpstreamRequest, RewindRequest, StartRebuildRequest,
};

const REDACTED: &str = "[SECRET]";

impl fmt::Debug for PrepareUpstreamRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrepareUpstreamRequest")
            .field("replication_role", &self.replication_role)
            .field("replication_password", &REDACTED)
            .field("replica_address", &self.replica_address)
            .field("slot_name", &self.slot_name)
            .field("dry_run", &self.dry_run)
            .field("operation_id", &self.operation_id)
            .field("for_rewind", &self.for_rewind)
            .finish()
    }
}

impl fmt::Debug for StartRebuildRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartRebuildRequest")
            .field("upstream_host", &self.upstream_host)
            .field("upstream_port", &self.upstream_port)
            .field("replication_role", &self.replication_role)
            .field("replication_password", &REDACTED)
            .field("slot_name", &self.slot_name)
            .field("application_name", &self.application_name)
            .field("tablespace_mappings", &self.tablespace_mappings)
            .field("checkpoint", &self.checkpoint)
            .field("expected_system_identifier", &self.expected_system_identifier)
            .field("expected_size_bytes", &self.expected_size_bytes)
            .field("upstream_tablespaces", &self.upstream_tablespaces)
            .field("dry_run", &self.dry_run)
            .field("operation_id", &self.operation_id)
            .field("release_slot_after_stop", &self.release_slot_after_stop)
            .finish()
    }
}

impl fmt::Debug for ConfigureStandbyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigureStandbyRequest")
            .field("upstream_host", &self.upstream_host)
            .field("upstream_port", &self.upstream_port)
            .field("replication_role", &self.replication_role)
            .field("replication_password", &REDACTED)
            .field("slot_name", &self.slot_name)
            .field("application_name", &self.application_name)
            .field("reset_synchronous_standby_names", &self.reset_synchronous_standby_names)
            .field("operation_id", &self.operation_id)
            .finish()
    }
}

impl fmt::Debug for RewindRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RewindRequest")
            .field("upstream_host", &self.upstream_host)
            .field("upstream_port", &self.upstream_port)
            .field("replication_role", &self.replication_role)
            .field("replication_password", &REDACTED)
            .field("operation_id", &self.operation_id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_never_printed() {
        let r = StartRebuildRequest {
            replication_password: "hunter2-secret".into(),
            ..Default::default()
        };
        let p = PrepareUpstreamRequest {
            replication_password: "hunter2-secret".into(),
            ..Default::default()
        };
        for s in [format!("{r:?}"), format!("{p:?}"), format!("{r:#?}")] {
            assert!(!s.contains("hunter2") && s.contains("[SECRET]"), "{s}");
        }
    }
}
