//! `pgfleet sync set|show`: synchronous replication of a cluster. Each named
//! standby connects with `application_name` = its node name (re-pointed with
//! a reload when it does not), the primary gets synchronous_standby_names by
//! ALTER SYSTEM and reload, and the command waits until pg_stat_replication
//! shows the sync states that setting implies.

use std::time::{Duration, Instant};

use pgfleet_proto::{NodeName, SlotName};
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::sync::{SyncMethod, SyncSpec};
use serde::Serialize;

use crate::client::{self, AgentCallError, Deadlines};
use crate::fleet_status::{self, ClusterReport, Role};
use crate::inventory::{Cluster, Inventory, Node, PasswordError};
use crate::journal::JournalError;
use crate::ops::ctx::{Cancelled, OpCtx};
use crate::ops::exec::MoveError;
use crate::ops::plan::{FollowerSlot, Plan, Step};
use crate::table::Table;

const SYNC_WAIT: Duration = Duration::from_secs(30);
const SYNC_POLL: Duration = Duration::from_millis(100);

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
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    #[error(transparent)]
    Step(#[from] MoveError),
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
        match self {
            SyncError::Step(e) => e.is_usage(),
            e => matches!(e, SyncError::Invalid { .. }),
        }
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            SyncError::Invalid { .. } => Code::InvalidArgument,
            SyncError::NoPrimary { .. } => Code::FailedPrecondition,
            SyncError::Agent(e) => e.code(),
            SyncError::Journal(e) => e.code(),
            SyncError::Password(e) => e.code(),
            SyncError::Cancelled(_) => Code::Cancelled,
            SyncError::Step(e) => e.code(),
            SyncError::NotReached { .. } => Code::DeadlineExceeded,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub cluster: String,
    pub primary: String,
    pub synchronous_standby_names: String,
    pub spec: Option<SyncSpec>,
    pub standbys: Vec<StandbySync>,
}

#[derive(Debug, Clone, Serialize)]
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

async fn replication(node: &Node, d: Deadlines) -> Result<pb::ReplicationInfo, SyncError> {
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

fn standbys(info: &pb::ReplicationInfo) -> Vec<StandbySync> {
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
fn reached(spec: &SyncSpec, rows: &[StandbySync]) -> bool {
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

/// The synchronous configuration asked for, every name checked against the
/// cluster (they reach synchronous_standby_names and primary_conninfo).
pub fn validate(c: &Cluster, spec: Option<(SyncMethod, u32, Vec<String>)>) -> Result<SyncSpec, SyncError> {
    let invalid = |what, reason: String| SyncError::Invalid { what, reason };
    Ok(match spec {
        None => SyncSpec::asynchronous(),
        Some((method, num, names)) => {
            let mut nodes = Vec::new();
            for n in &names {
                let node = NodeName::parse(n).map_err(|e| invalid("standby", e.to_string()))?;
                if !c.nodes.iter().any(|k| k.name == node) {
                    return Err(invalid(
                        "standby",
                        format!(
                            "{node} is not a node of cluster {}; its nodes: {}",
                            c.name,
                            c.nodes.iter().map(|k| k.name.to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                nodes.push(node);
            }
            SyncSpec::from_nodes(method, num, &nodes).map_err(|e| invalid("synchronous standbys", e.to_string()))?
        }
    })
}

/// Setting the cluster's synchronous standbys (`None`: asynchronous), as
/// steps: each named standby that does not connect with its node name as
/// application_name is admitted by the primary and reconnected; then the
/// primary's setting, and pgfleet's record of it.
pub async fn plan<'a>(
    inventory: &'a Inventory,
    cluster: &str,
    spec: Option<(SyncMethod, u32, Vec<String>)>,
    d: Deadlines,
) -> Result<(&'a Node, Plan), SyncError> {
    let invalid = |what, reason: String| SyncError::Invalid { what, reason };
    let c = inventory
        .select(Some(cluster))
        .map_err(|e| invalid("cluster", e.to_string()))?[0];
    let spec = validate(c, spec)?;
    let report = fleet_status::gather(&[c], d).await;
    let cr = &report.clusters[0];
    let primary = primary_of(c, cr)?;
    if spec.names.iter().any(|n| n == primary.name.as_str()) {
        return Err(invalid(
            "standby",
            format!("{} is the primary; name its standbys", primary.name),
        ));
    }
    let mut steps = Vec::new();
    // Each named standby must connect with application_name = its name.
    for name in &spec.names {
        let Some(r) = cr.nodes.iter().find(|r| &r.name == name) else { continue };
        if r.role != Role::Replica {
            continue;
        }
        let named_right = r
            .replication
            .as_ref()
            .is_some_and(|v| v.application_name == *name);
        if named_right {
            continue;
        }
        let node = c.nodes.iter().find(|n| n.name.as_str() == name).ok_or_else(|| invalid("standby", name.clone()))?;
        let in_use = r.wal_receiver.as_ref().and_then(|w| w.slot_name.as_deref()).and_then(|s| SlotName::parse(s).ok());
        let slot = in_use.clone().unwrap_or_else(|| node.name.default_slot());
        // It reconnects as the inventory's replication role, which a
        // standby made by hand may not use yet: the primary must admit it
        // (role, pg_hba.conf line) and hold its slot, or it stops streaming.
        steps.push(Step::Admit {
            upstream: primary.name.clone(),
            role: c.replication_role.clone(),
            followers: vec![FollowerSlot { node: node.name.clone(), slot: slot.clone() }],
        });
        steps.push(Step::Reconnect {
            node: node.name.clone(),
            upstream: primary.name.clone(),
            slot,
            slot_in_use: in_use.is_some(),
        });
    }
    steps.push(Step::SyncConfig { node: primary.name.clone(), value: spec.to_string() });
    steps.push(Step::RememberSync { value: spec.to_string() });
    Ok((
        primary,
        Plan {
            title: format!("set synchronous_standby_names of {} to '{spec}'", c.name),
            steps,
            no_return: Some((0, "synchronous replication is being reconfigured".into())),
            warnings: Vec::new(),
        },
    ))
}

/// Sets the cluster's synchronous standbys (`None`: asynchronous) and
/// waits until pg_stat_replication shows what the setting implies.
pub async fn set(
    inventory: &Inventory,
    cluster: &str,
    spec: Option<(SyncMethod, u32, Vec<String>)>,
    d: Deadlines,
    op: &OpCtx,
) -> Result<SyncReport, SyncError> {
    let (primary, plan) = plan(inventory, cluster, spec.clone(), d).await?;
    let c = inventory.select(Some(cluster)).map_err(|e| SyncError::Invalid { what: "cluster", reason: e.to_string() })?[0];
    let spec = validate(c, spec)?;
    crate::ops::exec::run(inventory, c, &plan, d, op).await?;

    let deadline = Instant::now() + SYNC_WAIT;
    loop {
        let info = replication(primary, d).await?;
        let rows = standbys(&info);
        if reached(&spec, &rows) {
            return Ok(SyncReport {
                cluster: c.name.to_string(),
                primary: primary.name.to_string(),
                synchronous_standby_names: spec.to_string(),
                spec: Some(spec),
                standbys: rows,
            });
        }
        if Instant::now() >= deadline {
            let seen = rows
                .iter()
                .map(|r| format!("{} {} {}", r.application_name, r.state, r.sync_state))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(SyncError::NotReached {
                primary: primary.name.to_string(),
                value: spec.to_string(),
                seen: if seen.is_empty() { "no standby connected".into() } else { seen },
            });
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
}

pub fn render(r: &SyncReport) -> String {
    let mut s = format!(
        "cluster {}: primary {}, synchronous_standby_names = {}\n",
        r.cluster,
        r.primary,
        if r.synchronous_standby_names.is_empty() {
            "'' (asynchronous)".to_owned()
        } else {
            format!("'{}'", r.synchronous_standby_names)
        }
    );
    let mut t = Table::new(&["STANDBY", "ADDRESS", "STATE", "SYNC_STATE", "PRIORITY"]);
    for st in &r.standbys {
        t.row(vec![
            st.application_name.clone(),
            st.client_addr.clone().unwrap_or_else(|| "-".into()),
            st.state.clone(),
            st.sync_state.clone(),
            st.sync_priority.to_string(),
        ]);
    }
    if t.is_empty() {
        s.push_str("no standby connected\n");
    } else {
        s.push_str(&t.render());
    }
    s
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
