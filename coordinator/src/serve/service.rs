//! The `pgfleet.coordinator.v1` handlers. Each checks the caller (mutual
//! TLS: readers look, admins change), audits changing calls, and runs the
//! same library functions as the CLI.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use pgfleet_proto::auth::{self, Caller};
use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::OperationState;
use pgfleet_proto::identity::Access;
use tonic::{Request, Response, Status};

use super::registry::Running;
use super::{State, convert};
use crate::error::CoordinatorError;
use crate::ops::{self, ApiRequest, CancelState, OpRequest};

#[derive(Debug)]
pub struct CoordinatorService {
    state: Arc<State>,
}

impl CoordinatorService {
    pub fn new(state: Arc<State>) -> Self {
        CoordinatorService { state }
    }
}

/// Metadata a follower's refusal carries: the leader's URL.
pub const LEADER_HEADER: &str = "pgfleet-leader";
/// Set on a follower's refusal while no leader is known (an election is
/// under way): the CLI waits and tries again.
pub const ELECTION_HEADER: &str = "pgfleet-election";

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Readers may call these; everything else needs an admin.
fn access(method: &str) -> Access {
    if method.starts_with("Get") || method.starts_with("List") || method.starts_with("Watch") {
        Access::Read
    } else {
        Access::Change
    }
}

/// The library's errors as gRPC statuses: bad input is INVALID_ARGUMENT, a
/// busy cluster FAILED_PRECONDITION, the rest carries its message.
pub fn status(e: CoordinatorError) -> Status {
    // is_usage() also counts an agent's INVALID_ARGUMENT as the caller's.
    let code = if e.is_usage() { tonic::Code::InvalidArgument } else { e.code() };
    Status::new(code, pgfleet_proto::one_line(&e.to_string(), 2000))
}

async fn record_of(state: &State, id: &str) -> Result<Option<ops::store::OpRecord>, Status> {
    // An id is echoed in the answer: refuse what is not one.
    pgfleet_proto::OperationId::parse(id).map_err(|e| status(e.into()))?;
    ops::store::find(&state.inventory.store, id).await.map_err(|e| status(e.into()))
}

impl CoordinatorService {
    fn gate<T>(&self, req: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        let caller = auth::caller_of(req, self.state.tls)
            .inspect_err(|s| self.state.audit.record_unidentified(method, s))?;
        // Views of the fleet need no etcd and no leader: any coordinator
        // answers them. Only the leader acts and keeps running operations'
        // events: for the rest the caller is pointed at it (the CLI follows).
        let fleet_view = matches!(method, "GetFleetStatus" | "WatchFleet" | "GetSlots" | "GetWal" | "GetSync");
        if !fleet_view && !self.state.leadership.is_leader() {
            let leader = self.state.leadership.leader_url();
            let mut s = Status::unavailable(match &leader {
                Some(l) => format!("this coordinator is a follower; the leader is at {l}"),
                None => "this coordinator is a follower and no leader is elected yet; retry in a few seconds".into(),
            });
            match leader.and_then(|l| l.parse().ok()) {
                Some(l) => {
                    s.metadata_mut().insert(LEADER_HEADER, l);
                }
                None => {
                    s.metadata_mut().insert(ELECTION_HEADER, tonic::metadata::MetadataValue::from_static("pending"));
                }
            }
            return Err(s);
        }
        auth::authorize(&caller, method, Some(access(method))).inspect_err(|s| {
            self.state.audit.record(&caller, method, "(refused)", Err(s));
        })?;
        Ok(caller)
    }

    fn audited<T>(&self, caller: &Caller, method: &str, target: &str, result: Result<T, Status>) -> Result<T, Status> {
        self.state.audit.record(caller, method, target, result.as_ref().map(|_| ()));
        result
    }

    /// Begins an operation (validation, lock, journal) and runs it in the
    /// background; its id comes back at once.
    /// The request is validated by the one conversion the CLI uses too, so
    /// both refuse the same input with the same message.
    async fn start(&self, caller: &Caller, method: &'static str, req: ApiRequest) -> Result<Response<pb::OperationRef>, Status> {
        let mut req = match OpRequest::try_from(req) {
            Ok(r) => r,
            Err(e) => return self.audited(caller, method, "(invalid)", Err(status(e))),
        };
        let target = serde_json::to_string(&req).unwrap_or_default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = Arc::new(CancelState::default());
        let who = format!("{caller}");
        let begun = ops::begin(&self.state.inventory, &mut req, &who, Some(tx), cancel.clone()).await;
        let (ctx, cluster, summary) = match begun {
            Ok(b) => b,
            Err(e) => return self.audited(caller, method, &target, Err(status(e))),
        };
        let running = Arc::new(Running::new(
            ctx.id().to_owned(),
            req.kind(),
            cluster,
            summary,
            who,
            req.dry_run(),
            cancel,
        ));
        self.spawn(running.clone(), rx);
        self.state.registry.insert(running.clone());
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = ops::execute(&state.inventory, &req, state.deadlines, &ctx).await;
            ops::finish(ctx, &result, false).await;
        });
        let id = running.id.clone();
        tracing::info!(operation = %id, caller = %caller, "operation started");
        self.audited(caller, method, &format!("{target} -> {id}"), Ok(Response::new(pb::OperationRef { operation_id: id })))
    }

    /// Collects an operation's events into its registry entry.
    fn spawn(&self, running: Arc<Running>, rx: tokio::sync::mpsc::UnboundedReceiver<pb::OperationEvent>) {
        super::registry::collect(running, rx);
    }

    async fn resume_or_abort(&self, caller: &Caller, method: &'static str, id: &str, abort: bool) -> Result<Response<pb::OperationRef>, Status> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = Arc::new(CancelState::default());
        let who = format!("{caller}");
        let begun = ops::resume::begin(&self.state.inventory, id, if abort { "abort" } else { "resume" }, &who, Some(tx), cancel.clone()).await;
        let (ctx, rec, req) = match begun {
            Ok(b) => b,
            Err(e) => return self.audited(caller, method, id, Err(status(e))),
        };
        let running = Arc::new(Running::new(id.to_owned(), req.kind(), rec.cluster.clone(), rec.summary.clone(), who, false, cancel));
        self.spawn(running.clone(), rx);
        self.state.registry.insert(running);
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = if abort {
                ops::resume::abort(&state.inventory, &rec, &req, state.deadlines, &ctx).await
            } else {
                ops::resume::resume(&state.inventory, &rec, &req, state.deadlines, &ctx).await
            };
            ops::finish(ctx, &result, abort).await;
        });
        self.audited(caller, method, id, Ok(Response::new(pb::OperationRef { operation_id: id.to_owned() })))
    }

    async fn operation(&self, id: &str) -> Result<pb::Operation, Status> {
        let rec = record_of(&self.state, id).await?;
        self.operation_from(id, rec)
    }

    /// The operation as its journal record and, while this process runs it,
    /// its live state tell it.
    fn operation_from(&self, id: &str, rec: Option<ops::store::OpRecord>) -> Result<pb::Operation, Status> {
        let running = self.state.registry.get(id);
        match (running, rec) {
            (Some(r), rec) => {
                let mut op = rec.map(|r| r.to_proto()).unwrap_or_else(|| pb::Operation {
                    id: r.id.clone(),
                    kind: r.kind.clone(),
                    cluster: r.cluster.clone(),
                    summary: r.summary.clone(),
                    caller: r.caller.clone(),
                    started_at: r.started_at.clone(),
                    ..Default::default()
                });
                op.dry_run = r.dry_run;
                match r.last_finished() {
                    Some(f) if r.finished() => {
                        op.state = f.state;
                        if op.detail.is_none() {
                            op.detail = f.error;
                        }
                    }
                    _ => op.state = OperationState::Running as i32,
                }
                Ok(op)
            }
            (None, Some(rec)) => Ok(rec.to_proto()),
            (None, None) => Err(Status::not_found(format!("no operation {id}; `pgfleet ops list` shows them"))),
        }
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn get_fleet_status(&self, req: Request<pb::GetFleetStatusRequest>) -> Result<Response<pb::FleetStatus>, Status> {
        self.gate(&req, "GetFleetStatus")?;
        let cluster = req.into_inner().cluster;
        let clusters = self
            .state
            .inventory
            .select(Some(cluster.as_str()).filter(|c| !c.is_empty()))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let report = crate::fleet_status::gather(&clusters, self.state.deadlines)
            .await
            .with_policies(&clusters, &self.state.inventory.store)
            .await;
        Ok(Response::new(convert::fleet(&report)))
    }

    type WatchFleetStream = EventStream<pb::FleetChange>;

    async fn watch_fleet(&self, req: Request<pb::WatchFleetRequest>) -> Result<Response<Self::WatchFleetStream>, Status> {
        self.gate(&req, "WatchFleet")?;
        let r = req.into_inner();
        let stream = super::watch_fleet::watch(self.state.clone(), r)?;
        Ok(Response::new(stream))
    }

    async fn get_slots(&self, req: Request<pb::GetSlotsRequest>) -> Result<Response<pb::Report>, Status> {
        self.gate(&req, "GetSlots")?;
        let r = req.into_inner();
        let clusters = self
            .state
            .inventory
            .select(Some(r.cluster.as_str()).filter(|c| !c.is_empty()))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let report = crate::slots::list(&clusters, r.inactive_only, self.state.deadlines).await;
        Ok(Response::new(pb::Report {
            text: String::new(),
            json: serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
            all_reachable: report.all_reachable,
        }))
    }

    async fn get_wal(&self, req: Request<pb::GetWalRequest>) -> Result<Response<pb::Report>, Status> {
        self.gate(&req, "GetWal")?;
        let node = req.into_inner().node;
        let r = crate::wal::get(&self.state.inventory, &node, self.state.deadlines).await.map_err(status)?;
        Ok(Response::new(pb::Report {
            text: String::new(),
            json: serde_json::to_string_pretty(&r).unwrap_or_default() + "\n",
            all_reachable: true,
        }))
    }

    async fn get_sync(&self, req: Request<pb::GetSyncRequest>) -> Result<Response<pb::Report>, Status> {
        self.gate(&req, "GetSync")?;
        let cluster = req.into_inner().cluster;
        let c = ops::named_cluster(&self.state.inventory, Some(cluster.as_str()).filter(|c| !c.is_empty())).map_err(status)?;
        let r = crate::sync::show(&self.state.inventory, &c, self.state.deadlines)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(pb::Report {
            text: String::new(),
            json: serde_json::to_string_pretty(&r).unwrap_or_default() + "\n",
            all_reachable: true,
        }))
    }

    async fn rebuild(&self, req: Request<pb::RebuildRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "Rebuild")?;
        self.start(&caller, "Rebuild", ApiRequest::Rebuild(req.into_inner())).await
    }

    async fn set_sync(&self, req: Request<pb::SetSyncRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "SetSync")?;
        self.start(&caller, "SetSync", ApiRequest::SetSync(req.into_inner())).await
    }

    async fn switchover(&self, req: Request<pb::SwitchoverRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "Switchover")?;
        self.start(&caller, "Switchover", ApiRequest::Switchover(req.into_inner())).await
    }

    async fn failover(&self, req: Request<pb::FailoverRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "Failover")?;
        self.start(&caller, "Failover", ApiRequest::Failover(req.into_inner())).await
    }

    async fn rejoin(&self, req: Request<pb::RejoinRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "Rejoin")?;
        self.start(&caller, "Rejoin", ApiRequest::Rejoin(req.into_inner())).await
    }

    async fn restart(&self, req: Request<pb::RestartRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "Restart")?;
        self.start(&caller, "Restart", ApiRequest::Restart(req.into_inner())).await
    }

    async fn drop_slot(&self, req: Request<pb::DropSlotRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "DropSlot")?;
        self.start(&caller, "DropSlot", ApiRequest::DropSlot(req.into_inner())).await
    }

    async fn set_failover_policy(&self, req: Request<pb::SetFailoverPolicyRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "SetFailoverPolicy")?;
        self.start(&caller, "SetFailoverPolicy", ApiRequest::SetFailoverPolicy(req.into_inner())).await
    }

    type WatchOperationStream = EventStream<pb::OperationEvent>;

    async fn watch_operation(&self, req: Request<pb::WatchOperationRequest>) -> Result<Response<Self::WatchOperationStream>, Status> {
        self.gate(&req, "WatchOperation")?;
        let r = req.into_inner();
        if let Some(running) = self.state.registry.get(&r.operation_id) {
            let mut next = r.from_seq as usize;
            let stream = async_stream::try_stream! {
                let mut changes = running.subscribe();
                loop {
                    // Read before the events: once finished, what they hold is all.
                    let was_finished = running.finished();
                    let events = running.events_from(next);
                    next += events.len();
                    let mut done = false;
                    for ev in events {
                        done |= matches!(ev.event, Some(pb::operation_event::Event::Finished(_)));
                        yield ev;
                    }
                    // Finished, and from_seq lay past its last event: there
                    // is nothing more to wait for.
                    if done || was_finished {
                        break;
                    }
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            };
            return Ok(Response::new(Box::pin(stream)));
        }
        // Not run by this process (before a restart, or by a local CLI):
        // its journal, as steps, then how it ended.
        let rec = record_of(&self.state, &r.operation_id).await?
            .ok_or_else(|| Status::not_found(format!("no operation {}; `pgfleet ops list` shows them", r.operation_id)))?;
        Ok(Response::new(Box::pin(futures::stream::iter(journal_events(&rec).into_iter().skip(r.from_seq as usize).map(Ok)))))
    }

    async fn get_operation(&self, req: Request<pb::GetOperationRequest>) -> Result<Response<pb::Operation>, Status> {
        self.gate(&req, "GetOperation")?;
        Ok(Response::new(self.operation(&req.into_inner().operation_id).await?))
    }

    async fn list_operations(&self, req: Request<pb::ListOperationsRequest>) -> Result<Response<pb::ListOperationsResponse>, Status> {
        self.gate(&req, "ListOperations")?;
        let r = req.into_inner();
        if !r.cluster.is_empty() {
            // An unknown cluster is NOT_FOUND, not an empty list.
            self.state
                .inventory
                .select(Some(r.cluster.as_str()))
                .map_err(|e| Status::not_found(e.to_string()))?;
        }
        let mut ops = ops::store::load(&self.state.inventory.store).await.map_err(|e| status(e.into()))?;
        ops.retain(|o| r.cluster.is_empty() || o.cluster == r.cluster);
        ops.reverse();
        ops.truncate(if r.limit == 0 { 50 } else { r.limit as usize });
        // One read of the journal for the whole list, not one per operation.
        let operations = ops
            .into_iter()
            .map(|o| {
                let fallback = o.to_proto();
                self.operation_from(&o.id.clone(), Some(o)).unwrap_or(fallback)
            })
            .collect();
        Ok(Response::new(pb::ListOperationsResponse { operations }))
    }

    async fn cancel_operation(&self, req: Request<pb::CancelOperationRequest>) -> Result<Response<pb::Operation>, Status> {
        let caller = self.gate(&req, "CancelOperation")?;
        let id = req.into_inner().operation_id;
        let result = match self.state.registry.get(&id) {
            Some(r) if !r.finished() => match r.cancel.request() {
                Ok(()) => self.operation(&id).await,
                Err(why) => Err(Status::failed_precondition(format!("cannot cancel {id} safely now: {why}"))),
            },
            _ => match self.operation(&id).await {
                Ok(op) => Err(Status::failed_precondition(format!(
                    "operation {id} is not running here ({}): nothing to cancel",
                    OperationState::try_from(op.state).map(|s| s.as_str_name()).unwrap_or("unknown")
                ))),
                Err(e) => Err(e),
            },
        };
        self.audited(&caller, "CancelOperation", &id, result.map(Response::new))
    }

    async fn resume_operation(&self, req: Request<pb::ResumeOperationRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "ResumeOperation")?;
        let id = req.into_inner().operation_id;
        self.resume_or_abort(&caller, "ResumeOperation", &id, false).await
    }

    async fn abort_operation(&self, req: Request<pb::AbortOperationRequest>) -> Result<Response<pb::OperationRef>, Status> {
        let caller = self.gate(&req, "AbortOperation")?;
        let id = req.into_inner().operation_id;
        self.resume_or_abort(&caller, "AbortOperation", &id, true).await
    }
}

/// A journaled operation's lines as events, ending with its outcome.
fn journal_events(rec: &ops::store::OpRecord) -> Vec<pb::OperationEvent> {
    use pb::operation_event::Event;
    let mut v: Vec<pb::OperationEvent> = rec
        .journal
        .iter()
        .filter(|e| e.step != "begin" && e.step != "end")
        .map(|e| {
            let (host, detail) = match e.detail.split_once(": ") {
                Some((h, d)) if e.event == "start" => (h.to_owned(), d.to_owned()),
                _ => (String::new(), e.detail.clone()),
            };
            Event::Step(pb::Step { host, step: e.step.clone(), phase: e.event.clone(), detail, seconds: 0.0 })
        })
        .map(|e| pb::OperationEvent { seq: 0, time: String::new(), event: Some(e) })
        .collect();
    if rec.state != "running" {
        let state = rec.state();
        let failed = !matches!(state, OperationState::Succeeded | OperationState::Aborted);
        v.push(pb::OperationEvent {
            seq: 0,
            time: rec.ended_at.clone().unwrap_or_default(),
            event: Some(Event::Finished(pb::OperationFinished {
                state: state as i32,
                text: if failed { String::new() } else { format!("{} {}\n", rec.id, rec.state) },
                json: serde_json::to_string_pretty(rec).unwrap_or_default() + "\n",
                error: failed.then(|| {
                    if rec.state == "interrupted" {
                        format!("{} was interrupted: resume it with `pgfleet ops resume {}` or abort it with `pgfleet ops abort {}`", rec.id, rec.id, rec.id)
                    } else {
                        format!("{} {}: {}", rec.id, rec.state, rec.detail.clone().unwrap_or_default())
                    }
                }),
                exit_code: u32::from(failed),
            })),
        });
    }
    for (i, e) in v.iter_mut().enumerate() {
        e.seq = i as u64;
    }
    v
}
