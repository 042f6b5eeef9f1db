//! The inventory: which clusters exist, their nodes, and where each node's
//! agent and PostgreSQL answer. A TOML file (README, "Inventory"):
//!
//! ```toml
//! [[clusters]]
//! name = "main"
//! [[clusters.nodes]]
//! name = "pg1"
//! agent = "http://10.0.0.11:7420"
//! host = "10.0.0.11"     # PostgreSQL address other nodes replicate from
//! port = 5432
//! ```
//!
//! A cluster may also say which role replicas connect as and where its
//! password lives (`replication_role`, `replication_password_file`), and pin
//! its `system_identifier`.

use std::collections::HashSet;
use std::sync::Arc;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfleet_proto::secret::Secret;

pub use crate::link::ClientTls;
use crate::link::{AgentLink, TlsSetupError};
use pgfleet_proto::{ClusterName, NodeName, RoleName};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}; pass --inventory or set PGFLEET_INVENTORY")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inventory {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("inventory {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone)]
pub struct Inventory {
    pub clusters: Vec<Cluster>,
    /// Where the coordinator keeps cluster locks, the operation journal and
    /// the last synchronous configuration of each cluster.
    pub state_dir: PathBuf,
    /// Mutual TLS towards https:// agents.
    pub tls: Option<ClientTls>,
    /// Files in state_dir, or etcd when the inventory has an [etcd] table.
    pub store: crate::journal::Store,
    /// The `pgfleet serve` the CLI sends its commands to (`--coordinator`
    /// overrides; `--coordinator local` runs in-process). `pgfleet serve`
    /// itself ignores it.
    pub coordinator: Option<String>,
}


#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: ClusterName,
    pub nodes: Vec<Node>,
    /// Role replicas connect as.
    pub replication_role: RoleName,
    /// File holding the replication password (0600 or stricter).
    pub replication_password_file: Option<PathBuf>,
    /// The cluster's system identifier, when pinned in the inventory.
    pub system_identifier: Option<String>,
    /// How long `pgfleet serve` must see the primary unreachable while no
    /// standby receives WAL from it before it declares it failed
    /// (`detect.rs`).
    pub failure_timeout: std::time::Duration,
    /// Whether `pgfleet serve` fails over by itself once it declared the
    /// primary failed (off unless the inventory says so).
    pub auto_failover: bool,
    /// A primary whose postmaster died while its agent answers is started
    /// again in place (once per node per `RESTART_WINDOW`) instead of
    /// waiting out the failure timeout and failing over.
    pub restart_in_place: bool,
    /// Bytes an automatic failover without proof (an asynchronous cluster)
    /// may lose: the candidate's distance from the old primary's last
    /// position seen. None: never.
    pub max_lag_on_failover: Option<u64>,
    /// The primary's lease (held when `max_lag_on_failover` lets an
    /// automatic failover promote without proof): without a renewal its
    /// agent fences it `lease_ttl - 2s` after the last one, and the
    /// coordinator takes it as fenced `lease_ttl` after the last renewal
    /// it saw answered.
    pub lease_ttl: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: NodeName,
    /// Agent gRPC endpoint, e.g. "http://10.0.0.11:7420".
    pub agent: String,
    /// PostgreSQL host other nodes connect to for replication.
    pub host: String,
    pub port: u16,
    /// Never promoted by a failover (automatic or not): a standby kept for
    /// reads, backups or another site.
    pub nofailover: bool,
    /// Among standbys that hold the same WAL, failover promotes the one
    /// with the highest priority (never one that has less: proof first).
    pub priority: u32,
    /// How its agent is reached: shared by every node of the inventory.
    pub link: Arc<AgentLink>,
}

/// Where and what, without the file's text: toml's own message quotes the
/// offending line, and a wrong `--inventory` (the replication password
/// file, say) must not be printed.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    format!("{}{}", at.unwrap_or_default(), pgfleet_proto::shown(e.message()))
}

impl Inventory {
    /// Loads the client TLS identity (`[tls]`) every node's agent is called
    /// with; `keep_channels` for a long-running coordinator.
    pub fn attach_agents(&mut self, keep_channels: bool) -> Result<(), TlsSetupError> {
        let link = Arc::new(AgentLink::new(self.tls.as_ref(), keep_channels)?);
        for n in self.clusters.iter_mut().flat_map(|c| c.nodes.iter_mut()) {
            n.link = link.clone();
        }
        Ok(())
    }
}

impl Node {
    /// The address this node's connections come from, as pg_hba.conf
    /// lines name it: `host` itself when it is an IP address, else what it
    /// resolves to.
    pub async fn address(&self) -> Option<std::net::IpAddr> {
        if let Ok(ip) = self.host.parse() {
            return Some(ip);
        }
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port)).await.ok()?;
        addrs.next().map(|a| a.ip())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    clusters: Vec<RawCluster>,
    /// Locks, journal and remembered sync settings.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    /// Client TLS identity for https:// agents.
    #[serde(default)]
    tls: Option<ClientTls>,
    /// Shared state for several coordinators.
    #[serde(default)]
    etcd: Option<crate::etcd::EtcdConfig>,
    /// Default `--coordinator` URL for the CLI.
    #[serde(default)]
    coordinator: Option<String>,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/pgfleet".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default)]
    nodes: Vec<RawNode>,
    /// Role replicas connect as.
    #[serde(default = "default_role")]
    replication_role: String,
    /// File with the replication password (PGFLEET_REPLICATION_PASSWORD overrides).
    #[serde(default)]
    replication_password_file: Option<PathBuf>,
    /// Pin the cluster's system identifier (decimal).
    #[serde(default)]
    system_identifier: Option<String>,
    /// E.g. "3s": see `Cluster::failure_timeout`.
    #[serde(default)]
    failure_timeout: Option<String>,
    #[serde(default)]
    auto_failover: bool,
    #[serde(default)]
    restart_in_place: bool,
    #[serde(default)]
    max_lag_on_failover: Option<u64>,
    /// E.g. "20s": see `Cluster::lease_ttl`.
    #[serde(default)]
    lease_ttl: Option<String>,
}

/// A cluster's duration setting ("3s"): its default when absent, else
/// parsed and within `min..=max`, or the error naming the cluster, the
/// setting, the bounds and `why` they are what they are.
fn bounded_duration(
    cluster: &ClusterName,
    setting: &str,
    text: Option<&str>,
    (default, min, max): (Duration, Duration, Duration),
    why: &str,
) -> Result<Duration, String> {
    let Some(t) = text else { return Ok(default) };
    let d = humantime::parse_duration(t).map_err(|e| {
        format!(
            "cluster {cluster}: {setting} {}: {e}; e.g. \"{}\"",
            pgfleet_proto::shown(t),
            humantime::format_duration(default)
        )
    })?;
    if d < min || d > max {
        return Err(format!(
            "cluster {cluster}: {setting} {} is outside {}..{}: {why}",
            pgfleet_proto::shown(t),
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// The default failure timeout: a dead primary is declared about this long
/// after the coordinator and its standbys last heard of it.
pub const DEFAULT_FAILURE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The default lease: long enough for a coordinator on etcd with its
/// default lease_ttl (10 s) to be replaced by another before any primary
/// fences itself (`serve::lease::check_timing`).
pub const DEFAULT_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(20);

fn default_role() -> String {
    "pgfleet_replication".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    /// Node name: a-z, 0-9, _ and -.
    name: String,
    /// Agent endpoint URL (http:// or https://).
    agent: String,
    /// PostgreSQL address of the node.
    host: String,
    /// PostgreSQL port.
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default)]
    nofailover: bool,
    #[serde(default)]
    priority: u32,
}

fn default_port() -> u16 {
    5432
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, InventoryError> {
        let raw: RawInventory = toml::from_str(text).map_err(|e| InventoryError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        let invalid = |message: String| InventoryError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut cluster_names = HashSet::new();
        let mut node_names = HashSet::new();
        let mut clusters = Vec::new();
        for rc in raw.clusters {
            let name = ClusterName::parse(&rc.name).map_err(|e| invalid(e.to_string()))?;
            if !cluster_names.insert(name.clone()) {
                return Err(invalid(format!("cluster {name} is listed twice")));
            }
            let mut nodes = Vec::new();
            for rn in rc.nodes {
                let node = NodeName::parse(&rn.name)
                    .map_err(|e| invalid(format!("cluster {name}: {e}")))?;
                // Node names are unique across the whole inventory so that
                // `pgfleet rebuild NODE` needs no cluster.
                if !node_names.insert(node.clone()) {
                    return Err(invalid(format!(
                        "node {node} is listed twice; node names must be unique across clusters"
                    )));
                }
                if !(rn.agent.starts_with("http://") || rn.agent.starts_with("https://")) {
                    return Err(invalid(format!(
                        "node {node}: agent {:?} must be a URL like http://10.0.0.11:7420",
                        rn.agent
                    )));
                }
                if rn.host.is_empty() || rn.host.chars().any(|c| c.is_whitespace() || c == '/') {
                    return Err(invalid(format!(
                        "node {node}: host {:?} must be a host name or IP address",
                        rn.host
                    )));
                }
                nodes.push(Node {
                    name: node,
                    agent: rn.agent,
                    host: rn.host,
                    port: rn.port,
                    nofailover: rn.nofailover,
                    priority: rn.priority,
                    link: Arc::default(),
                });
            }
            if nodes.is_empty() {
                return Err(invalid(format!("cluster {name} has no nodes")));
            }
            let replication_role = RoleName::parse(&rc.replication_role)
                .map_err(|e| invalid(format!("cluster {name}: replication_role: {e}")))?;
            if let Some(id) = &rc.system_identifier
                && (id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(invalid(format!(
                    "cluster {name}: system_identifier {id:?} must be decimal digits"
                )));
            }
            if let Some(f) = &rc.replication_password_file
                && !f.is_absolute()
            {
                return Err(invalid(format!(
                    "cluster {name}: replication_password_file {} must be an absolute path",
                    f.display()
                )));
            }
            let failure_timeout = bounded_duration(
                &name,
                "failure_timeout",
                rc.failure_timeout.as_deref(),
                (DEFAULT_FAILURE_TIMEOUT, Duration::from_secs(1), Duration::from_secs(600)),
                "shorter declares a primary failed on one slow look, longer leaves writes down for minutes",
            )
            .map_err(invalid)?;
            let lease_ttl = bounded_duration(
                &name,
                "lease_ttl",
                rc.lease_ttl.as_deref(),
                (DEFAULT_LEASE_TTL, pgfleet_proto::lease::MIN_TTL, pgfleet_proto::lease::MAX_TTL),
                "the agent fences its primary 2s before the lease runs out, and renewals come every second",
            )
            .map_err(invalid)?;
            clusters.push(Cluster {
                name,
                nodes,
                replication_role,
                replication_password_file: rc.replication_password_file,
                system_identifier: rc.system_identifier,
                failure_timeout,
                auto_failover: rc.auto_failover,
                restart_in_place: rc.restart_in_place,
                max_lag_on_failover: rc.max_lag_on_failover,
                lease_ttl,
            });
        }
        if clusters.is_empty() {
            return Err(invalid("no clusters defined; add a [[clusters]] table".into()));
        }
        if !raw.state_dir.is_absolute() {
            return Err(invalid(format!(
                "state_dir {} must be an absolute path",
                raw.state_dir.display()
            )));
        }
        let store = match raw.etcd {
            Some(e) => {
                e.check().map_err(invalid)?;
                crate::journal::Store::Etcd(crate::etcd::EtcdStore::new(e))
            }
            None => crate::journal::Store::Files(raw.state_dir.clone()),
        };
        Ok(Inventory {
            clusters,
            state_dir: raw.state_dir,
            tls: raw.tls,
            store,
            coordinator: raw.coordinator,
        })
    }

    /// The clusters selected by `--cluster` (all when `None`).
    pub fn select(&self, cluster: Option<&str>) -> Result<Vec<&Cluster>, UnknownName> {
        match cluster {
            None => Ok(self.clusters.iter().collect()),
            Some(c) => self
                .clusters
                .iter()
                .find(|k| k.name.as_str() == c)
                .map(|k| vec![k])
                .ok_or_else(|| UnknownName {
                    kind: "cluster",
                    name: c.to_owned(),
                    known: self.clusters.iter().map(|k| k.name.to_string()).collect(),
                }),
        }
    }

    /// A node by name, with its cluster.
    pub fn node(&self, name: &str) -> Result<(&Cluster, &Node), UnknownName> {
        self.clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(move |n| (c, n)))
            .find(|(_, n)| n.name.as_str() == name)
            .ok_or_else(|| UnknownName {
                kind: "node",
                name: name.to_owned(),
                known: self
                    .clusters
                    .iter()
                    .flat_map(|c| c.nodes.iter().map(|n| n.name.to_string()))
                    .collect(),
            })
    }
}

/// Why the replication password could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error(
        "no replication password for cluster {cluster}: set replication_password_file in the \
         inventory or PGFLEET_REPLICATION_PASSWORD (never a command-line flag)"
    )]
    Missing { cluster: String },
    #[error("cannot read the replication password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the replication password file {path} is readable by others (mode {mode:o}); \
         chmod 600 it"
    )]
    Unsafe { path: PathBuf, mode: u32 },
    #[error("the replication password of cluster {cluster} is empty or has a line break inside")]
    Invalid { cluster: String },
}

impl PasswordError {
    /// The coordinator's own setup is wrong: FAILED_PRECONDITION.
    pub fn code(&self) -> tonic::Code {
        tonic::Code::FailedPrecondition
    }
}

impl Cluster {
    /// The replication password: PGFLEET_REPLICATION_PASSWORD, else the
    /// cluster's password file (refused when group or others may read it).
    pub fn replication_password(&self) -> Result<Secret, PasswordError> {
        use std::os::unix::fs::PermissionsExt;
        let pw = match std::env::var("PGFLEET_REPLICATION_PASSWORD") {
            Ok(p) => p,
            Err(_) => {
                let Some(path) = &self.replication_password_file else {
                    return Err(PasswordError::Missing {
                        cluster: self.name.to_string(),
                    });
                };
                let read = |source| PasswordError::Read {
                    path: path.clone(),
                    source,
                };
                let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(PasswordError::Unsafe {
                        path: path.clone(),
                        mode: mode & 0o777,
                    });
                }
                let text = std::fs::read_to_string(path).map_err(read)?;
                text.strip_suffix('\n').unwrap_or(&text).to_owned()
            }
        };
        Secret::new(pw).map_err(|_| PasswordError::Invalid {
            cluster: self.name.to_string(),
        })
    }
}

/// A cluster or node the inventory does not have.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no {kind} named {name:?} in the inventory; known: {}", known.join(", "))]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
    pub known: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[clusters]]
        name = "main"
        [[clusters.nodes]]
        name = "pg1"
        agent = "http://10.0.0.11:7420"
        host = "10.0.0.11"
        [[clusters.nodes]]
        name = "pg2"
        agent = "http://10.0.0.12:7420"
        host = "10.0.0.12"
        port = 5433
    "#;

    #[test]
    fn a_parse_error_never_prints_the_file() {
        let e = Inventory::parse("s3cr3t-password-text\n", Path::new("pw")).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn failure_timeout_and_auto_failover_are_read_and_checked() {
        let inv = Inventory::parse(GOOD, Path::new("i.toml")).unwrap();
        assert_eq!(inv.clusters[0].failure_timeout, DEFAULT_FAILURE_TIMEOUT);
        assert!(!inv.clusters[0].auto_failover);
        let with = |extra: &str| GOOD.replacen("name = \"main\"", &format!("name = \"main\"\n{extra}"), 1);
        let inv = Inventory::parse(&with("failure_timeout = \"5s\"\nauto_failover = true"), Path::new("i.toml")).unwrap();
        assert_eq!(inv.clusters[0].failure_timeout, std::time::Duration::from_secs(5));
        assert!(inv.clusters[0].auto_failover);
        for bad in ["\"100ms\"", "\"1h\"", "\"soon\\nFORGED\""] {
            let e = Inventory::parse(&with(&format!("failure_timeout = {bad}")), Path::new("i.toml")).unwrap_err().to_string();
            assert!(e.contains("failure_timeout") && !e.contains('\n'), "{e}");
        }
        // The rest of the automatic-failover settings: off unless said.
        let c = &Inventory::parse(GOOD, Path::new("i.toml")).unwrap().clusters[0];
        assert!(!c.restart_in_place && c.max_lag_on_failover.is_none());
        assert!(c.nodes.iter().all(|n| !n.nofailover && n.priority == 0));
        let inv = Inventory::parse(&with("restart_in_place = true\nmax_lag_on_failover = 1048576"), Path::new("i.toml")).unwrap();
        assert!(inv.clusters[0].restart_in_place);
        assert_eq!(inv.clusters[0].max_lag_on_failover, Some(1_048_576));
        for bad in ["max_lag_on_failover = -1", "max_lag_on_failover = \"16MB\"", "restart_in_place = \"yes\""] {
            let e = Inventory::parse(&with(bad), Path::new("i.toml")).unwrap_err().to_string();
            // Where, in one line (toml's own message names the type).
            assert!(e.contains("line ") && !e.contains('\n'), "{bad}: {e}");
        }
        // The primary's lease: 20 s unless said, 4 s..10 min.
        assert_eq!(c.lease_ttl, DEFAULT_LEASE_TTL);
        let inv = Inventory::parse(&with("lease_ttl = \"30s\""), Path::new("i.toml")).unwrap();
        assert_eq!(inv.clusters[0].lease_ttl, std::time::Duration::from_secs(30));
        for bad in ["\"3s\"", "\"11m\"", "\"soon\""] {
            let e = Inventory::parse(&with(&format!("lease_ttl = {bad}")), Path::new("i.toml")).unwrap_err().to_string();
            assert!(e.contains("lease_ttl") && e.contains("main") && !e.contains('\n'), "{e}");
        }
        let node = GOOD.replacen("name = \"pg2\"", "name = \"pg2\"\nnofailover = true\npriority = 7", 1);
        let inv = Inventory::parse(&node, Path::new("i.toml")).unwrap();
        let (_, n) = inv.node("pg2").unwrap();
        assert!(n.nofailover && n.priority == 7);
    }

    #[test]
    fn parses_and_finds_nodes() {
        let inv = Inventory::parse(GOOD, Path::new("i.toml")).unwrap();
        let (c, n) = inv.node("pg2").unwrap();
        assert_eq!(c.name.as_str(), "main");
        assert_eq!(n.port, 5433);
        assert_eq!(inv.node("pg1").unwrap().1.port, 5432);
        let e = inv.node("pg9").unwrap_err().to_string();
        assert!(e.contains("pg9") && e.contains("pg1, pg2"), "{e}");
        assert!(inv.select(Some("nope")).is_err());
    }

    #[test]
    fn refuses_duplicates_bad_names_and_urls() {
        let dup = GOOD.replace("name = \"pg2\"", "name = \"pg1\"");
        let e = Inventory::parse(&dup, Path::new("i.toml")).unwrap_err().to_string();
        assert!(e.contains("pg1 is listed twice"), "{e}");
        let bad = GOOD.replace("name = \"pg2\"", "name = \"PG 2\"");
        let e = Inventory::parse(&bad, Path::new("i.toml")).unwrap_err().to_string();
        assert!(e.contains("invalid node name"), "{e}");
        let url = GOOD.replace("http://10.0.0.12:7420", "10.0.0.12:7420");
        let e = Inventory::parse(&url, Path::new("i.toml")).unwrap_err().to_string();
        assert!(e.contains("must be a URL"), "{e}");
        let e = Inventory::parse("", Path::new("i.toml")).unwrap_err().to_string();
        assert!(e.contains("no clusters"), "{e}");
    }
}
