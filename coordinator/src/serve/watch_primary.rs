//! The leader watches every cluster's primary (issue #14): a look at each
//! cluster every [`LOOK_EVERY`], fed to its `Detector`, each change of
//! verdict logged (a failure as an error, with what was seen). Only the
//! leader watches: a follower's view would be a second voice with nothing
//! to act on.
//!
//! A cluster with `auto_failover = true` is failed over when its verdict
//! turns to failed: the same operation `pgfleet failover` runs (lock,
//! journal, typed plan, the same checks), begun by this process. It fences
//! the old primary through its agent and promotes only a standby that
//! provably holds every acknowledged commit; what it refuses (the old
//! primary's agent gone in an asynchronous cluster: it can be neither
//! fenced nor isolated; no proof) is logged, and nothing is tried again
//! until the verdict changes.
//!
//! A former primary that the last failover isolated and that comes back
//! still running as a primary, on its old timeline, is made a standby of
//! the new one (`pgfleet rejoin`, begun here): never a second primary.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{error, info, warn};

use pgfleet_proto::agent::v1 as pb;

use crate::client::{self, Deadlines};
use crate::detect::{Detector, Verdict};
use crate::fleet_status::{self, ClusterReport, Role};
use crate::inventory::Cluster;
use crate::ops::{self, CancelState, OpRequest, OpResult};
use crate::serve::registry::{self, Running};
use pgfleet_proto::ClusterName;
use crate::serve::State;

/// How often each cluster is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// A look does not wait on a dead host for longer than this: its agent's
/// silence is the answer. (Probes too: the agent gives up on the primary
/// after 700 ms, inside it.) The calls themselves use the service's
/// deadlines: an agent's channel is kept and shared with the operations,
/// and its per-call timeout is set when it is made.
const LOOK_LIMIT: Duration = Duration::from_secs(1);

pub fn spawn(state: Arc<State>) {
    tokio::spawn(async move {
        let mut detectors: HashMap<String, (Detector, &'static str)> = HashMap::new();
        // Clusters with an automatic operation running: one at a time.
        let busy: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        // When a stale primary's rejoin was last tried, so that a refusal
        // is not repeated twice a second.
        let mut rejoin_tried: HashMap<String, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(LOOK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !state.leadership.is_leader() {
                // A new leader starts from what it sees itself.
                detectors.clear();
                continue;
            }
            // A look counts from when it started: a dead host makes it last
            // its deadlines, which must not delay what it saw.
            let looked_at = Instant::now();
            let clusters = &state.inventory.clusters;
            let d = state.deadlines;
            let looks = join_all(clusters.iter().map(|c| fleet_status::gather_cluster_within(c, d, LOOK_LIMIT))).await;
            for (c, look) in clusters.iter().zip(looks) {
                let (detector, last) = detectors
                    .entry(c.name.to_string())
                    .or_insert_with(|| (Detector::new(c.failure_timeout), "unknown"));
                // No primary answered: the second opinion, from every
                // standby whose agent answers.
                let opinions = match (&look.primary, detector.primary()) {
                    (None, Some(p)) => opinions(c, &look, p, d).await,
                    _ => Vec::new(),
                };
                let verdict = detector.observe(c, &look, &opinions, looked_at);
                if verdict.kind() != *last {
                    report(c, &verdict, last);
                    *last = verdict.kind();
                    if matches!(verdict, Verdict::Failed { .. }) && c.auto_failover {
                        let req = OpRequest::Failover {
                            cluster: Some(c.name.clone()),
                            to: None,
                            fenced: false,
                            accept_data_loss: false,
                            dry_run: false,
                        };
                        automatic(&state, &busy, c.name.clone(), req, "failover");
                    }
                }
                if c.auto_failover {
                    for stale in stale_primaries(&look) {
                        let key = format!("{}/{stale}", c.name);
                        if rejoin_tried.get(&key).is_some_and(|t| t.elapsed() < RETRY_REJOIN) {
                            continue;
                        }
                        rejoin_tried.insert(key, Instant::now());
                        let Ok(node) = pgfleet_proto::NodeName::parse(&stale) else { continue };
                        warn!(cluster = %c.name, node = %stale, "{stale} is back as a primary on an older timeline: making it a standby");
                        let req = OpRequest::Rejoin { node, rebuild_if_needed: false, dry_run: false };
                        automatic(&state, &busy, c.name.clone(), req, "rejoin");
                    }
                }
            }
        }
    });
}

/// Each standby whose agent answered the probe of `primary`'s PostgreSQL,
/// and whether it reached it; asked concurrently. A probe the agent did not
/// answer (down, or refused: the probe needs an admin certificate) is no
/// opinion, not a "no".
async fn opinions(c: &Cluster, look: &ClusterReport, primary: &str, d: Deadlines) -> Vec<(String, bool)> {
    let Some(p) = c.nodes.iter().find(|n| n.name.as_str() == primary) else {
        return Vec::new();
    };
    let Some(address) = p.address().await else {
        return Vec::new();
    };
    let asked = c
        .nodes
        .iter()
        .filter(|n| n.name.as_str() != primary && look.nodes.iter().any(|r| r.name == n.name.as_str() && r.reachable))
        .map(|n| async move {
            let req = pb::ProbeRequest { address: address.to_string(), port: u32::from(p.port) };
            match tokio::time::timeout(LOOK_LIMIT, client::call(n, d, async |a| a.probe(req).await)).await {
                Ok(Ok(r)) => Some((n.name.to_string(), r.reachable)),
                Ok(Err(e)) => {
                    tracing::debug!(standby = %n.name, error = %e, "no second opinion from this standby");
                    None
                }
                Err(_) => {
                    tracing::debug!(standby = %n.name, "no second opinion from this standby: its agent did not answer the probe in time");
                    None
                }
            }
        });
    join_all(asked).await.into_iter().flatten().collect()
}

/// How long after an automatic rejoin of a stale primary was tried it is
/// tried again.
const RETRY_REJOIN: Duration = Duration::from_secs(10);

/// Nodes running as a primary on an older timeline than another primary
/// of the same cluster: former primaries back from a partition or a
/// restart. Whether one may be rejoined is the rejoin plan's to decide
/// (the journal must show pgfleet isolated it).
fn stale_primaries(look: &ClusterReport) -> Vec<String> {
    let primaries: Vec<_> = look.nodes.iter().filter(|n| n.role == Role::Primary).collect();
    let Some(newest) = primaries.iter().filter_map(|n| n.timeline).max() else {
        return Vec::new();
    };
    primaries.iter().filter(|n| n.timeline.is_some_and(|t| t < newest)).map(|n| n.name.clone()).collect()
}

/// Starts `req` as this process's own operation, unless one runs for the
/// cluster already: the same lock, journal and plan as the CLI's.
fn automatic(state: &Arc<State>, busy: &Arc<std::sync::Mutex<HashSet<String>>>, cluster: ClusterName, req: OpRequest, what: &'static str) {
    {
        let mut b = busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !b.insert(cluster.to_string()) {
            info!(cluster = %cluster, "an automatic operation runs for this cluster already: no automatic {what} now");
            return;
        }
    }
    let (state, busy) = (state.clone(), busy.clone());
    tokio::spawn(async move {
        run_automatic(&state, &cluster, req, what).await;
        busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(cluster.as_str());
    });
}

async fn run_automatic(state: &Arc<State>, cluster: &ClusterName, mut req: OpRequest, what: &'static str) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(CancelState::default());
    let who = format!("{AUTOMATIC} (automatic {what})");
    let (ctx, name, summary) = match ops::begin(&state.inventory, &mut req, &who, Some(tx), cancel.clone()).await {
        Ok(b) => b,
        Err(e) => {
            error!(cluster = %cluster, "automatic {what} refused: {e}");
            return;
        }
    };
    let running = Arc::new(Running::new(ctx.id().to_owned(), req.kind(), name, summary, who, false, cancel));
    registry::collect(running.clone(), rx);
    state.registry.insert(running.clone());
    warn!(cluster = %cluster, operation = %running.id, "automatic {what} started");
    let result = ops::execute(&state.inventory, &req, state.deadlines, &ctx).await;
    let fin = ops::finish(ctx, &result, false).await;
    match (&result, fin.error) {
        (Ok(OpResult::Moved(m)), None) => warn!(
            cluster = %cluster, operation = %running.id,
            "automatic failover done: {} promoted (timeline {}), {} fenced", m.new_primary, m.timeline, m.old_primary
        ),
        (Ok(OpResult::Rejoined(r)), None) => warn!(
            cluster = %cluster, operation = %running.id,
            "automatic rejoin done: {} is a standby of {} ({})", r.node, r.primary, r.method
        ),
        (_, Some(e)) => error!(cluster = %cluster, operation = %running.id, "automatic {what} did not complete: {e}"),
        (_, None) => warn!(cluster = %cluster, operation = %running.id, "automatic {what} ended"),
    }
}

/// Who the journal names as the caller of an automatic operation, followed
/// by what it does: "pgfleet serve (automatic failover)".
const AUTOMATIC: &str = "pgfleet serve";

fn report(c: &Cluster, v: &Verdict, was: &str) {
    let cluster = c.name.as_str();
    let what = v.describe();
    match v {
        Verdict::Healthy { .. } if was == "unknown" => info!(cluster, verdict = v.kind(), "watching: {what}"),
        Verdict::Healthy { .. } => info!(cluster, verdict = v.kind(), was, "{what} again"),
        Verdict::Unknown => info!(cluster, verdict = v.kind(), "{what}"),
        Verdict::Partitioned { .. } | Verdict::NoSecondOpinion { .. } | Verdict::Suspect { .. } => {
            warn!(cluster, verdict = v.kind(), "{what}")
        }
        Verdict::Failed { .. } if c.auto_failover => error!(cluster, verdict = v.kind(), "{what}; failing over"),
        Verdict::Failed { .. } => error!(
            cluster,
            verdict = v.kind(),
            "{what}; automatic failover is off for this cluster (auto_failover): `pgfleet failover --cluster {cluster}`"
        ),
    }
}
