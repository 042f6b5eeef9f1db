//! `pgfleet rejoin NODE`: a former primary (fenced or crashed) back as a
//! standby of the current primary. Fenced first (stopped, standby.signal),
//! so it can never start as a primary on the way; pg_rewind when its
//! timeline is behind the primary's (it may have written WAL the new
//! primary never saw); a rebuild only when the operator allows it.

use std::time::Instant;

use pgfleet_proto::agent::v1 as pb;
use serde::Serialize;

use crate::client::{self, Deadlines};
use crate::ops::exec::{MoveError, StepTiming};
use crate::fleet_status::{self, Role};
use crate::inventory::{Inventory, Node};
use crate::ops::ctx::OpCtx;
use crate::rebuild;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RejoinReport {
    pub node: String,
    pub primary: String,
    /// "restart", "rewind", "rebuild" or "already-streaming".
    pub method: String,
    pub steps: Vec<StepTiming>,
    pub seconds: f64,
    /// With --dry-run: what would be done.
    pub plan: Option<String>,
}

async fn call<T>(
    n: &Node,
    d: Deadlines,
    f: impl AsyncFnOnce(&mut pgfleet_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>) -> Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, MoveError> {
    Ok(client::call(n, d, f).await?)
}

pub async fn rejoin(
    inventory: &Inventory,
    name: &str,
    rebuild_if_needed: bool,
    dry_run: bool,
    d: Deadlines,
    op: &OpCtx,
) -> Result<RejoinReport, MoveError> {
    let started = Instant::now();
    let (c, n) = inventory
        .node(name)
        .map_err(|e| MoveError::Invalid { what: "node", reason: e.to_string() })?;
    let fleet = fleet_status::gather(&[c], d).await;
    let cr = &fleet.clusters[0];
    let primary_name = cr.primary.clone().ok_or_else(|| {
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
    let me = cr
        .nodes
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| MoveError::Refused("node missing from status".into()))?;
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
        return Ok(RejoinReport {
            node: name.to_owned(),
            primary: primary_name,
            method: "already-streaming".into(),
            steps: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
            plan: None,
        });
    }
    let p_timeline = cr
        .nodes
        .iter()
        .find(|r| r.name == primary_name)
        .and_then(|r| r.timeline)
        .unwrap_or(0);
    let diverged = me.timeline.is_some_and(|t| t < p_timeline);
    if dry_run {
        return Ok(RejoinReport {
            node: name.to_owned(),
            primary: primary_name.clone(),
            method: "dry-run".into(),
            steps: Vec::new(),
            seconds: 0.0,
            plan: Some(format!(
            "plan (dry run, nothing changed): fence {name} (stop, standby.signal){}, create slot {} on {primary_name}, \
             point it at {primary_name} and start it as a standby",
            if diverged {
                format!(
                    ", pg_rewind it from {primary_name} (its timeline {} is behind {p_timeline})",
                    me.timeline.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                )
            } else {
                String::new()
            },
            n.name.default_slot()
        )),
        });
    }
    if me.role == Role::Primary {
        return Err(MoveError::Refused(format!(
            "{name} runs as a primary next to {primary_name}: two writable primaries. Check which writes went \
             where before anything else; rejoin only takes a node that is down or a standby"
        )));
    }

    let password = c.replication_password()?;
    // The primary admits the node before it is touched (DESIGN.md
    // invariant 11): a node whose upstream would turn it away is not fenced.
    let t = op.start(primary_name.as_str(), "admit", &format!("role, pg_hba.conf line and slot for {name}"))?;
    let admitted = crate::admit::admit(
        c,
        primary,
        &[crate::admit::Follower { node: n, slot: n.name.default_slot() }],
        &password,
        op.id(),
        d,
    )
    .await
    .map_err(|e| MoveError::Refused(e.to_string()))?;
    let detail: Vec<String> = admitted.iter().map(crate::admit::Admitted::describe).collect();
    op.done(primary_name.as_str(), "admit", t, &detail.join("; "))?;
    op.point_of_no_return(&format!("rejoin of {name} is fencing it and pointing it at {primary_name}"))?;
    let mut steps = Vec::new();
    let mut step = |s: &str, t: Instant, detail: String| {
        let seconds = op.done(name, s, t, &detail).unwrap_or_else(|_| t.elapsed().as_secs_f64());
        steps.push(StepTiming { step: s.to_owned(), host: name.to_owned(), seconds, detail });
    };

    let t = op.start(name, "fence", "stop PostgreSQL, standby.signal")?;
    let op_id = op.id().to_owned();
    let f = call(n, d, async |c| c.fence(pb::FenceRequest { operation_id: op_id, immediate: false }).await).await?;
    step("fence", t, format!("stopped; {}", f.cluster_state.clone().unwrap_or_default()));
    let my_timeline = f.timeline.or(me.timeline).unwrap_or(0);

    let mut method = "restart";
    if my_timeline < p_timeline {
        if !(f.wal_log_hints || f.data_checksums) {
            if !rebuild_if_needed {
                return Err(MoveError::Refused(format!(
                    "{name} is on timeline {my_timeline}, behind {primary_name}'s {p_timeline}, and may have diverged; \
                     pg_rewind needs wal_log_hints=on or data checksums and it has neither. \
                     Rebuild it with --rebuild-if-needed (its data directory is moved aside, not deleted)"
                )));
            }
            method = "rebuild";
        } else {
            let t = op.start(name, "rewind", &format!("pg_rewind from {primary_name}"))?;
            let prep = pb::PrepareUpstreamRequest {
                replication_role: c.replication_role.to_string(),
                replication_password: password.expose().to_owned(),
                replica_address: n.host.clone(),
                slot_name: n.name.default_slot().to_string(),
                dry_run: false,
                operation_id: op.id().to_owned(),
                for_rewind: true,
            };
            call(primary, d, async |c| c.prepare_upstream(prep).await).await?;
            let rw = pb::RewindRequest {
                upstream_host: primary.host.clone(),
                upstream_port: u32::from(primary.port),
                replication_role: c.replication_role.to_string(),
                replication_password: password.expose().to_owned(),
                operation_id: op.id().to_owned(),
            };
            match call(n, d, async |c| c.rewind(rw).await).await {
                Ok(r) => {
                    step("rewind", t, r.output_tail.last().cloned().unwrap_or_else(|| "done".into()));
                    method = "rewind";
                }
                Err(e) if rebuild_if_needed => {
                    op.failed(name, "rewind", &format!("pg_rewind failed ({e}); rebuilding as allowed"));
                    method = "rebuild";
                }
                Err(e) => return Err(e),
            }
        }
    }

    if method == "rebuild" {
        let t = op.start(name, "rebuild", &format!("from {primary_name}"))?;
        let req = rebuild::RebuildRequest {
            node: name.to_owned(),
            from: Some(primary_name.clone()),
            slot: None,
            tablespace_mappings: Vec::new(),
            spread_checkpoint: false,
            dry_run: false,
        };
        let prepared = rebuild::preflight(inventory, &req, d)
            .await
            .map_err(|e| MoveError::Step { step: "rebuild", detail: e.to_string() })?;
        let r = rebuild::execute(&prepared, &req, d, op)
            .await
            .map_err(|e| MoveError::Step { step: "rebuild", detail: e.to_string() })?;
        step("rebuild", t, format!("rebuilt; previous data kept at {}", r.moved_aside_to.unwrap_or_default()));
    } else {
        let t = op.start(name, "follow", &format!("slot on {primary_name}, primary_conninfo, start as a standby"))?;
        let slot = n.name.default_slot();
        let sreq = pb::CreateSlotRequest { slot_name: slot.to_string(), operation_id: op.id().to_owned() };
        call(primary, d, async |c| c.create_slot(sreq).await).await?;
        let creq = pb::ConfigureStandbyRequest {
            upstream_host: primary.host.clone(),
            upstream_port: u32::from(primary.port),
            replication_role: c.replication_role.to_string(),
            replication_password: password.expose().to_owned(),
            slot_name: slot.to_string(),
            application_name: name.to_owned(),
            reset_synchronous_standby_names: true,
            operation_id: op.id().to_owned(),
        };
        let r = call(n, d, async |c| c.configure_standby(creq).await).await?;
        step("follow", t, format!("started as a standby; primary_conninfo = {}", r.primary_conninfo));
        let t = op.start(name, "verify", &format!("wait until {name} streams from {primary_name}"))?;
        match crate::verify::streaming(primary, &[n], d, std::time::Duration::from_secs(60)).await {
            Ok(states) => step("verify", t, states),
            Err(why) => {
                return Err(MoveError::Step {
                    step: "verify",
                    detail: format!(
                        "{why} after 60s; {name} runs as a standby but does not follow {primary_name}: \
                         its server log says why (a diverged timeline needs pg_rewind, or --rebuild-if-needed)"
                    ),
                });
            }
        }
    }
    Ok(RejoinReport {
        node: name.to_owned(),
        primary: primary_name,
        method: method.to_owned(),
        steps,
        seconds: started.elapsed().as_secs_f64(),
        plan: None,
    })
}
