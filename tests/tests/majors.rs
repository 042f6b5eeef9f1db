//! A cluster whose nodes run different PostgreSQL majors: physical
//! replication cannot span them, so `status` reports it and rebuild,
//! switchover and failover refuse it through both doors (in-process and
//! through `pgfleet serve`), changing nothing. Pointing the odd node's agent
//! at the cluster's major is the fix: then its rebuild goes through.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{error_of, json, one, pgfleet, start_primary, status_node, table_line};
use pgfleet_tests::{AgentOptions, Layout, Major, TestFleet};

/// The words `status` and the refusals use for node2 on `odd` and the
/// others on `suite`, majors in ascending order.
fn mixed_words(suite: Major, odd: Major) -> String {
    let (ours, theirs) = (format!("node0 and node1 run {suite}"), format!("node2 runs {odd}"));
    let groups = if suite.number() < odd.number() { [ours, theirs] } else { [theirs, ours] };
    format!("cluster main mixes PostgreSQL majors: {}", groups.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_mixing_majors_is_reported_refused_through_both_doors_and_fixed_by_one_bin_dir() {
    let suite = Major::from_env().unwrap();
    let odd = if suite == Major::V15 { Major::V18 } else { Major::V15 };
    let fleet = TestFleet::with_majors(Layout::Initdb, &[suite, suite, odd]).unwrap();
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    start_primary(&fleet, 0);
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let c = fleet.start_coordinator().unwrap();
    let through = |args: &[&str]| {
        let mut all = vec!["--coordinator", c.url.as_str()];
        all.extend_from_slice(args);
        pgfleet(&fleet, &all)
    };

    // status, both ways: node2's major in its row and the JSON, the
    // cluster's warning naming every node's major.
    let words = mixed_words(suite, odd);
    for out in [pgfleet(&fleet, &["status"]), through(&["status"])] {
        assert!(out.stdout.contains(&words) || out.stderr.contains(&words), "{words:?} missing:\n{out}");
        let row = table_line(&out.stdout, "node2");
        assert!(row.split_whitespace().any(|w| w == odd.to_string()), "{row:?}");
        let row = table_line(&out.stdout, "node0");
        assert!(row.split_whitespace().any(|w| w == suite.to_string()), "{row:?}");
    }
    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    assert_eq!(status_node(&report, "node2")["binaries_major"], odd.number(), "{report}");
    assert_eq!(status_node(&report, "node0")["server_major"], suite.number(), "{report}");
    assert_eq!(status_node(&report, "node0")["data_major"], suite.number(), "{report}");

    // Refusals, the same through the service as in-process; nothing changes.
    let slots = "select coalesce(string_agg(slot_name, ',' order by slot_name), '') from pg_replication_slots";
    let before = (
        std::fs::read_to_string(node0.hba_path()).unwrap(),
        one(node0, slots).await,
        one(node1, "select pg_postmaster_start_time()::text").await,
    );
    let rebuild_words = format!("node0 runs PostgreSQL {suite} but node2's programs (postgres.bin_dir of its agent) are {odd}");
    for (args, needle) in [
        (vec!["rebuild", "node2", "--no-progress-bar"], rebuild_words.as_str()),
        (vec!["rebuild", "node2", "--dry-run"], rebuild_words.as_str()),
        (vec!["switchover"], words.as_str()),
        (vec!["switchover", "--to", "node1", "--dry-run"], words.as_str()),
    ] {
        let local = pgfleet(&fleet, &args);
        let remote = through(&args);
        assert_eq!(local.code(), Some(1), "in-process {args:?}: {local}");
        assert_eq!(remote.code(), Some(1), "through the service {args:?}: {remote}");
        assert!(error_of(&local).contains(needle), "{args:?}: {needle:?} missing:\n{local}");
        assert_eq!(error_of(&remote), error_of(&local), "{args:?} is refused differently through the service");
    }
    assert!(!node2.data_dir().exists(), "a refused rebuild made {}", node2.data_dir().display());
    let after = (
        std::fs::read_to_string(node0.hba_path()).unwrap(),
        one(node0, slots).await,
        one(node1, "select pg_postmaster_start_time()::text").await,
    );
    assert_eq!(after, before, "a refused request changed the fleet");

    // The primary lost: failover is refused too, and node1 stays a standby.
    node0.stop_postgres().unwrap();
    for args in [vec!["failover"], vec!["failover", "--dry-run"]] {
        let local = pgfleet(&fleet, &args);
        let remote = through(&args);
        assert_eq!(local.code(), Some(1), "in-process {args:?}: {local}");
        assert!(error_of(&local).contains(&words), "{args:?}:\n{local}");
        assert_eq!(error_of(&remote), error_of(&local), "{args:?} is refused differently through the service");
    }
    assert_eq!(one(node1, "select pg_is_in_recovery()").await, "t");
    node0.start_postgres().unwrap();

    // A node whose data and programs disagree is named as such.
    node1.kill_agent().unwrap();
    node1.start_agent_with(&AgentOptions { bin_dir: Some(odd.bin_dir().to_owned()), ..AgentOptions::default() }).unwrap();
    let out = pgfleet(&fleet, &["status"]);
    let conflict = format!("node1's data directory is PostgreSQL {suite} but its agent's programs (postgres.bin_dir) are {odd}");
    assert!(out.stdout.contains(&conflict), "{conflict:?} missing:\n{out}");
    assert!(table_line(&out.stdout, "node1").contains(&format!("{suite} (programs {odd})")), "{out}");
    node1.kill_agent().unwrap();
    node1.start_agent().unwrap();

    // The fix: node2's agent on the cluster's major; no warning, and its
    // rebuild streams from node0.
    node2.kill_agent().unwrap();
    node2.start_agent_with(&AgentOptions { bin_dir: Some(suite.bin_dir().to_owned()), ..AgentOptions::default() }).unwrap();
    let out = pgfleet(&fleet, &["status"]);
    assert!(!out.stdout.contains("mixes PostgreSQL majors"), "{out}");
    let out = pgfleet(&fleet, &["rebuild", "node2", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let version = one(node2, "select current_setting('server_version_num')::int / 10000").await;
    assert_eq!(version, suite.number().to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    while one(node0, "select count(*) from pg_stat_replication where state = 'streaming'").await != "2" {
        assert!(Instant::now() < deadline, "node1 and node2 do not both stream from node0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
