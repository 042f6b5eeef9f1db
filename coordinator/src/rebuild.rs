//! `pgfleet rebuild NODE`: the manual replica rebuild, driven across two
//! agents. The upstream's agent grants access (role, pg_hba.conf, stale
//! slot); the node's agent runs the copy as a job; this side checks the
//! preconditions it can see from the fleet, streams the job's events, drops
//! the upstream slot if the job fails, and confirms streaming from the
//! upstream's side at the end.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pgfleet_proto::secret::Secret;
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_proto::agent::v1::job_event::Event;
use pgfleet_proto::{ParseError, SlotName};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::{self, AgentCallError, Deadlines};
use crate::fleet_status::{self, Role};
use crate::inventory::{Cluster, Inventory, Node, PasswordError};
use crate::ops::ctx::OpCtx;

/// How long the upstream may take to show the new standby streaming.
const VERIFY_DEADLINE: Duration = Duration::from_secs(60);
const VERIFY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    InvalidArgument(#[from] ParseError),
    #[error("invalid --tablespace-mapping \"{value}\": {reason}")]
    InvalidMapping { value: String, reason: &'static str },
    #[error("--from {from}: {reason}")]
    InvalidUpstream { from: String, reason: String },
    #[error("--slot {slot}: {reason}")]
    InvalidSlot { slot: String, reason: String },
    #[error(
        "{node} is the running primary of cluster {cluster}: a rebuild never stops, overwrites or \
         demotes a running primary; switch over or fail over first"
    )]
    TargetIsPrimary { node: String, cluster: String },
    #[error("cluster {cluster} has no running primary to copy from; name an upstream with --from NODE")]
    NoUpstream { cluster: String },
    #[error("cannot reach {what}: {reason}")]
    Unreachable { what: String, reason: String },
    #[error(
        "upstream {upstream} has system identifier {found} but cluster {cluster}'s is {expected}: \
         it is not a server of this cluster"
    )]
    SystemIdentifierMismatch {
        upstream: String,
        cluster: String,
        expected: String,
        found: String,
    },
    #[error(
        "cannot tell which server belongs to cluster {cluster}: it has no single running primary, the node \
         to rebuild has no data, and the inventory pins no system_identifier; add \
         system_identifier = \"...\" to the cluster in the inventory"
    )]
    UnknownIdentity { cluster: String },
    /// The copy would be of a major the node's programs cannot run.
    #[error("{0}")]
    MajorMismatch(String),
    #[error("{node}'s address {host:?} does not resolve to an IP address for its pg_hba.conf line")]
    Address { node: String, host: String },
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error(
        "rebuild of {node} failed at step {step}: {error}{}{}{}{}",
        stderr_section(stderr_tail),
        moved_aside_to.as_ref().map(|p| format!("\n  previous data directory kept at {p}")).unwrap_or_default(),
        log_file.as_ref().map(|p| format!("\n  pg_basebackup log: {p}")).unwrap_or_default(),
        slot_note
    )]
    JobFailed {
        node: String,
        step: String,
        error: String,
        stderr_tail: Vec<String>,
        moved_aside_to: Option<String>,
        log_file: Option<String>,
        slot_note: String,
    },
    #[error(transparent)]
    Cancelled(#[from] crate::ops::ctx::Cancelled),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("the event stream of job {job} on {node} ended before the job did; re-attach with: pgfleet rebuild {node} --attach {job}")]
    StreamEnded { node: String, job: String },
    #[error(
        "{node} is streaming per its own agent, but {upstream} does not show it streaming through slot {slot} within {}s: {last}",
        VERIFY_DEADLINE.as_secs()
    )]
    NotConfirmed {
        node: String,
        upstream: String,
        slot: String,
        last: String,
    },
}

/// pg_basebackup's last lines, one indented line each (for the person at
/// the terminal), each escaped: they come from another program.
fn stderr_section(lines: &[String]) -> String {
    lines.iter().map(|l| format!("\n  {}", pgfleet_proto::shown_max(l, 300))).collect()
}

impl RebuildError {
    /// Every variant's gRPC code, named one by one: a new kind of error
    /// must choose its code here rather than fall through to INTERNAL.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            RebuildError::InvalidArgument(_)
            | RebuildError::InvalidMapping { .. }
            | RebuildError::InvalidUpstream { .. }
            | RebuildError::InvalidSlot { .. }
            | RebuildError::Address { .. } => Code::InvalidArgument,
            RebuildError::TargetIsPrimary { .. }
            | RebuildError::NoUpstream { .. }
            | RebuildError::SystemIdentifierMismatch { .. }
            | RebuildError::UnknownIdentity { .. }
            | RebuildError::MajorMismatch(_) => Code::FailedPrecondition,
            RebuildError::Unreachable { .. } => Code::Unavailable,
            RebuildError::Password(e) => e.code(),
            RebuildError::Agent(e) => e.code(),
            RebuildError::JobFailed { .. } => Code::Aborted,
            RebuildError::Cancelled(_) => Code::Cancelled,
            RebuildError::Journal(e) => e.code(),
            RebuildError::StreamEnded { .. } => Code::Unavailable,
            RebuildError::NotConfirmed { .. } => Code::DeadlineExceeded,
        }
    }

    /// Refused before anything changed, because of what was typed.
    pub fn is_usage(&self) -> bool {
        match self {
            RebuildError::InvalidArgument(_)
            | RebuildError::InvalidMapping { .. }
            | RebuildError::InvalidUpstream { .. }
            | RebuildError::InvalidSlot { .. } => true,
            RebuildError::Agent(a) => a.is_invalid_argument(),
            RebuildError::TargetIsPrimary { .. }
            | RebuildError::NoUpstream { .. }
            | RebuildError::Unreachable { .. }
            | RebuildError::SystemIdentifierMismatch { .. }
            | RebuildError::UnknownIdentity { .. }
            | RebuildError::MajorMismatch(_)
            | RebuildError::Address { .. }
            | RebuildError::Password(_)
            | RebuildError::JobFailed { .. }
            | RebuildError::StreamEnded { .. }
            | RebuildError::Cancelled(_)
            | RebuildError::Journal(_)
            | RebuildError::NotConfirmed { .. } => false,
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct RebuildRequest {
    pub node: String,
    pub from: Option<String>,
    pub slot: Option<String>,
    pub tablespace_mappings: Vec<String>,
    pub spread_checkpoint: bool,
    pub dry_run: bool,
}

/// Parses `OLD=NEW` (both absolute, no `..`).
pub fn parse_mapping(value: &str) -> Result<pb::TablespaceMapping, RebuildError> {
    let bad = |reason| RebuildError::InvalidMapping {
        // Echoed cut and escaped: no megabyte message, no raw newline.
        value: pgfleet_proto::shown(value),
        reason,
    };
    if value.chars().any(char::is_control) {
        return Err(bad("control characters (a newline, a tab) are not allowed in the directories"));
    }
    let (old, new) = value.split_once('=').ok_or(bad("expected OLD=NEW"))?;
    if new.contains('=') {
        return Err(bad("'=' inside a path is not supported"));
    }
    for p in [old, new] {
        if !p.starts_with('/') {
            return Err(bad("both directories must be absolute paths"));
        }
        if p.split('/').any(|c| c == "..") {
            return Err(bad("'..' is not allowed in the directories"));
        }
    }
    if old == new {
        return Err(bad("OLD and NEW are the same directory"));
    }
    Ok(pb::TablespaceMapping {
        old_dir: old.to_owned(),
        new_dir: new.to_owned(),
    })
}

/// Everything decided before the first change.
#[derive(Debug)]
pub struct Prepared<'a> {
    pub cluster: &'a Cluster,
    pub node: &'a Node,
    pub upstream: &'a Node,
    pub slot: SlotName,
    pub mappings: Vec<pb::TablespaceMapping>,
    pub cluster_system_identifier: String,
    pub replica_address: IpAddr,
    /// The node's own WAL receiver streams from the upstream through the
    /// slot: the slot's holder is the node, whatever application_name it
    /// streams under (the upstream cannot tell from the address alone).
    pub replica_streams_through_slot: bool,
    pub password: Secret,
}

/// Checks everything that can be checked from the fleet's status, in the
/// order that names the first problem a person would want to hear about.
pub async fn preflight<'a>(
    inventory: &'a Inventory,
    req: &RebuildRequest,
    d: Deadlines,
) -> Result<Prepared<'a>, RebuildError> {
    let (cluster, node) = inventory.node(&req.node).map_err(|e| RebuildError::InvalidUpstream {
        from: req.node.clone(),
        reason: e.to_string(),
    })?;
    let slot = match &req.slot {
        Some(s) => SlotName::parse(s)?,
        None => node.name.default_slot(),
    };
    // Another node's slot is that node's: its holder may stream from the
    // same address (several clusters on one Debian host), so the upstream
    // could not tell it from the node being rebuilt and would drop it.
    if let Some(owner) = cluster.nodes.iter().find(|n| n.name != node.name && n.name.default_slot() == slot) {
        return Err(RebuildError::InvalidSlot {
            slot: slot.to_string(),
            reason: format!("it is {}'s slot; choose a name no other node of cluster {} uses", owner.name, cluster.name),
        });
    }
    let mappings = req
        .tablespace_mappings
        .iter()
        .map(|m| parse_mapping(m))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(from) = &req.from {
        let (c, _) = inventory.node(from).map_err(|e| RebuildError::InvalidUpstream {
            from: from.clone(),
            reason: e.to_string(),
        })?;
        if c.name != cluster.name {
            return Err(RebuildError::InvalidUpstream {
                from: from.clone(),
                reason: format!("it belongs to cluster {}, not {}", c.name, cluster.name),
            });
        }
        if from == &req.node {
            return Err(RebuildError::InvalidUpstream {
                from: from.clone(),
                reason: "a node cannot be rebuilt from itself".into(),
            });
        }
    }

    let report = fleet_status::gather(&[cluster], d).await;
    let creport = &report.clusters[0];
    let by_name = |n: &str| creport.nodes.iter().find(|r| r.name == n);
    let target = by_name(node.name.as_str()).ok_or_else(|| RebuildError::Unreachable {
        what: node.name.to_string(),
        reason: "missing from status".into(),
    })?;
    if !target.reachable {
        return Err(RebuildError::Unreachable {
            what: format!("the agent of {}", node.name),
            reason: target.error.clone().unwrap_or_default(),
        });
    }
    if target.role == Role::Primary {
        return Err(RebuildError::TargetIsPrimary {
            node: node.name.to_string(),
            cluster: cluster.name.to_string(),
        });
    }
    let upstream_name = match (&req.from, &creport.primary) {
        (Some(f), _) => f.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => {
            return Err(RebuildError::NoUpstream {
                cluster: cluster.name.to_string(),
            });
        }
    };
    let upstream = cluster
        .nodes
        .iter()
        .find(|n| n.name.as_str() == upstream_name)
        .ok_or_else(|| RebuildError::NoUpstream {
            cluster: cluster.name.to_string(),
        })?;
    let up = by_name(&upstream_name).ok_or_else(|| RebuildError::NoUpstream {
        cluster: cluster.name.to_string(),
    })?;
    if !up.reachable {
        return Err(RebuildError::Unreachable {
            what: format!("the agent of upstream {upstream_name}"),
            reason: up.error.clone().unwrap_or_default(),
        });
    }
    if !up.server_up {
        return Err(RebuildError::Unreachable {
            what: format!("PostgreSQL on upstream {upstream_name}"),
            reason: up.down_reason.clone().unwrap_or_else(|| "server is down".into()),
        });
    }
    // The cluster's identity: pinned in the inventory, else its running
    // primary's, else the node's own (a node being rebuilt that has data is
    // a copy of its cluster). Never the upstream's own word: that would let
    // a foreign server pass (DESIGN.md invariant 3).
    let primary_sysid = creport
        .primary
        .as_deref()
        .and_then(by_name)
        .and_then(|p| p.system_identifier.clone());
    let expected = cluster
        .system_identifier
        .clone()
        .or(primary_sysid)
        .or_else(|| target.system_identifier.clone())
        .ok_or_else(|| RebuildError::UnknownIdentity {
            cluster: cluster.name.to_string(),
        })?;
    let found = up.system_identifier.clone().unwrap_or_default();
    if found != expected {
        return Err(RebuildError::SystemIdentifierMismatch {
            upstream: upstream_name,
            cluster: cluster.name.to_string(),
            expected,
            found,
        });
    }
    if let Some(why) = crate::majors::rebuild_mismatch((&target.name, &target.majors), (&up.name, &up.majors)) {
        return Err(RebuildError::MajorMismatch(why));
    }
    let replica_address = resolve(node).await?;
    let replica_streams_through_slot = target.streams_through(upstream, slot.as_str());
    let password = cluster.replication_password()?;
    Ok(Prepared {
        cluster,
        node,
        upstream,
        slot,
        mappings,
        cluster_system_identifier: expected,
        replica_address,
        replica_streams_through_slot,
        password,
    })
}

/// What a planned rebuild step acts with, from the step's fields: its
/// checks were made when it was planned.
pub async fn prepared_for<'a>(
    cluster: &'a Cluster,
    node: &'a Node,
    upstream: &'a Node,
    slot: SlotName,
    tablespace_mappings: &[String],
    system_identifier: &str,
    password: Secret,
) -> Result<Prepared<'a>, RebuildError> {
    Ok(Prepared {
        cluster,
        node,
        upstream,
        slot,
        mappings: tablespace_mappings.iter().map(|m| parse_mapping(m)).collect::<Result<Vec<_>, _>>()?,
        cluster_system_identifier: system_identifier.to_owned(),
        replica_address: resolve(node).await?,
        // Only the upstream's PrepareUpstream reads it: done by the admit step.
        replica_streams_through_slot: false,
        password,
    })
}

pub async fn resolve(node: &Node) -> Result<IpAddr, RebuildError> {
    node.address().await.ok_or_else(|| RebuildError::Address {
        node: node.name.to_string(),
        host: node.host.clone(),
    })
}

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A live progress bar on a terminal.
    Bar,
    /// One line per event, for logs and pipes.
    Plain,
    /// One JSON object per line on stdout.
    Json,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RebuildReport {
    pub node: String,
    pub upstream: String,
    pub slot: String,
    pub job_id: String,
    pub moved_aside_to: Option<String>,
    pub log_file: Option<String>,
    pub replayed_lsn: Option<String>,
    /// The upstream's view once done: pg_stat_replication state and lag.
    pub state: String,
    pub sync_state: String,
    pub lag_bytes: Option<u64>,
    pub seconds: f64,
}

/// The dry-run plan: both agents say what they would do.
pub async fn plan(p: &Prepared<'_>, req: &RebuildRequest, d: Deadlines) -> Result<Vec<(String, pb::PlanStep)>, RebuildError> {
    let mut up = client::connect(p.upstream, d).await?;
    let prep = up
        .prepare_upstream(prepare_request(p, true, ""))
        .await
        .map_err(|s| AgentCallError::from_status(p.upstream, s))?
        .into_inner();
    let mut target = client::connect(p.node, d).await?;
    let plan = target
        .start_rebuild(start_request(p, &prep, req.spread_checkpoint, true, ""))
        .await
        .map_err(|s| AgentCallError::from_status(p.node, s))?
        .into_inner();
    let mut steps: Vec<(String, pb::PlanStep)> = prep
        .steps
        .into_iter()
        .map(|s| (p.upstream.name.to_string(), s))
        .collect();
    steps.extend(plan.plan.into_iter().map(|s| (p.node.name.to_string(), s)));
    steps.push((
        p.upstream.name.to_string(),
        pb::PlanStep {
            name: "confirm".into(),
            description: format!(
                "confirm {} streams in pg_stat_replication and slot {} is active; report the byte lag",
                p.node.name, p.slot
            ),
            argv: Vec::new(),
            sql: Some("SELECT state, sync_state FROM pg_stat_replication; SELECT active FROM pg_replication_slots".into()),
        },
    ));
    Ok(steps)
}

fn prepare_request(p: &Prepared<'_>, dry_run: bool, op: &str) -> pb::PrepareUpstreamRequest {
    pb::PrepareUpstreamRequest {
        replication_role: p.cluster.replication_role.to_string(),
        replication_password: p.password.expose().to_owned(),
        replica_address: p.replica_address.to_string(),
        slot_name: p.slot.to_string(),
        dry_run,
        operation_id: op.to_owned(),
        for_rewind: false,
        replica_name: p.node.name.to_string(),
        replica_streams_through_slot: p.replica_streams_through_slot,
    }
}

fn start_request(
    p: &Prepared<'_>,
    prep: &pb::PrepareUpstreamResponse,
    spread_checkpoint: bool,
    dry_run: bool,
    op: &str,
) -> pb::StartRebuildRequest {
    pb::StartRebuildRequest {
        upstream_host: p.upstream.host.clone(),
        upstream_port: u32::from(p.upstream.port),
        replication_role: p.cluster.replication_role.to_string(),
        replication_password: p.password.expose().to_owned(),
        slot_name: p.slot.to_string(),
        application_name: p.node.name.to_string(),
        tablespace_mappings: p.mappings.clone(),
        checkpoint: if spread_checkpoint {
            pb::CheckpointMode::Spread
        } else {
            pb::CheckpointMode::Fast
        } as i32,
        expected_system_identifier: p.cluster_system_identifier.clone(),
        expected_size_bytes: prep.database_size_bytes,
        upstream_tablespaces: prep.tablespaces.clone(),
        dry_run,
        operation_id: op.to_owned(),
        release_slot_after_stop: prep.slot_held_by_replica,
    }
}

/// The checks both agents make before anything changes: the upstream's
/// PrepareUpstream and the node's StartRebuild, both as dry runs. The node
/// validates the request (tablespace targets inside its allowed roots,
/// space, names) here: a request it would refuse must not leave a role or a
/// pg_hba.conf line behind on the upstream.
pub async fn check(p: &Prepared<'_>, spread_checkpoint: bool, d: Deadlines, op: &str) -> Result<(), RebuildError> {
    let mut up = client::connect(p.upstream, d).await?;
    let facts = up
        .prepare_upstream(prepare_request(p, true, op))
        .await
        .map_err(|s| AgentCallError::from_status(p.upstream, s))?
        .into_inner();
    let mut target = client::connect(p.node, d).await?;
    target
        .start_rebuild(start_request(p, &facts, spread_checkpoint, true, op))
        .await
        .map_err(|s| AgentCallError::from_status(p.node, s))?;
    Ok(())
}

/// Why a rebuild cannot be cancelled once its job started.
pub fn no_return(node: &str) -> String {
    format!(
        "the rebuild of {node} has started on its agent: its data directory is being moved aside and replaced; \
         stopping now would leave it without data. Let it finish, or rebuild it again afterwards"
    )
}

/// Runs the whole rebuild outside a plan of its own (rejoin's fallback,
/// inside its rewind step): checks, upstream access, the node's job, then
/// confirmation. A planned rebuild runs the same pieces as the admit,
/// rebuild and confirm steps.
pub async fn execute(
    p: &Prepared<'_>,
    req: &RebuildRequest,
    d: Deadlines,
    ctx: &OpCtx,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let op = ctx.id().to_owned();
    ctx.checkpoint()?;
    check(p, req.spread_checkpoint, d, &op).await?;
    ctx.checkpoint()?;
    let mut up = client::connect(p.upstream, d).await?;
    let prep = up
        .prepare_upstream(prepare_request(p, false, &op))
        .await
        .map_err(|s| AgentCallError::from_status(p.upstream, s))?
        .into_inner();
    ctx.note(
        p.upstream.name.as_str(),
        &format!(
            "upstream ready: role {} {}, {}{}",
            p.cluster.replication_role,
            if prep.role_created { "created" } else { "checked" },
            if prep.hba_line_added {
                format!("pg_hba.conf line added ({})", prep.hba_line)
            } else {
                format!("pg_hba.conf already admits {}", p.replica_address)
            },
            if prep.stale_slot_dropped {
                format!(", stale slot {} dropped", p.slot)
            } else {
                String::new()
            }
        ),
    );
    // A cancel before this line leaves the node untouched (the role and
    // pg_hba.conf line on the upstream are what any rebuild needs); after
    // it, the node's data directory moves and the copy must finish.
    ctx.point_of_no_return(&no_return(p.node.name.as_str()))?;
    let job = run_job(p, &prep, req.spread_checkpoint, d, ctx).await?;
    confirmed(p.node, p.upstream, &p.slot, job, started, d).await
}

/// What a finished job left: where the old data went, its log.
#[derive(Debug, Clone)]
pub struct JobDone {
    pub job_id: String,
    pub moved_aside_to: Option<String>,
    pub log_file: Option<String>,
    pub replayed_lsn: Option<String>,
}

/// The node's job, given what the upstream's (real) PrepareUpstream
/// answered: started, journaled with its id (how `ops resume` re-attaches),
/// followed to its end. A failed job's slot is dropped on the upstream.
pub async fn run_job(
    p: &Prepared<'_>,
    prep: &pb::PrepareUpstreamResponse,
    spread_checkpoint: bool,
    d: Deadlines,
    ctx: &OpCtx,
) -> Result<JobDone, RebuildError> {
    let mut target = client::connect(p.node, d).await?;
    let job_id = target
        .start_rebuild(start_request(p, prep, spread_checkpoint, false, ctx.id()))
        .await
        .map_err(|s| AgentCallError::from_status(p.node, s))?
        .into_inner()
        .job_id;
    ctx.record("job", "started", &format!("{} {job_id}", p.node.name)).await?;
    ctx.note(
        p.node.name.as_str(),
        &format!(
            "job {job_id} started (re-attach with: pgfleet rebuild {} --attach {job_id})",
            p.node.name
        ),
    );
    watch(p.node, p.upstream, &p.slot, &job_id, target, d, ctx).await
}

/// Re-attaches to a running or finished job on `node`.
pub async fn attach(
    inventory: &Inventory,
    node: &str,
    job_id: &str,
    from: Option<&str>,
    slot: Option<&str>,
    d: Deadlines,
    ctx: &OpCtx,
) -> Result<RebuildReport, RebuildError> {
    let (cluster, n) = inventory.node(node).map_err(|e| RebuildError::InvalidUpstream {
        from: node.to_owned(),
        reason: e.to_string(),
    })?;
    let slot = match slot {
        Some(s) => SlotName::parse(s)?,
        None => n.name.default_slot(),
    };
    // The upstream is needed for the final confirmation and a failed job's
    // slot: the named one, else the cluster's primary now.
    let upstream_name = match from {
        Some(f) => f.to_owned(),
        None => {
            let report = fleet_status::gather(&[cluster], d).await;
            report.clusters[0]
                .primary
                .clone()
                .ok_or_else(|| RebuildError::NoUpstream {
                    cluster: cluster.name.to_string(),
                })?
        }
    };
    let (_, upstream) = inventory.node(&upstream_name).map_err(|e| RebuildError::InvalidUpstream {
        from: upstream_name.clone(),
        reason: e.to_string(),
    })?;
    let started = Instant::now();
    let target = client::connect(n, d).await?;
    let job = watch(n, upstream, &slot, job_id, target, d, ctx).await?;
    confirmed(n, upstream, &slot, job, started, d).await
}

/// Follows the job's events to its end.
async fn watch(
    node: &Node,
    upstream: &Node,
    slot: &SlotName,
    job_id: &str,
    mut target: AgentClient<Channel>,
    d: Deadlines,
    ctx: &OpCtx,
) -> Result<JobDone, RebuildError> {
    // The call deadline would cut a long copy short: the stream has none.
    let mut request = tonic::Request::new(pb::WatchJobRequest {
        job_id: job_id.to_owned(),
    });
    request.set_timeout(Duration::from_secs(7 * 24 * 3600));
    let mut stream = target
        .watch_job(request)
        .await
        .map_err(|s| AgentCallError::from_status(node, s))?
        .into_inner();
    let mut finished = None;
    while let Some(item) = stream.next().await {
        let ev = match item {
            Ok(ev) => ev,
            Err(_) => break,
        };
        let fin = match &ev.event {
            Some(Event::Finished(f)) => Some(f.clone()),
            _ => None,
        };
        ctx.job_event(node.name.as_str(), ev);
        if fin.is_some() {
            finished = fin;
            break;
        }
    }
    let Some(f) = finished else {
        return Err(RebuildError::StreamEnded {
            node: node.name.to_string(),
            job: job_id.to_owned(),
        });
    };
    if !f.success {
        // DESIGN.md invariant 4: no slot of a failed rebuild stays on the
        // upstream, where it would hold WAL back forever.
        let slot_note = if f.slot_created || f.log_file.is_some() {
            drop_failed_slot(upstream, slot, d).await
        } else {
            String::new()
        };
        return Err(RebuildError::JobFailed {
            node: node.name.to_string(),
            step: f.failed_step.unwrap_or_default(),
            error: f.error.unwrap_or_default(),
            stderr_tail: f.stderr_tail,
            moved_aside_to: f.moved_aside_to,
            log_file: f.log_file,
            slot_note,
        });
    }
    Ok(JobDone {
        job_id: job_id.to_owned(),
        moved_aside_to: f.moved_aside_to,
        log_file: f.log_file,
        replayed_lsn: f.replayed_lsn,
    })
}

/// The upstream shows the node streaming through its slot: the report.
pub async fn confirmed(
    node: &Node,
    upstream: &Node,
    slot: &SlotName,
    job: JobDone,
    started: Instant,
    d: Deadlines,
) -> Result<RebuildReport, RebuildError> {
    let (state, sync_state, lag) = confirm(node, upstream, slot, d).await?;
    Ok(RebuildReport {
        node: node.name.to_string(),
        upstream: upstream.name.to_string(),
        slot: slot.to_string(),
        job_id: job.job_id,
        moved_aside_to: job.moved_aside_to,
        log_file: job.log_file,
        replayed_lsn: job.replayed_lsn,
        state,
        sync_state,
        lag_bytes: lag,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn drop_failed_slot(upstream: &Node, slot: &SlotName, d: Deadlines) -> String {
    let result = async {
        let mut c = client::connect(upstream, d).await?;
        c.drop_slot(pb::DropSlotRequest {
            slot_name: slot.to_string(),
            force: false,
        })
        .await
        .map_err(|s| AgentCallError::from_status(upstream, s))
    }
    .await;
    match result {
        Ok(_) => format!("\n  slot {slot} created on {} by this rebuild was dropped", upstream.name),
        Err(AgentCallError::Status { code: tonic::Code::NotFound, .. }) => {
            format!("\n  no slot {slot} was left on {}", upstream.name)
        }
        Err(e) => format!(
            "\n  could not drop slot {slot} on {} ({e}); drop it with: pgfleet slots drop {} {slot}",
            upstream.name, upstream.name
        ),
    }
}

/// Waits until the upstream shows the node streaming through its slot.
async fn confirm(
    node: &Node,
    upstream: &Node,
    slot: &SlotName,
    d: Deadlines,
) -> Result<(String, String, Option<u64>), RebuildError> {
    let deadline = Instant::now() + VERIFY_DEADLINE;
    let mut c = client::connect(upstream, d).await?;
    loop {
        let last = match c.get_replication(pb::GetReplicationRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                let s = r.slots.iter().find(|s| s.slot_name == slot.as_str());
                let w = r
                    .standbys
                    .iter()
                    .find(|w| w.application_name == node.name.as_str());
                match (s, w) {
                    (Some(s), Some(w)) if s.active && w.state == "streaming" => {
                        return Ok((w.state.clone(), w.sync_state.clone(), w.total_lag_bytes));
                    }
                    (s, w) => format!(
                        "slot {}, connection {}",
                        s.map(|s| if s.active { "active" } else { "inactive" }).unwrap_or("missing"),
                        w.map(|w| w.state.as_str()).unwrap_or("missing")
                    ),
                }
            }
            Err(e) => e.message().to_owned(),
        };
        if Instant::now() >= deadline {
            return Err(RebuildError::NotConfirmed {
                node: node.name.to_string(),
                upstream: upstream.name.to_string(),
                slot: slot.to_string(),
                last,
            });
        }
        tokio::time::sleep(VERIFY_POLL).await;
    }
}
