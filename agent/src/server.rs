//! The gRPC server: the agent service, the standard health service and
//! server reflection (so grpcurl and friends can list and call it).

use std::sync::Arc;

use pgfleet_proto::agent::v1::agent_server::AgentServer;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tokio_stream::wrappers::TcpListenerStream;
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

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} may be read by other users (mode {mode:o}): chmod 600 it, owned by the agent's user")]
    KeyReadable { path: std::path::PathBuf, mode: u32 },
    #[error("{path} may be written by other users (mode {mode:o}): chmod 644 it")]
    Writable { path: std::path::PathBuf, mode: u32 },
}

/// Reads a PEM file, refusing a private key others may read and any file
/// others may write.
pub fn read_pem(path: &std::path::Path, private: bool) -> Result<Vec<u8>, TlsFileError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| TlsFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
    if private && mode & 0o077 != 0 {
        return Err(TlsFileError::KeyReadable {
            path: path.to_owned(),
            mode,
        });
    }
    if mode & 0o022 != 0 {
        return Err(TlsFileError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::read(path).map_err(read)
}

/// The server TLS configuration: our identity, and client certificates
/// required to chain to the fleet CA.
pub fn server_tls(tls: &crate::config::TlsConfig) -> Result<ServerTlsConfig, TlsFileError> {
    let cert = read_pem(&tls.cert, false)?;
    let key = read_pem(&tls.key, true)?;
    let ca = read_pem(&tls.ca, false)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca)))
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &state.config.tls {
        builder = builder.tls_config(server_tls(tls)?)?;
    }
    info!(listen = ?local, tls = state.config.tls.is_some(), version = crate::AGENT_VERSION, "pgfleet-agent serving");
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServer::new(AgentService::new(state)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    info!("pgfleet-agent stopped");
    Ok(())
}
