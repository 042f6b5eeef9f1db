//! Which of several `pgfleet serve` processes acts, when they share an etcd
//! store: the one etcd's election chose (a campaign on `PREFIX/leader` with
//! this process's lease). The others answer every call with the leader's
//! address, and report NOT_SERVING on the health service (the named
//! service and "") so a load balancer routes to the leader. A leader stops
//! acting before its lease can have expired in etcd (see [`Leadership::elect`])
//! and campaigns again: two coordinators never act on the same fleet, and
//! a coordinator rides through etcd's own faults without exiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, info};

use crate::etcd::EtcdStore;

#[derive(Debug, Default)]
pub struct Leadership {
    /// None: no election (file store): this process always acts.
    elected: Option<AtomicBool>,
    leader_url: Mutex<Option<String>>,
}

impl Leadership {
    pub fn single() -> Arc<Self> {
        Arc::new(Leadership::default())
    }

    pub fn is_leader(&self) -> bool {
        self.elected.as_ref().is_none_or(|e| e.load(Ordering::SeqCst))
    }

    pub fn leader_url(&self) -> Option<String> {
        self.leader_url.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Campaigns in the background. `on_change(true)` runs each time this
    /// process is elected, `on_change(false)` each time it stops acting.
    ///
    /// The rule (DESIGN.md, README "Several coordinators"): a leader acts
    /// only while its lease is sure to live in etcd, that is until the
    /// moment its last successful keep-alive was sent plus the TTL etcd
    /// answered, less [`STEP_DOWN_MARGIN`]; it checks every [`CHECK`].
    /// Past that it stops acting (UNAVAILABLE, NOT_SERVING) strictly before
    /// etcd can have handed leadership to another, and campaigns again,
    /// under a new lease when the old one was lost; it never assumes it
    /// still leads.
    pub fn elect(store: Arc<EtcdStore>, advertise: String, on_change: impl Fn(bool) + Send + Sync + 'static) -> Arc<Self> {
        let me = Arc::new(Leadership {
            elected: Some(AtomicBool::new(false)),
            leader_url: Mutex::new(None),
        });
        let (m, s) = (me.clone(), store.clone());
        // Followers learn who leads, for their redirects.
        tokio::spawn(async move {
            loop {
                if !m.is_leader()
                    && let Ok(Some(v)) = s.election_leader("leader").await
                {
                    *m.leader_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let m = me.clone();
        tokio::spawn(async move {
            loop {
                // The campaign waits until this process leads: as long as
                // another leader lives.
                let mut attempt_no = 0;
                let lease = loop {
                    attempt_no += 1;
                    let attempt = async {
                        let (_, lease) = store.session().await?;
                        let mut waiting = store.waiting_client(attempt_no - 1).await?;
                        info!(advertise = %advertise, lease, "campaigning for leadership");
                        waiting
                            .campaign(store.key("leader"), advertise.clone(), lease)
                            .await
                            .map_err(|e| crate::etcd::EtcdError { endpoints: store.config.endpoints.join(","), message: e.to_string() })?;
                        Ok::<_, crate::etcd::EtcdError>(lease)
                    };
                    match attempt.await {
                        Ok(lease) => break lease,
                        Err(e) => {
                            error!(error = %e, "the etcd election failed; campaigning again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                };
                // Won with a lease that may have run out while the campaign
                // waited: lead only while it is sure to live.
                if !lease_safe(&store, lease).await {
                    continue;
                }
                if let Some(e) = &m.elected {
                    e.store(true, Ordering::SeqCst);
                }
                *m.leader_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(advertise.clone());
                info!(advertise = %advertise, lease, "elected leader: this coordinator acts on the fleet");
                on_change(true);
                while lease_safe(&store, lease).await {
                    tokio::time::sleep(CHECK).await;
                }
                if let Some(e) = &m.elected {
                    e.store(false, Ordering::SeqCst);
                }
                *m.leader_url.lock().unwrap_or_else(|p| p.into_inner()) = None;
                error!(lease, "the etcd lease is not sure to live any more: stopped acting, campaigning again");
                on_change(false);
            }
        });
        me
    }
}

/// How often a leader checks that its lease is sure to live.
pub const CHECK: Duration = Duration::from_millis(100);
/// How long before the lease could expire a leader stops acting: more than
/// a check interval, so the last check that lets it act is still in time.
pub const STEP_DOWN_MARGIN: Duration = Duration::from_millis(500);

async fn lease_safe(store: &EtcdStore, lease: i64) -> bool {
    store
        .lease_valid_until(lease)
        .await
        .is_some_and(|until| std::time::Instant::now() + STEP_DOWN_MARGIN < until)
}
