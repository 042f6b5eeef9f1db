//! The gRPC skin: request → domain call → response, and errors through
//! `AgentError`'s one mapping onto status codes. No logic lives here.

use std::sync::Arc;

use std::pin::Pin;

use futures::Stream;
use pgfleet_proto::sync::{SyncMethod, SyncSpec};
use pgfleet_proto::{NodeName, OperationId, RoleName, SlotName, shown};
use pgfleet_proto::agent::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::AgentState;
use crate::auth::{self, Caller};
use crate::error::AgentError;
use crate::secret::Secret;
use crate::{jobs, rebuild, standby, upstream};
use crate::service::ServiceState;
use crate::status::NodeStatus;

#[derive(Debug, Clone)]
pub struct AgentService {
    state: Arc<AgentState>,
}

impl AgentService {
    pub fn new(state: Arc<AgentState>) -> Self {
        AgentService { state }
    }
}

/// The handlers, behind `gate` (authorization) and `audited`.
impl AgentService {

    async fn prepare_upstream_impl(
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
            replica_addr: single_host(&r.replica_address)
                .map_err(|reason| invalid("replica_address", reason))?,
            slot: SlotName::parse(&r.slot_name).map_err(|e| invalid("slot_name", e.to_string()))?,
            replica_name: if r.replica_name.is_empty() {
                None
            } else {
                Some(NodeName::parse(&r.replica_name).map_err(|e| invalid("replica_name", e.to_string()))?)
            },
            replica_streams_through_slot: r.replica_streams_through_slot,
            dry_run: r.dry_run,
            for_rewind: r.for_rewind,
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

    async fn start_rebuild_impl(
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

    async fn get_settings_impl(
        &self,
        _req: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::Settings>, Status> {
        let s = standby::settings(&self.state.pg)
            .instrument(info_span!("rpc", method = "GetSettings"))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::Settings {
            in_recovery: s.in_recovery,
            max_connections: s.max_connections,
            max_worker_processes: s.max_worker_processes,
            max_wal_senders: s.max_wal_senders,
            max_prepared_transactions: s.max_prepared_transactions,
            max_locks_per_transaction: s.max_locks_per_transaction,
            synchronous_standby_names: s.synchronous_standby_names,
            synchronous_commit: s.synchronous_commit,
            replay_pause_state: s.replay_pause_state,
            logical_slots: s.logical_slots,
            wal_log_hints: s.wal_log_hints,
            data_checksums: s.data_checksums,
            timeline: s.timeline,
            failover_slots: s
                .failover_slots
                .into_iter()
                .map(|f| pb::FailoverSlot { name: f.name, synced: f.synced, usable: f.usable })
                .collect(),
            wal_level: s.wal_level,
        }))
    }

    async fn set_synchronous_standbys_impl(
        &self,
        req: Request<pb::SetSynchronousStandbysRequest>,
    ) -> Result<Response<pb::SetSynchronousStandbysResponse>, Status> {
        let r = req.into_inner();
        // A missing config is a malformed call, not "off": turning
        // synchronous replication off is a config with no names.
        let config = r.config.ok_or_else(|| AgentError::Invalid {
            field: "config",
            reason: "missing; to turn synchronous replication off send a config with no names".into(),
        })?;
        let spec = sync_spec(config)?;
        let (now, previous, standby_slots) = standby::set_synchronous_standbys(&self.state.pg, &spec)
            .instrument(info_span!("rpc", method = "SetSynchronousStandbys", op_id = %r.operation_id))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::SetSynchronousStandbysResponse {
            synchronous_standby_names: now,
            previous,
            synchronized_standby_slots: standby_slots,
        }))
    }

    async fn configure_standby_impl(
        &self,
        req: Request<pb::ConfigureStandbyRequest>,
    ) -> Result<Response<pb::ConfigureStandbyResponse>, Status> {
        let r = req.into_inner();
        let up = standby::parse_upstream(
            &r.upstream_host,
            r.upstream_port,
            &r.replication_role,
            r.replication_password,
            &r.slot_name,
            &r.application_name,
        )
        .map_err(AgentError::from)?;
        let span = info_span!("rpc", method = "ConfigureStandby", op_id = %r.operation_id, upstream = %up.host, slot = %up.slot);
        let (started, primary_conninfo) =
            standby::configure(&self.state.config, &self.state.pg, &up, r.reset_synchronous_standby_names)
                .instrument(span)
                .await
                .map_err(AgentError::from)?;
        Ok(Response::new(pb::ConfigureStandbyResponse {
            started,
            primary_conninfo,
        }))
    }

    async fn fence_impl(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let r = req.into_inner();
        let (stopped, cd) = standby::fence(&self.state.config, &self.state.pg, r.immediate)
            .instrument(info_span!("rpc", method = "Fence", op_id = %r.operation_id))
            .await
            .map_err(AgentError::from)?;
        let sync = crate::controldata::configured_setting(&self.state.config, "synchronous_standby_names")
            .await
            .ok();
        Ok(Response::new(pb::FenceResponse {
            stopped,
            cluster_state: cd.cluster_state,
            checkpoint_lsn: cd.checkpoint_lsn,
            timeline: cd.timeline,
            synchronous_standby_names: sync,
            wal_log_hints: cd.wal_log_hints.unwrap_or(false),
            data_checksums: cd.data_checksums.unwrap_or(false),
        }))
    }

    async fn start_crashed_impl(
        &self,
        req: Request<pb::StartCrashedRequest>,
    ) -> Result<Response<pb::StartCrashedResponse>, Status> {
        let r = req.into_inner();
        let cluster_state = standby::start_crashed(&self.state.config, &self.state.pg)
            .instrument(info_span!("rpc", method = "StartCrashed", op_id = %r.operation_id))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::StartCrashedResponse { cluster_state }))
    }

    async fn unfence_impl(
        &self,
        req: Request<pb::UnfenceRequest>,
    ) -> Result<Response<pb::UnfenceResponse>, Status> {
        let r = req.into_inner();
        standby::unfence(&self.state.config, &self.state.pg)
            .instrument(info_span!("rpc", method = "Unfence", op_id = %r.operation_id))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::UnfenceResponse {}))
    }

    async fn promote_impl(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let r = req.into_inner();
        let (timeline, current_lsn) = standby::promote(&self.state.pg)
            .instrument(info_span!("rpc", method = "Promote", op_id = %r.operation_id))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::PromoteResponse {
            timeline,
            current_lsn,
        }))
    }

    async fn create_slot_impl(
        &self,
        req: Request<pb::CreateSlotRequest>,
    ) -> Result<Response<pb::CreateSlotResponse>, Status> {
        let r = req.into_inner();
        let slot = SlotName::parse(&r.slot_name).map_err(AgentError::from)?;
        let created = standby::create_slot(&self.state.pg, &slot)
            .instrument(info_span!("rpc", method = "CreateSlot", op_id = %r.operation_id, slot = %slot))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::CreateSlotResponse { created }))
    }

    async fn rewind_impl(
        &self,
        req: Request<pb::RewindRequest>,
    ) -> Result<Response<pb::RewindResponse>, Status> {
        let r = req.into_inner();
        // The slot and application name are not used by pg_rewind; valid
        // placeholders keep one parser for upstreams.
        let up = standby::parse_upstream(
            &r.upstream_host,
            r.upstream_port,
            &r.replication_role,
            r.replication_password,
            "unused",
            "unused",
        )
        .map_err(AgentError::from)?;
        let output_tail = standby::rewind(&self.state.config, &self.state.pg, &up)
            .instrument(info_span!("rpc", method = "Rewind", op_id = %r.operation_id, upstream = %up.host))
            .await
            .map_err(AgentError::from)?;
        Ok(Response::new(pb::RewindResponse { output_tail }))
    }

    async fn watch_job_impl(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        if id.is_empty() {
            return Err(AgentError::Invalid { field: "job_id", reason: "empty: name the job to watch".into() }.into());
        }
        let job = self.state.jobs.get(&id).map_err(AgentError::from)?;
        let stream = futures::StreamExt::map(job.watch(), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_status_impl(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let fresh = req.get_ref().fresh;
        let (st, age) = self
            .state
            .snapshots
            .get(&self.state, fresh)
            .instrument(info_span!("rpc", method = "GetStatus", fresh))
            .await;
        let mut out = node_status_to_pb((*st).clone());
        out.snapshot_age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        Ok(Response::new(out))
    }

    async fn get_replication_impl(
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

    async fn get_wal_impl(
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

    async fn drop_slot_impl(
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

type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    type WatchJobStream = WatchJobStream;

    async fn prepare_upstream(
        &self,
        req: Request<pb::PrepareUpstreamRequest>,
    ) -> Result<Response<pb::PrepareUpstreamResponse>, Status> {
        let caller = self.gate(&req, "PrepareUpstream")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.prepare_upstream_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "PrepareUpstream", &target, result)
    }

    async fn start_rebuild(
        &self,
        req: Request<pb::StartRebuildRequest>,
    ) -> Result<Response<pb::StartRebuildResponse>, Status> {
        let caller = self.gate(&req, "StartRebuild")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.start_rebuild_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "StartRebuild", &target, result)
    }

    async fn get_settings(
        &self,
        req: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::Settings>, Status> {
        self.gate(&req, "GetSettings")?;
        self.get_settings_impl(req).await
    }

    async fn set_synchronous_standbys(
        &self,
        req: Request<pb::SetSynchronousStandbysRequest>,
    ) -> Result<Response<pb::SetSynchronousStandbysResponse>, Status> {
        let caller = self.gate(&req, "SetSynchronousStandbys")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.set_synchronous_standbys_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "SetSynchronousStandbys", &target, result)
    }

    async fn configure_standby(
        &self,
        req: Request<pb::ConfigureStandbyRequest>,
    ) -> Result<Response<pb::ConfigureStandbyResponse>, Status> {
        let caller = self.gate(&req, "ConfigureStandby")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.configure_standby_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "ConfigureStandby", &target, result)
    }

    async fn fence(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let caller = self.gate(&req, "Fence")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.fence_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "Fence", &target, result)
    }

    async fn start_crashed(
        &self,
        req: Request<pb::StartCrashedRequest>,
    ) -> Result<Response<pb::StartCrashedResponse>, Status> {
        let caller = self.gate(&req, "StartCrashed")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.start_crashed_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "StartCrashed", &target, result)
    }

    async fn enable_slot_sync(
        &self,
        req: Request<pb::EnableSlotSyncRequest>,
    ) -> Result<Response<pb::EnableSlotSyncResponse>, Status> {
        let caller = self.gate(&req, "EnableSlotSync")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => {
                let op_id = req.get_ref().operation_id.clone();
                crate::slotsync::enable(&self.state.pg)
                    .instrument(info_span!("rpc", method = "EnableSlotSync", op_id = %op_id))
                    .await
                    .map(|(changed, detail)| Response::new(pb::EnableSlotSyncResponse { changed, detail }))
                    .map_err(|e| Status::from(AgentError::from(e)))
            }
            Err(s) => Err(s),
        };
        self.audited(&caller, "EnableSlotSync", &target, result)
    }

    async fn hold_lease(
        &self,
        req: Request<pb::HoldLeaseRequest>,
    ) -> Result<Response<pb::HoldLeaseResponse>, Status> {
        let caller = self.gate(&req, "HoldLease")?;
        let ttl_ms = req.get_ref().ttl_ms;
        let lease = &self.state.lease;
        // Audited when the lease is taken, released or refused: not at every
        // renewal (one a second).
        if ttl_ms == 0 {
            let result = lease.release().map_err(|e| Status::from(AgentError::from(e)));
            if !matches!(result, Ok(false)) {
                self.state.audit.record(&caller, "HoldLease", "release", result.as_ref().map(drop));
            }
            return result.map(|_| Response::new(pb::HoldLeaseResponse { fence_in_ms: 0, taken: false }));
        }
        let result = lease.hold(&caller.name, ttl_ms).map_err(|e| Status::from(AgentError::from(e)));
        if !matches!(result, Ok((_, false))) {
            self.state.audit.record(&caller, "HoldLease", &format!("take, ttl {ttl_ms} ms"), result.as_ref().map(drop));
        }
        let (fence_in, taken) = result?;
        Ok(Response::new(pb::HoldLeaseResponse {
            fence_in_ms: u32::try_from(fence_in.as_millis()).unwrap_or(u32::MAX),
            taken,
        }))
    }

    async fn unfence(
        &self,
        req: Request<pb::UnfenceRequest>,
    ) -> Result<Response<pb::UnfenceResponse>, Status> {
        let caller = self.gate(&req, "Unfence")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.unfence_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "Unfence", &target, result)
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let caller = self.gate(&req, "Promote")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.promote_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "Promote", &target, result)
    }

    async fn create_slot(
        &self,
        req: Request<pb::CreateSlotRequest>,
    ) -> Result<Response<pb::CreateSlotResponse>, Status> {
        let caller = self.gate(&req, "CreateSlot")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.create_slot_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "CreateSlot", &target, result)
    }

    async fn rewind(
        &self,
        req: Request<pb::RewindRequest>,
    ) -> Result<Response<pb::RewindResponse>, Status> {
        let caller = self.gate(&req, "Rewind")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.rewind_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "Rewind", &target, result)
    }

    async fn probe(&self, req: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        self.gate(&req, "Probe")?;
        let r = req.into_inner();
        let invalid = |field: &'static str, reason: String| Status::from(AgentError::Invalid { field, reason });
        let ip = single_host(&r.address).map_err(|reason| invalid("address", reason))?;
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("port", format!("{} is not a TCP port (1-65535)", r.port)))?;
        let started = std::time::Instant::now();
        let connected = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((ip, port))).await;
        let millis = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let (reachable, error) = match connected {
            Ok(Ok(_)) => (true, String::new()),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
        };
        tracing::debug!(%ip, port, reachable, %error, millis, "probe");
        Ok(Response::new(pb::ProbeResponse { reachable, error, millis }))
    }

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.gate(&req, "WatchJob")?;
        self.watch_job_impl(req).await
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        self.gate(&req, "GetStatus")?;
        self.get_status_impl(req).await
    }

    async fn get_replication(
        &self,
        req: Request<pb::GetReplicationRequest>,
    ) -> Result<Response<pb::ReplicationInfo>, Status> {
        self.gate(&req, "GetReplication")?;
        self.get_replication_impl(req).await
    }

    async fn get_wal(
        &self,
        req: Request<pb::GetWalRequest>,
    ) -> Result<Response<pb::WalInfo>, Status> {
        self.gate(&req, "GetWal")?;
        self.get_wal_impl(req).await
    }

    async fn drop_slot(
        &self,
        req: Request<pb::DropSlotRequest>,
    ) -> Result<Response<pb::DropSlotResponse>, Status> {
        let caller = self.gate(&req, "DropSlot")?;
        let target = req.get_ref().target();
        let result = match valid_operation_id(req.get_ref().operation_id()) {
            Ok(()) => self.drop_slot_impl(req).await,
            Err(s) => Err(s),
        };
        self.audited(&caller, "DropSlot", &target, result)
    }
}

impl AgentService {
    /// Authorizes the caller for `method`; a refusal is logged and, for a
    /// changing call, audited.
    fn gate<T>(&self, req: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        let caller = auth::caller_of(req, self.state.config.tls.is_some())
            .inspect_err(|s| self.state.audit.record_unidentified(method, s))?;
        auth::authorize(&caller, method).inspect_err(|s| {
            self.state.audit.record(&caller, method, "(refused)", Err(s));
        })?;
        Ok(caller)
    }

    fn audited<T>(
        &self,
        caller: &Caller,
        method: &'static str,
        target: &str,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        self.state.audit.record(caller, method, target, result.as_ref().map(|_| ()));
        // Status answers never predate a change made here.
        self.state.snapshots.invalidate();
        result
    }
}

/// What a changing call acts on, for the audit log: names and addresses,
/// never a secret.
trait Target {
    /// Client values in it go through `shown` (escaped, cut to 80).
    fn target(&self) -> String;
    fn operation_id(&self) -> &str;
}

/// Every changing call's operation id is checked before anything: it goes
/// into the log and the audit line.
fn valid_operation_id(id: &str) -> Result<(), Status> {
    OperationId::parse(id)
        .map(drop)
        .map_err(|e| Status::from(AgentError::from(e)))
}

macro_rules! operation_id_of {
    ($($t:ty),* $(,)?) => {$(
        impl OperationIdOf for $t {
            fn op_id(&self) -> &str {
                &self.operation_id
            }
        }
    )*};
}

/// The operation_id field every changing request has.
trait OperationIdOf {
    fn op_id(&self) -> &str;
}
operation_id_of!(
    pb::PrepareUpstreamRequest,
    pb::StartRebuildRequest,
    pb::SetSynchronousStandbysRequest,
    pb::ConfigureStandbyRequest,
    pb::FenceRequest,
    pb::UnfenceRequest,
    pb::PromoteRequest,
    pb::CreateSlotRequest,
    pb::RewindRequest,
    pb::StartCrashedRequest,
    pb::EnableSlotSyncRequest,
);

impl Target for pb::EnableSlotSyncRequest {
    fn target(&self) -> String {
        "this node".into()
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}

impl Target for pb::DropSlotRequest {
    fn target(&self) -> String {
        format!("slot {}{}", shown(&self.slot_name), if self.force { " (force)" } else { "" })
    }
    fn operation_id(&self) -> &str {
        ""
    }
}
impl Target for pb::PrepareUpstreamRequest {
    fn target(&self) -> String {
        format!("replica {} role {} slot {}", shown(&self.replica_address), shown(&self.replication_role), shown(&self.slot_name))
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::StartRebuildRequest {
    fn target(&self) -> String {
        format!("rebuild from {}:{} slot {}", shown(&self.upstream_host), self.upstream_port, shown(&self.slot_name))
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::SetSynchronousStandbysRequest {
    fn target(&self) -> String {
        format!("synchronous standbys {}", shown(&format!("{:?}", self.config.as_ref().map(|c| &c.names))))
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::ConfigureStandbyRequest {
    fn target(&self) -> String {
        format!("follow {}:{} slot {}", shown(&self.upstream_host), self.upstream_port, shown(&self.slot_name))
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::FenceRequest {
    fn target(&self) -> String {
        "this node".into()
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::UnfenceRequest {
    fn target(&self) -> String {
        "this node".into()
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::StartCrashedRequest {
    fn target(&self) -> String {
        "this node".into()
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::PromoteRequest {
    fn target(&self) -> String {
        "this node".into()
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::CreateSlotRequest {
    fn target(&self) -> String {
        format!("slot {}", shown(&self.slot_name))
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}
impl Target for pb::RewindRequest {
    fn target(&self) -> String {
        format!("rewind from {}:{}", shown(&self.upstream_host), self.upstream_port)
    }
    fn operation_id(&self) -> &str {
        OperationIdOf::op_id(self)
    }
}

/// An address that names one host, as a pg_hba line for one replica must:
/// not 0.0.0.0/::, not broadcast or multicast (IPv4-mapped forms included).
fn single_host(s: &str) -> Result<std::net::IpAddr, String> {
    let ip: std::net::IpAddr = s
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", shown(s)))?;
    let ip = ip.to_canonical();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(format!("{ip} is not the address of one host"));
    }
    Ok(ip)
}

/// How long a Probe waits for a connection to be accepted: well inside the
/// one second the coordinator gives the whole call, so that "not reached"
/// comes back as an answer. On a LAN a connection is accepted in
/// milliseconds or not at all.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(700);

/// More names than any cluster has standbys is a malformed call.
const MAX_SYNC_NAMES: usize = 64;

fn sync_spec(c: pb::SyncConfig) -> Result<SyncSpec, AgentError> {
    let invalid = |reason: String| AgentError::Invalid {
        field: "synchronous standbys",
        reason,
    };
    if c.names.is_empty() {
        return Ok(SyncSpec::asynchronous());
    }
    if c.names.len() > MAX_SYNC_NAMES {
        return Err(invalid(format!("{} names; at most {MAX_SYNC_NAMES}", c.names.len())));
    }
    let method = match c.method.as_str() {
        "first" => SyncMethod::First,
        "any" => SyncMethod::Any,
        other => return Err(invalid(format!("method {other:?}: use \"first\" or \"any\""))),
    };
    let names = c
        .names
        .iter()
        .map(|n| NodeName::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SyncSpec::from_nodes(method, c.num_sync, &names)?)
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
        slow_change: st
            .slow_change
            .map(|(what, age)| format!("{what} running for {:.1}s", age.as_secs_f64())),
        wal_receiver_error: st.wal_receiver_error,
        data_major: st.data_major.map(u32::from),
        binaries_major: st.binaries_major.map(u32::from),
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
            out.sync_rep_waiting = u32::try_from(s.sync_rep_waiting).unwrap_or(u32::MAX);
            out.sync_rep_oldest_wait_seconds = s.sync_rep_oldest_seconds;
            out.synchronous_standby_names = Some(s.synchronous_standby_names);
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
                out.checkpoint_lsn = cd.checkpoint_lsn;
            }
            out.configured_synchronous_standby_names = st.configured_sync;
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
