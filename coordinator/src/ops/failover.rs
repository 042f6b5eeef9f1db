//! `pgfleet failover`: the primary is gone. Fence the old primary through
//! its agent (or the operator says `--fenced`), promote the standby that
//! provably has every acknowledged commit (the most advanced of the
//! synchronous ones), re-point the rest. DESIGN.md invariants 5-7, 11-12.
//!
//! [`choose`] decides everything before anything changes; [`plan`] turns
//! the choice into steps for the one executor ([`crate::ops::exec`]).

use std::time::{Duration, Instant};

use pgfleet_proto::sync::SyncSpec;
use pgfleet_proto::{Lsn, SlotName};

use crate::client::Deadlines;
use crate::fleet_status::{self, ClusterReport, NodeReport, Role, bytes};
use crate::inventory::{Cluster, Inventory, Node};
use crate::journal;
use crate::ops::ctx::OpCtx;
use crate::ops::exec::{self, MoveError, MoveReport};
use crate::ops::plan::{FollowerSlot, Plan, Step, settle_seconds};

pub(crate) fn node<'a>(c: &'a Cluster, name: &str) -> Option<&'a Node> {
    c.nodes.iter().find(|n| n.name.as_str() == name)
}

pub(crate) fn report<'a>(cr: &'a ClusterReport, name: &str) -> Option<&'a NodeReport> {
    cr.nodes.iter().find(|n| n.name == name)
}

/// The slot a standby streams through: its current one, else its default.
pub(crate) fn slot_of(n: &Node, r: Option<&NodeReport>) -> SlotName {
    r.and_then(|r| r.wal_receiver.as_ref())
        .and_then(|w| w.slot_name.as_deref())
        .and_then(|s| SlotName::parse(s).ok())
        .unwrap_or_else(|| n.name.default_slot())
}

#[derive(Debug, Clone)]
pub struct FailoverRequest {
    pub cluster: String,
    pub to: Option<String>,
    pub fenced: bool,
    pub accept_data_loss: bool,
    pub dry_run: bool,
    /// The leader's automatic failover: the old primary's position at its
    /// last look. With it, the cluster's `max_lag_on_failover` may accept
    /// a bounded loss where there is no proof.
    pub last_primary_lsn: Option<Lsn>,
    /// The leader's automatic failover: the old primary's lease ran out,
    /// so its agent fenced it (`serve::lease`).
    pub fenced_by_lease: bool,
}

/// The candidate failover would promote, decided before anything changes.
struct Choice<'a> {
    old: &'a Node,
    old_reachable: bool,
    /// Fence by isolation: the old primary's agent does not answer and the
    /// operator did not say it is down.
    isolate: bool,
    new: &'a Node,
    received: Lsn,
    sync: SyncSpec,
    accepted_loss: Option<String>,
    standbys: Vec<&'a Node>,
}

fn choose<'a>(
    c: &'a Cluster,
    cr: &ClusterReport,
    req: &FailoverRequest,
    recalled_sync: Option<String>,
) -> Result<Choice<'a>, MoveError> {
    if let Some(p) = &cr.primary {
        return Err(MoveError::Refused(format!(
            "{p} is a running primary; a failover is for a lost primary: use `pgfleet switchover` for a planned move"
        )));
    }
    // A standby of another major is not a copy the promoted server could
    // stream to, nor one that could be promoted in its place.
    if let Some(m) = crate::fleet_status::mixed_majors(&c.name.to_string(), &cr.nodes) {
        return Err(MoveError::Refused(m));
    }
    // The old primary: the one node that is not a running replica; among
    // several, the one whose control file says it ran as a primary ("in
    // production" after a crash, "shut down" after a clean stop), since an
    // unreachable node or a stopped standby did not.
    let mut olds: Vec<&NodeReport> = cr.nodes.iter().filter(|r| r.role != Role::Replica).collect();
    if olds.len() > 1 {
        let was_primary: Vec<&NodeReport> = olds
            .iter()
            .copied()
            .filter(|r| matches!(r.cluster_state.as_deref(), Some("in production" | "shut down")))
            .collect();
        if was_primary.len() == 1 {
            olds = was_primary;
        } else if was_primary.len() > 1 {
            // Several ran as a primary (one failed over from earlier, then
            // its successor): the latest is on the highest timeline.
            let top = was_primary.iter().filter_map(|r| r.timeline).max();
            let latest: Vec<&NodeReport> = was_primary.iter().copied().filter(|r| top.is_some() && r.timeline == top).collect();
            if latest.len() == 1 {
                olds = latest;
            }
        }
    }
    if olds.len() != 1 {
        return Err(MoveError::Refused(format!(
            "cannot tell which node was the primary: {} nodes are not running replicas ({})",
            olds.len(),
            olds.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let old_r = olds[0];
    let old = node(c, &old_r.name).ok_or_else(|| MoveError::Refused("old primary not in inventory".into()))?;
    let standbys: Vec<&NodeReport> = cr.nodes.iter().filter(|r| r.role == Role::Replica).collect();
    if standbys.is_empty() {
        return Err(MoveError::Refused("no running standby to promote".into()));
    }
    // Which standbys were synchronous: the old primary's own configuration
    // (read from its files while it is down), else pgfleet's record.
    let sync_text = match old_r.configured_synchronous_standby_names.clone() {
        Some(s) => Some(s),
        None => recalled_sync,
    };
    let sync = sync_text.as_deref().and_then(|s| SyncSpec::parse(s).ok()).unwrap_or_else(SyncSpec::asynchronous);

    let received = |r: &NodeReport| r.received_lsn.or(r.replayed_lsn).unwrap_or(Lsn(0));
    let listed: Vec<&NodeReport> = standbys.iter().copied().filter(|r| sync.lists(&r.name)).collect();
    // With FIRST n or ANY n, every acknowledged commit is on at least one of
    // any (listed - n + 1) listed standbys; fewer than n missing ones means
    // the most advanced reachable listed standby has them all.
    let missing_listed = sync
        .names
        .iter()
        .filter(|n| n.as_str() != old.name.as_str() && n.as_str() != "*" && !listed.iter().any(|r| r.name == **n))
        .count();
    let provable = sync.is_synchronous() && !listed.is_empty() && (missing_listed as u32) < sync.num_sync;
    // Its agent gone, the old primary is fenced by isolation: only
    // synchronous replication makes a primary without standbys stop
    // acknowledging commits, and only if every standby that could
    // acknowledge for it is known and re-pointed.
    let isolate = !old_r.reachable && !req.fenced && !req.fenced_by_lease;
    let cannot_isolate = |why: String| {
        MoveError::Refused(format!(
            "the agent of the old primary {} does not answer ({}), so it cannot be fenced, and it cannot be isolated \
             either: {why}. Make sure it is down (power off, or stop PostgreSQL by hand) and run again with --fenced",
            old.name,
            old_r.error.as_deref().unwrap_or("unreachable")
        ))
    };
    if isolate {
        if !sync.is_synchronous() {
            return Err(cannot_isolate(
                "the cluster does not use synchronous replication, so cutting its standbys off does not stop its commits".into(),
            ));
        }
        if sync.names.iter().any(|n| n == "*") {
            return Err(cannot_isolate(format!(
                "synchronous_standby_names = '{sync}' lets any standby acknowledge its commits, even one pgfleet does not know"
            )));
        }
        if !provable {
            return Err(cannot_isolate(format!(
                "{missing_listed} of the synchronous standbys in '{sync}' do not answer and may still acknowledge its commits"
            )));
        }
    }
    // A nofailover node is never promoted; among those that hold the same
    // WAL, the highest priority wins (never over more WAL: proof first).
    let eligible = |r: &&&NodeReport| node(c, &r.name).is_some_and(|n| !n.nofailover);
    let rank = |r: &&&NodeReport| (received(r), node(c, &r.name).map_or(0, |n| n.priority));
    let best_sync = listed.iter().max_by_key(|r| received(r)).copied();
    let best_eligible_sync = listed.iter().filter(eligible).max_by_key(rank).copied();
    let best_all = standbys.iter().filter(eligible).max_by_key(rank).copied();
    let named = |t: &str| {
        if node(c, t).is_some_and(|n| n.nofailover) {
            return Err(MoveError::Refused(format!(
                "{t} is marked nofailover in the inventory: it is never promoted; name another standby, or change the inventory"
            )));
        }
        standbys
            .iter()
            .find(|r| r.name == t)
            .copied()
            .ok_or_else(|| MoveError::Refused(format!("{t} is not a running standby of {}", c.name)))
    };
    let (chosen, accepted_loss) = if provable {
        let most = best_sync.ok_or_else(|| MoveError::Refused("no synchronous candidate".into()))?;
        let best = best_eligible_sync.ok_or_else(|| {
            MoveError::Refused(format!(
                "every running synchronous standby ({}) is marked nofailover in the inventory: nobody may be promoted",
                listed.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        match &req.to {
            None if received(best) < received(most) => {
                if !req.accept_data_loss {
                    return Err(MoveError::DataLossRisk {
                        reason: format!(
                            "the synchronous standby with every acknowledged commit, {}, is marked nofailover, and {} \
                             has received less",
                            most.name, best.name
                        ),
                        candidate: best.name.clone(),
                        behind: bytes(received(most).bytes_since(received(best))),
                        reference: most.name.clone(),
                    });
                }
                (best, Some(format!("{} is behind {}, which is marked nofailover", best.name, most.name)))
            }
            None => (best, None),
            Some(t) => {
                let r = named(t)?;
                if received(r) < received(most) {
                    if !req.accept_data_loss {
                        return Err(MoveError::DataLossRisk {
                            reason: format!("{t} has received less WAL than the synchronous standby {}", most.name),
                            candidate: t.clone(),
                            behind: bytes(received(most).bytes_since(received(r))),
                            reference: most.name.clone(),
                        });
                    }
                    (r, Some(format!("{t} is behind {}", most.name)))
                } else {
                    (r, None)
                }
            }
        }
    } else {
        let cand = match &req.to {
            Some(t) => named(t)?,
            None => best_all.ok_or_else(|| {
                MoveError::Refused("no running standby may be promoted: every one is marked nofailover in the inventory".into())
            })?,
        };
        let reason = if !sync.is_synchronous() {
            format!(
                "the cluster was not using synchronous replication ({}), so acknowledged commits may exist only on {}",
                match &sync_text {
                    Some(s) if !s.is_empty() => format!("synchronous_standby_names = '{s}'"),
                    Some(_) => "synchronous_standby_names was empty".into(),
                    None => "the old primary's synchronous_standby_names cannot be read and pgfleet has no record of it".into(),
                },
                old.name
            )
        } else {
            format!("{missing_listed} of the synchronous standbys in '{sync}' are not running, too many to be sure")
        };
        let reference_lsn = standbys
            .iter()
            .map(|r| received(r))
            .chain(old_r.checkpoint_lsn)
            .chain(req.last_primary_lsn)
            .max()
            .unwrap_or(Lsn(0));
        let gap = reference_lsn.bytes_since(received(cand));
        // The cluster's policy may accept a bounded loss, measured from the
        // old primary's last position the leader saw (an automatic
        // failover only: an operator says --accept-data-loss).
        let within = match (req.last_primary_lsn, c.max_lag_on_failover) {
            (Some(_), Some(max)) if gap <= max => Some(format!(
                "{reason}; {} is {} behind the last position seen, within max_lag_on_failover ({})",
                cand.name,
                bytes(gap),
                bytes(max)
            )),
            _ => None,
        };
        match within {
            Some(w) => (cand, Some(w)),
            None if req.accept_data_loss => (cand, Some(reason)),
            None => {
                return Err(MoveError::DataLossRisk {
                    reason: match (req.last_primary_lsn, c.max_lag_on_failover) {
                        (Some(_), Some(max)) => format!("{reason}, and more than max_lag_on_failover ({})", bytes(max)),
                        _ => reason,
                    },
                    candidate: cand.name.clone(),
                    behind: format!("at least {}", bytes(gap)),
                    reference: if req.last_primary_lsn.is_some_and(|l| l >= reference_lsn) {
                        format!("{}'s last position seen", old.name)
                    } else if old_r.checkpoint_lsn.is_some_and(|l| l >= reference_lsn) {
                        format!("{}'s last checkpoint", old.name)
                    } else {
                        "the most advanced standby".into()
                    },
                });
            }
        }
    };
    if isolate && accepted_loss.is_some() {
        return Err(cannot_isolate(format!(
            "{} is not the most advanced synchronous standby, and the others cannot be re-pointed at a standby behind them",
            chosen.name
        )));
    }
    let new = node(c, &chosen.name).ok_or_else(|| MoveError::Refused("candidate not in inventory".into()))?;
    Ok(Choice {
        old,
        old_reachable: old_r.reachable,
        isolate,
        new,
        received: received(chosen),
        sync,
        accepted_loss,
        standbys: standbys
            .iter()
            .filter(|r| r.name != chosen.name)
            .filter_map(|r| node(c, &r.name))
            .collect(),
    })
}

/// A failover is for a primary that is gone: an agent that has not
/// answered its status within this is taken as gone for the plan (a
/// live agent answers in milliseconds; the detector gives it as long),
/// rather than waiting out the connect deadline of a dead host while
/// writes are down. Taken for gone, the old primary is isolated, or the
/// failover refused: never promoted next to.
const LOOK_LIMIT: Duration = Duration::from_secs(1);

/// The failover as steps, decided before anything changes.
pub async fn plan<'a>(inventory: &'a Inventory, req: &FailoverRequest, d: Deadlines) -> Result<(&'a Cluster, Plan), MoveError> {
    let c = inventory
        .select(Some(&req.cluster))
        .map_err(|e| MoveError::Invalid { what: "cluster", reason: e.to_string() })?[0];
    if let Some(t) = &req.to
        && node(c, t).is_none()
    {
        return Err(MoveError::Invalid { what: "--to", reason: format!("no node {t:?} in cluster {}", c.name) });
    }
    let cr = fleet_status::gather_cluster_within(c, d, LOOK_LIMIT).await;
    let recalled = journal::recall_sync(&inventory.store, c.name.as_str()).await;
    let ch = choose(c, &cr, req, recalled)?;
    let (old, new) = (&ch.old.name, &ch.new.name);
    let mut new_sync = ch.sync.replacing(new.as_str(), old.as_str());
    new_sync.names.retain(|n| n != old.as_str());
    new_sync.num_sync = new_sync.num_sync.min(new_sync.names.len() as u32);

    let mut steps = Vec::new();
    // The candidate admits the standbys that will follow it, while it is
    // still a standby: a refusal here leaves the cluster as it was.
    if !ch.standbys.is_empty() {
        steps.push(Step::Admit {
            upstream: new.clone(),
            role: c.replication_role.clone(),
            followers: ch
                .standbys
                .iter()
                .map(|r| FollowerSlot { node: r.name.clone(), slot: slot_of(r, report(&cr, r.name.as_str())), in_use: false })
                .collect(),
        });
    }
    let no_return = steps.len();
    steps.push(Step::Choose {
        node: new.clone(),
        received: ch.received.to_string(),
        data_loss: ch.accepted_loss.clone(),
    });
    // Fence before promoting: never two writable primaries. Isolation
    // re-points the standbys that could acknowledge for the old primary
    // (the listed ones); the others follow once the candidate is promoted.
    let follower = |r: &Node| FollowerSlot { node: r.name.clone(), slot: slot_of(r, report(&cr, r.name.as_str())), in_use: false };
    let isolated: Vec<&Node> = if ch.isolate { ch.standbys.iter().copied().filter(|r| ch.sync.lists(r.name.as_str())).collect() } else { Vec::new() };
    steps.push(if ch.old_reachable {
        Step::Fence { node: old.clone(), immediate: true }
    } else if ch.isolate {
        Step::Isolate {
            node: old.clone(),
            upstream: new.clone(),
            followers: isolated.iter().map(|r| follower(r)).collect(),
            sync: ch.sync.to_string(),
        }
    } else if req.fenced_by_lease && !req.fenced {
        Step::FencedByLease { node: old.clone() }
    } else {
        Step::FencedByOperator { node: old.clone() }
    });
    steps.push(Step::SyncConfig { node: new.clone(), value: new_sync.to_string() });
    steps.push(Step::Promote { node: new.clone() });
    for r in ch.standbys.iter().filter(|r| !isolated.iter().any(|i| i.name == r.name)) {
        steps.push(Step::Follow {
            node: r.name.clone(),
            upstream: new.clone(),
            slot: slot_of(r, report(&cr, r.name.as_str())),
            reset_sync: false,
        });
    }
    steps.push(Step::RememberSync { value: new_sync.to_string() });
    steps.push(Step::Writes { node: new.clone() });
    if !ch.standbys.is_empty() {
        steps.push(Step::Verify {
            node: new.clone(),
            standbys: ch.standbys.iter().map(|s| s.name.clone()).collect(),
            seconds: settle_seconds(),
        });
    }
    let mut warnings = Vec::new();
    if let Some(loss) = &ch.accepted_loss {
        warnings.push(format!(
            "promoted accepting data loss ({}): {loss}",
            if req.accept_data_loss { "--accept-data-loss" } else { "max_lag_on_failover" }
        ));
    }
    if ch.sync.is_synchronous() && !new_sync.is_synchronous() {
        warnings.push(format!("no synchronous standby is left for {new}: it runs asynchronously until `pgfleet sync set`"));
    }
    Ok((
        c,
        Plan {
            title: format!("fail over {} from {old} to {new}", c.name),
            steps,
            no_return: Some((
                no_return,
                format!("failover of {} to {new} is fencing and promoting; stopping midway could leave the cluster without a primary", c.name),
            )),
            warnings,
        },
    ))
}

/// Runs a failover plan.
pub async fn run(inventory: &Inventory, c: &Cluster, plan: Plan, d: Deadlines, op: &OpCtx) -> Result<MoveReport, MoveError> {
    let started = Instant::now();
    let (Some(old), Some(new)) = (plan.fences().cloned(), plan.promotes().cloned()) else {
        return Err(MoveError::Refused(format!("the plan \"{}\" neither fences nor promotes", plan.title)));
    };
    let done = exec::run(inventory, c, &plan, d, op).await?;
    let sync = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::SyncConfig { value, .. } => Some(value.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let mut warnings = plan.warnings;
    warnings.push(format!("{old} stays fenced; bring it back with: pgfleet rejoin {old}"));
    Ok(MoveReport {
        operation: op.id().to_owned(),
        cluster: c.name.to_string(),
        old_primary: old.to_string(),
        new_primary: new.to_string(),
        timeline: done.timeline.unwrap_or_default(),
        steps: done.steps,
        write_unavailable_seconds: None,
        synchronous_standby_names: sync,
        warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Plans and runs a failover.
pub async fn failover(inventory: &Inventory, req: &FailoverRequest, d: Deadlines, op: &OpCtx) -> Result<MoveReport, MoveError> {
    let (c, plan) = plan(inventory, req, d).await?;
    run(inventory, c, plan, d, op).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const INV: &str = r#"
        state_dir = "/nonexistent/pgfleet-state"
        [[clusters]]
        name = "main"
        [[clusters.nodes]]
        name = "node0"
        agent = "http://10.0.0.1:7420"
        host = "10.0.0.1"
        [[clusters.nodes]]
        name = "node1"
        agent = "http://10.0.0.2:7420"
        host = "10.0.0.2"
        [[clusters.nodes]]
        name = "node2"
        agent = "http://10.0.0.3:7420"
        host = "10.0.0.3"
    "#;

    /// node0 crashed (agent up, server down, `sync` configured); node1 and
    /// node2 replicas that received `r1` and `r2` bytes.
    fn cluster(inv: &Inventory, sync: &str, r1: Option<u64>, r2: Option<u64>) -> ClusterReport {
        let c = &inv.clusters[0];
        let mut nodes: Vec<NodeReport> = c.nodes.iter().map(NodeReport::unknown).collect();
        nodes[0].reachable = true;
        nodes[0].role = Role::Down;
        nodes[0].cluster_state = Some("in production".into());
        nodes[0].checkpoint_lsn = Some(Lsn(90));
        nodes[0].configured_synchronous_standby_names = Some(sync.to_owned());
        for (i, r) in [(1, r1), (2, r2)] {
            if let Some(r) = r {
                nodes[i].reachable = true;
                nodes[i].role = Role::Replica;
                nodes[i].server_up = true;
                nodes[i].received_lsn = Some(Lsn(r));
            }
        }
        ClusterReport {
            name: "main".into(),
            primary: None,
            nodes,
            warnings: Vec::new(),
            policy: None,
        }
    }

    fn req(to: Option<&str>, accept: bool) -> FailoverRequest {
        FailoverRequest {
            cluster: "main".into(),
            to: to.map(str::to_owned),
            fenced: false,
            accept_data_loss: accept,
            dry_run: false,
            last_primary_lsn: None,
            fenced_by_lease: false,
        }
    }

    fn pick(sync: &str, r1: Option<u64>, r2: Option<u64>, to: Option<&str>, accept: bool) -> Result<String, String> {
        let inv = Inventory::parse(INV, Path::new("i.toml")).unwrap();
        let cr = cluster(&inv, sync, r1, r2);
        choose(&inv.clusters[0], &cr, &req(to, accept), None)
            .map(|c| c.new.name.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_most_advanced_synchronous_standby_is_promoted() {
        let first = "FIRST 1 (\"node1\", \"node2\")";
        assert_eq!(pick(first, Some(100), Some(80), None, false).unwrap(), "node1");
        assert_eq!(pick(first, Some(80), Some(100), None, false).unwrap(), "node2");
        let any = "ANY 1 (\"node1\", \"node2\")";
        assert_eq!(pick(any, Some(80), Some(100), None, false).unwrap(), "node2");
    }

    #[test]
    fn a_missing_synchronous_standby_leaves_no_proof() {
        // FIRST 1: node1 may have been the only one with the last commits.
        let e = pick("FIRST 1 (\"node1\", \"node2\")", None, Some(80), None, false).unwrap_err();
        assert!(e.contains("--accept-data-loss"), "{e}");
        // FIRST 2 with one missing: every commit was on both, node2 has them.
        assert_eq!(pick("FIRST 2 (\"node1\", \"node2\")", None, Some(80), None, false).unwrap(), "node2");
    }

    #[test]
    fn asynchronous_candidates_need_accept_data_loss_and_the_gap_is_named() {
        let e = pick("", Some(60), Some(50), None, false).unwrap_err();
        // node0's checkpoint is at 90: the best candidate is 30 bytes short.
        assert!(e.contains("at least 30 B") && e.contains("node0's last checkpoint"), "{e}");
        assert_eq!(pick("", Some(60), Some(50), None, true).unwrap(), "node1");
    }

    #[test]
    fn a_named_candidate_behind_the_synchronous_one_is_refused() {
        let first = "FIRST 1 (\"node1\", \"node2\")";
        let e = pick(first, Some(100), Some(80), Some("node2"), false).unwrap_err();
        assert!(e.contains("20 B") && e.contains("node1"), "{e}");
        assert_eq!(pick(first, Some(100), Some(80), Some("node2"), true).unwrap(), "node2");
        assert_eq!(pick(first, Some(100), Some(100), Some("node2"), false).unwrap(), "node2");
    }

    #[test]
    fn an_unreachable_old_primary_is_isolated_only_with_synchronous_replication() {
        let inv = Inventory::parse(INV, Path::new("i.toml")).unwrap();
        let gone = |sync: &str, r2: Option<u64>| {
            let mut cr = cluster(&inv, sync, Some(100), r2);
            cr.nodes[0].reachable = false;
            cr.nodes[0].role = Role::Unknown;
            cr.nodes[0].configured_synchronous_standby_names = None;
            cr
        };
        let c = &inv.clusters[0];
        let isolated = |sync: &str, r2: Option<u64>, accept: bool| {
            choose(c, &gone(sync, r2), &req(None, accept), Some(sync.to_owned())).map(|ch| (ch.isolate, ch.new.name.to_string()))
        };
        assert_eq!(isolated("ANY 1 (\"node1\", \"node2\")", Some(80), false).unwrap(), (true, "node1".into()));
        // Asynchronous: cutting the standbys off does not stop its commits,
        // whatever loss the operator accepts.
        for accept in [false, true] {
            let e = isolated("", Some(80), accept).err().unwrap().to_string();
            assert!(e.contains("--fenced") && e.contains("synchronous"), "{e}");
        }
        // '*': a standby pgfleet does not know could acknowledge.
        let e = isolated("FIRST 1 (*)", Some(80), false).err().unwrap().to_string();
        assert!(e.contains("--fenced") && e.contains("any standby"), "{e}");
        // FIRST 1 with node2 missing: node2 may still acknowledge for node0.
        let e = isolated("FIRST 1 (\"node2\", \"node1\")", None, true).err().unwrap().to_string();
        assert!(e.contains("--fenced") && e.contains("do not answer"), "{e}");
        // The operator's word still stands in for the fence.
        let mut fenced = req(None, true);
        fenced.fenced = true;
        let ch = choose(c, &gone("", Some(80)), &fenced, Some(String::new())).ok().unwrap();
        assert!(!ch.isolate);
        // So does a lease that ran out, but it proves nothing about the
        // data: an asynchronous candidate still needs the loss accepted.
        let mut leased = req(None, false);
        leased.fenced_by_lease = true;
        let e = choose(c, &gone("", Some(80)), &leased, Some(String::new())).err().unwrap().to_string();
        assert!(e.contains("--accept-data-loss") && !e.contains("--fenced"), "{e}");
        leased.accept_data_loss = true;
        let ch = choose(c, &gone("", Some(80)), &leased, Some(String::new())).ok().unwrap();
        assert!(!ch.isolate && ch.accepted_loss.is_some());
    }

    #[test]
    fn nofailover_is_never_promoted_and_priority_breaks_ties() {
        let text = INV
            .replace("host = \"10.0.0.2\"", "host = \"10.0.0.2\"\n        nofailover = true")
            .replace("host = \"10.0.0.3\"", "host = \"10.0.0.3\"\n        priority = 5");
        let inv = Inventory::parse(&text, Path::new("i.toml")).unwrap();
        let c = &inv.clusters[0];
        let first = "FIRST 1 (\"node1\", \"node2\")";
        let pick = |r1: u64, r2: u64, to: Option<&str>, accept: bool| {
            choose(c, &cluster(&inv, first, Some(r1), Some(r2)), &req(to, accept), None)
                .map(|ch| ch.new.name.to_string())
                .map_err(|e| e.to_string())
        };
        // node1 has every commit but is nofailover: node2 only with the
        // loss accepted, the gap named.
        let e = pick(100, 80, None, false).unwrap_err();
        assert!(e.contains("nofailover") && e.contains("20 B"), "{e}");
        assert_eq!(pick(100, 80, None, true).unwrap(), "node2");
        assert_eq!(pick(100, 100, None, false).unwrap(), "node2");
        let e = pick(100, 100, Some("node1"), true).unwrap_err();
        assert!(e.contains("nofailover"), "{e}");

        // Equal WAL: the higher priority; more WAL always wins.
        let text = INV.replace("host = \"10.0.0.3\"", "host = \"10.0.0.3\"\n        priority = 5");
        let inv = Inventory::parse(&text, Path::new("i.toml")).unwrap();
        let c = &inv.clusters[0];
        let any = "ANY 1 (\"node1\", \"node2\")";
        let pick = |r1: u64, r2: u64| choose(c, &cluster(&inv, any, Some(r1), Some(r2)), &req(None, false), None).ok().unwrap().new.name.to_string();
        assert_eq!(pick(100, 100), "node2");
        assert_eq!(pick(101, 100), "node1");
    }

    #[test]
    fn a_running_primary_refuses_failover() {
        let inv = Inventory::parse(INV, Path::new("i.toml")).unwrap();
        let mut cr = cluster(&inv, "", Some(1), Some(1));
        cr.primary = Some("node0".into());
        let e = choose(&inv.clusters[0], &cr, &req(None, true), None).err().unwrap().to_string();
        assert!(e.contains("switchover"), "{e}");
    }
}
