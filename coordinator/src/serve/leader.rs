//! Which of several `pgfleet serve` processes acts, when they share an etcd
//! store: the one etcd's election chose (a campaign on `PREFIX/leader` with
//! this process's lease). The others answer every call with the leader's
//! address, and report NOT_SERVING on the health service so a load balancer
//! routes to the leader. A leader whose lease could not be renewed exits:
//! another has been elected by then, and two coordinators must never act
//! on the same fleet.

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

    /// Campaigns in the background; `on_elected` runs once this process
    /// leads.
    pub fn elect(store: Arc<EtcdStore>, advertise: String, on_elected: impl FnOnce() + Send + 'static) -> Arc<Self> {
        let me = Arc::new(Leadership {
            elected: Some(AtomicBool::new(false)),
            leader_url: Mutex::new(None),
        });
        let (m, s, adv) = (me.clone(), store.clone(), advertise.clone());
        // Followers learn who leads, for their redirects.
        tokio::spawn(async move {
            loop {
                if let Ok((mut c, _)) = s.session().await
                    && let Ok(r) = c.leader(s.key("leader")).await
                    && let Some(kv) = r.kv()
                    && let Ok(v) = kv.value_str()
                {
                    *m.leader_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(v.to_owned());
                }
                if m.is_leader() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let m = me.clone();
        tokio::spawn(async move {
            // The campaign waits until this process leads: as long as
            // another leader lives.
            let (mut c, lease) = loop {
                let attempt = async {
                    let (c, lease) = store.session().await?;
                    let mut waiting = store.waiting_client().await?;
                    info!(advertise = %adv, "campaigning for leadership");
                    waiting
                        .campaign(store.key("leader"), adv.clone(), lease)
                        .await
                        .map_err(|e| crate::etcd::EtcdError { endpoints: store.config.endpoints.join(","), message: e.to_string() })?;
                    Ok::<_, crate::etcd::EtcdError>((c, lease))
                };
                match attempt.await {
                    Ok(s) => break s,
                    Err(e) => {
                        error!(error = %e, "the etcd election failed; campaigning again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            if let Some(e) = &m.elected {
                e.store(true, Ordering::SeqCst);
            }
            *m.leader_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(adv.clone());
            info!(advertise = %adv, "elected leader: this coordinator acts on the fleet");
            on_elected();
            // Leadership lasts as long as the lease: check it every third
            // of its TTL, and stop acting the moment it is gone.
            // A check that cannot reach etcd is retried until the lease
            // could have expired unseen.
            let ttl = store.config.lease_ttl;
            let every = ttl / 3;
            let mut confirmed = std::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match c.lease_time_to_live(lease, None).await {
                    Ok(r) if r.ttl() > 0 => confirmed = std::time::Instant::now(),
                    Ok(_) => {
                        error!("the etcd lease expired: leadership lost; exiting so no two coordinators act");
                        std::process::exit(1);
                    }
                    Err(e) if confirmed.elapsed() + every >= ttl => {
                        error!(error = %e, "the etcd lease cannot be confirmed: leadership may be lost; exiting so no two coordinators act");
                        std::process::exit(1);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot check the etcd lease; retrying"),
                }
            }
        });
        me
    }
}
