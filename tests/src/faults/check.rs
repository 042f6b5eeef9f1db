//! What the fault suite asserts about the clients' history, from outside
//! pgfleet: each acknowledged commit with the node, the timeline and the
//! synchronous setting that acknowledged it (the INSERT returns them), and
//! the rows the final primary holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One acknowledged INSERT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub id: i64,
    pub node: String,
    /// The timeline it was written on (`pg_walfile_name` of the insert
    /// position: the server's current timeline).
    pub timeline: u32,
    /// `synchronous_standby_names` was set on the server that committed it.
    pub synchronous: bool,
    /// The server's clock when it ran the INSERT, in microseconds: every
    /// server of the test fleet shares the machine's clock.
    pub at_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An acknowledged commit made with synchronous replication is missing
    /// from the final primary.
    LostCommit,
    /// A commit acknowledged on a timeline after a later timeline had
    /// already acknowledged one: two primaries taking writes at once.
    SplitBrain,
    /// The fleet did not come back to one primary with every other node
    /// streaming from it, using pgfleet commands, within the bound.
    NoConvergence,
    /// An operation left running, or interrupted and not resumable.
    Operation,
    /// A data directory is gone.
    DataDirectory,
    /// An inactive replication slot on a converged fleet (WAL kept forever).
    OrphanSlot,
    /// A process pgfleet started outlived its work.
    LeftoverProcess,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::LostCommit => "lost commit",
            Kind::SplitBrain => "split brain",
            Kind::NoConvergence => "no convergence",
            Kind::Operation => "operation",
            Kind::DataDirectory => "data directory",
            Kind::OrphanSlot => "orphan slot",
            Kind::LeftoverProcess => "leftover process",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Synchronous acknowledged commits missing from `present` (the final
/// primary's ids).
pub fn lost_commits(acks: &[Ack], present: &BTreeSet<i64>) -> Option<Violation> {
    let lost: Vec<&Ack> = acks.iter().filter(|a| a.synchronous && !present.contains(&a.id)).collect();
    if lost.is_empty() {
        return None;
    }
    let shown: Vec<String> = lost.iter().take(10).map(|a| format!("{} (node {}, timeline {})", a.id, a.node, a.timeline)).collect();
    Some(Violation {
        kind: Kind::LostCommit,
        detail: format!("{} acknowledged synchronous commits missing from the final primary: {}", lost.len(), shown.join(", ")),
    })
}

/// A commit acknowledged on timeline `t` that ran after the first commit
/// acknowledged on a higher timeline: once a standby was promoted, the old
/// timeline must take no more. (A commit that ran before the promotion but
/// was acknowledged after it is fine: its INSERT time is earlier.)
pub fn split_brain(acks: &[Ack]) -> Option<Violation> {
    // The first commit of every timeline.
    let mut first: BTreeMap<u32, &Ack> = BTreeMap::new();
    for a in acks {
        let e = first.entry(a.timeline).or_insert(a);
        if a.at_us < e.at_us {
            *e = a;
        }
    }
    for a in acks {
        if let Some((_, later)) = first.range(a.timeline + 1..).find(|(_, f)| f.at_us < a.at_us) {
            return Some(Violation {
                kind: Kind::SplitBrain,
                detail: format!(
                    "commit {} on {} (timeline {}) ran {} ms after {} had taken commit {} on timeline {}",
                    a.id,
                    a.node,
                    a.timeline,
                    (a.at_us - later.at_us) / 1000,
                    later.node,
                    later.id,
                    later.timeline
                ),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: i64, node: &str, timeline: u32, at_ms: i64) -> Ack {
        Ack { id, node: node.into(), timeline, synchronous: true, at_us: at_ms * 1000 }
    }

    #[test]
    fn a_missing_synchronous_commit_is_lost_an_asynchronous_one_is_not() {
        let mut acks = vec![ack(1, "node0", 1, 0), ack(2, "node0", 1, 10)];
        let present: BTreeSet<i64> = [1].into();
        let v = lost_commits(&acks, &present).unwrap();
        assert!(v.detail.contains("1 acknowledged") && v.detail.contains("2 (node node0"), "{v}");
        acks[1].synchronous = false;
        assert_eq!(lost_commits(&acks, &present), None);
    }

    #[test]
    fn an_old_timeline_writing_after_the_new_one_began_is_a_split_brain() {
        // node0 on 1 until 100 ms, node1 on 2 from 120 ms: a clean move.
        let clean = [ack(1, "node0", 1, 0), ack(2, "node0", 1, 100), ack(3, "node1", 2, 120), ack(4, "node1", 2, 130)];
        assert_eq!(split_brain(&clean), None);
        // node0 goes on at 125 ms: two primaries.
        let mut two = clean.to_vec();
        two.push(ack(5, "node0", 1, 125));
        let v = split_brain(&two).unwrap();
        assert!(v.detail.contains("commit 5 on node0 (timeline 1)") && v.detail.contains("node1"), "{v}");
        // Back to node0 later on its own new timeline (3): fine.
        let mut back = clean.to_vec();
        back.push(ack(6, "node0", 3, 200));
        assert_eq!(split_brain(&back), None);
    }
}
