//! `pgfleet slots` (list, flag inactive slots that hold WAL back) and
//! `pgfleet slots drop NODE SLOT`.

use futures::future::join_all;
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::{Lsn, SlotName};
use serde::Serialize;

use crate::client::{self, AgentCallError, Deadlines};
use crate::inventory::{Cluster, Node};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SlotsReport {
    pub nodes: Vec<NodeSlots>,
    pub all_reachable: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NodeSlots {
    pub cluster: String,
    pub node: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub slots: Vec<SlotView>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SlotView {
    pub slot_name: String,
    pub slot_type: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<Lsn>,
    pub retained_wal_bytes: Option<u64>,
    pub wal_status: Option<String>,
    pub temporary: bool,
    pub plugin: Option<String>,
    pub database: Option<String>,
    /// Inactive and holding WAL back: nobody consumes it and the disk fills.
    pub inactive_retaining_wal: bool,
}

fn slot_view(s: pb::ReplicationSlot) -> SlotView {
    SlotView {
        inactive_retaining_wal: !s.active && s.retained_wal_bytes.unwrap_or(0) > 0,
        restart_lsn: s.restart_lsn.as_deref().and_then(|l| Lsn::parse(l).ok()),
        slot_name: s.slot_name,
        slot_type: s.slot_type,
        active: s.active,
        active_pid: s.active_pid,
        retained_wal_bytes: s.retained_wal_bytes,
        wal_status: s.wal_status,
        temporary: s.temporary,
        plugin: s.plugin,
        database: s.database,
    }
}

async fn node_slots(cluster: &Cluster, node: &Node, d: Deadlines) -> NodeSlots {
    let result = async {
        let mut c = client::connect(node, d).await?;
        c.get_replication(pb::GetReplicationRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| AgentCallError::from_status(node, s))
    }
    .await;
    let (reachable, error, slots) = match result {
        Ok(info) => (true, None, info.slots.into_iter().map(slot_view).collect()),
        Err(e) => (!e.is_unreachable(), Some(e.to_string()), Vec::new()),
    };
    NodeSlots {
        cluster: cluster.name.to_string(),
        node: node.name.to_string(),
        reachable,
        error,
        slots,
    }
}

pub async fn list(clusters: &[&Cluster], inactive_only: bool, d: Deadlines) -> SlotsReport {
    let jobs = clusters
        .iter()
        .flat_map(|c| c.nodes.iter().map(move |n| node_slots(c, n, d)));
    let mut nodes = join_all(jobs).await;
    if inactive_only {
        for n in &mut nodes {
            n.slots.retain(|s| s.inactive_retaining_wal);
        }
    }
    // A node whose PostgreSQL is down is reported (error) but its agent was
    // reached, as in `status`.
    let all_reachable = nodes.iter().all(|n| n.reachable);
    SlotsReport {
        nodes,
        all_reachable,
    }
}


#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DropReport {
    pub node: String,
    pub slot: String,
    pub terminated_sender: bool,
    pub released_wal_bytes: Option<u64>,
}

/// What a dry run of `slots drop` checks before it shows the plan: the slot
/// exists on the node, and is not active unless `force`, as the real drop
/// would refuse (the same words).
pub async fn check_droppable(node: &Node, slot: &SlotName, force: bool, d: Deadlines) -> Result<(), AgentCallError> {
    let info = client::call(node, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await).await?;
    let found = info.slots.iter().find(|s| s.slot_name == slot.as_str());
    let refuse = |message: String| AgentCallError::Status {
        node: node.name.to_string(),
        endpoint: node.agent.clone(),
        code: tonic::Code::FailedPrecondition,
        message,
    };
    match found {
        None => Err(refuse(format!("no replication slot named {slot} on this node"))),
        Some(s) if s.active && !force => Err(refuse(format!(
            "replication slot {slot} is active: a standby streams through it; stop or re-point that standby first, \
             or drop with --force to cut it off"
        ))),
        Some(_) => Ok(()),
    }
}
