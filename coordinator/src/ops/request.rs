//! One request type for every operation, validated once. Both doors build
//! it from the same API message: `pgfleet serve` from what a caller sent,
//! the CLI from its arguments turned into that message ([`ApiRequest`]).
//! So the service refuses exactly what the CLI refuses, with the same
//! message. Every field is a validated type (node, cluster, slot, sync
//! method and standbys, tablespace mapping); what needs the inventory
//! (does the node exist, which cluster) is checked by [`OpRequest::resolve`].

use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::sync::SyncMethod;
use pgfleet_proto::{ClusterName, NodeName, SlotName};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::CoordinatorError;
use crate::inventory::Inventory;
use crate::ops::sync::SyncRequest;
use crate::rebuild;

/// What an operator or a system asked for. Journaled as JSON at the start
/// of the operation, so an interrupted one can be resumed from it (read
/// back through the same checks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OpRequest {
    Rebuild {
        node: NodeName,
        from: Option<NodeName>,
        slot: Option<SlotName>,
        tablespace_mappings: Vec<Mapping>,
        spread_checkpoint: bool,
        dry_run: bool,
    },
    /// Every replica of a cluster, one at a time.
    RebuildAll {
        /// None: the inventory's only cluster (filled in by `resolve`).
        cluster: Option<ClusterName>,
        spread_checkpoint: bool,
        dry_run: bool,
    },
    Sync {
        cluster: Option<ClusterName>,
        /// None: asynchronous.
        spec: Option<SyncRequest>,
        #[serde(default)]
        dry_run: bool,
    },
    Switchover {
        cluster: Option<ClusterName>,
        to: Option<NodeName>,
        dry_run: bool,
    },
    Failover {
        cluster: Option<ClusterName>,
        to: Option<NodeName>,
        fenced: bool,
        accept_data_loss: bool,
        dry_run: bool,
        /// Set by the leader only: the old primary's position at its last
        /// look, against which the cluster's max_lag_on_failover is
        /// measured (an automatic failover without proof).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_primary_lsn: Option<String>,
        /// Set by the leader only: the old primary's lease ran out, so its
        /// agent fenced it (if it was alive: a dead host takes no writes).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fenced_by_lease: bool,
    },
    Rejoin {
        node: NodeName,
        rebuild_if_needed: bool,
        dry_run: bool,
    },
    DropSlot {
        node: NodeName,
        slot: SlotName,
        force: bool,
        dry_run: bool,
    },
    /// Restart in place of a primary whose postmaster died: the leader's
    /// own (`restart_in_place = true`), or `pgfleet restart NODE` after a
    /// crash of the whole cluster.
    Restart {
        node: NodeName,
        #[serde(default)]
        dry_run: bool,
    },
    /// `pgfleet pause`, `resume`, `failover-policy`.
    Policy {
        cluster: Option<ClusterName>,
        change: crate::policy::Change,
        reason: String,
        #[serde(default)]
        dry_run: bool,
    },
}

/// A tablespace mapping `OLD=NEW`, both absolute, no `..`, no control
/// characters (what pg_basebackup's `--tablespace-mapping` gets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping(String);

impl Mapping {
    pub fn parse(s: &str) -> Result<Self, CoordinatorError> {
        rebuild::parse_mapping(s)?;
        Ok(Mapping(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for Mapping {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Mapping::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An operation as the API carries it: what `pgfleet --coordinator URL`
/// sends, and what the CLI validates in-process through the same
/// conversion.
#[derive(Debug, Clone)]
pub enum ApiRequest {
    Rebuild(pb::RebuildRequest),
    SetSync(pb::SetSyncRequest),
    Switchover(pb::SwitchoverRequest),
    Failover(pb::FailoverRequest),
    Rejoin(pb::RejoinRequest),
    Restart(pb::RestartRequest),
    DropSlot(pb::DropSlotRequest),
    SetFailoverPolicy(pb::SetFailoverPolicyRequest),
}

fn usage(s: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Usage(s.into())
}

fn node(s: &str) -> Result<NodeName, CoordinatorError> {
    Ok(NodeName::parse(s)?)
}

/// "" means "the inventory's only cluster".
fn cluster(s: &str) -> Result<Option<ClusterName>, CoordinatorError> {
    if s.is_empty() { Ok(None) } else { Ok(Some(ClusterName::parse(s)?)) }
}

fn opt_node(s: Option<&str>) -> Result<Option<NodeName>, CoordinatorError> {
    s.map(node).transpose()
}

impl TryFrom<ApiRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: ApiRequest) -> Result<Self, CoordinatorError> {
        match r {
            ApiRequest::Rebuild(r) => r.try_into(),
            ApiRequest::SetSync(r) => r.try_into(),
            ApiRequest::Switchover(r) => r.try_into(),
            ApiRequest::Failover(r) => r.try_into(),
            ApiRequest::Rejoin(r) => r.try_into(),
            ApiRequest::Restart(r) => Ok(OpRequest::Restart { node: node(&r.node)?, dry_run: r.dry_run }),
            ApiRequest::DropSlot(r) => r.try_into(),
            ApiRequest::SetFailoverPolicy(r) => r.try_into(),
        }
    }
}

/// A rebuild of one node, or of every replica (then nothing else).
impl TryFrom<pb::RebuildRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::RebuildRequest) -> Result<Self, CoordinatorError> {
        if r.all_replicas || !r.all_replicas_of.is_empty() {
            if !r.node.is_empty() || r.from.is_some() || r.slot.is_some() || !r.tablespace_mappings.is_empty() {
                return Err(usage(
                    "a rebuild of every replica takes no node, from, slot or tablespace mapping: \
                     name either one node or all replicas",
                ));
            }
            return Ok(OpRequest::RebuildAll {
                cluster: cluster(&r.all_replicas_of)?,
                spread_checkpoint: r.spread_checkpoint,
                dry_run: r.dry_run,
            });
        }
        if r.node.is_empty() {
            return Err(usage("name the node to rebuild, or all replicas (--all-replicas)"));
        }
        Ok(OpRequest::Rebuild {
            node: node(&r.node)?,
            from: opt_node(r.from.as_deref())?,
            slot: r.slot.as_deref().map(SlotName::parse).transpose()?,
            tablespace_mappings: r.tablespace_mappings.iter().map(|m| Mapping::parse(m)).collect::<Result<_, _>>()?,
            spread_checkpoint: r.spread_checkpoint,
            dry_run: r.dry_run,
        })
    }
}

impl TryFrom<pb::SetSyncRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::SetSyncRequest) -> Result<Self, CoordinatorError> {
        let method = match pb::SyncMethod::try_from(r.method) {
            Ok(pb::SyncMethod::Any) => SyncMethod::Any,
            Ok(pb::SyncMethod::First | pb::SyncMethod::Unspecified) => SyncMethod::First,
            Err(_) => {
                return Err(usage(format!("unknown synchronous method {}: use first or any", r.method)));
            }
        };
        if r.off && (!r.standbys.is_empty() || r.num_sync != 0 || r.method != 0) {
            return Err(usage(
                "off turns synchronous replication off: name no standbys, method or number with it",
            ));
        }
        let spec = if r.off {
            None
        } else {
            if r.standbys.is_empty() {
                return Err(usage("name the synchronous standbys (sync set NODE...), or pass --off"));
            }
            Some(SyncRequest {
                method,
                num: r.num_sync,
                standbys: r.standbys.iter().map(|s| node(s)).collect::<Result<_, _>>()?,
            })
        };
        Ok(OpRequest::Sync { cluster: cluster(&r.cluster)?, spec, dry_run: r.dry_run })
    }
}

impl TryFrom<pb::SwitchoverRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::SwitchoverRequest) -> Result<Self, CoordinatorError> {
        Ok(OpRequest::Switchover { cluster: cluster(&r.cluster)?, to: opt_node(r.to.as_deref())?, dry_run: r.dry_run })
    }
}

impl TryFrom<pb::FailoverRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::FailoverRequest) -> Result<Self, CoordinatorError> {
        Ok(OpRequest::Failover {
            cluster: cluster(&r.cluster)?,
            to: opt_node(r.to.as_deref())?,
            fenced: r.fenced,
            accept_data_loss: r.accept_data_loss,
            dry_run: r.dry_run,
            last_primary_lsn: None,
            fenced_by_lease: false,
        })
    }
}

impl TryFrom<pb::RejoinRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::RejoinRequest) -> Result<Self, CoordinatorError> {
        Ok(OpRequest::Rejoin { node: node(&r.node)?, rebuild_if_needed: r.rebuild_if_needed, dry_run: r.dry_run })
    }
}

impl TryFrom<pb::DropSlotRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::DropSlotRequest) -> Result<Self, CoordinatorError> {
        Ok(OpRequest::DropSlot { node: node(&r.node)?, slot: SlotName::parse(&r.slot)?, force: r.force, dry_run: r.dry_run })
    }
}

impl TryFrom<pb::SetFailoverPolicyRequest> for OpRequest {
    type Error = CoordinatorError;

    fn try_from(r: pb::SetFailoverPolicyRequest) -> Result<Self, CoordinatorError> {
        use crate::policy::Change;
        let change = match pb::FailoverPolicyChange::try_from(r.change) {
            Ok(pb::FailoverPolicyChange::Pause) => Change::Pause,
            Ok(pb::FailoverPolicyChange::Resume) => Change::Resume,
            Ok(pb::FailoverPolicyChange::Automatic) => Change::Automatic,
            Ok(pb::FailoverPolicyChange::Manual) => Change::Manual,
            Ok(pb::FailoverPolicyChange::Inventory) => Change::Inventory,
            Ok(pb::FailoverPolicyChange::Unspecified) | Err(_) => {
                return Err(usage(format!(
                    "unknown failover policy change {}: pause, resume, automatic, manual or inventory",
                    r.change
                )));
            }
        };
        if r.reason.chars().count() > 200 || r.reason.chars().any(char::is_control) {
            return Err(usage(format!(
                "the reason {} must be one line of at most 200 characters",
                pgfleet_proto::shown_max(&r.reason, 40)
            )));
        }
        if !r.reason.is_empty() && change != Change::Pause {
            return Err(usage("a reason goes with pause only: it is shown while the cluster is paused"));
        }
        Ok(OpRequest::Policy { cluster: cluster(&r.cluster)?, change, reason: r.reason, dry_run: r.dry_run })
    }
}

impl OpRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            OpRequest::Rebuild { .. } | OpRequest::RebuildAll { .. } => "rebuild",
            OpRequest::Sync { .. } => "sync",
            OpRequest::Switchover { .. } => "switchover",
            OpRequest::Failover { .. } => "failover",
            OpRequest::Rejoin { .. } => "rejoin",
            OpRequest::DropSlot { .. } => "drop-slot",
            OpRequest::Policy { .. } => "failover-policy",
            OpRequest::Restart { .. } => "restart",
        }
    }

    pub fn dry_run(&self) -> bool {
        match self {
            OpRequest::Rebuild { dry_run, .. }
            | OpRequest::RebuildAll { dry_run, .. }
            | OpRequest::Switchover { dry_run, .. }
            | OpRequest::Failover { dry_run, .. }
            | OpRequest::Rejoin { dry_run, .. }
            | OpRequest::DropSlot { dry_run, .. }
            | OpRequest::Policy { dry_run, .. }
            | OpRequest::Restart { dry_run, .. }
            | OpRequest::Sync { dry_run, .. } => *dry_run,
        }
    }

    /// Checks the names against the inventory before anything else, fills
    /// in the cluster when the inventory has only one, and returns the
    /// cluster and a summary for people.
    pub fn resolve(&mut self, inv: &Inventory) -> Result<(String, String), CoordinatorError> {
        Ok(match self {
            OpRequest::Rebuild { node, from, .. } => {
                let (c, _) = inv.node(node.as_str())?;
                if let Some(f) = from {
                    inv.node(f.as_str())?;
                }
                let from = from.as_ref().map(|f| format!(" from {f}")).unwrap_or_default();
                (c.name.to_string(), format!("{node}{from}"))
            }
            OpRequest::RebuildAll { cluster, .. } => {
                let c = one_cluster(inv, cluster.as_ref())?;
                *cluster = Some(c.clone());
                (c.to_string(), "every replica, one at a time".into())
            }
            OpRequest::Sync { cluster, spec, .. } => {
                let name = one_cluster(inv, cluster.as_ref())?;
                *cluster = Some(name.clone());
                let c = inv.select(Some(name.as_str()))?[0];
                crate::ops::sync::validate(c, spec.as_ref())?;
                let what = match spec {
                    None => "asynchronous".to_owned(),
                    Some(s) => format!(
                        "{} {} ({})",
                        if s.method == SyncMethod::Any { "ANY" } else { "FIRST" },
                        s.num,
                        s.standbys.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                };
                (name.to_string(), format!("set {what}"))
            }
            OpRequest::Switchover { cluster, to, .. } | OpRequest::Failover { cluster, to, .. } => {
                let name = one_cluster(inv, cluster.as_ref())?;
                *cluster = Some(name.clone());
                if let Some(t) = to {
                    let (tc, _) = inv.node(t.as_str())?;
                    if tc.name != name {
                        return Err(usage(format!("--to {t}: it is a node of cluster {}, not {name}", tc.name)));
                    }
                }
                (name.to_string(), to.as_ref().map(|t| format!("to {t}")).unwrap_or_else(|| "to the best candidate".into()))
            }
            OpRequest::Rejoin { node, .. } => {
                let (c, _) = inv.node(node.as_str())?;
                (c.name.to_string(), node.to_string())
            }
            OpRequest::DropSlot { node, slot, .. } => {
                let (c, _) = inv.node(node.as_str())?;
                (c.name.to_string(), format!("slot {slot} on {node}"))
            }
            OpRequest::Restart { node, .. } => {
                let (c, _) = inv.node(node.as_str())?;
                (c.name.to_string(), format!("{node} in place"))
            }
            OpRequest::Policy { cluster, change, .. } => {
                let name = one_cluster(inv, cluster.as_ref())?;
                *cluster = Some(name.clone());
                (name.to_string(), change.describe().to_owned())
            }
        })
    }
}

/// The cluster a resolved request names.
pub fn resolved(cluster: &Option<ClusterName>) -> Result<&str, CoordinatorError> {
    cluster
        .as_ref()
        .map(ClusterName::as_str)
        .ok_or_else(|| usage("the request names no cluster (it was not resolved against the inventory)"))
}

/// A cluster named as text (`--cluster`, an API field; absent: the
/// inventory's only cluster), checked like every other name.
pub fn named_cluster(inventory: &Inventory, cluster: Option<&str>) -> Result<ClusterName, CoordinatorError> {
    let named = cluster.map(ClusterName::parse).transpose()?;
    one_cluster(inventory, named.as_ref())
}

/// `--cluster`, or the inventory's only cluster.
pub fn one_cluster(inventory: &Inventory, cluster: Option<&ClusterName>) -> Result<ClusterName, CoordinatorError> {
    match cluster {
        Some(c) => Ok(inventory.select(Some(c.as_str()))?[0].name.clone()),
        None if inventory.clusters.len() == 1 => Ok(inventory.clusters[0].name.clone()),
        None => Err(usage(format!(
            "the inventory has {} clusters; say which with --cluster ({})",
            inventory.clusters.len(),
            inventory.clusters.iter().map(|c| c.name.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: ApiRequest) -> String {
        match OpRequest::try_from(r) {
            Ok(o) => panic!("accepted: {o:?}"),
            Err(e) => {
                assert!(e.is_usage(), "{e}");
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn a_failover_policy_request_the_cli_cannot_send_is_refused_too() {
        let policy = |change: i32, reason: &str| {
            ApiRequest::SetFailoverPolicy(pb::SetFailoverPolicyRequest { change, reason: reason.into(), ..Default::default() })
        };
        let e = refused(policy(0, ""));
        assert!(e.contains("pause, resume, automatic, manual or inventory"), "{e}");
        let e = refused(policy(99, ""));
        assert!(e.contains("unknown failover policy change 99"), "{e}");
        let e = refused(policy(pb::FailoverPolicyChange::Resume as i32, "why"));
        assert!(e.contains("pause only"), "{e}");
        let e = refused(policy(pb::FailoverPolicyChange::Pause as i32, &"x".repeat(201)));
        assert!(e.contains("at most 200 characters"), "{e}");
    }

    #[test]
    fn malformed_requests_are_refused_as_bad_input_naming_the_field() {
        let e = refused(ApiRequest::Rebuild(pb::RebuildRequest { node: "node2".into(), all_replicas: true, ..Default::default() }));
        assert!(e.contains("all replicas"), "{e}");
        let e = refused(ApiRequest::Rebuild(pb::RebuildRequest { node: "x\ny".into(), ..Default::default() }));
        assert!(e.contains("node name") && !e.contains('\n'), "{e}");
        let e = refused(ApiRequest::Rebuild(pb::RebuildRequest {
            node: "n".into(),
            tablespace_mappings: vec!["/a=/b\n".into()],
            ..Default::default()
        }));
        assert!(e.contains("control characters"), "{e}");
        let e = refused(ApiRequest::Rebuild(pb::RebuildRequest {
            node: "n".into(),
            tablespace_mappings: vec![format!("relative={}", "x".repeat(100_000))],
            ..Default::default()
        }));
        assert!(e.len() < 300, "{} characters", e.len());
        let e = refused(ApiRequest::SetSync(pb::SetSyncRequest { standbys: vec!["n".into()], method: 99, num_sync: 1, ..Default::default() }));
        assert!(e.contains("method"), "{e}");
        let e = refused(ApiRequest::SetSync(pb::SetSyncRequest { standbys: vec!["n".into()], off: true, ..Default::default() }));
        assert!(e.contains("off"), "{e}");
        let e = refused(ApiRequest::SetSync(pb::SetSyncRequest::default()));
        assert!(e.contains("--off"), "{e}");
        let e = refused(ApiRequest::DropSlot(pb::DropSlotRequest { node: "n".into(), slot: "A".repeat(3_000_000), ..Default::default() }));
        assert!(e.len() < 300, "{} characters", e.len());
        let e = refused(ApiRequest::Switchover(pb::SwitchoverRequest { cluster: "Main Cluster".into(), ..Default::default() }));
        assert!(e.contains("cluster name"), "{e}");
    }

    #[test]
    fn a_request_reads_back_from_the_journal_as_it_was() {
        let r = OpRequest::try_from(ApiRequest::Rebuild(pb::RebuildRequest {
            node: "node2".into(),
            slot: Some("node2".into()),
            tablespace_mappings: vec!["/a=/b".into()],
            ..Default::default()
        }))
        .unwrap();
        let back: OpRequest = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let forged = serde_json::json!({"kind": "rejoin", "node": "x y", "rebuild_if_needed": false, "dry_run": false});
        assert!(serde_json::from_value::<OpRequest>(forged).is_err());
    }
}
