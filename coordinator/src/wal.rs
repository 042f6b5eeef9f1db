//! `pgfleet wal NODE`: WAL positions, file names and the archiver, the
//! monitoring queries of the manual procedure in one view.

use pgfleet_proto::agent::v1 as pb;
use serde::Serialize;

use crate::client::{self, AgentCallError, Deadlines};
use crate::error::CoordinatorError;
use crate::inventory::Inventory;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WalReport {
    pub node: String,
    pub role: String,
    pub current_lsn: Option<String>,
    pub insert_lsn: Option<String>,
    pub flush_lsn: Option<String>,
    pub insert_walfile: Option<String>,
    pub write_walfile: Option<String>,
    pub flush_walfile: Option<String>,
    pub received_lsn: Option<String>,
    pub replayed_lsn: Option<String>,
    pub archive_mode: String,
    pub archiver: ArchiverView,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ArchiverView {
    pub archived_count: u64,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<String>,
    pub failed_count: u64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<String>,
    pub stats_reset: Option<String>,
}

pub async fn get(
    inventory: &Inventory,
    node: &str,
    d: Deadlines,
) -> Result<WalReport, CoordinatorError> {
    let (_, node) = inventory.node(node)?;
    let mut c = client::connect(node, d).await?;
    let w = c
        .get_wal(pb::GetWalRequest {})
        .await
        .map_err(|s| AgentCallError::from_status(node, s))?
        .into_inner();
    let a = w.archiver.unwrap_or_default();
    Ok(WalReport {
        node: node.name.to_string(),
        role: if w.in_recovery { "replica" } else { "primary" }.to_owned(),
        current_lsn: w.current_lsn,
        insert_lsn: w.insert_lsn,
        flush_lsn: w.flush_lsn,
        insert_walfile: w.insert_walfile,
        write_walfile: w.write_walfile,
        flush_walfile: w.flush_walfile,
        received_lsn: w.received_lsn,
        replayed_lsn: w.replayed_lsn,
        archive_mode: w.archive_mode,
        archiver: ArchiverView {
            archived_count: a.archived_count,
            last_archived_wal: a.last_archived_wal,
            last_archived_time: a.last_archived_time,
            failed_count: a.failed_count,
            last_failed_wal: a.last_failed_wal,
            last_failed_time: a.last_failed_time,
            stats_reset: a.stats_reset,
        },
    })
}

