//! State in etcd, for several coordinators sharing one fleet (issue #7):
//! the journal, the cluster locks, the remembered sync settings and the
//! leader election of `pgfleet serve`. etcd does the consensus; pgfleet only
//! uses its transactions, leases and election API.
//!
//! Layout under the configured prefix (default `/pgfleet`):
//! - `journal/CLUSTER/OP/NNNNNN`: one journal line (JSON), in order;
//! - `lock/CLUSTER`: the running operation's holder line, attached to the
//!   holding process's lease: it vanishes when that process dies, which is
//!   how its operation reads as interrupted;
//! - `sync/CLUSTER`: the last synchronous_standby_names pgfleet set;
//! - `leader`: the election of `pgfleet serve` processes.
//!
//! The journal is written before each step acts (DESIGN.md invariant 7) and
//! the step code is synchronous, so writes wait on the runtime here
//! (`block_in_place`): a step never acts before etcd acknowledged its line.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use serde::Deserialize;
use tokio::sync::OnceCell;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. "http://10.0.0.5:2379".
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long a dead coordinator's lock and leadership outlive it.
    #[serde(default = "default_ttl", with = "humantime_serde_secs")]
    pub lease_ttl: Duration,
}

fn default_prefix() -> String {
    "/pgfleet".into()
}

fn default_ttl() -> Duration {
    Duration::from_secs(10)
}

/// `lease_ttl = "10s"`, whole seconds (etcd leases count seconds).
mod humantime_serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        let v = humantime::parse_duration(&s).map_err(serde::de::Error::custom)?;
        if v.as_secs() < 2 {
            return Err(serde::de::Error::custom("lease_ttl must be at least 2s"));
        }
        Ok(v)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoints}: {message}")]
pub struct EtcdError {
    pub endpoints: String,
    pub message: String,
}

/// A connection to etcd and this process's lease, both made on first use.
pub struct EtcdStore {
    pub config: EtcdConfig,
    session: OnceCell<(Client, i64)>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("config", &self.config)
            .field("lease", &self.session.get().map(|s| s.1))
            .finish()
    }
}

/// Runs `f` to completion from synchronous code inside the runtime.
///
/// The project bans block_in_place (clippy.toml) because it ties up a
/// worker; here it is the lesser evil until the journal API is async: a
/// journal line must be acknowledged before its step acts, the steps call
/// the journal synchronously, and block_in_place at least hands this
/// worker's other tasks to another one. Every etcd request has a 5 s
/// deadline, which bounds the stall.
#[allow(clippy::disallowed_methods)]
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

impl EtcdStore {
    pub fn new(config: EtcdConfig) -> Arc<Self> {
        Arc::new(EtcdStore {
            config,
            session: OnceCell::new(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> EtcdError {
        EtcdError {
            endpoints: self.config.endpoints.join(","),
            message: e.to_string(),
        }
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.config.prefix.trim_end_matches('/'))
    }

    /// The client and this process's lease (kept alive in the background
    /// for as long as the process lives).
    pub async fn session(&self) -> Result<(Client, i64), EtcdError> {
        let s = self
            .session
            .get_or_try_init(|| async {
                let opts = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(5));
                let mut client = Client::connect(&self.config.endpoints, Some(opts)).await.map_err(|e| self.err(e))?;
                let ttl = self.config.lease_ttl.as_secs() as i64;
                let lease = client.lease_grant(ttl, None).await.map_err(|e| self.err(e))?.id();
                let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(|e| self.err(e))?;
                let every = self.config.lease_ttl / 3;
                tokio::spawn(async move {
                    loop {
                        if keeper.keep_alive().await.is_err() {
                            tracing::error!(lease, "cannot renew the etcd lease: locks and leadership will expire");
                            return;
                        }
                        match responses.message().await {
                            Ok(Some(r)) if r.ttl() > 0 => {}
                            _ => {
                                tracing::error!(lease, "the etcd lease expired: locks and leadership are lost");
                                return;
                            }
                        }
                        tokio::time::sleep(every).await;
                    }
                });
                Ok::<_, EtcdError>((client, lease))
            })
            .await?;
        Ok(s.clone())
    }

    /// A client without a request deadline, for calls that wait as long as
    /// they must (an election campaign waits for the current leader to go).
    pub async fn waiting_client(&self) -> Result<Client, EtcdError> {
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
        Client::connect(&self.config.endpoints, Some(opts)).await.map_err(|e| self.err(e))
    }

    /// Takes `lock/CLUSTER` for `holder` unless someone holds it; returns
    /// the holder otherwise.
    pub fn try_lock(&self, cluster: &str, holder: &str) -> Result<Result<(), String>, EtcdError> {
        block(async {
            let (mut c, lease) = self.session().await?;
            let key = self.key(&format!("lock/{cluster}"));
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), holder, Some(PutOptions::new().with_lease(lease)))])
                .or_else([TxnOp::get(key.clone(), None)]);
            let r = c.txn(txn).await.map_err(|e| self.err(e))?;
            if r.succeeded() {
                return Ok(Ok(()));
            }
            let now = c.get(key, None).await.map_err(|e| self.err(e))?;
            Ok(Err(now
                .kvs()
                .first()
                .and_then(|kv| kv.value_str().ok())
                .unwrap_or("unknown")
                .to_owned()))
        })
    }

    /// Releases `lock/CLUSTER` if `holder` still holds it.
    pub fn unlock(&self, cluster: &str, holder: &str) -> Result<(), EtcdError> {
        block(async {
            let (mut c, _) = self.session().await?;
            let key = self.key(&format!("lock/{cluster}"));
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, holder)])
                .and_then([TxnOp::delete(key, None)]);
            c.txn(txn).await.map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    pub fn lock_holder(&self, cluster: &str) -> Result<Option<String>, EtcdError> {
        self.get(&format!("lock/{cluster}"))
    }

    pub fn get(&self, rest: &str) -> Result<Option<String>, EtcdError> {
        block(async {
            let (mut c, _) = self.session().await?;
            let r = c.get(self.key(rest), None).await.map_err(|e| self.err(e))?;
            Ok(r.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_owned))
        })
    }

    pub fn put(&self, rest: &str, value: &str) -> Result<(), EtcdError> {
        block(async {
            let (mut c, _) = self.session().await?;
            c.put(self.key(rest), value, None).await.map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    /// Every value under `rest`, in key order.
    pub fn list(&self, rest: &str) -> Result<Vec<String>, EtcdError> {
        block(async {
            let (mut c, _) = self.session().await?;
            let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Ascend);
            let r = c.get(self.key(rest), Some(opts)).await.map_err(|e| self.err(e))?;
            Ok(r.kvs().iter().filter_map(|kv| kv.value_str().ok()).map(str::to_owned).collect())
        })
    }

    /// How many keys are under `rest`.
    pub fn count(&self, rest: &str) -> Result<usize, EtcdError> {
        block(async {
            let (mut c, _) = self.session().await?;
            let r = c
                .get(self.key(rest), Some(GetOptions::new().with_prefix().with_count_only()))
                .await
                .map_err(|e| self.err(e))?;
            Ok(usize::try_from(r.count()).unwrap_or(0))
        })
    }
}
