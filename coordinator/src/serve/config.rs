//! `coordinator.toml`: where `pgfleet serve` listens, its TLS identity, the
//! inventory it acts on and its audit log.
//!
//! ```toml
//! listen = "0.0.0.0:7400"
//! inventory = "/etc/pgfleet/inventory.toml"
//! audit_log = "/var/log/pgfleet/coordinator-audit.jsonl"
//! [tls]
//! ca = "/etc/pgfleet/tls/ca.crt"
//! cert = "/etc/pgfleet/tls/coordinator.crt"   # pgfleet certs issue --role agent
//! key = "/etc/pgfleet/tls/coordinator.key"
//! ```
//!
//! Plaintext only with `insecure = true`, and then only on loopback.
//! With several coordinators on one etcd store (`[etcd]` in the inventory),
//! `advertise = "https://coord1.example:7400"` is the address followers
//! hand out for the leader.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}; pass --config or set PGFLEET_COORDINATOR_CONFIG")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the inventory: {0}")]
    Inventory(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    #[serde(default = "default_inventory")]
    pub inventory: PathBuf,
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub tls: Option<pgfleet_proto::tls::ServerTlsFiles>,
    /// The URL clients reach this coordinator by, which followers hand out
    /// when several coordinators share an etcd store (default: https://
    /// or http:// and `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// A command told of every automatic decision (see `decisions`).
    #[serde(default)]
    pub hook: Option<super::decisions::HookConfig>,
}

fn default_inventory() -> PathBuf {
    PathBuf::from("/etc/pgfleet/inventory.toml")
}

impl ServeConfig {
    pub fn advertise_url(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| {
            format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.listen)
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let c: ServeConfig = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
        if let Some(h) = &c.hook {
            h.check().map_err(invalid)?;
        }
        match (&c.tls, c.insecure) {
            (Some(_), true) => Err(invalid("both [tls] and insecure = true: choose one".into())),
            (None, false) => Err(invalid(
                "no [tls] section: the coordinator serves mutual TLS (ca, cert, key); \
                 insecure = true allows plaintext on a loopback address only"
                    .into(),
            )),
            (None, true) if !c.listen.ip().is_loopback() => Err(invalid(format!(
                "insecure = true on {}: plaintext is only allowed on a loopback address; configure [tls]",
                c.listen
            ))),
            _ => Ok(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_or_loopback_plaintext_only() {
        let p = Path::new("c.toml");
        assert!(ServeConfig::parse("listen = \"127.0.0.1:7400\"\ninsecure = true", p).is_ok());
        let e = ServeConfig::parse("listen = \"0.0.0.0:7400\"\ninsecure = true", p).unwrap_err().to_string();
        assert!(e.contains("only allowed on a loopback"), "{e}");
        let e = ServeConfig::parse("listen = \"0.0.0.0:7400\"", p).unwrap_err().to_string();
        assert!(e.contains("no [tls] section"), "{e}");
        let ok = ServeConfig::parse(
            "listen = \"0.0.0.0:7400\"\n[tls]\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"",
            p,
        )
        .unwrap();
        assert_eq!(ok.inventory, PathBuf::from("/etc/pgfleet/inventory.toml"));
        assert!(ServeConfig::parse("listen = \"127.0.0.1:1\"\ninsecure = true\nbogus = 1", p).is_err());
    }

    #[test]
    fn a_hook_is_an_absolute_argv_with_a_bounded_timeout() {
        let p = Path::new("c.toml");
        let with = |hook: &str| ServeConfig::parse(&format!("listen = \"127.0.0.1:7400\"\ninsecure = true\n[hook]\n{hook}"), p);
        let ok = with("command = [\"/usr/local/bin/page\", \"--team\", \"db\"]").unwrap();
        let h = ok.hook.unwrap();
        assert_eq!(h.command, ["/usr/local/bin/page", "--team", "db"]);
        assert_eq!(h.timeout, std::time::Duration::from_secs(10));
        assert_eq!(with("command = [\"/bin/true\"]\ntimeout = \"2s\"").unwrap().hook.unwrap().timeout, std::time::Duration::from_secs(2));
        for (bad, says) in [
            ("command = []", "command is empty"),
            ("command = [\"page\"]", "absolute path"),
            ("command = \"/bin/sh -c 'page'\"", "sequence"),
            ("command = [\"/bin/true\"]\ntimeout = \"1h\"", "outside"),
            ("command = [\"/bin/true\"]\ntimeout = \"soon\"", "timeout"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
