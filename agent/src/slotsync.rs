//! Logical replication slots that survive a promotion (PostgreSQL 17 and
//! later, `wal_level = logical`): slots created with `failover = true` are
//! synchronized by each standby's slot sync worker, and the primary's
//! logical WAL senders wait for the synchronous standbys
//! (`synchronized_standby_slots`), so no consumer gets ahead of the node it
//! would be failed over to. On older majors, or without logical WAL, none of
//! this applies and nothing is changed. What differs by major is in
//! `pgfleet_proto::major`.

use pgfleet_proto::major::{FAILOVER_SLOTS_SQL, Major, SLOT_SYNC_STANDBY_SETTINGS};
use pgfleet_proto::sync::SyncSpec;
use tracing::info;

use crate::config::AgentConfig;
use crate::controldata;
use crate::pg::{Pg, PgError};

/// The database a standby's slot sync worker connects to (the `dbname` in
/// its primary_conninfo), and that its upstream's pg_hba.conf admits the
/// replication role to from the standby's address: the one pg_rewind's
/// connection uses too.
pub const DATABASE: &str = "postgres";

/// The running server's major.
async fn server_major(pg: &Pg) -> Result<Major, PgError> {
    let num: i32 = pg
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .try_get(0)?;
    Ok(Major::from_version_num(u32::try_from(num).unwrap_or(0)))
}

/// Whether failover slots apply to the running server: 17+ and
/// `wal_level = logical`.
pub async fn applies(pg: &Pg) -> Result<bool, PgError> {
    if !server_major(pg).await?.has_slot_failover() {
        return Ok(false);
    }
    let wal_level: String = pg.query_one("SELECT current_setting('wal_level')", &[]).await?.try_get(0)?;
    Ok(wal_level == "logical")
}

/// The same for a stopped server: its data directory's major and the
/// `wal_level` its configuration files set.
pub async fn applies_offline(config: &AgentConfig) -> bool {
    let major = controldata::data_major(&config.postgres.data_dir);
    if !major.is_some_and(Major::has_slot_failover) {
        return false;
    }
    matches!(controldata::configured_setting(config, "wal_level").await.as_deref(), Ok("logical"))
}

/// What a standby adds to its settings to synchronize failover slots.
pub fn standby_settings() -> Vec<(&'static str, String)> {
    SLOT_SYNC_STANDBY_SETTINGS.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// A logical slot with `failover = true` (17+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverSlot {
    pub name: String,
    /// Synchronized from the primary (on a standby).
    pub synced: bool,
    /// Usable after promoting this node.
    pub usable: bool,
}

/// The failover slots of this node. Empty where failover slots do not
/// exist (before 17).
pub async fn failover_slots(pg: &Pg) -> Result<Vec<FailoverSlot>, PgError> {
    if !server_major(pg).await?.has_slot_failover() {
        return Ok(Vec::new());
    }
    let rows = pg.query(FAILOVER_SLOTS_SQL, &[]).await?;
    rows.iter()
        .map(|r| {
            Ok(FailoverSlot {
                name: r.try_get(0)?,
                synced: r.try_get::<_, Option<bool>>(1)?.unwrap_or(false),
                usable: r.try_get::<_, Option<bool>>(2)?.unwrap_or(false),
            })
        })
        .collect()
}

/// Sets `synchronized_standby_slots` to the physical slots of `spec`'s
/// standbys (no reload: the caller reloads once for all its settings).
/// A standby's slot is the one its WAL sender streams through, else the
/// slot pgfleet gives it (its name, `-` as `_`), which a switchover makes
/// only when the standby follows: until then, and while a named standby is
/// gone, the logical WAL senders wait, as commits wait for a synchronous
/// standby. Returns the value set; `None` where failover slots do not
/// apply.
pub async fn set_standby_slots(pg: &Pg, spec: &SyncSpec) -> Result<Option<String>, PgError> {
    if !applies(pg).await? {
        return Ok(None);
    }
    let mut slots = Vec::new();
    for name in &spec.names {
        let streaming: Option<String> = pg
            .query(
                "SELECT s.slot_name::text FROM pg_stat_replication r
                   JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE r.application_name = $1 AND s.slot_type = 'physical' LIMIT 1",
                &[&name.as_str()],
            )
            .await?
            .first()
            .map(|r| r.try_get(0))
            .transpose()?;
        slots.push(streaming.unwrap_or_else(|| name.replace('-', "_")));
    }
    let value = slots.join(",");
    pg.query(&format!("ALTER SYSTEM SET synchronized_standby_slots = '{}'", value.replace('\'', "''")), &[])
        .await?;
    info!(synchronized_standby_slots = %value, "logical WAL senders wait for these standbys");
    Ok(Some(value))
}

/// `conninfo` with `dbname` added when it has none: the slot sync worker
/// connects to a database (the WAL receiver ignores it).
pub fn with_dbname(conninfo: &str, database: &str) -> String {
    if conninfo.split_whitespace().any(|kv| kv.starts_with("dbname=")) {
        return conninfo.to_owned();
    }
    format!("{conninfo} dbname={database}")
}

/// EnableSlotSync: on a running standby where failover slots apply, the
/// settings its slot sync worker needs, only those missing, then a reload.
/// Returns whether anything changed and what.
pub async fn enable(pg: &Pg) -> Result<(bool, String), PgError> {
    let major = server_major(pg).await?;
    if !major.has_slot_failover() {
        return Ok((false, format!("nothing to do: PostgreSQL {major} has no failover slots (17 and later)")));
    }
    let r = pg
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('wal_level'), current_setting('primary_conninfo')",
            &[],
        )
        .await?;
    let (in_recovery, wal_level, conninfo): (bool, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
    if wal_level != "logical" {
        return Ok((false, format!("nothing to do: wal_level is {wal_level}, logical slots need logical")));
    }
    if !in_recovery {
        return Ok((false, "nothing to do: a primary does not synchronize slots".into()));
    }
    let mut wanted = standby_settings();
    wanted.push(("primary_conninfo", with_dbname(&conninfo, DATABASE)));
    let mut changed = Vec::new();
    for (k, v) in wanted {
        let now: String = pg.query_one(&format!("SELECT current_setting('{k}')"), &[]).await?.try_get(0)?;
        if now != v {
            pg.query(&format!("ALTER SYSTEM SET {k} = '{}'", v.replace('\'', "''")), &[]).await?;
            changed.push(k);
        }
    }
    if changed.is_empty() {
        return Ok((false, "slot synchronization already on".into()));
    }
    pg.query("SELECT pg_reload_conf()", &[]).await?;
    info!(settings = ?changed, "slot synchronization on");
    Ok((true, format!("set {}; reloaded", changed.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbname_is_added_once() {
        assert_eq!(with_dbname("host=a port=5432", "postgres"), "host=a port=5432 dbname=postgres");
        assert_eq!(with_dbname("host=a dbname=app", "postgres"), "host=a dbname=app");
    }
}
