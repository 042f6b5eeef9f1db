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

