//! pgfleet agent: runs beside one PostgreSQL server, as its OS user, and
//! does the host's part of every fleet operation over gRPC.
//!
//! Modules, one concept each:
//! - `config`: agent.toml
//! - `exec`: the only place external programs are started
//! - `pg`: queries to the local server
//! - `controldata`: pg_controldata, for a server that is down
//! - `service`: systemd / pg_ctlcluster / pg_ctl backends
//! - `status`: the node's status, gathered
//! - `upstream`, `hba`: the upstream's side of a rebuild (role, pg_hba.conf)
//! - `rebuild`, `basebackup`, `datadir`, `passfile`: the replica's side
//! - `jobs`, `plan`: long operations as watchable jobs, steps as data
//! - `lease`: the primary's lease and the watchdog that fences on its expiry
//! - `standby`: fence, promote, follow a new upstream, sync standbys, rewind
//! - `secret`: the password wrapper that never prints
//! - `cli`, `notify`: the daemon's arguments, systemd readiness (sd_notify)
//! - `grpc`, `server`, `error`: the RPC skin and its status codes

pub mod auth;
pub mod basebackup;
pub mod cli;
pub mod config;
pub mod controldata;
pub mod datadir;
pub mod error;
pub mod exec;
pub mod grpc;
pub mod hba;
pub mod jobs;
pub mod lease;
pub use pgfleet_proto::notify;
pub mod passfile;
pub mod pg;
pub mod plan;
pub mod rebuild;
pub mod secret;
pub mod server;
pub mod server_log;
pub mod slotsync;
pub mod snapshot;
pub mod service;
pub mod standby;
pub mod status;
pub mod supervise;
pub mod upstream;

use config::AgentConfig;
use pg::Pg;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What every request handler shares.
#[derive(Debug)]
pub struct AgentState {
    pub config: AgentConfig,
    pub pg: Pg,
    pub jobs: jobs::Jobs,
    pub audit: auth::Audit,
    pub service_status: service::StatusCache,
    /// GetStatus answers (see `snapshot`).
    pub snapshots: snapshot::Snapshots,
    /// The primary's lease (see `lease`).
    pub lease: lease::Lease,
}

impl AgentState {
    /// Fails only when the audit log cannot be opened: an agent that
    /// cannot record changes does not start.
    pub fn new(config: AgentConfig) -> std::io::Result<Self> {
        let pg = Pg::new(config.postgres.clone());
        let lease = lease::Lease::new(&config.postgres.data_dir);
        let audit = auth::Audit::open(config.audit_log.as_deref())?;
        Ok(AgentState {
            config,
            pg,
            jobs: jobs::Jobs::default(),
            audit,
            service_status: service::StatusCache::default(),
            snapshots: snapshot::Snapshots::default(),
            lease,
        })
    }
}
