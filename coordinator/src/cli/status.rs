//! The `pgfleet status` table: one line per node, readable at a glance,
//! then the cluster's warnings.

use crate::fleet_status::{FleetReport, NodeReport, Role, bytes, seconds};
use crate::cli::table::Table;

pub fn render(report: &FleetReport) -> String {
    let mut t = Table::new(&[
        "CLUSTER", "NODE", "ROLE", "PG", "STATE", "TL", "LSN", "LAG", "SYNC", "SERVICE", "NOTE",
    ]);
    let mut warnings = Vec::new();
    for c in &report.clusters {
        for n in &c.nodes {
            t.row(row(&c.name, n));
        }
        warnings.extend(c.warnings.iter().map(|w| format!("warning: {}: {w}", c.name)));
        if let Some(p) = &c.policy {
            warnings.push(format!("{}: {}", c.name, p.describe()));
        }
    }
    let mut out = t.render();
    for w in warnings {
        out.push_str(&w);
        out.push('\n');
    }
    if !report.all_reachable {
        out.push_str("not every agent could be reached (see NOTE)\n");
    }
    out
}

fn row(cluster: &str, n: &NodeReport) -> Vec<String> {
    let dash = || "-".to_owned();
    let state = match n.role {
        Role::Primary => "accepting writes".to_owned(),
        Role::Replica => n
            .replication
            .as_ref()
            .map(|r| r.state.clone())
            .or_else(|| n.wal_receiver.as_ref().map(|w| format!("receiver {}", w.status)))
            .unwrap_or_else(|| "not streaming".into()),
        Role::Down => n.cluster_state.clone().unwrap_or_else(dash),
        Role::Unknown => "unreachable".into(),
    };
    let lsn = match n.role {
        Role::Primary => n.current_lsn,
        _ => n.replayed_lsn,
    }
    .map(|l| l.to_string())
    .unwrap_or_else(dash);
    let lag = match (n.lag_bytes, n.replay_delay_seconds) {
        (Some(b), Some(s)) if b > 0 => format!("{} ({})", bytes(b), seconds(s)),
        (Some(b), _) => bytes(b),
        _ => dash(),
    };
    let sync = n
        .replication
        .as_ref()
        .map(|r| r.sync_state.clone())
        .unwrap_or_else(dash);
    let service = n.service_state.clone().unwrap_or_else(dash);
    let note = n
        .error
        .clone()
        .or_else(|| n.down_reason.clone())
        .unwrap_or_default();
    // The major it runs; "15 (programs 18)" when its data directory and
    // its agent's programs disagree.
    let m = &n.majors;
    let major = match (m.major(), m.data_major, m.binaries_major) {
        (_, Some(d), Some(b)) if d != b => format!("{d} (programs {b})"),
        (Some(m), _, _) => m.to_string(),
        (None, _, _) => dash(),
    };
    vec![
        cluster.to_owned(),
        n.name.clone(),
        n.role.as_str().to_owned(),
        major,
        state,
        n.timeline.map(|t| t.to_string()).unwrap_or_else(dash),
        lsn,
        lag,
        sync,
        service,
        note,
    ]
}
