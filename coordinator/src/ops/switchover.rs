//! `pgfleet switchover`, planned: stop the old primary cleanly (its
//! shutdown checkpoint is its last WAL), wait until the candidate has
//! replayed past it, promote, point the old primary (no pg_rewind needed:
//! it stopped exactly where the new timeline begins) and every other
//! replica at the new primary, each with a slot there, and carry
//! synchronous_standby_names over. DESIGN.md invariants 5-7 and 11-12.
//!
//! Everything is checked before the plan is made ([`preflight`]); the plan
//! runs through the one executor ([`crate::ops::exec`]).

use std::time::Instant;

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::sync::SyncSpec;

use crate::client::Deadlines;
use crate::fleet_status::{self, ClusterReport, NodeReport, Role};
use crate::inventory::{Cluster, Inventory, Node};
use crate::ops::ctx::OpCtx;
use crate::ops::exec::{self, MoveError, MoveReport, call};
use crate::ops::failover::{node, report, slot_of};
use crate::ops::plan::{FollowerSlot, Plan, Step, settle_seconds};

/// Hot-standby limits: every standby's must be at least its primary's.
type Limit = (&'static str, fn(&pb::Settings) -> u32);
const LIMITS: [Limit; 5] = [
    ("max_connections", |s| s.max_connections),
    ("max_worker_processes", |s| s.max_worker_processes),
    ("max_wal_senders", |s| s.max_wal_senders),
    ("max_prepared_transactions", |s| s.max_prepared_transactions),
    ("max_locks_per_transaction", |s| s.max_locks_per_transaction),
];

#[derive(Debug)]
pub struct SwitchoverPlan<'a> {
    pub cluster: &'a Cluster,
    pub old: &'a Node,
    pub new: &'a Node,
    pub others: Vec<&'a Node>,
    pub report: ClusterReport,
    pub sync: SyncSpec,
    pub warnings: Vec<String>,
}

/// Everything checked before a switchover touches anything.
pub async fn preflight<'a>(
    inventory: &'a Inventory,
    cluster: &str,
    to: Option<&str>,
    d: Deadlines,
) -> Result<SwitchoverPlan<'a>, MoveError> {
    let c = inventory
        .select(Some(cluster))
        .map_err(|e| MoveError::Invalid { what: "cluster", reason: e.to_string() })?[0];
    if let Some(t) = to
        && node(c, t).is_none()
    {
        return Err(MoveError::Invalid {
            what: "--to",
            reason: format!(
                "no node {t:?} in cluster {}; its nodes: {}",
                c.name,
                c.nodes.iter().map(|n| n.name.to_string()).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let fleet = fleet_status::gather(&[c], d).await;
    let cr = fleet.clusters.into_iter().next().ok_or_else(|| MoveError::Refused("no status".into()))?;
    let old_name = cr.primary.clone().ok_or_else(|| {
        MoveError::Refused(format!(
            "cluster {} has no single running primary ({}); for a lost primary use `pgfleet failover`",
            c.name,
            cr.warnings.join("; ")
        ))
    })?;
    let old = node(c, &old_name).ok_or_else(|| MoveError::Refused(format!("{old_name} not in inventory")))?;
    let unreachable: Vec<&str> = cr.nodes.iter().filter(|n| !n.reachable).map(|n| n.name.as_str()).collect();
    if !unreachable.is_empty() {
        return Err(MoveError::Refused(format!(
            "the agents of {} do not answer; a switchover must be able to re-point every node",
            unreachable.join(", ")
        )));
    }
    if let Some(m) = fleet_status::mixed_majors(&c.name.to_string(), &cr.nodes) {
        return Err(MoveError::Refused(m));
    }
    let p_report = report(&cr, &old_name).ok_or_else(|| MoveError::Refused("primary missing".into()))?;
    let old_settings = call(old, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?;
    let sync = SyncSpec::parse(&old_settings.synchronous_standby_names).unwrap_or_else(|_| SyncSpec::asynchronous());

    // The candidate: --to, else a synchronous standby that streams with the
    // least lag, else the streaming standby with the least lag.
    let streaming = |r: &NodeReport| r.role == Role::Replica && r.replication.as_ref().is_some_and(|v| v.state == "streaming");
    let new_name = match to {
        Some(t) => t.to_owned(),
        None => {
            let mut cands: Vec<&NodeReport> = cr.nodes.iter().filter(|r| streaming(r)).collect();
            cands.sort_by_key(|r| {
                let is_sync = r
                    .replication
                    .as_ref()
                    .is_some_and(|v| v.sync_state == "sync" || v.sync_state == "quorum");
                (!is_sync, r.lag_bytes.unwrap_or(u64::MAX))
            });
            cands
                .first()
                .map(|r| r.name.clone())
                .ok_or_else(|| MoveError::Refused(format!("no standby of {} is streaming", c.name)))?
        }
    };
    let new = node(c, &new_name).ok_or_else(|| MoveError::Refused(format!("{new_name} not in inventory")))?;
    let n_report = report(&cr, &new_name).ok_or_else(|| MoveError::Refused("candidate missing".into()))?;
    if new_name == old_name {
        return Err(MoveError::Refused(format!("{new_name} is already the primary")));
    }
    let mut problems = Vec::new();
    if !streaming(n_report) {
        problems.push(format!(
            "{new_name} is not streaming from {old_name} (role {}, state {})",
            n_report.role.as_str(),
            n_report.replication.as_ref().map(|v| v.state.as_str()).unwrap_or("no connection")
        ));
    }
    if n_report.timeline != p_report.timeline {
        problems.push(format!(
            "{new_name} is on timeline {:?}, {old_name} on {:?}",
            n_report.timeline, p_report.timeline
        ));
    }
    let others: Vec<&Node> = c
        .nodes
        .iter()
        .filter(|n| n.name.as_str() != old_name && n.name.as_str() != new_name)
        .collect();
    let mut warnings = Vec::new();
    if n_report.role == Role::Replica {
        let new_settings = call(new, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?;
        if let Some(p) = &new_settings.replay_pause_state
            && p != "not paused"
        {
            problems.push(format!("WAL replay on {new_name} is {p}; resume it with pg_wal_replay_resume()"));
        }
        // Failover logical slots (17+) go over only if the candidate has
        // them synchronized and persisted: its consumers would otherwise
        // find them gone.
        for slot in &old_settings.failover_slots {
            match new_settings.failover_slots.iter().find(|f| f.name == slot.name) {
                Some(f) if f.usable => {}
                found => problems.push(format!(
                    "logical slot {} on {old_name} has failover = true but is not ready on {new_name} ({}): \
                     its consumers would lose it. A synchronized slot becomes ready once its consumer has \
                     advanced it on {old_name}; `pgfleet sync set` makes the synchronous standbys synchronize \
                     failover slots",
                    slot.name,
                    match found {
                        None => "not synchronized there",
                        Some(_) => "synchronized but still temporary or invalidated",
                    }
                )),
            }
        }
        // After the switch every other node is a standby of the candidate.
        let mut followers = vec![(old_name.clone(), old_settings.clone())];
        for o in &others {
            let r = report(&cr, o.name.as_str());
            if r.is_some_and(|r| r.server_up) {
                followers.push((o.name.to_string(), call(o, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await).await?));
            }
        }
        for (name, get) in LIMITS {
            let theirs = get(&new_settings);
            for (f, s) in &followers {
                if get(s) < theirs {
                    problems.push(format!(
                        "{name} is {} on {f} but {theirs} on {new_name}: as a standby of {new_name}, {f} would refuse to start; raise it first",
                        get(s)
                    ));
                }
            }
        }
    }
    let not_carried: Vec<&str> = old_settings
        .logical_slots
        .iter()
        .filter(|s| !old_settings.failover_slots.iter().any(|f| &f.name == *s))
        .map(String::as_str)
        .collect();
    if !not_carried.is_empty() {
        warnings.push(format!(
            "logical replication slots on {old_name} are not carried over by a promotion and will not exist on {new_name}: {} \
             (on PostgreSQL 17+ a slot created with failover = true is)",
            not_carried.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(MoveError::Refused(problems.join("; ")));
    }
    Ok(SwitchoverPlan {
        cluster: c,
        old,
        new,
        others,
        report: cr,
        sync,
        warnings,
    })
}


/// The switchover as steps, in the order they act.
pub fn plan(p: &SwitchoverPlan<'_>) -> Plan {
    let (old, new) = (&p.old.name, &p.new.name);
    let role = p.cluster.replication_role.clone();
    let slot = |n: &Node| slot_of(n, report(&p.report, n.name.as_str()));
    let mut steps = vec![
        // The old primary holds the role its followers will connect as
        // (and can take the candidate back later); the candidate must
        // admit every node that will follow it before anything moves.
        Step::Admit {
            upstream: old.clone(),
            role: role.clone(),
            followers: vec![FollowerSlot {
                node: new.clone(),
                slot: slot(p.new),
                in_use: report(&p.report, new.as_str()).is_some_and(|r| r.streams_through(p.old, slot(p.new).as_str())),
            }],
        },
        Step::Replay { standby: new.clone(), primary: old.clone() },
    ];
    // None of them streams from the candidate yet.
    let mut followers = vec![FollowerSlot { node: old.clone(), slot: old.default_slot(), in_use: false }];
    followers.extend(p.others.iter().map(|r| FollowerSlot { node: r.name.clone(), slot: slot(r), in_use: false }));
    steps.push(Step::Admit { upstream: new.clone(), role, followers });
    let no_return = steps.len();
    let new_sync = p.sync.replacing(new.as_str(), old.as_str());
    if p.sync.is_synchronous() {
        steps.push(Step::SyncConfig { node: new.clone(), value: new_sync.to_string() });
    }
    steps.push(Step::Fence { node: old.clone(), immediate: false });
    steps.push(Step::CatchUp { node: new.clone(), fenced: old.clone() });
    steps.push(Step::Promote { node: new.clone() });
    steps.push(Step::Follow { node: old.clone(), upstream: new.clone(), slot: old.default_slot(), reset_sync: true });
    for r in &p.others {
        steps.push(Step::Follow { node: r.name.clone(), upstream: new.clone(), slot: slot(r), reset_sync: false });
    }
    if new_sync.is_synchronous() {
        steps.push(Step::RememberSync { value: new_sync.to_string() });
        steps.push(Step::Writes { node: new.clone() });
    }
    steps.push(Step::DropOldSlots { node: old.clone() });
    let mut standbys = vec![old.clone()];
    standbys.extend(p.others.iter().map(|r| r.name.clone()));
    steps.push(Step::Verify { node: new.clone(), standbys, seconds: settle_seconds() });
    Plan {
        title: format!("switch over {} from {old} to {new}", p.cluster.name),
        steps,
        no_return: Some((
            no_return,
            format!(
                "switchover of {} from {old} to {new} is changing the cluster; stopping midway could leave it without a primary",
                p.cluster.name
            ),
        )),
        warnings: p.warnings.clone(),
    }
}

/// Runs a switchover plan.
pub async fn switchover(inventory: &Inventory, p: SwitchoverPlan<'_>, d: Deadlines, op: &OpCtx) -> Result<MoveReport, MoveError> {
    let started = Instant::now();
    let plan = plan(&p);
    let done = exec::run(inventory, p.cluster, &plan, d, op).await?;
    let new_sync = p.sync.replacing(p.new.name.as_str(), p.old.name.as_str());
    Ok(MoveReport {
        operation: op.id().to_owned(),
        cluster: p.cluster.name.to_string(),
        old_primary: p.old.name.to_string(),
        new_primary: p.new.name.to_string(),
        timeline: done.timeline.unwrap_or_default(),
        steps: done.steps,
        write_unavailable_seconds: done.write_unavailable.map(|u| u.as_secs_f64()),
        synchronous_standby_names: new_sync.to_string(),
        warnings: p.warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}
