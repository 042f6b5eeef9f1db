//! The harness itself: hosts are real, separate network endpoints, and
//! nothing survives a fleet.

use pgfleet_tests::{Major, TestFleet};
use pgfleet_tests::net::list_netns;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_builds_primary_and_streaming_replica() {
    let fleet = TestFleet::new(2).unwrap();
    let n = fleet.n();
    let (primary, replica) = (fleet.host(0), fleet.host(1));

    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    fleet
        .make_replica_with_pg_basebackup(1, 0, "r1")
        .await
        .unwrap();

    assert_eq!(
        primary
            .query_one_string("select pg_is_in_recovery()")
            .await
            .unwrap(),
        "f"
    );
    assert_eq!(
        replica
            .query_one_string("select pg_is_in_recovery()")
            .await
            .unwrap(),
        "t"
    );
    // The replica connected from its own namespace, so the primary sees its
    // own address, not the bridge's or a loopback one.
    let client_addr = primary
        .query_one_string("select host(client_addr) from pg_stat_replication")
        .await
        .unwrap();
    assert_eq!(client_addr, replica.addr().to_string());
    // Both servers run the suite's major (PGFLEET_TEST_PG_MAJOR), as the
    // servers themselves say.
    let major = Major::from_env().unwrap().number().to_string();
    for h in [primary, replica] {
        let version = h
            .query_one_string("select current_setting('server_version_num')::int / 10000")
            .await
            .unwrap();
        assert_eq!(version, major, "{}", h.node_name());
    }

    drop(fleet);
    let prefix = format!("pft{n}h");
    let left: Vec<String> = list_netns()
        .unwrap()
        .into_iter()
        .filter(|ns| ns.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!std::path::Path::new(&format!("/tmp/pgfleet-test-{n}")).exists());
}

#[test]
fn fleets_alive_at_once_get_different_networks() {
    let a = TestFleet::new(1).unwrap();
    let b = TestFleet::new(1).unwrap();
    assert_ne!(a.n(), b.n());
    assert_ne!(a.host(0).addr(), b.host(0).addr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_agents_answer_the_cli_and_a_killed_server_restarts() {
    let fleet = TestFleet::new(2).unwrap();
    fleet.host(0).initdb().unwrap();
    fleet.host(0).start_postgres().unwrap();
    fleet
        .make_replica_with_pg_basebackup(1, 0, "r1")
        .await
        .unwrap();
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }

    let out = fleet.pgfleet(&["status", "--json"]).unwrap();
    eprintln!("{out}");
    assert!(out.success(), "{out}");
    for h in fleet.hosts() {
        assert!(out.stdout.contains(&h.node_name()), "{out}");
    }

    // An inventory node nobody answers for: the CLI says which (exit 3).
    let dead = format!("http://198.18.{}.250:7420", fleet.n());
    fleet.write_inventory_with(&[("ghost", &dead)]).unwrap();
    let out = fleet.pgfleet(&["status"]).unwrap();
    eprintln!("{out}");
    assert_eq!(out.code(), Some(3), "{out}");

    // Node loss: SIGKILL the primary's server; it comes back at once.
    let primary = fleet.host(0);
    primary.kill_postgres().unwrap();
    primary.start_postgres().unwrap();
    assert_eq!(
        primary
            .query_one_string("select pg_is_in_recovery()")
            .await
            .unwrap(),
        "f"
    );

    let pid = fleet.host(1).agent_pid().unwrap();
    fleet.host(1).kill_agent().unwrap();
    assert!(fleet.host(1).agent_pid().is_none());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
