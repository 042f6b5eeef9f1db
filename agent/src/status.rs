//! The node's status: PostgreSQL's own view, the service manager's, the
//! control file's when the server is down, and the disk. Gathered
//! concurrently; a stopped server is a status, not an error.

use std::path::Path;

use nix::sys::statvfs::statvfs;
use pgfleet_proto::major::Major;
use tracing::debug;

use crate::config::AgentConfig;
use crate::controldata::{self, ControlData};
use crate::pg::{Pg, ServerSnapshot};
use crate::service::{self, ServiceStatus};

#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// What PostgreSQL said, or why it could not be asked.
    pub server: Result<ServerSnapshot, String>,
    pub service: ServiceStatus,
    pub service_backend: &'static str,
    /// Read only when the server is down.
    pub control_data: Option<ControlData>,
    /// synchronous_standby_names from the configuration files, read only
    /// when the server is down.
    pub configured_sync: Option<String>,
    pub disk: Option<DiskSpace>,
    pub data_directory: String,
    pub hostname: String,
    /// A change running longer than [`crate::pg::SLOW_CHANGE`]: what, how long.
    pub slow_change: Option<(String, std::time::Duration)>,
    /// On a standby that does not stream: the server log's reason.
    pub wal_receiver_error: Option<String>,
    /// The data directory's major (PG_VERSION).
    pub data_major: Option<Major>,
    /// The configured programs' major.
    pub binaries_major: Option<Major>,
}

#[derive(Debug, Clone, Copy)]
pub struct DiskSpace {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

pub async fn gather(config: &AgentConfig, pg: &Pg, services: &service::StatusCache) -> NodeStatus {
    let data_dir = config.postgres.data_dir.clone();
    let disk = tokio::task::spawn_blocking(move || disk_space(&data_dir));
    let server = pg.status().await;
    let service = services.get(config, server.is_ok()).await;
    let not_streaming = server.as_ref().is_ok_and(|s| {
        s.in_recovery && s.wal_receiver.as_ref().is_none_or(|w| w.status != "streaming")
    });
    let wal_receiver_error = match config.server_log() {
        Some(log) if not_streaming => crate::server_log::last_replication_error(log).await,
        _ => None,
    };
    let server = server.map_err(|e| e.to_string());
    let (control_data, configured_sync) = match &server {
        Ok(_) => (None, None),
        Err(_) => {
            let (cd, sync) = tokio::join!(
                controldata::read(config),
                controldata::configured_setting(config, "synchronous_standby_names")
            );
            let cd = cd
                .map_err(|e| debug!(error = %e, "pg_controldata unavailable"))
                .ok()
                .map(|mut cd| {
                    // A server promoted and stopped (or crashed) before its
                    // first checkpoint on the new timeline still has the old
                    // one in its control file; the history file it wrote
                    // says where it was.
                    let history = controldata::latest_history(&config.postgres.data_dir);
                    cd.timeline = cd.timeline.max(history);
                    cd
                });
            (cd, sync.ok())
        }
    };
    NodeStatus {
        server,
        service,
        service_backend: config.service.backend_name(),
        control_data,
        configured_sync,
        disk: disk.await.ok().flatten(),
        data_directory: config.postgres.data_dir.display().to_string(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        slow_change: pg.slow_change(),
        wal_receiver_error,
        data_major: controldata::data_major(&config.postgres.data_dir),
        binaries_major: controldata::binaries_major(config).await,
    }
}

/// Space on the data directory's filesystem; its nearest existing ancestor
/// when the directory is not there (an empty node before its first rebuild).
pub fn disk_space(dir: &Path) -> Option<DiskSpace> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = statvfs(existing).ok()?;
    let frsize = st.fragment_size() as u64;
    Some(DiskSpace {
        free_bytes: (st.blocks_available() as u64).saturating_mul(frsize),
        total_bytes: (st.blocks() as u64).saturating_mul(frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_of_missing_dir_uses_ancestor() {
        let d = disk_space(Path::new("/tmp/does/not/exist/pgdata")).unwrap();
        assert!(d.total_bytes > 0 && d.free_bytes <= d.total_bytes);
    }
}
