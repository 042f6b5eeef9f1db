//! The `pgfleet` command line: argument definitions and dispatch. Output for
//! people goes to stdout as tables, `--json` gives programs one JSON
//! document; logs and progress go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pgfleet_proto::SlotName;
use serde::Serialize;

use crate::client::Deadlines;
use crate::error::CoordinatorError;
use crate::fleet_status;
use crate::inventory::Inventory;
use crate::rebuild::{self, Display};
use crate::{slots, status_render, wal};

/// pgfleet: rebuild replicas, run synchronous replication and move the
/// primary role across a PostgreSQL fleet, through an agent on every host.
///
/// Exit codes: 0 success; 1 an operation failed or was refused;
/// 2 bad usage or configuration (nothing was changed); 3 some agents could
/// not be reached (the output says which).
#[derive(Debug, Parser)]
#[command(name = "pgfleet", version, about, long_about)]
pub struct Cli {
    /// Inventory file: clusters, nodes, agent endpoints.
    #[arg(long, global = true, env = "PGFLEET_INVENTORY", default_value = "/etc/pgfleet/inventory.toml")]
    pub inventory: PathBuf,
    /// Deadline for each call to an agent, e.g. "5s".
    #[arg(long, global = true, env = "PGFLEET_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Deadline for connecting to an agent.
    #[arg(long, global = true, env = "PGFLEET_CONNECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Client certificate towards https:// agents (overrides the inventory's
    /// [tls] cert), e.g. a reader identity for monitoring.
    #[arg(long, global = true, env = "PGFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its key (0600).
    #[arg(long, global = true, env = "PGFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, env = "PGFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every node of every cluster: role, state, timeline, LSN, lag, sync state.
    Status(StatusArgs),
    /// Replication slots of every node, flagging inactive slots that hold WAL back.
    Slots(SlotsArgs),
    /// WAL positions, WAL file names and the archiver of one node.
    Wal(WalArgs),
    /// Rebuild a replica from the cluster's primary (or --from NODE): grant
    /// access on the upstream, stop the node, move its data directory aside
    /// (never deleted), pg_basebackup, start, wait until it streams.
    Rebuild(RebuildArgs),
    /// Synchronous replication of a cluster.
    Sync(SyncArgs),
    /// Planned move of the primary role to a standby, with no acknowledged
    /// commit lost; the old primary follows the new one.
    Switchover(SwitchoverArgs),
    /// The primary is gone: fence it, promote the standby that has every
    /// acknowledged commit, re-point the rest.
    Failover(FailoverArgs),
    /// Bring a former primary (fenced or crashed) back as a standby of the
    /// current primary (pg_rewind when its timeline diverged).
    Rejoin(RejoinArgs),
    /// The fleet CA and certificates for agents, admins and readers.
    Certs(CertsArgs),
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub action: CertsAction,
}

#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Create the fleet CA (ca.crt, ca.key) in DIR.
    Init {
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue NAME.crt and NAME.key in DIR, signed by its CA.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// agent: a server certificate; admin: may change things; reader:
        /// read-only calls.
        #[arg(long, value_parser = ["agent", "admin", "reader"])]
        role: String,
        /// The holder's name (an agent's host name).
        name: String,
        /// More names or IP addresses the agent is reached by (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(subcommand)]
    pub action: SyncAction,
}

#[derive(Debug, Subcommand)]
pub enum SyncAction {
    /// Set the synchronous standbys: `sync set --cluster C [--method first|any] [--num N] NODE...`,
    /// or `--off` for asynchronous replication.
    Set {
        /// Cluster (optional when the inventory has one).
        #[arg(long)]
        cluster: Option<String>,
        /// "first": priority order (FIRST n); "any": quorum (ANY n).
        #[arg(long, default_value = "first", value_parser = ["first", "any"])]
        method: String,
        /// How many standbys must confirm each commit.
        #[arg(long, default_value_t = 1)]
        num: u32,
        /// Back to asynchronous replication.
        #[arg(long, conflicts_with_all = ["nodes", "num", "method"])]
        off: bool,
        /// The synchronous standbys, in priority order.
        nodes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show synchronous_standby_names and each standby's sync_state.
    Show {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    #[arg(long)]
    pub cluster: Option<String>,
    /// The standby to promote (default: a synchronous one, least lag).
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
    /// Print the checks' result and the steps; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    #[arg(long)]
    pub cluster: Option<String>,
    /// The standby to promote (default: the most advanced synchronous one).
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
    /// The old primary's agent cannot be reached and you made sure it is down.
    #[arg(long)]
    pub fenced: bool,
    /// Promote even when no candidate provably has every acknowledged commit.
    #[arg(long)]
    pub accept_data_loss: bool,
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RejoinArgs {
    /// The former primary.
    pub node: String,
    /// Rebuild it (data directory moved aside) when pg_rewind cannot be used.
    #[arg(long)]
    pub rebuild_if_needed: bool,
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Node to rebuild.
    pub node: String,
    /// Copy from this node instead of the cluster's current primary.
    #[arg(long, value_name = "NODE")]
    pub from: Option<String>,
    /// Replication slot on the upstream (default: the node's name, '-' as '_').
    #[arg(long)]
    pub slot: Option<String>,
    /// Relocate a tablespace: OLD=NEW, both absolute (repeatable).
    #[arg(long = "tablespace-mapping", value_name = "OLD=NEW")]
    pub tablespace_mapping: Vec<String>,
    /// Checkpoint mode on the upstream: "fast" starts the copy at once,
    /// "spread" spares a busy primary.
    #[arg(long, default_value = "fast", value_parser = ["fast", "spread"])]
    pub checkpoint: String,
    /// Print every step with its host and the SQL or argv it would run;
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Watch a rebuild job already running (or finished) on NODE again.
    #[arg(long, value_name = "JOB")]
    pub attach: Option<String>,
    /// One JSON object per event on stdout, then the result.
    #[arg(long)]
    pub json: bool,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    pub no_progress_bar: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// One JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SlotsArgs {
    #[command(subcommand)]
    pub action: Option<SlotsAction>,
    /// Only this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Only inactive slots that hold WAL back.
    #[arg(long)]
    pub inactive: bool,
    /// One JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SlotsAction {
    /// Drop a replication slot on a node. An active slot is refused unless --force.
    Drop {
        /// Node name from the inventory.
        node: String,
        /// Slot name ([a-z0-9_]{1,63}).
        slot: String,
        /// Terminate the WAL sender of a standby still using the slot.
        #[arg(long)]
        force: bool,
        /// Print the steps and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct WalArgs {
    /// Node name from the inventory.
    pub node: String,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How a command ended, beyond success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Some agents could not be reached; the output says which.
    Partial,
}

impl Cli {
    fn deadlines(&self) -> Deadlines {
        Deadlines {
            connect: self.connect_timeout,
            call: self.timeout,
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), CoordinatorError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn print_text(s: &str) -> Result<(), CoordinatorError> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    Ok(())
}

pub async fn run(cli: Cli) -> Result<Outcome, CoordinatorError> {
    let d = cli.deadlines();
    if let Command::Certs(c) = &cli.command {
        return run_certs(c);
    }
    let inventory = Inventory::load(&cli.inventory)?;
    if let Some(mut tls) = inventory.tls.clone() {
        if let (Some(c), Some(k)) = (&cli.tls_cert, &cli.tls_key) {
            tls.cert = c.clone();
            tls.key = k.clone();
        }
        crate::client::init_tls(&tls).map_err(|e| CoordinatorError::Usage(e.to_string()))?;
    }
    match &cli.command {
        Command::Certs(_) => Ok(Outcome::Done),
        Command::Status(a) => {
            let clusters = inventory.select(a.cluster.as_deref())?;
            let report = fleet_status::gather(&clusters, d).await;
            if a.json {
                print_json(&report)?;
            } else {
                print_text(&status_render::render(&report))?;
            }
            Ok(if report.all_reachable {
                Outcome::Done
            } else {
                Outcome::Partial
            })
        }
        Command::Slots(a) => match &a.action {
            None => {
                let clusters = inventory.select(a.cluster.as_deref())?;
                let report = slots::list(&clusters, a.inactive, d).await;
                if a.json {
                    print_json(&report)?;
                } else {
                    print_text(&slots::render(&report))?;
                }
                Ok(if report.all_reachable {
                    Outcome::Done
                } else {
                    Outcome::Partial
                })
            }
            Some(SlotsAction::Drop {
                node,
                slot,
                force,
                dry_run,
                json,
            }) => {
                if *dry_run {
                    let slot = SlotName::parse(slot)?;
                    let (_, n) = inventory.node(node)?;
                    let steps = slots::drop_plan(n, &slot, *force);
                    if *json {
                        print_json(&serde_json::json!({ "dry_run": true, "steps": steps }))?;
                    } else {
                        let mut s = format!("plan (dry run, nothing changed): drop slot {slot} on {node}\n");
                        for (i, step) in steps.iter().enumerate() {
                            s += &format!("  {}. {step}\n", i + 1);
                        }
                        print_text(&s)?;
                    }
                    return Ok(Outcome::Done);
                }
                let r = slots::drop(&inventory, node, slot, *force, d).await?;
                if *json {
                    print_json(&r)?;
                } else {
                    let mut s = format!("dropped replication slot {} on {}", r.slot, r.node);
                    if let Some(b) = r.released_wal_bytes {
                        s += &format!(" ({} of WAL no longer retained)", fleet_status::bytes(b));
                    }
                    if r.terminated_sender {
                        s += "; its WAL sender was terminated";
                    }
                    s.push('\n');
                    print_text(&s)?;
                }
                Ok(Outcome::Done)
            }
        },
        Command::Rebuild(a) => run_rebuild(&inventory, a, d).await,
        Command::Sync(a) => run_sync(&inventory, a, d).await,
        Command::Switchover(a) => {
            let cluster = one_cluster(&inventory, a.cluster.as_deref())?;
            let plan = crate::failover::switchover_preflight(&inventory, &cluster, a.to.as_deref(), d).await?;
            if a.dry_run {
                let lines = crate::failover::switchover_plan_lines(&plan);
                if a.json {
                    print_json(&serde_json::json!({ "dry_run": true, "warnings": plan.warnings, "steps": lines }))?;
                } else {
                    let mut s = crate::failover::render_plan(
                        &format!("switch over {} from {} to {}", plan.cluster.name, plan.old.name, plan.new.name),
                        &lines,
                    );
                    for w in &plan.warnings {
                        s += &format!("warning: {w}\n");
                    }
                    print_text(&s)?;
                }
                return Ok(Outcome::Done);
            }
            for w in &plan.warnings {
                eprintln!("warning: {w}");
            }
            let r = crate::failover::switchover(&inventory, plan, d).await?;
            if a.json { print_json(&r)?; } else { print_text(&crate::failover::render(&r))?; }
            Ok(Outcome::Done)
        }
        Command::Failover(a) => {
            let cluster = one_cluster(&inventory, a.cluster.as_deref())?;
            let req = crate::failover::FailoverRequest {
                cluster,
                to: a.to.clone(),
                fenced: a.fenced,
                accept_data_loss: a.accept_data_loss,
                dry_run: a.dry_run,
            };
            match crate::failover::failover(&inventory, &req, d).await? {
                Ok(r) => {
                    if a.json { print_json(&r)?; } else { print_text(&crate::failover::render(&r))?; }
                }
                Err(lines) => {
                    if a.json {
                        print_json(&serde_json::json!({ "dry_run": true, "steps": lines }))?;
                    } else {
                        print_text(&crate::failover::render_plan(&format!("fail over {}", req.cluster), &lines))?;
                    }
                }
            }
            Ok(Outcome::Done)
        }
        Command::Rejoin(a) => {
            let r = crate::rejoin::rejoin(&inventory, &a.node, a.rebuild_if_needed, a.dry_run, d).await?;
            if a.json {
                print_json(&r)?;
            } else if let Some(p) = &r.plan {
                print_text(&format!("{p}\n"))?;
            } else {
                print_text(&format!(
                    "{} rejoined as a standby of {} ({}) in {:.2}s\n",
                    r.node, r.primary, r.method, r.seconds
                ))?;
            }
            Ok(Outcome::Done)
        }
        Command::Wal(a) => {
            let r = wal::get(&inventory, &a.node, d).await?;
            if a.json {
                print_json(&r)?;
            } else {
                print_text(&wal::render(&r))?;
            }
            Ok(Outcome::Done)
        }
    }
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

/// `--cluster`, or the inventory's only cluster.
fn one_cluster(inventory: &Inventory, cluster: Option<&str>) -> Result<String, CoordinatorError> {
    match cluster {
        Some(c) => Ok(inventory.select(Some(c))?[0].name.to_string()),
        None if inventory.clusters.len() == 1 => Ok(inventory.clusters[0].name.to_string()),
        None => Err(CoordinatorError::Usage(format!(
            "the inventory has {} clusters; say which with --cluster ({})",
            inventory.clusters.len(),
            inventory.clusters.iter().map(|c| c.name.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

async fn run_sync(inventory: &Inventory, a: &SyncArgs, d: Deadlines) -> Result<Outcome, CoordinatorError> {
    let (report, json) = match &a.action {
        SyncAction::Show { cluster, json } => {
            let c = one_cluster(inventory, cluster.as_deref())?;
            (crate::sync::show(inventory, &c, d).await?, *json)
        }
        SyncAction::Set { cluster, method, num, off, nodes, json } => {
            let c = one_cluster(inventory, cluster.as_deref())?;
            let spec = if *off {
                None
            } else {
                if nodes.is_empty() {
                    return Err(CoordinatorError::Usage(
                        "name the synchronous standbys (sync set NODE...), or pass --off".into(),
                    ));
                }
                let m = if method == "any" {
                    pgfleet_proto::sync::SyncMethod::Any
                } else {
                    pgfleet_proto::sync::SyncMethod::First
                };
                Some((m, *num, nodes.clone()))
            };
            (crate::sync::set(inventory, &c, spec, d).await?, *json)
        }
    };
    if json {
        print_json(&report)?;
    } else {
        print_text(&crate::sync::render(&report))?;
    }
    Ok(Outcome::Done)
}

async fn run_rebuild(inventory: &Inventory, a: &RebuildArgs, d: Deadlines) -> Result<Outcome, CoordinatorError> {
    use std::io::IsTerminal;
    let display = if a.json {
        Display::Json
    } else if !a.no_progress_bar && std::io::stderr().is_terminal() {
        Display::Bar
    } else {
        Display::Plain
    };
    let report = if let Some(job) = &a.attach {
        rebuild::attach(inventory, &a.node, job, a.from.as_deref(), a.slot.as_deref(), d, display).await?
    } else {
        let req = rebuild::RebuildRequest {
            node: a.node.clone(),
            from: a.from.clone(),
            slot: a.slot.clone(),
            tablespace_mappings: a.tablespace_mapping.clone(),
            spread_checkpoint: a.checkpoint == "spread",
            dry_run: a.dry_run,
        };
        let prepared = rebuild::preflight(inventory, &req, d).await?;
        let op = if a.dry_run {
            None
        } else {
            Some(crate::journal::Operation::begin(
                &inventory.state_dir,
                prepared.cluster.name.as_str(),
                "rebuild",
                &format!("{} from {}", prepared.node.name, prepared.upstream.name),
            )?)
        };
        if a.dry_run {
            let steps = rebuild::plan(&prepared, &req, d).await?;
            if a.json {
                let v: Vec<_> = steps
                    .iter()
                    .map(|(host, s)| {
                        serde_json::json!({
                            "host": host, "step": s.name, "description": s.description,
                            "argv": s.argv, "sql": s.sql,
                        })
                    })
                    .collect();
                print_json(&serde_json::json!({ "dry_run": true, "steps": v }))?;
            } else {
                let mut s = format!(
                    "plan (dry run, nothing changed): rebuild {} from {}\n",
                    prepared.node.name, prepared.upstream.name
                );
                for (i, (host, step)) in steps.iter().enumerate() {
                    s += &format!("  {:>2}. [{host}] {}: {}\n", i + 1, step.name, step.description);
                    if !step.argv.is_empty() {
                        s += &format!("        $ {}\n", pgfleet_proto::shell_words(&step.argv));
                    }
                    if let Some(sql) = &step.sql {
                        s += &format!("        SQL: {sql}\n");
                    }
                }
                print_text(&s)?;
            }
            return Ok(Outcome::Done);
        }
        let report = rebuild::execute(&prepared, &req, d, display).await?;
        if let Some(op) = op {
            op.end("succeeded");
        }
        report
    };
    if a.json {
        // One line: --json is a stream of JSON lines.
        println!("{}", serde_json::json!({ "result": report }));
    } else {
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
        print_text(&s)?;
    }
    Ok(Outcome::Done)
}
