//! The gRPC server: the agent service, the standard health service and
//! server reflection (so grpcurl and friends can list and call it).

use std::sync::Arc;

use pgfleet_proto::agent::v1::agent_server::AgentServer;
use tokio::net::TcpListener;
pub use pgfleet_proto::tls::{TlsFileError, read_pem};
use tracing::info;

use crate::AgentState;
use crate::grpc::AgentService;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsFileError),
}

/// Binds the configured address.
pub async fn bind(state: &AgentState) -> Result<TcpListener, ServeError> {
    let addr = state.config.listen;
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    state: Arc<AgentState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServer<AgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pgfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let local = listener.local_addr().ok();
    let tls = state.config.tls.as_ref().map(pgfleet_proto::tls::rustls_config).transpose()?;
    let postgres_major = crate::controldata::binaries_major(&state.config).await;
    info!(
        listen = ?local,
        tls = tls.is_some(),
        version = crate::AGENT_VERSION,
        postgres_major = postgres_major.map(u32::from),
        "pgfleet-agent serving"
    );
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServer::new(AgentService::new(state)));
    // With TLS, our acceptor (it logs refused handshakes); else TCP.
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(pgfleet_proto::tls::incoming(listener, tls), shutdown)
                .await?
        }
        None => router.serve_with_incoming_shutdown(incoming(listener), shutdown).await?,
    }
    info!("pgfleet-agent stopped");
    Ok(())
}

/// Accepted connections with TCP_NODELAY: a small gRPC answer otherwise
/// waits for the client's delayed ACK, about 40 ms per call (measured by
/// tests/bench/fleet_status.sh: 44 ms for one GetFleetStatus without, 0.7 ms
/// with).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
