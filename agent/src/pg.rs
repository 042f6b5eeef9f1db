//! Queries to the local PostgreSQL server.
//!
//! Two long-lived connections over the Unix socket (DESIGN.md invariant
//! 13): one for reads (status, replication, slots, WAL), one for changes
//! (roles, slots, settings, promotion). tokio-postgres pipelines the
//! queries of one connection, so a change stuck in PostgreSQL (a commit
//! waiting for synchronous replication, a lock) would hold every read
//! behind it on a shared one. Each connection is re-opened when PostgreSQL
//! went away or a query overran its deadline. Every statement carries a
//! server-side `statement_timeout` and `lock_timeout`; the change
//! connection runs with `synchronous_commit = local`, since what it does
//! (admit a standby, create its slot) is what synchronous replication may
//! be waiting for. Every value a caller supplies travels as a bind
//! parameter, never spliced into SQL text.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfleet_proto::{Lsn, SlotName};
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row};
use tracing::{debug, info, warn};

use crate::config::PostgresConfig;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL is not accepting connections on {socket}: {reason}")]
    Unavailable { socket: String, reason: String },
    #[error("query timed out after {}", humantime::format_duration(*after))]
    Timeout { after: Duration },
    #[error("PostgreSQL rejected the query{}: {message}", code.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
    Query {
        code: Option<String>,
        message: String,
    },
    #[error("PostgreSQL returned an unexpected value for {what}: {value}")]
    Unexpected { what: &'static str, value: String },
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            // A server message may span lines (a RAISE in a user's
            // trigger): one line for statuses, logs and tables.
            Some(db) => PgError::Query {
                code: Some(db.code().code().to_owned()),
                message: pgfleet_proto::one_line(db.message(), 400),
            },
            None => PgError::Query {
                code: None,
                message: pgfleet_proto::one_line(&e.to_string(), 400),
            },
        }
    }
}

impl PgError {
    pub(crate) fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Query { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// Which of the two connections a statement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Reads,
    Changes,
}

/// How much longer than the server-side statement_timeout the agent waits
/// for an answer before it gives up on the connection: the server cancels
/// first and says why.
const CLIENT_GRACE: Duration = Duration::from_secs(2);

/// A change that has run this long is reported by GetStatus.
pub const SLOW_CHANGE: Duration = Duration::from_secs(1);

/// One connection, opened on first use and after it broke.
#[derive(Debug)]
struct Conn {
    lane: Lane,
    client: Mutex<Option<Arc<Client>>>,
}

/// A statement running on the change connection, for GetStatus.
#[derive(Debug)]
struct RunningChange {
    id: u64,
    since: Instant,
    what: String,
}

/// The agent's connections to its PostgreSQL.
#[derive(Debug)]
pub struct Pg {
    config: PostgresConfig,
    reads: Conn,
    changes: Conn,
    running: std::sync::Mutex<(u64, Vec<RunningChange>)>,
}

/// Unregisters a running change when its query ends, however it ends.
struct ChangeGuard<'a> {
    pg: &'a Pg,
    id: u64,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.pg.running_lock();
        r.1.retain(|c| c.id != self.id);
    }
}

impl Pg {
    pub fn new(config: PostgresConfig) -> Self {
        Pg {
            config,
            reads: Conn {
                lane: Lane::Reads,
                client: Mutex::new(None),
            },
            changes: Conn {
                lane: Lane::Changes,
                client: Mutex::new(None),
            },
            running: std::sync::Mutex::new((0, Vec::new())),
        }
    }

    fn socket_display(&self) -> String {
        format!(
            "{}/.s.PGSQL.{}",
            self.config.socket_dir.display(),
            self.config.port
        )
    }

    fn running_lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<RunningChange>)> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The oldest statement still running on the change connection after
    /// [`SLOW_CHANGE`]: what it is (its first words, never its values) and
    /// for how long.
    pub fn slow_change(&self) -> Option<(String, Duration)> {
        let r = self.running_lock();
        r.1.iter()
            .map(|c| (c.what.clone(), c.since.elapsed()))
            .filter(|(_, age)| *age >= SLOW_CHANGE)
            .max_by_key(|(_, age)| *age)
    }

    /// Server options of a connection: the deadline PostgreSQL enforces
    /// itself, and for changes `synchronous_commit = local`.
    fn options(&self, lane: Lane) -> String {
        let ms = self.config.query_timeout.as_millis();
        let mut o = format!("-c statement_timeout={ms} -c lock_timeout={ms}");
        if lane == Lane::Changes {
            o.push_str(" -c synchronous_commit=local");
        }
        o
    }

    /// A live client of `conn`, connecting when there is none or the old
    /// one closed.
    async fn client(&self, conn: &Conn) -> Result<Arc<Client>, PgError> {
        // Held across the connect on purpose: concurrent callers wait for one
        // connection attempt instead of each opening their own.
        let mut slot = conn.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.config.socket_dir)
            .port(self.config.port)
            .user(&self.config.user)
            .dbname(&self.config.database)
            .application_name(match conn.lane {
                Lane::Reads => "pgfleet-agent",
                Lane::Changes => "pgfleet-agent-change",
            })
            .options(self.options(conn.lane))
            .connect_timeout(self.config.connect_timeout);
        let unavailable = |reason: String| PgError::Unavailable {
            socket: self.socket_display(),
            reason,
        };
        let connect = tokio::time::timeout(self.config.connect_timeout, cfg.connect(NoTls));
        let (client, connection) = match connect.await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(unavailable(connect_reason(&e))),
            Err(_) => return Err(unavailable("connection attempt timed out".into())),
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        info!(socket = %self.socket_display(), lane = ?conn.lane, "connected to PostgreSQL");
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn run(
        &self,
        conn: &Conn,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        let client = self.client(conn).await?;
        let after = self.config.query_timeout;
        match tokio::time::timeout(after + CLIENT_GRACE, client.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) if e.is_closed() => {
                // The server went away between connect and query: report it as
                // down, the next call reconnects.
                Err(PgError::Unavailable {
                    socket: self.socket_display(),
                    reason: "connection closed".into(),
                })
            }
            Ok(Err(e)) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                Err(PgError::Timeout { after })
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                // The statement may still hold the connection: what comes
                // next must not queue behind it.
                warn!(lane = ?conn.lane, "no answer within the deadline; reconnecting");
                let mut slot = conn.client.lock().await;
                if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                    *slot = None;
                }
                Err(PgError::Timeout { after })
            }
        }
    }

    /// A statement that may change something, on the change connection.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        let id = {
            let mut r = self.running_lock();
            r.0 += 1;
            let id = r.0;
            r.1.push(RunningChange {
                id,
                since: Instant::now(),
                what: statement_words(sql),
            });
            id
        };
        let _guard = ChangeGuard { pg: self, id };
        self.run(&self.changes, sql, params).await
    }

    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Row, PgError> {
        first_row(self.query(sql, params).await?)
    }

    /// A statement that only reads, on the read connection.
    async fn read(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        self.run(&self.reads, sql, params).await
    }

    async fn read_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Row, PgError> {
        first_row(self.read(sql, params).await?)
    }

    pub async fn status(&self) -> Result<ServerSnapshot, PgError> {
        let row = self.read_one(STATUS_SQL, &[]).await?;
        let in_recovery: bool = row.try_get(0)?;
        Ok(ServerSnapshot {
            in_recovery,
            version: row.try_get(1)?,
            version_num: parse_u32("server_version_num", row.try_get::<_, String>(2)?)?,
            system_identifier: row.try_get(3)?,
            current_lsn: lsn_opt(row.try_get(4)?)?,
            received_lsn: lsn_opt(row.try_get(5)?)?,
            replayed_lsn: lsn_opt(row.try_get(6)?)?,
            replay_delay_seconds: row.try_get(7)?,
            timeline: row
                .try_get::<_, Option<i64>>(8)?
                .and_then(|t| u32::try_from(t).ok()),
            wal_receiver: match row.try_get::<_, Option<String>>(9)? {
                None => None,
                Some(status) => Some(WalReceiverSnapshot {
                    status,
                    sender_host: row.try_get(10)?,
                    sender_port: row
                        .try_get::<_, Option<i32>>(11)?
                        .and_then(|p| u32::try_from(p).ok()),
                    slot_name: row.try_get(12)?,
                    received_timeline: row
                        .try_get::<_, Option<i32>>(13)?
                        .and_then(|t| u32::try_from(t).ok()),
                }),
            },
            data_directory: row.try_get(14)?,
            sync_rep_waiting: u64_opt(row.try_get(15)?).unwrap_or_default(),
            sync_rep_oldest_seconds: row.try_get(16)?,
            synchronous_standby_names: row.try_get(17)?,
        })
    }

    pub async fn standbys(&self) -> Result<Vec<StandbyRow>, PgError> {
        let rows = self.read(STANDBYS_SQL, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(StandbyRow {
                    pid: r.try_get(0)?,
                    application_name: r.try_get(1)?,
                    client_addr: r.try_get(2)?,
                    usename: r.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
                    state: r.try_get::<_, Option<String>>(4)?.unwrap_or_default(),
                    sent_lsn: lsn_opt(r.try_get(5)?)?,
                    write_lsn: lsn_opt(r.try_get(6)?)?,
                    flush_lsn: lsn_opt(r.try_get(7)?)?,
                    replay_lsn: lsn_opt(r.try_get(8)?)?,
                    replay_lag_bytes: u64_opt(r.try_get(9)?),
                    total_lag_bytes: u64_opt(r.try_get(10)?),
                    write_lag_seconds: r.try_get(11)?,
                    flush_lag_seconds: r.try_get(12)?,
                    replay_lag_seconds: r.try_get(13)?,
                    sync_state: r.try_get::<_, Option<String>>(14)?.unwrap_or_default(),
                    sync_priority: r.try_get::<_, Option<i32>>(15)?.unwrap_or_default(),
                })
            })
            .collect()
    }

    pub async fn slots(&self) -> Result<Vec<SlotRow>, PgError> {
        let rows = self.read(SLOTS_SQL, &[]).await?;
        rows.iter().map(slot_row).collect()
    }

    pub async fn in_recovery(&self) -> Result<bool, PgError> {
        Ok(self
            .read_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .try_get(0)?)
    }

    pub async fn wal(&self) -> Result<WalSnapshot, PgError> {
        let row = self.read_one(WAL_SQL, &[]).await?;
        let count = |i: usize| -> Result<u64, PgError> {
            Ok(u64_opt(row.try_get(i)?).unwrap_or_default())
        };
        Ok(WalSnapshot {
            in_recovery: row.try_get(0)?,
            current_lsn: lsn_opt(row.try_get(1)?)?,
            insert_lsn: lsn_opt(row.try_get(2)?)?,
            flush_lsn: lsn_opt(row.try_get(3)?)?,
            insert_walfile: row.try_get(4)?,
            write_walfile: row.try_get(5)?,
            flush_walfile: row.try_get(6)?,
            received_lsn: lsn_opt(row.try_get(7)?)?,
            replayed_lsn: lsn_opt(row.try_get(8)?)?,
            archived_count: count(9)?,
            last_archived_wal: row.try_get(10)?,
            last_archived_time: row.try_get(11)?,
            failed_count: count(12)?,
            last_failed_wal: row.try_get(13)?,
            last_failed_time: row.try_get(14)?,
            stats_reset: row.try_get(15)?,
            archive_mode: row.try_get(16)?,
        })
    }

    /// Drops one slot. An active slot is refused unless `force`: then the
    /// WAL sender holding it is terminated (waiting for it to exit) and the
    /// slot dropped at once; a standby that reconnects within milliseconds
    /// and takes the slot again gets its new sender terminated the same way,
    /// until `RELEASE_DEADLINE`.
    pub async fn drop_slot(&self, name: &SlotName, force: bool) -> Result<DroppedSlot, DropSlotError> {
        // Below the CLI's default call deadline (10 s), so the caller hears
        // this error rather than its own timeout.
        const RELEASE_DEADLINE: Duration = Duration::from_secs(5);
        // How long pg_terminate_backend waits for the sender to exit.
        const TERMINATE_WAIT_MS: i64 = 1000;

        let rows = self.query(SLOT_BY_NAME_SQL, &[&name.as_str()]).await?;
        let Some(slot) = rows.first().map(slot_row).transpose()? else {
            return Err(DropSlotError::NotFound(name.clone()));
        };
        if slot.active && !force {
            return Err(DropSlotError::Active {
                slot: name.clone(),
                pid: slot.active_pid,
            });
        }
        let mut terminated_sender = false;
        let mut holder = slot.active_pid.filter(|_| slot.active);
        let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
        loop {
            if let Some(pid) = holder {
                warn!(slot = %name, pid, "terminating the WAL sender holding the slot (forced drop)");
                self.query("SELECT pg_terminate_backend($1, $2)", &[&pid, &TERMINATE_WAIT_MS])
                    .await?;
                terminated_sender = true;
            }
            match self
                .query("SELECT pg_drop_replication_slot($1)", &[&name.as_str()])
                .await
            {
                Ok(_) => break,
                Err(e) if e.sqlstate() == Some(SqlState::UNDEFINED_OBJECT.code()) => {
                    return Err(DropSlotError::NotFound(name.clone()));
                }
                Err(e) if e.sqlstate() == Some(SqlState::OBJECT_IN_USE.code()) => {
                    if !force {
                        // Became active between our look and the drop.
                        return Err(DropSlotError::Active {
                            slot: name.clone(),
                            pid: None,
                        });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(DropSlotError::StillActive {
                            slot: name.clone(),
                            waited: RELEASE_DEADLINE,
                        });
                    }
                    // Someone holds it again: find and cut off the new holder.
                    holder = self
                        .query(SLOT_BY_NAME_SQL, &[&name.as_str()])
                        .await?
                        .first()
                        .map(slot_row)
                        .transpose()?
                        .and_then(|s| s.active_pid);
                    if holder.is_none() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        info!(slot = %name, released_wal_bytes = ?slot.retained_wal_bytes, "replication slot dropped");
        Ok(DroppedSlot {
            terminated_sender,
            released_wal_bytes: slot.retained_wal_bytes,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DropSlotError {
    #[error("no replication slot named {0} on this node")]
    NotFound(SlotName),
    #[error(
        "replication slot {slot} is active{}: a standby streams through it; \
         stop or re-point that standby first, or drop with --force to cut it off",
        pid.map(|p| format!(" (WAL sender PID {p})")).unwrap_or_default()
    )]
    Active { slot: SlotName, pid: Option<i32> },
    #[error("replication slot {slot} was still in use {} after its WAL sender was terminated (the standby reconnects); stop that standby first", humantime::format_duration(*waited))]
    StillActive { slot: SlotName, waited: Duration },
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl From<tokio_postgres::Error> for DropSlotError {
    fn from(e: tokio_postgres::Error) -> Self {
        DropSlotError::Pg(e.into())
    }
}

fn first_row(rows: Vec<Row>) -> Result<Row, PgError> {
    rows.into_iter().next().ok_or(PgError::Unexpected {
        what: "row count",
        value: "no row".into(),
    })
}

/// The first two words of a statement, e.g. "ALTER ROLE": enough to say
/// what is stuck, and never a value (a password comes later in the text).
fn statement_words(sql: &str) -> String {
    sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

fn connect_reason(e: &tokio_postgres::Error) -> String {
    // tokio-postgres puts the useful part (ENOENT on the socket, an auth
    // failure) in the source chain.
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn lsn_opt(s: Option<String>) -> Result<Option<Lsn>, PgError> {
    s.map(|s| {
        Lsn::parse(&s).map_err(|_| PgError::Unexpected {
            what: "an LSN",
            value: s,
        })
    })
    .transpose()
}

fn u64_opt(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

fn parse_u32(what: &'static str, s: String) -> Result<u32, PgError> {
    s.parse().map_err(|_| PgError::Unexpected { what, value: s })
}

fn slot_row(r: &Row) -> Result<SlotRow, PgError> {
    Ok(SlotRow {
        slot_name: r.try_get(0)?,
        slot_type: r.try_get(1)?,
        plugin: r.try_get(2)?,
        database: r.try_get(3)?,
        active: r.try_get(4)?,
        active_pid: r.try_get(5)?,
        restart_lsn: lsn_opt(r.try_get(6)?)?,
        retained_wal_bytes: u64_opt(r.try_get(7)?),
        wal_status: r.try_get(8)?,
        temporary: r.try_get(9)?,
    })
}

/// One round trip for the whole status. The CASEs keep recovery-only and
/// primary-only functions from running on the wrong kind of server
/// (pg_current_wal_lsn() raises an error during recovery).
const STATUS_SQL: &str = "
SELECT pg_is_in_recovery(),
       current_setting('server_version'),
       current_setting('server_version_num'),
       (SELECT system_identifier::text FROM pg_control_system()),
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END,
       CASE WHEN pg_is_in_recovery()
            THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END,
       CASE WHEN pg_is_in_recovery()
            THEN coalesce(r.received_tli, (SELECT timeline_id FROM pg_control_checkpoint()))::int8
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int8 END,
       r.status, r.sender_host, r.sender_port, r.slot_name, r.received_tli,
       current_setting('data_directory'),
       w.waiting, w.oldest_seconds,
       current_setting('synchronous_standby_names')
FROM (SELECT 1) AS one
CROSS JOIN (SELECT count(*)::int8 AS waiting,
                   extract(epoch FROM now() - min(query_start))::float8 AS oldest_seconds
            FROM pg_stat_activity WHERE wait_event = 'SyncRep') AS w
LEFT JOIN pg_stat_wal_receiver AS r ON true";

const STANDBYS_SQL: &str = "
SELECT pid, application_name, host(client_addr), usename::text, state,
       sent_lsn::text, write_lsn::text, flush_lsn::text, replay_lsn::text,
       greatest(pg_wal_lsn_diff(sent_lsn, replay_lsn), 0)::int8,
       greatest(pg_wal_lsn_diff(
           CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                ELSE pg_current_wal_lsn() END,
           replay_lsn), 0)::int8,
       extract(epoch FROM write_lag)::float8,
       extract(epoch FROM flush_lag)::float8,
       extract(epoch FROM replay_lag)::float8,
       sync_state, sync_priority
FROM pg_stat_replication
ORDER BY application_name, pid";

macro_rules! slots_select {
    () => {
        "
SELECT slot_name::text, slot_type, plugin::text, database::text, active, active_pid,
       restart_lsn::text,
       greatest(pg_wal_lsn_diff(
           CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                ELSE pg_current_wal_lsn() END,
           restart_lsn), 0)::int8,
       wal_status, temporary
FROM pg_replication_slots"
    };
}
const SLOTS_SQL: &str = concat!(slots_select!(), " ORDER BY slot_name");
const SLOT_BY_NAME_SQL: &str = concat!(slots_select!(), " WHERE slot_name = $1");

const WAL_SQL: &str = "
SELECT pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_insert_lsn()::text END,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_flush_lsn()::text END,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_insert_lsn()) END,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) END,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_flush_lsn()) END,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END,
       a.archived_count, a.last_archived_wal,
       to_char(a.last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
       a.failed_count, a.last_failed_wal,
       to_char(a.last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
       to_char(a.stats_reset AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
       current_setting('archive_mode')
FROM pg_stat_archiver AS a";

/// The server's own view of itself (one STATUS_SQL row).
#[derive(Debug, Clone)]
pub struct ServerSnapshot {
    pub in_recovery: bool,
    pub version: String,
    pub version_num: u32,
    pub system_identifier: Option<String>,
    pub current_lsn: Option<Lsn>,
    pub received_lsn: Option<Lsn>,
    pub replayed_lsn: Option<Lsn>,
    pub replay_delay_seconds: Option<f64>,
    pub timeline: Option<u32>,
    pub wal_receiver: Option<WalReceiverSnapshot>,
    pub data_directory: String,
    /// Sessions whose commit waits for synchronous replication (wait event
    /// `SyncRep`): writes that are blocked.
    pub sync_rep_waiting: u64,
    /// How long the oldest of them has waited (since its statement began).
    pub sync_rep_oldest_seconds: Option<f64>,
    /// The setting in force.
    pub synchronous_standby_names: String,
}

#[derive(Debug, Clone)]
pub struct WalReceiverSnapshot {
    pub status: String,
    pub sender_host: Option<String>,
    pub sender_port: Option<u32>,
    pub slot_name: Option<String>,
    pub received_timeline: Option<u32>,
}

/// One pg_stat_replication row.
#[derive(Debug, Clone)]
pub struct StandbyRow {
    pub pid: i32,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub usename: String,
    pub state: String,
    pub sent_lsn: Option<Lsn>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub replay_lag_bytes: Option<u64>,
    pub total_lag_bytes: Option<u64>,
    pub write_lag_seconds: Option<f64>,
    pub flush_lag_seconds: Option<f64>,
    pub replay_lag_seconds: Option<f64>,
    pub sync_state: String,
    pub sync_priority: i32,
}

/// One pg_replication_slots row.
#[derive(Debug, Clone)]
pub struct SlotRow {
    pub slot_name: String,
    pub slot_type: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<Lsn>,
    pub retained_wal_bytes: Option<u64>,
    pub wal_status: Option<String>,
    pub temporary: bool,
}

#[derive(Debug, Clone)]
pub struct WalSnapshot {
    pub in_recovery: bool,
    pub current_lsn: Option<Lsn>,
    pub insert_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub insert_walfile: Option<String>,
    pub write_walfile: Option<String>,
    pub flush_walfile: Option<String>,
    pub received_lsn: Option<Lsn>,
    pub replayed_lsn: Option<Lsn>,
    pub archived_count: u64,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<String>,
    pub failed_count: u64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<String>,
    pub stats_reset: Option<String>,
    pub archive_mode: String,
}

#[derive(Debug, Clone)]
pub struct DroppedSlot {
    pub terminated_sender: bool,
    pub released_wal_bytes: Option<u64>,
}
