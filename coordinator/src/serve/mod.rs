//! `pgfleet serve`: the coordinator as a service. The same library the CLI
//! runs in-process, behind gRPC (`pgfleet.coordinator.v1`) with mutual TLS,
//! the standard health service and server reflection. Operations run in
//! this process, journaled in the inventory's state_dir; their events are
//! kept in memory so any number of clients can watch them, from the start.

mod config;
mod convert;
pub mod decisions;
mod leader;
pub mod lease;
mod registry;
mod service;
mod watch_fleet;
mod watch_primary;

use std::path::Path;
use std::sync::Arc;

use pgfleet_proto::coordinator::v1::coordinator_server::CoordinatorServer;
use tracing::info;

pub use config::{ConfigError, ServeConfig};
pub use service::{ELECTION_HEADER, LEADER_HEADER};

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::inventory::Inventory;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] pgfleet_proto::tls::TlsFileError),
    #[error("TLS towards the agents: {0}")]
    ClientTls(#[from] crate::link::TlsSetupError),
    #[error("cannot open the audit log {path}: {source}")]
    Audit { path: std::path::PathBuf, source: std::io::Error },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Everything the service's handlers share.
#[derive(Debug)]
pub struct State {
    pub inventory: Inventory,
    pub deadlines: Deadlines,
    pub tls: bool,
    pub audit: pgfleet_proto::auth::Audit,
    pub registry: Arc<registry::Registry>,
    pub leadership: Arc<leader::Leadership>,
    /// Automatic decisions: logged, streamed by WatchFleet, given to the
    /// hook.
    pub decisions: decisions::Decisions,
    /// The primaries' leases this process renews (leader only).
    pub leases: lease::Leases,
}

pub async fn run(config_path: &Path, d: Deadlines) -> Result<(), CoordinatorError> {
    serve(config_path, d).await.map_err(|e| match e {
        ServeError::Config(c) => CoordinatorError::Usage(c.to_string()),
        ServeError::Tls(t) => CoordinatorError::Usage(format!("TLS: {t}")),
        ServeError::ClientTls(t) => CoordinatorError::Usage(format!("TLS towards the agents: {t}")),
        other => CoordinatorError::Usage(other.to_string()),
    })
}

async fn serve(config_path: &Path, d: Deadlines) -> Result<(), ServeError> {
    let config = ServeConfig::load(config_path)?;
    let mut inventory = Inventory::load(&config.inventory).map_err(|e| ConfigError::Inventory(e.to_string()))?;
    let takeover = match &inventory.store {
        crate::journal::Store::Etcd(e) => Some(e.config.lease_ttl),
        crate::journal::Store::Files(_) => None,
    };
    lease::check_timing(&inventory, takeover).map_err(ConfigError::Inventory)?;
    // One channel per agent, kept: a fleet status over a thousand agents
    // must not pay a thousand TLS handshakes each time.
    inventory.attach_agents(true)?;
    let server_tls = match &config.tls {
        Some(t) => Some(pgfleet_proto::tls::rustls_config(t)?),
        None => None,
    };
    let audit = pgfleet_proto::auth::Audit::open(config.audit_log.as_deref()).map_err(|source| ServeError::Audit {
        path: config.audit_log.clone().unwrap_or_default(),
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let store = inventory.store.clone();
    async fn report_interrupted(store: &crate::journal::Store) {
        let interrupted = crate::ops::store::load(store)
            .await
            .map(|ops| ops.into_iter().filter(|o| o.state == "interrupted").map(|o| o.id).collect::<Vec<_>>())
            .unwrap_or_default();
        for id in &interrupted {
            tracing::warn!(operation = %id, "interrupted operation in the journal: resume or abort it (pgfleet ops resume|abort)");
        }
    }
    let registry = Arc::new(registry::Registry::default());
    let leadership = match &store {
        crate::journal::Store::Etcd(e) => {
            // Followers are NOT_SERVING until elected, under the service's
            // name and "" alike (probes that ask for "" must not route to a
            // follower).
            health_reporter
                .set_not_serving::<CoordinatorServer<service::CoordinatorService>>()
                .await;
            health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            let (reporter, store, running) = (health_reporter.clone(), store.clone(), registry.clone());
            leader::Leadership::elect(e.clone(), config.advertise_url(), move |elected| {
                if !elected {
                    // No longer sure to lead: what can still stop, stops at
                    // its next safe point; what is past its point of no
                    // return finishes its steps (its journal writes fail if
                    // etcd is gone, and it then reads interrupted).
                    for op in running.unfinished() {
                        match op.cancel.request() {
                            Ok(()) => tracing::warn!(operation = %op.id, "leadership lost: the operation stops at its next safe point"),
                            Err(why) => tracing::warn!(operation = %op.id, %why, "leadership lost while the operation is past its point of no return: it finishes its steps"),
                        }
                    }
                }
                let (reporter, store) = (reporter.clone(), store.clone());
                tokio::spawn(async move {
                    let status = if elected {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter.set_service_status("", status).await;
                    if elected {
                        reporter.set_serving::<CoordinatorServer<service::CoordinatorService>>().await;
                        // A dead leader's operations show here: its lease is gone.
                        report_interrupted(&store).await;
                    } else {
                        reporter.set_not_serving::<CoordinatorServer<service::CoordinatorService>>().await;
                    }
                });
            })
        }
        crate::journal::Store::Files(_) => {
            report_interrupted(&store).await;
            health_reporter
                .set_serving::<CoordinatorServer<service::CoordinatorService>>()
                .await;
            leader::Leadership::single()
        }
    };
    let state = Arc::new(State {
        inventory,
        deadlines: d,
        tls: server_tls.is_some(),
        audit,
        registry,
        leadership,
        decisions: decisions::Decisions::new(config.hook.clone()),
        leases: lease::Leases::default(),
    });
    watch_primary::spawn(state.clone());
    lease::spawn(state.clone());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pgfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    info!(listen = %config.listen, tls = state.tls, "pgfleet serve: coordinator API serving");
    let _ = pgfleet_proto::notify::ready();
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(service::CoordinatorService::new(state.clone())));
    // With TLS, our acceptor (it logs refused handshakes); else TCP.
    match server_tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(pgfleet_proto::tls::incoming(listener, tls), shutdown())
                .await?
        }
        None => router.serve_with_incoming_shutdown(incoming(listener), shutdown()).await?,
    }
    let _ = pgfleet_proto::notify::stopping();
    // Stopped on purpose: its primaries must not fence themselves for it.
    lease::release_all(&state).await;
    info!("pgfleet serve stopped");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Accepted connections with TCP_NODELAY: a small gRPC answer otherwise
/// waits for the client's delayed ACK, about 40 ms per call (measured by
/// tests/bench/fleet_status.sh: 44 ms for one GetFleetStatus without, 0.7 ms
/// with).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
