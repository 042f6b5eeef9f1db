//! Moving the primary role: `pgfleet switchover` (planned) and `pgfleet
//! failover` (the primary is gone). DESIGN.md invariants 5-7: no
//! acknowledged commit is lost, never two writable primaries, one operation
//! per cluster, every step journaled before it acts.
//!
//! Switchover: stop the old primary cleanly (its shutdown checkpoint is its
//! last WAL), wait until the candidate has replayed past it, promote, point
//! the old primary (no pg_rewind needed: it stopped exactly where the new
//! timeline begins) and every other replica at the new primary, each with a
//! slot there, and carry synchronous_standby_names over.
//!
//! Failover: fence the old primary through its agent (or the operator says
//! `--fenced`), promote the standby that provably has every acknowledged
//! commit (the most advanced of the synchronous ones), re-point the rest.

use std::time::{Duration, Instant};

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::sync::SyncSpec;
use pgfleet_proto::{Lsn, SlotName};
use serde::Serialize;

use crate::admit::{self, Follower};
use crate::client::{self, AgentCallError, Deadlines};
use crate::fleet_status::{self, ClusterReport, NodeReport, Role, bytes};
use crate::inventory::{Cluster, Inventory, Node, PasswordError};
use crate::journal::{self, JournalError};
use crate::ops::{Cancelled, OpCtx};

const CATCH_UP_DEADLINE: Duration = Duration::from_secs(30);
/// How long, after the primary moved, every standby has to stream and
/// synchronous_standby_names to be met before the operation reports which
/// standby is missing and why (DESIGN.md invariant 12). A standby restarts
/// and connects in about a second; twenty leave room for a slow disk
/// without hiding a standby that cannot connect at all.
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
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
}

impl MoveError {
    pub fn is_usage(&self) -> bool {
        matches!(self, MoveError::Invalid { .. })
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
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: String,
    pub host: String,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
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

/// A plan line for --dry-run.
#[derive(Debug, Clone, Serialize)]
pub struct PlanLine {
    pub host: String,
    pub step: String,
    pub description: String,
}

fn node<'a>(c: &'a Cluster, name: &str) -> Option<&'a Node> {
    c.nodes.iter().find(|n| n.name.as_str() == name)
}

fn report<'a>(cr: &'a ClusterReport, name: &str) -> Option<&'a NodeReport> {
    cr.nodes.iter().find(|n| n.name == name)
}

/// The slot a standby streams through: its current one, else its default.
fn slot_of(n: &Node, r: Option<&NodeReport>) -> SlotName {
    r.and_then(|r| r.wal_receiver.as_ref())
        .and_then(|w| w.slot_name.as_deref())
        .and_then(|s| SlotName::parse(s).ok())
        .unwrap_or_else(|| n.name.default_slot())
}

async fn call<T>(
    n: &Node,
    d: Deadlines,
    f: impl AsyncFnOnce(&mut pgfleet_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>) -> Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, MoveError> {
    Ok(client::call(n, d, f).await?)
}

struct Run<'a> {
    op: &'a OpCtx,
    cluster: &'a Cluster,
    d: Deadlines,
    steps: Vec<StepTiming>,
    password: String,
}

impl Run<'_> {
    fn start(&self, step: &'static str, host: &str, what: &str) -> Result<Instant, MoveError> {
        Ok(self.op.start(host, step, what)?)
    }

    fn done(&mut self, step: &'static str, host: &str, t: Instant, detail: String) -> Result<(), MoveError> {
        let seconds = self.op.done(host, step, t, &detail)?;
        self.steps.push(StepTiming {
            step: step.to_owned(),
            host: host.to_owned(),
            seconds,
            detail,
        });
        Ok(())
    }

    fn configure_request(&self, upstream: &Node, standby: &Node, slot: &SlotName, reset_sync: bool) -> pb::ConfigureStandbyRequest {
        pb::ConfigureStandbyRequest {
            upstream_host: upstream.host.clone(),
            upstream_port: u32::from(upstream.port),
            replication_role: self.cluster.replication_role.to_string(),
            replication_password: self.password.clone(),
            slot_name: slot.to_string(),
            application_name: standby.name.to_string(),
            reset_synchronous_standby_names: reset_sync,
            operation_id: self.op.id().to_owned(),
        }
    }

    /// The future upstream admits its followers (DESIGN.md invariant 11),
    /// journaled as the step "admit"; a refusal changes nothing.
    async fn admit(&mut self, upstream: &Node, followers: &[Follower<'_>]) -> Result<(), MoveError> {
        let names: Vec<String> = followers.iter().map(|f| f.node.name.to_string()).collect();
        let t = self.start("admit", upstream.name.as_str(), &format!("role, pg_hba.conf line and slot for {}", names.join(", ")))?;
        let done = admit::admit(self.cluster, upstream, followers, &self.password, self.op.id(), self.d)
            .await
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        let detail: Vec<String> = done.iter().map(admit::Admitted::describe).collect();
        self.done("admit", upstream.name.as_str(), t, detail.join("; "))
    }

    /// Waits until `standby` has replayed what `primary` has written so far
    /// (e.g. the replication role's password, just set there).
    async fn replayed_primary(&mut self, primary: &Node, standby: &Node) -> Result<(), MoveError> {
        let d = self.d;
        let st = call(primary, d, async |c| c.get_status(pb::GetStatusRequest {}).await).await?;
        let Some(target) = st.current_lsn.as_deref().and_then(|l| Lsn::parse(l).ok()) else {
            return Ok(());
        };
        let deadline = Instant::now() + CATCH_UP_DEADLINE;
        loop {
            let s = call(standby, d, async |c| c.get_status(pb::GetStatusRequest {}).await).await?;
            if s.replayed_lsn.as_deref().and_then(|l| Lsn::parse(l).ok()).is_some_and(|r| r >= target) {
                return Ok(());
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

    /// A slot on the new primary and the standby pointed at it.
    async fn follow(&mut self, new_primary: &Node, standby: &Node, slot: &SlotName, reset_sync: bool) -> Result<(), MoveError> {
        let t = self.start("follow", standby.name.as_str(), &format!("stream from {} through slot {slot}", new_primary.name))?;
        let op_id = self.op.id().to_owned();
        let slot_req = pb::CreateSlotRequest {
            slot_name: slot.to_string(),
            operation_id: op_id,
        };
        call(new_primary, self.d, async |c| c.create_slot(slot_req).await).await?;
        let req = self.configure_request(new_primary, standby, slot, reset_sync);
        let r = call(standby, self.d, async |c| c.configure_standby(req).await).await?;
        self.done(
            "follow",
            standby.name.as_str(),
            t,
            format!("{}primary_conninfo = {}", if r.started { "started as a standby; " } else { "" }, r.primary_conninfo),
        )
    }

    /// Waits until the new primary's synchronous_standby_names is met by
    /// standbys that stream; else says which is missing and why, and what
    /// the policy leaves to the operator.
    async fn writes_unblocked(&mut self, new_primary: &Node, until: Instant) -> Result<(), MoveError> {
        let t = self.start("writes", new_primary.name.as_str(), "synchronous_standby_names met by streaming standbys")?;
        let left = until.saturating_duration_since(Instant::now());
        match crate::verify::sync_met(new_primary, &self.cluster.nodes, self.d, left).await {
            Ok(state) => self.done("writes", new_primary.name.as_str(), t, state),
            Err(why) => Err(MoveError::Step {
                step: "writes",
                detail: format!(
                    "{why}, {}s after the move. {} is the primary now; pgfleet never lowers synchronous replication \
                     on its own: its commits wait until that standby streams (fix what its log says, or `pgfleet rejoin` it) \
                     or until you choose otherwise (`pgfleet sync set` naming standbys that stream, or `pgfleet sync set --off`)",
                    SETTLE_DEADLINE.as_secs(),
                    new_primary.name
                ),
            }),
        }
    }

    /// Waits until every standby streams steadily from the new primary.
    async fn wait_streaming(&mut self, new_primary: &Node, standbys: &[&Node]) -> Result<String, MoveError> {
        let t = self.start("verify", new_primary.name.as_str(), "wait until every standby streams from the new primary")?;
        match crate::verify::streaming(new_primary, standbys, self.d, SETTLE_DEADLINE).await {
            Ok(states) => {
                self.done("verify", new_primary.name.as_str(), t, states.clone())?;
                Ok(states)
            }
            Err(why) => Err(MoveError::Step {
                step: "verify",
                detail: format!(
                    "{why} after {}s; the new primary {} is up: run `pgfleet rejoin` for the node named",
                    SETTLE_DEADLINE.as_secs(),
                    new_primary.name
                ),
            }),
        }
    }
}

/// Hot-standby limits: every standby's must be at least its primary's.
const LIMITS: [(&str, fn(&pb::Settings) -> u32); 5] = [
    ("max_connections", |s| s.max_connections),
    ("max_worker_processes", |s| s.max_worker_processes),
    ("max_wal_senders", |s| s.max_wal_senders),
    ("max_prepared_transactions", |s| s.max_prepared_transactions),
    ("max_locks_per_transaction", |s| s.max_locks_per_transaction),
];

#[derive(Debug)]
pub struct SwitchoverPlan<'a> {
    pub cluster: &'a Cluster,
    pub old: &'a Node,
    pub new: &'a Node,
    pub others: Vec<&'a Node>,
    pub report: ClusterReport,
    pub sync: SyncSpec,
    pub warnings: Vec<String>,
}

/// Everything checked before a switchover touches anything.
pub async fn switchover_preflight<'a>(
    inventory: &'a Inventory,
    cluster: &str,
    to: Option<&str>,
    d: Deadlines,
) -> Result<SwitchoverPlan<'a>, MoveError> {
    let c = inventory
        .select(Some(cluster))
        .map_err(|e| MoveError::Invalid { what: "cluster", reason: e.to_string() })?[0];
    if let Some(t) = to
        && node(c, t).is_none()
    {
        return Err(MoveError::Invalid {
            what: "--to",
            reason: format!(
                "no node {t:?} in cluster {}; its nodes: {}",
                c.name,
                c.nodes.iter().map(|n| n.name.to_string()).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let fleet = fleet_status::gather(&[c], d).await;
    let cr = fleet.clusters.into_iter().next().ok_or_else(|| MoveError::Refused("no status".into()))?;
    let old_name = cr.primary.clone().ok_or_else(|| {
        MoveError::Refused(format!(
            "cluster {} has no single running primary ({}); for a lost primary use `pgfleet failover`",
            c.name,
            cr.warnings.join("; ")
        ))
    })?;
    let old = node(c, &old_name).ok_or_else(|| MoveError::Refused(format!("{old_name} not in inventory")))?;
    let unreachable: Vec<&str> = cr.nodes.iter().filter(|n| !n.reachable).map(|n| n.name.as_str()).collect();
    if !unreachable.is_empty() {
        return Err(MoveError::Refused(format!(
            "the agents of {} do not answer; a switchover must be able to re-point every node",
            unreachable.join(", ")
        )));
    }
    let p_report = report(&cr, &old_name).ok_or_else(|| MoveError::Refused("primary missing".into()))?;
    let old_settings = call(old, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?;
    let sync = SyncSpec::parse(&old_settings.synchronous_standby_names).unwrap_or_else(|_| SyncSpec::asynchronous());

    // The candidate: --to, else a synchronous standby that streams with the
    // least lag, else the streaming standby with the least lag.
    let streaming = |r: &NodeReport| r.role == Role::Replica && r.replication.as_ref().is_some_and(|v| v.state == "streaming");
    let new_name = match to {
        Some(t) => t.to_owned(),
        None => {
            let mut cands: Vec<&NodeReport> = cr.nodes.iter().filter(|r| streaming(r)).collect();
            cands.sort_by_key(|r| {
                let is_sync = r
                    .replication
                    .as_ref()
                    .is_some_and(|v| v.sync_state == "sync" || v.sync_state == "quorum");
                (!is_sync, r.lag_bytes.unwrap_or(u64::MAX))
            });
            cands
                .first()
                .map(|r| r.name.clone())
                .ok_or_else(|| MoveError::Refused(format!("no standby of {} is streaming", c.name)))?
        }
    };
    let new = node(c, &new_name).ok_or_else(|| MoveError::Refused(format!("{new_name} not in inventory")))?;
    let n_report = report(&cr, &new_name).ok_or_else(|| MoveError::Refused("candidate missing".into()))?;
    if new_name == old_name {
        return Err(MoveError::Refused(format!("{new_name} is already the primary")));
    }
    let mut problems = Vec::new();
    if !streaming(n_report) {
        problems.push(format!(
            "{new_name} is not streaming from {old_name} (role {}, state {})",
            n_report.role.as_str(),
            n_report.replication.as_ref().map(|v| v.state.as_str()).unwrap_or("no connection")
        ));
    }
    if n_report.timeline != p_report.timeline {
        problems.push(format!(
            "{new_name} is on timeline {:?}, {old_name} on {:?}",
            n_report.timeline, p_report.timeline
        ));
    }
    let others: Vec<&Node> = c
        .nodes
        .iter()
        .filter(|n| n.name.as_str() != old_name && n.name.as_str() != new_name)
        .collect();
    let mut warnings = Vec::new();
    if n_report.role == Role::Replica {
        let new_settings = call(new, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?;
        if let Some(p) = &new_settings.replay_pause_state
            && p != "not paused"
        {
            problems.push(format!("WAL replay on {new_name} is {p}; resume it with pg_wal_replay_resume()"));
        }
        // After the switch every other node is a standby of the candidate.
        let mut followers = vec![(old_name.clone(), old_settings.clone())];
        for o in &others {
            let r = report(&cr, o.name.as_str());
            if r.is_some_and(|r| r.server_up) {
                followers.push((o.name.to_string(), call(o, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?));
            }
        }
        for (name, get) in LIMITS {
            let theirs = get(&new_settings);
            for (f, s) in &followers {
                if get(s) < theirs {
                    problems.push(format!(
                        "{name} is {} on {f} but {theirs} on {new_name}: as a standby of {new_name}, {f} would refuse to start; raise it first",
                        get(s)
                    ));
                }
            }
        }
    }
    if !old_settings.logical_slots.is_empty() {
        warnings.push(format!(
            "logical replication slots on {old_name} are not carried over by a promotion and will not exist on {new_name}: {}",
            old_settings.logical_slots.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(MoveError::Refused(problems.join("; ")));
    }
    Ok(SwitchoverPlan {
        cluster: c,
        old,
        new,
        others,
        report: cr,
        sync,
        warnings,
    })
}

pub fn switchover_plan_lines(p: &SwitchoverPlan<'_>) -> Vec<PlanLine> {
    let (o, n) = (p.old.name.to_string(), p.new.name.to_string());
    let mut v = Vec::new();
    let line = |host: &str, step: &str, description: String| PlanLine {
        host: host.to_owned(),
        step: step.to_owned(),
        description,
    };
    v.push(line(&o, "admit", format!(
        "replication role {} with the cluster's password; pg_hba.conf line for {n}",
        p.cluster.replication_role
    )));
    let mut followers = vec![o.clone()];
    followers.extend(p.others.iter().map(|r| r.name.to_string()));
    v.push(line(&n, "admit", format!(
        "a `host replication {} ADDR/32 scram-sha-256` line in its own pg_hba.conf (checked, reloaded) and no foreign slot, for {}",
        p.cluster.replication_role,
        followers.join(", ")
    )));
    if p.sync.is_synchronous() {
        v.push(line(&n, "sync-config", format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{}' (takes effect when promoted)",
            p.sync.replacing(&n, &o)
        )));
    }
    v.push(line(&o, "fence", "stop PostgreSQL (fast shutdown: sessions end, shutdown checkpoint), leave standby.signal".into()));
    v.push(line(&n, "catch-up", format!("wait until pg_last_wal_replay_lsn() passes {o}'s shutdown checkpoint")));
    v.push(line(&n, "promote", "SELECT pg_promote(true, 60)".into()));
    v.push(line(&o, "follow", format!("slot {} on {n}; primary_conninfo to {n}; start as a standby (no pg_rewind needed)", p.old.name.default_slot())));
    for r in &p.others {
        let slot = slot_of(r, report(&p.report, r.name.as_str()));
        v.push(line(r.name.as_str(), "follow", format!("slot {slot} on {n}; primary_conninfo to {n}; reload")));
    }
    v.push(line(&o, "old-slots", format!("drop the slots {o} kept for its former standbys")));
    v.push(line(&n, "verify", "every standby streaming from the new primary".into()));
    v
}

pub async fn switchover(inventory: &Inventory, p: SwitchoverPlan<'_>, d: Deadlines, op: &OpCtx) -> Result<MoveReport, MoveError> {
    let started = Instant::now();
    let c = p.cluster;
    let password = c.replication_password()?;
    let mut run = Run { op, cluster: c, d, steps: Vec::new(), password };
    let (old, new) = (p.old, p.new);
    // The old primary holds the role its followers will connect as (and
    // can take the candidate back later); the candidate must admit every
    // node that will follow it before anything moves.
    run.admit(old, &[Follower { node: new, slot: slot_of(new, report(&p.report, new.name.as_str())) }]).await?;
    run.replayed_primary(old, new).await?;
    let mut followers = vec![Follower { node: old, slot: old.name.default_slot() }];
    followers.extend(p.others.iter().map(|r| Follower { node: r, slot: slot_of(r, report(&p.report, r.name.as_str())) }));
    run.admit(new, &followers).await?;
    op.point_of_no_return(&format!(
        "switchover of {} from {} to {} is changing the cluster; stopping midway could leave it without a primary",
        c.name, p.old.name, p.new.name
    ))?;
    let new_sync = p.sync.replacing(new.name.as_str(), old.name.as_str());

    if p.sync.is_synchronous() {
        let t = run.start("sync-config", new.name.as_str(), &new_sync.to_string())?;
        let req = sync_request(&new_sync, run.op.id());
        call(new, d, async |c| c.set_synchronous_standbys(req).await).await?;
        run.done("sync-config", new.name.as_str(), t, format!("synchronous_standby_names = '{new_sync}'"))?;
    }

    // Writes stop here.
    let unavailable_from = Instant::now();
    let t = run.start("fence", old.name.as_str(), "fast shutdown, standby.signal")?;
    let op_id = run.op.id().to_owned();
    let fenced = call(old, d, async |c| c.fence(pb::FenceRequest { operation_id: op_id, immediate: false }).await).await?;
    let checkpoint = fenced
        .checkpoint_lsn
        .as_deref()
        .and_then(|l| Lsn::parse(l).ok())
        .ok_or_else(|| MoveError::Step { step: "fence", detail: "pg_controldata gave no checkpoint location".into() })?;
    run.done("fence", old.name.as_str(), t, format!("stopped; shutdown checkpoint at {checkpoint}"))?;

    // No acknowledged commit lost: the candidate has everything up to and
    // including the old primary's shutdown checkpoint before it is promoted.
    let t = run.start("catch-up", new.name.as_str(), &format!("replay past {checkpoint}"))?;
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    let replayed = loop {
        let st = call(new, d, async |c| c.get_status(pb::GetStatusRequest {}).await).await?;
        let r = st.replayed_lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
        if let Some(r) = r
            && r > checkpoint
        {
            break r;
        }
        if Instant::now() >= deadline {
            // Give the cluster its primary back: it is the only copy of
            // what the candidate did not get.
            let op_id = run.op.id().to_owned();
            let undo = call(old, d, async |c| c.unfence(pb::UnfenceRequest { operation_id: op_id }).await).await;
            run.op.record("catch-up", "failed", "rolled back")?;
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
    };
    run.done("catch-up", new.name.as_str(), t, format!("replayed up to {replayed}"))?;

    let t = run.start("promote", new.name.as_str(), "pg_promote(true)")?;
    let op_id = run.op.id().to_owned();
    let promoted = call(new, d, async |c| c.promote(pb::PromoteRequest { operation_id: op_id }).await).await?;
    run.done("promote", new.name.as_str(), t, format!("primary on timeline {}", promoted.timeline))?;
    let mut unavailable = unavailable_from.elapsed();

    run.follow(new, old, &old.name.default_slot(), true).await?;
    for r in &p.others {
        let slot = slot_of(r, report(&p.report, r.name.as_str()));
        run.follow(new, r, &slot, false).await?;
    }
    let settle = Instant::now() + SETTLE_DEADLINE;
    if new_sync.is_synchronous() {
        journal::remember_sync(&inventory.store, c.name.as_str(), &new_sync.to_string())?;
        // With synchronous replication, commits wait for a sync standby:
        // writes are really available once one streams.
        let deadline = settle;
        loop {
            let info = call(new, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await).await?;
            if info.standbys.iter().any(|w| w.sync_state == "sync" || w.sync_state == "quorum") {
                unavailable = unavailable_from.elapsed();
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        run.writes_unblocked(new, settle).await?;
    }
    drop_old_slots(&mut run, old).await?;
    let mut followers: Vec<&Node> = vec![old];
    followers.extend(p.others.iter().copied());
    run.wait_streaming(new, &followers).await?;
    let Run { op, steps, .. } = run;
    Ok(MoveReport {
        operation: op.id().to_owned(),
        cluster: c.name.to_string(),
        old_primary: old.name.to_string(),
        new_primary: new.name.to_string(),
        timeline: promoted.timeline,
        steps,
        write_unavailable_seconds: Some(unavailable.as_secs_f64()),
        synchronous_standby_names: new_sync.to_string(),
        warnings: p.warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The old primary's slots served its former standbys; as a standby now,
/// it would keep their WAL forever.
async fn drop_old_slots(run: &mut Run<'_>, old: &Node) -> Result<(), MoveError> {
    let t = run.start("old-slots", old.name.as_str(), "drop slots kept for former standbys")?;
    let d = run.d;
    let info = call(old, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await).await?;
    let mut dropped = Vec::new();
    for s in info.slots.iter().filter(|s| s.slot_type == "physical" && !s.active) {
        let name = s.slot_name.clone();
        call(old, d, async |c| c.drop_slot(pb::DropSlotRequest { slot_name: name, force: false }).await).await?;
        dropped.push(s.slot_name.clone());
    }
    run.done("old-slots", old.name.as_str(), t, if dropped.is_empty() { "none".into() } else { format!("dropped {}", dropped.join(", ")) })
}

fn sync_request(spec: &SyncSpec, op: &str) -> pb::SetSynchronousStandbysRequest {
    pb::SetSynchronousStandbysRequest {
        config: Some(pb::SyncConfig {
            method: match spec.method {
                pgfleet_proto::sync::SyncMethod::First => "first".into(),
                pgfleet_proto::sync::SyncMethod::Any => "any".into(),
            },
            num_sync: spec.num_sync,
            names: if spec.is_synchronous() { spec.names.clone() } else { Vec::new() },
        }),
        operation_id: op.to_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct FailoverRequest {
    pub cluster: String,
    pub to: Option<String>,
    pub fenced: bool,
    pub accept_data_loss: bool,
    pub dry_run: bool,
}

/// The candidate failover would promote, decided before anything changes.
struct Choice<'a> {
    old: &'a Node,
    old_reachable: bool,
    new: &'a Node,
    received: Lsn,
    sync: SyncSpec,
    accepted_loss: Option<String>,
    standbys: Vec<&'a Node>,
}

fn choose<'a>(
    inventory: &Inventory,
    c: &'a Cluster,
    cr: &ClusterReport,
    req: &FailoverRequest,
) -> Result<Choice<'a>, MoveError> {
    if let Some(p) = &cr.primary {
        return Err(MoveError::Refused(format!(
            "{p} is a running primary; a failover is for a lost primary: use `pgfleet switchover` for a planned move"
        )));
    }
    // The old primary: the one node that is not a running replica; among
    // several, the one whose control file says it ran as a primary ("in
    // production" after a crash, "shut down" after a clean stop), since an
    // unreachable node or a stopped standby did not.
    let mut olds: Vec<&NodeReport> = cr.nodes.iter().filter(|r| r.role != Role::Replica).collect();
    if olds.len() > 1 {
        let was_primary: Vec<&NodeReport> = olds
            .iter()
            .copied()
            .filter(|r| matches!(r.cluster_state.as_deref(), Some("in production" | "shut down")))
            .collect();
        if was_primary.len() == 1 {
            olds = was_primary;
        }
    }
    if olds.len() != 1 {
        return Err(MoveError::Refused(format!(
            "cannot tell which node was the primary: {} nodes are not running replicas ({})",
            olds.len(),
            olds.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let old_r = olds[0];
    let old = node(c, &old_r.name).ok_or_else(|| MoveError::Refused("old primary not in inventory".into()))?;
    if !old_r.reachable && !req.fenced {
        return Err(MoveError::Refused(format!(
            "the agent of the old primary {} does not answer ({}), so it cannot be fenced; make sure it is down \
             (power off, or stop PostgreSQL by hand) and run again with --fenced",
            old.name,
            old_r.error.as_deref().unwrap_or("unreachable")
        )));
    }
    let standbys: Vec<&NodeReport> = cr.nodes.iter().filter(|r| r.role == Role::Replica).collect();
    if standbys.is_empty() {
        return Err(MoveError::Refused("no running standby to promote".into()));
    }
    // Which standbys were synchronous: the old primary's own configuration
    // (read from its files while it is down), else pgfleet's record.
    let sync_text = old_r
        .configured_synchronous_standby_names
        .clone()
        .or_else(|| journal::recall_sync(&inventory.store, c.name.as_str()));
    let sync = sync_text.as_deref().and_then(|s| SyncSpec::parse(s).ok()).unwrap_or_else(SyncSpec::asynchronous);

    let received = |r: &NodeReport| r.received_lsn.or(r.replayed_lsn).unwrap_or(Lsn(0));
    let listed: Vec<&NodeReport> = standbys.iter().copied().filter(|r| sync.lists(&r.name)).collect();
    // With FIRST n or ANY n, every acknowledged commit is on at least one of
    // any (listed - n + 1) listed standbys; fewer than n missing ones means
    // the most advanced reachable listed standby has them all.
    let missing_listed = sync
        .names
        .iter()
        .filter(|n| n.as_str() != old.name.as_str() && n.as_str() != "*" && !listed.iter().any(|r| r.name == **n))
        .count();
    let provable = sync.is_synchronous() && !listed.is_empty() && (missing_listed as u32) < sync.num_sync;
    let best_sync = listed.iter().max_by_key(|r| received(r)).copied();
    let best_all = standbys.iter().max_by_key(|r| received(r)).copied();
    let named = |t: &str| {
        standbys
            .iter()
            .find(|r| r.name == t)
            .copied()
            .ok_or_else(|| MoveError::Refused(format!("{t} is not a running standby of {}", c.name)))
    };
    let (chosen, accepted_loss) = if provable {
        let best = best_sync.ok_or_else(|| MoveError::Refused("no synchronous candidate".into()))?;
        match &req.to {
            None => (best, None),
            Some(t) => {
                let r = named(t)?;
                if received(r) < received(best) {
                    if !req.accept_data_loss {
                        return Err(MoveError::DataLossRisk {
                            reason: format!("{t} has received less WAL than the synchronous standby {}", best.name),
                            candidate: t.clone(),
                            behind: bytes(received(best).bytes_since(received(r))),
                            reference: best.name.clone(),
                        });
                    }
                    (r, Some(format!("{t} is behind {}", best.name)))
                } else {
                    (r, None)
                }
            }
        }
    } else {
        let cand = match &req.to {
            Some(t) => named(t)?,
            None => best_all.ok_or_else(|| MoveError::Refused("no candidate".into()))?,
        };
        let reason = if !sync.is_synchronous() {
            format!(
                "the cluster was not using synchronous replication ({}), so acknowledged commits may exist only on {}",
                match &sync_text {
                    Some(s) if !s.is_empty() => format!("synchronous_standby_names = '{s}'"),
                    Some(_) => "synchronous_standby_names was empty".into(),
                    None => "the old primary's synchronous_standby_names cannot be read and pgfleet has no record of it".into(),
                },
                old.name
            )
        } else {
            format!("{missing_listed} of the synchronous standbys in '{sync}' are not running, too many to be sure")
        };
        if !req.accept_data_loss {
            let reference_lsn = standbys
                .iter()
                .map(|r| received(r))
                .chain(old_r.checkpoint_lsn)
                .max()
                .unwrap_or(Lsn(0));
            return Err(MoveError::DataLossRisk {
                reason,
                candidate: cand.name.clone(),
                behind: format!("at least {}", bytes(reference_lsn.bytes_since(received(cand)))),
                reference: if old_r.checkpoint_lsn.is_some_and(|l| l >= reference_lsn) {
                    format!("{}'s last checkpoint", old.name)
                } else {
                    "the most advanced standby".into()
                },
            });
        }
        (cand, Some(reason))
    };
    let new = node(c, &chosen.name).ok_or_else(|| MoveError::Refused("candidate not in inventory".into()))?;
    Ok(Choice {
        old,
        old_reachable: old_r.reachable,
        new,
        received: received(chosen),
        sync,
        accepted_loss,
        standbys: standbys
            .iter()
            .filter(|r| r.name != chosen.name)
            .filter_map(|r| node(c, &r.name))
            .collect(),
    })
}

pub async fn failover(inventory: &Inventory, req: &FailoverRequest, d: Deadlines, op: &OpCtx) -> Result<Result<MoveReport, Vec<PlanLine>>, MoveError> {
    let started = Instant::now();
    let c = inventory
        .select(Some(&req.cluster))
        .map_err(|e| MoveError::Invalid { what: "cluster", reason: e.to_string() })?[0];
    if let Some(t) = &req.to
        && node(c, t).is_none()
    {
        return Err(MoveError::Invalid { what: "--to", reason: format!("no node {t:?} in cluster {}", c.name) });
    }
    let fleet = fleet_status::gather(&[c], d).await;
    let cr = fleet.clusters.into_iter().next().ok_or_else(|| MoveError::Refused("no status".into()))?;
    let ch = choose(inventory, c, &cr, req)?;
    let (old, new) = (ch.old, ch.new);
    let mut new_sync = ch.sync.replacing(new.name.as_str(), old.name.as_str());
    new_sync.names.retain(|n| n != old.name.as_str());
    new_sync.num_sync = new_sync.num_sync.min(new_sync.names.len() as u32);

    if req.dry_run {
        let mut v = vec![PlanLine {
            host: old.name.to_string(),
            step: "fence".into(),
            description: if ch.old_reachable {
                "stop PostgreSQL if it runs (immediate), leave standby.signal".into()
            } else {
                "skipped: --fenced says the operator made sure it is down".into()
            },
        }];
        if !ch.standbys.is_empty() {
            v.insert(0, PlanLine {
                host: new.name.to_string(),
                step: "admit".into(),
                description: format!(
                    "a `host replication {} ADDR/32 scram-sha-256` line in its own pg_hba.conf (checked, reloaded) and no foreign slot, for {}",
                    c.replication_role,
                    ch.standbys.iter().map(|s| s.name.to_string()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        v.push(PlanLine {
            host: new.name.to_string(),
            step: "sync-config".into(),
            description: format!("ALTER SYSTEM SET synchronous_standby_names = '{new_sync}'"),
        });
        v.push(PlanLine {
            host: new.name.to_string(),
            step: "promote".into(),
            description: format!("SELECT pg_promote(true, 60) (received up to {})", ch.received),
        });
        for s in &ch.standbys {
            v.push(PlanLine {
                host: s.name.to_string(),
                step: "follow".into(),
                description: format!("slot on {}; primary_conninfo to {}; reload", new.name, new.name),
            });
        }
        return Ok(Err(v));
    }

    let password = c.replication_password()?;
    let mut run = Run { op, cluster: c, d, steps: Vec::new(), password };
    // The candidate admits the standbys that will follow it, while it is
    // still a standby: a refusal here leaves the cluster as it was.
    if !ch.standbys.is_empty() {
        let followers: Vec<Follower<'_>> = ch
            .standbys
            .iter()
            .map(|r| Follower { node: r, slot: slot_of(r, report(&cr, r.name.as_str())) })
            .collect();
        run.admit(new, &followers).await?;
    }
    op.point_of_no_return(&format!(
        "failover of {} to {} is fencing and promoting; stopping midway could leave the cluster without a primary",
        c.name, new.name
    ))?;
    if let Some(loss) = &ch.accepted_loss {
        run.op.record("choose", "data-loss-accepted", loss)?;
    }
    run.op.record("choose", "done", &format!("{} (received {})", new.name, ch.received))?;

    // Fence before promoting: never two writable primaries.
    if ch.old_reachable {
        let t = run.start("fence", old.name.as_str(), "stop PostgreSQL if it runs, standby.signal")?;
        let op_id = run.op.id().to_owned();
        let f = call(old, d, async |c| c.fence(pb::FenceRequest { operation_id: op_id, immediate: true }).await).await?;
        run.done("fence", old.name.as_str(), t, format!("fenced ({})", f.cluster_state.unwrap_or_default()))?;
    } else {
        run.op.skipped(old.name.as_str(), "fence", "--fenced: the operator made sure the old primary is down")?;
    }
    let mut warnings = Vec::new();
    if let Some(loss) = &ch.accepted_loss {
        warnings.push(format!("promoted with --accept-data-loss: {loss}"));
    }
    if ch.sync.is_synchronous() && !new_sync.is_synchronous() {
        warnings.push(format!("no synchronous standby is left for {}: it runs asynchronously until `pgfleet sync set`", new.name));
    }
    let t = run.start("sync-config", new.name.as_str(), &new_sync.to_string())?;
    let r = sync_request(&new_sync, run.op.id());
    call(new, d, async |c| c.set_synchronous_standbys(r).await).await?;
    run.done("sync-config", new.name.as_str(), t, format!("synchronous_standby_names = '{new_sync}'"))?;

    let t = run.start("promote", new.name.as_str(), "pg_promote(true)")?;
    let op_id = run.op.id().to_owned();
    let promoted = call(new, d, async |c| c.promote(pb::PromoteRequest { operation_id: op_id }).await).await?;
    run.done("promote", new.name.as_str(), t, format!("primary on timeline {}", promoted.timeline))?;
    for r in &ch.standbys {
        let slot = slot_of(r, report(&cr, r.name.as_str()));
        run.follow(new, r, &slot, false).await?;
    }
    journal::remember_sync(&inventory.store, c.name.as_str(), &new_sync.to_string())?;
    let settle = Instant::now() + SETTLE_DEADLINE;
    run.writes_unblocked(new, settle).await?;
    if !ch.standbys.is_empty() {
        run.wait_streaming(new, &ch.standbys).await?;
    }
    warnings.push(format!("{} stays fenced; bring it back with: pgfleet rejoin {}", old.name, old.name));
    let Run { op, steps, .. } = run;
    Ok(Ok(MoveReport {
        operation: op.id().to_owned(),
        cluster: c.name.to_string(),
        old_primary: old.name.to_string(),
        new_primary: new.name.to_string(),
        timeline: promoted.timeline,
        steps,
        write_unavailable_seconds: None,
        synchronous_standby_names: new_sync.to_string(),
        warnings,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

pub fn render(r: &MoveReport) -> String {
    let old_now = if r.operation.starts_with("failover") { "is fenced" } else { "follows it" };
    let mut s = format!(
        "{}: {} is the primary of {} (timeline {}), {} {old_now}; took {:.2}s",
        r.operation, r.new_primary, r.cluster, r.timeline, r.old_primary, r.seconds
    );
    if let Some(w) = r.write_unavailable_seconds {
        s += &format!(", writes unavailable for {w:.3}s");
    }
    s.push('\n');
    for st in &r.steps {
        s += &format!("  {:<12} {:<10} {:>7.3}s  {}\n", st.step, st.host, st.seconds, st.detail);
    }
    if !r.synchronous_standby_names.is_empty() {
        s += &format!("synchronous_standby_names = '{}'\n", r.synchronous_standby_names);
    }
    for w in &r.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}

pub fn render_plan(title: &str, lines: &[PlanLine]) -> String {
    let mut s = format!("plan (dry run, nothing changed): {title}\n");
    for (i, l) in lines.iter().enumerate() {
        s += &format!("  {:>2}. [{}] {}: {}\n", i + 1, l.host, l.step, l.description);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const INV: &str = r#"
        state_dir = "/nonexistent/pgfleet-state"
        [[clusters]]
        name = "main"
        [[clusters.nodes]]
        name = "node0"
        agent = "http://10.0.0.1:7420"
        host = "10.0.0.1"
        [[clusters.nodes]]
        name = "node1"
        agent = "http://10.0.0.2:7420"
        host = "10.0.0.2"
        [[clusters.nodes]]
        name = "node2"
        agent = "http://10.0.0.3:7420"
        host = "10.0.0.3"
    "#;

    /// node0 crashed (agent up, server down, `sync` configured); node1 and
    /// node2 replicas that received `r1` and `r2` bytes.
    fn cluster(inv: &Inventory, sync: &str, r1: Option<u64>, r2: Option<u64>) -> ClusterReport {
        let c = &inv.clusters[0];
        let mut nodes: Vec<NodeReport> = c.nodes.iter().map(NodeReport::unknown).collect();
        nodes[0].reachable = true;
        nodes[0].role = Role::Down;
        nodes[0].cluster_state = Some("in production".into());
        nodes[0].checkpoint_lsn = Some(Lsn(90));
        nodes[0].configured_synchronous_standby_names = Some(sync.to_owned());
        for (i, r) in [(1, r1), (2, r2)] {
            if let Some(r) = r {
                nodes[i].reachable = true;
                nodes[i].role = Role::Replica;
                nodes[i].server_up = true;
                nodes[i].received_lsn = Some(Lsn(r));
            }
        }
        ClusterReport {
            name: "main".into(),
            primary: None,
            nodes,
            warnings: Vec::new(),
        }
    }

    fn req(to: Option<&str>, accept: bool) -> FailoverRequest {
        FailoverRequest {
            cluster: "main".into(),
            to: to.map(str::to_owned),
            fenced: false,
            accept_data_loss: accept,
            dry_run: false,
        }
    }

    fn pick(sync: &str, r1: Option<u64>, r2: Option<u64>, to: Option<&str>, accept: bool) -> Result<String, String> {
        let inv = Inventory::parse(INV, Path::new("i.toml")).unwrap();
        let cr = cluster(&inv, sync, r1, r2);
        choose(&inv, &inv.clusters[0], &cr, &req(to, accept))
            .map(|c| c.new.name.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_most_advanced_synchronous_standby_is_promoted() {
        let first = "FIRST 1 (\"node1\", \"node2\")";
        assert_eq!(pick(first, Some(100), Some(80), None, false).unwrap(), "node1");
        assert_eq!(pick(first, Some(80), Some(100), None, false).unwrap(), "node2");
        let any = "ANY 1 (\"node1\", \"node2\")";
        assert_eq!(pick(any, Some(80), Some(100), None, false).unwrap(), "node2");
    }

    #[test]
    fn a_missing_synchronous_standby_leaves_no_proof() {
        // FIRST 1: node1 may have been the only one with the last commits.
        let e = pick("FIRST 1 (\"node1\", \"node2\")", None, Some(80), None, false).unwrap_err();
        assert!(e.contains("--accept-data-loss"), "{e}");
        // FIRST 2 with one missing: every commit was on both, node2 has them.
        assert_eq!(pick("FIRST 2 (\"node1\", \"node2\")", None, Some(80), None, false).unwrap(), "node2");
    }

    #[test]
    fn asynchronous_candidates_need_accept_data_loss_and_the_gap_is_named() {
        let e = pick("", Some(60), Some(50), None, false).unwrap_err();
        // node0's checkpoint is at 90: the best candidate is 30 bytes short.
        assert!(e.contains("at least 30 B") && e.contains("node0's last checkpoint"), "{e}");
        assert_eq!(pick("", Some(60), Some(50), None, true).unwrap(), "node1");
    }

    #[test]
    fn a_named_candidate_behind_the_synchronous_one_is_refused() {
        let first = "FIRST 1 (\"node1\", \"node2\")";
        let e = pick(first, Some(100), Some(80), Some("node2"), false).unwrap_err();
        assert!(e.contains("20 B") && e.contains("node1"), "{e}");
        assert_eq!(pick(first, Some(100), Some(80), Some("node2"), true).unwrap(), "node2");
        assert_eq!(pick(first, Some(100), Some(100), Some("node2"), false).unwrap(), "node2");
    }

    #[test]
    fn a_running_primary_refuses_failover() {
        let inv = Inventory::parse(INV, Path::new("i.toml")).unwrap();
        let mut cr = cluster(&inv, "", Some(1), Some(1));
        cr.primary = Some("node0".into());
        let e = choose(&inv, &inv.clusters[0], &cr, &req(None, true)).err().unwrap().to_string();
        assert!(e.contains("switchover"), "{e}");
    }
}
