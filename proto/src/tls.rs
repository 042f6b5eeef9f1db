//! TLS files: certificates and keys are read once at start-up and refused
//! when other users could read a key or change a certificate.

use std::path::PathBuf;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The `[tls]` table of the agent's and `pgfleet serve`'s configuration.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFiles {
    /// The fleet CA certificate (PEM): clients' certificates must chain to it.
    pub ca: PathBuf,
    /// This server's certificate (PEM), issued with `pgfleet certs issue --role agent`.
    pub cert: PathBuf,
    /// Its private key (PEM); refused unless only its owner may read it.
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} may be read by other users (mode {mode:o}): chmod 600 it, owned by the user the service runs as")]
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
pub fn server_tls(files: &ServerTlsFiles) -> Result<ServerTlsConfig, TlsFileError> {
    let cert = read_pem(&files.cert, false)?;
    let key = read_pem(&files.key, true)?;
    let ca = read_pem(&files.ca, false)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca)))
}


/// A connection whose TLS handshake succeeded: tonic reads the client's
/// certificate from it (`Request::peer_certs`).
pub type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// The rustls configuration of a server: our identity, client certificates
/// required and checked against the fleet CA, HTTP/2 only.
pub fn rustls_config(files: &ServerTlsFiles) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, TlsFileError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let bad = |path: &std::path::Path, what: String| TlsFileError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    };
    let certs = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
        let pem = read_pem(path, false)?;
        let v = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(path, format!("not a PEM certificate: {e}")))?;
        if v.is_empty() {
            return Err(bad(path, "no certificate in it".into()));
        }
        Ok(v)
    };
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem(&files.key, true)?)
        .map_err(|e| bad(&files.key, format!("not a PEM private key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca).map_err(|e| bad(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(&files.ca, format!("cannot check clients against it: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&files.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(&files.cert, format!("certificate and key do not go together: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections on `listener` (TCP_NODELAY: a small gRPC answer
/// otherwise waits ~40 ms for the client's delayed ACK), completes each TLS
/// handshake in its own task so a slow client holds up no one, and yields
/// those that succeed. Every refused handshake is logged with the peer's
/// address and why (a certificate of another CA, an expired one, none at
/// all, plaintext): tonic's own acceptor drops them without a word.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, yielded) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(conn)) => {
                        let _ = yielded.send(Ok(conn)).await;
                    }
                    // A connection closed before any TLS (a TCP health
                    // probe, a port scan) is not a refusal worth a warning.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(peer = %peer, "connection closed before a TLS handshake");
                    }
                    Ok(Err(e)) => tracing::warn!(peer = %peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::warn!(peer = %peer, "TLS handshake not completed within {}s: connection closed", HANDSHAKE_TIMEOUT.as_secs()),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
