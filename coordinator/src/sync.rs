//! Synchronous replication of a cluster as pgfleet reads it: `pgfleet sync
//! show`, the report `sync set` ends with, and what both check. Setting it
//! is an operation: `ops::sync`.

use std::time::Duration;

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::sync::{SyncMethod, SyncSpec};
use serde::Serialize;

use crate::client::{self, AgentCallError, Deadlines};
use crate::fleet_status::{self, ClusterReport};
use crate::inventory::{Cluster, Inventory, Node, PasswordError};
use crate::journal::JournalError;

pub(crate) const SYNC_WAIT: Duration = Duration::from_secs(30);
pub(crate) const SYNC_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("cluster {cluster} has no running primary: {detail}")]
    NoPrimary { cluster: String, detail: String },
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(
        "synchronous_standby_names is set to {value:?} on {primary}, but within {}s pg_stat_replication shows: {seen}",
        SYNC_WAIT.as_secs()
    )]
    NotReached {
        primary: String,
        value: String,
        seen: String,
    },
}

impl SyncError {
    pub fn is_usage(&self) -> bool {
        matches!(self, SyncError::Invalid { .. })
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            SyncError::Invalid { .. } => Code::InvalidArgument,
            SyncError::NoPrimary { .. } => Code::FailedPrecondition,
            SyncError::Agent(e) => e.code(),
            SyncError::Journal(e) => e.code(),
            SyncError::Password(e) => e.code(),
            SyncError::NotReached { .. } => Code::DeadlineExceeded,
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SyncReport {
    pub cluster: String,
    pub primary: String,
    pub synchronous_standby_names: String,
    pub spec: Option<SyncSpec>,
    pub standbys: Vec<StandbySync>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StandbySync {
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sync_state: String,
    pub sync_priority: i32,
}

pub fn primary_of<'a>(cluster: &'a Cluster, report: &ClusterReport) -> Result<&'a Node, SyncError> {
    let name = report.primary.as_deref().ok_or_else(|| SyncError::NoPrimary {
        cluster: cluster.name.to_string(),
        detail: if report.warnings.is_empty() {
            "no node reports pg_is_in_recovery() = false".into()
        } else {
            report.warnings.join("; ")
        },
    })?;
    cluster
        .nodes
        .iter()
        .find(|n| n.name.as_str() == name)
        .ok_or_else(|| SyncError::NoPrimary {
            cluster: cluster.name.to_string(),
            detail: format!("{name} is not in the inventory"),
        })
}

pub(crate) async fn replication(node: &Node, d: Deadlines) -> Result<pb::ReplicationInfo, SyncError> {
    let mut c = client::connect(node, d).await?;
    Ok(c.get_replication(pb::GetReplicationRequest {})
        .await
        .map_err(|s| AgentCallError::from_status(node, s))?
        .into_inner())
}

async fn settings(node: &Node, d: Deadlines) -> Result<pb::Settings, SyncError> {
    let mut c = client::connect(node, d).await?;
    Ok(c.get_settings(pb::GetSettingsRequest {})
        .await
        .map_err(|s| AgentCallError::from_status(node, s))?
        .into_inner())
}

pub(crate) fn standbys(info: &pb::ReplicationInfo) -> Vec<StandbySync> {
    info.standbys
        .iter()
        .map(|s| StandbySync {
            application_name: s.application_name.clone(),
            client_addr: s.client_addr.clone(),
            state: s.state.clone(),
            sync_state: s.sync_state.clone(),
            sync_priority: s.sync_priority,
        })
        .collect()
}

pub async fn show(inventory: &Inventory, cluster: &str, d: Deadlines) -> Result<SyncReport, SyncError> {
    let c = inventory
        .select(Some(cluster))
        .map_err(|e| SyncError::Invalid { what: "cluster", reason: e.to_string() })?[0];
    let report = fleet_status::gather(&[c], d).await;
    let primary = primary_of(c, &report.clusters[0])?;
    let (info, set) = tokio::try_join!(replication(primary, d), settings(primary, d))?;
    Ok(SyncReport {
        cluster: c.name.to_string(),
        primary: primary.name.to_string(),
        spec: SyncSpec::parse(&set.synchronous_standby_names).ok(),
        synchronous_standby_names: set.synchronous_standby_names,
        standbys: standbys(&info),
    })
}

/// What pg_stat_replication must show for `spec`, given who is connected.
pub(crate) fn reached(spec: &SyncSpec, rows: &[StandbySync]) -> bool {
    let listed: Vec<&StandbySync> = rows
        .iter()
        .filter(|r| r.state == "streaming" && spec.lists(&r.application_name))
        .collect();
    if !spec.is_synchronous() {
        return rows.iter().all(|r| r.sync_state == "async");
    }
    match spec.method {
        SyncMethod::Any => !listed.is_empty() && listed.iter().all(|r| r.sync_state == "quorum"),
        SyncMethod::First => {
            let want = (spec.num_sync as usize).min(listed.len());
            let sync = listed.iter().filter(|r| r.sync_state == "sync").count();
            want > 0
                && sync == want
                && listed
                    .iter()
                    .all(|r| r.sync_state == "sync" || r.sync_state == "potential")
        }
    }
}

/// Refuses (with why) when `node`'s absence would leave the primary short of
/// synchronous standbys: commits would wait for it. What a rolling rebuild
/// checks before each replica stops.
pub async fn keeps_sync(inventory: &Inventory, cluster: &str, node: &str, d: Deadlines) -> Result<(), String> {
    let report = show(inventory, cluster, d).await.map_err(|e| e.to_string())?;
    let Some(spec) = report.spec.filter(|s| s.is_synchronous()) else {
        return Ok(());
    };
    if !spec.lists(node) {
        return Ok(());
    }
    let others: Vec<&str> = report
        .standbys
        .iter()
        .filter(|s| s.application_name != node && s.state == "streaming" && spec.lists(&s.application_name))
        .map(|s| s.application_name.as_str())
        .collect();
    if (others.len() as u32) < spec.num_sync {
        return Err(format!(
            "rebuilding {node} would leave {} synchronous standby candidate(s) streaming ({}) where \
             synchronous_standby_names = '{}' on {} needs {}: commits would wait until {node} is back. \
             Add a standby to the list first (pgfleet sync set), or rebuild {node} alone if that wait is acceptable",
            others.len(),
            if others.is_empty() { "none".to_owned() } else { others.join(", ") },
            report.synchronous_standby_names,
            report.primary,
            spec.num_sync
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, sync: &str) -> StandbySync {
        StandbySync {
            application_name: name.into(),
            client_addr: None,
            state: "streaming".into(),
            sync_state: sync.into(),
            sync_priority: 0,
        }
    }

    #[test]
    fn expected_states() {
        let first = SyncSpec::parse("FIRST 1 (\"a\", \"b\")").unwrap();
        assert!(reached(&first, &[row("a", "sync"), row("b", "potential")]));
        assert!(!reached(&first, &[row("a", "async"), row("b", "async")]));
        let any = SyncSpec::parse("ANY 1 (\"a\", \"b\")").unwrap();
        assert!(reached(&any, &[row("a", "quorum"), row("b", "quorum")]));
        assert!(!reached(&any, &[row("a", "quorum"), row("b", "async")]));
        assert!(reached(&SyncSpec::asynchronous(), &[row("a", "async")]));
        assert!(!reached(&SyncSpec::asynchronous(), &[row("a", "sync")]));
    }
}
