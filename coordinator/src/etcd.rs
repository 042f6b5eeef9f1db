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
//! The journal is written before each step acts (DESIGN.md invariant 7):
//! every write here is awaited by the step that journals it, so a step
//! never acts before etcd acknowledged its line.

use std::sync::{Arc, Mutex};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions, SortOrder, SortTarget, TlsOptions, Txn,
    TxnOp,
};
use serde::Deserialize;

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
    /// TLS towards etcd (https:// endpoints): the CA etcd's certificates
    /// chain to, and this coordinator's client certificate and key when
    /// etcd asks for one (`--client-cert-auth`).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    /// Endpoints and TLS settings that go together, or what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("[etcd] endpoints is empty: list the etcd members' client URLs".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("[etcd] cert and key go together: set both (a client certificate) or neither".into());
        }
        if self.cert.is_some() && self.ca.is_none() {
            return Err("[etcd] cert and key need ca (the CA etcd's certificate chains to)".into());
        }
        let tls = self.ca.is_some();
        for e in &self.endpoints {
            let https = e.starts_with("https://");
            if tls && !https {
                return Err(format!(
                    "[etcd] endpoint {} is not https:// but ca is set: with TLS every endpoint is https://",
                    pgfleet_proto::shown(e)
                ));
            }
            if !tls && https {
                return Err(format!(
                    "[etcd] endpoint {} is https:// but no ca is set: add ca (and cert, key if etcd checks clients)",
                    pgfleet_proto::shown(e)
                ));
            }
        }
        Ok(())
    }
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

/// A connection to etcd and this process's lease, both made on first use,
/// and made again when the lease was lost.
pub struct EtcdStore {
    pub config: EtcdConfig,
    session: tokio::sync::Mutex<Option<Session>>,
    /// One client per member, made on first use. Requests go to one member
    /// at a time and move to the next when it fails: etcd-client's balanced
    /// channel kept sending to a member that was gone.
    members: tokio::sync::Mutex<Vec<Option<Client>>>,
    /// The member the last successful request went through.
    preferred: std::sync::atomic::AtomicUsize,
}

/// One lease and the client it was granted through. `valid_until` is when
/// etcd may let the lease expire at the earliest: the moment the last
/// successful keep-alive was *sent* plus the TTL etcd answered with, so
/// the round trip counts against us, never for us.
#[derive(Clone)]
struct Session {
    lease: i64,
    valid_until: Arc<Mutex<Instant>>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Session {
    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive(&self) -> bool {
        !self.lost.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < self.valid_until()
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// The connection options every client here uses: the request
    /// deadline (unless `waiting`: a campaign waits as long as it takes),
    /// and TLS, its files read when a connection is made.
    fn options(&self, waiting: bool) -> Result<ConnectOptions, EtcdError> {
        let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if !waiting {
            opts = opts.with_timeout(REQUEST_TIMEOUT);
        }
        if let Some(ca) = &self.config.ca {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| self.err(format!("TLS towards etcd: cannot read {}: {e}", p.display())));
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.config.cert, &self.config.key) {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key)
                    .map_err(|e| self.err(format!("TLS towards etcd: cannot read {}: {e}", key.display())))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(self.err(format!(
                        "TLS towards etcd: {} may be read by other users (mode {:o}); chmod 600 it",
                        key.display(),
                        mode & 0o777
                    )));
                }
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    pub fn new(config: EtcdConfig) -> Arc<Self> {
        let n = config.endpoints.len();
        Arc::new(EtcdStore {
            config,
            session: tokio::sync::Mutex::new(None),
            members: tokio::sync::Mutex::new(vec![None; n]),
            preferred: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> EtcdError {
        let mut message = e.to_string();
        // etcd run with --client-cert-auth drops a client without a
        // certificate in the handshake: say what is likely missing.
        const HINT: &str = " (with TLS and no client certificate: if etcd runs with --client-cert-auth, set cert and key in [etcd])";
        if self.config.ca.is_some() && self.config.cert.is_none() && message.contains("transport") && !message.contains(HINT) {
            message += HINT;
        }
        EtcdError {
            endpoints: self.config.endpoints.join(","),
            message,
        }
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.config.prefix.trim_end_matches('/'))
    }

    /// The client and this process's lease, kept alive in the background;
    /// a new lease when the last one was lost (etcd unreachable for longer
    /// than its TTL, or the lease revoked), so locks and leadership taken
    /// under the old one are never assumed to hold.
    pub async fn session(&self) -> Result<(Client, i64), EtcdError> {
        let lease = self.lease().await?;
        Ok((self.member(self.preferred()).await?, lease))
    }

    fn preferred(&self) -> usize {
        self.preferred.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client of member `i` (modulo their number), connected on first use.
    async fn member(&self, i: usize) -> Result<Client, EtcdError> {
        let mut members = self.members.lock().await;
        let i = i % members.len().max(1);
        if let Some(c) = members.get(i).and_then(Option::as_ref) {
            return Ok(c.clone());
        }
        let c = Client::connect(&self.config.endpoints[i..=i], Some(self.options(false)?))
            .await
            .map_err(|e| self.err(e))?;
        members[i] = Some(c.clone());
        Ok(c)
    }

    /// This process's live lease, granted (through whichever member
    /// answers) when there is none.
    async fn lease(&self) -> Result<i64, EtcdError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref()
            && s.alive()
        {
            return Ok(s.lease);
        }
        if let Some(s) = slot.take() {
            tracing::warn!(lease = s.lease, "the etcd lease was lost; taking a new one");
        }
        let ttl = self.config.lease_ttl.as_secs() as i64;
        let mut last = String::new();
        for k in 0..self.config.endpoints.len() {
            let i = self.preferred() + k;
            let mut c = self.member(i).await?;
            let sent = Instant::now();
            match c.lease_grant(ttl, None).await {
                Ok(granted) => {
                    self.preferred.store(i % self.config.endpoints.len(), std::sync::atomic::Ordering::Relaxed);
                    let session = Session {
                        lease: granted.id(),
                        valid_until: Arc::new(Mutex::new(sent + Duration::from_secs(granted.ttl().max(0) as u64))),
                        lost: Arc::default(),
                    };
                    tokio::spawn(keep_alive(session.clone(), self.config.endpoints.clone(), self.options(false)?, i, self.config.lease_ttl));
                    *slot = Some(session.clone());
                    return Ok(session.lease);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(self.err(format!("granting a lease: {last}")))
    }

    /// Until when this process's lease is sure to be alive in etcd (see
    /// [`Session`]); `None` when there is no live lease.
    pub async fn lease_valid_until(&self, lease: i64) -> Option<Instant> {
        let slot = self.session.lock().await;
        slot.as_ref().filter(|s| s.lease == lease && s.alive()).map(Session::valid_until)
    }

    /// A client without a request deadline, for calls that wait as long as
    /// they must (an election campaign waits for the current leader to go),
    /// through member `attempt` after the preferred one.
    pub async fn waiting_client(&self, attempt: usize) -> Result<Client, EtcdError> {
        let i = (self.preferred() + attempt) % self.config.endpoints.len().max(1);
        Client::connect(&self.config.endpoints[i..=i], Some(self.options(true)?)).await.map_err(|e| self.err(e))
    }

    /// Runs one etcd request with this process's client and lease, again
    /// (up to [`ATTEMPTS`] times, with a growing pause) when it fails: a
    /// member that just died, or a raft election in progress, fails a
    /// request that the next attempt, through another member, completes.
    /// Every request here is idempotent (puts of the same value, a lock
    /// that recognizes its own holder).
    async fn retrying<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client, i64) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let i = self.preferred() + attempt as usize - 1;
            let outcome = match (self.lease().await, self.member(i).await) {
                (Ok(lease), Ok(c)) => f(c, lease).await.map_err(|e| e.to_string()),
                (Err(e), _) | (_, Err(e)) => Err(e.message),
            };
            match outcome {
                Ok(v) => {
                    self.preferred.store(i % self.config.endpoints.len().max(1), std::sync::atomic::Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!(what, attempt, error = %e, "etcd request failed");
                    last = e;
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(RETRY_PAUSE * attempt).await;
            }
        }
        Err(self.err(format!("{what}: {last} (tried {ATTEMPTS} times)")))
    }

    /// The value the current leader of the election at `rest` campaigned
    /// with (the leader's URL), through whichever member answers.
    pub async fn election_leader(&self, rest: &str) -> Result<Option<String>, EtcdError> {
        let key = self.key(rest);
        self.retrying("asking who leads", |mut c, _| {
            let key = key.clone();
            async move {
                let r = c.leader(key).await?;
                Ok(r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_owned))
            }
        })
        .await
    }

    /// Takes `lock/CLUSTER` for `holder` unless someone holds it; returns
    /// the holder otherwise.
    pub async fn try_lock(&self, cluster: &str, holder: &str) -> Result<Result<(), String>, EtcdError> {
        let key = self.key(&format!("lock/{cluster}"));
        self.retrying("taking the cluster lock", |mut c, lease| {
            let key = key.clone();
            async move {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), holder, Some(PutOptions::new().with_lease(lease)))])
                    .or_else([TxnOp::get(key.clone(), None)]);
                if c.txn(txn).await?.succeeded() {
                    return Ok(Ok(()));
                }
                let now = c.get(key, None).await?;
                let held_by = now.kvs().first().and_then(|kv| kv.value_str().ok()).unwrap_or("unknown").to_owned();
                // An earlier attempt that took it, whose answer was lost.
                Ok(if held_by == holder { Ok(()) } else { Err(held_by) })
            }
        })
        .await
    }

    /// Releases `lock/CLUSTER` if `holder` still holds it.
    pub async fn unlock(&self, cluster: &str, holder: &str) -> Result<(), EtcdError> {
        let key = self.key(&format!("lock/{cluster}"));
        self.retrying("releasing the cluster lock", |mut c, _| {
            let key = key.clone();
            async move {
                let txn = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, holder)])
                    .and_then([TxnOp::delete(key, None)]);
                c.txn(txn).await?;
                Ok(())
            }
        })
        .await
    }

    pub async fn lock_holder(&self, cluster: &str) -> Result<Option<String>, EtcdError> {
        self.get(&format!("lock/{cluster}")).await
    }

    pub async fn get(&self, rest: &str) -> Result<Option<String>, EtcdError> {
        let key = self.key(rest);
        self.retrying("reading", |mut c, _| {
            let key = key.clone();
            async move {
                let r = c.get(key, None).await?;
                Ok(r.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_owned))
            }
        })
        .await
    }

    pub async fn put(&self, rest: &str, value: &str) -> Result<(), EtcdError> {
        let key = self.key(rest);
        self.retrying("writing", |mut c, _| {
            let key = key.clone();
            async move {
                c.put(key, value, None).await?;
                Ok(())
            }
        })
        .await
    }

    /// Every value under `rest`, in key order.
    pub async fn list(&self, rest: &str) -> Result<Vec<String>, EtcdError> {
        let key = self.key(rest);
        self.retrying("listing", |mut c, _| {
            let key = key.clone();
            async move {
                let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Ascend);
                let r = c.get(key, Some(opts)).await?;
                Ok(r.kvs().iter().filter_map(|kv| kv.value_str().ok()).map(str::to_owned).collect())
            }
        })
        .await
    }

    /// How many keys are under `rest`.
    pub async fn count(&self, rest: &str) -> Result<usize, EtcdError> {
        let key = self.key(rest);
        self.retrying("counting", |mut c, _| {
            let key = key.clone();
            async move {
                let r = c.get(key, Some(GetOptions::new().with_prefix().with_count_only())).await?;
                Ok(usize::try_from(r.count()).unwrap_or(0))
            }
        })
        .await
    }
}

/// How many times one etcd request is tried, and the pause after the first
/// failure (then twice, three times as long): with a request deadline of
/// [`REQUEST_TIMEOUT`], a request gives up after about 12 s.
const ATTEMPTS: u32 = 4;
const RETRY_PAUSE: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Renews the lease every third of its TTL. A keep-alive stream that
/// breaks (the member it ran through died) is opened again through the
/// client, which reaches the remaining members, until the lease could have
/// expired: then the session is marked lost and the next `session()` takes
/// a new lease.
async fn keep_alive(session: Session, endpoints: Vec<String>, opts: ConnectOptions, first: usize, ttl: Duration) {
    use std::sync::atomic::Ordering;
    let lease = session.lease;
    let every = ttl / 3;
    let mut member = first;
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    loop {
        if Instant::now() >= session.valid_until() {
            tracing::error!(lease, "the etcd lease may have expired unrenewed: locks and leadership under it are lost");
            session.lost.store(true, Ordering::SeqCst);
            return;
        }
        if stream.is_none() {
            // Through the next member each time: the last one may be gone.
            let i = member % endpoints.len().max(1);
            member += 1;
            let opened = tokio::time::timeout(every, async {
                let mut c = Client::connect(&endpoints[i..=i], Some(opts.clone())).await?;
                c.lease_keep_alive(lease).await
            })
            .await;
            match opened {
                Ok(Ok(s)) => {
                    member = i;
                    stream = Some(s);
                }
                Ok(Err(e)) => tracing::warn!(lease, member = %endpoints[i], error = %e, "cannot open the etcd lease keep-alive; trying another member"),
                Err(_) => tracing::warn!(lease, member = %endpoints[i], "opening the etcd lease keep-alive timed out; trying another member"),
            }
        }
        let mut renewed = false;
        if let Some((keeper, responses)) = stream.as_mut() {
            let sent = Instant::now();
            let answer = tokio::time::timeout(every, async {
                keeper.keep_alive().await?;
                responses.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    *session.valid_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        sent + Duration::from_secs(r.ttl() as u64);
                    renewed = true;
                }
                Ok(Ok(Some(_))) => {
                    tracing::error!(lease, "etcd says the lease is gone: locks and leadership under it are lost");
                    session.lost.store(true, Ordering::SeqCst);
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    tracing::warn!(lease, "the etcd lease keep-alive broke (a member gone?); reopening it");
                    stream = None;
                }
            }
        }
        tokio::time::sleep(if renewed { every } else { Duration::from_millis(200) }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &[&str], ca: bool, cert: bool, key: bool) -> EtcdConfig {
        let p = |b: bool, f: &str| b.then(|| PathBuf::from(f));
        EtcdConfig {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: default_prefix(),
            lease_ttl: default_ttl(),
            ca: p(ca, "/ca.crt"),
            cert: p(cert, "/c.crt"),
            key: p(key, "/c.key"),
        }
    }

    #[test]
    fn tls_settings_and_endpoints_must_agree() {
        assert!(config(&["http://e:2379"], false, false, false).check().is_ok());
        assert!(config(&["https://e:2379"], true, false, false).check().is_ok());
        assert!(config(&["https://e:2379"], true, true, true).check().is_ok());
        let e = config(&["http://e:2379"], true, false, false).check().unwrap_err();
        assert!(e.contains("not https://"), "{e}");
        let e = config(&["https://e:2379"], false, false, false).check().unwrap_err();
        assert!(e.contains("no ca"), "{e}");
        let e = config(&["https://e:2379"], true, true, false).check().unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = config(&["https://e:2379"], false, true, true).check().unwrap_err();
        assert!(e.contains("need ca"), "{e}");
        assert!(config(&[], false, false, false).check().is_err());
    }
}
