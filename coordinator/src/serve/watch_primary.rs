//! The leader watches every cluster's primary (issue #14's detection):
//! a look at each cluster every [`LOOK_EVERY`], fed to its `Detector`, and
//! each change of verdict logged (a failure as an error, with what was
//! seen). Only the leader watches: a follower's view would be a second
//! voice with nothing to act on. This is detection only; no automatic
//! action is taken from it yet.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{error, info, warn};

use pgfleet_proto::agent::v1 as pb;

use crate::client::{self, Deadlines};
use crate::detect::{Detector, Verdict};
use crate::fleet_status::{self, ClusterReport};
use crate::inventory::Cluster;
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
                    report(c.name.as_str(), &verdict, last);
                    *last = verdict.kind();
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

fn report(cluster: &str, v: &Verdict, was: &str) {
    let what = v.describe();
    match v {
        Verdict::Healthy { .. } if was == "unknown" => info!(cluster, verdict = v.kind(), "watching: {what}"),
        Verdict::Healthy { .. } => info!(cluster, verdict = v.kind(), was, "{what} again"),
        Verdict::Unknown => info!(cluster, verdict = v.kind(), "{what}"),
        Verdict::Partitioned { .. } | Verdict::NoSecondOpinion { .. } | Verdict::Suspect { .. } => {
            warn!(cluster, verdict = v.kind(), "{what}")
        }
        Verdict::Failed { .. } => error!(cluster, verdict = v.kind(), "{what}; no automatic failover yet: `pgfleet failover`"),
    }
}
