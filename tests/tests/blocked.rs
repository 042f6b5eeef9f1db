//! Writes blocked by synchronous replication, and an agent that stays
//! readable while a change is stuck in PostgreSQL (DESIGN.md invariants 12
//! and 13), on an initdb'd primary with scram and per-host pg_hba lines.
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{exec, json, one, pgfleet, status_node};
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_proto::coordinator::v1 as cpb;
use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use pgfleet_tests::TestFleet;

/// node0 an initdb'd primary, node1 rebuilt from it by pgfleet, agents up,
/// a table `t`.
async fn primary_and_rebuilt_standby() -> TestFleet {
    let fleet = TestFleet::new(2).unwrap();
    common::start_primary(&fleet, 0);
    common::start_agents(&fleet);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    exec(fleet.host(0), "create table t (i int)").await;
    fleet
}

/// The only synchronous standby is lost: a commit waits. `pgfleet status`
/// says writes are blocked on the primary, how many and which standby is
/// missing; rebuilding that standby is not stuck behind the very commits it
/// will release (its role change runs with synchronous_commit = local), and
/// the waiting commit returns once it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_synchronous_standby_shows_as_blocked_writes_and_its_rebuild_releases_them() {
    let fleet = primary_and_rebuilt_standby().await;
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    fleet.host(1).stop_postgres().unwrap();

    let client = fleet.host(0).connect().await.unwrap();
    let insert = tokio::spawn(async move { client.execute("insert into t values (1)", &[]).await });
    // PostgreSQL itself says the commit waits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while one(fleet.host(0), "select count(*) from pg_stat_activity where wait_event = 'SyncRep'").await != "1" {
        assert!(Instant::now() < deadline, "the insert never waited in SyncRep");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let out = pgfleet(&fleet, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    let p = status_node(&report, "node0");
    assert_eq!(p["role"], "primary", "{p:#}");
    assert_eq!(p["sync_rep_waiting"], 1, "{p:#}");
    assert!(p["sync_rep_oldest_wait_seconds"].as_f64().unwrap() >= 1.0, "{p:#}");
    assert_eq!(p["missing_synchronous_standbys"], serde_json::json!(["node1"]), "{p:#}");
    let warnings = report["clusters"][0]["warnings"].to_string();
    assert!(
        warnings.contains("writes are blocked on node0") && warnings.contains("node1 (its server is down)"),
        "{warnings}"
    );
    let table = pgfleet(&fleet, &["status"]);
    assert!(table.stdout.contains("writes are blocked on node0"), "{table}");
    // The same through the coordinator's API (GetFleetStatus).
    let c = fleet.start_coordinator().unwrap();
    let mut api = CoordinatorClient::new(c.channel_as(&fleet.pki_dir(), "test-reader").await.unwrap());
    let fs = api.get_fleet_status(cpb::GetFleetStatusRequest::default()).await.unwrap().into_inner();
    let n0 = fs.clusters[0].nodes.iter().find(|n| n.name == "node0").unwrap();
    assert_eq!(n0.sync_rep_waiting, 1, "{n0:?}");
    assert_eq!(n0.missing_synchronous_standbys, ["node1"], "{n0:?}");
    assert_eq!(n0.synchronous_standby_names.as_deref(), Some(r#"FIRST 1 ("node1")"#), "{n0:?}");
    assert!(fs.clusters[0].warnings.iter().any(|w| w.contains("writes are blocked on node0")), "{fs:?}");

    let started = Instant::now();
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30), "rebuild took {:?}", started.elapsed());
    let inserted = tokio::time::timeout(Duration::from_secs(10), insert)
        .await
        .expect("the waiting commit did not return once node1 streamed")
        .unwrap()
        .unwrap();
    assert_eq!(inserted, 1);
    assert_eq!(one(fleet.host(0), "select count(*) from pg_stat_activity where wait_event = 'SyncRep'").await, "0");
}

/// A change stuck in PostgreSQL (ALTER ROLE behind a lock on pg_authid)
/// does not stop GetStatus: it answers within its deadline and names the
/// stuck change; `pgfleet status` sees the primary and warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_status_answers_while_a_change_is_stuck_behind_a_lock() {
    let fleet = TestFleet::new(2).unwrap();
    common::start_primary(&fleet, 0);
    common::start_agents(&fleet);
    let primary = fleet.host(0);
    // Blocks ALTER ROLE (ROW EXCLUSIVE), not reads nor logins (ACCESS SHARE).
    let locker = primary.connect().await.unwrap();
    locker.batch_execute("begin; lock table pg_authid in share mode").await.unwrap();

    let node1_addr = fleet.host(1).addr().to_string();
    let mut agent = AgentClient::new(primary.agent_channel().await.unwrap());
    let mut changer = agent.clone();
    let prepare = tokio::spawn(async move {
        changer
            .prepare_upstream(pb::PrepareUpstreamRequest {
                replication_role: "pgfleet_replication".into(),
                replication_password: "a password".into(),
                replica_address: node1_addr,
                slot_name: "node1".into(),
                dry_run: false,
                operation_id: "stuck-test".into(),
                for_rewind: false,
                replica_name: "node1".into(),
                replica_streams_through_slot: false,
            })
            .await
    });
    // The ALTER ROLE is waiting for the lock now.
    let deadline = Instant::now() + Duration::from_secs(10);
    while one(primary, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'").await != "1" {
        assert!(Instant::now() < deadline, "the role change never waited for the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let asked = Instant::now();
    let st = tokio::time::timeout(Duration::from_secs(2), agent.get_status(pb::GetStatusRequest { fresh: true }))
        .await
        .expect("GetStatus did not answer within 2 s while a change was stuck")
        .unwrap()
        .into_inner();
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert!(st.server_up);
    assert_eq!(st.role(), pb::Role::Primary);
    let slow = st.slow_change.unwrap_or_default();
    // CREATE ROLE here (the role is new); ALTER ROLE once it exists.
    assert!(slow.ends_with("s") && slow.contains(" ROLE running for "), "{slow:?}");
    assert!(!slow.contains("a password"), "{slow:?}");

    let out = pgfleet(&fleet, &["status", "--json"]);
    let report = json(&out);
    assert_eq!(report["clusters"][0]["primary"], "node0", "{out}");
    assert!(report["clusters"][0]["warnings"].to_string().contains("change stuck in PostgreSQL"), "{out}");

    locker.batch_execute("commit").await.unwrap();
    let prepared = tokio::time::timeout(Duration::from_secs(10), prepare).await.unwrap().unwrap();
    assert!(prepared.is_ok(), "{prepared:?}");
}
