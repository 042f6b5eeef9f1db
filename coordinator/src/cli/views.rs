//! The read views as the CLI prints them for people (`slots`, `wal`, `sync
//! show`, `ops list|show`): rendered here from the typed reports, the same
//! for a report made in-process and one `pgfleet serve` sent as JSON.

use crate::cli::table::Table;
use crate::fleet_status::bytes;
use crate::ops::store::OpRecord;
use crate::slots::SlotsReport;
use crate::sync::SyncReport;
use crate::wal::WalReport;

pub fn slots(report: &SlotsReport) -> String {
    let mut t = Table::new(&[
        "CLUSTER", "NODE", "SLOT", "TYPE", "ACTIVE", "RESTART_LSN", "RETAINED", "WAL_STATUS", "NOTE",
    ]);
    for n in &report.nodes {
        if let Some(e) = &n.error {
            t.row(vec![
                n.cluster.clone(),
                n.node.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                e.clone(),
            ]);
        }
        for s in &n.slots {
            let active = match (s.active, s.active_pid) {
                (true, Some(pid)) => format!("yes (pid {pid})"),
                (true, None) => "yes".into(),
                (false, _) => "no".into(),
            };
            let note = if s.inactive_retaining_wal {
                "inactive, holding WAL back".to_owned()
            } else {
                String::new()
            };
            t.row(vec![
                n.cluster.clone(),
                n.node.clone(),
                s.slot_name.clone(),
                s.slot_type.clone(),
                active,
                s.restart_lsn.map(|l| l.to_string()).unwrap_or("-".into()),
                s.retained_wal_bytes.map(bytes).unwrap_or("-".into()),
                s.wal_status.clone().unwrap_or("-".into()),
                note,
            ]);
        }
    }
    if t.is_empty() {
        return "no replication slots\n".into();
    }
    t.render()
}

pub fn wal(w: &WalReport) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut s = format!("{} ({})\n", w.node, w.role);
    if w.role == "primary" {
        s += &format!(
            "  insert LSN    {:<14} WAL file {}\n",
            dash(&w.insert_lsn),
            dash(&w.insert_walfile)
        );
        s += &format!(
            "  write LSN     {:<14} WAL file {}   (pg_current_wal_lsn)\n",
            dash(&w.current_lsn),
            dash(&w.write_walfile)
        );
        s += &format!(
            "  flush LSN     {:<14} WAL file {}\n",
            dash(&w.flush_lsn),
            dash(&w.flush_walfile)
        );
    } else {
        s += &format!("  received LSN  {}\n", dash(&w.received_lsn));
        s += &format!("  replayed LSN  {}\n", dash(&w.replayed_lsn));
    }
    let a = &w.archiver;
    s += &format!("  archive_mode  {}\n", w.archive_mode);
    s += &format!(
        "  archived      {} (last {} at {})\n",
        a.archived_count,
        dash(&a.last_archived_wal),
        dash(&a.last_archived_time)
    );
    s += &format!(
        "  failed        {} (last {} at {})\n",
        a.failed_count,
        dash(&a.last_failed_wal),
        dash(&a.last_failed_time)
    );
    s
}

pub fn sync(r: &SyncReport) -> String {
    let mut s = format!(
        "cluster {}: primary {}, synchronous_standby_names = {}\n",
        r.cluster,
        r.primary,
        if r.synchronous_standby_names.is_empty() {
            "'' (asynchronous)".to_owned()
        } else {
            format!("'{}'", r.synchronous_standby_names)
        }
    );
    let mut t = Table::new(&["STANDBY", "ADDRESS", "STATE", "SYNC_STATE", "PRIORITY"]);
    for st in &r.standbys {
        t.row(vec![
            st.application_name.clone(),
            st.client_addr.clone().unwrap_or_else(|| "-".into()),
            st.state.clone(),
            st.sync_state.clone(),
            st.sync_priority.to_string(),
        ]);
    }
    if t.is_empty() {
        s.push_str("no standby connected\n");
    } else {
        s.push_str(&t.render());
    }
    s
}

pub fn ops_list(ops: &[OpRecord]) -> String {
    let mut t = Table::new(&["OPERATION", "CLUSTER", "STATE", "STARTED", "SUMMARY", "CALLER"]);
    for o in ops {
        t.row(vec![
            o.id.clone(),
            o.cluster.clone(),
            o.state.to_owned(),
            o.started_at.clone(),
            o.summary.clone(),
            o.caller.clone(),
        ]);
    }
    if t.is_empty() {
        "no operations journaled\n".into()
    } else {
        t.render()
    }
}

pub fn op(o: &OpRecord) -> String {
    let mut s = format!(
        "{} ({}) on cluster {}: {}\n  {}\n  started {} by {}\n",
        o.id, o.kind, o.cluster, o.state, o.summary, o.started_at, o.caller
    );
    if let Some(e) = &o.ended_at {
        s += &format!("  ended {e}");
        if let Some(d) = o.detail.as_ref().filter(|d| !d.is_empty()) {
            s += &format!(": {d}");
        }
        s.push('\n');
    }
    for e in &o.journal {
        // The plan line holds the whole typed plan: for people, its title
        // and steps (`--json` keeps it whole).
        let plan = (e.step == "plan")
            .then(|| serde_json::from_str::<crate::ops::plan::Plan>(&e.detail).ok())
            .flatten();
        let detail = match &plan {
            Some(p) => format!("{} ({} steps)", p.title, p.steps.len()),
            None => pgfleet_proto::one_line(&e.detail, 100_000),
        };
        s += &format!("  {} {:<26} {:<10} {detail}\n", e.time, e.step, e.event);
        if let Some(p) = plan {
            for (i, st) in p.steps.iter().enumerate() {
                s += &format!("      {:>2}. [{}] {}: {}\n", i + 1, st.host(), st.name(), st.describe());
            }
        }
    }
    if o.state == "interrupted" {
        s += &format!(
            "interrupted: finish it with `pgfleet ops resume {}` or stop it with `pgfleet ops abort {}`\n",
            o.id, o.id
        );
    }
    s
}
