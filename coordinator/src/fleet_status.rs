//! `pgfleet status`: every node of the selected clusters, its agent asked
//! concurrently, merged into one view per cluster: who is primary, how far
//! each replica lags, and what looks wrong.

use std::time::Duration;

use futures::future::join_all;
use pgfleet_proto::Lsn;
use pgfleet_proto::major::Major;
use pgfleet_proto::agent::v1 as pb;
use serde::Serialize;

use crate::client::{self, AgentCallError, Deadlines};
use crate::inventory::{Cluster, Node};
use crate::majors::NodeMajors;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FleetReport {
    pub clusters: Vec<ClusterReport>,
    /// True when every agent answered.
    pub all_reachable: bool,
}

impl FleetReport {
    /// Each cluster's automatic-failover policy, from the store.
    pub async fn with_policies(mut self, clusters: &[&Cluster], store: &crate::journal::Store) -> Self {
        for cr in &mut self.clusters {
            if let Some(c) = clusters.iter().find(|c| c.name.as_str() == cr.name) {
                cr.policy = Some(crate::policy::current(store, c).await);
            }
        }
        self
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClusterReport {
    pub name: String,
    /// The node that reports `pg_is_in_recovery() = false`, when exactly one does.
    pub primary: Option<String>,
    pub nodes: Vec<NodeReport>,
    /// Things a DBA should look at: two primaries, differing system
    /// identifiers, a replica not streaming, timelines apart.
    pub warnings: Vec<String>,
    /// Automatic failover: on or off, and whether the cluster is paused
    /// (`pgfleet status` and GetFleetStatus fill it in from the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::Policy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
    /// The agent answered; PostgreSQL does not.
    Down,
    /// The agent did not answer.
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Down => "down",
            Role::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub agent: String,
    pub host: String,
    pub port: u16,
    /// The agent answered GetStatus.
    pub reachable: bool,
    /// Why the agent could not be asked.
    pub error: Option<String>,
    pub role: Role,
    pub server_up: bool,
    pub down_reason: Option<String>,
    pub service_state: Option<String>,
    pub service_detail: Option<String>,
    pub service_backend: Option<String>,
    pub timeline: Option<u32>,
    pub system_identifier: Option<String>,
    pub cluster_state: Option<String>,
    pub current_lsn: Option<Lsn>,
    pub received_lsn: Option<Lsn>,
    pub replayed_lsn: Option<Lsn>,
    /// Bytes between the primary's current position and this replica's replay.
    pub lag_bytes: Option<u64>,
    /// Seconds since the last replayed transaction committed on the primary.
    pub replay_delay_seconds: Option<f64>,
    /// This replica as the primary sees it in pg_stat_replication.
    pub replication: Option<UpstreamView>,
    /// This replica's WAL receiver.
    pub wal_receiver: Option<WalReceiverView>,
    pub postgres_version: Option<String>,
    /// Its PostgreSQL majors (server, data directory, programs).
    #[serde(flatten)]
    pub majors: NodeMajors,
    pub agent_version: Option<String>,
    pub hostname: Option<String>,
    pub data_directory: Option<String>,
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    /// A stopped server's last checkpoint (pg_controldata).
    pub checkpoint_lsn: Option<Lsn>,
    /// A stopped server's synchronous_standby_names, from its config files.
    pub configured_synchronous_standby_names: Option<String>,
    /// A running server's synchronous_standby_names.
    pub synchronous_standby_names: Option<String>,
    /// On the primary: sessions whose commit waits for synchronous
    /// replication (writes that are blocked), and the oldest wait.
    pub sync_rep_waiting: u32,
    pub sync_rep_oldest_wait_seconds: Option<f64>,
    /// On the primary: the standbys synchronous_standby_names names that
    /// do not stream, when too few do to meet it.
    pub missing_synchronous_standbys: Vec<String>,
    /// A change the agent has been running for more than a second.
    pub slow_change: Option<String>,
    /// On a replica that does not stream: why, from its server log.
    pub wal_receiver_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct UpstreamView {
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sync_state: String,
    pub sync_priority: i32,
    pub sent_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// pg_wal_lsn_diff(sent_lsn, replay_lsn).
    pub replay_lag_bytes: Option<u64>,
    pub write_lag_seconds: Option<f64>,
    pub flush_lag_seconds: Option<f64>,
    pub replay_lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WalReceiverView {
    pub status: String,
    pub sender_host: Option<String>,
    pub sender_port: Option<u32>,
    pub slot_name: Option<String>,
}

/// What one node's agent said.
struct NodeAnswer {
    status: Result<pb::NodeStatus, AgentCallError>,
    replication: Option<pb::ReplicationInfo>,
}

/// `fresh`: the agent reads its server now rather than answer from its
/// snapshot (at most 500 ms old): what an operation deciding something
/// needs; a view for people need not.
async fn ask(node: &Node, d: Deadlines, fresh: bool) -> NodeAnswer {
    let mut client = match client::connect(node, d).await {
        Ok(c) => c,
        Err(e) => {
            return NodeAnswer {
                status: Err(e),
                replication: None,
            };
        }
    };
    let mut c2 = client.clone();
    let (status, replication) = tokio::join!(
        client.get_status(pb::GetStatusRequest { fresh }),
        c2.get_replication(pb::GetReplicationRequest {})
    );
    NodeAnswer {
        status: status
            .map(|r| r.into_inner())
            .map_err(|s| AgentCallError::from_status(node, s)),
        // Fails on a stopped server; status says why, so it is not repeated.
        replication: replication.ok().map(|r| r.into_inner()),
    }
}

/// Every node as it is now (fresh reads): for operations.
pub async fn gather(clusters: &[&Cluster], deadlines: Deadlines) -> FleetReport {
    gather_as(clusters, deadlines, true).await
}

/// Every node from its agent's status snapshot (at most 500 ms old): for
/// WatchFleet, a stream that polls. `pgfleet status` and GetFleetStatus
/// read fresh: someone who just stopped a server by hand expects to see it.
pub async fn gather_view(clusters: &[&Cluster], deadlines: Deadlines) -> FleetReport {
    gather_as(clusters, deadlines, false).await
}

async fn gather_as(clusters: &[&Cluster], deadlines: Deadlines, fresh: bool) -> FleetReport {
    let per_cluster = clusters.iter().map(|c| async move {
        let answers = join_all(c.nodes.iter().map(|n| ask(n, deadlines, fresh))).await;
        merge(c, answers)
    });
    let clusters = join_all(per_cluster).await;
    let all_reachable = clusters.iter().all(|c| c.nodes.iter().all(|n| n.reachable));
    FleetReport {
        clusters,
        all_reachable,
    }
}

/// One cluster's status.
/// [`gather_cluster`] where a node whose agent has not answered within
/// `limit` counts as unreachable for this look. The deadlines stay those of
/// every other caller: an agent's channel is kept and shared, and its
/// per-call timeout is set when it is made.
pub async fn gather_cluster_within(cluster: &Cluster, deadlines: Deadlines, limit: Duration) -> ClusterReport {
    let answers = join_all(cluster.nodes.iter().map(|n| async move {
        match tokio::time::timeout(limit, ask(n, deadlines, true)).await {
            Ok(a) => a,
            Err(_) => NodeAnswer {
                status: Err(AgentCallError::Unreachable {
                    node: n.name.to_string(),
                    endpoint: n.agent.clone(),
                    reason: format!("no answer within {}", humantime::format_duration(limit)),
                }),
                replication: None,
            },
        }
    }))
    .await;
    merge(cluster, answers)
}

pub async fn gather_cluster(cluster: &Cluster, deadlines: Deadlines) -> ClusterReport {
    let answers = join_all(cluster.nodes.iter().map(|n| ask(n, deadlines, true))).await;
    merge(cluster, answers)
}

fn lsn(s: &Option<String>, what: &str, node: &Node) -> Result<Option<Lsn>, String> {
    s.as_deref()
        .map(|v| {
            Lsn::parse(v).map_err(|e| format!("agent of {} sent an invalid {what}: {e}", node.name))
        })
        .transpose()
}

impl NodeReport {
    /// This node's own WAL receiver streams from `upstream` through `slot`:
    /// then the slot's one holder there is this node, whatever
    /// application_name it streams under (the upstream's agent cannot tell
    /// two instances on one host address apart by the address alone).
    pub fn streams_through(&self, upstream: &Node, slot: &str) -> bool {
        let same_host = |h: &str| {
            h == upstream.host
                || matches!((h.parse::<std::net::IpAddr>(), upstream.host.parse::<std::net::IpAddr>()), (Ok(a), Ok(b)) if a == b)
        };
        self.wal_receiver.as_ref().is_some_and(|w| {
            w.status == "streaming"
                && w.slot_name.as_deref() == Some(slot)
                && w.sender_port == Some(u32::from(upstream.port))
                && w.sender_host.as_deref().is_some_and(same_host)
        })
    }

    /// A node nothing is known of yet: unreachable, role unknown.
    pub fn unknown(node: &Node) -> Self {
        NodeReport {
            name: node.name.to_string(),
            agent: node.agent.clone(),
            host: node.host.clone(),
            port: node.port,
            reachable: false,
            error: None,
            role: Role::Unknown,
            server_up: false,
            down_reason: None,
            service_state: None,
            service_detail: None,
            service_backend: None,
            timeline: None,
            system_identifier: None,
            cluster_state: None,
            current_lsn: None,
            received_lsn: None,
            replayed_lsn: None,
            lag_bytes: None,
            replay_delay_seconds: None,
            replication: None,
            wal_receiver: None,
            postgres_version: None,
            majors: NodeMajors::default(),
            agent_version: None,
            hostname: None,
            data_directory: None,
            disk_free_bytes: None,
            disk_total_bytes: None,
            checkpoint_lsn: None,
            configured_synchronous_standby_names: None,
            synchronous_standby_names: None,
            sync_rep_waiting: 0,
            sync_rep_oldest_wait_seconds: None,
            missing_synchronous_standbys: Vec::new(),
            slow_change: None,
            wal_receiver_error: None,
        }
    }
}

fn node_report(node: &Node, answer: &NodeAnswer) -> NodeReport {
    let mut r = NodeReport::unknown(node);
    let st = match &answer.status {
        Ok(st) => st,
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    let lsns = (|| {
        Ok::<_, String>((
            lsn(&st.current_lsn, "current LSN", node)?,
            lsn(&st.received_lsn, "received LSN", node)?,
            lsn(&st.replayed_lsn, "replayed LSN", node)?,
        ))
    })();
    let (current, received, replayed) = match lsns {
        Ok(l) => l,
        Err(e) => {
            r.error = Some(e);
            return r;
        }
    };
    r.reachable = true;
    r.role = match st.role() {
        pb::Role::Primary => Role::Primary,
        pb::Role::Replica => Role::Replica,
        pb::Role::Down => Role::Down,
        pb::Role::Unspecified => Role::Unknown,
    };
    r.server_up = st.server_up;
    r.down_reason = st.down_reason.clone();
    r.service_state = Some(match st.service_state() {
        pb::ServiceState::Running => "running",
        pb::ServiceState::Stopped => "stopped",
        pb::ServiceState::Unknown | pb::ServiceState::Unspecified => "unknown",
    }
    .to_owned());
    r.service_detail = Some(st.service_detail.clone());
    r.service_backend = Some(st.service_backend.clone());
    r.timeline = st.timeline;
    r.system_identifier = st.system_identifier.clone();
    r.cluster_state = st.cluster_state.clone();
    r.current_lsn = current;
    r.received_lsn = received;
    r.replayed_lsn = replayed;
    r.replay_delay_seconds = st.replay_delay_seconds;
    r.wal_receiver = st.wal_receiver.as_ref().map(|w| WalReceiverView {
        status: w.status.clone(),
        sender_host: w.sender_host.clone(),
        sender_port: w.sender_port,
        slot_name: w.slot_name.clone(),
    });
    r.postgres_version = st.postgres_version.clone();
    r.majors = NodeMajors {
        server_major: st.postgres_version_num.map(|n| Major::from_version_num(n).number()),
        data_major: st.data_major,
        binaries_major: st.binaries_major,
    };
    r.agent_version = Some(st.agent_version.clone());
    r.hostname = Some(st.hostname.clone());
    r.data_directory = Some(st.data_directory.clone());
    r.disk_free_bytes = st.disk_free_bytes;
    r.disk_total_bytes = st.disk_total_bytes;
    r.checkpoint_lsn = st.checkpoint_lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
    r.configured_synchronous_standby_names = st.configured_synchronous_standby_names.clone();
    r.synchronous_standby_names = st.synchronous_standby_names.clone();
    r.sync_rep_waiting = st.sync_rep_waiting;
    r.sync_rep_oldest_wait_seconds = st.sync_rep_oldest_wait_seconds;
    r.slow_change = st.slow_change.clone();
    r.wal_receiver_error = st.wal_receiver_error.clone();
    r
}

/// The primary's pg_stat_replication row for `node`: by application_name
/// (pgfleet sets it to the node name), else through the slot the replica's
/// WAL receiver uses (the slot's active_pid is the WAL sender's pid), else by
/// client address when only one connection comes from it.
fn upstream_row<'a>(
    primary: &'a pb::ReplicationInfo,
    node: &Node,
    receiver_slot: Option<&str>,
) -> Option<&'a pb::StandbyConnection> {
    let by_name = primary
        .standbys
        .iter()
        .find(|s| s.application_name == node.name.as_str());
    let by_slot = || {
        let slot = receiver_slot?;
        let pid = primary
            .slots
            .iter()
            .find(|s| s.slot_name == slot)?
            .active_pid?;
        primary.standbys.iter().find(|s| s.pid == pid)
    };
    let by_addr = || {
        let mut from_host = primary
            .standbys
            .iter()
            .filter(|s| s.client_addr.as_deref() == Some(node.host.as_str()));
        let first = from_host.next()?;
        from_host.next().is_none().then_some(first)
    };
    by_name.or_else(by_slot).or_else(by_addr)
}

fn upstream_view(s: &pb::StandbyConnection) -> UpstreamView {
    let l = |v: &Option<String>| v.as_deref().and_then(|v| Lsn::parse(v).ok());
    UpstreamView {
        application_name: s.application_name.clone(),
        client_addr: s.client_addr.clone(),
        state: s.state.clone(),
        sync_state: s.sync_state.clone(),
        sync_priority: s.sync_priority,
        sent_lsn: l(&s.sent_lsn),
        flush_lsn: l(&s.flush_lsn),
        replay_lsn: l(&s.replay_lsn),
        replay_lag_bytes: s.replay_lag_bytes,
        write_lag_seconds: s.write_lag_seconds,
        flush_lag_seconds: s.flush_lag_seconds,
        replay_lag_seconds: s.replay_lag_seconds,
    }
}

fn merge(cluster: &Cluster, answers: Vec<NodeAnswer>) -> ClusterReport {
    let mut nodes: Vec<NodeReport> = cluster
        .nodes
        .iter()
        .zip(&answers)
        .map(|(n, a)| node_report(n, a))
        .collect();
    let mut warnings = Vec::new();

    let primaries: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].role == Role::Primary)
        .collect();
    if primaries.len() > 1 {
        let names: Vec<&str> = primaries.iter().map(|&i| nodes[i].name.as_str()).collect();
        warnings.push(format!(
            "{} nodes report being primary ({}): only one may take writes; fence the stale one",
            names.len(),
            names.join(", ")
        ));
    }
    let primary = (primaries.len() == 1).then(|| primaries[0]);

    if let Some(p) = primary {
        let p_lsn = nodes[p].current_lsn;
        let p_tl = nodes[p].timeline;
        let p_sysid = nodes[p].system_identifier.clone();
        let p_repl = answers[p].replication.as_ref();
        for (i, node) in cluster.nodes.iter().enumerate() {
            if i == p {
                continue;
            }
            let r = &mut nodes[i];
            if r.system_identifier.is_some() && r.system_identifier != p_sysid {
                warnings.push(format!(
                    "{} has system identifier {} but the primary {} has {}: it is not a copy of this cluster",
                    r.name,
                    r.system_identifier.as_deref().unwrap_or("?"),
                    cluster.nodes[p].name,
                    p_sysid.as_deref().unwrap_or("?")
                ));
            }
            if r.role != Role::Replica {
                continue;
            }
            if let (Some(pl), Some(rl)) = (p_lsn, r.replayed_lsn) {
                r.lag_bytes = Some(pl.bytes_since(rl));
            }
            let receiver_slot = r.wal_receiver.as_ref().and_then(|w| w.slot_name.clone());
            r.replication = p_repl
                .and_then(|pr| upstream_row(pr, node, receiver_slot.as_deref()))
                .map(upstream_view);
            if r.replication.is_none() {
                warnings.push(format!(
                    "{} is a replica but the primary {} shows no replication connection from it{}",
                    r.name,
                    cluster.nodes[p].name,
                    r.wal_receiver_error.as_ref().map(|e| format!("; its server log: {e}")).unwrap_or_default()
                ));
            }
            if let (Some(a), Some(b)) = (r.timeline, p_tl)
                && a != b
            {
                warnings.push(format!(
                    "{} is on timeline {a}, the primary {} on {b}",
                    r.name, cluster.nodes[p].name
                ));
            }
        }
        blocked_writes(&mut nodes, p, answers[p].replication.as_ref(), &mut warnings);
    } else if primaries.is_empty() && nodes.iter().any(|n| n.reachable) {
        warnings.push("no node reports being primary".into());
    }
    if let Some(m) = mixed_majors(&cluster.name.to_string(), &nodes) {
        warnings.push(m);
    }
    for n in &nodes {
        if let Some(c) = &n.slow_change {
            warnings.push(format!("the agent of {} has a change stuck in PostgreSQL: {c}", n.name));
        }
    }

    ClusterReport {
        name: cluster.name.to_string(),
        primary: primary.map(|p| nodes[p].name.clone()),
        nodes,
        warnings,
        policy: None,
    }
}

/// A cluster whose reachable nodes do not all run one PostgreSQL major
/// (`majors::mixed`): status warns, switchover and failover refuse.
pub fn mixed_majors(cluster: &str, nodes: &[NodeReport]) -> Option<String> {
    crate::majors::mixed(cluster, nodes.iter().filter(|n| n.reachable).map(|n| (n.name.as_str(), &n.majors)))
}

/// Writes the primary cannot commit (DESIGN.md invariant 12): sessions
/// waiting in SyncRep, and a synchronous_standby_names that the streaming
/// standbys do not meet, naming the missing ones and why they are missing.
fn blocked_writes(
    nodes: &mut [NodeReport],
    p: usize,
    replication: Option<&pb::ReplicationInfo>,
    warnings: &mut Vec<String>,
) {
    let streaming: Vec<String> = replication
        .map(|r| {
            r.standbys
                .iter()
                .filter(|s| s.state == "streaming")
                .map(|s| s.application_name.clone())
                .collect()
        })
        .unwrap_or_default();
    let text = nodes[p].synchronous_standby_names.clone().unwrap_or_default();
    let missing = pgfleet_proto::sync::SyncSpec::parse(&text)
        .ok()
        .and_then(|spec| spec.missing(&streaming))
        .unwrap_or_default();
    let why: Vec<String> = missing
        .iter()
        .map(|m| {
            let reason = nodes
                .iter()
                .find(|n| n.name.eq_ignore_ascii_case(m))
                .map(|n| match (&n.wal_receiver_error, n.role) {
                    (Some(e), _) => format!(" (its server log: {e})"),
                    (None, Role::Down) => " (its server is down)".to_owned(),
                    (None, Role::Unknown) => " (its agent does not answer)".to_owned(),
                    _ => String::new(),
                })
                .unwrap_or_default();
            format!("{m}{reason}")
        })
        .collect();
    let primary = &mut nodes[p];
    if !missing.is_empty() {
        warnings.push(format!(
            "commits on {} wait for synchronous replication: synchronous_standby_names = '{text}' is not met; \
             not streaming: {}",
            primary.name,
            why.join(", ")
        ));
    }
    if primary.sync_rep_waiting > 0 {
        warnings.push(format!(
            "writes are blocked on {}: {} session(s) wait for synchronous replication, the oldest for {}",
            primary.name,
            primary.sync_rep_waiting,
            seconds(primary.sync_rep_oldest_wait_seconds.unwrap_or(0.0))
        ));
    }
    primary.missing_synchronous_standbys = missing;
}

/// Human-readable byte count: "0 B", "12.3 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

pub fn seconds(s: f64) -> String {
    humantime::format_duration(Duration::from_millis((s.max(0.0) * 1000.0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_formatting() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 * 1024 * 1024), "16.0 MiB");
    }
}
