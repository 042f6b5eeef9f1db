//! The library's fleet view as the API's messages.

use pgfleet_proto::coordinator::v1 as pb;

use crate::fleet_status::{ClusterReport, FleetReport, NodeReport};

pub fn node(n: &NodeReport) -> pb::NodeReport {
    pb::NodeReport {
        name: n.name.clone(),
        agent_endpoint: n.agent.clone(),
        reachable: n.reachable,
        error: n.error.clone(),
        role: n.role.as_str().to_owned(),
        timeline: n.timeline,
        current_lsn: n.current_lsn.map(|l| l.to_string()),
        received_lsn: n.received_lsn.map(|l| l.to_string()),
        replayed_lsn: n.replayed_lsn.map(|l| l.to_string()),
        lag_bytes: n.lag_bytes,
        replication_state: n.replication.as_ref().map(|r| r.state.clone()),
        sync_state: n.replication.as_ref().map(|r| r.sync_state.clone()),
        system_identifier: n.system_identifier.clone(),
        postgres_version: n.postgres_version.clone(),
        agent_version: n.agent_version.clone(),
        sync_rep_waiting: n.sync_rep_waiting,
        sync_rep_oldest_wait_seconds: n.sync_rep_oldest_wait_seconds,
        synchronous_standby_names: n.synchronous_standby_names.clone(),
        missing_synchronous_standbys: n.missing_synchronous_standbys.clone(),
        slow_change: n.slow_change.clone(),
        wal_receiver_error: n.wal_receiver_error.clone(),
        postgres_major: n.majors.major(),
        data_major: n.majors.data_major,
        binaries_major: n.majors.binaries_major,
    }
}

pub fn cluster(c: &ClusterReport) -> pb::ClusterStatus {
    pb::ClusterStatus {
        name: c.name.clone(),
        nodes: c.nodes.iter().map(node).collect(),
        primary: c.primary.clone(),
        warnings: c.warnings.clone(),
        auto_failover: c.policy.as_ref().is_some_and(|p| p.auto_failover),
        paused: c.policy.as_ref().filter(|p| p.paused.is_some()).map(|p| p.describe()).unwrap_or_default(),
    }
}

pub fn fleet(r: &FleetReport) -> pb::FleetStatus {
    pb::FleetStatus {
        clusters: r.clusters.iter().map(cluster).collect(),
        all_reachable: r.all_reachable,
        // Clients render the typed `json` (the CLI: cli/status.rs).
        text: String::new(),
        json: serde_json::to_string_pretty(r).unwrap_or_default() + "\n",
    }
}
