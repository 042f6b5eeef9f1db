//! `pgfleet --coordinator URL ...`: every command sent to `pgfleet serve`,
//! which runs the same library; what comes back (events, text, JSON) is
//! shown exactly as the in-process command shows it.

use std::path::PathBuf;

use futures::StreamExt;
use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::cli::args::{Cli, Command, OpsAction, SlotsAction, SyncAction, op_request};
use crate::cli::output::{Outcome, display, print_json, print_result, print_text};
use crate::error::CoordinatorError;
use crate::ops::{ApiRequest, OpResult};
use crate::cli::view::OperationView;
use crate::rebuild::Display;

fn usage(s: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Usage(s.into())
}

/// A status from the coordinator, as the in-process command would have
/// failed: bad input exits 2, the rest 1.
fn from_status(s: tonic::Status) -> CoordinatorError {
    if let Some(leader) = s
        .metadata()
        .get(crate::serve::LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return CoordinatorError::NotLeader { leader: leader.to_owned(), message: s.message().to_owned() };
    }
    if s.metadata().get(crate::serve::ELECTION_HEADER).is_some() {
        return CoordinatorError::NotLeader { leader: String::new(), message: s.message().to_owned() };
    }
    let exit_code = if s.code() == tonic::Code::InvalidArgument { 2 } else { 1 };
    let message = if std::error::Error::source(&s).is_some() {
        format!("the coordinator cannot be reached: {}", crate::client::error_chain(&s))
    } else {
        s.message().to_owned()
    };
    CoordinatorError::Remote { message, exit_code }
}

/// TLS towards the coordinator: --tls-ca/--tls-cert/--tls-key, else the
/// inventory's [tls] when there is an inventory here.
fn tls_files(cli: &Cli) -> Result<Option<(PathBuf, PathBuf, PathBuf)>, CoordinatorError> {
    let inv_tls = crate::inventory::Inventory::load(&cli.inventory).ok().and_then(|i| i.tls);
    let ca = cli.tls_ca.clone().or_else(|| inv_tls.as_ref().map(|t| t.ca.clone()));
    let cert = cli.tls_cert.clone().or_else(|| inv_tls.as_ref().map(|t| t.cert.clone()));
    let key = cli.tls_key.clone().or_else(|| inv_tls.as_ref().map(|t| t.key.clone()));
    match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
        _ => Ok(None),
    }
}

async fn connect(cli: &Cli, url: &str) -> Result<CoordinatorClient<Channel>, CoordinatorError> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(usage(format!(
            "--coordinator {url:?}: give the service's URL, e.g. https://coordinator.example:7400 (or \"local\" to run in-process)"
        )));
    }
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| usage(format!("--coordinator {url:?} is not a URL: {e}")))?
        .connect_timeout(cli.connect_timeout)
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let (ca, cert, key) = tls_files(cli)?.ok_or_else(|| {
            usage("an https:// coordinator needs --tls-ca, --tls-cert and --tls-key (or an inventory with [tls])")
        })?;
        let read = |p: &PathBuf, private: bool| {
            pgfleet_proto::tls::read_pem(p, private).map_err(|e| usage(format!("TLS: {e}")))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca, false)?))
            .identity(Identity::from_pem(read(&cert, false)?, read(&key, true)?));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| usage(format!("TLS setup: {}", crate::client::error_chain(&e))))?;
    }
    let channel = endpoint.connect().await.map_err(|e| CoordinatorError::Remote {
        message: format!("the coordinator at {url} cannot be reached: {}", crate::client::error_chain(&e)),
        exit_code: 1,
    })?;
    Ok(CoordinatorClient::new(channel))
}

/// A view the service answered with its typed JSON: printed as it is with
/// --json, else rendered here as the in-process command renders it.
fn report<T: serde::de::DeserializeOwned>(json_text: &str, all_reachable: bool, json: bool, text: fn(&T) -> String) -> Result<Outcome, CoordinatorError> {
    if json {
        print_text(json_text)?;
    } else {
        let typed: T = serde_json::from_str(json_text).map_err(|e| CoordinatorError::Remote {
            message: format!("the coordinator's answer does not read as this pgfleet's report ({e}): is it another version?"),
            exit_code: 1,
        })?;
        print_text(&text(&typed))?;
    }
    Ok(if all_reachable { Outcome::Done } else { Outcome::Partial })
}

/// Follows an operation to its end, showing its events; returns its result
/// or its error with the in-process exit code.
pub async fn watch(c: &mut CoordinatorClient<Channel>, id: &str, json: bool, display: Display) -> Result<Outcome, CoordinatorError> {
    let mut stream = c
        .watch_operation(pb::WatchOperationRequest { operation_id: id.to_owned(), from_seq: 0 })
        .await
        .map_err(from_status)?
        .into_inner();
    let mut view = OperationView::new(display);
    let mut finished = None;
    while let Some(item) = stream.next().await {
        let ev = item.map_err(from_status)?;
        view.show(&ev);
        if let Some(pb::operation_event::Event::Finished(f)) = ev.event {
            finished = Some(f);
            break;
        }
    }
    view.finish();
    let f = finished.ok_or_else(|| CoordinatorError::Remote {
        message: format!("the coordinator's event stream of {id} ended early; watch it again with: pgfleet ops watch {id}"),
        exit_code: 1,
    })?;
    match f.error {
        Some(message) => Err(CoordinatorError::Remote { message, exit_code: f.exit_code.max(1) }),
        None => {
            // The typed answer, rendered here as in-process; a server that
            // sent text instead (an older pgfleet serve) is shown as it is.
            match serde_json::from_str::<OpResult>(&f.json) {
                Ok(r) => print_result(&r, json)?,
                Err(_) => print_text(if json { &f.json } else { &f.text })?,
            }
            Ok(Outcome::Done)
        }
    }
}

async fn start_request(c: &mut CoordinatorClient<Channel>, req: ApiRequest) -> Result<tonic::Response<pb::OperationRef>, tonic::Status> {
    match req {
        ApiRequest::Rebuild(r) => c.rebuild(r).await,
        ApiRequest::SetSync(r) => c.set_sync(r).await,
        ApiRequest::Switchover(r) => c.switchover(r).await,
        ApiRequest::Failover(r) => c.failover(r).await,
        ApiRequest::Rejoin(r) => c.rejoin(r).await,
        ApiRequest::Restart(r) => c.restart(r).await,
        ApiRequest::DropSlot(r) => c.drop_slot(r).await,
        ApiRequest::SetFailoverPolicy(r) => c.set_failover_policy(r).await,
    }
}

/// Runs the command on the coordinator at `url`; a follower's answer names
/// the leader, and the command goes there instead (once).
pub async fn run(cli: &Cli, url: &str) -> Result<Outcome, CoordinatorError> {
    // While an election is under way (no leader known yet, or the leader
    // stepping down and campaigning again) the call is tried again for a
    // while: an etcd fault should cost a caller a few seconds, not a failure.
    let deadline = std::time::Instant::now() + ELECTION_WAIT;
    loop {
        match run_at(cli, url).await {
            Err(CoordinatorError::NotLeader { leader, .. }) if !leader.is_empty() && leader != url => {
                eprintln!("{url} is a follower; the leader is {leader}");
                return run_at(cli, &leader).await;
            }
            Err(e @ CoordinatorError::NotLeader { .. }) => {
                if std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                tracing::info!(error = %e, "no coordinator leads yet; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// How long the CLI waits for a coordinator to be elected.
const ELECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

async fn run_at(cli: &Cli, url: &str) -> Result<Outcome, CoordinatorError> {
    let mut c = connect(cli, url).await?;
    if let Some((req, json, display)) = op_request(&cli.command) {
        let id = start_request(&mut c, req).await.map_err(from_status)?.into_inner().operation_id;
        if !json {
            eprintln!("operation {id} (watch it again with: pgfleet --coordinator {url} ops watch {id})");
        }
        return watch(&mut c, &id, json, display).await;
    }
    match &cli.command {
        Command::Status(a) => {
            let r = c
                .get_fleet_status(pb::GetFleetStatusRequest { cluster: a.cluster.clone().unwrap_or_default() })
                .await
                .map_err(from_status)?
                .into_inner();
            report(&r.json, r.all_reachable, a.json, crate::cli::status::render)
        }
        Command::Slots(a) if a.action.is_none() || matches!(a.action, Some(SlotsAction::Drop { .. })) => {
            let r = c
                .get_slots(pb::GetSlotsRequest { cluster: a.cluster.clone().unwrap_or_default(), inactive_only: a.inactive })
                .await
                .map_err(from_status)?
                .into_inner();
            report(&r.json, r.all_reachable, a.json, crate::cli::views::slots)
        }
        Command::Wal(a) => {
            let r = c.get_wal(pb::GetWalRequest { node: a.node.clone() }).await.map_err(from_status)?.into_inner();
            report(&r.json, r.all_reachable, a.json, crate::cli::views::wal)
        }
        Command::Sync(s) => match &s.action {
            SyncAction::Show { cluster, json } => {
                let r = c
                    .get_sync(pb::GetSyncRequest { cluster: cluster.clone().unwrap_or_default() })
                    .await
                    .map_err(from_status)?
                    .into_inner();
                report(&r.json, r.all_reachable, *json, crate::cli::views::sync)
            }
            SyncAction::Set { .. } => Ok(Outcome::Done),
        },
        Command::Rebuild(_) => Err(usage(
            "--attach watches an agent's job directly; with --coordinator, watch the operation: pgfleet ops watch OP",
        )),
        Command::Ops(o) => match &o.action {
            OpsAction::List { cluster, limit, json } => {
                let r = c
                    .list_operations(pb::ListOperationsRequest { cluster: cluster.clone().unwrap_or_default(), limit: *limit })
                    .await
                    .map_err(from_status)?
                    .into_inner();
                if *json {
                    print_json(&r.operations.iter().map(op_json).collect::<Vec<_>>())?;
                } else {
                    let mut t = crate::cli::table::Table::new(&["OPERATION", "CLUSTER", "STATE", "STARTED", "SUMMARY", "CALLER"]);
                    for o in &r.operations {
                        t.row(vec![o.id.clone(), o.cluster.clone(), state_name(o.state), o.started_at.clone(), o.summary.clone(), o.caller.clone()]);
                    }
                    print_text(&if t.is_empty() { "no operations journaled\n".into() } else { t.render() })?;
                }
                Ok(Outcome::Done)
            }
            OpsAction::Show { id, json } => {
                let o = c.get_operation(pb::GetOperationRequest { operation_id: id.clone() }).await.map_err(from_status)?.into_inner();
                if *json {
                    print_json(&op_json(&o))?;
                } else {
                    let mut s = format!("{} ({}) on cluster {}: {}\n  {}\n  started {} by {}\n", o.id, o.kind, o.cluster, state_name(o.state), o.summary, o.started_at, o.caller);
                    if let Some(e) = &o.ended_at {
                        s += &format!("  ended {e}{}\n", o.detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default());
                    }
                    for e in &o.journal {
                        s += &format!("  {} {:<26} {:<10} {}\n", e.time, e.step, e.event, e.detail);
                    }
                    print_text(&s)?;
                }
                Ok(Outcome::Done)
            }
            OpsAction::Watch { id, json, no_progress_bar } => watch(&mut c, id, *json, display(*json, *no_progress_bar)).await,
            OpsAction::Cancel { id } => {
                let o = c.cancel_operation(pb::CancelOperationRequest { operation_id: id.clone() }).await.map_err(from_status)?.into_inner();
                print_text(&format!("cancel of {} accepted: it stops at its next safe point ({})\n", o.id, state_name(o.state)))?;
                Ok(Outcome::Done)
            }
            OpsAction::Resume { id, json } | OpsAction::Abort { id, json } => {
                let r = if matches!(o.action, OpsAction::Abort { .. }) {
                    c.abort_operation(pb::AbortOperationRequest { operation_id: id.clone() }).await
                } else {
                    c.resume_operation(pb::ResumeOperationRequest { operation_id: id.clone() }).await
                };
                let id = r.map_err(from_status)?.into_inner().operation_id;
                watch(&mut c, &id, *json, display(*json, false)).await
            }
        },
        Command::Certs(_) | Command::Serve(_) | Command::Switchover(_) | Command::Failover(_) | Command::Rejoin(_) | Command::Restart(_) | Command::Slots(_)
        | Command::Pause(_) | Command::Resume(_) | Command::FailoverPolicy(_) => {
            Ok(Outcome::Done)
        }
    }
}

fn state_name(s: i32) -> String {
    pb::OperationState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("OPERATION_STATE_").to_lowercase())
        .unwrap_or_else(|_| "unknown".into())
}

fn op_json(o: &pb::Operation) -> serde_json::Value {
    serde_json::json!({
        "id": o.id, "kind": o.kind, "cluster": o.cluster, "summary": o.summary,
        "state": state_name(o.state), "caller": o.caller, "started_at": o.started_at,
        "ended_at": o.ended_at, "detail": o.detail,
        "journal": o.journal.iter().map(|e| serde_json::json!({"time": e.time, "step": e.step, "event": e.event, "detail": e.detail})).collect::<Vec<_>>(),
    })
}
