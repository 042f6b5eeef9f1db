//! `pgfleet rebuild NODE` as a plan: the upstream admits the node (role,
//! pg_hba.conf line, its slot), the node's agent runs the rebuild job, the
//! upstream confirms it streams. Everything was checked before (the fleet's
//! status in `rebuild::preflight`, both agents' dry runs in
//! `rebuild::check`); the job's own detailed steps come from its agent.

use crate::ops::plan::{FollowerSlot, Plan, Step};
use crate::rebuild::Prepared;

/// The three steps of one node's rebuild. `keep_sync`: the rebuild step
/// first refuses if the node's absence would leave synchronous replication
/// short (a rolling rebuild, where earlier steps changed who streams).
pub fn steps(p: &Prepared<'_>, spread_checkpoint: bool, keep_sync: bool) -> Vec<Step> {
    vec![
        Step::Admit {
            upstream: p.upstream.name.clone(),
            role: p.cluster.replication_role.clone(),
            followers: vec![FollowerSlot {
                node: p.node.name.clone(),
                slot: p.slot.clone(),
                in_use: p.replica_streams_through_slot,
            }],
        },
        Step::Rebuild {
            node: p.node.name.clone(),
            upstream: p.upstream.name.clone(),
            slot: p.slot.clone(),
            tablespace_mappings: p.mappings.iter().map(|m| format!("{}={}", m.old_dir, m.new_dir)).collect(),
            spread_checkpoint,
            system_identifier: p.cluster_system_identifier.clone(),
            keep_sync,
        },
        Step::Confirm {
            node: p.node.name.clone(),
            upstream: p.upstream.name.clone(),
            slot: p.slot.clone(),
        },
    ]
}

/// One node's rebuild. A cancel is accepted until its job starts: before
/// that the node is untouched (the upstream's role and pg_hba.conf line
/// are what any rebuild needs).
pub fn plan(p: &Prepared<'_>, spread_checkpoint: bool) -> Plan {
    Plan {
        title: format!("rebuild {} from {}", p.node.name, p.upstream.name),
        steps: steps(p, spread_checkpoint, false),
        no_return: Some((1, crate::rebuild::no_return(p.node.name.as_str()))),
        warnings: Vec::new(),
    }
}

/// Every replica in turn, each confirmed streaming before the next stops.
pub fn rolling(cluster: &str, primary: &str, each: &[Prepared<'_>], spread_checkpoint: bool) -> Plan {
    let steps: Vec<Step> = each.iter().flat_map(|p| steps(p, spread_checkpoint, true)).collect();
    Plan {
        title: format!("rebuild every replica of {cluster} from {primary}, one at a time"),
        steps,
        no_return: each.first().map(|p| (1, crate::rebuild::no_return(p.node.name.as_str()))),
        warnings: Vec::new(),
    }
}
