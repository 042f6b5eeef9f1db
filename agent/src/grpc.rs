//! The gRPC skin: request → domain call → response, and errors through
//! `AgentError`'s one mapping onto status codes. No logic lives here.

use std::sync::Arc;

use std::pin::Pin;

use futures::Stream;
use pgfleet_proto::{RoleName, SlotName};
use pgfleet_proto::agent::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::AgentState;
use crate::error::AgentError;
use crate::secret::Secret;
use crate::{jobs, rebuild, upstream};
use crate::service::ServiceState;
use crate::status::{self, NodeStatus};

#[derive(Debug, Clone)]
pub struct AgentService {
    state: Arc<AgentState>,
}

impl AgentService {
    pub fn new(state: Arc<AgentState>) -> Self {
        AgentService { state }
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

    async fn prepare_upstream(
        &self,
        req: Request<pb::PrepareUpstreamRequest>,
    ) -> Result<Response<pb::PrepareUpstreamResponse>, Status> {
        let r = req.into_inner();
        let invalid = |field: &'static str, reason: String| AgentError::Invalid { field, reason };
        let parsed = upstream::PrepareRequest {
            role: RoleName::parse(&r.replication_role)
                .map_err(|e| invalid("replication_role", e.to_string()))?,
            password: Secret::new(r.replication_password)
                .map_err(|e| invalid("replication_password", e.to_string()))?,
            replica_addr: r.replica_address.parse().map_err(|_| {
                invalid(
                    "replica_address",
                    format!("{:?} is not an IP address", r.replica_address),
                )
            })?,
            slot: SlotName::parse(&r.slot_name).map_err(|e| invalid("slot_name", e.to_string()))?,
            dry_run: r.dry_run,
        };
        let span = info_span!("rpc", method = "PrepareUpstream", op_id = %r.operation_id,
            role = %parsed.role, replica = %parsed.replica_addr, slot = %parsed.slot, dry_run = r.dry_run);
        let p = upstream::prepare(&self.state.pg, &parsed)
            .instrument(span)
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::PrepareUpstreamResponse {
            steps: p.steps.into_iter().map(Into::into).collect(),
            role_created: p.role_created,
            hba_line_added: p.hba_line_added,
            hba_line: p.hba_line,
            hba_backup: p.hba_backup.map(|b| b.display().to_string()),
            stale_slot_dropped: p.stale_slot_dropped,
            system_identifier: p.system_identifier,
            database_size_bytes: p.database_size_bytes,
            tablespaces: p
                .tablespaces
                .into_iter()
                .map(|t| pb::Tablespace {
                    name: t.name,
                    location: t.location,
                    size_bytes: t.size_bytes,
                })
                .collect(),
            in_recovery: p.in_recovery,
            slot_held_by_replica: p.slot_held_by_replica,
        }))
    }

    async fn start_rebuild(
        &self,
        req: Request<pb::StartRebuildRequest>,
    ) -> Result<Response<pb::StartRebuildResponse>, Status> {
        let r = req.into_inner();
        let dry_run = r.dry_run;
        let parsed = rebuild::validate(&self.state.config, r).map_err(AgentError::from)?;
        let plan: Vec<pb::PlanStep> = rebuild::plan(&self.state, &parsed)
            .into_iter()
            .map(Into::into)
            .collect();
        if dry_run {
            return Ok(Response::new(pb::StartRebuildResponse {
                job_id: String::new(),
                plan,
            }));
        }
        let job = self
            .state
            .jobs
            .start("rebuild", jobs::new_id("rebuild"))
            .map_err(AgentError::from)?;
        let job_id = job.id.clone();
        // Spawned, not awaited: the job carries on when this caller goes.
        tokio::spawn(rebuild::run(self.state.clone(), job, parsed));
        Ok(Response::new(pb::StartRebuildResponse { job_id, plan }))
    }

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job = self
            .state
            .jobs
            .get(&req.into_inner().job_id)
            .map_err(AgentError::from)?;
        let stream = futures::StreamExt::map(job.watch(), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let st = status::gather(&self.state.config, &self.state.pg)
            .instrument(info_span!("rpc", method = "GetStatus"))
            .await;
        Ok(Response::new(node_status_to_pb(st)))
    }

    async fn get_replication(
        &self,
        _req: Request<pb::GetReplicationRequest>,
    ) -> Result<Response<pb::ReplicationInfo>, Status> {
        let pg = &self.state.pg;
        let work = async {
            let (in_recovery, standbys, slots) =
                tokio::try_join!(pg.in_recovery(), pg.standbys(), pg.slots())?;
            Ok::<_, AgentError>(pb::ReplicationInfo {
                in_recovery,
                standbys: standbys.into_iter().map(standby_to_pb).collect(),
                slots: slots.into_iter().map(slot_to_pb).collect(),
            })
        };
        let info = work
            .instrument(info_span!("rpc", method = "GetReplication"))
            .await?;
        Ok(Response::new(info))
    }

    async fn get_wal(
        &self,
        _req: Request<pb::GetWalRequest>,
    ) -> Result<Response<pb::WalInfo>, Status> {
        let w = self
            .state
            .pg
            .wal()
            .instrument(info_span!("rpc", method = "GetWal"))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::WalInfo {
            in_recovery: w.in_recovery,
            current_lsn: lsn(w.current_lsn),
            insert_lsn: lsn(w.insert_lsn),
            flush_lsn: lsn(w.flush_lsn),
            insert_walfile: w.insert_walfile,
            write_walfile: w.write_walfile,
            flush_walfile: w.flush_walfile,
            received_lsn: lsn(w.received_lsn),
            replayed_lsn: lsn(w.replayed_lsn),
            archiver: Some(pb::Archiver {
                archived_count: w.archived_count,
                last_archived_wal: w.last_archived_wal,
                last_archived_time: w.last_archived_time,
                failed_count: w.failed_count,
                last_failed_wal: w.last_failed_wal,
                last_failed_time: w.last_failed_time,
                stats_reset: w.stats_reset,
            }),
            archive_mode: w.archive_mode,
        }))
    }

    async fn drop_slot(
        &self,
        req: Request<pb::DropSlotRequest>,
    ) -> Result<Response<pb::DropSlotResponse>, Status> {
        let req = req.into_inner();
        let name = SlotName::parse(&req.slot_name).map_err(AgentError::from)?;
        let dropped = self
            .state
            .pg
            .drop_slot(&name, req.force)
            .instrument(info_span!("rpc", method = "DropSlot", slot = %name, force = req.force))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::DropSlotResponse {
            slot_name: name.to_string(),
            terminated_sender: dropped.terminated_sender,
            released_wal_bytes: dropped.released_wal_bytes,
        }))
    }
}

fn lsn(l: Option<pgfleet_proto::Lsn>) -> Option<String> {
    l.map(|l| l.to_string())
}

fn node_status_to_pb(st: NodeStatus) -> pb::NodeStatus {
    let service_state = match st.service.state {
        ServiceState::Running => pb::ServiceState::Running,
        ServiceState::Stopped => pb::ServiceState::Stopped,
        ServiceState::Unknown => pb::ServiceState::Unknown,
    };
    let mut out = pb::NodeStatus {
        service_state: service_state as i32,
        service_detail: st.service.detail,
        service_backend: st.service_backend.to_owned(),
        data_directory: st.data_directory,
        disk_free_bytes: st.disk.map(|d| d.free_bytes),
        disk_total_bytes: st.disk.map(|d| d.total_bytes),
        agent_version: crate::AGENT_VERSION.to_owned(),
        hostname: st.hostname,
        ..Default::default()
    };
    match st.server {
        Ok(s) => {
            out.server_up = true;
            out.role = if s.in_recovery {
                pb::Role::Replica
            } else {
                pb::Role::Primary
            } as i32;
            out.timeline = s.timeline;
            out.system_identifier = s.system_identifier;
            out.current_lsn = lsn(s.current_lsn);
            out.received_lsn = lsn(s.received_lsn);
            out.replayed_lsn = lsn(s.replayed_lsn);
            out.replay_delay_seconds = s.replay_delay_seconds;
            out.postgres_version = Some(s.version);
            out.postgres_version_num = Some(s.version_num);
            out.wal_receiver = s.wal_receiver.map(|w| pb::WalReceiver {
                status: w.status,
                sender_host: w.sender_host,
                sender_port: w.sender_port,
                slot_name: w.slot_name,
                received_timeline: w.received_timeline,
            });
            out.cluster_state = Some(
                if s.in_recovery {
                    "in archive recovery"
                } else {
                    "in production"
                }
                .to_owned(),
            );
        }
        Err(reason) => {
            out.server_up = false;
            out.role = pb::Role::Down as i32;
            out.down_reason = Some(reason);
            if let Some(cd) = st.control_data {
                out.system_identifier = cd.system_identifier;
                out.timeline = cd.timeline;
                out.cluster_state = cd.cluster_state;
            }
        }
    }
    out
}

fn standby_to_pb(r: crate::pg::StandbyRow) -> pb::StandbyConnection {
    pb::StandbyConnection {
        pid: r.pid,
        application_name: r.application_name,
        client_addr: r.client_addr,
        usename: r.usename,
        state: r.state,
        sent_lsn: lsn(r.sent_lsn),
        write_lsn: lsn(r.write_lsn),
        flush_lsn: lsn(r.flush_lsn),
        replay_lsn: lsn(r.replay_lsn),
        replay_lag_bytes: r.replay_lag_bytes,
        total_lag_bytes: r.total_lag_bytes,
        write_lag_seconds: r.write_lag_seconds,
        flush_lag_seconds: r.flush_lag_seconds,
        replay_lag_seconds: r.replay_lag_seconds,
        sync_state: r.sync_state,
        sync_priority: r.sync_priority,
    }
}

fn slot_to_pb(r: crate::pg::SlotRow) -> pb::ReplicationSlot {
    pb::ReplicationSlot {
        slot_name: r.slot_name,
        slot_type: r.slot_type,
        plugin: r.plugin,
        database: r.database,
        active: r.active,
        active_pid: r.active_pid,
        restart_lsn: lsn(r.restart_lsn),
        retained_wal_bytes: r.retained_wal_bytes,
        wal_status: r.wal_status,
        temporary: r.temporary,
    }
}
