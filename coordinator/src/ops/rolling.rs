//! `pgfleet rebuild --cluster C --all-replicas`: every replica rebuilt from
//! the primary, one at a time, each confirmed streaming before the next
//! stops. A replica whose absence would leave fewer synchronous standbys
//! streaming than synchronous_standby_names asks for is refused before it
//! stops: commits on the primary would wait for it.



use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::fleet_status::{self, Role};
use crate::inventory::Inventory;
use crate::ops::{OpCtx, OpResult};
use crate::rebuild;

/// Why `node` may not stop now, when its absence would leave the primary
/// short of synchronous standbys.
async fn sync_guard(inv: &Inventory, cluster: &str, node: &str, d: Deadlines) -> Result<(), CoordinatorError> {
    let report = crate::sync::show(inv, cluster, d).await?;
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
        return Err(CoordinatorError::Usage(format!(
            "rebuilding {node} would leave {} synchronous standby candidate(s) streaming ({}) where \
             synchronous_standby_names = '{}' on {} needs {}: commits would wait until {node} is back. \
             Add a standby to the list first (pgfleet sync set), or rebuild {node} alone if that wait is acceptable",
            others.len(),
            if others.is_empty() { "none".to_owned() } else { others.join(", ") },
            report.synchronous_standby_names,
            report.primary,
            spec.num_sync
        )));
    }
    Ok(())
}

pub async fn rebuild_all(
    inv: &Inventory,
    cluster: &str,
    spread_checkpoint: bool,
    dry_run: bool,
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
    if dry_run {
        return Ok(OpResult::RebuildAllPlan { cluster: cluster.to_owned(), primary, replicas });
    }
    let mut rebuilt = Vec::new();
    for node in &replicas {
        ctx.checkpoint()?;
        sync_guard(inv, cluster, node, d).await?;
        let t = ctx.start(node, "rebuild", &format!("from {primary} ({} of {})", rebuilt.len() + 1, replicas.len())).await?;
        let req = rebuild::RebuildRequest {
            node: node.clone(),
            from: Some(primary.clone()),
            slot: None,
            tablespace_mappings: Vec::new(),
            spread_checkpoint,
            dry_run: false,
        };
        let prepared = rebuild::preflight(inv, &req, d).await?;
        let report = rebuild::execute(&prepared, &req, d, ctx).await?;
        ctx.done(node, "rebuild", t, &format!("{} from {} in {:.1}s: {} ({})", report.node, report.upstream, report.seconds, report.state, report.sync_state)).await?;
        rebuilt.push(report);
    }
    Ok(OpResult::RebuiltAll { cluster: cluster.to_owned(), primary, rebuilt })
}
