//! What an operation answers: a typed value, the same in-process and
//! through `pgfleet serve` (its `OperationFinished.json` is this value as
//! JSON). Text for people and the `--json` document are made from it by the
//! CLI (`cli/render.rs`); nothing here is display text.

use serde::{Deserialize, Serialize};

use crate::ops::exec::MoveReport;
use crate::ops::plan::Plan;
use crate::ops::rejoin::RejoinReport;
use crate::rebuild::RebuildReport;
use crate::slots::DropReport;
use crate::sync::SyncReport;

/// One step a rebuild's agents would take, as they said it (`--dry-run`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStep {
    pub host: String,
    pub step: String,
    pub description: String,
    pub argv: Vec<String>,
    pub sql: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
pub enum OpResult {
    /// `--dry-run` of switchover, failover, rejoin, `sync set`, `slots
    /// drop` and `rebuild --all-replicas`: the typed plan.
    Plan(Plan),
    /// `--dry-run` of a rebuild: its typed plan, and what the node's and
    /// the upstream's agents would do in detail (commands, SQL).
    RebuildPlan { plan: Plan, agent_steps: Vec<AgentStep> },
    Rebuilt(RebuildReport),
    RebuiltAll { cluster: String, primary: String, rebuilt: Vec<RebuildReport> },
    Sync(SyncReport),
    Moved(MoveReport),
    Rejoined(RejoinReport),
    SlotDropped(DropReport),
    /// An interrupted switchover or failover finished by `ops resume`: the
    /// failover it took (if the target was not promoted yet) and the nodes
    /// it brought back.
    Resumed {
        operation: String,
        cluster: String,
        primary: String,
        moved: Option<MoveReport>,
        rejoined: Vec<RejoinReport>,
    },
    /// `ops abort`: what was undone, and the state left.
    Aborted { operation: String, state: Vec<String> },
    /// `pause`, `resume`, `failover-policy`: the policy now in force (with
    /// `dry_run`, the one that would be).
    Policy { cluster: String, policy: crate::policy::Policy, dry_run: bool },
    /// A primary restarted in place after its postmaster died.
    Restarted { node: String },
}
