//! How this coordinator reaches agents: its TLS client identity (the
//! inventory's `[tls]`) and, in a long-running `pgfleet serve`, the channel
//! it keeps per agent. A value every node of one inventory shares
//! ([`Inventory::attach_agents`](crate::inventory::Inventory::attach_agents)),
//! not process-global state: two inventories in one process (tests, a
//! reload) each reach their agents their own way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The coordinator's client identity and the fleet CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// The fleet CA certificate agents' certificates must chain to.
    pub ca: PathBuf,
    /// Our certificate (`pgfleet certs issue --role admin|reader`).
    pub cert: PathBuf,
    /// Its key (0600).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} may be read by other users (mode {mode:o}); chmod 600 it")]
    KeyReadable { path: PathBuf, mode: u32 },
}

#[derive(Debug, Default)]
pub struct AgentLink {
    tls: Option<ClientTlsConfig>,
    /// Kept channels by agent endpoint; None: a channel per call (the CLI
    /// runs one command and exits).
    channels: Option<Mutex<HashMap<String, Channel>>>,
}

impl AgentLink {
    /// Loads the client identity for https:// agents (its key must be
    /// private to its owner); `keep_channels` for a long-running process.
    pub fn new(tls: Option<&ClientTls>, keep_channels: bool) -> Result<Self, TlsSetupError> {
        Ok(AgentLink {
            tls: tls.map(load).transpose()?,
            channels: keep_channels.then(Default::default),
        })
    }

    pub fn tls(&self) -> Option<&ClientTlsConfig> {
        self.tls.as_ref()
    }

    pub fn kept(&self, endpoint: &str) -> Option<Channel> {
        let cache = self.channels.as_ref()?;
        cache.lock().unwrap_or_else(|p| p.into_inner()).get(endpoint).cloned()
    }

    /// Keeps `ch` for the next call (tonic reconnects a kept channel whose
    /// agent restarted); nothing when channels are not kept.
    pub fn keep(&self, endpoint: &str, ch: &Channel) {
        if let Some(cache) = &self.channels {
            cache.lock().unwrap_or_else(|p| p.into_inner()).insert(endpoint.to_owned(), ch.clone());
        }
    }
}

fn load(tls: &ClientTls) -> Result<ClientTlsConfig, TlsSetupError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsSetupError::Read { path: p.to_owned(), source });
    let mode = std::fs::metadata(&tls.key)
        .map_err(|source| TlsSetupError::Read { path: tls.key.clone(), source })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsSetupError::KeyReadable { path: tls.key.clone(), mode });
    }
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?)))
}
