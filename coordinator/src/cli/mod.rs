//! The `pgfleet` command line: dispatch. Output for people goes to stdout
//! as tables, `--json` gives programs one JSON document; logs and progress
//! go to stderr. Arguments are in [`args`], what is printed in [`output`],
//! commands sent to `pgfleet serve` in [`remote`].

pub mod args;
pub mod output;
pub mod remote;
pub mod render;
pub mod status;
pub mod table;
pub mod view;
pub mod views;

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::fleet_status;
use crate::inventory::Inventory;
use crate::ops::{OpCtx, OpRequest, OpResult};
use crate::rebuild::{self, Display};
use crate::{slots, wal};

pub use args::{Cli, Command};
pub use output::Outcome;
use args::*;
use output::{display, print_json, print_result, print_text, render_events};

pub async fn run(cli: Cli) -> Result<Outcome, CoordinatorError> {
    let d = cli.deadlines();
    match &cli.command {
        Command::Certs(c) => return run_certs(c),
        Command::Serve(s) => {
            crate::serve::run(&s.config, d).await?;
            return Ok(Outcome::Done);
        }
        _ => {}
    }
    match cli.coordinator.as_deref() {
        Some("local") => {}
        Some(url) => return remote::run(&cli, url).await,
        None => {}
    }
    let mut inventory = Inventory::load(&cli.inventory)?;
    if cli.coordinator.is_none()
        && let Some(url) = inventory.coordinator.clone()
    {
        return remote::run(&cli, &url).await;
    }
    if let (Some(tls), Some(c), Some(k)) = (inventory.tls.as_mut(), &cli.tls_cert, &cli.tls_key) {
        tls.cert = c.clone();
        tls.key = k.clone();
    }
    inventory.attach_agents(false).map_err(|e| CoordinatorError::Usage(e.to_string()))?;
    if let Some((req, json, display)) = op_request(&cli.command) {
        let r = run_local(&inventory, OpRequest::try_from(req)?, d, display).await?;
        print_result(&r, json)?;
        return Ok(Outcome::Done);
    }
    match &cli.command {
        Command::Status(a) => {
            let clusters = inventory.select(a.cluster.as_deref())?;
            let report = fleet_status::gather(&clusters, d).await.with_policies(&clusters, &inventory.store).await;
            if a.json {
                print_json(&report)?;
            } else {
                print_text(&status::render(&report))?;
            }
            Ok(reachable(report.all_reachable))
        }
        Command::Slots(a) => {
            let clusters = inventory.select(a.cluster.as_deref())?;
            let report = slots::list(&clusters, a.inactive, d).await;
            if a.json {
                print_json(&report)?;
            } else {
                print_text(&views::slots(&report))?;
            }
            Ok(reachable(report.all_reachable))
        }
        Command::Sync(SyncArgs {
            action: SyncAction::Show { cluster, json },
        }) => {
            let c = crate::ops::named_cluster(&inventory, cluster.as_deref())?;
            let report = crate::sync::show(&inventory, &c, d).await?;
            if *json {
                print_json(&report)?;
            } else {
                print_text(&views::sync(&report))?;
            }
            Ok(Outcome::Done)
        }
        Command::Rebuild(a) => {
            // --attach: only watches a job, changes nothing.
            let (job, node) = (a.attach.clone().unwrap_or_default(), a.node.clone().unwrap_or_default());
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let ctx = OpCtx::new(format!("attach-{job}"), None, Some(tx), Default::default());
            let view = tokio::spawn(render_events(rx, display(a.json, a.no_progress_bar)));
            let result = rebuild::attach(&inventory, &node, &job, a.from.as_deref(), a.slot.as_deref(), d, &ctx).await;
            drop(ctx);
            let _ = view.await;
            print_result(&OpResult::Rebuilt(result?), a.json)?;
            Ok(Outcome::Done)
        }
        Command::Wal(a) => {
            let r = wal::get(&inventory, &a.node, d).await?;
            if a.json {
                print_json(&r)?;
            } else {
                print_text(&views::wal(&r))?;
            }
            Ok(Outcome::Done)
        }
        Command::Ops(o) => run_ops_local(&inventory, &o.action, d).await,
        _ => Ok(Outcome::Done),
    }
}

fn reachable(all: bool) -> Outcome {
    if all { Outcome::Done } else { Outcome::Partial }
}

/// Who runs a local operation, as the journal names the caller: the OS
/// user, and the client certificate the agents see.
fn local_caller(inventory: &Inventory) -> String {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {uid}"));
    match &inventory.tls {
        Some(tls) => format!("{user} with certificate {}", tls.cert.display()),
        None => user,
    }
}

/// Runs an operation in this process: the same begin, execute and finish
/// `pgfleet serve` runs, its events shown as they come.
pub async fn run_local(inventory: &Inventory, mut req: OpRequest, d: Deadlines, display: Display) -> Result<OpResult, CoordinatorError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ctx, _, _) = crate::ops::begin(inventory, &mut req, &local_caller(inventory), Some(tx), Default::default()).await?;
    let view = tokio::spawn(render_events(rx, display));
    let result = crate::ops::execute(inventory, &req, d, &ctx).await;
    let fin = crate::ops::finish(ctx, &result, false).await;
    let _ = view.await;
    unjournaled(result, fin)
}

/// The result, unless its end could not be journaled (`finish` says so in
/// the final event's error while the operation itself succeeded).
fn unjournaled(result: Result<OpResult, CoordinatorError>, fin: pgfleet_proto::coordinator::v1::OperationFinished) -> Result<OpResult, CoordinatorError> {
    match (result, fin.error) {
        (Ok(_), Some(message)) => Err(CoordinatorError::Remote { message, exit_code: fin.exit_code.max(1) }),
        (Err(e), Some(message)) if message != e.to_string() => {
            Err(CoordinatorError::Remote { message, exit_code: fin.exit_code.max(1) })
        }
        (result, _) => result,
    }
}

async fn run_ops_local(inventory: &Inventory, action: &OpsAction, d: Deadlines) -> Result<Outcome, CoordinatorError> {
    match action {
        OpsAction::List { cluster, limit, json } => {
            let mut ops = crate::ops::store::load(&inventory.store).await?;
            ops.retain(|o| cluster.as_ref().is_none_or(|c| &o.cluster == c));
            ops.reverse();
            ops.truncate(*limit as usize);
            if *json {
                print_json(&ops)?;
            } else {
                print_text(&views::ops_list(&ops))?;
            }
        }
        OpsAction::Show { id, json } => {
            pgfleet_proto::OperationId::parse(id)?;
            let o = crate::ops::store::find(&inventory.store, id).await?
                .ok_or_else(|| CoordinatorError::Usage(format!("no operation {id} in the journal ({})", inventory.store)))?;
            if *json {
                print_json(&o)?;
            } else {
                print_text(&views::op(&o))?;
            }
        }
        OpsAction::Watch { .. } | OpsAction::Cancel { .. } => {
            return Err(CoordinatorError::Usage(
                "watch and cancel act on operations running in `pgfleet serve`: pass --coordinator URL \
                 (an operation run by the CLI shows its progress where it runs)"
                    .into(),
            ));
        }
        OpsAction::Resume { id, json } | OpsAction::Abort { id, json } => {
            let abort = matches!(action, OpsAction::Abort { .. });
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (ctx, rec, req) = crate::ops::resume::begin(
                inventory,
                id,
                if abort { "abort" } else { "resume" },
                &local_caller(inventory),
                Some(tx),
                Default::default(),
            )
            .await?;
            let view = tokio::spawn(render_events(rx, display(*json, false)));
            let result = if abort {
                crate::ops::resume::abort(inventory, &rec, &req, d, &ctx).await
            } else {
                crate::ops::resume::resume(inventory, &rec, &req, d, &ctx).await
            };
            let fin = crate::ops::finish(ctx, &result, abort).await;
            let _ = view.await;
            print_result(&unjournaled(result, fin)?, *json)?;
        }
    }
    Ok(Outcome::Done)
}

fn run_certs(c: &CertsArgs) -> Result<Outcome, CoordinatorError> {
    let files = match &c.action {
        CertsAction::Init { dir, days } => crate::certs::init(dir, *days),
        CertsAction::Issue { dir, role, name, san, days } => {
            let role = pgfleet_proto::identity::CertRole::parse(role)
                .ok_or_else(|| CoordinatorError::Usage(format!("unknown role {role}")))?;
            crate::certs::issue(
                dir,
                &crate::certs::IssueRequest {
                    role,
                    name: name.clone(),
                    sans: san.clone(),
                    valid_days: *days,
                },
            )
        }
    }
    .map_err(|e| CoordinatorError::Usage(e.to_string()))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(Outcome::Done)
}
