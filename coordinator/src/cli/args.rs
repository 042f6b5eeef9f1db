//! The `pgfleet` command line's arguments (clap), and the operation request
//! each command that changes the fleet makes: the same [`OpRequest`] that
//! `pgfleet serve` builds from its API messages.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cli::output::display;
use crate::client::Deadlines;
use pgfleet_proto::coordinator::v1 as pb;

use crate::ops::ApiRequest;
use crate::rebuild::Display;

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
    #[arg(long, global = true, env = "PGFLEET_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub timeout: Duration,
    /// Deadline for connecting to an agent.
    #[arg(long, global = true, env = "PGFLEET_CONNECT_TIMEOUT", default_value = "3s", value_parser = positive_duration)]
    pub connect_timeout: Duration,
    /// Client certificate towards https:// agents (overrides the inventory's
    /// [tls] cert), e.g. a reader identity for monitoring.
    #[arg(long, global = true, env = "PGFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its key (0600).
    #[arg(long, global = true, env = "PGFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Send every command to this `pgfleet serve` (https://HOST:PORT)
    /// instead of running it in this process; the output is the same.
    /// Default: the inventory's `coordinator`; "local" runs in-process.
    #[arg(long, global = true, env = "PGFLEET_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// The fleet CA the coordinator's certificate must chain to (default:
    /// the inventory's [tls] ca).
    #[arg(long, global = true, env = "PGFLEET_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
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
    /// Start again a primary whose server crashed, when every node of its
    /// cluster is down (a power loss): only a node that crashed as a
    /// primary, that pgfleet did not fence, on the cluster's latest
    /// timeline, with no primary running. Then `pgfleet rejoin` its standbys.
    Restart(RestartArgs),
    /// Maintenance mode: `pgfleet serve` keeps watching the cluster and
    /// acts on nothing by itself (no automatic failover or rejoin) until
    /// `pgfleet resume`. Shown in `pgfleet status`.
    Pause(PauseArgs),
    /// Ends maintenance mode: automatic actions as the policy says.
    Resume(PolicyArgs),
    /// Whether `pgfleet serve` fails a cluster over by itself: automatic,
    /// manual, or as the inventory's auto_failover says (inventory).
    FailoverPolicy(FailoverPolicyArgs),
    /// The fleet CA and certificates for agents, admins and readers.
    Certs(CertsArgs),
    /// Operations journaled on this coordinator: list, show, watch, cancel,
    /// resume or abort one.
    Ops(OpsArgs),
    /// Serve the coordinator API (gRPC, mutual TLS) for other systems and
    /// `pgfleet --coordinator`.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The service's configuration.
    #[arg(long, env = "PGFLEET_COORDINATOR_CONFIG", default_value = "/etc/pgfleet/coordinator.toml")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct OpsArgs {
    #[command(subcommand)]
    pub action: OpsAction,
}

#[derive(Debug, Subcommand)]
pub enum OpsAction {
    /// Newest first: id, cluster, state (running, succeeded, failed,
    /// cancelled, interrupted, aborted), caller.
    List {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One operation with every journal line.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow an operation running in `pgfleet serve` (needs --coordinator).
    Watch {
        id: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        no_progress_bar: bool,
    },
    /// Stop an operation where that is safe (needs --coordinator).
    Cancel { id: String },
    /// Finish an interrupted operation.
    Resume {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// End an interrupted operation without finishing it; says how the
    /// cluster was left.
    Abort {
        id: String,
        #[arg(long)]
        json: bool,
    },
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
        /// Show the steps without changing anything.
        #[arg(long)]
        dry_run: bool,
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
pub struct PauseArgs {
    /// Why (a maintenance window, a ticket): shown while paused.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub common: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The cluster (may be left out when the inventory has one).
    pub cluster: Option<String>,
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FailoverPolicyArgs {
    #[arg(value_parser = ["automatic", "manual", "inventory"])]
    pub policy: String,
    #[command(flatten)]
    pub common: PolicyArgs,
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
pub struct RestartArgs {
    /// The crashed primary.
    pub node: String,
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Node to rebuild.
    #[arg(required_unless_present = "all_replicas")]
    pub node: Option<String>,
    /// Rebuild every replica of --cluster, one at a time, never leaving
    /// fewer synchronous standbys than synchronous_standby_names needs.
    #[arg(long, conflicts_with_all = ["node", "from", "slot", "tablespace_mapping", "attach"])]
    pub all_replicas: bool,
    /// The cluster, with --all-replicas (optional when the inventory has one).
    #[arg(long, requires = "all_replicas")]
    pub cluster: Option<String>,
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

impl Cli {
    pub fn deadlines(&self) -> Deadlines {
        Deadlines {
            connect: self.connect_timeout,
            call: self.timeout,
        }
    }
}

/// The operation a command asks for, as the API message `pgfleet serve`
/// takes (sent as it is with `--coordinator`, validated in-process by the
/// same conversion into [`OpRequest`](crate::ops::OpRequest)), and whether
/// it wants JSON.
pub fn op_request(command: &Command) -> Option<(ApiRequest, bool, Display)> {
    Some(match command {
        Command::Rebuild(a) if a.attach.is_none() => {
            let req = pb::RebuildRequest {
                node: a.node.clone().unwrap_or_default(),
                from: a.from.clone(),
                slot: a.slot.clone(),
                tablespace_mappings: a.tablespace_mapping.clone(),
                spread_checkpoint: a.checkpoint == "spread",
                dry_run: a.dry_run,
                all_replicas: a.all_replicas,
                all_replicas_of: if a.all_replicas { a.cluster.clone().unwrap_or_default() } else { String::new() },
            };
            (ApiRequest::Rebuild(req), a.json, display(a.json, a.no_progress_bar))
        }
        Command::Sync(SyncArgs {
            action: SyncAction::Set { cluster, method, num, off, nodes, dry_run, json },
        }) => (
            ApiRequest::SetSync(pb::SetSyncRequest {
                cluster: cluster.clone().unwrap_or_default(),
                standbys: nodes.clone(),
                method: match (off, method.as_str()) {
                    (true, _) => pb::SyncMethod::Unspecified,
                    (false, "any") => pb::SyncMethod::Any,
                    (false, _) => pb::SyncMethod::First,
                } as i32,
                num_sync: if *off { 0 } else { *num },
                off: *off,
                dry_run: *dry_run,
            }),
            *json,
            display(*json, true),
        ),
        Command::Switchover(a) => (
            ApiRequest::Switchover(pb::SwitchoverRequest {
                cluster: a.cluster.clone().unwrap_or_default(),
                to: a.to.clone(),
                dry_run: a.dry_run,
            }),
            a.json,
            display(a.json, true),
        ),
        Command::Failover(a) => (
            ApiRequest::Failover(pb::FailoverRequest {
                cluster: a.cluster.clone().unwrap_or_default(),
                to: a.to.clone(),
                fenced: a.fenced,
                accept_data_loss: a.accept_data_loss,
                dry_run: a.dry_run,
            }),
            a.json,
            display(a.json, true),
        ),
        Command::Rejoin(a) => (
            ApiRequest::Rejoin(pb::RejoinRequest {
                node: a.node.clone(),
                rebuild_if_needed: a.rebuild_if_needed,
                dry_run: a.dry_run,
            }),
            a.json,
            display(a.json, true),
        ),
        Command::Restart(a) => (
            ApiRequest::Restart(pb::RestartRequest { node: a.node.clone(), dry_run: a.dry_run }),
            a.json,
            display(a.json, true),
        ),
        Command::Pause(a) => policy(pb::FailoverPolicyChange::Pause, &a.reason, &a.common),
        Command::Resume(a) => policy(pb::FailoverPolicyChange::Resume, "", a),
        Command::FailoverPolicy(a) => policy(
            match a.policy.as_str() {
                "automatic" => pb::FailoverPolicyChange::Automatic,
                "manual" => pb::FailoverPolicyChange::Manual,
                _ => pb::FailoverPolicyChange::Inventory,
            },
            "",
            &a.common,
        ),
        Command::Slots(SlotsArgs {
            action: Some(SlotsAction::Drop { node, slot, force, dry_run, json }),
            ..
        }) => (
            ApiRequest::DropSlot(pb::DropSlotRequest {
                node: node.clone(),
                slot: slot.clone(),
                force: *force,
                dry_run: *dry_run,
            }),
            *json,
            display(*json, true),
        ),
        _ => return None,
    })
}

fn policy(change: pb::FailoverPolicyChange, reason: &str, a: &PolicyArgs) -> (ApiRequest, bool, Display) {
    (
        ApiRequest::SetFailoverPolicy(pb::SetFailoverPolicyRequest {
            cluster: a.cluster.clone().unwrap_or_default(),
            change: change as i32,
            reason: reason.to_owned(),
            dry_run: a.dry_run,
        }),
        a.json,
        display(a.json, true),
    )
}

/// A deadline: a humantime duration greater than zero (a zero deadline
/// would fail every call before it is made).
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 10s, 1m 30s)"))?;
    if d.is_zero() {
        return Err("must be longer than zero (e.g. 10s)".into());
    }
    Ok(d)
}
