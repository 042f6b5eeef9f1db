//! `pgfleet rebuild --cluster C --all-replicas`: every replica rebuilt, one
//! at a time, each streaming again before the next stops; refused before
//! any change when a replica's absence would leave the primary short of the
//! synchronous standbys synchronous_standby_names asks for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{exec, json, one, pgfleet, start_agents, start_primary};
use pgfleet_tests::TestFleet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_replicas_are_rebuilt_one_at_a_time_without_losing_the_sync_standbys() {
    let fleet = TestFleet::new(3).unwrap();
    // Replicas made by hand (as postgres, pg_basebackup -R): `sync set`
    // re-points them with the inventory's replication role.
    start_primary(&fleet, 0);
    fleet.make_replica_with_pg_basebackup(1, 0, "r1").await.unwrap();
    fleet.make_replica_with_pg_basebackup(2, 0, "r2").await.unwrap();
    start_agents(&fleet);
    let primary = fleet.host(0);
    exec(primary, "create table t (i int); insert into t select generate_series(1, 1000)").await;

    // node1 is the only synchronous standby: rebuilding it would stall
    // every commit. Refused, and nothing changed.
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let before = one(fleet.host(1), "select pg_postmaster_start_time()::text").await;
    let out = pgfleet(&fleet, &["rebuild", "--all-replicas"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("rebuilding node1 would leave 0 synchronous standby"), "{out}");
    assert_eq!(one(fleet.host(1), "select pg_postmaster_start_time()::text").await, before);

    // With two candidates for one synchronous slot, each can go in turn.
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = pgfleet(&fleet, &["rebuild", "--all-replicas", "--cluster", "main", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let last = out.stdout.trim_end().rsplit_once("\n{").map(|(_, l)| format!("{{{l}")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&last).unwrap_or_else(|_| json(&out));
    let rebuilt: Vec<&str> = r["rebuilt"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(rebuilt, ["node1", "node2"], "{out}");
    // One at a time: node2's rebuild began after node1's ended.
    let starts: Vec<usize> = ["[node1] rebuild:", "[node2] rebuild:"].iter().map(|m| out.stderr.find(m).unwrap()).collect();
    let node1_done = out.stderr.find("[node1] rebuild done").unwrap();
    assert!(starts[0] < node1_done && node1_done < starts[1], "{out}");
    for i in [1, 2] {
        assert_eq!(one(fleet.host(i), "select pg_is_in_recovery()").await, "t");
        assert_eq!(one(fleet.host(i), "select count(*) from t").await, "1000");
    }
    // Commits never stopped: the primary still has a synchronous standby.
    exec(primary, "insert into t values (1001)").await;
}
