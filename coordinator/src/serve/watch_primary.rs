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
/// A look must not wait on a dead host for longer than this: its agent's
/// silence is the answer.
const LOOK_DEADLINES: Deadlines = Deadlines { connect: Duration::from_secs(1), call: Duration::from_secs(1) };

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
            let looks = join_all(clusters.iter().map(|c| fleet_status::gather_cluster(c, LOOK_DEADLINES))).await;
            for (c, look) in clusters.iter().zip(looks) {
                let (detector, last) = detectors
                    .entry(c.name.to_string())
                    .or_insert_with(|| (Detector::new(c.failure_timeout), "unknown"));
                // No primary answered: the second opinion, from every
                // standby whose agent answers.
                let reached_by = match (&look.primary, detector.primary()) {
                    (None, Some(p)) => reached_by(c, &look, p).await,
                    _ => Vec::new(),
                };
                let verdict = detector.observe(c, &look, &reached_by, looked_at);
                if verdict.kind() != *last {
                    report(c.name.as_str(), &verdict, last);
                    *last = verdict.kind();
                }
            }
        }
    });
}

/// The standbys (reachable by their agents) that reach `primary`'s
/// PostgreSQL, each asked concurrently.
async fn reached_by(c: &Cluster, look: &ClusterReport, primary: &str) -> Vec<String> {
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
            let reached = client::call(n, LOOK_DEADLINES, async |a| a.probe(req).await)
                .await
                .is_ok_and(|r| r.reachable);
            reached.then(|| n.name.to_string())
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
