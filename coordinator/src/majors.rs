//! The PostgreSQL majors of a cluster's nodes, as their agents report them
//! (the running server's, the data directory's PG_VERSION, the configured
//! programs'). Physical replication copies files and streams WAL byte for
//! byte: every node of a cluster must run one major. `status` reports a
//! cluster that mixes them; rebuild, switchover and failover refuse it
//! ([`mixed`], [`rebuild_mismatch`]). Knows nothing of the status report:
//! `fleet_status` hands it each node's [`NodeMajors`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's PostgreSQL majors as its agent reports them (flattened into
/// `status --json`'s node objects).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMajors {
    /// The running server's (server_version_num).
    #[serde(default)]
    pub server_major: Option<u32>,
    /// The data directory's (PG_VERSION).
    #[serde(default)]
    pub data_major: Option<u32>,
    /// The programs the agent is configured with.
    #[serde(default)]
    pub binaries_major: Option<u32>,
}

impl NodeMajors {
    /// The major this node runs: its server's when up, else its data
    /// directory's, else its programs'.
    pub fn major(&self) -> Option<u32> {
        self.server_major.or(self.data_major).or(self.binaries_major)
    }

    /// Its data directory and its programs disagree: the server cannot
    /// start (or runs only until restarted with the new programs).
    pub fn conflict(&self, node: &str) -> Option<String> {
        match (self.data_major, self.binaries_major) {
            (Some(d), Some(b)) if d != b => Some(format!(
                "{node}'s data directory is PostgreSQL {d} but its agent's programs (postgres.bin_dir) are {b}"
            )),
            _ => None,
        }
    }
}

/// What is wrong when the given nodes (the reachable ones: an unreachable
/// node's major is unknown) do not all run one major, or a node's data and
/// programs disagree, in words naming each node; `None` when they agree.
pub fn mixed<'a>(cluster: &str, nodes: impl IntoIterator<Item = (&'a str, &'a NodeMajors)>) -> Option<String> {
    let mut by_major: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (name, m) in nodes {
        if let Some(major) = m.major() {
            by_major.entry(major).or_default().push(name);
        }
        conflicts.extend(m.conflict(name));
    }
    if by_major.len() <= 1 && conflicts.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    if by_major.len() > 1 {
        let groups: Vec<String> = by_major
            .iter()
            .map(|(m, names)| {
                let verb = if names.len() == 1 { "runs" } else { "run" };
                format!("{} {verb} {m}", join_names(names))
            })
            .collect();
        parts.push(format!("cluster {cluster} mixes PostgreSQL majors: {}", groups.join(", ")));
    }
    parts.extend(conflicts);
    Some(format!(
        "{}; physical replication needs one major on every node: point each agent's \
         postgres.bin_dir at the cluster's major and rebuild the odd node, or upgrade the \
         whole cluster (pg_upgrade) first",
        parts.join("; ")
    ))
}

/// Why `node` cannot be rebuilt from `upstream`: the copy would be
/// `upstream`'s major, which `node`'s programs cannot run.
pub fn rebuild_mismatch(node: (&str, &NodeMajors), upstream: (&str, &NodeMajors)) -> Option<String> {
    let (Some(up), Some(mine)) = (upstream.1.major(), node.1.binaries_major) else {
        return None;
    };
    let (node, upstream) = (node.0, upstream.0);
    (up != mine).then(|| {
        format!(
            "{upstream} runs PostgreSQL {up} but {node}'s programs (postgres.bin_dir of its agent) are {mine}: \
             a physical copy runs only under the major it was made from; point {node}'s agent at \
             PostgreSQL {up}'s programs, or upgrade the cluster (pg_upgrade) first"
        )
    })
}

fn join_names(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(server: Option<u32>, data: Option<u32>, binaries: Option<u32>) -> NodeMajors {
        NodeMajors { server_major: server, data_major: data, binaries_major: binaries }
    }

    #[test]
    fn one_major_everywhere_is_not_mixed() {
        let (a, b) = (m(Some(15), Some(15), Some(15)), m(None, None, Some(15)));
        assert_eq!(mixed("main", [("node0", &a), ("node1", &b)]), None);
    }

    #[test]
    fn a_node_on_another_major_is_named_with_its_major() {
        let (a, c) = (m(Some(15), Some(15), Some(15)), m(Some(18), Some(18), Some(18)));
        let got = mixed("main", [("node0", &a), ("node1", &a), ("node2", &c)]).unwrap();
        assert!(got.starts_with("cluster main mixes PostgreSQL majors: node0 and node1 run 15, node2 runs 18;"), "{got}");
        assert!(got.contains("pg_upgrade"), "{got}");
    }

    #[test]
    fn data_and_programs_that_disagree_are_named() {
        let (a, b) = (m(Some(15), Some(15), Some(15)), m(None, Some(15), Some(18)));
        let got = mixed("main", [("node0", &a), ("node1", &b)]).unwrap();
        assert!(
            got.contains("node1's data directory is PostgreSQL 15 but its agent's programs (postgres.bin_dir) are 18"),
            "{got}"
        );
    }

    #[test]
    fn a_rebuild_needs_the_targets_programs_on_the_upstreams_major() {
        let up = m(Some(15), Some(15), Some(15));
        // Its old data does not matter: the rebuild replaces it.
        assert_eq!(rebuild_mismatch(("node1", &m(None, Some(18), Some(15))), ("node0", &up)), None);
        let got = rebuild_mismatch(("node1", &m(None, None, Some(18))), ("node0", &up)).unwrap();
        assert!(got.starts_with("node0 runs PostgreSQL 15 but node1's programs"), "{got}");
    }
}
