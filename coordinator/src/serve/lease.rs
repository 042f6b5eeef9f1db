//! The primary's lease, the coordinator's side (DESIGN.md "The primary's
//! lease"). An asynchronous cluster whose automatic failover may promote
//! without proof (`max_lag_on_failover`) cannot fence a primary that is
//! cut off from everything by isolating it: its commits wait for nobody. So
//! the leader renews a lease on that primary's agent every second, in a task
//! of its own (never behind a slow look), and the agent fences its server
//! `ttl - FENCE_BUDGET` after the last renewal it received. The leader takes
//! the old primary as fenced `ttl` after the last renewal whose answer it
//! saw, which the agent received before: then, and not before, it may
//! promote another.
//!
//! The timing rule, checked at start-up ([`check_timing`]): a primary must
//! not fence itself while its coordinators are healthy, nor while a dead
//! leader is replaced. Renewals come every [`RENEW_EVERY`] and each waits at
//! most [`RENEW_LIMIT`]; a new leader is elected at most etcd's lease_ttl
//! after the last one could renew. So
//! `lease_ttl ≥ takeover + RENEW_EVERY + RENEW_LIMIT + FENCE_BUDGET`, where
//! takeover is etcd's lease_ttl with etcd, one more renewal interval
//! without (one lost renewal is survived).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{debug, info, warn};

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::lease::FENCE_BUDGET;

use crate::client;
use crate::inventory::{Cluster, Inventory};
use crate::serve::State;

/// How often the leader renews each lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A renewal not answered within this failed (the next one is tried).
pub const RENEW_LIMIT: Duration = Duration::from_secs(1);

/// Each cluster's lease, as this process holds it.
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<HashMap<String, Entry>>,
    /// Nodes whose lease is to be released (the primary moved, the cluster
    /// was paused), tried once.
    release: Mutex<Vec<(String, String)>>,
    /// Set by a graceful stop: nothing is held or renewed any more (the
    /// look loop would otherwise take a lease again after its release).
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
struct Entry {
    node: String,
    ttl: Duration,
    /// When the answer to the last successful renewal arrived.
    last_ok: Option<Instant>,
}

/// Where a cluster's lease on a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// This process never saw a renewal of it answered: it knows nothing
    /// of when the agent would fence.
    NotHeld,
    /// Its agent may still be running the server as a primary for `left`.
    Runs { left: Duration },
    /// Run out: the agent fenced its server (if it was alive to) `ago`.
    RunOut { ago: Duration },
}

impl Leases {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease of `c` is to be held on `node`: a lease on another node
    /// is released.
    pub fn want(&self, c: &Cluster, node: &str) {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut held = self.held();
        if let Some(e) = held.get(c.name.as_str())
            && e.node == node
            && e.ttl == c.lease_ttl
        {
            return;
        }
        if let Some(old) = held.insert(c.name.to_string(), Entry { node: node.to_owned(), ttl: c.lease_ttl, last_ok: None })
            && old.node != node
        {
            self.release.lock().unwrap_or_else(PoisonError::into_inner).push((c.name.to_string(), old.node));
        }
    }

    /// No lease for `c` any more (paused, not automatic, synchronous).
    pub fn unwant(&self, cluster: &str) {
        if let Some(old) = self.held().remove(cluster) {
            self.release.lock().unwrap_or_else(PoisonError::into_inner).push((cluster.to_owned(), old.node));
        }
    }

    pub fn standing(&self, cluster: &str, node: &str) -> Standing {
        let held = self.held();
        let Some(e) = held.get(cluster).filter(|e| e.node == node) else {
            return Standing::NotHeld;
        };
        let Some(ok) = e.last_ok else { return Standing::NotHeld };
        let until = ok + e.ttl;
        let now = Instant::now();
        if now >= until { Standing::RunOut { ago: now - until } } else { Standing::Runs { left: until - now } }
    }

    /// Forgets everything without releasing: the new leader renews.
    fn forget(&self) {
        self.held().clear();
        self.release.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// The renewal task: every [`RENEW_EVERY`] while this process leads, each
/// wanted lease renewed (concurrently: a dead host delays nobody else's),
/// each dropped one released.
pub fn spawn(state: Arc<State>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !state.leadership.is_leader() || state.leases.closed.load(std::sync::atomic::Ordering::SeqCst) {
                state.leases.forget();
                continue;
            }
            let wanted: Vec<(String, Entry)> = state.leases.held().iter().map(|(c, e)| (c.clone(), e.clone())).collect();
            let released = std::mem::take(&mut *state.leases.release.lock().unwrap_or_else(PoisonError::into_inner));
            let renewals = wanted.iter().map(|(cluster, e)| renew(cluster, &e.node, e.ttl, &state));
            let releases = released.iter().map(|(cluster, node)| release(cluster, node, &state));
            futures::future::join(join_all(renewals), join_all(releases)).await;
        }
    });
}

/// One HoldLease call (ttl 0 releases), within [`RENEW_LIMIT`]; None when
/// it was not answered in time.
async fn hold(state: &State, node: &str, ttl: Duration) -> Option<Result<pb::HoldLeaseResponse, client::AgentCallError>> {
    let (_, n) = state.inventory.node(node).ok()?;
    let req = pb::HoldLeaseRequest { ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX) };
    tokio::time::timeout(RENEW_LIMIT, client::call(n, state.deadlines, async |a| a.hold_lease(req).await)).await.ok()
}

async fn renew(cluster: &str, node: &str, ttl: Duration, state: &State) {
    match hold(state, node, ttl).await {
        Some(Ok(r)) => {
            let now = Instant::now();
            let mut held = state.leases.held();
            if let Some(e) = held.get_mut(cluster).filter(|e| e.node == node) {
                if e.last_ok.is_none() || r.taken {
                    info!(%cluster, %node, ?ttl, fence_in_ms = r.fence_in_ms, "lease held on the primary: it fences itself without renewals");
                }
                e.last_ok = Some(now);
            }
        }
        Some(Err(e)) => warn!(%cluster, %node, error = %e, "lease renewal refused or failed"),
        None => debug!(%cluster, %node, "lease renewal not answered within {RENEW_LIMIT:?}"),
    }
}

async fn release(cluster: &str, node: &str, state: &State) {
    match hold(state, node, Duration::ZERO).await {
        Some(Ok(_)) => info!(%cluster, %node, "lease released"),
        // Its agent finds it run out on a standby, or fences a primary
        // nobody renews: either way nothing is left holding writes open.
        Some(Err(e)) => warn!(%cluster, %node, error = %e, "lease release failed: it runs out on its own"),
        None => warn!(%cluster, %node, "lease release not answered: it runs out on its own"),
    }
}

/// Releases every lease this process holds (a graceful stop: its primaries
/// must not fence themselves because it went away on purpose).
pub async fn release_all(state: &State) {
    if !state.leadership.is_leader() {
        return;
    }
    state.leases.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    let held: Vec<(String, String)> = state.leases.held().drain().map(|(c, e)| (c, e.node)).collect();
    if held.is_empty() {
        return;
    }
    // A renewal already sent must not land after its release.
    tokio::time::sleep(RENEW_LIMIT).await;
    join_all(held.iter().map(|(c, n)| release(c, n, state))).await;
}

/// The timing rule (module documentation), for every cluster that may
/// hold a lease; `takeover` is etcd's lease_ttl, None without etcd.
pub fn check_timing(inventory: &Inventory, takeover: Option<Duration>) -> Result<(), String> {
    let (takeover, what) = match takeover {
        Some(t) => (t, format!("etcd's lease_ttl {}", humantime::format_duration(t))),
        None => (RENEW_EVERY, "one lost renewal (1s)".to_owned()),
    };
    let least = takeover + RENEW_EVERY + RENEW_LIMIT + FENCE_BUDGET;
    for c in inventory.clusters.iter().filter(|c| c.max_lag_on_failover.is_some()) {
        if c.lease_ttl < least {
            return Err(format!(
                "cluster {}: lease_ttl {} is too short: a primary would fence itself while its coordinator is \
                 healthy or being replaced. It must be at least {} ({what} + renewal every 1s + its 1s deadline + \
                 the agent's 2s fence budget); raise lease_ttl in the inventory",
                c.name,
                humantime::format_duration(c.lease_ttl),
                humantime::format_duration(least)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn inventory(settings: &str) -> Inventory {
        let text = format!(
            r#"
            state_dir = "/nonexistent/pgfleet-state"
            [[clusters]]
            name = "main"
            {settings}
            [[clusters.nodes]]
            name = "node0"
            agent = "http://10.0.0.1:7420"
            host = "10.0.0.1"
            "#
        );
        Inventory::parse(&text, Path::new("i.toml")).unwrap()
    }

    #[test]
    fn the_timing_rule_is_checked_against_the_takeover() {
        // No max_lag_on_failover: no lease, nothing to check.
        assert!(check_timing(&inventory("lease_ttl = \"4s\""), Some(Duration::from_secs(10))).is_ok());
        let lag = "max_lag_on_failover = 1048576\n";
        // Default 20s: fine with etcd's default 10s.
        assert!(check_timing(&inventory(lag), Some(Duration::from_secs(10))).is_ok());
        let e = check_timing(&inventory(&format!("{lag}lease_ttl = \"13s\"")), Some(Duration::from_secs(10))).unwrap_err();
        assert!(e.contains("at least 14s") && e.contains("etcd's lease_ttl 10s") && e.contains("main"), "{e}");
        // One coordinator: 1 + 1 + 1 + 2.
        assert!(check_timing(&inventory(&format!("{lag}lease_ttl = \"5s\"")), None).is_ok());
        let e = check_timing(&inventory(&format!("{lag}lease_ttl = \"4s\"")), None).unwrap_err();
        assert!(e.contains("at least 5s"), "{e}");
    }

    #[test]
    fn a_lease_runs_out_only_after_a_renewal_was_seen() {
        let inv = inventory("max_lag_on_failover = 1\nlease_ttl = \"4s\"");
        let c = &inv.clusters[0];
        let leases = Leases::default();
        leases.want(c, "node0");
        assert_eq!(leases.standing("main", "node0"), Standing::NotHeld);
        let seen = Instant::now() - Duration::from_secs(3);
        leases.held().get_mut("main").unwrap().last_ok = Some(seen);
        assert!(matches!(leases.standing("main", "node0"), Standing::Runs { left } if left <= Duration::from_secs(1)));
        leases.held().get_mut("main").unwrap().last_ok = Some(Instant::now() - Duration::from_secs(5));
        assert!(matches!(leases.standing("main", "node0"), Standing::RunOut { ago } if ago >= Duration::from_secs(1)));
        // Another node's standing is not this one's.
        assert_eq!(leases.standing("main", "node1"), Standing::NotHeld);
        // Moving it releases the old node's.
        leases.want(c, "node1");
        assert_eq!(leases.release.lock().unwrap().as_slice(), [("main".to_owned(), "node0".to_owned())]);
        assert_eq!(leases.standing("main", "node1"), Standing::NotHeld);
    }
}
