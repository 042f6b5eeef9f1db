//! The PostgreSQL majors of a cluster's nodes, as their agents report them
//! (the running server's, the data directory's PG_VERSION, the configured
//! programs'). Physical replication copies files and streams WAL byte for
//! byte: every node of a cluster must run one major. `status` reports a
//! cluster that mixes them; rebuild, switchover and failover refuse it
//! ([`mixed`], [`rebuild_mismatch`]).

use std::collections::BTreeMap;

use crate::fleet_status::NodeReport;

impl NodeReport {
    /// The major this node runs: its server's when up, else its data
    /// directory's, else its programs'.
    pub fn major(&self) -> Option<u32> {
        self.server_major.or(self.data_major).or(self.binaries_major)
    }

    /// Its data directory and its programs disagree: the server cannot
    /// start (or runs only until restarted with the new programs).
    pub fn major_conflict(&self) -> Option<String> {
        match (self.data_major, self.binaries_major) {
            (Some(d), Some(b)) if d != b => Some(format!(
                "{}'s data directory is PostgreSQL {d} but its agent's programs (postgres.bin_dir) are {b}",
                self.name
            )),
            _ => None,
        }
    }
}

/// What is wrong when a cluster's reachable nodes do not all run one major
/// (or a node's data and programs disagree), in words naming each node;
/// `None` when they agree. Unreachable nodes are not counted: their major
/// is unknown.
pub fn mixed(cluster: &str, nodes: &[NodeReport]) -> Option<String> {
    let mut by_major: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for n in nodes.iter().filter(|n| n.reachable) {
        if let Some(m) = n.major() {
            by_major.entry(m).or_default().push(&n.name);
        }
        conflicts.extend(n.major_conflict());
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
pub fn rebuild_mismatch(node: &NodeReport, upstream: &NodeReport) -> Option<String> {
    let (Some(up), Some(mine)) = (upstream.major(), node.binaries_major) else {
        return None;
    };
    (up != mine).then(|| {
        format!(
            "{} runs PostgreSQL {up} but {}'s programs (postgres.bin_dir of its agent) are {mine}: \
             a physical copy runs only under the major it was made from; point {}'s agent at \
             PostgreSQL {up}'s programs, or upgrade the cluster (pg_upgrade) first",
            upstream.name, node.name, node.name
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
    use crate::fleet_status::Role;

    fn node(name: &str, server: Option<u32>, data: Option<u32>, binaries: Option<u32>) -> NodeReport {
        let role = if server.is_some() { Role::Replica } else { Role::Down };
        let mut r: NodeReport = serde_json::from_value(serde_json::json!({
            "name": name, "agent": "", "host": "", "port": 5432, "reachable": true, "role": role,
            "server_up": server.is_some(), "sync_rep_waiting": 0, "missing_synchronous_standbys": [],
        }))
        .unwrap();
        r.server_major = server;
        r.data_major = data;
        r.binaries_major = binaries;
        r
    }

    #[test]
    fn one_major_everywhere_is_not_mixed() {
        let nodes = [node("node0", Some(15), Some(15), Some(15)), node("node1", None, None, Some(15))];
        assert_eq!(mixed("main", &nodes), None);
    }

    #[test]
    fn a_node_on_another_major_is_named_with_its_major() {
        let nodes = [
            node("node0", Some(15), Some(15), Some(15)),
            node("node1", Some(15), Some(15), Some(15)),
            node("node2", Some(18), Some(18), Some(18)),
        ];
        let m = mixed("main", &nodes).unwrap();
        assert!(m.starts_with("cluster main mixes PostgreSQL majors: node0 and node1 run 15, node2 runs 18;"), "{m}");
        assert!(m.contains("pg_upgrade"), "{m}");
    }

    #[test]
    fn data_and_programs_that_disagree_are_named() {
        let nodes = [node("node0", Some(15), Some(15), Some(15)), node("node1", None, Some(15), Some(18))];
        let m = mixed("main", &nodes).unwrap();
        assert!(m.contains("node1's data directory is PostgreSQL 15 but its agent's programs (postgres.bin_dir) are 18"), "{m}");
    }

    #[test]
    fn unreachable_nodes_are_not_counted() {
        let mut gone = node("node1", None, None, Some(18));
        gone.reachable = false;
        assert_eq!(mixed("main", &[node("node0", Some(15), Some(15), Some(15)), gone]), None);
    }

    #[test]
    fn a_rebuild_needs_the_targets_programs_on_the_upstreams_major() {
        let up = node("node0", Some(15), Some(15), Some(15));
        // Its old data does not matter: the rebuild replaces it.
        assert_eq!(rebuild_mismatch(&node("node1", None, Some(18), Some(15)), &up), None);
        let m = rebuild_mismatch(&node("node1", None, None, Some(18)), &up).unwrap();
        assert!(m.starts_with("node0 runs PostgreSQL 15 but node1's programs"), "{m}");
    }
}
