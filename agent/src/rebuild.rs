//! The replica's part of a rebuild (DESIGN.md, manual procedure steps 2-4),
//! run as a job: verify before touching anything, then stop, move aside,
//! copy, start, and wait until the node streams.
//!
//! The steps are data (`RebuildStep`): the dry-run plan and the run iterate
//! the same list. Until `Stop`, nothing on the node has changed; a failure
//! after it leaves the moved-aside directory and the pg_basebackup log in
//! place, and says whether the upstream slot was created so the caller can
//! drop it (DESIGN.md invariants 1-4).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::job_event::Event;
use pgfleet_proto::{NodeName, RoleName, SlotName};
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, error, info, info_span, warn};

use crate::AgentState;
use crate::basebackup::{self, Copy};
use crate::config::AgentConfig;
use crate::datadir::{self, DataDirError, Occupancy};
use crate::exec::{Cmd, ExecError, Stream};
use crate::jobs::Job;
use crate::passfile::{self, TempPassfile};
use crate::pg::PgError;
use crate::plan::{self, Step};
use crate::secret::Secret;
use crate::service::{self, Action, ServiceState};
use crate::status::disk_space;

const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
const RELEASE_SLOT_TIMEOUT: Duration = Duration::from_secs(60);
const READY_POLL: Duration = Duration::from_millis(50);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Room kept free beyond the copy and the percentage margin: WAL streamed
/// during the copy, and breathing space for the server.
const SPACE_FLOOR: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "this node's PostgreSQL is a running primary (pg_is_in_recovery() = false): \
         it is never stopped or overwritten by a rebuild; fail over or switch over first"
    )]
    RunningPrimary,
    #[error(
        "PostgreSQL is {service_state} according to the service manager but the agent cannot query it \
         ({reason}); refusing to stop a server whose role cannot be confirmed"
    )]
    RoleUnknown {
        service_state: &'static str,
        reason: String,
    },
    #[error("upstream {host}:{port} does not answer a replication connection: {detail}")]
    UpstreamUnreachable {
        host: String,
        port: u16,
        detail: String,
    },
    #[error(
        "upstream {host}:{port} refuses replication connections as {role}: {detail}; \
         check the role's password and the pg_hba.conf line for this node's address"
    )]
    UpstreamAuth {
        host: String,
        port: u16,
        role: RoleName,
        detail: String,
    },
    #[error(
        "upstream {host}:{port} has system identifier {found}, but the cluster's is {expected}: \
         it is not a server of this cluster"
    )]
    SystemIdentifierMismatch {
        host: String,
        port: u16,
        expected: String,
        found: String,
    },
    #[error(
        "not enough space on the filesystem of {path}: the copy needs {needed} bytes \
         ({margin}% margin included) and {free} are free; free space or add --tablespace-mapping"
    )]
    NotEnoughSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
        margin: u32,
    },
    #[error("{step}: {source}")]
    Command {
        step: &'static str,
        source: ExecError,
    },
    #[error("PostgreSQL still runs after the stop command ({detail})")]
    StillRunning { detail: String },
    #[error("{step}: {source}")]
    Service {
        step: &'static str,
        source: service::ServiceError,
    },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("writing the replication passfile {path}: {source}")]
    Passfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    AutoConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the rebuild log {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pg_basebackup failed ({status}); full output in {log_file}")]
    Basebackup { status: String, log_file: PathBuf },
    #[error(
        "PostgreSQL did not become a streaming replica within {}: {last}",
        humantime::format_duration(*waited)
    )]
    NotReady { waited: Duration, last: String },
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl RebuildError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RebuildError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// A rebuild request, validated against this agent's configuration.
#[derive(Debug, Clone)]
pub struct RebuildRequest {
    pub copy: Copy,
    pub password: Secret,
    pub expected_system_identifier: String,
    pub expected_size_bytes: u64,
    /// (upstream location, local target, size).
    pub tablespaces: Vec<(PathBuf, PathBuf, u64)>,
    pub operation_id: String,
    /// Drop the upstream slot once this node has stopped (it held it).
    pub release_slot_after_stop: bool,
}

fn valid_host(h: &str) -> bool {
    h.parse::<IpAddr>().is_ok()
        || (!h.is_empty()
            && h.len() <= 253
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && !h.starts_with('-'))
}

/// Parses the RPC request. Everything that reaches argv, SQL or a path is
/// checked here, before any step runs.
pub fn validate(config: &AgentConfig, r: pb::StartRebuildRequest) -> Result<RebuildRequest, RebuildError> {
    use RebuildError as E;
    let fast_checkpoint = r.checkpoint() != pb::CheckpointMode::Spread;
    if !valid_host(&r.upstream_host) {
        return Err(E::invalid("upstream_host", format!("{:?} is not a host name or IP address", r.upstream_host)));
    }
    let port = u16::try_from(r.upstream_port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| E::invalid("upstream_port", format!("{} is not a TCP port", r.upstream_port)))?;
    let role = RoleName::parse(&r.replication_role).map_err(|e| E::invalid("replication_role", e.to_string()))?;
    let slot = SlotName::parse(&r.slot_name).map_err(|e| E::invalid("slot_name", e.to_string()))?;
    let app = NodeName::parse(&r.application_name).map_err(|e| E::invalid("application_name", e.to_string()))?;
    let password = Secret::new(r.replication_password).map_err(|e| E::invalid("replication_password", e.to_string()))?;
    if r.expected_system_identifier.is_empty() || !r.expected_system_identifier.bytes().all(|b| b.is_ascii_digit()) {
        return Err(E::invalid("expected_system_identifier", "must be the cluster's system identifier in decimal"));
    }
    let path = |field: &'static str, p: &str| -> Result<PathBuf, RebuildError> {
        let shown = pgfleet_proto::shown(p);
        if p.contains('=') {
            return Err(E::invalid(field, format!("{shown:?}: '=' is not supported in tablespace paths")));
        }
        datadir::normalise(p).ok_or_else(|| {
            E::invalid(field, format!("{shown:?} must be an absolute path without '..' or control characters"))
        })
    };
    let mut mappings = Vec::new();
    for m in &r.tablespace_mappings {
        let old = path("tablespace_mapping", &m.old_dir)?;
        let new = path("tablespace_mapping", &m.new_dir)?;
        if !config.path_allowed(&new) {
            return Err(E::invalid(
                "tablespace_mapping",
                format!(
                    "{} is outside the directories this agent may write (the data directory's parent and rebuild.allowed_roots)",
                    new.display()
                ),
            ));
        }
        if !r.upstream_tablespaces.iter().any(|t| datadir::normalise(&t.location).as_deref() == Some(&old)) {
            return Err(E::invalid(
                "tablespace_mapping",
                format!("the upstream has no tablespace at {}", old.display()),
            ));
        }
        mappings.push((old, new));
    }
    let mut tablespaces = Vec::new();
    let mut targets: HashMap<PathBuf, PathBuf> = HashMap::new();
    for t in &r.upstream_tablespaces {
        let old = path("upstream_tablespaces", &t.location)?;
        let target = mappings
            .iter()
            .find(|(o, _)| *o == old)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| old.clone());
        if !config.path_allowed(&target) {
            return Err(E::invalid(
                "tablespace_mapping",
                format!(
                    "tablespace {} would be written to {}, outside the directories this agent may write; \
                     map it with --tablespace-mapping {}=NEW",
                    pgfleet_proto::shown(&t.name),
                    target.display(),
                    old.display()
                ),
            ));
        }
        if target.starts_with(&config.postgres.data_dir) || config.postgres.data_dir.starts_with(&target) {
            return Err(E::invalid(
                "tablespace_mapping",
                format!("{} overlaps the data directory", target.display()),
            ));
        }
        if let Some(other) = targets.insert(target.clone(), old.clone()) {
            return Err(E::invalid(
                "tablespace_mapping",
                format!("{} and {} would both go to {}", other.display(), old.display(), target.display()),
            ));
        }
        tablespaces.push((old, target, t.size_bytes));
    }
    Ok(RebuildRequest {
        copy: Copy {
            upstream_host: r.upstream_host,
            upstream_port: port,
            role,
            slot,
            application_name: app,
            tablespace_mappings: mappings,
            fast_checkpoint,
        },
        password,
        expected_system_identifier: r.expected_system_identifier,
        expected_size_bytes: r.expected_size_bytes,
        tablespaces,
        operation_id: r.operation_id,
        release_slot_after_stop: r.release_slot_after_stop,
    })
}

/// The steps of a rebuild, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RebuildStep {
    CheckLocal,
    CheckUpstream,
    CheckSpace,
    Stop,
    ReleaseSlot,
    MoveAside,
    Passfile,
    Basebackup,
    Start,
    WaitStreaming,
}

/// The steps for this request: `ReleaseSlot` only when the node held its
/// own slot on the upstream.
fn steps(req: &RebuildRequest) -> Vec<RebuildStep> {
    use RebuildStep::*;
    let mut v = vec![CheckLocal, CheckUpstream, CheckSpace, Stop];
    if req.release_slot_after_stop {
        v.push(ReleaseSlot);
    }
    v.extend([MoveAside, Passfile, Basebackup, Start, WaitStreaming]);
    v
}

impl RebuildStep {
    fn name(self) -> &'static str {
        match self {
            RebuildStep::CheckLocal => "check-local",
            RebuildStep::CheckUpstream => "check-upstream",
            RebuildStep::CheckSpace => "check-space",
            RebuildStep::Stop => "stop",
            RebuildStep::ReleaseSlot => "release-slot",
            RebuildStep::MoveAside => "move-aside",
            RebuildStep::Passfile => "passfile",
            RebuildStep::Basebackup => "basebackup",
            RebuildStep::Start => "start",
            RebuildStep::WaitStreaming => "wait-streaming",
        }
    }
}

/// A replication-protocol command sent to the upstream with psql (libpq's
/// `replication=true`), authenticated through `passfile`.
fn replication_command(config: &AgentConfig, req: &RebuildRequest, passfile: &Path, command: &str, timeout: Duration) -> Cmd {
    let conninfo = format!(
        "host={} port={} user={} dbname=replication replication=true connect_timeout=10 application_name=pgfleet-check",
        req.copy.upstream_host, req.copy.upstream_port, req.copy.role
    );
    Cmd::new(config.pg_bin("psql"), timeout)
        .args(["-X", "-A", "-t", "-q", "-w", "-c", command, "-d"])
        .arg(conninfo)
        .env("PGPASSFILE", passfile)
}

fn identify_system_command(config: &AgentConfig, req: &RebuildRequest, passfile: &Path) -> Cmd {
    replication_command(config, req, passfile, "IDENTIFY_SYSTEM", CHECK_TIMEOUT)
}

/// WAIT: the WAL sender of this node may need a moment to notice the stop.
fn release_slot_command(config: &AgentConfig, req: &RebuildRequest, passfile: &Path) -> Cmd {
    replication_command(
        config,
        req,
        passfile,
        &format!("DROP_REPLICATION_SLOT {} WAIT", req.copy.slot),
        RELEASE_SLOT_TIMEOUT,
    )
}

fn argv_strings(c: &Cmd) -> Vec<String> {
    c.argv()
}

struct Ctx<'a> {
    state: &'a AgentState,
    req: &'a RebuildRequest,
    stamp: String,
    log_file: PathBuf,
}

impl Ctx<'_> {
    fn config(&self) -> &AgentConfig {
        &self.state.config
    }

    fn describe(&self, step: RebuildStep) -> Step {
        let cfg = self.config();
        let req = self.req;
        let data = cfg.postgres.data_dir.display();
        match step {
            RebuildStep::CheckLocal => Step::new(
                step.name(),
                "make sure this node's PostgreSQL is not a running primary",
            )
            .sql("SELECT pg_is_in_recovery()"),
            RebuildStep::CheckUpstream => Step::new(
                step.name(),
                format!(
                    "connect to {}:{} for replication as {} (temporary passfile) and compare IDENTIFY_SYSTEM's system identifier with {}",
                    req.copy.upstream_host, req.copy.upstream_port, req.copy.role, req.expected_system_identifier
                ),
            )
            .argv(argv_strings(&identify_system_command(cfg, req, Path::new("<temporary passfile>")))),
            RebuildStep::CheckSpace => Step::new(
                step.name(),
                format!(
                    "check free space for {} bytes plus {}% on {}{}",
                    req.expected_size_bytes,
                    cfg.rebuild.free_space_margin_percent,
                    cfg.data_parent().display(),
                    if req.tablespaces.is_empty() { "" } else { " and the tablespace targets" }
                ),
            ),
            RebuildStep::Stop => Step::new(
                step.name(),
                format!("stop PostgreSQL through {} (fast shutdown)", cfg.service.backend_name()),
            )
            .argv(argv_strings(&service::action_command(cfg, Action::Stop, cfg.rebuild.service_timeout))),
            RebuildStep::ReleaseSlot => Step::new(
                step.name(),
                format!(
                    "drop slot {} on {}:{}, which this node held until it stopped (pg_basebackup -C creates it anew)",
                    req.copy.slot, req.copy.upstream_host, req.copy.upstream_port
                ),
            )
            .argv(argv_strings(&release_slot_command(cfg, req, Path::new("<temporary passfile>")))),
            RebuildStep::MoveAside => {
                let mut dirs = vec![format!(
                    "{data} -> {}",
                    datadir::moved_aside_path(&cfg.postgres.data_dir, &self.stamp).display()
                )];
                for (_, target, _) in &req.tablespaces {
                    dirs.push(format!(
                        "{} -> {}",
                        target.display(),
                        datadir::moved_aside_path(target, &self.stamp).display()
                    ));
                }
                Step::new(
                    step.name(),
                    format!("move aside, when not empty (never deleted): {}", dirs.join(", ")),
                )
            }
            RebuildStep::Passfile => Step::new(
                step.name(),
                format!(
                    "write the replication password for {}:{} to {} (0600; the standby keeps reading it)",
                    req.copy.upstream_host,
                    req.copy.upstream_port,
                    cfg.passfile().display()
                ),
            ),
            RebuildStep::Basebackup => Step::new(
                step.name(),
                format!("copy the upstream with pg_basebackup; output to {}", self.log_file.display()),
            )
            .argv(argv_strings(&basebackup::command(cfg, &req.copy, &cfg.passfile()))),
            RebuildStep::Start => Step::new(
                step.name(),
                format!("start PostgreSQL through {}", cfg.service.backend_name()),
            )
            .argv(argv_strings(&service::action_command(cfg, Action::Start, cfg.rebuild.service_timeout))),
            RebuildStep::WaitStreaming => Step::new(
                step.name(),
                format!(
                    "wait until pg_is_in_recovery() is true and the WAL receiver streams (up to {})",
                    humantime::format_duration(cfg.rebuild.ready_timeout)
                ),
            )
            .sql("SELECT pg_is_in_recovery(), status FROM pg_stat_wal_receiver"),
        }
    }
}

fn log_path(config: &AgentConfig, stamp: &str) -> PathBuf {
    let name = config
        .postgres
        .data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    config
        .data_parent()
        .join(format!("{name}.pgfleet-rebuild-{stamp}.log"))
}

/// The plan, for a dry run.
pub fn plan(state: &AgentState, req: &RebuildRequest) -> Vec<Step> {
    let stamp = plan::file_stamp();
    let ctx = Ctx {
        state,
        req,
        log_file: log_path(&state.config, &stamp),
        stamp,
    };
    steps(req).into_iter().map(|s| ctx.describe(s)).collect()
}

/// What the run has done so far, for the final report.
#[derive(Debug, Default)]
struct Outcome {
    node_changed: bool,
    moved_aside_to: Option<PathBuf>,
    slot_created: bool,
    stderr_tail: Vec<String>,
    replayed_lsn: Option<String>,
    basebackup_started: bool,
}

/// Runs the rebuild, reporting to `job`. Never returns an error: the job's
/// `Finished` event carries the outcome.
pub async fn run(state: Arc<AgentState>, job: Arc<Job>, req: RebuildRequest) {
    let span = info_span!("rebuild", op_id = %req.operation_id, job = %job.id, upstream = %req.copy.upstream_host);
    async move {
        // Stamps have one-second resolution: a rebuild right after another
        // (they take under a second on a small cluster) waits for a stamp
        // whose log and moved-aside names are still free, rather than
        // failing at move-aside.
        let mut stamp = plan::file_stamp();
        for _ in 0..12 {
            let taken = log_path(&state.config, &stamp).exists()
                || crate::datadir::moved_aside_path(&state.config.postgres.data_dir, &stamp).exists();
            if !taken {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            stamp = plan::file_stamp();
        }
        let ctx = Ctx {
            state: &state,
            req: &req,
            log_file: log_path(&state.config, &stamp),
            stamp,
        };
        let mut outcome = Outcome::default();
        // No rebuild runs (the job registry refused a second one), so any
        // pg_basebackup into our data directory is an earlier agent's orphan.
        let orphans = basebackup::kill_orphans(&state.config);
        if !orphans.is_empty() {
            warn!(?orphans, "killed pg_basebackup processes left by an earlier agent");
            job.emit(Event::Log(pb::LogLine {
                source: "agent".into(),
                line: format!("killed pg_basebackup processes left by an earlier agent: {orphans:?}"),
            }));
        }
        for step in steps(&req) {
            let d = ctx.describe(step);
            job.emit(Event::StepStarted(pb::StepStarted {
                step: d.name.to_owned(),
                description: d.description.clone(),
            }));
            info!(step = d.name, "{}", d.description);
            let t = Instant::now();
            match execute(&ctx, step, &job, &mut outcome).await {
                Ok(detail) => {
                    job.emit(Event::StepFinished(pb::StepFinished {
                        step: d.name.to_owned(),
                        seconds: t.elapsed().as_secs_f64(),
                        detail,
                    }));
                }
                Err(e) => {
                    error!(step = d.name, error = %e, "rebuild failed");
                    let basebackup_ran = outcome.basebackup_started;
                    job.emit(Event::Finished(pb::JobFinished {
                        success: false,
                        failed_step: Some(d.name.to_owned()),
                        error: Some(e.to_string()),
                        stderr_tail: std::mem::take(&mut outcome.stderr_tail),
                        moved_aside_to: outcome.moved_aside_to.map(|p| p.display().to_string()),
                        log_file: basebackup_ran.then(|| ctx.log_file.display().to_string()),
                        slot_created: outcome.slot_created,
                        node_changed: outcome.node_changed,
                        replayed_lsn: None,
                    }));
                    return;
                }
            }
        }
        info!("rebuild complete");
        job.emit(Event::Finished(pb::JobFinished {
            success: true,
            failed_step: None,
            error: None,
            stderr_tail: Vec::new(),
            moved_aside_to: outcome.moved_aside_to.map(|p| p.display().to_string()),
            log_file: Some(ctx.log_file.display().to_string()),
            slot_created: outcome.slot_created,
            node_changed: true,
            replayed_lsn: outcome.replayed_lsn,
        }));
    }
    .instrument(span)
    .await
}

async fn execute(ctx: &Ctx<'_>, step: RebuildStep, job: &Job, out: &mut Outcome) -> Result<String, RebuildError> {
    let cfg = ctx.config();
    let req = ctx.req;
    match step {
        RebuildStep::CheckLocal => check_local(ctx).await,
        RebuildStep::CheckUpstream => {
            let tmp = TempPassfile::create(&req.copy.upstream_host, req.copy.upstream_port, &req.copy.role, &req.password)
                .map_err(|source| RebuildError::Passfile {
                    path: std::env::temp_dir(),
                    source,
                })?;
            let cmd = identify_system_command(cfg, req, tmp.path());
            let output = cmd.run().await.map_err(|source| RebuildError::Command {
                step: "check-upstream",
                source,
            })?;
            drop(tmp);
            let stderr = output.stderr_tail.join(" | ");
            if !output.status.success() {
                let auth = [
                    "password authentication failed",
                    "no pg_hba.conf entry",
                    "pg_hba.conf rejects",
                    "does not exist",
                    "no password supplied",
                    "must have replication",
                    "expired",
                ]
                    .iter()
                    .any(|p| stderr.contains(p));
                return Err(if auth {
                    RebuildError::UpstreamAuth {
                        host: req.copy.upstream_host.clone(),
                        port: req.copy.upstream_port,
                        role: req.copy.role.clone(),
                        detail: stderr,
                    }
                } else {
                    RebuildError::UpstreamUnreachable {
                        host: req.copy.upstream_host.clone(),
                        port: req.copy.upstream_port,
                        detail: if stderr.is_empty() { output.status.to_string() } else { stderr },
                    }
                });
            }
            let line = output.stdout.lines().next().unwrap_or_default();
            let mut fields = line.split('|');
            let sysid = fields.next().unwrap_or_default().trim().to_owned();
            let timeline = fields.next().unwrap_or_default().trim().to_owned();
            if sysid != req.expected_system_identifier {
                return Err(RebuildError::SystemIdentifierMismatch {
                    host: req.copy.upstream_host.clone(),
                    port: req.copy.upstream_port,
                    expected: req.expected_system_identifier.clone(),
                    found: sysid,
                });
            }
            Ok(format!("upstream answers for replication: system identifier {sysid}, timeline {timeline}"))
        }
        RebuildStep::CheckSpace => check_space(ctx),
        RebuildStep::Stop => {
            let before = service::status(cfg).await;
            let up = ctx.state.pg.status().await.is_ok();
            if before.state == ServiceState::Stopped && !up {
                return Ok("already stopped".into());
            }
            // Last look before the first change: still not a primary?
            check_local(ctx).await?;
            out.node_changed = true;
            service::perform(cfg, Action::Stop)
                .await
                .map_err(|source| RebuildError::Service { step: "stop", source })?;
            let after = service::status(cfg).await;
            if after.state != ServiceState::Stopped {
                return Err(RebuildError::StillRunning { detail: after.detail });
            }
            Ok(format!("stopped ({})", after.detail))
        }
        RebuildStep::ReleaseSlot => {
            let tmp = TempPassfile::create(&req.copy.upstream_host, req.copy.upstream_port, &req.copy.role, &req.password)
                .map_err(|source| RebuildError::Passfile {
                    path: std::env::temp_dir(),
                    source,
                })?;
            let output = release_slot_command(cfg, req, tmp.path())
                .run()
                .await
                .map_err(|source| RebuildError::Command { step: "release-slot", source })?;
            let stderr = output.stderr_tail.join(" | ");
            if !output.status.success() && !stderr.contains("does not exist") {
                return Err(RebuildError::UpstreamUnreachable {
                    host: req.copy.upstream_host.clone(),
                    port: req.copy.upstream_port,
                    detail: format!("dropping slot {}: {stderr}", req.copy.slot),
                });
            }
            Ok(format!("slot {} dropped on the upstream", req.copy.slot))
        }
        RebuildStep::MoveAside => {
            let mut moved = Vec::new();
            let mut dirs = vec![cfg.postgres.data_dir.clone()];
            dirs.extend(req.tablespaces.iter().map(|(_, t, _)| t.clone()));
            for (i, dir) in dirs.iter().enumerate() {
                let d = dir.clone();
                let stamp = ctx.stamp.clone();
                let result = tokio::task::spawn_blocking(move || -> Result<Option<PathBuf>, DataDirError> {
                    match datadir::occupancy(&d)? {
                        Occupancy::Occupied => datadir::move_aside(&d, &stamp).map(Some),
                        Occupancy::Empty | Occupancy::Missing => Ok(None),
                    }
                })
                .await
                .map_err(|e| DataDirError::Inspect {
                    path: dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                if let Some(to) = result {
                    out.node_changed = true;
                    info!(from = %dir.display(), to = %to.display(), "moved aside");
                    moved.push(format!("{} -> {}", dir.display(), to.display()));
                    if i == 0 {
                        out.moved_aside_to = Some(to);
                    }
                }
            }
            Ok(if moved.is_empty() {
                "nothing to move: the directories are empty or missing".into()
            } else {
                format!("moved aside: {}", moved.join(", "))
            })
        }
        RebuildStep::Passfile => {
            let path = cfg.passfile();
            let (p, host, port, role, pw) = (
                path.clone(),
                req.copy.upstream_host.clone(),
                req.copy.upstream_port,
                req.copy.role.clone(),
                req.password.clone(),
            );
            tokio::task::spawn_blocking(move || passfile::store(&p, &host, port, &role, &pw))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(|source| RebuildError::Passfile { path: path.clone(), source })?;
            Ok(format!("{} written (0600)", path.display()))
        }
        RebuildStep::Basebackup => run_basebackup(ctx, job, out).await,
        RebuildStep::Start => {
            // Failover slots (17+, logical WAL): the copy synchronizes them
            // from its first start (pg_basebackup -R writes no dbname).
            if crate::slotsync::applies_offline(cfg).await {
                let up = crate::standby::Upstream {
                    host: req.copy.upstream_host.clone(),
                    port: req.copy.upstream_port,
                    role: req.copy.role.clone(),
                    password: req.password.clone(),
                    slot: req.copy.slot.clone(),
                    application_name: req.copy.application_name.clone(),
                };
                let conninfo = crate::slotsync::with_dbname(
                    &crate::standby::primary_conninfo(cfg, &up),
                    crate::slotsync::DATABASE,
                );
                let mut settings = vec![("primary_conninfo", conninfo), ("primary_slot_name", up.slot.to_string())];
                settings.extend(crate::slotsync::standby_settings());
                let data = cfg.postgres.data_dir.clone();
                tokio::task::spawn_blocking(move || crate::standby::write_auto_conf(&data, &settings))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|source| RebuildError::AutoConf {
                        path: cfg.postgres.data_dir.join("postgresql.auto.conf"),
                        source,
                    })?;
            }
            service::perform(cfg, Action::Start)
                .await
                .map_err(|source| RebuildError::Service { step: "start", source })?;
            Ok("started".into())
        }
        RebuildStep::WaitStreaming => {
            let waited = cfg.rebuild.ready_timeout;
            let deadline = Instant::now() + waited;
            let mut last;
            loop {
                match ctx.state.pg.status().await {
                    Ok(s) if !s.in_recovery => {
                        // Never expected: -R wrote standby.signal. Say so plainly.
                        last = "the server came up as a primary, not in recovery".to_owned();
                    }
                    Ok(s) => {
                        let receiver = s.wal_receiver.as_ref().map(|w| w.status.as_str());
                        if receiver == Some("streaming") {
                            out.replayed_lsn = s.replayed_lsn.map(|l| l.to_string());
                            return Ok(format!(
                                "in recovery and streaming; replayed up to {}",
                                out.replayed_lsn.as_deref().unwrap_or("?")
                            ));
                        }
                        last = format!("in recovery, WAL receiver {}", receiver.unwrap_or("not running"));
                    }
                    Err(e) => last = e.to_string(),
                }
                if Instant::now() >= deadline {
                    return Err(RebuildError::NotReady { waited, last });
                }
                tokio::time::sleep(READY_POLL).await;
            }
        }
    }
}

async fn check_local(ctx: &Ctx<'_>) -> Result<String, RebuildError> {
    match ctx.state.pg.status().await {
        Ok(s) if !s.in_recovery => Err(RebuildError::RunningPrimary),
        Ok(_) => Ok("PostgreSQL runs as a replica".into()),
        Err(e) => {
            let svc = service::status(ctx.config()).await;
            match svc.state {
                ServiceState::Stopped => Ok(format!("PostgreSQL is stopped ({})", svc.detail)),
                ServiceState::Running => Err(RebuildError::RoleUnknown {
                    service_state: "running",
                    reason: e.to_string(),
                }),
                ServiceState::Unknown => Err(RebuildError::RoleUnknown {
                    service_state: "in an unknown state",
                    reason: format!("{e}; service manager: {}", svc.detail),
                }),
            }
        }
    }
}

fn check_space(ctx: &Ctx<'_>) -> Result<String, RebuildError> {
    let cfg = ctx.config();
    let req = ctx.req;
    let margin = cfg.rebuild.free_space_margin_percent;
    let with_margin = |b: u64| b.saturating_add(b / 100 * u64::from(margin));
    let ts_total: u64 = req.tablespaces.iter().map(|(_, _, s)| *s).sum();
    // Per filesystem: the data directory's share and each tablespace's.
    let mut needs: Vec<(PathBuf, u64)> = vec![(
        cfg.postgres.data_dir.clone(),
        with_margin(req.expected_size_bytes.saturating_sub(ts_total)) + SPACE_FLOOR,
    )];
    for (_, target, size) in &req.tablespaces {
        needs.push((target.clone(), with_margin(*size)));
    }
    let mut by_fs: HashMap<u64, (PathBuf, u64, u64)> = HashMap::new();
    for (path, need) in needs {
        let Some(existing) = path.ancestors().find(|p| p.exists()).map(Path::to_path_buf) else {
            continue;
        };
        let fsid = nix::sys::statvfs::statvfs(&existing)
            .map(|s| s.filesystem_id())
            .unwrap_or(0);
        let free = disk_space(&existing).map(|d| d.free_bytes).unwrap_or(0);
        let e = by_fs.entry(fsid).or_insert((path.clone(), 0, free));
        e.1 = e.1.saturating_add(need);
    }
    let mut report = Vec::new();
    for (path, needed, free) in by_fs.into_values() {
        if needed > free {
            return Err(RebuildError::NotEnoughSpace { path, needed, free, margin });
        }
        report.push(format!("{}: {needed} needed, {free} free", path.display()));
    }
    Ok(report.join("; "))
}

async fn run_basebackup(ctx: &Ctx<'_>, job: &Job, out: &mut Outcome) -> Result<String, RebuildError> {
    let cfg = ctx.config();
    let cmd = basebackup::command(cfg, &ctx.req.copy, &cfg.passfile());
    let log_file = ctx.log_file.clone();
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&log_file)
        .await
        .map_err(|source| RebuildError::LogFile { path: log_file.clone(), source })?;
    let header = format!(
        "# pgfleet rebuild {} (operation {}), {}\n# {}\n",
        ctx.stamp,
        ctx.req.operation_id,
        plan::rfc3339_now(),
        cmd.display_argv()
    );
    let _ = file.write_all(header.as_bytes()).await;

    // Lines go to the log file through a writer task: the line callback
    // must not block on disk.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if file.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
        let _ = file.flush().await;
        let _ = file.sync_all().await;
        file
    });

    out.basebackup_started = true;
    let slot_line = format!("created replication slot \"{}\"", ctx.req.copy.slot);
    let mut last_progress = Instant::now() - PROGRESS_EVERY;
    let mut slot_created = false;
    let mut tail: Vec<String> = Vec::new();
    let result = cmd
        .run_with(|stream, line| {
            let _ = tx.send(format!("{line}\n"));
            if let Some((done, total)) = basebackup::parse_progress(line) {
                if last_progress.elapsed() >= PROGRESS_EVERY || done == total {
                    last_progress = Instant::now();
                    job.emit(Event::Progress(pb::Progress {
                        done_bytes: done,
                        total_bytes: total,
                    }));
                }
                return;
            }
            if line.contains(&slot_line) {
                slot_created = true;
            }
            if stream == Stream::Stderr && basebackup::is_error_line(line) {
                tail.push(line.to_owned());
            }
            job.emit(Event::Log(pb::LogLine {
                source: "pg_basebackup".into(),
                line: line.to_owned(),
            }));
        })
        .await;
    drop(tx);
    if let Ok(mut file) = writer.await {
        let end = match &result {
            Ok(o) => format!("# exit: {}\n", o.status),
            Err(e) => format!("# {e}\n"),
        };
        let _ = file.write_all(end.as_bytes()).await;
        let _ = file.sync_all().await;
    }
    out.slot_created = slot_created;
    match result {
        Ok(o) if o.status.success() => Ok(format!("copied; log in {}", log_file.display())),
        Ok(o) => {
            out.stderr_tail = if tail.is_empty() { o.stderr_tail } else { tail };
            Err(RebuildError::Basebackup {
                status: o.status.to_string(),
                log_file,
            })
        }
        Err(e) => {
            out.stderr_tail = tail;
            Err(RebuildError::Command { step: "basebackup", source: e })
        }
    }
}
