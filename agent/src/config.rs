//! The agent's configuration file (`/etc/pgfleet/agent.toml`).
//!
//! Loaded once at start-up; every path the agent will touch comes from here,
//! never from a request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address and port the gRPC server listens on, e.g. "10.0.0.5:7420".
    pub listen: SocketAddr,
    /// Serve gRPC without TLS. Must be set explicitly, and only on a
    /// loopback address: without TLS there is no caller identity, and every
    /// caller is an admin.
    #[serde(default)]
    pub insecure: bool,
    /// Mutual TLS: the agent's certificate and key, and the fleet CA every
    /// client certificate must chain to.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Append one JSON line per changing call (time, caller, RPC, target,
    /// outcome) to this file.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// OS user the agent runs as. When started as root the agent switches to
    /// this user before doing anything else; PostgreSQL refuses root anyway.
    #[serde(default = "default_run_as")]
    pub run_as: String,
    /// The local PostgreSQL server.
    pub postgres: PostgresConfig,
    /// How PostgreSQL is started, stopped and asked for its state.
    pub service: ServiceConfig,
    /// Replica rebuilds on this host.
    #[serde(default)]
    pub rebuild: RebuildConfig,
}

/// The agent's `[tls]`: the same table `pgfleet serve` reads.
pub type TlsConfig = pgfleet_proto::tls::ServerTlsFiles;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildConfig {
    /// Directories the agent may write besides the data directory's parent:
    /// tablespace targets (and their moved-aside copies) must lie inside one.
    #[serde(default)]
    pub allowed_roots: Vec<PathBuf>,
    /// The lasting 0600 passfile pg_basebackup -R names in primary_conninfo;
    /// the standby reads it at every reconnect. Default:
    /// `<data_dir parent>/pgfleet-replication.pgpass`.
    #[serde(default)]
    pub passfile: Option<PathBuf>,
    /// Extra free space required beyond the upstream's size, in percent.
    #[serde(default = "default_space_margin")]
    pub free_space_margin_percent: u32,
    /// How long pg_basebackup may run.
    #[serde(default = "default_basebackup_timeout", with = "humantime_serde_compat")]
    pub basebackup_timeout: Duration,
    /// How long stopping or starting PostgreSQL may take.
    #[serde(default = "default_service_timeout", with = "humantime_serde_compat")]
    pub service_timeout: Duration,
    /// How long to wait for the rebuilt replica to be in recovery and streaming.
    #[serde(default = "default_ready_timeout", with = "humantime_serde_compat")]
    pub ready_timeout: Duration,
}

impl Default for RebuildConfig {
    fn default() -> Self {
        RebuildConfig {
            allowed_roots: Vec::new(),
            passfile: None,
            free_space_margin_percent: default_space_margin(),
            basebackup_timeout: default_basebackup_timeout(),
            service_timeout: default_service_timeout(),
            ready_timeout: default_ready_timeout(),
        }
    }
}

fn default_space_margin() -> u32 {
    10
}
fn default_basebackup_timeout() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_service_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_ready_timeout() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Directory with pg_ctl, pg_basebackup, pg_controldata, pg_rewind
    /// (Debian: /usr/lib/postgresql/15/bin, PGDG RPM: /usr/pgsql-15/bin).
    pub bin_dir: PathBuf,
    /// The data directory (Debian: /var/lib/postgresql/15/main, PGDG RPM:
    /// /var/lib/pgsql/15/data).
    pub data_dir: PathBuf,
    /// Directory of PostgreSQL's Unix socket; the agent connects through it
    /// (peer authentication as `user`).
    #[serde(default = "default_socket_dir")]
    pub socket_dir: PathBuf,
    /// Port PostgreSQL listens on (also names the Unix socket file).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Role the agent connects as; needs superuser or pg_monitor plus the
    /// rights of the operations it runs.
    #[serde(default = "default_pg_user")]
    pub user: String,
    /// Database the agent connects to.
    #[serde(default = "default_database")]
    pub database: String,
    /// How long a connection attempt to PostgreSQL may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// How long one query may take before the agent gives up on it (also
    /// the server-side statement_timeout and lock_timeout of its sessions).
    #[serde(default = "default_query_timeout", with = "humantime_serde_compat")]
    pub query_timeout: Duration,
    /// The server's log, read to say why a standby does not stream. Default:
    /// `pg_ctl`'s `log_file`; Debian's
    /// /var/log/postgresql/postgresql-VERSION-CLUSTER.log for
    /// `pg_ctlcluster` and `postgresql@VERSION-CLUSTER` units.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// The server's postgresql.conf when it is not in the data directory,
    /// for the programs that read it with the server down (`pg_rewind`'s
    /// crash recovery, `postgres -C`). Default: Debian's
    /// /etc/postgresql/VERSION/CLUSTER/postgresql.conf for `pg_ctlcluster`
    /// and `postgresql@VERSION-CLUSTER` units, else the data directory's.
    #[serde(default)]
    pub config_file: Option<PathBuf>,
}

/// Service control backend, chosen by `backend = "..."`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceConfig {
    /// `systemctl` on one unit, e.g. "postgresql@15-main". The packaged polkit
    /// rule lets the agent's user manage that unit only.
    Systemd {
        /// The PostgreSQL unit.
        unit: String,
        /// Path of systemctl.
        #[serde(default = "default_systemctl")]
        systemctl: PathBuf,
    },
    /// Debian's `pg_ctlcluster VERSION NAME`, for hosts without systemd.
    PgCtlcluster {
        /// Major version, e.g. "15".
        version: String,
        /// Cluster name, e.g. "main".
        cluster: String,
        /// Path of pg_ctlcluster.
        #[serde(default = "default_pg_ctlcluster")]
        pg_ctlcluster: PathBuf,
    },
    /// `pg_ctl` from bin_dir on the data directory; any host.
    PgCtl {
        /// Server log file passed to `pg_ctl -l`.
        log_file: PathBuf,
        /// Extra server options passed to `pg_ctl -o`, e.g.
        /// "-c config_file=/etc/postgresql/main.conf".
        #[serde(default)]
        options: Option<String>,
    },
}

impl AgentConfig {
    /// The server's postgresql.conf when it lives outside the data
    /// directory (see [`PostgresConfig::config_file`]).
    pub fn server_config_file(&self) -> Option<PathBuf> {
        if let Some(p) = &self.postgres.config_file {
            return Some(p.clone());
        }
        let (version, cluster) = self.debian_cluster()?;
        Some(PathBuf::from(format!("/etc/postgresql/{version}/{cluster}/postgresql.conf")))
    }

    /// Where the server writes its log, when it can be known (see
    /// [`PostgresConfig::log_file`]).
    pub fn server_log(&self) -> Option<PathBuf> {
        if let Some(p) = &self.postgres.log_file {
            return Some(p.clone());
        }
        if let ServiceConfig::PgCtl { log_file, .. } = &self.service {
            return Some(log_file.clone());
        }
        let (version, cluster) = self.debian_cluster()?;
        Some(PathBuf::from(format!("/var/log/postgresql/postgresql-{version}-{cluster}.log")))
    }

    /// VERSION and CLUSTER when the service is a Debian cluster: the
    /// `pg_ctlcluster` backend, or a `postgresql@VERSION-CLUSTER` unit.
    fn debian_cluster(&self) -> Option<(&str, &str)> {
        match &self.service {
            ServiceConfig::PgCtl { .. } => None,
            ServiceConfig::PgCtlcluster { version, cluster, .. } => Some((version, cluster)),
            ServiceConfig::Systemd { unit, .. } => debian_instance(unit),
        }
    }
}

/// VERSION and CLUSTER of Debian's `postgresql@VERSION-CLUSTER` unit.
fn debian_instance(unit: &str) -> Option<(&str, &str)> {
    let instance = unit.strip_prefix("postgresql@")?;
    let instance = instance.strip_suffix(".service").unwrap_or(instance);
    instance.split_once('-')
}

impl ServiceConfig {
    pub fn backend_name(&self) -> &'static str {
        match self {
            ServiceConfig::Systemd { .. } => "systemd",
            ServiceConfig::PgCtlcluster { .. } => "pg_ctlcluster",
            ServiceConfig::PgCtl { .. } => "pg_ctl",
        }
    }
}

fn default_run_as() -> String {
    "postgres".into()
}
fn default_socket_dir() -> PathBuf {
    "/var/run/postgresql".into()
}
fn default_port() -> u16 {
    5432
}
fn default_pg_user() -> String {
    "postgres".into()
}
fn default_database() -> String {
    "postgres".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_query_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_systemctl() -> PathBuf {
    "/usr/bin/systemctl".into()
}
fn default_pg_ctlcluster() -> PathBuf {
    "/usr/bin/pg_ctlcluster".into()
}

/// Durations written as humantime strings ("3s", "1m 30s").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        match (&self.tls, self.insecure) {
            (Some(_), true) => {
                return Err(invalid(
                    "both [tls] and `insecure = true` are set; remove one".into(),
                ));
            }
            (None, false) => {
                return Err(invalid(
                    "no [tls] section: configure mutual TLS (ca, cert, key), or set \
                     `insecure = true` to serve plaintext on a loopback address"
                        .into(),
                ));
            }
            (None, true) if !self.listen.ip().is_loopback() => {
                return Err(invalid(format!(
                    "`insecure = true` serves plaintext without caller identities; it is only allowed on a \
                     loopback address, not {}. Configure [tls] instead",
                    self.listen
                )));
            }
            _ => {}
        }
        if let Some(tls) = &self.tls {
            for (name, p) in [("tls.ca", &tls.ca), ("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if !p.is_absolute() {
                    return Err(invalid(format!("{name} must be an absolute path, got {}", p.display())));
                }
            }
        }
        for (name, p) in [
            ("postgres.bin_dir", &self.postgres.bin_dir),
            ("postgres.data_dir", &self.postgres.data_dir),
            ("postgres.socket_dir", &self.postgres.socket_dir),
        ] {
            if !p.is_absolute() {
                return Err(invalid(format!(
                    "{name} must be an absolute path, got {}",
                    p.display()
                )));
            }
        }
        for r in &self.rebuild.allowed_roots {
            if !r.is_absolute() {
                return Err(invalid(format!(
                    "rebuild.allowed_roots: {} must be an absolute path",
                    r.display()
                )));
            }
        }
        if self.postgres.data_dir.parent().is_none() {
            return Err(invalid("postgres.data_dir cannot be /".into()));
        }
        Ok(())
    }

    /// The directory holding the data directory: moved-aside copies and the
    /// rebuild log go there.
    pub fn data_parent(&self) -> &Path {
        // validate() refused a data_dir without parent.
        self.postgres.data_dir.parent().unwrap_or(Path::new("/"))
    }

    pub fn passfile(&self) -> PathBuf {
        self.rebuild
            .passfile
            .clone()
            .unwrap_or_else(|| self.data_parent().join("pgfleet-replication.pgpass"))
    }

    /// True when `p` (absolute, normalised) lies inside the data directory's
    /// parent or one of the allowed roots.
    pub fn path_allowed(&self, p: &Path) -> bool {
        std::iter::once(self.data_parent())
            .chain(self.rebuild.allowed_roots.iter().map(PathBuf::as_path))
            .any(|root| p.starts_with(root) && p != root)
    }

    /// Path of a PostgreSQL program in bin_dir.
    pub fn pg_bin(&self, program: &str) -> PathBuf {
        self.postgres.bin_dir.join(program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        listen = "127.0.0.1:7420"
        insecure = true
        [postgres]
        bin_dir = "/usr/lib/postgresql/15/bin"
        data_dir = "/var/lib/postgresql/15/main"
        [service]
        backend = "systemd"
        unit = "postgresql@15-main"
    "#;

    #[test]
    fn minimal_config_gets_debian_defaults() {
        let c = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        assert_eq!(c.postgres.port, 5432);
        assert_eq!(c.postgres.socket_dir, Path::new("/var/run/postgresql"));
        assert_eq!(c.run_as, "postgres");
        assert_eq!(c.service.backend_name(), "systemd");
        assert_eq!(c.postgres.connect_timeout, Duration::from_secs(3));
        // Debian's unit: its configuration and log are under /etc and /var/log.
        assert_eq!(
            c.server_config_file().unwrap(),
            Path::new("/etc/postgresql/15/main/postgresql.conf")
        );
        assert_eq!(
            c.server_log().unwrap(),
            Path::new("/var/log/postgresql/postgresql-15-main.log")
        );
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_refused() {
        let e = AgentConfig::parse(&format!("{MINIMAL}\nbogus = 1"), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let rel = MINIMAL.replace("/var/lib/postgresql/15/main", "data");
        let e = AgentConfig::parse(&rel, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("postgres.data_dir must be an absolute path"), "{e}");
    }

    #[test]
    fn plaintext_only_on_loopback() {
        let e = AgentConfig::parse(&MINIMAL.replace("127.0.0.1:7420", "10.0.0.5:7420"), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only allowed on a loopback address"), "{e}");
    }

    #[test]
    fn tls_section_parses() {
        let t = MINIMAL.replace(
            "insecure = true",
            "[tls]\nca = \"/etc/pgfleet/ca.crt\"\ncert = \"/etc/pgfleet/a.crt\"\nkey = \"/etc/pgfleet/a.key\"\n",
        );
        // [tls] before [postgres] keeps TOML tables apart.
        let t = t.replacen("listen = \"127.0.0.1:7420\"\n", "listen = \"10.0.0.5:7420\"\n", 1);
        let c = AgentConfig::parse(&t, Path::new("a.toml")).unwrap();
        assert!(c.tls.is_some() && !c.insecure);
    }

    #[test]
    fn plaintext_needs_explicit_opt_in() {
        let e = AgentConfig::parse(&MINIMAL.replace("insecure = true", ""), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("insecure = true"), "{e}");
    }
}
