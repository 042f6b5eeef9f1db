//! `pgfleet rejoin NODE`: a former primary (fenced or crashed) back as a
//! standby of the current primary, as a typed plan: the primary admits it,
//! it is fenced (stopped, standby.signal: it can never start as a primary
//! on the way), pg_rewind when its timeline is behind the primary's (it may
//! have written WAL the new primary never saw), a rebuild only when the
//! operator allows it, then it follows the primary and streams.

use std::time::Instant;

use serde::Serialize;

use crate::client::Deadlines;
use crate::fleet_status::{self, Role};
use crate::inventory::{Cluster, Inventory};
use crate::ops::ctx::OpCtx;
use crate::ops::exec::{self, MoveError, StepTiming};
use crate::ops::plan::{FollowerSlot, Plan, Step};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RejoinReport {
    pub operation: String,
    pub node: String,
    pub primary: String,
    /// "restart", "rewind", "rebuild" or "already-streaming".
    pub method: String,
    pub steps: Vec<StepTiming>,
    pub seconds: f64,
}

/// What rejoin will do: nothing (the node streams already), or a plan.
#[derive(Debug)]
pub enum Rejoin<'a> {
    Already(RejoinReport),
    Plan { cluster: &'a Cluster, primary: String, plan: Plan },
}

/// Everything checked before a rejoin touches anything, as a plan.
pub async fn plan<'a>(inventory: &'a Inventory, name: &str, rebuild_if_needed: bool, d: Deadlines, op: &OpCtx) -> Result<Rejoin<'a>, MoveError> {
    let (c, n) = inventory
        .node(name)
        .map_err(|e| MoveError::Invalid { what: "node", reason: e.to_string() })?;
    let fleet = fleet_status::gather(&[c], d).await;
    let cr = &fleet.clusters[0];
    let me = cr
        .nodes
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| MoveError::Refused("node missing from status".into()))?;
    // Two primaries: `name` may be a former primary pgfleet isolated, back
    // on its old timeline (it acknowledged nothing since).
    let stale = match &cr.primary {
        Some(_) => None,
        None => stale_primary(inventory, c, cr, name).await?,
    };
    let primary_name = cr.primary.clone().or_else(|| stale.clone()).ok_or_else(|| {
        MoveError::Refused(format!(
            "cluster {} has no single running primary to rejoin ({}); fail over first",
            c.name,
            cr.warnings.join("; ")
        ))
    })?;
    let primary = c
        .nodes
        .iter()
        .find(|k| k.name.as_str() == primary_name)
        .ok_or_else(|| MoveError::Refused("primary not in inventory".into()))?;
    if primary_name == name {
        return Err(MoveError::Refused(format!("{name} is the cluster's primary")));
    }
    if !me.reachable {
        return Err(MoveError::Refused(format!(
            "the agent of {name} does not answer: {}",
            me.error.clone().unwrap_or_default()
        )));
    }
    if let Some(v) = me.replication.as_ref()
        && v.state == "streaming"
    {
        return Ok(Rejoin::Already(RejoinReport {
            operation: op.id().to_owned(),
            node: name.to_owned(),
            primary: primary_name,
            method: "already-streaming".into(),
            steps: Vec::new(),
            seconds: 0.0,
        }));
    }
    if me.role == Role::Primary && stale.is_none() {
        return Err(MoveError::Refused(format!(
            "{name} runs as a primary next to {primary_name}: two writable primaries. Check which writes went \
             where before anything else; rejoin only takes a node that is down or a standby (or a former primary \
             that pgfleet's last failover isolated)"
        )));
    }
    let p_timeline = cr.nodes.iter().find(|r| r.name == primary_name).and_then(|r| r.timeline).unwrap_or(0);
    // Behind the primary's timeline, or not known (its server is down and
    // its control file unread): the rewind step decides after the fence,
    // from what the fence read.
    let maybe_diverged = me.timeline.is_none_or(|t| t < p_timeline);
    let mut steps = vec![
        // The primary admits the node before it is touched (DESIGN.md
        // invariant 11): a node whose upstream would turn it away is not
        // fenced.
        Step::Admit {
            upstream: primary.name.clone(),
            role: c.replication_role.clone(),
            followers: vec![FollowerSlot { node: n.name.clone(), slot: n.name.default_slot(), in_use: false }],
        },
        // A stale primary may hold sessions waiting for a synchronous
        // standby that will never come: no clean shutdown to wait for.
        Step::Fence { node: n.name.clone(), immediate: stale.is_some() },
    ];
    if maybe_diverged {
        steps.push(Step::Rewind { node: n.name.clone(), upstream: primary.name.clone(), or_rebuild: rebuild_if_needed });
    }
    steps.push(Step::Follow { node: n.name.clone(), upstream: primary.name.clone(), slot: n.name.default_slot(), reset_sync: true });
    steps.push(Step::Verify { node: primary.name.clone(), standbys: vec![n.name.clone()], seconds: 60 });
    Ok(Rejoin::Plan {
        cluster: c,
        primary: primary_name.clone(),
        plan: Plan {
            title: format!("rejoin {name} as a standby of {primary_name}"),
            steps,
            no_return: Some((1, format!("rejoin of {name} is fencing it and pointing it at {primary_name}"))),
            warnings: Vec::new(),
        },
    })
}

/// The primary that `name` (itself running as a primary) was failed over
/// to, when the journal proves `name` isolated by that failover and its
/// timeline is behind: None otherwise.
async fn stale_primary(inventory: &Inventory, c: &Cluster, cr: &fleet_status::ClusterReport, name: &str) -> Result<Option<String>, MoveError> {
    let primaries: Vec<&fleet_status::NodeReport> = cr.nodes.iter().filter(|r| r.role == Role::Primary).collect();
    let others: Vec<&fleet_status::NodeReport> = primaries.iter().filter(|r| r.name != name).copied().collect();
    let (Some(me), [other]) = (primaries.iter().find(|r| r.name == name), others.as_slice()) else {
        return Ok(None);
    };
    let behind = matches!((me.timeline, other.timeline), (Some(mine), Some(theirs)) if mine < theirs);
    if !behind {
        return Ok(None);
    }
    let by = crate::ops::store::isolated_by(&inventory.store, c.name.as_str(), name, &other.name)
        .await
        .map_err(|e| MoveError::Refused(format!("cannot read the journal to tell whether {name} was isolated: {e}")))?;
    Ok(by.map(|_| other.name.clone()))
}

/// Runs a rejoin plan.
pub async fn run(inventory: &Inventory, c: &Cluster, name: &str, primary: String, plan: &Plan, d: Deadlines, op: &OpCtx) -> Result<RejoinReport, MoveError> {
    let started = Instant::now();
    let done = exec::run(inventory, c, plan, d, op).await?;
    Ok(RejoinReport {
        operation: op.id().to_owned(),
        node: name.to_owned(),
        primary,
        method: done.rejoined_by.unwrap_or("restart").to_owned(),
        steps: done.steps,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Plans and runs a rejoin.
pub async fn rejoin(inventory: &Inventory, name: &str, rebuild_if_needed: bool, d: Deadlines, op: &OpCtx) -> Result<RejoinReport, MoveError> {
    match plan(inventory, name, rebuild_if_needed, d, op).await? {
        Rejoin::Already(r) => Ok(r),
        Rejoin::Plan { cluster, primary, plan } => run(inventory, cluster, name, primary, &plan, d, op).await,
    }
}
