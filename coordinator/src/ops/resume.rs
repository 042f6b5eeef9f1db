//! An operation interrupted by the coordinator's death (its journal has no
//! end, its cluster lock is free): `pgfleet ops resume OP` finishes it,
//! `pgfleet ops abort OP` ends it leaving the cluster in a stated, safe
//! state. Both take the cluster lock again and journal under the same id.
//!
//! Resume follows what the journal says was done:
//! - rebuild: the copy runs on the node's agent, which outlives us; re-attach
//!   to its job and confirm streaming; if the agent no longer knows the job
//!   or it failed, rebuild again (the data directory moved aside stays).
//! - switchover and failover: converge: the chosen standby becomes the
//!   primary if it is not yet (through failover, with its checks: the old
//!   primary is fenced), then every other node that does not stream from it
//!   is rejoined (a failover leaves the old primary fenced, as it would have).
//! - sync, rejoin, drop slot, rolling rebuild: run again; each is idempotent.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pgfleet_proto::agent::v1 as apb;
use pgfleet_proto::coordinator::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;

use crate::client::{self, Deadlines};
use crate::error::CoordinatorError;
use crate::fleet_status::{self, Role};
use crate::inventory::Inventory;
use crate::journal::Operation;
use crate::ops::plan::Step;
use crate::ops::store::{self, OpRecord, Progress};
use crate::ops::ctx::{CancelState, OpCtx};
use crate::ops::{OpRequest, OpResult};
use crate::rebuild::{self, RebuildError};

/// Takes the lock of an interrupted operation's cluster again.
pub async fn begin(
    inv: &Inventory,
    id: &str,
    action: &'static str,
    caller: &str,
    tx: Option<UnboundedSender<pb::OperationEvent>>,
    cancel: Arc<CancelState>,
) -> Result<(OpCtx, OpRecord, OpRequest), CoordinatorError> {
    pgfleet_proto::OperationId::parse(id)?;
    let rec = store::find(&inv.store, id).await?
        .ok_or_else(|| CoordinatorError::Usage(format!("no operation {id} in the journal ({})", inv.store)))?;
    if rec.state != "interrupted" {
        return Err(CoordinatorError::Usage(format!(
            "operation {id} is {}: only an interrupted operation can be {action}d",
            rec.state
        )));
    }
    let req: OpRequest = rec
        .request
        .clone()
        .and_then(|r| serde_json::from_value(r).ok())
        .ok_or_else(|| CoordinatorError::Usage(format!("operation {id}'s journal does not hold its request")))?;
    let kind = req.kind();
    let op = Operation::reopen(&inv.store, &rec.cluster, kind, id, action, caller).await?;
    Ok((OpCtx::new(id.to_owned(), Some(op), tx, cancel).by(&rec.caller), rec, req))
}

/// The node and job id of the last rebuild job the operation started.
fn last_job(rec: &OpRecord) -> Option<(String, String)> {
    rec.journal
        .iter()
        .rev()
        .find(|e| e.step == "job" && e.event == "started")
        .and_then(|e| e.detail.split_once(' '))
        .map(|(n, j)| (n.to_owned(), j.to_owned()))
}

pub async fn resume(inv: &Inventory, rec: &OpRecord, req: &OpRequest, d: Deadlines, ctx: &OpCtx) -> Result<OpResult, CoordinatorError> {
    match req {
        OpRequest::Rebuild { node, from, slot, .. } => {
            if let Some((job_node, job)) = last_job(rec).filter(|(n, _)| n.as_str() == node.as_str()) {
                ctx.note(&job_node, &format!("re-attaching to job {job}"));
                match rebuild::attach(inv, node, &job, from.as_deref(), slot.as_deref(), d, ctx).await {
                    Ok(report) => return Ok(OpResult::Rebuilt(report)),
                    Err(RebuildError::Agent(e)) if !e.is_unreachable() => {
                        ctx.note(node, &format!("job {job} is gone ({}); rebuilding again", e.reason()));
                    }
                    Err(e @ RebuildError::JobFailed { .. }) => {
                        ctx.note(node, &format!("job {job} failed ({e}); rebuilding again"));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            crate::ops::execute(inv, req, d, ctx).await
        }
        OpRequest::RebuildAll { cluster, spread_checkpoint, .. } => {
            // Replicas already confirmed are not rebuilt again; a job the
            // interrupted run started is followed to its end first.
            let mut done = rec.confirmed_rebuilds();
            let mut rebuilt = Vec::new();
            if let Some((node, job)) = last_job(rec).filter(|(n, _)| !done.contains(n)) {
                ctx.note(&node, &format!("re-attaching to job {job}"));
                let c = inv.select(Some(crate::ops::resolved(cluster)?))?[0];
                let primary = crate::fleet_status::gather_cluster(c, d).await.primary;
                match rebuild::attach(inv, &node, &job, primary.as_deref(), None, d, ctx).await {
                    Ok(report) => {
                        done.push(node);
                        rebuilt.push(report);
                    }
                    Err(RebuildError::Agent(e)) if !e.is_unreachable() => {
                        ctx.note(&node, &format!("job {job} is gone ({}); rebuilding it again", e.reason()));
                    }
                    Err(e @ RebuildError::JobFailed { .. }) => {
                        ctx.note(&node, &format!("job {job} failed ({e}); rebuilding it again"));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let rest = crate::ops::rolling::rebuild_all(
                inv,
                crate::ops::resolved(cluster)?,
                *spread_checkpoint,
                false,
                &done,
                d,
                ctx,
            )
            .await?;
            match rest {
                OpResult::RebuiltAll { cluster, primary, rebuilt: more } => {
                    rebuilt.extend(more);
                    Ok(OpResult::RebuiltAll { cluster, primary, rebuilt })
                }
                other => Ok(other),
            }
        }
        OpRequest::Switchover { cluster, to, .. } | OpRequest::Failover { cluster, to, .. } => {
            converge(inv, rec, req, crate::ops::resolved(cluster)?, to.as_deref(), d, ctx).await
        }
        _ => crate::ops::execute(inv, req, d, ctx).await,
    }
}

/// The target the interrupted move had chosen: `--to`, else the node its
/// journaled plan promotes.
fn move_target(progress: Option<&Progress>, to: Option<&str>) -> Option<String> {
    match to {
        Some(t) => Some(t.to_owned()),
        None => progress.and_then(|p| p.plan.promotes()).map(|n| n.to_string()),
    }
}

/// The node the interrupted move fenced, if its fence step started.
fn fenced(progress: Option<&Progress>) -> Option<String> {
    let p = progress?;
    let node = p.plan.fences()?;
    p.started(Step::is_fence).then(|| node.to_string())
}

fn fence_done(progress: Option<&Progress>) -> bool {
    progress.is_some_and(|p| p.done(Step::is_fence))
}

async fn converge(
    inv: &Inventory,
    rec: &OpRecord,
    req: &OpRequest,
    cluster: &str,
    to: Option<&str>,
    d: Deadlines,
    ctx: &OpCtx,
) -> Result<OpResult, CoordinatorError> {
    let c = inv.select(Some(cluster))?[0];
    let cr = fleet_status::gather_cluster(c, d).await;
    let progress = rec.progress();
    let fenced_old = fenced(progress.as_ref());
    let Some(target) = move_target(progress.as_ref(), to) else {
        // No plan was journaled: nothing was changed. Run it again.
        return crate::ops::execute(inv, req, d, ctx).await;
    };
    let mut moved = None;
    if cr.primary.as_deref() != Some(target.as_str()) {
        if cr.primary.is_some() && !fence_done(progress.as_ref()) {
            // Interrupted before the fence: the cluster is as it was.
            return crate::ops::execute(inv, req, d, ctx).await;
        }
        ctx.note(&target, &format!("{target} is not the primary yet: failing over to it (the old primary is fenced)"));
        let fr = crate::ops::failover::FailoverRequest {
            cluster: cluster.to_owned(),
            to: Some(target.clone()),
            fenced: false,
            accept_data_loss: false,
            dry_run: false,
            last_primary_lsn: None,
            fenced_by_lease: false,
        };
        moved = Some(crate::ops::failover::failover(inv, &fr, d, ctx).await?);
    }
    // Everyone but the new primary (and a failover's fenced old primary)
    // streams from it.
    let cr = fleet_status::gather_cluster(c, d).await;
    let mut rejoined = Vec::new();
    for n in &cr.nodes {
        let keep_fenced = matches!(req, OpRequest::Failover { .. }) && fenced_old.as_deref() == Some(n.name.as_str());
        let streaming = n.replication.as_ref().is_some_and(|v| v.state == "streaming");
        if n.name == target || keep_fenced || streaming || n.role == Role::Primary {
            continue;
        }
        rejoined.push(crate::ops::rejoin::rejoin(inv, &n.name, false, d, ctx).await?);
    }
    Ok(OpResult::Resumed { operation: rec.id.clone(), cluster: cluster.to_owned(), primary: target, moved, rejoined })
}

/// Whether the agent's job is still running: its event history is replayed
/// at once, so no Finished within a moment means it runs.
async fn job_running(inv: &Inventory, node: &str, job: &str, d: Deadlines) -> Result<Option<apb::JobFinished>, CoordinatorError> {
    let (_, n) = inv.node(node)?;
    let mut c = client::connect(n, d).await?;
    let mut stream = match c.watch_job(apb::WatchJobRequest { job_id: job.to_owned() }).await {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return Ok(Some(apb::JobFinished::default())),
        Err(s) => return Err(client::AgentCallError::from_status(n, s).into()),
    };
    let read = async {
        while let Some(Ok(ev)) = stream.next().await {
            if let Some(apb::job_event::Event::Finished(f)) = ev.event {
                return Some(f);
            }
        }
        Some(apb::JobFinished::default())
    };
    Ok(tokio::time::timeout(Duration::from_secs(2), read).await.unwrap_or(None))
}

/// Ends an interrupted operation without finishing it: undoes what leaves
/// the cluster unsafe (a fenced primary with nobody promoted is started
/// again; a failed rebuild's slot is dropped) and says what state it is in.
pub async fn abort(inv: &Inventory, rec: &OpRecord, req: &OpRequest, d: Deadlines, ctx: &OpCtx) -> Result<OpResult, CoordinatorError> {
    let mut said = Vec::new();
    match req {
        OpRequest::Rebuild { node, from, slot, .. } => {
            if let Some((_, job)) = last_job(rec) {
                let Some(fin) = job_running(inv, node, &job, d).await? else {
                    return Err(CoordinatorError::Usage(format!(
                        "the copy still runs on {node}'s agent (job {job}): stopping it now would leave {node} without data. \
                         Let it finish with `pgfleet ops resume {}`",
                        rec.id
                    )));
                };
                if fin.success {
                    said.push(format!("job {job} on {node} had finished: {node} runs as a standby"));
                } else {
                    let (c, n) = inv.node(node)?;
                    let upstream = from.as_ref().map(|f| f.to_string()).or_else(|| {
                        c.nodes.iter().find(|k| k.name.as_str() != n.name.as_str()).map(|k| k.name.to_string())
                    });
                    let slot_name = slot.as_ref().unwrap_or(&n.name.default_slot()).to_string();
                    if let Some(u) = upstream.and_then(|u| inv.node(&u).ok()) {
                        let s = slot_name.clone();
                        match client::call(u.1, d, async |c| c.drop_slot(apb::DropSlotRequest { slot_name: s, force: false }).await).await {
                            Ok(_) => said.push(format!("slot {slot_name} dropped on {}", u.1.name)),
                            Err(e) => said.push(format!("slot {slot_name} on {}: {}", u.1.name, e.reason())),
                        }
                    }
                    said.push(format!(
                        "{node} is not rebuilt{}: rebuild it again with `pgfleet rebuild {node}`",
                        fin.moved_aside_to.map(|m| format!("; its previous data directory is kept at {m}")).unwrap_or_default()
                    ));
                }
            } else {
                said.push(format!("the rebuild of {node} had not started its copy: nothing on {node} changed"));
            }
        }
        OpRequest::Switchover { cluster, .. } | OpRequest::Failover { cluster, .. } => {
            let cluster = crate::ops::resolved(cluster)?;
            let c = inv.select(Some(cluster))?[0];
            let cr = fleet_status::gather_cluster(c, d).await;
            let progress = rec.progress();
            let promoted = progress.as_ref().is_some_and(|p| p.done(|s| matches!(s, Step::Promote { .. })));
            match (&cr.primary, fenced(progress.as_ref())) {
                (None, Some(old)) if matches!(req, OpRequest::Switchover { .. }) && !promoted => {
                    let (_, n) = inv.node(&old)?;
                    let t = ctx.start(&old, "unfence", "start it again as the primary: nobody was promoted").await?;
                    let id = ctx.id().to_owned();
                    client::call(n, d, async |c| c.unfence(apb::UnfenceRequest { operation_id: id }).await).await?;
                    ctx.done(&old, "unfence", t, "running as the primary again").await?;
                    said.push(format!("nobody was promoted: {old} was started again as the primary; the cluster is as before the switchover"));
                }
                (None, _) => said.push(format!("cluster {cluster} has no running primary: run `pgfleet failover --cluster {cluster}`")),
                (Some(p), _) => said.push(format!("{p} is the primary of {cluster}; `pgfleet status` shows which standbys stream from it, `pgfleet rejoin NODE` brings back the others")),
            }
        }
        _ => said.push("nothing was undone: the operation is idempotent; `pgfleet status` shows the cluster".into()),
    }
    Ok(OpResult::Aborted { operation: rec.id.clone(), state: said })
}
