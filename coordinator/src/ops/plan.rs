//! An operation as a value: the steps it will take, in order, each acting
//! on one node. A planner (switchover, failover, sync) builds the plan from
//! what it checked before anything changes; `--dry-run` shows that value;
//! the one executor (`ops::exec`) journals the whole plan, then each step
//! with its index before it acts; `ops resume` reads the steps back from the
//! journal instead of guessing from step names.

use pgfleet_proto::{NodeName, RoleName, SlotName};
use serde::{Deserialize, Serialize};

/// A node that will stream from an upstream, through `slot` there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerSlot {
    pub node: NodeName,
    pub slot: SlotName,
    /// The node streams from the upstream through this slot already (its
    /// own WAL receiver says so): the upstream keeps it, whatever
    /// application_name it streams under.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_use: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// `upstream` admits its future followers: the replication role with
    /// the cluster's password, a pg_hba.conf line per follower, their slots
    /// (DESIGN.md invariant 11). Checked for all with a dry run first.
    Admit {
        upstream: NodeName,
        role: RoleName,
        followers: Vec<FollowerSlot>,
    },
    /// `standby` replays everything `primary` wrote so far (e.g. the role's
    /// password just set there).
    Replay { standby: NodeName, primary: NodeName },
    /// Records which standby failover promotes and on what proof.
    Choose {
        node: NodeName,
        received: String,
        data_loss: Option<String>,
    },
    /// ALTER SYSTEM SET synchronous_standby_names on `node` (on a standby
    /// it takes effect when promoted).
    SyncConfig { node: NodeName, value: String },
    /// Stop PostgreSQL and leave standby.signal: it cannot come back as a
    /// primary. `immediate` for a failover (no clean shutdown to wait for).
    Fence { node: NodeName, immediate: bool },
    /// The old primary's agent does not answer: the operator said it is
    /// down (`--fenced`).
    FencedByOperator { node: NodeName },
    /// The old primary's agent does not answer, and the lease the leader
    /// held on it ran out: its agent fenced it before (`serve::lease`).
    FencedByLease { node: NodeName },
    /// The old primary's agent does not answer, so it is fenced by
    /// isolation: every other standby is re-pointed at `upstream` (the
    /// candidate, still a standby: they cascade from it) and confirmed to
    /// stream from nowhere else; the candidate stops streaming from `node`
    /// when promoted. With synchronous replication that leaves fewer than
    /// its num_sync listed standbys able to acknowledge for `node`, so it
    /// cannot acknowledge another commit (DESIGN.md invariant 14).
    Isolate {
        node: NodeName,
        upstream: NodeName,
        followers: Vec<FollowerSlot>,
        /// The old primary's synchronous_standby_names, for the record.
        sync: String,
    },
    /// `node` replays past `fenced`'s shutdown checkpoint: no acknowledged
    /// commit is left behind (DESIGN.md invariant 5).
    CatchUp { node: NodeName, fenced: NodeName },
    Promote { node: NodeName },
    /// Restart in place: PostgreSQL started again on `node`, whose
    /// postmaster died while it was the primary (crash recovery first).
    /// The agent refuses a node that did not crash as a primary or that
    /// pgfleet fenced.
    #[serde(rename = "restart")]
    StartCrashed { node: NodeName },
    /// A fenced former primary whose timeline is behind `upstream`'s takes
    /// its history (pg_rewind); with `or_rebuild`, rebuilt from it instead
    /// when it cannot be rewound. Nothing to do on the same timeline.
    Rewind { node: NodeName, upstream: NodeName, or_rebuild: bool },
    /// A slot on `upstream` and `node` streaming from it through that slot.
    Follow {
        node: NodeName,
        upstream: NodeName,
        slot: SlotName,
        /// The old primary keeps no synchronous_standby_names as a standby.
        reset_sync: bool,
    },
    /// `node` reconnects to `upstream` with its node name as
    /// application_name (what synchronous_standby_names lists), through
    /// the slot it uses (`slot_in_use`) or a new one.
    #[serde(rename = "application-name")]
    Reconnect {
        node: NodeName,
        upstream: NodeName,
        slot: SlotName,
        slot_in_use: bool,
    },
    /// On a standby of PostgreSQL 17+ with wal_level = logical: what its
    /// slot sync worker needs to keep the primary's failover logical slots
    /// (nothing elsewhere).
    SlotSync { node: NodeName },
    /// pgfleet's own record of the setting, read when the primary is lost.
    RememberSync { value: String },
    /// synchronous_standby_names on `node` is met by streaming standbys
    /// (DESIGN.md invariant 12): its commits do not wait.
    Writes { node: NodeName },
    /// The slots a former primary kept for its standbys, which it would now
    /// keep WAL for forever.
    #[serde(rename = "old-slots")]
    DropOldSlots { node: NodeName },
    /// A replication slot dropped on `node`; with `force` an active one's
    /// WAL sender is terminated first (its standby is cut off).
    DropSlot { node: NodeName, slot: SlotName, force: bool },
    /// `node` is rebuilt from `upstream` by its agent's job: checks, its
    /// data directory moved aside (kept), pg_basebackup through `slot`,
    /// started as a standby. `keep_sync` (a rolling rebuild): first refuse
    /// if its absence would leave synchronous_standby_names unmet.
    Rebuild {
        node: NodeName,
        upstream: NodeName,
        slot: SlotName,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tablespace_mappings: Vec<String>,
        spread_checkpoint: bool,
        /// The cluster's identity the upstream must have (DESIGN.md
        /// invariant 3), decided when planned.
        system_identifier: String,
        #[serde(default)]
        keep_sync: bool,
    },
    /// `upstream` shows `node` streaming through `slot`
    /// (pg_stat_replication, pg_replication_slots).
    Confirm { node: NodeName, upstream: NodeName, slot: SlotName },
    /// Every standby streams from `node`.
    Verify {
        node: NodeName,
        standbys: Vec<NodeName>,
        /// How long they may take to stream before the step fails.
        #[serde(default = "settle_seconds")]
        seconds: u64,
    },
}

/// How long standbys have to stream after a move (see `exec::SETTLE_DEADLINE`).
pub fn settle_seconds() -> u64 {
    20
}

impl Step {
    /// Whether the step stops the old primary's writes, one way or another.
    pub fn is_fence(&self) -> bool {
        matches!(self, Step::Fence { .. } | Step::FencedByOperator { .. } | Step::FencedByLease { .. } | Step::Isolate { .. })
    }

    /// The step's name in the journal and in events: its JSON tag, except
    /// that a fence the operator made is journaled as a skipped "fence".
    pub fn name(&self) -> &'static str {
        match self {
            Step::Admit { .. } => "admit",
            Step::Replay { .. } => "replay",
            Step::Choose { .. } => "choose",
            Step::SyncConfig { .. } => "sync-config",
            Step::Fence { .. } | Step::FencedByOperator { .. } | Step::FencedByLease { .. } => "fence",
            Step::Isolate { .. } => "isolate",
            Step::CatchUp { .. } => "catch-up",
            Step::Promote { .. } => "promote",
            Step::StartCrashed { .. } => "restart",
            Step::Rewind { .. } => "rewind",
            Step::Follow { .. } => "follow",
            Step::Reconnect { .. } => "application-name",
            Step::SlotSync { .. } => "slot-sync",
            Step::RememberSync { .. } => "remember-sync",
            Step::Writes { .. } => "writes",
            Step::DropOldSlots { .. } => "old-slots",
            Step::DropSlot { .. } => "drop-slot",
            Step::Rebuild { .. } => "rebuild",
            Step::Confirm { .. } => "confirm",
            Step::Verify { .. } => "verify",
        }
    }

    /// The node the step acts on ("" for pgfleet's own record).
    pub fn host(&self) -> &str {
        match self {
            Step::Admit { upstream, .. } => upstream.as_str(),
            Step::Replay { standby, .. } => standby.as_str(),
            Step::Choose { node, .. }
            | Step::SyncConfig { node, .. }
            | Step::Fence { node, .. }
            | Step::FencedByOperator { node }
            | Step::FencedByLease { node }
            | Step::Isolate { node, .. }
            | Step::CatchUp { node, .. }
            | Step::Promote { node }
            | Step::StartCrashed { node }
            | Step::Rewind { node, .. }
            | Step::Follow { node, .. }
            | Step::Reconnect { node, .. }
            | Step::SlotSync { node }
            | Step::Writes { node }
            | Step::DropOldSlots { node }
            | Step::DropSlot { node, .. }
            | Step::Rebuild { node, .. }
            | Step::Verify { node, .. } => node.as_str(),
            Step::Confirm { upstream, .. } => upstream.as_str(),
            Step::RememberSync { .. } => "",
        }
    }

    /// What the step will do, for people (the dry run, the step's start).
    pub fn describe(&self) -> String {
        let names = |v: &mut dyn Iterator<Item = &NodeName>| v.map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
        match self {
            Step::Admit { role, followers, .. } => format!(
                "replication role {role} with the cluster's password; a `host replication {role} ADDR/32 scram-sha-256` \
                 line in its own pg_hba.conf (checked, reloaded) and a slot, for {}",
                names(&mut followers.iter().map(|f| &f.node))
            ),
            Step::Replay { primary, .. } => format!("replay what {primary} has written so far"),
            Step::Choose { node, received, data_loss } => match data_loss {
                None => format!("promote {node}: it holds every acknowledged commit (received up to {received})"),
                Some(why) => format!("promote {node} (received up to {received}), accepting data loss: {why}"),
            },
            Step::SyncConfig { value, .. } => format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{value}' (on 17+ with logical WAL, \
                 synchronized_standby_slots to their slots); reload"
            ),
            Step::Fence { immediate: false, .. } => {
                "stop PostgreSQL (fast shutdown: sessions end, shutdown checkpoint), leave standby.signal".into()
            }
            Step::Fence { immediate: true, .. } => "stop PostgreSQL if it runs (immediate), leave standby.signal".into(),
            Step::FencedByOperator { .. } => "skipped: --fenced says the operator made sure it is down".into(),
            Step::FencedByLease { .. } => {
                "skipped: its lease ran out, so its agent fenced it (immediate stop, standby.signal), or its host is gone".into()
            }
            Step::Isolate { upstream, followers, sync, .. } => format!(
                "its agent does not answer: {}confirm that no standby streams from it; {upstream} stops streaming from it \
                 when promoted, so with synchronous_standby_names = '{sync}' it cannot acknowledge another commit",
                if followers.is_empty() {
                    String::new()
                } else {
                    format!(
                        "re-point {} at {upstream} (cascading until it is promoted) and ",
                        names(&mut followers.iter().map(|f| &f.node))
                    )
                }
            ),
            Step::CatchUp { fenced, .. } => format!("wait until pg_last_wal_replay_lsn() passes {fenced}'s shutdown checkpoint"),
            Step::Promote { .. } => "SELECT pg_promote(true, 60)".into(),
            Step::StartCrashed { .. } => {
                "start PostgreSQL again in place (crash recovery), only if it crashed as the primary and is not fenced".into()
            }
            Step::Rewind { upstream, or_rebuild, .. } => format!(
                "pg_rewind from {upstream} if its timeline is behind {upstream}'s{}",
                if *or_rebuild { "; rebuild from it instead if it cannot be rewound" } else { "" }
            ),
            Step::Follow { upstream, slot, reset_sync, .. } => format!(
                "slot {slot} on {upstream}; primary_conninfo to {upstream}; {}",
                if *reset_sync { "start as a standby (no pg_rewind needed)" } else { "reload" }
            ),
            Step::Reconnect { node, upstream, slot, slot_in_use } => format!(
                "reconnect to {upstream} with application_name={node}, through {} slot {slot}; reload",
                if *slot_in_use { "its" } else { "a new" }
            ),
            Step::SlotSync { .. } => "synchronize failover logical slots: sync_replication_slots = on, \
                hot_standby_feedback = on, a dbname in primary_conninfo (what is missing); reload"
                .into(),
            Step::RememberSync { value } => format!("pgfleet's record: synchronous_standby_names = '{value}'"),
            Step::Writes { .. } => "wait until synchronous_standby_names is met by streaming standbys".into(),
            Step::DropOldSlots { .. } => "drop the slots it kept for its former standbys".into(),
            Step::DropSlot { slot, force: false, .. } => {
                format!("SELECT pg_drop_replication_slot('{slot}'), refused if the slot is active")
            }
            Step::DropSlot { slot, force: true, .. } => format!(
                "if the slot is active, SELECT pg_terminate_backend(active_pid) to cut off its standby; \
                 then SELECT pg_drop_replication_slot('{slot}')"
            ),
            Step::Rebuild { upstream, slot, tablespace_mappings, spread_checkpoint, keep_sync, .. } => format!(
                "{}its agent's job: stop it, move its data directory aside (kept), pg_basebackup -X stream -C -R -S {slot} \
                 from {upstream} (checkpoint {}{}), start it as a standby",
                if *keep_sync { "unless its absence leaves synchronous_standby_names unmet, " } else { "" },
                if *spread_checkpoint { "spread" } else { "fast" },
                if tablespace_mappings.is_empty() {
                    String::new()
                } else {
                    format!(", tablespaces {}", tablespace_mappings.join(" "))
                },
            ),
            Step::Confirm { node, slot, .. } => format!(
                "wait until pg_stat_replication shows {node} streaming and slot {slot} is active; report the byte lag"
            ),
            Step::Verify { standbys, seconds, .. } => {
                format!("wait (up to {seconds}s) until {} stream from it", names(&mut standbys.iter()))
            }
        }
    }

    /// The step as a JSON object: its journaled form (the tag `step` and the
    /// typed fields) plus `host` and `description`: what `--dry-run --json`
    /// prints.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("host".into(), self.host().into());
            o.insert("description".into(), self.describe().into());
        }
        v
    }
}

/// A whole operation's steps, decided before the first one acts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// E.g. "switch over main from node0 to node1".
    pub title: String,
    pub steps: Vec<Step>,
    /// The index of the first step that cannot be cancelled (the cluster
    /// would be left half-moved), and why.
    #[serde(default)]
    pub no_return: Option<(usize, String)>,
    /// Said before the first step, and in the result.
    pub warnings: Vec<String>,
}

impl Plan {
    /// The node the plan promotes, if it promotes one.
    pub fn promotes(&self) -> Option<&NodeName> {
        self.steps.iter().find_map(|s| match s {
            Step::Promote { node } => Some(node),
            _ => None,
        })
    }

    /// The node the plan fences (by its agent, the operator's word or
    /// isolation), if it fences one.
    pub fn fences(&self) -> Option<&NodeName> {
        self.steps.iter().find_map(|s| match s {
            Step::Fence { node, .. } | Step::FencedByOperator { node } | Step::FencedByLease { node } | Step::Isolate { node, .. } => {
                Some(node)
            }
            _ => None,
        })
    }

    pub fn index_of(&self, f: impl Fn(&Step) -> bool) -> Option<usize> {
        self.steps.iter().position(f)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dry_run": true,
            "title": self.title,
            "warnings": self.warnings,
            "steps": self.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::parse(s).unwrap()
    }

    #[test]
    fn a_plan_reads_back_from_its_journal_form_as_the_same_value() {
        let plan = Plan {
            title: "switch over main from a to b".into(),
            steps: vec![
                Step::Admit {
                    upstream: n("b"),
                    role: RoleName::parse("replicator").unwrap(),
                    followers: vec![FollowerSlot { node: n("a"), slot: n("a").default_slot(), in_use: false }],
                },
                Step::Fence { node: n("a"), immediate: false },
                Step::CatchUp { node: n("b"), fenced: n("a") },
                Step::Promote { node: n("b") },
                Step::Follow { node: n("a"), upstream: n("b"), slot: n("a").default_slot(), reset_sync: true },
                Step::Reconnect { node: n("c"), upstream: n("b"), slot: n("c").default_slot(), slot_in_use: true },
                Step::DropOldSlots { node: n("a") },
            ],
            no_return: Some((1, "moving".into())),
            warnings: vec![],
        };
        let text = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&text).unwrap();
        assert_eq!(back, plan);
        assert_eq!(back.promotes(), Some(&n("b")));
        assert_eq!(back.fences(), Some(&n("a")));
        let j = plan.steps[1].to_json();
        assert_eq!(j["step"], "fence");
        assert_eq!(j["host"], "a");
        // The tag is the journal's step name.
        for s in &plan.steps {
            assert_eq!(s.to_json()["step"], s.name(), "{s:?}");
        }
    }

    #[test]
    fn a_journaled_step_with_a_forged_node_name_does_not_read_back() {
        let forged = r#"{"step":"promote","node":"x\ny"}"#;
        assert!(serde_json::from_str::<Step>(forged).is_err());
    }
}
