//! `pgfleet sync set`: each named standby that does not connect with its
//! node name as `application_name` is admitted by the primary and
//! reconnected, the primary gets synchronous_standby_names by ALTER SYSTEM
//! and reload (one plan, run by the executor), and the command waits until
//! pg_stat_replication shows the sync states that setting implies.

use std::time::Instant;

use pgfleet_proto::sync::{SyncMethod, SyncSpec};
use pgfleet_proto::NodeName;
use pgfleet_proto::major::Major;
use serde::{Deserialize, Serialize};
use pgfleet_proto::SlotName;

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::fleet_status::{self, Role};
use crate::inventory::{Cluster, Inventory, Node};
use crate::ops::ctx::OpCtx;
use pgfleet_proto::agent::v1 as pb;
use crate::ops::plan::{FollowerSlot, Plan, Step};
use crate::sync::{SYNC_POLL, SYNC_WAIT, SyncError, SyncReport, primary_of, reached, replication, standbys};

/// The synchronous standbys a request asks for, checked as values (each a
/// node name); `validate` checks them against the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub method: SyncMethod,
    /// At least 1 (checked against the standbys by `validate`).
    pub num: u32,
    /// At least one.
    pub standbys: Vec<NodeName>,
}

/// The synchronous configuration asked for, every name checked against the
/// cluster (they reach synchronous_standby_names and primary_conninfo).
pub fn validate(c: &Cluster, spec: Option<&SyncRequest>) -> Result<SyncSpec, SyncError> {
    let invalid = |what, reason: String| SyncError::Invalid { what, reason };
    Ok(match spec {
        None => SyncSpec::asynchronous(),
        Some(SyncRequest { method, num, standbys }) => {
            let (method, num) = (*method, *num);
            let mut nodes = Vec::new();
            for node in standbys {
                let node = node.clone();
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
    spec: Option<&SyncRequest>,
    d: Deadlines,
) -> Result<Planned<'a>, SyncError> {
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
            followers: vec![FollowerSlot {
                node: node.name.clone(),
                slot: slot.clone(),
                in_use: r.streams_through(primary, slot.as_str()),
            }],
        });
        steps.push(Step::Reconnect {
            node: node.name.clone(),
            upstream: primary.name.clone(),
            slot,
            slot_in_use: in_use.is_some(),
        });
    }
    // Failover logical slots (17+, logical WAL): each named standby
    // synchronizes them. Its slot sync worker connects to a database, which
    // the primary must admit it to (the admit step adds that line where it
    // applies).
    let logical = crate::client::call(primary, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await)
        .await?
        .wal_level
        == "logical";
    for name in spec.names.iter().filter(|_| logical) {
        let Some(r) = cr.nodes.iter().find(|r| &r.name == name) else { continue };
        if r.role != Role::Replica || !r.majors.server_major.is_some_and(|m| Major::from(m).has_slot_failover()) {
            continue;
        }
        let node = c.nodes.iter().find(|n| n.name.as_str() == name).ok_or_else(|| invalid("standby", name.clone()))?;
        let admitted = steps.iter().any(|s| matches!(s, Step::Reconnect { node: n, .. } if n == &node.name));
        if !admitted {
            let in_use = r.wal_receiver.as_ref().and_then(|w| w.slot_name.as_deref()).and_then(|s| SlotName::parse(s).ok());
            let slot = in_use.unwrap_or_else(|| node.name.default_slot());
            steps.push(Step::Admit {
                upstream: primary.name.clone(),
                role: c.replication_role.clone(),
                followers: vec![FollowerSlot {
                    node: node.name.clone(),
                    in_use: r.streams_through(primary, slot.as_str()),
                    slot,
                }],
            });
        }
        steps.push(Step::SlotSync { node: node.name.clone() });
    }
    steps.push(Step::SyncConfig { node: primary.name.clone(), value: spec.to_string() });
    steps.push(Step::RememberSync { value: spec.to_string() });
    let plan = Plan {
        title: format!("set synchronous_standby_names of {} to '{spec}'", c.name),
        steps,
        no_return: Some((0, "synchronous replication is being reconfigured".into())),
        warnings: Vec::new(),
    };
    Ok(Planned { cluster: c, primary, spec, plan })
}

/// What `plan` checked and decided, for `set` to run and then verify.
#[derive(Debug)]
pub struct Planned<'a> {
    pub cluster: &'a Cluster,
    pub primary: &'a Node,
    pub spec: SyncSpec,
    pub plan: Plan,
}

/// Sets the cluster's synchronous standbys (`None`: asynchronous) and
/// waits until pg_stat_replication shows what the setting implies.
pub async fn set(
    inventory: &Inventory,
    cluster: &str,
    spec: Option<&SyncRequest>,
    d: Deadlines,
    op: &OpCtx,
) -> Result<SyncReport, CoordinatorError> {
    let Planned { cluster: c, primary, spec, plan } = plan(inventory, cluster, spec, d).await?;
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
            }
            .into());
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
}

