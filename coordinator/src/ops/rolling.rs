//! `pgfleet rebuild --cluster C --all-replicas`: every replica rebuilt from
//! the primary, one at a time, each confirmed streaming before the next
//! stops, as one plan (admit, rebuild, confirm per replica). A replica whose
//! absence would leave fewer synchronous standbys streaming than
//! synchronous_standby_names asks for is refused by its rebuild step before
//! it stops: commits on the primary would wait for it.

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::fleet_status::{self, Role};
use crate::inventory::Inventory;
use crate::ops::{OpCtx, OpResult, exec, rebuild};

/// `done`: replicas an interrupted run of this operation already rebuilt
/// and confirmed (`ops resume` passes them): not rebuilt again.
pub async fn rebuild_all(
    inv: &Inventory,
    cluster: &str,
    spread_checkpoint: bool,
    dry_run: bool,
    done: &[String],
    d: Deadlines,
    ctx: &OpCtx,
) -> Result<OpResult, CoordinatorError> {
    let c = inv.select(Some(cluster))?[0];
    let cr = fleet_status::gather_cluster(c, d).await;
    let primary = cr.primary.clone().ok_or_else(|| {
        CoordinatorError::Usage(format!(
            "cluster {cluster} has no single running primary to rebuild from ({}); fail over first",
            cr.warnings.join("; ")
        ))
    })?;
    let replicas: Vec<String> = cr
        .nodes
        .iter()
        .filter(|n| n.name != primary && n.role != Role::Primary)
        .map(|n| n.name.clone())
        .collect();
    if replicas.is_empty() {
        return Err(CoordinatorError::Usage(format!("cluster {cluster} has no replica to rebuild")));
    }
    let replicas: Vec<String> = replicas.into_iter().filter(|r| !done.contains(r)).collect();
    if replicas.is_empty() {
        return Ok(OpResult::RebuiltAll { cluster: cluster.to_owned(), primary, rebuilt: Vec::new() });
    }
    // Every replica checked (synchronous replication without it, the
    // fleet's view, both agents' dry runs) before the first one stops. Each
    // rebuild step checks synchronous replication again when its turn
    // comes: the rebuilds before it changed who streams.
    let mut each = Vec::with_capacity(replicas.len());
    for node in &replicas {
        crate::sync::keeps_sync(inv, cluster, node, d).await.map_err(CoordinatorError::Usage)?;
        let req = crate::rebuild::RebuildRequest {
            node: node.clone(),
            from: Some(primary.clone()),
            slot: None,
            tablespace_mappings: Vec::new(),
            spread_checkpoint,
            dry_run,
        };
        let p = crate::rebuild::preflight(inv, &req, d).await?;
        crate::rebuild::check(&p, spread_checkpoint, d, ctx.id()).await?;
        each.push(p);
    }
    let plan = rebuild::rolling(cluster, &primary, &each, spread_checkpoint);
    if dry_run {
        return Ok(OpResult::Plan(plan));
    }
    let done = exec::run(inv, c, &plan, d, ctx).await?;
    Ok(OpResult::RebuiltAll { cluster: cluster.to_owned(), primary, rebuilt: done.rebuilt })
}
