//! Moving the primary role (DESIGN.md invariants 5 and 6): fencing a
//! primary, promoting a standby, pointing a node at a new upstream, slots on
//! the new primary, synchronous_standby_names, and pg_rewind for a former
//! primary whose timeline diverged.
//!
//! Fencing leaves standby.signal in the data directory: whatever restarts
//! that server later (an operator, systemd, a reboot) gets a read-only
//! standby, never a second writable primary. ConfigureStandby is the one way
//! back, and it keeps the node a standby.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfleet_proto::sync::SyncSpec;
use pgfleet_proto::{NodeName, RoleName, SlotName};
use tokio_postgres::error::SqlState;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::controldata::{self, ControlData};
use crate::exec::{Cmd, ExecError};
use crate::passfile;
use crate::pg::{Pg, PgError};
use crate::secret::Secret;
use crate::service::{self, Action, ServiceState};

const PROMOTE_WAIT_SECONDS: i32 = 60;
const PROMOTE_POLL: Duration = Duration::from_millis(5);
const REWIND_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{step}: {source}")]
    Command {
        step: &'static str,
        source: ExecError,
    },
    #[error("{step}: {source}")]
    Service {
        step: &'static str,
        source: service::ServiceError,
    },
    #[error("{action} {path}: {source}")]
    File {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this node is a running primary; it must be fenced (stopped) before it can follow another node"
    )]
    RunningPrimary,
    #[error("this node is not a standby (pg_is_in_recovery() = false); nothing to promote")]
    NotStandby,
    #[error("pg_promote() did not finish within {PROMOTE_WAIT_SECONDS} s")]
    PromoteTimeout,
    #[error("PostgreSQL still runs after the stop command ({detail})")]
    StillRunning { detail: String },
    #[error("slot {0} exists and is active; another standby uses it")]
    SlotActive(SlotName),
    #[error("PostgreSQL is running; pg_rewind needs it stopped (fence it first)")]
    RunningForRewind,
    #[error("pg_rewind failed ({status}): {}", tail.join(" | "))]
    Rewind { status: String, tail: Vec<String> },
    #[error(
        "refusing to start this node as a primary: pg_controldata says {state:?}, not a clean primary shutdown"
    )]
    NotCleanPrimary { state: String },
    #[error("no data directory at {0}: nothing to fence or rewind")]
    NoDataDir(PathBuf),
    #[error("PostgreSQL runs on this node: there is no fence to undo (unfence starts a stopped, fenced primary again)")]
    NotFenced,
    #[error("refusing to restart in place: {0}")]
    NotCrashed(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> StandbyError {
    StandbyError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Settings switchover and failover look at.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub in_recovery: bool,
    pub max_connections: u32,
    pub max_worker_processes: u32,
    pub max_wal_senders: u32,
    pub max_prepared_transactions: u32,
    pub max_locks_per_transaction: u32,
    pub synchronous_standby_names: String,
    pub synchronous_commit: String,
    pub replay_pause_state: Option<String>,
    pub logical_slots: Vec<String>,
    pub wal_log_hints: bool,
    pub data_checksums: bool,
    pub timeline: u32,
    pub failover_slots: Vec<crate::slotsync::FailoverSlot>,
    pub wal_level: String,
}

const SETTINGS_SQL: &str = "
SELECT pg_is_in_recovery(),
       current_setting('max_connections')::int,
       current_setting('max_worker_processes')::int,
       current_setting('max_wal_senders')::int,
       current_setting('max_prepared_transactions')::int,
       current_setting('max_locks_per_transaction')::int,
       current_setting('synchronous_standby_names'),
       current_setting('synchronous_commit'),
       CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END,
       (SELECT coalesce(array_agg(slot_name::text ORDER BY slot_name), '{}')
          FROM pg_replication_slots WHERE slot_type = 'logical'),
       current_setting('wal_log_hints') = 'on',
       current_setting('data_checksums') = 'on',
       CASE WHEN pg_is_in_recovery()
            THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()))::int8
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int8 END,
       current_setting('wal_level')";

pub async fn settings(pg: &Pg) -> Result<Settings, StandbyError> {
    let r = pg.query_one(SETTINGS_SQL, &[]).await?;
    let u = |i: usize| -> Result<u32, StandbyError> {
        let v: i32 = r.try_get(i).map_err(PgError::from)?;
        Ok(u32::try_from(v).unwrap_or(0))
    };
    Ok(Settings {
        in_recovery: r.try_get(0).map_err(PgError::from)?,
        max_connections: u(1)?,
        max_worker_processes: u(2)?,
        max_wal_senders: u(3)?,
        max_prepared_transactions: u(4)?,
        max_locks_per_transaction: u(5)?,
        synchronous_standby_names: r.try_get(6).map_err(PgError::from)?,
        synchronous_commit: r.try_get(7).map_err(PgError::from)?,
        replay_pause_state: r.try_get(8).map_err(PgError::from)?,
        logical_slots: r.try_get(9).map_err(PgError::from)?,
        wal_log_hints: r.try_get(10).map_err(PgError::from)?,
        data_checksums: r.try_get(11).map_err(PgError::from)?,
        timeline: r
            .try_get::<_, Option<i64>>(12)
            .map_err(PgError::from)?
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
        wal_level: r.try_get(13).map_err(PgError::from)?,
        failover_slots: crate::slotsync::failover_slots(pg).await?,
    })
}

/// ALTER SYSTEM SET synchronous_standby_names and reload. The value is
/// built from validated names (each double-quoted), so it is a safe literal.
/// Where failover slots apply (17+, logical WAL), synchronized_standby_slots
/// follows: the logical WAL senders wait for the same standbys as commits.
pub async fn set_synchronous_standbys(
    pg: &Pg,
    spec: &SyncSpec,
) -> Result<(String, String, Option<String>), StandbyError> {
    let previous: String = pg
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await?
        .try_get(0)
        .map_err(PgError::from)?;
    let value = spec.to_string();
    pg.query(
        &format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{}'",
            value.replace('\'', "''")
        ),
        &[],
    )
    .await?;
    let standby_slots = crate::slotsync::set_standby_slots(pg, spec).await?;
    pg.query("SELECT pg_reload_conf()", &[]).await?;
    info!(%previous, now = %value, "synchronous_standby_names set");
    Ok((value, previous, standby_slots))
}

/// Where a standby streams from.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub role: RoleName,
    pub password: Secret,
    pub slot: SlotName,
    pub application_name: NodeName,
}

pub fn parse_upstream(
    host: &str,
    port: u32,
    role: &str,
    password: String,
    slot: &str,
    application_name: &str,
) -> Result<Upstream, StandbyError> {
    let host_ok = host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.len() <= 253
            && !host.starts_with('-')
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    if !host_ok {
        return Err(invalid("upstream_host", format!("{host:?} is not a host name or IP address")));
    }
    Ok(Upstream {
        host: host.to_owned(),
        port: u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid("upstream_port", format!("{port} is not a TCP port")))?,
        role: RoleName::parse(role).map_err(|e| invalid("replication_role", e.to_string()))?,
        password: Secret::new(password).map_err(|e| invalid("replication_password", e.to_string()))?,
        slot: SlotName::parse(slot).map_err(|e| invalid("slot_name", e.to_string()))?,
        application_name: NodeName::parse(application_name)
            .map_err(|e| invalid("application_name", e.to_string()))?,
    })
}

/// libpq conninfo quoting: single quotes, `\` and `'` escaped.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// primary_conninfo naming the lasting passfile, never the password.
pub fn primary_conninfo(config: &AgentConfig, up: &Upstream) -> String {
    format!(
        "host={} port={} user={} passfile={} application_name={}",
        up.host,
        up.port,
        up.role,
        conninfo_value(&config.passfile().display().to_string()),
        up.application_name
    )
}

fn sql_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// Rewrites postgresql.auto.conf of a stopped server: our keys replaced,
/// everything else kept (ALTER SYSTEM needs a running server).
pub(crate) fn write_auto_conf(data_dir: &Path, settings: &[(&str, String)]) -> std::io::Result<()> {
    let path = data_dir.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut text: String = old
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            !settings.iter().any(|(k, _)| *k == key)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for (k, v) in settings {
        text.push_str(&format!("{k} = {}\n", sql_literal(v)));
    }
    crate::hba::write_atomically(&path, &text)
}

fn touch_standby_signal(data_dir: &Path) -> Result<(), StandbyError> {
    let path = data_dir.join("standby.signal");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map(|_| ())
        .map_err(|source| StandbyError::File {
            action: "creating",
            path,
            source,
        })
}

/// Points this node at `up`. Returns whether the server had to be started.
pub async fn configure(
    config: &AgentConfig,
    pg: &Pg,
    up: &Upstream,
    reset_sync: bool,
) -> Result<(bool, String), StandbyError> {
    let passfile = config.passfile();
    {
        let (p, host, port, role, pw) = (passfile.clone(), up.host.clone(), up.port, up.role.clone(), up.password.clone());
        tokio::task::spawn_blocking(move || passfile::store(&p, &host, port, &role, &pw))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| StandbyError::File {
                action: "writing",
                path: passfile.clone(),
                source,
            })?;
    }
    let running = pg.status().await;
    // Failover slots (17+, logical WAL): the standby synchronizes them.
    let slot_sync = match &running {
        Ok(_) => crate::slotsync::applies(pg).await?,
        Err(_) => crate::slotsync::applies_offline(config).await,
    };
    let mut conninfo = primary_conninfo(config, up);
    if slot_sync {
        conninfo = crate::slotsync::with_dbname(&conninfo, crate::slotsync::DATABASE);
    }
    let mut settings = vec![
        ("primary_conninfo", conninfo.clone()),
        ("primary_slot_name", up.slot.to_string()),
    ];
    if reset_sync {
        settings.push(("synchronous_standby_names", String::new()));
    }
    if slot_sync {
        settings.extend(crate::slotsync::standby_settings());
        if reset_sync {
            // Like synchronous_standby_names: a standby waits for no one.
            settings.push(("synchronized_standby_slots", String::new()));
        }
    }
    match running {
        Ok(s) if !s.in_recovery => Err(StandbyError::RunningPrimary),
        Ok(_) => {
            for (k, v) in &settings {
                pg.query(&format!("ALTER SYSTEM SET {k} = {}", sql_literal(v)), &[]).await?;
            }
            pg.query("SELECT pg_reload_conf()", &[]).await?;
            info!(%conninfo, slot = %up.slot, "standby re-pointed");
            Ok((false, conninfo))
        }
        Err(_) => {
            let data = config.postgres.data_dir.clone();
            if !data.join("PG_VERSION").exists() {
                return Err(StandbyError::NoDataDir(data));
            }
            // Settings in place before the start: the WAL receiver connects
            // at once instead of after a reload.
            let d = data.clone();
            let owned: Vec<(&'static str, String)> = settings.clone();
            tokio::task::spawn_blocking(move || -> Result<(), StandbyError> {
                touch_standby_signal(&d)?;
                write_auto_conf(&d, &owned).map_err(|source| StandbyError::File {
                    action: "writing",
                    path: d.join("postgresql.auto.conf"),
                    source,
                })
            })
            .await
            .map_err(|e| StandbyError::File {
                action: "configuring",
                path: data.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
            service::perform(config, Action::Start)
                .await
                .map_err(|source| StandbyError::Service { step: "start", source })?;
            info!(%conninfo, slot = %up.slot, "stopped node started as a standby");
            Ok((true, conninfo))
        }
    }
}

/// Stops the server and leaves standby.signal so it cannot come back as a
/// primary. Idempotent.
pub async fn fence(config: &AgentConfig, pg: &Pg, immediate: bool) -> Result<(bool, ControlData), StandbyError> {
    let data = config.postgres.data_dir.clone();
    if !data.join("PG_VERSION").exists() {
        return Err(StandbyError::NoDataDir(data));
    }
    // The signal file first: should the stop half-fail and something
    // restart the server, it comes back read-only.
    {
        let d = data.clone();
        tokio::task::spawn_blocking(move || touch_standby_signal(&d))
            .await
            .map_err(|e| StandbyError::File {
                action: "creating",
                path: data.join("standby.signal"),
                source: std::io::Error::other(e.to_string()),
            })??;
    }
    let running = pg.status().await.is_ok() || service::status(config).await.state == ServiceState::Running;
    let mut stopped = false;
    if running {
        let result = if immediate {
            immediate_stop(config)
                .run()
                .await
                .and_then(|o| o.success(Path::new(config.service.backend_name())))
                .map(|_| ())
                .map_err(service::ServiceError::from)
        } else {
            service::perform(config, Action::Stop).await
        };
        if let Err(e) = result {
            // A server that died on its own (crash, SIGKILL) leaves a pid
            // file behind and pg_ctl may fail to signal it: what counts is
            // that nothing runs any more.
            warn!(error = %e, "stop failed; trying immediate");
            let second = immediate_stop(config)
                .run()
                .await
                .and_then(|o| o.success(Path::new(config.service.backend_name())));
            if let Err(e2) = second {
                let now = service::status(config).await;
                if now.state == ServiceState::Running || pg.status().await.is_ok() {
                    return Err(StandbyError::Command { step: "stop", source: e2 });
                }
                info!(detail = %now.detail, "server was already gone");
            }
        }
        stopped = true;
    }
    let after = service::status(config).await;
    if after.state == ServiceState::Running {
        return Err(StandbyError::StillRunning { detail: after.detail });
    }
    let cd = controldata::read(config)
        .await
        .map_err(|source| StandbyError::Command { step: "pg_controldata", source })?;
    info!(stopped, state = ?cd.cluster_state, checkpoint = ?cd.checkpoint_lsn, "fenced");
    Ok((stopped, cd))
}

/// Undoes our own fence of a primary that shut down cleanly.
pub async fn unfence(config: &AgentConfig, pg: &Pg) -> Result<(), StandbyError> {
    // A running server was never fenced, or was started since: a refusal,
    // not an "ok" in the audit log for something that did nothing.
    if pg.status().await.is_ok() {
        return Err(StandbyError::NotFenced);
    }
    let cd = controldata::read(config)
        .await
        .map_err(|source| StandbyError::Command { step: "pg_controldata", source })?;
    if cd.cluster_state.as_deref() != Some("shut down") {
        return Err(StandbyError::NotCleanPrimary {
            state: cd.cluster_state.unwrap_or_default(),
        });
    }
    let signal = config.postgres.data_dir.join("standby.signal");
    if signal.exists() {
        std::fs::remove_file(&signal).map_err(|source| StandbyError::File {
            action: "removing",
            path: signal.clone(),
            source,
        })?;
    }
    service::perform(config, Action::Start)
        .await
        .map_err(|source| StandbyError::Service { step: "start", source })?;
    warn!("fence undone: started again as a primary");
    Ok(())
}

/// Restart in place: starts again a primary whose postmaster died. Never
/// a server someone stopped ("shut down"), a standby, or a node pgfleet
/// fenced (standby.signal): those come back through rejoin or by hand.
pub async fn start_crashed(config: &AgentConfig, pg: &Pg) -> Result<String, StandbyError> {
    if pg.status().await.is_ok() {
        return Err(StandbyError::NotCrashed("PostgreSQL runs".into()));
    }
    for signal in ["standby.signal", "recovery.signal"] {
        if config.postgres.data_dir.join(signal).exists() {
            return Err(StandbyError::NotCrashed(format!(
                "{signal} is in the data directory: a fenced node or a standby comes back through `pgfleet rejoin`"
            )));
        }
    }
    let cd = controldata::read(config)
        .await
        .map_err(|source| StandbyError::Command { step: "pg_controldata", source })?;
    let state = cd.cluster_state.unwrap_or_default();
    if state != "in production" {
        return Err(StandbyError::NotCrashed(format!(
            "pg_controldata says {state:?}, not \"in production\": it did not crash as a primary"
        )));
    }
    service::perform(config, Action::Start)
        .await
        .map_err(|source| StandbyError::Service { step: "start", source })?;
    warn!("restarted in place after its postmaster died");
    Ok(state)
}

fn immediate_stop(config: &AgentConfig) -> Cmd {
    // The service backends' stop is fast; immediate is pg_ctl's own, which
    // every backend's host has in bin_dir.
    Cmd::new(config.pg_bin("pg_ctl"), config.rebuild.service_timeout)
        .arg("-D")
        .arg(&config.postgres.data_dir)
        .args(["-w", "-m", "immediate", "stop"])
}

pub async fn promote(pg: &Pg) -> Result<(u32, String), StandbyError> {
    if !pg.in_recovery().await? {
        return Err(StandbyError::NotStandby);
    }
    // pg_promote(wait => true) checks ten times a second; asking without
    // waiting and polling pg_is_in_recovery() every few milliseconds ends
    // the write-unavailability window sooner.
    let signalled: bool = pg
        .query_one("SELECT pg_promote(false)", &[])
        .await?
        .try_get(0)
        .map_err(PgError::from)?;
    if !signalled {
        return Err(StandbyError::PromoteTimeout);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(PROMOTE_WAIT_SECONDS as u64);
    while pg.in_recovery().await? {
        if tokio::time::Instant::now() >= deadline {
            return Err(StandbyError::PromoteTimeout);
        }
        tokio::time::sleep(PROMOTE_POLL).await;
    }
    let s = pg.status().await?;
    info!(timeline = ?s.timeline, "promoted");
    Ok((
        s.timeline.unwrap_or(0),
        s.current_lsn.map(|l| l.to_string()).unwrap_or_default(),
    ))
}

pub async fn create_slot(pg: &Pg, slot: &SlotName) -> Result<bool, StandbyError> {
    match pg
        .query(
            "SELECT pg_create_physical_replication_slot($1, true)",
            &[&slot.as_str()],
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.sqlstate() == Some(SqlState::DUPLICATE_OBJECT.code()) => {
            let active: bool = pg
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot.as_str()],
                )
                .await?
                .try_get(0)
                .map_err(PgError::from)?;
            if active {
                Err(StandbyError::SlotActive(slot.clone()))
            } else {
                Ok(false)
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// pg_rewind from the upstream; the role needs the function grants
/// PrepareUpstream gives with `rewind`.
pub async fn rewind(config: &AgentConfig, pg: &Pg, up: &Upstream) -> Result<Vec<String>, StandbyError> {
    if pg.status().await.is_ok() {
        return Err(StandbyError::RunningForRewind);
    }
    // A standby that crashed ("in archive recovery") is not rewound:
    // pg_rewind's single-user crash recovery would end its recovery with a
    // shutdown checkpoint of its own, on its upstream's timeline, at an LSN
    // where the upstream has other WAL, and it could never stream again
    // (found by the fault suite, seed 1000). Started as a standby it
    // recovers by itself; one that had followed an older timeline past the
    // new one's fork point will not stream and needs a rebuild, which the
    // rejoin's verify step reports.
    let cd = controldata::read(config)
        .await
        .map_err(|source| StandbyError::Command { step: "pg_controldata", source })?;
    if cd.cluster_state.as_deref() == Some("in archive recovery") {
        info!("no pg_rewind: the server crashed as a standby; it recovers by itself when started as one");
        return Ok(vec![
            "no pg_rewind: it crashed as a standby (\"in archive recovery\"), and recovers by itself as one".into(),
        ]);
    }
    // pg_rewind first runs single-user crash recovery on a target that was
    // not shut down cleanly, and single-user mode refuses standby.signal.
    // The node stays stopped meanwhile; configure() puts the file back
    // before it starts.
    let signal = config.postgres.data_dir.join("standby.signal");
    if signal.exists() {
        std::fs::remove_file(&signal).map_err(|source| StandbyError::File {
            action: "removing",
            path: signal.clone(),
            source,
        })?;
    }
    let tmp = passfile::TempPassfile::create(&up.host, up.port, &up.role, &up.password).map_err(|source| {
        StandbyError::File {
            action: "creating",
            path: std::env::temp_dir(),
            source,
        }
    })?;
    let source = format!(
        "host={} port={} user={} dbname=postgres connect_timeout=10",
        up.host, up.port, up.role
    );
    let program = config.pg_bin("pg_rewind");
    let mut cmd = Cmd::new(&program, REWIND_TIMEOUT);
    cmd = cmd.arg("--target-pgdata").arg(&config.postgres.data_dir);
    // Its single-user crash recovery reads postgresql.conf, which on
    // Debian's layout is under /etc/postgresql, not in the data directory.
    if let Some(conf) = config.server_config_file() {
        cmd = cmd.arg(format!("--config-file={}", conf.display()));
    }
    let out = cmd
        .arg(format!("--source-server={source}"))
        .arg("--progress")
        .env("PGPASSFILE", tmp.path())
        .die_with_agent()
        .run()
        .await
        .map_err(|source| StandbyError::Command { step: "pg_rewind", source })?;
    if !out.status.success() {
        return Err(StandbyError::Rewind {
            status: out.status.to_string(),
            tail: out.stderr_tail,
        });
    }
    info!("pg_rewind done");
    Ok(out.stderr_tail)
}
