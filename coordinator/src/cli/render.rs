//! An operation's typed answer ([`OpResult`]) as the CLI prints it: text
//! for people, or the `--json` document. The same function renders an
//! operation run in-process and one run by `pgfleet serve`, whose answer
//! arrives as the same typed value.

use crate::fleet_status;
use crate::ops::exec::MoveReport;
use crate::ops::plan::Plan;
use crate::ops::rejoin::RejoinReport;
use crate::ops::result::OpResult;
use crate::rebuild::RebuildReport;

/// `--dry-run`: the plan, and nothing changed.
pub fn plan_text(plan: &Plan) -> String {
    let mut s = format!("plan (dry run, nothing changed): {}\n", plan.title);
    for (i, st) in plan.steps.iter().enumerate() {
        s += &format!("  {:>2}. [{}] {}: {}\n", i + 1, st.host(), st.name(), st.describe());
    }
    for w in &plan.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}

pub fn rebuild_text(report: &RebuildReport) -> String {
    let lag = report.lag_bytes.map(fleet_status::bytes).unwrap_or_else(|| "-".into());
    let mut s = format!(
        "rebuilt {} from {} in {:.1}s: {} ({}), lag {lag}, slot {}\n",
        report.node, report.upstream, report.seconds, report.state, report.sync_state, report.slot
    );
    if let Some(m) = &report.moved_aside_to {
        s += &format!("previous data directory kept at {m}\n");
    }
    if let Some(l) = &report.log_file {
        s += &format!("pg_basebackup log: {l}\n");
    }
    s
}

pub fn move_text(r: &MoveReport) -> String {
    let old_now = if r.operation.starts_with("failover") { "is fenced" } else { "follows it" };
    let mut s = format!(
        "{}: {} is the primary of {} (timeline {}), {} {old_now}; took {:.2}s",
        r.operation, r.new_primary, r.cluster, r.timeline, r.old_primary, r.seconds
    );
    if let Some(w) = r.write_unavailable_seconds {
        s += &format!(", writes unavailable for {w:.3}s");
    }
    s.push('\n');
    for st in &r.steps {
        s += &format!("  {:<12} {:<10} {:>7.3}s  {}\n", st.step, st.host, st.seconds, st.detail);
    }
    if !r.synchronous_standby_names.is_empty() {
        s += &format!("synchronous_standby_names = '{}'\n", r.synchronous_standby_names);
    }
    for w in &r.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}

fn rejoin_text(r: &RejoinReport) -> String {
    let mut s = format!("{} rejoined as a standby of {} ({}) in {:.2}s\n", r.node, r.primary, r.method, r.seconds);
    for st in &r.steps {
        s += &format!("  {:<12} {:<10} {:>7.3}s  {}\n", st.step, st.host, st.seconds, st.detail);
    }
    s
}

/// Text for people.
pub fn text(r: &OpResult) -> String {
    match r {
        OpResult::Plan(p) => plan_text(p),
        OpResult::RebuildPlan { plan, agent_steps } => {
            let mut s = plan_text(plan);
            s += "what the agents will do:\n";
            for (i, step) in agent_steps.iter().enumerate() {
                s += &format!("  {:>2}. [{}] {}: {}\n", i + 1, step.host, step.step, step.description);
                if !step.argv.is_empty() {
                    s += &format!("        $ {}\n", pgfleet_proto::shell_words(&step.argv));
                }
                if let Some(sql) = &step.sql {
                    s += &format!("        SQL: {sql}\n");
                }
            }
            s
        }
        OpResult::Rebuilt(report) => rebuild_text(report),
        OpResult::RebuiltAll { cluster, primary, rebuilt } => {
            let mut s: String = rebuilt.iter().map(rebuild_text).collect();
            s += &format!("rebuilt {} replica(s) of {cluster} from {primary}, one at a time\n", rebuilt.len());
            s
        }
        OpResult::Sync(report) => crate::cli::views::sync(report),
        OpResult::Moved(m) => move_text(m),
        OpResult::Rejoined(r) => rejoin_text(r),
        OpResult::SlotDropped(r) => {
            let mut s = format!("dropped replication slot {} on {}", r.slot, r.node);
            if let Some(b) = r.released_wal_bytes {
                s += &format!(" ({} of WAL no longer retained)", fleet_status::bytes(b));
            }
            if r.terminated_sender {
                s += "; its WAL sender was terminated";
            }
            s.push('\n');
            s
        }
        OpResult::Resumed { operation, cluster, primary, moved, rejoined } => {
            resumed_text(operation, cluster, primary, moved.as_ref(), rejoined)
        }
        OpResult::Aborted { operation, state } => format!("aborted {operation}: {}\n", state.join("; ")),
        OpResult::Restarted { node } => format!("{node} restarted in place\n"),
        OpResult::Policy { cluster, policy, dry_run } => {
            format!("{cluster}: {}{}\n", policy.describe(), if *dry_run { " (dry run, nothing changed)" } else { "" })
        }
    }
}

fn resumed_text(operation: &str, cluster: &str, primary: &str, moved: Option<&MoveReport>, rejoined: &[RejoinReport]) -> String {
    let mut s = moved.map(move_text).unwrap_or_default();
    for r in rejoined {
        s += &format!("{} rejoined as a standby of {} ({})\n", r.node, r.primary, r.method);
    }
    s += &format!("resumed {operation}: {primary} is the primary of {cluster}\n");
    s
}

/// The `--json` document.
pub fn json(r: &OpResult) -> String {
    let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
    match r {
        OpResult::Plan(p) => pretty(p.to_json()),
        OpResult::RebuildPlan { plan, agent_steps } => {
            let mut v = plan.to_json();
            v["agent_steps"] = serde_json::to_value(agent_steps).unwrap_or_default();
            pretty(v)
        }
        // A rebuild's --json output is a stream of JSON lines (its events):
        // its result is one line too.
        OpResult::Rebuilt(report) => format!("{}\n", serde_json::json!({ "result": report })),
        OpResult::RebuiltAll { cluster, primary, rebuilt } => {
            pretty(serde_json::json!({ "cluster": cluster, "primary": primary, "rebuilt": rebuilt }))
        }
        OpResult::Sync(report) => pretty(serde_json::to_value(report).unwrap_or_default()),
        OpResult::Moved(m) => pretty(serde_json::to_value(m).unwrap_or_default()),
        OpResult::Rejoined(r) => pretty(serde_json::to_value(r).unwrap_or_default()),
        OpResult::SlotDropped(r) => pretty(serde_json::to_value(r).unwrap_or_default()),
        OpResult::Resumed { operation, cluster, primary, moved, rejoined } => pretty(serde_json::json!({
            "operation": operation, "primary": primary,
            "text": resumed_text(operation, cluster, primary, moved.as_ref(), rejoined),
        })),
        OpResult::Aborted { operation, state } => pretty(serde_json::json!({ "operation": operation, "aborted": true, "state": state })),
        OpResult::Restarted { node } => pretty(serde_json::json!({ "restarted": node })),
        OpResult::Policy { cluster, policy, dry_run } => {
            pretty(serde_json::json!({ "cluster": cluster, "policy": policy, "dry_run": dry_run }))
        }
    }
}
