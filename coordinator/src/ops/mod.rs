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
pub mod rejoin;
pub mod render;
pub mod request;
pub mod resume;
pub mod rolling;
pub mod store;
pub mod switchover;
pub mod sync;

use std::sync::Arc;

use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::OperationState;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

pub use ctx::{CancelState, Cancelled, OpCtx};
pub use request::{ApiRequest, OpRequest, SyncRequest, one_cluster, resolved};

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::fleet_status;
use crate::inventory::Inventory;
use crate::journal::Operation;
use crate::{rebuild, slots};

/// What the CLI prints when an operation succeeded: text for people, the
/// `--json` document for programs.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    pub text: String,
    pub json: String,
}

impl Rendered {
    fn pretty<T: Serialize>(text: String, v: &T) -> Self {
        Rendered {
            text,
            json: serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
        }
    }
}

/// Validates `req`, then (unless it is a dry run) takes its cluster's lock
/// and journals it. A second operation on a locked cluster fails here,
/// before anything is shown as started.
pub fn begin(
    inv: &Inventory,
    req: &mut OpRequest,
    caller: &str,
    tx: Option<UnboundedSender<pb::OperationEvent>>,
    cancel: Arc<CancelState>,
) -> Result<(OpCtx, String, String), CoordinatorError> {
    let (cluster, summary) = req.resolve(inv)?;
    if req.dry_run() {
        let id = crate::journal::new_id(&format!("dry-run-{}", req.kind()));
        return Ok((OpCtx::new(id, None, tx, cancel), cluster, summary));
    }
    let request = serde_json::to_value(&*req).unwrap_or_default();
    let op = Operation::begin(&inv.store, &cluster, req.kind(), &summary, caller, &request)?;
    Ok((OpCtx::new(op.id.clone(), Some(op), tx, cancel), cluster, summary))
}

/// Journals the outcome and turns it into the final event. `aborted`: the
/// operation was ended by `ops abort`, and its text says how it was left.
pub fn finish(mut ctx: OpCtx, result: &Result<Rendered, CoordinatorError>, aborted: bool) -> pb::OperationFinished {
    let (state, outcome, detail) = match result {
        Ok(r) if aborted => (OperationState::Aborted, "aborted", r.text.trim().to_owned()),
        Ok(_) => (OperationState::Succeeded, "succeeded", String::new()),
        Err(CoordinatorError::Cancelled(_)) => (OperationState::Cancelled, "cancelled", String::new()),
        Err(e) if e.is_cancelled() => (OperationState::Cancelled, "cancelled", e.to_string()),
        Err(e) => (OperationState::Failed, "failed", e.to_string()),
    };
    // An end the journal did not take is said, with the exit code of a
    // failure: `ops list` will show the operation as interrupted.
    let unjournaled = ctx
        .take_journal()
        .and_then(|j| j.end(outcome, &detail).err())
        .map(|e| {
            format!(
                "the operation {outcome}, but its end could not be written to the journal ({e}): \
                 `pgfleet ops list` shows it as interrupted; check the cluster with `pgfleet status`, \
                 then `pgfleet ops abort` it"
            )
        });
    let mut fin = match result {
        Ok(r) => pb::OperationFinished {
            state: state as i32,
            text: r.text.clone(),
            json: r.json.clone(),
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
pub async fn execute(inv: &Inventory, req: &OpRequest, d: Deadlines, ctx: &OpCtx) -> Result<Rendered, CoordinatorError> {
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
            let r = rebuild::RebuildRequest {
                node: node.to_string(),
                from: from.as_ref().map(|f| f.to_string()),
                slot: slot.as_ref().map(|s| s.to_string()),
                tablespace_mappings: tablespace_mappings.iter().map(|m| m.as_str().to_owned()).collect(),
                spread_checkpoint: *spread_checkpoint,
                dry_run: *dry_run,
            };
            let prepared = rebuild::preflight(inv, &r, d).await?;
            if *dry_run {
                return Ok(rebuild_plan(&prepared, &rebuild::plan(&prepared, &r, d).await?));
            }
            let report = rebuild::execute(&prepared, &r, d, ctx).await?;
            Ok(rebuild_rendered(&report))
        }
        OpRequest::RebuildAll {
            cluster,
            spread_checkpoint,
            dry_run,
        } => rolling::rebuild_all(inv, resolved(cluster)?, *spread_checkpoint, *dry_run, d, ctx).await,
        OpRequest::Sync { cluster, spec, dry_run } => {
            if *dry_run {
                let (_, plan) = sync::plan(inv, resolved(cluster)?, spec.as_ref(), d).await?;
                return Ok(Rendered::pretty(plan.render(), &plan.to_json()));
            }
            let report = sync::set(inv, resolved(cluster)?, spec.as_ref(), d, ctx).await?;
            Ok(Rendered::pretty(crate::sync::render(&report), &report))
        }
        OpRequest::Switchover { cluster, to, dry_run } => {
            let p = switchover::preflight(inv, resolved(cluster)?, to.as_ref().map(|t| t.as_str()), d).await?;
            if *dry_run {
                let plan = switchover::plan(&p);
                return Ok(Rendered::pretty(plan.render(), &plan.to_json()));
            }
            for w in &p.warnings {
                ctx.warning(w);
            }
            let r = switchover::switchover(inv, p, d, ctx).await?;
            Ok(Rendered::pretty(failover::render(&r), &r))
        }
        OpRequest::Failover {
            cluster,
            to,
            fenced,
            accept_data_loss,
            dry_run,
        } => {
            let req = failover::FailoverRequest {
                cluster: resolved(cluster)?.to_owned(),
                to: to.as_ref().map(|t| t.to_string()),
                fenced: *fenced,
                accept_data_loss: *accept_data_loss,
                dry_run: *dry_run,
            };
            let (c, plan) = failover::plan(inv, &req, d).await?;
            if *dry_run {
                return Ok(Rendered::pretty(plan.render(), &plan.to_json()));
            }
            for w in &plan.warnings {
                ctx.warning(w);
            }
            let r = failover::run(inv, c, plan, d, ctx).await?;
            Ok(Rendered::pretty(failover::render(&r), &r))
        }
        OpRequest::Rejoin {
            node,
            rebuild_if_needed,
            dry_run,
        } => {
            let r = rejoin::rejoin(inv, node.as_str(), *rebuild_if_needed, *dry_run, d, ctx).await?;
            let text = match &r.plan {
                Some(p) => format!("{p}\n"),
                None => format!("{} rejoined as a standby of {} ({}) in {:.2}s\n", r.node, r.primary, r.method, r.seconds),
            };
            Ok(Rendered::pretty(text, &r))
        }
        OpRequest::DropSlot {
            node,
            slot,
            force,
            dry_run,
        } => {
            if *dry_run {
                let (_, n) = inv.node(node.as_str())?;
                slots::check_droppable(n, slot, *force, d).await?;
                let steps = slots::drop_plan(n, slot, *force);
                let mut s = format!("plan (dry run, nothing changed): drop slot {slot} on {node}\n");
                for (i, step) in steps.iter().enumerate() {
                    s += &format!("  {}. {step}\n", i + 1);
                }
                return Ok(Rendered::pretty(s, &serde_json::json!({ "dry_run": true, "steps": steps })));
            }
            ctx.point_of_no_return("the slot is being dropped")?;
            let t = ctx.start(node.as_str(), "drop-slot", &format!("pg_drop_replication_slot('{slot}')"))?;
            let r = slots::drop(inv, node.as_str(), slot.as_str(), *force, d).await?;
            ctx.done(node.as_str(), "drop-slot", t, "dropped")?;
            let mut s = format!("dropped replication slot {} on {}", r.slot, r.node);
            if let Some(b) = r.released_wal_bytes {
                s += &format!(" ({} of WAL no longer retained)", fleet_status::bytes(b));
            }
            if r.terminated_sender {
                s += "; its WAL sender was terminated";
            }
            s.push('\n');
            Ok(Rendered::pretty(s, &r))
        }
    }
}

fn rebuild_plan(prepared: &rebuild::Prepared<'_>, steps: &[(String, pgfleet_proto::agent::v1::PlanStep)]) -> Rendered {
    let v: Vec<_> = steps
        .iter()
        .map(|(host, s)| {
            serde_json::json!({
                "host": host, "step": s.name, "description": s.description,
                "argv": s.argv, "sql": s.sql,
            })
        })
        .collect();
    let mut s = format!(
        "plan (dry run, nothing changed): rebuild {} from {}\n",
        prepared.node.name, prepared.upstream.name
    );
    for (i, (host, step)) in steps.iter().enumerate() {
        s += &format!("  {:>2}. [{host}] {}: {}\n", i + 1, step.name, step.description);
        if !step.argv.is_empty() {
            s += &format!("        $ {}\n", pgfleet_proto::shell_words(&step.argv));
        }
        if let Some(sql) = &step.sql {
            s += &format!("        SQL: {sql}\n");
        }
    }
    Rendered::pretty(s, &serde_json::json!({ "dry_run": true, "steps": v }))
}

pub fn rebuild_text(report: &rebuild::RebuildReport) -> String {
    let lag = report.lag_bytes.map(fleet_status::bytes).unwrap_or_else(|| "-".into());
    let mut s = format!(
        "rebuilt {} from {} in {:.1}s: {} ({}), lag {lag}, slot {}\n",
        report.node, report.upstream, report.seconds, report.state, report.sync_state, report.slot
    );
    if let Some(m) = &report.moved_aside_to {
        s += &format!("previous data directory kept at {m}\n");
    }
    if let Some(l) = &report.log_file {
        s += &format!("pg_basebackup log: {l}\n");
    }
    s
}

/// A rebuild's --json output is a stream of JSON lines: its result is one
/// line too.
pub fn rebuild_rendered(report: &rebuild::RebuildReport) -> Rendered {
    Rendered {
        text: rebuild_text(report),
        json: format!("{}\n", serde_json::json!({ "result": report })),
    }
}
