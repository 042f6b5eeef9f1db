//! WatchFleet: the agents asked every interval; a node's message is sent
//! when it is first seen and whenever its role, state, reachability,
//! timeline or sync state changes, or its lag moves by the threshold.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use pgfleet_proto::coordinator::v1 as pb;
use tonic::Status;

use super::{State, convert};

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const MIN_INTERVAL: Duration = Duration::from_millis(200);
const DEFAULT_LAG_THRESHOLD: u64 = 1 << 20;

/// What changed between two looks at a node, for people.
pub fn changes(old: &pb::NodeReport, new: &pb::NodeReport, lag_threshold: u64) -> Vec<String> {
    let mut v = Vec::new();
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    if old.reachable != new.reachable {
        v.push(format!(
            "agent {}",
            if new.reachable { "reachable again".to_owned() } else { format!("unreachable: {}", opt(&new.error)) }
        ));
    }
    if old.role != new.role {
        v.push(format!("role {} -> {}", old.role, new.role));
    }
    if old.timeline != new.timeline {
        let t = |t: Option<u32>| t.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
        v.push(format!("timeline {} -> {}", t(old.timeline), t(new.timeline)));
    }
    if old.replication_state != new.replication_state {
        v.push(format!("replication {} -> {}", opt(&old.replication_state), opt(&new.replication_state)));
    }
    if old.sync_state != new.sync_state {
        v.push(format!("sync_state {} -> {}", opt(&old.sync_state), opt(&new.sync_state)));
    }
    match (old.lag_bytes, new.lag_bytes) {
        (Some(a), Some(b)) if a.abs_diff(b) >= lag_threshold => v.push(format!("lag {a} -> {b} bytes")),
        (None, Some(b)) if old.role == new.role => v.push(format!("lag - -> {b} bytes")),
        _ => {}
    }
    v
}

type Changes = Pin<Box<dyn Stream<Item = Result<pb::FleetChange, Status>> + Send>>;

pub fn watch(state: Arc<State>, r: pb::WatchFleetRequest) -> Result<Changes, Status> {
    let interval = if r.interval_ms == 0 {
        DEFAULT_INTERVAL
    } else {
        Duration::from_millis(u64::from(r.interval_ms)).max(MIN_INTERVAL)
    };
    let threshold = if r.lag_threshold_bytes == 0 { DEFAULT_LAG_THRESHOLD } else { r.lag_threshold_bytes };
    // Checked now so a wrong name fails the call, not the stream.
    state
        .inventory
        .select(Some(r.cluster.as_str()).filter(|c| !c.is_empty()))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let cluster = r.cluster;
    // Subscribed before the first look: no decision falls between.
    let mut decisions = state.decisions.subscribe();
    let stream = async_stream::try_stream! {
        let mut last: HashMap<(String, String), pb::NodeReport> = HashMap::new();
        loop {
            let clusters = state
                .inventory
                .select(Some(cluster.as_str()).filter(|c| !c.is_empty()))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let report = crate::fleet_status::gather_view(&clusters, state.deadlines).await;
            let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            for c in &report.clusters {
                for n in &c.nodes {
                    let now = convert::node(n);
                    let key = (c.name.clone(), n.name.clone());
                    let what = match last.get(&key) {
                        None => vec!["initial".to_owned()],
                        Some(old) => changes(old, &now, threshold),
                    };
                    if what.is_empty() {
                        continue;
                    }
                    last.insert(key, now.clone());
                    yield pb::FleetChange { time: time.clone(), cluster: c.name.clone(), node: Some(now), changes: what, decision: None };
                }
            }
            // Decisions as they come, between looks.
            let next_look = tokio::time::sleep(interval);
            tokio::pin!(next_look);
            loop {
                tokio::select! {
                    () = &mut next_look => break,
                    d = decisions.recv() => match d {
                        Ok(d) if cluster.is_empty() || d.cluster == cluster => {
                            yield pb::FleetChange {
                                time: d.time.clone(),
                                cluster: d.cluster.clone(),
                                node: None,
                                changes: vec![format!("{}: {}", d.kind, d.detail)],
                                decision: Some(d),
                            };
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            yield pb::FleetChange {
                                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                                cluster: cluster.clone(),
                                node: None,
                                changes: vec![format!("{n} automatic decisions were not sent: this stream fell behind (see the coordinator's log)")],
                                decision: None,
                            };
                        }
                        // The service is going away.
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        }
    };
    Ok(Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_reachability_and_lag_beyond_threshold_are_changes() {
        let a = pb::NodeReport { name: "n".into(), reachable: true, role: "replica".into(), lag_bytes: Some(0), ..Default::default() };
        assert!(changes(&a, &a, 1024).is_empty());
        let small = pb::NodeReport { lag_bytes: Some(100), ..a.clone() };
        assert!(changes(&a, &small, 1024).is_empty());
        let big = pb::NodeReport { lag_bytes: Some(4096), ..a.clone() };
        assert_eq!(changes(&a, &big, 1024), vec!["lag 0 -> 4096 bytes"]);
        let promoted = pb::NodeReport { role: "primary".into(), lag_bytes: None, ..a.clone() };
        assert_eq!(changes(&a, &promoted, 1024), vec!["role replica -> primary"]);
        let gone = pb::NodeReport { reachable: false, error: Some("refused".into()), role: "unknown".into(), ..a.clone() };
        assert_eq!(changes(&a, &gone, 1024), vec!["agent unreachable: refused", "role replica -> unknown"]);
    }
}
