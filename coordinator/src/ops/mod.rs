//! Operations: what changes the fleet (rebuild, sync, switchover, failover,
//! rejoin, drop slot), as one request type run by one function, whether the
//! `pgfleet` CLI runs it in-process or `pgfleet serve` runs it for a remote
//! caller. Both stream the same events and end with the same text and JSON,
//! so both print the same thing.
//!
//! Life of an operation: `begin` validates the names, takes the cluster's
//! lock and journals the request (DESIGN.md invariant 7); `execute` runs it,
//! journaling each step before it acts; `finish` writes the outcome.

pub mod ctx;
pub mod exec;
pub mod failover;
pub mod plan;
pub mod rebuild;
pub mod rejoin;
pub mod request;
pub mod result;
pub mod resume;
pub mod rolling;
pub mod store;
pub mod switchover;
pub mod sync;

use std::sync::Arc;

use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::OperationState;
use tokio::sync::mpsc::UnboundedSender;

pub use ctx::{CancelState, Cancelled, OpCtx};
pub use request::{ApiRequest, OpRequest, named_cluster, one_cluster, resolved};
pub use sync::SyncRequest;
pub use result::OpResult;

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::inventory::Inventory;
use crate::journal::Operation;
use crate::slots;

/// Validates `req`, then (unless it is a dry run) takes its cluster's lock
/// and journals it. A second operation on a locked cluster fails here,
/// before anything is shown as started.
pub async fn begin(
    inv: &Inventory,
    req: &mut OpRequest,
    caller: &str,
    tx: Option<UnboundedSender<pb::OperationEvent>>,
    cancel: Arc<CancelState>,
) -> Result<(OpCtx, String, String), CoordinatorError> {
    let (cluster, summary) = req.resolve(inv)?;
    if req.dry_run() {
        let id = crate::journal::new_id(&format!("dry-run-{}", req.kind()));
        return Ok((OpCtx::new(id, None, tx, cancel).by(caller), cluster, summary));
    }
    let request = serde_json::to_value(&*req).unwrap_or_default();
    let op = Operation::begin(&inv.store, &cluster, req.kind(), &summary, caller, &request).await?;
    Ok((OpCtx::new(op.id.clone(), Some(op), tx, cancel).by(caller), cluster, summary))
}

/// Journals the outcome and turns it into the final event. `aborted`: the
/// operation was ended by `ops abort`, and its text says how it was left.
pub async fn finish(mut ctx: OpCtx, result: &Result<OpResult, CoordinatorError>, aborted: bool) -> pb::OperationFinished {
    let (state, outcome, detail) = match result {
        Ok(OpResult::Aborted { state, .. }) if aborted => (OperationState::Aborted, "aborted", state.join("; ")),
        Ok(_) if aborted => (OperationState::Aborted, "aborted", String::new()),
        Ok(_) => (OperationState::Succeeded, "succeeded", String::new()),
        Err(CoordinatorError::Cancelled(_)) => (OperationState::Cancelled, "cancelled", String::new()),
        Err(e) if e.is_cancelled() => (OperationState::Cancelled, "cancelled", e.to_string()),
        Err(e) => (OperationState::Failed, "failed", e.to_string()),
    };
    // An end the journal did not take is said, with the exit code of a
    // failure: `ops list` will show the operation as interrupted.
    let ended = match ctx.take_journal() {
        Some(j) => j.end(outcome, &detail).await.err(),
        None => None,
    };
    let unjournaled = ended.map(|e| {
            format!(
                "the operation {outcome}, but its end could not be written to the journal ({e}): \
                 `pgfleet ops list` shows it as interrupted; check the cluster with `pgfleet status`, \
                 then `pgfleet ops resume` it (it carries on from its journal) or `pgfleet ops abort` it"
            )
        });
    let mut fin = match result {
        Ok(r) => pb::OperationFinished {
            state: state as i32,
            text: String::new(),
            json: serde_json::to_string(r).unwrap_or_default(),
            error: None,
            exit_code: 0,
        },
        Err(e) => pb::OperationFinished {
            state: state as i32,
            text: String::new(),
            json: String::new(),
            error: Some(e.to_string()),
            exit_code: if e.is_usage() { 2 } else { 1 },
        },
    };
    if let Some(note) = unjournaled {
        tracing::error!("{note}");
        fin.error = Some(match fin.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note,
        });
        fin.exit_code = fin.exit_code.max(1);
    }
    ctx.emit(pb::operation_event::Event::Finished(fin.clone()));
    fin
}

/// Runs a begun operation to its end.
pub async fn execute(inv: &Inventory, req: &OpRequest, d: Deadlines, ctx: &OpCtx) -> Result<OpResult, CoordinatorError> {
    ctx.checkpoint()?;
    match req {
        OpRequest::Rebuild {
            node,
            from,
            slot,
            tablespace_mappings,
            spread_checkpoint,
            dry_run,
        } => {
            let r = crate::rebuild::RebuildRequest {
                node: node.to_string(),
                from: from.as_ref().map(|f| f.to_string()),
                slot: slot.as_ref().map(|s| s.to_string()),
                tablespace_mappings: tablespace_mappings.iter().map(|m| m.as_str().to_owned()).collect(),
                spread_checkpoint: *spread_checkpoint,
                dry_run: *dry_run,
            };
            let prepared = crate::rebuild::preflight(inv, &r, d).await?;
            let plan = rebuild::plan(&prepared, *spread_checkpoint);
            if *dry_run {
                // The plan, and what each agent's part of it will do in
                // detail (its commands and SQL), from their own dry runs.
                let steps = crate::rebuild::plan(&prepared, &r, d).await?;
                return Ok(OpResult::RebuildPlan {
                    plan,
                    agent_steps: steps
                        .into_iter()
                        .map(|(host, s)| result::AgentStep { host, step: s.name, description: s.description, argv: s.argv, sql: s.sql })
                        .collect(),
                });
            }
            crate::rebuild::check(&prepared, *spread_checkpoint, d, ctx.id()).await?;
            let done = exec::run(inv, prepared.cluster, &plan, d, ctx).await?;
            done.rebuilt
                .into_iter()
                .next()
                .map(OpResult::Rebuilt)
                .ok_or_else(|| CoordinatorError::Usage("the rebuild plan confirmed no rebuild".into()))
        }
        OpRequest::RebuildAll {
            cluster,
            spread_checkpoint,
            dry_run,
        } => rolling::rebuild_all(inv, resolved(cluster)?, *spread_checkpoint, *dry_run, &[], d, ctx).await,
        OpRequest::Sync { cluster, spec, dry_run } => {
            if *dry_run {
                let planned = sync::plan(inv, resolved(cluster)?, spec.as_ref(), d).await?;
                return Ok(OpResult::Plan(planned.plan));
            }
            Ok(OpResult::Sync(sync::set(inv, resolved(cluster)?, spec.as_ref(), d, ctx).await?))
        }
        OpRequest::Switchover { cluster, to, dry_run } => {
            let p = switchover::preflight(inv, resolved(cluster)?, to.as_ref().map(|t| t.as_str()), d).await?;
            if *dry_run {
                return Ok(OpResult::Plan(switchover::plan(&p)));
            }
            for w in &p.warnings {
                ctx.warning(w);
            }
            Ok(OpResult::Moved(switchover::switchover(inv, p, d, ctx).await?))
        }
        OpRequest::Failover {
            cluster,
            to,
            fenced,
            accept_data_loss,
            dry_run,
            last_primary_lsn,
            fenced_by_lease,
        } => {
            let req = failover::FailoverRequest {
                cluster: resolved(cluster)?.to_owned(),
                to: to.as_ref().map(|t| t.to_string()),
                fenced: *fenced,
                accept_data_loss: *accept_data_loss,
                dry_run: *dry_run,
                last_primary_lsn: last_primary_lsn.as_deref().and_then(|l| pgfleet_proto::Lsn::parse(l).ok()),
                fenced_by_lease: *fenced_by_lease,
            };
            let (c, plan) = failover::plan(inv, &req, d).await?;
            if *dry_run {
                return Ok(OpResult::Plan(plan));
            }
            for w in &plan.warnings {
                ctx.warning(w);
            }
            Ok(OpResult::Moved(failover::run(inv, c, plan, d, ctx).await?))
        }
        OpRequest::Rejoin {
            node,
            rebuild_if_needed,
            dry_run,
        } => {
            match rejoin::plan(inv, node.as_str(), *rebuild_if_needed, d, ctx).await? {
                rejoin::Rejoin::Already(r) => Ok(OpResult::Rejoined(r)),
                rejoin::Rejoin::Plan { plan, .. } if *dry_run => Ok(OpResult::Plan(plan)),
                rejoin::Rejoin::Plan { cluster, primary, plan } => {
                    Ok(OpResult::Rejoined(rejoin::run(inv, cluster, node.as_str(), primary, &plan, d, ctx).await?))
                }
            }
        }
        OpRequest::DropSlot {
            node,
            slot,
            force,
            dry_run,
        } => {
            let (c, n) = inv.node(node.as_str())?;
            let plan = plan::Plan {
                title: format!("drop slot {slot} on {node}"),
                steps: vec![plan::Step::DropSlot { node: node.clone(), slot: slot.clone(), force: *force }],
                no_return: Some((0, "the slot is being dropped".into())),
                warnings: Vec::new(),
            };
            if *dry_run {
                // The checks the agent makes when it drops, so that a dry
                // run refuses what the real one would.
                slots::check_droppable(n, slot, *force, d).await?;
                return Ok(OpResult::Plan(plan));
            }
            let done = exec::run(inv, c, &plan, d, ctx).await?;
            done.dropped
                .map(OpResult::SlotDropped)
                .ok_or_else(|| CoordinatorError::Usage("the drop-slot plan dropped nothing".into()))
        }
        OpRequest::Restart { node, dry_run } => {
            let (c, _) = inv.node(node.as_str())?;
            // Never next to another primary: a node failed over from (by
            // the operator's --fenced, say) is not restarted as a second.
            let cr = crate::fleet_status::gather_cluster(c, d).await;
            if let Some(p) = cr.nodes.iter().find(|n| n.role == crate::fleet_status::Role::Primary) {
                return Err(CoordinatorError::Usage(format!(
                    "{} is the running primary of {}: {node} is not restarted in place next to it",
                    p.name, c.name
                )));
            }
            // Only the latest primary: a node failed over from is on an
            // older timeline than the one promoted in its place (and than
            // the standbys that followed it), even when all are down.
            let mine = cr.nodes.iter().find(|n| n.name == node.as_str()).and_then(|n| n.timeline);
            if let Some(later) = cr.nodes.iter().filter(|n| n.name != node.as_str()).find(|n| n.timeline > mine) {
                return Err(CoordinatorError::Usage(format!(
                    "{} reports timeline {}, later than {node}'s ({}): {node} was failed over from and is not the latest \
                     primary; restart {} instead, or bring {node} back with `pgfleet rejoin`",
                    later.name,
                    later.timeline.unwrap_or_default(),
                    mine.map_or("unknown".into(), |t| t.to_string()),
                    later.name
                )));
            }
            let plan = plan::Plan {
                title: format!("restart {node} in place"),
                steps: vec![plan::Step::StartCrashed { node: node.clone() }],
                no_return: None,
                warnings: Vec::new(),
            };
            if *dry_run {
                return Ok(OpResult::Plan(plan));
            }
            exec::run(inv, c, &plan, d, ctx).await?;
            Ok(OpResult::Restarted { node: node.to_string() })
        }
        OpRequest::Policy { cluster, change, reason, dry_run } => {
            let c = inv.select(Some(resolved(cluster)?))?[0];
            let policy = crate::policy::apply(&inv.store, c, *change, ctx.caller(), reason, *dry_run).await?;
            Ok(OpResult::Policy { cluster: c.name.to_string(), policy, dry_run: *dry_run })
        }
    }
}
