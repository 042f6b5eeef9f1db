//! The upstream's part of a rebuild (DESIGN.md, manual procedure step 1):
//! the replication role with its password, the pg_hba.conf line for the
//! replica's address, no stale slot of the replica's name; and the facts the
//! replica needs to check its copy (system identifier, size, tablespaces).

use std::net::IpAddr;
use std::path::PathBuf;

use pgfleet_proto::{NodeName, RoleName, SlotName};
use tracing::{info, warn};

use crate::hba::{self, ReplicationRule};
use crate::pg::{DropSlotError, Pg, PgError};
use crate::plan::{self, Step};
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(
        "slot {slot} is active on this node, held by a standby streaming from {holder_addr} as \
         application_name {holder_name:?}, not by {replica} ({replica_addr}); \
         stop that standby or choose another slot name with --slot"
    )]
    SlotActive {
        slot: SlotName,
        holder_addr: String,
        holder_name: String,
        replica: String,
        replica_addr: IpAddr,
    },
    #[error("dropping the stale slot {slot}: {source}")]
    DropStaleSlot {
        slot: SlotName,
        source: DropSlotError,
    },
    #[error("{action} {path}: {source}")]
    HbaFile {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "PostgreSQL rejects pg_hba.conf with the new line ({errors}); the file was put back unchanged"
    )]
    HbaRejected { errors: String },
    #[error("after reload, pg_hba_file_rules does not show the line {line:?}")]
    HbaNotLoaded { line: String },
    #[error(
        "this node is a standby and its catalog (replicated from the primary) has no role {0} with \
         LOGIN REPLICATION; the role is made on the primary (pgfleet rebuild or switchover prepare it there)"
    )]
    RoleNotReplicated(RoleName),
    #[error("role {0} is a superuser: a replication role must not be one; name another in the inventory's replication_role")]
    RoleIsSuperuser(RoleName),
}

/// What the coordinator asked for, validated.
#[derive(Debug, Clone)]
pub struct PrepareRequest {
    pub role: RoleName,
    pub password: Secret,
    pub replica_addr: IpAddr,
    pub slot: SlotName,
    /// The replica's node name (its application_name), if the caller gave it.
    pub replica_name: Option<NodeName>,
    /// The caller saw the replica's WAL receiver use the slot.
    pub replica_streams_through_slot: bool,
    pub dry_run: bool,
    /// Also let the replica run pg_rewind against this node.
    pub for_rewind: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub steps: Vec<Step>,
    pub role_created: bool,
    pub hba_line_added: bool,
    pub hba_line: String,
    pub hba_backup: Option<PathBuf>,
    pub stale_slot_dropped: bool,
    pub system_identifier: String,
    pub database_size_bytes: u64,
    pub tablespaces: Vec<TablespaceInfo>,
    pub in_recovery: bool,
    pub slot_held_by_replica: bool,
}

#[derive(Debug, Clone)]
pub struct TablespaceInfo {
    pub name: String,
    pub location: String,
    pub size_bytes: u64,
}

const FACTS_SQL: &str = "
SELECT (SELECT system_identifier::text FROM pg_control_system()),
       (SELECT sum(pg_database_size(oid))::int8 FROM pg_database),
       pg_is_in_recovery(),
       current_setting('hba_file')";

const TABLESPACES_SQL: &str = "
SELECT spcname::text, pg_tablespace_location(oid), pg_tablespace_size(oid)::int8
FROM pg_tablespace
WHERE spcname NOT IN ('pg_default', 'pg_global')
ORDER BY spcname";

pub async fn prepare(pg: &Pg, req: &PrepareRequest) -> Result<Prepared, UpstreamError> {
    let mut out = Prepared::default();
    let facts = pg.query_one(FACTS_SQL, &[]).await?;
    out.system_identifier = facts.try_get::<_, Option<String>>(0).map_err(PgError::from)?.unwrap_or_default();
    out.database_size_bytes = facts
        .try_get::<_, Option<i64>>(1)
        .map_err(PgError::from)?
        .map(|v| u64::try_from(v).unwrap_or(0))
        .unwrap_or(0);
    out.in_recovery = facts.try_get(2).map_err(PgError::from)?;
    let hba_path = PathBuf::from(facts.try_get::<_, String>(3).map_err(PgError::from)?);
    for row in pg.query(TABLESPACES_SQL, &[]).await? {
        out.tablespaces.push(TablespaceInfo {
            name: row.try_get(0).map_err(PgError::from)?,
            location: row.try_get(1).map_err(PgError::from)?,
            size_bytes: row
                .try_get::<_, Option<i64>>(2)
                .map_err(PgError::from)?
                .map(|v| u64::try_from(v).unwrap_or(0))
                .unwrap_or(0),
        });
    }

    ensure_role(pg, req, &mut out).await?;
    ensure_hba(pg, req, "replication", &hba_path, &mut out).await?;
    // pg_rewind's SQL connection, and a standby's slot sync worker (17+,
    // logical WAL), connect to a database, not for replication.
    if req.for_rewind || crate::slotsync::applies(pg).await? {
        ensure_hba(pg, req, crate::slotsync::DATABASE, &hba_path, &mut out).await?;
    }
    if req.for_rewind {
        grant_rewind(pg, req, &mut out).await?;
    } else {
        clear_stale_slot(pg, req, &mut out).await?;
    }
    Ok(out)
}

async fn ensure_role(pg: &Pg, req: &PrepareRequest, out: &mut Prepared) -> Result<(), UpstreamError> {
    if out.in_recovery {
        // A standby's catalog is the primary's, read-only: the role and its
        // password come from there. Only check that they came.
        let ready = !pg
            .query(
                "SELECT 1 FROM pg_roles WHERE rolname = $1 AND rolcanlogin AND rolreplication",
                &[&req.role.as_str()],
            )
            .await?
            .is_empty();
        out.steps.push(Step::new(
            "replication-role",
            format!("role {} (replicated from the primary) has LOGIN REPLICATION", req.role),
        ));
        if !ready {
            return Err(UpstreamError::RoleNotReplicated(req.role.clone()));
        }
        return Ok(());
    }
    let found = pg
        .query("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&req.role.as_str()])
        .await?;
    let exists = !found.is_empty();
    // Never hand a superuser's password to a standby's passfile, nor reset it.
    if found.first().map(|r| r.try_get::<_, bool>(0)).transpose().map_err(PgError::from)? == Some(true) {
        return Err(UpstreamError::RoleIsSuperuser(req.role.clone()));
    }
    let verb = if exists { "ALTER" } else { "CREATE" };
    // DDL takes no bind parameters; the password goes as a SCRAM verifier
    // computed here (what psql's \password does), so the server, its log and
    // its statistics never see the password itself. The role name is a
    // validated identifier, the verifier is base64 and '$'/':' only.
    let shown = format!(
        "{verb} ROLE {} WITH LOGIN REPLICATION PASSWORD '[SECRET]'",
        req.role.quoted()
    );
    out.steps.push(
        Step::new(
            "replication-role",
            if exists {
                format!("role {} exists: make sure it has LOGIN REPLICATION and the fleet's password", req.role)
            } else {
                format!("create role {} with LOGIN REPLICATION and the fleet's password", req.role)
            },
        )
        .sql(shown),
    );
    if req.dry_run {
        return Ok(());
    }
    let verifier = postgres_protocol::password::scram_sha_256(req.password.expose().as_bytes());
    let sql = format!(
        "{verb} ROLE {} WITH LOGIN REPLICATION PASSWORD '{verifier}'",
        req.role.quoted()
    );
    pg.query(&sql, &[]).await?;
    out.role_created = !exists;
    info!(role = %req.role, created = !exists, "replication role ready");
    Ok(())
}

/// EXECUTE on the functions pg_rewind calls on its source, so the
/// replication role needs no superuser (PostgreSQL docs, pg_rewind, Notes).
const REWIND_GRANTS: [&str; 4] = [
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
];

async fn grant_rewind(pg: &Pg, req: &PrepareRequest, out: &mut Prepared) -> Result<(), UpstreamError> {
    // Right after a promotion the control file still names the old timeline
    // until the (spread) end-of-recovery checkpoint finishes, and pg_rewind
    // would answer "no rewind required" (pg_rewind docs, Notes).
    out.steps.push(
        Step::new("checkpoint", "checkpoint so pg_control names the current timeline").sql("CHECKPOINT"),
    );
    if !req.dry_run {
        pg.query("CHECKPOINT", &[]).await?;
    }
    for f in REWIND_GRANTS {
        let sql = format!("GRANT EXECUTE ON FUNCTION {f} TO {}", req.role.quoted());
        out.steps.push(Step::new("rewind-grants", format!("let {} run pg_rewind's file functions", req.role)).sql(sql.clone()));
        if !req.dry_run {
            pg.query(&sql, &[]).await?;
        }
    }
    Ok(())
}

async fn ensure_hba(
    pg: &Pg,
    req: &PrepareRequest,
    database: &'static str,
    path: &std::path::Path,
    out: &mut Prepared,
) -> Result<(), UpstreamError> {
    let rule = ReplicationRule {
        database,
        role: req.role.clone(),
        addr: req.replica_addr,
    };
    if database == "replication" {
        out.hba_line = rule.line();
    }
    let io = |action: &'static str| {
        let path = path.to_owned();
        move |source| UpstreamError::HbaFile {
            action,
            path,
            source,
        }
    };
    let text = tokio::fs::read_to_string(path).await.map_err(io("reading"))?;
    if hba::has_rule(&text, &rule) {
        out.steps.push(Step::new(
            "hba",
            format!("{} already has: {}", path.display(), rule.line()),
        ));
        return Ok(());
    }
    out.steps.push(
        Step::new(
            "hba",
            format!(
                "add to {} (before its first rule, old file kept): {}; check pg_hba_file_rules; reload",
                path.display(),
                rule.line()
            ),
        )
        .sql("SELECT pg_reload_conf()"),
    );
    if req.dry_run {
        return Ok(());
    }
    let stamp = plan::file_stamp();
    let comment = format!("added by pgfleet {stamp} for replication from {}", req.replica_addr);
    let new_text = hba::with_rule(&text, &rule, &comment);
    let backup = {
        let (p, s) = (path.to_owned(), stamp.clone());
        tokio::task::spawn_blocking(move || hba::back_up(&p, &s))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(io("backing up"))?
    };
    write(path, new_text).await.map_err(io("writing"))?;
    // pg_hba_file_rules parses the file on disk, not the loaded rules: check
    // before reloading, so a line PostgreSQL rejects never goes live.
    let errors: Vec<String> = pg
        .query(
            "SELECT coalesce(line_number::text, '?') || ': ' || error \
             FROM pg_hba_file_rules WHERE error IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| r.try_get::<_, String>(0).ok())
        .collect();
    if !errors.is_empty() {
        warn!(?errors, "pg_hba.conf rejected, restoring");
        write(path, text).await.map_err(io("restoring"))?;
        return Err(UpstreamError::HbaRejected {
            errors: errors.join("; "),
        });
    }
    pg.query("SELECT pg_reload_conf()", &[]).await?;
    let loaded = pg
        .query(
            "SELECT 1 FROM pg_hba_file_rules \
             WHERE type = 'host' AND database = ARRAY[$3]::text[] AND user_name = ARRAY[$1]::text[] \
               AND address = $2 AND auth_method = 'scram-sha-256' AND error IS NULL",
            &[&req.role.as_str(), &req.replica_addr.to_string(), &database],
        )
        .await?;
    if loaded.is_empty() {
        return Err(UpstreamError::HbaNotLoaded { line: rule.line() });
    }
    info!(line = %rule.line(), backup = %backup.display(), "pg_hba.conf line added and reloaded");
    out.hba_line_added = true;
    out.hba_backup.get_or_insert(backup);
    Ok(())
}

async fn write(path: &std::path::Path, text: String) -> std::io::Result<()> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || hba::write_atomically(&p, &text))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

async fn clear_stale_slot(pg: &Pg, req: &PrepareRequest, out: &mut Prepared) -> Result<(), UpstreamError> {
    // Who holds the slot, if anyone: the WAL sender's client address and
    // application_name. The address alone cannot tell two instances on one
    // host apart (Debian's pg_createcluster makes exactly that), so the
    // name must match too.
    let rows = pg
        .query(
            "SELECT s.active, host(r.client_addr), r.application_name \
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&req.slot.as_str()],
        )
        .await?;
    let Some(row) = rows.first() else {
        out.steps.push(Step::new(
            "stale-slot",
            format!("no slot {} yet: pg_basebackup -C creates it", req.slot),
        ));
        return Ok(());
    };
    let active: bool = row.try_get(0).map_err(PgError::from)?;
    let holder: Option<String> = row.try_get(1).map_err(PgError::from)?;
    let holder_name: Option<String> = row.try_get(2).map_err(PgError::from)?;
    if active {
        let same_address = holder.as_deref().and_then(|h| h.parse::<IpAddr>().ok()) == Some(req.replica_addr);
        let same_name = req
            .replica_name
            .as_ref()
            .is_some_and(|n| holder_name.as_deref() == Some(n.as_str()));
        if !(same_address && (same_name || req.replica_streams_through_slot)) {
            return Err(UpstreamError::SlotActive {
                slot: req.slot.clone(),
                holder_addr: holder.unwrap_or_else(|| "an unknown address".into()),
                holder_name: pgfleet_proto::shown(holder_name.as_deref().unwrap_or("")),
                replica: req.replica_name.as_ref().map_or_else(|| "the node being rebuilt".into(), |n| n.to_string()),
                replica_addr: req.replica_addr,
            });
        }
        out.steps.push(Step::new(
            "stale-slot",
            format!(
                "slot {} is in use by the node being rebuilt ({}): it is released when that node stops, and dropped then",
                req.slot, req.replica_addr
            ),
        ));
        out.slot_held_by_replica = true;
        return Ok(());
    }
    out.steps.push(
        Step::new(
            "stale-slot",
            format!("drop the stale inactive slot {} (a new one is created by pg_basebackup -C)", req.slot),
        )
        .sql(format!("SELECT pg_drop_replication_slot('{}')", req.slot)),
    );
    if req.dry_run {
        return Ok(());
    }
    pg.drop_slot(&req.slot, false)
        .await
        .map_err(|source| UpstreamError::DropStaleSlot {
            slot: req.slot.clone(),
            source,
        })?;
    out.stale_slot_dropped = true;
    Ok(())
}
