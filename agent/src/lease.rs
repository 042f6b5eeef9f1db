//! The primary's lease (issue #14, DESIGN.md "The primary's lease").
//!
//! In an asynchronous cluster nothing in PostgreSQL stops a primary that is
//! cut off from everything: it takes writes from whoever still reaches it.
//! Before the coordinator promotes another node without the old primary's
//! agent answering, that primary must have stopped. So the leader renews a
//! lease on it every second, and should renewals stop, this module's
//! watchdog fences the server (immediate stop, standby.signal) at
//! `last renewal + ttl - FENCE_BUDGET`. The coordinator counts the ttl from
//! the moment the renewal's answer reached it, later than the agent's
//! receipt, so the agent is fenced before the coordinator may promote as
//! long as fencing takes less than the budget (an immediate stop takes
//! well under a second).
//!
//! The deadline is kept in a file beside the data directory (not in it:
//! pg_basebackup would copy it to every replica), as a wall-clock time, so
//! an agent restarted meanwhile (systemd, a crash) fences on time, and a
//! host rebooted after its failover comes back fenced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::AgentState;

pub use pgfleet_proto::lease::{FENCE_BUDGET, MAX_TTL, MIN_TTL};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("ttl_ms {0} is outside {min}..={max} (0 releases the lease)", min = MIN_TTL.as_millis(), max = MAX_TTL.as_millis())]
    Ttl(u32),
    #[error("cannot write the lease file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
}

/// Who holds the lease and when the server is fenced without a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub holder: String,
    pub fence_at: Instant,
}

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    holder: String,
    /// Wall clock: an Instant means nothing to the next process.
    fence_at_unix_ms: u64,
}

#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    held: watch::Sender<Option<Held>>,
}

impl Lease {
    /// The lease of the server in `data_dir`, kept in `DATA.pgfleet-lease`.
    pub fn new(data_dir: &Path) -> Lease {
        let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
        name.push(".pgfleet-lease");
        Lease { path: data_dir.with_file_name(name), held: watch::Sender::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lease as a previous agent process left it. A file that cannot be
    /// read is taken as a lease run out: the agent cannot tell when its
    /// holder stopped renewing, and a fence is the side that loses no data.
    pub fn load(&self) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                error!(path = %self.path.display(), error = %e, "cannot read the lease file: taking the lease as run out");
                self.held.send_replace(Some(Held { holder: "(unreadable lease file)".into(), fence_at: Instant::now() }));
                return;
            }
        };
        let (holder, fence_at) = match serde_json::from_str::<OnDisk>(&text) {
            Ok(d) => {
                let at = UNIX_EPOCH + Duration::from_millis(d.fence_at_unix_ms);
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                (d.holder, Instant::now() + left)
            }
            Err(e) => {
                error!(path = %self.path.display(), error = %e, "the lease file is not what this agent writes: taking the lease as run out");
                ("(unreadable lease file)".into(), Instant::now())
            }
        };
        info!(%holder, fence_in = ?fence_at.saturating_duration_since(Instant::now()), "lease kept from before this agent started");
        self.held.send_replace(Some(Held { holder, fence_at }));
    }

    /// Takes or renews the lease for `ttl`; the server is fenced
    /// `ttl - FENCE_BUDGET` from now without another renewal. Returns that
    /// time and whether the lease was taken (not held before).
    pub fn hold(&self, holder: &str, ttl_ms: u32) -> Result<(Duration, bool), LeaseError> {
        let ttl = Duration::from_millis(u64::from(ttl_ms));
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(LeaseError::Ttl(ttl_ms));
        }
        let fence_in = ttl - FENCE_BUDGET;
        let taken = self.held.borrow().is_none();
        let at = SystemTime::now() + fence_in;
        let disk = OnDisk {
            holder: holder.to_owned(),
            fence_at_unix_ms: at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        };
        // Written before the deadline moves: an agent restarted after this
        // answer must find at least this deadline. Synced when taken (a host
        // that loses power with a lease must come back knowing it); a
        // renewal only moves a deadline that is already on disk.
        write_atomically(&self.path, &serde_json::to_vec(&disk).unwrap_or_default(), taken)
            .map_err(|source| LeaseError::File { path: self.path.clone(), source })?;
        self.held.send_replace(Some(Held { holder: holder.to_owned(), fence_at: Instant::now() + fence_in }));
        if taken {
            info!(%holder, ?ttl, "lease taken: without a renewal this server is fenced in {fence_in:?}");
        }
        Ok((fence_in, taken))
    }

    /// Releases the lease; whether one was held.
    pub fn release(&self) -> Result<bool, LeaseError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LeaseError::File { path: self.path.clone(), source }),
        }
        let was = self.held.send_replace(None);
        if let Some(h) = &was {
            info!(holder = %h.holder, "lease released");
        }
        Ok(was.is_some())
    }

    pub fn held(&self) -> Option<Held> {
        self.held.borrow().clone()
    }
}

fn write_atomically(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The watchdog: sleeps until the lease's deadline (moved by every
/// renewal) and fences the server when it passes.
pub fn spawn_watchdog(state: Arc<AgentState>) {
    tokio::spawn(async move {
        let mut rx = state.lease.held.subscribe();
        loop {
            let held = rx.borrow_and_update().clone();
            match held {
                None => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                Some(h) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(h.fence_at.into()) => {
                            // A renewal that raced the timer wins.
                            if state.lease.held().is_some_and(|now| now.fence_at <= Instant::now()) {
                                run_out(&state, &h).await;
                            }
                        }
                        r = rx.changed() => if r.is_err() { return },
                    }
                }
            }
        }
    });
}

/// The lease ran out: a primary is fenced; a standby (the lease outlived a
/// switchover whose release did not arrive) has nothing to fence.
async fn run_out(state: &AgentState, h: &Held) {
    let was_primary = match state.pg.in_recovery().await {
        Ok(in_recovery) => !in_recovery,
        // Down or not answering: what its control file says it last ran
        // as. "in production" or "shut down" was a primary, which nothing
        // must start again as one.
        Err(_) => match crate::controldata::read(&state.config).await {
            Ok(cd) => !matches!(cd.cluster_state.as_deref(), Some("in archive recovery" | "shut down in recovery")),
            Err(e) => {
                warn!(error = %e, "lease ran out and pg_controldata cannot tell what the server ran as: fencing it");
                true
            }
        },
    };
    if !was_primary {
        info!(holder = %h.holder, "lease ran out on a standby: nothing to fence, released");
        let _ = state.lease.release();
        return;
    }
    error!(holder = %h.holder, "lease ran out: no renewal from the coordinator; fencing this primary (immediate stop, standby.signal) before it may promote another");
    match crate::standby::fence(&state.config, &state.pg, true).await {
        Ok((stopped, _)) => {
            error!(stopped, "fenced by its lease: this server takes no writes; it comes back through `pgfleet rejoin`");
            state.audit.record_event("LeaseRunOut", &h.holder, Ok(()));
            let _ = state.lease.release();
        }
        Err(e) => {
            // Tried again in a second: the lease stays run out.
            error!(error = %e, "fencing on the lease's expiry failed; trying again");
            state.audit.record_event("LeaseRunOut", &h.holder, Err(&e.to_string()));
            state.lease.held.send_replace(Some(Held { holder: h.holder.clone(), fence_at: Instant::now() + Duration::from_secs(1) }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_file_sits_beside_the_data_directory_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("pgfleet-lease-test-{}", std::process::id()));
        let data = dir.join("main");
        std::fs::create_dir_all(&data).unwrap();
        let lease = Lease::new(&data);
        assert_eq!(lease.path(), dir.join("main.pgfleet-lease"));
        assert!(matches!(lease.hold("c", 1000), Err(LeaseError::Ttl(1000))));
        let (fence_in, taken) = lease.hold("coordinator", 10_000).unwrap();
        assert!(taken && fence_in == Duration::from_secs(8));
        assert!(!lease.hold("coordinator", 10_000).unwrap().1);

        // The next agent process finds the same deadline, within the test's
        // own running time.
        let next = Lease::new(&data);
        next.load();
        let h = next.held().unwrap();
        assert_eq!(h.holder, "coordinator");
        let left = h.fence_at.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(6) && left <= Duration::from_secs(8), "{left:?}");

        assert!(next.release().unwrap());
        assert!(!dir.join("main.pgfleet-lease").exists());
        let again = Lease::new(&data);
        again.load();
        assert!(again.held().is_none());

        // Garbage is a lease run out, not no lease.
        std::fs::write(dir.join("main.pgfleet-lease"), "garbage").unwrap();
        let bad = Lease::new(&data);
        bad.load();
        assert!(bad.held().unwrap().fence_at <= Instant::now());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
