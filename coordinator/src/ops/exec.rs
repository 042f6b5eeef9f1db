//! The one executor of planned steps. It journals the plan, then each step
//! (with its index) before it acts, emits its events, checks for a cancel
//! before every step and refuses one from the plan's point of no return on
//! (DESIGN.md invariants 5-7 and 11-12 are kept by the steps themselves:
//! admit before follow, catch up before promote, fence before promote).

use std::time::{Duration, Instant};

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::sync::{SyncMethod, SyncSpec};
use pgfleet_proto::secret::Secret;
use pgfleet_proto::{Lsn, NodeName, SlotName};
use serde::Serialize;

use crate::admit::{self, Follower};
use crate::client::{self, AgentCallError, Deadlines};
use crate::inventory::{Cluster, Inventory, Node, PasswordError};
use crate::journal::{self, JournalError};
use crate::rebuild::{self, JobDone, RebuildError, RebuildReport};
use crate::ops::ctx::{Cancelled, OpCtx};
use crate::ops::plan::{Plan, Step};

const CATCH_UP_DEADLINE: Duration = Duration::from_secs(30);
/// How long, after the primary moved, every standby has to stream and
/// synchronous_standby_names to be met before the operation reports which
/// standby is missing and why (DESIGN.md invariant 12). A standby restarts
/// and connects in about a second; twenty leave room for a slow disk
/// without hiding a standby that cannot connect at all.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("refused before any change: {0}")]
    Refused(String),
    #[error(
        "no candidate is known to hold every acknowledged commit: {reason}. \
         The best candidate, {candidate}, is {behind} behind {reference}. \
         Run again with --accept-data-loss to promote it anyway"
    )]
    DataLossRisk {
        reason: String,
        candidate: String,
        behind: String,
        reference: String,
    },
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error("{step}: {detail}")]
    Step { step: &'static str, detail: String },
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    /// A rebuild step's error as the rebuild says it (a failed job names
    /// its step, its stderr, where the old data is).
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
}

impl MoveError {
    pub fn is_usage(&self) -> bool {
        match self {
            MoveError::Invalid { .. } => true,
            MoveError::Rebuild(e) => e.is_usage(),
            _ => false,
        }
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            MoveError::Invalid { .. } => Code::InvalidArgument,
            MoveError::Refused(_) | MoveError::DataLossRisk { .. } => Code::FailedPrecondition,
            MoveError::Agent(e) => e.code(),
            MoveError::Journal(e) => e.code(),
            MoveError::Password(e) => e.code(),
            // A step that failed midway: the operation stopped there.
            MoveError::Step { .. } => Code::Aborted,
            MoveError::Cancelled(_) => Code::Cancelled,
            MoveError::Rebuild(e) => e.code(),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StepTiming {
    pub step: String,
    pub host: String,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MoveReport {
    pub operation: String,
    pub cluster: String,
    pub old_primary: String,
    pub new_primary: String,
    pub timeline: u32,
    pub steps: Vec<StepTiming>,
    /// From the old primary's stop to the new primary accepting writes
    /// (and, with synchronous replication, its first synchronous standby).
    pub write_unavailable_seconds: Option<f64>,
    pub synchronous_standby_names: String,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// What running a plan measured.
#[derive(Debug, Default)]
pub struct Executed {
    pub steps: Vec<StepTiming>,
    /// The promoted node's new timeline.
    pub timeline: Option<u32>,
    /// From the fence's start to the new primary taking writes (with
    /// synchronous replication: to its first synchronous standby).
    pub write_unavailable: Option<Duration>,
    /// What a rewind step did: "rewind", "rebuild", or None (not needed).
    pub rejoined_by: Option<&'static str>,
    /// What a drop-slot step dropped.
    pub dropped: Option<crate::slots::DropReport>,
    /// What each confirmed rebuild did, in order.
    pub rebuilt: Vec<RebuildReport>,
}

pub async fn call<T>(
    n: &Node,
    d: Deadlines,
    f: impl AsyncFnOnce(&mut pgfleet_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>) -> Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, MoveError> {
    Ok(client::call(n, d, f).await?)
}

pub fn sync_request(spec: &SyncSpec, op: &str) -> pb::SetSynchronousStandbysRequest {
    pb::SetSynchronousStandbysRequest {
        config: Some(pb::SyncConfig {
            method: match spec.method {
                SyncMethod::First => "first".into(),
                SyncMethod::Any => "any".into(),
            },
            num_sync: spec.num_sync,
            names: if spec.is_synchronous() { spec.names.clone() } else { Vec::new() },
        }),
        operation_id: op.to_owned(),
    }
}

/// Runs `plan` on `cluster`, step by step.
pub async fn run(inventory: &Inventory, cluster: &Cluster, plan: &Plan, d: Deadlines, op: &OpCtx) -> Result<Executed, MoveError> {
    let mut ex = Exec {
        inventory,
        op,
        cluster,
        d,
        password: None,
        out: Executed::default(),
        fenced_at: None,
        checkpoint: None,
        fence: None,
        rebuilt: Vec::new(),
        sync: None,
        admitted: Vec::new(),
        jobs: Vec::new(),
    };
    op.planned(plan).await?;
    for (i, step) in plan.steps.iter().enumerate() {
        match &plan.no_return {
            Some((at, why)) if *at == i => op.point_of_no_return(why)?,
            _ => op.checkpoint()?,
        }
        if let Err(e) = ex.step(i, step).await {
            op.failed_step(i, step, &e.to_string()).await;
            return Err(e);
        }
    }
    Ok(ex.out)
}

struct Exec<'a> {
    inventory: &'a Inventory,
    op: &'a OpCtx,
    cluster: &'a Cluster,
    d: Deadlines,
    password: Option<Secret>,
    out: Executed,
    /// What earlier steps learnt that later ones need.
    fenced_at: Option<Instant>,
    checkpoint: Option<Lsn>,
    /// The last fence's answer: the fenced node's timeline and whether
    /// pg_rewind can work on it.
    fence: Option<pb::FenceResponse>,
    /// Nodes a rewind step rebuilt: they stream already, their follow
    /// step is skipped.
    rebuilt: Vec<NodeName>,
    sync: Option<SyncSpec>,
    /// Each admitted follower and its upstream's answer (a rebuild step's
    /// job needs it).
    admitted: Vec<(NodeName, pb::PrepareUpstreamResponse)>,
    /// Each finished rebuild job, for its confirm step, and when its
    /// rebuild step started.
    jobs: Vec<(NodeName, JobDone, Instant)>,
}

impl<'a> Exec<'a> {
    fn node(&self, name: &NodeName) -> Result<&'a Node, MoveError> {
        self.cluster.nodes.iter().find(|n| n.name == *name).ok_or_else(|| {
            MoveError::Refused(format!("{name} is not a node of cluster {} in the inventory", self.cluster.name))
        })
    }

    fn password(&mut self) -> Result<Secret, MoveError> {
        if let Some(p) = &self.password {
            return Ok(p.clone());
        }
        let p = self.cluster.replication_password()?;
        self.password = Some(p.clone());
        Ok(p)
    }

    async fn done(&mut self, i: usize, step: &Step, t: Instant, detail: String) -> Result<(), MoveError> {
        let seconds = self.op.done_step(i, step, t, &detail).await?;
        self.out.steps.push(StepTiming {
            step: step.name().to_owned(),
            host: step.host().to_owned(),
            seconds,
            detail,
        });
        Ok(())
    }

    /// `node` streams from `upstream` through `slot` (made there first
    /// unless `create_slot` is false: a slot in use cannot be made again).
    async fn point_at(
        &mut self,
        node: &NodeName,
        upstream: &NodeName,
        slot: &SlotName,
        reset_sync: bool,
        create_slot: bool,
    ) -> Result<pb::ConfigureStandbyResponse, MoveError> {
        let (n, up, d) = (self.node(node)?, self.node(upstream)?, self.d);
        if create_slot {
            let slot_req = pb::CreateSlotRequest { slot_name: slot.to_string(), operation_id: self.op.id().to_owned() };
            call(up, d, async |c| c.create_slot(slot_req).await).await?;
        }
        let req = pb::ConfigureStandbyRequest {
            upstream_host: up.host.clone(),
            upstream_port: u32::from(up.port),
            replication_role: self.cluster.replication_role.to_string(),
            replication_password: self.password()?.expose().to_owned(),
            slot_name: slot.to_string(),
            application_name: n.name.to_string(),
            reset_synchronous_standby_names: reset_sync,
            operation_id: self.op.id().to_owned(),
        };
        call(n, d, async |c| c.configure_standby(req).await).await
    }

    /// pg_rewind `node` (fenced by an earlier step) from `upstream` when its
    /// timeline is behind; rebuild it instead when allowed and a rewind
    /// cannot work.
    async fn rewind(&mut self, node: &NodeName, upstream: &NodeName, or_rebuild: bool) -> Result<String, MoveError> {
        let (n, up, d) = (self.node(node)?, self.node(upstream)?, self.d);
        let f = self.fence.clone().ok_or_else(|| MoveError::Step {
            step: "rewind",
            detail: format!("{node} was not fenced first: the plan fences it before a rewind"),
        })?;
        let theirs = call(up, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await).await?.timeline.unwrap_or(0);
        let mine = f.timeline.unwrap_or(0);
        if mine >= theirs {
            return Ok(format!("not needed: {node} is on timeline {mine}, {upstream} on {theirs}"));
        }
        if !(f.wal_log_hints || f.data_checksums) {
            if !or_rebuild {
                return Err(MoveError::Refused(format!(
                    "{node} is on timeline {mine}, behind {upstream}'s {theirs}, and may have diverged; \
                     pg_rewind needs wal_log_hints=on or data checksums and it has neither. \
                     Rebuild it with --rebuild-if-needed (its data directory is moved aside, not deleted)"
                )));
            }
            return self.rebuild(node, upstream).await;
        }
        let password = self.password()?;
        let prep = pb::PrepareUpstreamRequest {
            replication_role: self.cluster.replication_role.to_string(),
            replication_password: password.expose().to_owned(),
            replica_address: n.host.clone(),
            slot_name: n.name.default_slot().to_string(),
            dry_run: false,
            operation_id: self.op.id().to_owned(),
            for_rewind: true,
            replica_name: n.name.to_string(),
            replica_streams_through_slot: false,
        };
        call(up, d, async |c| c.prepare_upstream(prep).await).await?;
        let rw = pb::RewindRequest {
            upstream_host: up.host.clone(),
            upstream_port: u32::from(up.port),
            replication_role: self.cluster.replication_role.to_string(),
            replication_password: password.expose().to_owned(),
            operation_id: self.op.id().to_owned(),
        };
        match call(n, d, async |c| c.rewind(rw).await).await {
            Ok(r) => {
                self.out.rejoined_by = Some("rewind");
                Ok(r.output_tail.last().cloned().unwrap_or_else(|| "rewound".into()))
            }
            Err(e) if or_rebuild => {
                self.op.note(node.as_str(), &format!("pg_rewind failed ({e}); rebuilding as allowed"));
                self.rebuild(node, upstream).await
            }
            Err(e) => Err(e),
        }
    }

    async fn rebuild(&mut self, node: &NodeName, upstream: &NodeName) -> Result<String, MoveError> {
        let step = |e: crate::rebuild::RebuildError| MoveError::Step { step: "rewind", detail: format!("rebuilding instead: {e}") };
        let req = crate::rebuild::RebuildRequest {
            node: node.to_string(),
            from: Some(upstream.to_string()),
            slot: None,
            tablespace_mappings: Vec::new(),
            spread_checkpoint: false,
            dry_run: false,
        };
        let prepared = crate::rebuild::preflight(self.inventory, &req, self.d).await.map_err(step)?;
        let r = crate::rebuild::execute(&prepared, &req, self.d, self.op).await.map_err(step)?;
        self.out.rejoined_by = Some("rebuild");
        self.rebuilt.push(node.clone());
        Ok(format!("rebuilt from {upstream}; previous data kept at {}", r.moved_aside_to.unwrap_or_default()))
    }

    async fn step(&mut self, i: usize, step: &Step) -> Result<(), MoveError> {
        let d = self.d;
        if let Step::FencedByOperator { .. } = step {
            // Journaled, not timed: nothing acted.
            self.op.skipped_step(i, step, "--fenced: the operator made sure the old primary is down").await?;
            return Ok(());
        }
        if let Step::FencedByLease { .. } = step {
            self.op.skipped_step(i, step, "its lease ran out: its agent fenced it, or its host is gone").await?;
            return Ok(());
        }
        if let Step::Follow { node, .. } = step
            && self.rebuilt.contains(node)
        {
            self.op.skipped_step(i, step, "rebuilt from the primary: it streams from it already").await?;
            return Ok(());
        }
        let t = self.op.start_step(i, step).await?;
        if let Step::Fence { .. } | Step::Isolate { .. } = step {
            // Writes stop here.
            self.fenced_at = Some(t);
        }
        let detail = match step {
            Step::Admit { upstream, followers, .. } => {
                let up = self.node(upstream)?;
                let mut fs = Vec::new();
                for f in followers {
                    fs.push(Follower { node: self.node(&f.node)?, slot: f.slot.clone(), in_use: f.in_use });
                }
                let password = self.password()?;
                let done = admit::admit(self.cluster, up, &fs, &password, self.op.id(), d)
                    .await
                    .map_err(|e| MoveError::Refused(e.to_string()))?;
                let said = done.iter().map(admit::Admitted::describe).collect::<Vec<_>>().join("; ");
                for (f, a) in followers.iter().zip(done) {
                    self.admitted.push((f.node.clone(), a.response));
                }
                said
            }
            Step::Replay { standby, primary } => {
                let (s, p) = (self.node(standby)?, self.node(primary)?);
                replayed(p, s, d).await?
            }
            Step::Choose { node, received, data_loss } => {
                if let Some(loss) = data_loss {
                    self.op.record("choose", "data-loss-accepted", loss).await?;
                }
                format!("{node} (received {received})")
            }
            Step::SyncConfig { node, value } => {
                let n = self.node(node)?;
                let spec = SyncSpec::parse(value).map_err(|e| MoveError::Step { step: "sync-config", detail: e.to_string() })?;
                let req = sync_request(&spec, self.op.id());
                let r = call(n, d, async |c| c.set_synchronous_standbys(req).await).await?;
                self.sync = Some(spec);
                match r.synchronized_standby_slots {
                    Some(slots) => format!("synchronous_standby_names = '{value}'; synchronized_standby_slots = '{slots}'"),
                    None => format!("synchronous_standby_names = '{value}'"),
                }
            }
            Step::Fence { node, immediate } => {
                let n = self.node(node)?;
                let op_id = self.op.id().to_owned();
                let immediate = *immediate;
                let f = call(n, d, async |c| c.fence(pb::FenceRequest { operation_id: op_id, immediate }).await).await?;
                self.checkpoint = f.checkpoint_lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
                self.fence = Some(f.clone());
                // A switchover's catch-up step needs the checkpoint; it
                // says so if the fence gave none.
                match (immediate, self.checkpoint) {
                    (false, Some(c)) => format!("stopped; shutdown checkpoint at {c}"),
                    _ => format!("fenced ({})", f.cluster_state.unwrap_or_default()),
                }
            }
            Step::FencedByOperator { .. } | Step::FencedByLease { .. } => unreachable!("handled above"),
            Step::Isolate { node, upstream, followers, .. } => {
                // A physical slot can be made on a standby: the candidate
                // keeps their WAL from now on.
                for f in followers {
                    self.point_at(&f.node, upstream, &f.slot, false, true).await?;
                }
                let until = t + ISOLATE_DEADLINE;
                let mut said = Vec::new();
                for f in followers {
                    said.push(detached(self.node(&f.node)?, self.node(upstream)?, self.node(node)?, d, until).await?);
                }
                if said.is_empty() { format!("no other standby; {upstream} stops streaming from {node} when promoted") } else { said.join("; ") }
            }
            Step::CatchUp { node, fenced } => {
                let (new, old) = (self.node(node)?, self.node(fenced)?);
                let checkpoint = self.checkpoint.ok_or_else(|| MoveError::Step {
                    step: "catch-up",
                    detail: format!("the fence of {fenced} gave no shutdown checkpoint location (pg_controldata): its WAL end is unknown"),
                })?;
                catch_up(self.op, new, old, checkpoint, d).await?
            }
            Step::Promote { node } => {
                let n = self.node(node)?;
                let op_id = self.op.id().to_owned();
                let promoted = call(n, d, async |c| c.promote(pb::PromoteRequest { operation_id: op_id }).await).await?;
                self.out.timeline = Some(promoted.timeline);
                self.out.write_unavailable = self.fenced_at.map(|f| f.elapsed());
                format!("primary on timeline {}", promoted.timeline)
            }
            Step::StartCrashed { node } => {
                let n = self.node(node)?;
                let operation_id = self.op.id().to_owned();
                let r = call(n, d, async |c| c.start_crashed(pb::StartCrashedRequest { operation_id }).await).await?;
                format!("started again (it was {:?}); it accepts connections", r.cluster_state)
            }
            Step::Rewind { node, upstream, or_rebuild } => self.rewind(node, upstream, *or_rebuild).await?,
            Step::Follow { node, upstream, slot, reset_sync } => {
                let r = self.point_at(node, upstream, slot, *reset_sync, true).await?;
                format!("{}primary_conninfo = {}", if r.started { "started as a standby; " } else { "" }, r.primary_conninfo)
            }
            Step::Reconnect { node, upstream, slot, slot_in_use } => {
                self.point_at(node, upstream, slot, false, !slot_in_use).await?;
                "reconnected".into()
            }
            Step::SlotSync { node } => {
                let n = self.node(node)?;
                let operation_id = self.op.id().to_owned();
                call(n, d, async |c| c.enable_slot_sync(pb::EnableSlotSyncRequest { operation_id }).await).await?.detail
            }
            Step::RememberSync { value } => {
                journal::remember_sync(&self.inventory.store, self.cluster.name.as_str(), value).await?;
                format!("synchronous_standby_names = '{value}'")
            }
            Step::Writes { node } => {
                let n = self.node(node)?;
                let until = t + SETTLE_DEADLINE;
                if self.fenced_at.is_some() && self.sync.as_ref().is_some_and(SyncSpec::is_synchronous) {
                    // With synchronous replication, commits wait for a
                    // synchronous standby: writes are really back once
                    // one streams.
                    if first_sync_standby(n, d, until).await? {
                        self.out.write_unavailable = self.fenced_at.map(|f| f.elapsed());
                    }
                }
                let left = until.saturating_duration_since(Instant::now());
                crate::verify::sync_met(n, &self.cluster.nodes, d, left).await.map_err(|why| MoveError::Step {
                    step: "writes",
                    detail: format!(
                        "{why}, {}s after the move. {node} is the primary now; pgfleet never lowers synchronous replication \
                         on its own: its commits wait until that standby streams (fix what its log says, or `pgfleet rejoin` it) \
                         or until you choose otherwise (`pgfleet sync set` naming standbys that stream, or `pgfleet sync set --off`)",
                        SETTLE_DEADLINE.as_secs(),
                    ),
                })?
            }
            Step::DropOldSlots { node } => {
                let n = self.node(node)?;
                let info = call(n, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await).await?;
                let mut dropped = Vec::new();
                // Its own failover logical slots too (17+): the new primary
                // carries them on, and a same-named local slot would stop
                // this standby's slot sync worker from taking them over.
                let settings = call(n, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?;
                let stale = |name: &str| settings.failover_slots.iter().any(|f| f.name == name && !f.synced);
                for s in info.slots.iter().filter(|s| !s.active && (s.slot_type == "physical" || stale(&s.slot_name))) {
                    let name = s.slot_name.clone();
                    call(n, d, async |c| c.drop_slot(pb::DropSlotRequest { slot_name: name, force: false }).await).await?;
                    dropped.push(s.slot_name.clone());
                }
                if dropped.is_empty() { "none".into() } else { format!("dropped {}", dropped.join(", ")) }
            }
            Step::DropSlot { node, slot, force } => {
                let n = self.node(node)?;
                let req = pb::DropSlotRequest { slot_name: slot.to_string(), force: *force };
                let r = call(n, d, async |c| c.drop_slot(req).await).await?;
                let mut detail = format!("dropped {}", r.slot_name);
                if r.terminated_sender {
                    detail += "; its WAL sender was terminated";
                }
                self.out.dropped = Some(crate::slots::DropReport {
                    node: node.to_string(),
                    slot: r.slot_name,
                    terminated_sender: r.terminated_sender,
                    released_wal_bytes: r.released_wal_bytes,
                });
                detail
            }
            Step::Rebuild { node, upstream, slot, tablespace_mappings, spread_checkpoint, system_identifier, keep_sync } => {
                if *keep_sync {
                    crate::sync::keeps_sync(self.inventory, self.cluster.name.as_str(), node.as_str(), d)
                        .await
                        .map_err(MoveError::Refused)?;
                }
                let (n, up) = (self.node(node)?, self.node(upstream)?);
                let facts = self
                    .admitted
                    .iter()
                    .rev()
                    .find(|(f, _)| f == node)
                    .map(|(_, r)| r.clone())
                    .ok_or_else(|| MoveError::Step {
                        step: "rebuild",
                        detail: format!("{upstream} did not admit {node} first: the plan admits a node before its rebuild"),
                    })?;
                let password = self.password()?;
                let p = rebuild::prepared_for(self.cluster, n, up, slot.clone(), tablespace_mappings, system_identifier, password).await?;
                let job = rebuild::run_job(&p, &facts, *spread_checkpoint, d, self.op).await?;
                let detail = format!(
                    "job {} done; previous data directory kept at {}",
                    job.job_id,
                    job.moved_aside_to.as_deref().unwrap_or("(none: it had no data)")
                );
                self.jobs.push((node.clone(), job, t));
                detail
            }
            Step::Confirm { node, upstream, slot } => {
                let (n, up) = (self.node(node)?, self.node(upstream)?);
                let at = self.jobs.iter().rposition(|(j, _, _)| j == node).ok_or_else(|| MoveError::Step {
                    step: "confirm",
                    detail: format!("no rebuild of {node} ran before: the plan rebuilds a node before confirming it"),
                })?;
                let (_, job, started) = self.jobs.remove(at);
                let report = rebuild::confirmed(n, up, slot, job, started, d).await?;
                let detail = format!(
                    "{} streams from {} through slot {}: {} ({}), {} bytes behind",
                    report.node,
                    report.upstream,
                    report.slot,
                    report.state,
                    report.sync_state,
                    report.lag_bytes.map_or_else(|| "?".into(), |l| l.to_string())
                );
                self.out.rebuilt.push(report);
                detail
            }
            Step::Verify { node, standbys, seconds } => {
                let n = self.node(node)?;
                let mut ss = Vec::new();
                for s in standbys {
                    ss.push(self.node(s)?);
                }
                crate::verify::streaming(n, &ss, d, Duration::from_secs(*seconds)).await.map_err(|why| MoveError::Step {
                    step: "verify",
                    detail: format!(
                        "{why} after {seconds}s; the primary {node} is up: its server log says why \
                         (a diverged timeline needs pg_rewind, or --rebuild-if-needed), then `pgfleet rejoin` the node named"
                    ),
                })?
            }
        };
        self.done(i, step, t, detail).await
    }
}

/// Waits until `standby` has replayed what `primary` has written so far
/// (e.g. the replication role's password, just set there).
async fn replayed(primary: &Node, standby: &Node, d: Deadlines) -> Result<String, MoveError> {
    let st = call(primary, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await).await?;
    let Some(target) = st.current_lsn.as_deref().and_then(|l| Lsn::parse(l).ok()) else {
        return Ok(format!("{} reports no WAL position", primary.name));
    };
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    loop {
        let s = call(standby, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await).await?;
        if s.replayed_lsn.as_deref().and_then(|l| Lsn::parse(l).ok()).is_some_and(|r| r >= target) {
            return Ok(format!("replayed up to {target}"));
        }
        if Instant::now() >= deadline {
            return Err(MoveError::Refused(format!(
                "{} did not replay {}'s WAL up to {target} within {}s",
                standby.name,
                primary.name,
                CATCH_UP_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// No acknowledged commit lost: the candidate has everything up to and
/// including the old primary's shutdown checkpoint before it is promoted.
/// If it does not get there, the old primary is started again: it is the
/// only copy of what the candidate did not get.
async fn catch_up(op: &OpCtx, new: &Node, old: &Node, checkpoint: Lsn, d: Deadlines) -> Result<String, MoveError> {
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    loop {
        let st = call(new, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await).await?;
        let r = st.replayed_lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
        if let Some(r) = r
            && r > checkpoint
        {
            return Ok(format!("replayed up to {r}"));
        }
        if Instant::now() >= deadline {
            let op_id = op.id().to_owned();
            let undo = call(old, d, async |c| c.unfence(pb::UnfenceRequest { operation_id: op_id }).await).await;
            op.record("catch-up", "failed", "rolled back").await?;
            return Err(MoveError::Step {
                step: "catch-up",
                detail: format!(
                    "{} replayed only up to {} of {}'s shutdown checkpoint {checkpoint} within {}s; {}",
                    new.name,
                    r.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                    old.name,
                    CATCH_UP_DEADLINE.as_secs(),
                    match undo {
                        Ok(_) => format!("{} was started again as the primary; nothing else changed", old.name),
                        Err(e) => format!("restarting {} as the primary also failed ({e}): the cluster has no primary now", old.name),
                    }
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a synchronous standby streams from `primary` before `until`.
/// How long a re-pointed standby may take to drop its old stream.
const ISOLATE_DEADLINE: Duration = Duration::from_secs(10);

/// Waits until `standby`'s WAL receiver streams from `upstream`: its
/// stream from `old` is gone, and no retry with the old primary_conninfo
/// can bring it back (it connected with the new one).
async fn detached(standby: &Node, upstream: &Node, old: &Node, d: Deadlines, until: Instant) -> Result<String, MoveError> {
    loop {
        let st = call(standby, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await).await?;
        let from = st.wal_receiver.as_ref().and_then(|w| w.sender_host.clone());
        if from.as_deref() == Some(upstream.host.as_str()) {
            return Ok(format!("{} streams from {}", standby.name, upstream.name));
        }
        if Instant::now() >= until {
            let now = match from {
                None => "streams from nowhere".to_owned(),
                Some(h) if h == old.host => format!("still streams from {}", old.name),
                Some(h) => format!("streams from {}", pgfleet_proto::one_line(&h, 200)),
            };
            return Err(MoveError::Step {
                step: "isolate",
                detail: format!(
                    "{} {now} {}s after it was re-pointed at {}: {} is not provably isolated, so nobody was promoted \
                     (see {}'s server log)",
                    standby.name,
                    ISOLATE_DEADLINE.as_secs(),
                    upstream.name,
                    old.name,
                    standby.name
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn first_sync_standby(primary: &Node, d: Deadlines, until: Instant) -> Result<bool, MoveError> {
    loop {
        let info = call(primary, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await).await?;
        if info.standbys.iter().any(|w| w.sync_state == "sync" || w.sync_state == "quorum") {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
}
