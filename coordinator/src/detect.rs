//! Is a cluster's primary gone? Decided with a second opinion (issue #14):
//! the coordinator's own view (the primary's agent answers, its PostgreSQL
//! accepts connections) is not enough, because a coordinator cut off from
//! the primary sees exactly what a dead primary shows. So the standbys are
//! asked too: each standby's agent opens a TCP connection to the primary's
//! PostgreSQL (the agent's Probe). A primary is *failed* only when the
//! coordinator cannot reach it AND no standby reaches it, without a break
//! for the cluster's `failure_timeout`. A standby that reaches it proves it
//! runs (and, with synchronous replication, can still acknowledge commits):
//! that is a partition between the coordinator and the primary, never a
//! failure. With no standby answering either, there is no second opinion:
//! nothing is declared.
//!
//! Why a probe and not the standbys' WAL receivers alone: a receiver whose
//! primary's host vanished (no TCP reset: power, a cable, a kernel panic)
//! reads "streaming" until wal_receiver_timeout (60 s by default); a probe
//! fails within its 700 ms.
//!
//! The cost of the timeout: a dead primary is declared that long after the
//! coordinator and the standbys last saw it (plus one look's interval), and
//! a primary that stalls for longer than it (a frozen VM, a very long
//! checkpoint with the agent stuck too) is declared failed.
//!
//! This module decides from looks (`fleet_status` reports); it neither asks
//! the agents nor acts.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fleet_status::ClusterReport;
use crate::inventory::Cluster;

/// What the detector concludes from the last look at a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// The primary answers.
    Healthy { primary: String },
    /// No primary seen yet (a new cluster, or one that never had a running
    /// primary while this coordinator watched): nothing to watch.
    Unknown,
    /// The coordinator cannot reach the primary, but these standbys still
    /// do: a partition, not a failure.
    Partitioned { primary: String, reached_by: Vec<String> },
    /// The coordinator cannot reach the primary and no standby answers:
    /// no second opinion, so no verdict.
    NoSecondOpinion { primary: String, why: String },
    /// Unreachable and no standby streams from it, for `down_for` so far
    /// (less than the failure timeout).
    Suspect { primary: String, why: String, down_for_ms: u64 },
    /// Unreachable and no standby streams from it for at least the failure
    /// timeout.
    Failed { primary: String, why: String, down_for_ms: u64 },
}

impl Verdict {
    /// The kind, for logs and for telling a change from a repeat.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Healthy { .. } => "healthy",
            Verdict::Unknown => "unknown",
            Verdict::Partitioned { .. } => "partitioned",
            Verdict::NoSecondOpinion { .. } => "no-second-opinion",
            Verdict::Suspect { .. } => "suspect",
            Verdict::Failed { .. } => "failed",
        }
    }

    /// For people: what was seen, and what it means.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Healthy { primary } => format!("primary {primary} answers"),
            Verdict::Unknown => "no primary seen yet".into(),
            Verdict::Partitioned { primary, reached_by } => format!(
                "cannot reach primary {primary}, but {} still reach its PostgreSQL: a partition between this \
                 coordinator and {primary}, not a failure",
                reached_by.join(", ")
            ),
            Verdict::NoSecondOpinion { primary, why } => format!(
                "cannot reach primary {primary} ({why}), and no standby answers either: no second opinion, \
                 nothing is declared"
            ),
            Verdict::Suspect { primary, why, down_for_ms } => format!(
                "primary {primary} looks down for {:.1}s ({why}) and no standby reaches it",
                *down_for_ms as f64 / 1000.0
            ),
            Verdict::Failed { primary, why, down_for_ms } => format!(
                "primary {primary} failed: {why}, and no standby has reached it for {:.1}s",
                *down_for_ms as f64 / 1000.0
            ),
        }
    }
}

/// One cluster's detector: remembers which node was the primary (an
/// unreachable node reports no role) and since when it looks dead.
#[derive(Debug)]
pub struct Detector {
    failure_timeout: Duration,
    primary: Option<String>,
    down_since: Option<Instant>,
}

impl Detector {
    pub fn new(failure_timeout: Duration) -> Self {
        Detector { failure_timeout, primary: None, down_since: None }
    }

    /// A detector that already knows which node was the primary (what the
    /// last leader recorded): a coordinator started while that primary is
    /// down watches it instead of waiting for a primary to appear.
    pub fn remembering(failure_timeout: Duration, primary: Option<String>) -> Self {
        Detector { failure_timeout, primary, down_since: None }
    }

    /// The primary being watched: the one to probe from the standbys when
    /// a look finds no primary.
    pub fn primary(&self) -> Option<&str> {
        self.primary.as_deref()
    }

    /// The verdict after one more look at the cluster, taken at `now`, and
    /// the standbys' opinions: each standby whose agent answered the probe
    /// of the remembered primary's PostgreSQL, and whether it reached it
    /// (asked only when the look found no primary; a standby whose agent
    /// did not answer the probe has no opinion).
    pub fn observe(&mut self, cluster: &Cluster, look: &ClusterReport, opinions: &[(String, bool)], now: Instant) -> Verdict {
        // A primary that answers is the primary; one that promoted since
        // (a switchover, a failover) replaces the remembered one.
        if let Some(p) = &look.primary {
            self.primary = Some(p.clone());
            self.down_since = None;
            return Verdict::Healthy { primary: p.clone() };
        }
        let Some(primary) = self.primary.clone() else {
            return Verdict::Unknown;
        };
        let report = |name: &str| look.nodes.iter().find(|n| n.name == name);
        let why = match report(&primary) {
            None => "not in the inventory any more".to_owned(),
            Some(r) if !r.reachable => format!("its agent does not answer ({})", r.error.as_deref().unwrap_or("no reason given")),
            Some(r) if !r.server_up => format!(
                "its agent answers, PostgreSQL does not ({})",
                r.down_reason.as_deref().unwrap_or("server is down")
            ),
            // Up, but not the one primary any more: fenced into a standby,
            // or two primaries (status warns of that). Not a failure.
            Some(_) => {
                self.down_since = None;
                return Verdict::Unknown;
            }
        };
        if !cluster.nodes.iter().any(|n| n.name.as_str() == primary) {
            self.down_since = None;
            return Verdict::Unknown;
        }
        let opinions: Vec<&(String, bool)> = opinions.iter().filter(|(s, _)| *s != primary).collect();
        let reached_by: Vec<String> = opinions.iter().filter(|(_, r)| *r).map(|(s, _)| s.clone()).collect();
        if !reached_by.is_empty() {
            // The primary lives: whatever counted towards a failure is void.
            self.down_since = None;
            return Verdict::Partitioned { primary, reached_by };
        }
        if opinions.is_empty() {
            self.down_since = None;
            return Verdict::NoSecondOpinion { primary, why };
        }
        let since = *self.down_since.get_or_insert(now);
        let down_for = now.saturating_duration_since(since);
        let down_for_ms = u64::try_from(down_for.as_millis()).unwrap_or(u64::MAX);
        if down_for >= self.failure_timeout {
            Verdict::Failed { primary, why, down_for_ms }
        } else {
            Verdict::Suspect { primary, why, down_for_ms }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet_status::{NodeReport, Role};
    use crate::fleet_status::WalReceiverView;

    fn cluster() -> Cluster {
        let text = r#"
            state_dir = "/nonexistent/pgfleet-state"
            [[clusters]]
            name = "main"
            [[clusters.nodes]]
            name = "node0"
            agent = "http://10.0.0.10:7420"
            host = "10.0.0.10"
            [[clusters.nodes]]
            name = "node1"
            agent = "http://10.0.0.11:7420"
            host = "10.0.0.11"
            [[clusters.nodes]]
            name = "node2"
            agent = "http://10.0.0.12:7420"
            host = "10.0.0.12"
        "#;
        crate::inventory::Inventory::parse(text, std::path::Path::new("i.toml")).unwrap().clusters.remove(0)
    }

    fn node(name: &str, reachable: bool, up: bool, role: Role, from: Option<&str>) -> NodeReport {
        let mut r: NodeReport = serde_json::from_value(serde_json::json!({
            "name": name, "agent": "", "host": "", "port": 5432, "reachable": reachable, "role": role,
            "server_up": up, "sync_rep_waiting": 0, "missing_synchronous_standbys": [],
        }))
        .unwrap();
        r.wal_receiver = from.map(|h| WalReceiverView {
            status: "streaming".into(),
            sender_host: Some(h.into()),
            sender_port: Some(5432),
            slot_name: None,
        });
        r
    }

    fn look(primary: Option<&str>, nodes: Vec<NodeReport>) -> ClusterReport {
        ClusterReport { name: "main".into(), primary: primary.map(str::to_owned), nodes, warnings: vec![], policy: None }
    }

    #[test]
    fn a_primary_is_failed_only_unreachable_without_streaming_standbys_for_the_timeout() {
        let c = cluster();
        let mut d = Detector::new(Duration::from_secs(3));
        let t0 = Instant::now();
        let healthy = look(
            Some("node0"),
            vec![
                node("node0", true, true, Role::Primary, None),
                node("node1", true, true, Role::Replica, Some("10.0.0.10")),
                node("node2", true, true, Role::Replica, Some("10.0.0.10")),
            ],
        );
        assert_eq!(d.observe(&c, &healthy, &[], t0).kind(), "healthy");

        // Unreachable from here, but the standbys still stream: partition,
        // however long it lasts.
        let cut = look(
            None,
            vec![
                node("node0", false, false, Role::Unknown, None),
                node("node1", true, true, Role::Replica, Some("10.0.0.10")),
                node("node2", true, true, Role::Replica, None),
            ],
        );
        let reached = [("node1".to_owned(), true), ("node2".to_owned(), false)];
        let nobody = [("node1".to_owned(), false), ("node2".to_owned(), false)];
        for s in [0, 5, 60] {
            let v = d.observe(&c, &cut, &reached, t0 + Duration::from_secs(s));
            assert_eq!(v, Verdict::Partitioned { primary: "node0".into(), reached_by: vec!["node1".into()] });
        }

        // Gone, and no standby reaches it (node1's WAL receiver still says
        // streaming, as one does for a minute after its primary's host
        // vanished without a reset): suspect, then failed after 3 s.
        let gone = look(
            None,
            vec![
                node("node0", false, false, Role::Unknown, None),
                node("node1", true, true, Role::Replica, Some("10.0.0.10")),
                node("node2", true, true, Role::Replica, None),
            ],
        );
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(d.observe(&c, &gone, &nobody, t1).kind(), "suspect");
        assert_eq!(d.observe(&c, &gone, &nobody, t1 + Duration::from_millis(2900)).kind(), "suspect");
        // One look where a standby reaches it resets the count.
        assert_eq!(d.observe(&c, &cut, &reached, t1 + Duration::from_millis(2950)).kind(), "partitioned");
        assert_eq!(d.observe(&c, &gone, &nobody, t1 + Duration::from_secs(4)).kind(), "suspect");
        let v = d.observe(&c, &gone, &nobody, t1 + Duration::from_secs(7));
        assert_eq!(v.kind(), "failed", "{v:?}");
        assert!(v.describe().contains("its agent does not answer"), "{}", v.describe());

        // The postmaster dead, its agent answering: the same rule.
        let mut d = Detector::new(Duration::from_secs(3));
        let nobody = [("node1".to_owned(), false)];
        d.observe(&c, &healthy, &[], t0);
        let crashed = look(
            None,
            vec![
                node("node0", true, false, Role::Down, None),
                node("node1", true, true, Role::Replica, None),
                node("node2", true, true, Role::Replica, None),
            ],
        );
        d.observe(&c, &crashed, &nobody, t0);
        let v = d.observe(&c, &crashed, &nobody, t0 + Duration::from_secs(3));
        assert_eq!(v.kind(), "failed");
        assert!(v.describe().contains("PostgreSQL does not"), "{}", v.describe());

        // No standby's agent answers the probe: this coordinator may be the
        // one cut off. No opinion, no verdict.
        let mut d = Detector::new(Duration::from_secs(3));
        d.observe(&c, &healthy, &[], t0);
        let alone = look(
            None,
            vec![
                node("node0", false, false, Role::Unknown, None),
                node("node1", false, false, Role::Unknown, None),
                node("node2", false, false, Role::Unknown, None),
            ],
        );
        for s in [0, 10] {
            assert_eq!(d.observe(&c, &alone, &[], t0 + Duration::from_secs(s)).kind(), "no-second-opinion");
        }
        // A cluster never seen with a primary: nothing to watch.
        let mut d = Detector::new(Duration::from_secs(3));
        assert_eq!(d.observe(&c, &gone, &nobody, t0), Verdict::Unknown);
    }

    #[test]
    fn a_new_primary_replaces_the_remembered_one() {
        let c = cluster();
        let mut d = Detector::new(Duration::from_secs(3));
        let t0 = Instant::now();
        d.observe(&c, &look(Some("node0"), vec![node("node0", true, true, Role::Primary, None)]), &[], t0);
        let moved = look(
            Some("node1"),
            vec![
                node("node0", true, true, Role::Replica, Some("10.0.0.11")),
                node("node1", true, true, Role::Primary, None),
            ],
        );
        assert_eq!(d.observe(&c, &moved, &[], t0), Verdict::Healthy { primary: "node1".into() });
        // node1 then lost, node0 a standby of it that stopped streaming.
        let lost = look(
            None,
            vec![node("node0", true, true, Role::Replica, None), node("node1", false, false, Role::Unknown, None)],
        );
        let nobody = [("node0".to_owned(), false)];
        d.observe(&c, &lost, &nobody, t0);
        let v = d.observe(&c, &lost, &nobody, t0 + Duration::from_secs(3));
        assert!(matches!(v, Verdict::Failed { ref primary, .. } if primary == "node1"), "{v:?}");
    }
}
