//! Logical replication slots across a switchover and a failover. On
//! PostgreSQL 17 and later a slot created with `failover = true` is
//! synchronized to the synchronous standbys (`pgfleet sync set` arranges
//! it), a switchover refuses a candidate on which it is not ready, and a
//! logical consumer carries on from the new primary with no gap: what it
//! had not confirmed comes again, nothing is skipped. On 15 a switchover
//! still warns that logical slots are not carried over, and they are not.
//! Checked from outside pgfleet: pg_replication_slots, SHOW, and the
//! changes a consumer decodes (test_decoding through
//! pg_logical_slot_get_changes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{error_of, exec, one, pgfleet, rows, start_agents, start_primary};
use pgfleet_tests::{Host, Major, TestFleet};

/// node0 primary with wal_level = logical, node1 and node2 rebuilt from it
/// by pgfleet, a table `t` to write to.
async fn logical_fleet() -> TestFleet {
    let fleet = TestFleet::new(3).unwrap();
    start_primary(&fleet, 0);
    let node0 = fleet.host(0);
    exec(node0, "alter system set wal_level = logical").await;
    node0.stop_postgres().unwrap();
    node0.start_postgres().unwrap();
    start_agents(&fleet);
    for n in ["node1", "node2"] {
        let out = pgfleet(&fleet, &["rebuild", n, "--no-progress-bar"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    exec(node0, "create table t (id int primary key)").await;
    fleet
}

/// Inserts `ids`, one commit each.
async fn insert(host: &Host, ids: std::ops::RangeInclusive<i32>) {
    for id in ids {
        exec(host, &format!("insert into t values ({id})")).await;
    }
}

/// Takes every change slot `app` has for its consumer on `host` (and
/// confirms them), as the inserted ids in the order decoded.
async fn consume(host: &Host) -> Vec<i32> {
    rows(host, "select data from pg_logical_slot_get_changes('app', NULL, NULL)")
        .await
        .into_iter()
        .filter_map(|r| r[0].clone())
        .filter_map(|d| d.strip_prefix("table public.t: INSERT: id[integer]:").map(|id| id.parse().unwrap()))
        .collect()
}

/// What a consumer gets from a new primary: maybe again a tail of what it
/// had taken before the move (it had confirmed those after the standby's
/// copy of the slot last synchronized), then exactly `then`, in order.
fn assert_no_gap(before: &[i32], after: &[i32], then: &[i32]) {
    let again = after.len().checked_sub(then.len()).unwrap_or_else(|| panic!("got {after:?}, expected at least {then:?}"));
    assert_eq!(&after[again..], then, "changes missing or out of order after the move: got {after:?}");
    assert!(before.ends_with(&after[..again]), "re-delivered {:?} is not the tail of what was taken before, {before:?}", &after[..again]);
}

/// A consumer at work: inserts the next id and takes what the slot has,
/// until slot `app` is ready (synchronized and persisted) on every one of
/// `standbys`. A standby persists a synchronized slot only once the
/// primary's has moved past what the standby holds, which takes a consumer
/// that advances it. Returns what the consumer took.
async fn consume_until_ready(primary: &Host, standbys: &[&Host], next: &mut i32) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut taken = Vec::new();
    loop {
        let mut ready = true;
        for h in standbys {
            let n = one(
                h,
                "select count(*) from pg_replication_slots where slot_name = 'app' and synced and not temporary \
                 and invalidation_reason is null",
            )
            .await;
            ready &= n == "1";
        }
        if ready {
            return taken;
        }
        if Instant::now() >= deadline {
            let mut why = String::new();
            for h in standbys {
                let slots = rows(h, "select slot_name, synced, temporary, invalidation_reason from pg_replication_slots").await;
                let log = pgfleet_tests::host::tail(&h.postgres_log(), 15);
                why += &format!("\n{}: slots {slots:?}\n{log}", h.node_name());
            }
            panic!("slot app never became ready on every standby:{why}");
        }
        insert(primary, *next..=*next).await;
        *next += 1;
        exec(primary, "select pg_log_standby_snapshot()").await;
        taken.extend(consume(primary).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_and_its_consumer_survive_a_switchover_and_a_failover() {
    let major = Major::from_env().unwrap();
    if major.number() < 17 {
        eprintln!("skipped: PostgreSQL {major} has no failover slots (PGFLEET_TEST_PG_MAJOR=18 runs this)");
        return;
    }
    let fleet = logical_fleet().await;
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));

    // A DBA turned slot synchronization off on node2: the slot created now
    // never reaches it, and a switchover to node2 is refused.
    exec(node2, "alter system set sync_replication_slots = off").await;
    exec(node2, "select pg_reload_conf()").await;
    exec(node0, "select pg_create_logical_replication_slot('app', 'test_decoding', false, false, true)").await;
    // Refused the same through `pgfleet serve`.
    let c = fleet.start_coordinator().unwrap();
    let out = pgfleet(&fleet, &["switchover", "--to", "node2", "--dry-run"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("logical slot app on node0 has failover = true but is not ready on node2 (not synchronized there)"),
        "{out}"
    );
    let remote = pgfleet(&fleet, &["--coordinator", c.url.as_str(), "switchover", "--to", "node2", "--dry-run"]);
    assert_eq!(remote.code(), Some(1), "{remote}");
    assert_eq!(error_of(&remote), error_of(&out));
    drop(c);

    // sync set: the synchronous standbys synchronize failover slots, and
    // node0's logical WAL senders wait for them.
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("set sync_replication_slots"), "node2's setting not restored:\n{out}");
    assert_eq!(one(node0, "show synchronized_standby_slots").await, "node1,node2");
    for h in [node1, node2] {
        assert_eq!(one(h, "show sync_replication_slots").await, "on", "{}", h.node_name());
        assert_eq!(one(h, "show hot_standby_feedback").await, "on", "{}", h.node_name());
        assert!(one(h, "show primary_conninfo").await.contains("dbname=postgres"), "{}", h.node_name());
    }

    // A consumer at work until node1 has the slot ready; then 10 changes
    // wait for it.
    let mut next = 1;
    let before = consume_until_ready(node0, &[node1], &mut next).await;
    assert_eq!(before, (1..next).collect::<Vec<_>>());
    let waiting = next..=next + 9;
    insert(node0, waiting.clone()).await;
    next += 10;
    let out = pgfleet(&fleet, &["switchover", "--to", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!out.stderr.contains("not carried over"), "{out}");

    // node1 carries the slot on: the consumer gets the waiting changes and
    // the new ones, nothing skipped.
    insert(node1, next..=next + 9).await;
    let after = consume(node1).await;
    assert_no_gap(&before, &after, &(*waiting.start()..next + 10).collect::<Vec<_>>());
    next += 10;
    assert_eq!(one(node1, "show synchronized_standby_slots").await, "node0,node2");
    // node0, a standby now, gave up its own copy and synchronizes node1's.
    assert_eq!(one(node0, "show sync_replication_slots").await, "on");

    // The consumer on node1 until node0 and node2 both have the slot ready,
    // 10 changes waiting; node1's postmaster dies; failover.
    let before = consume_until_ready(node1, &[node0, node2], &mut next).await;
    let waiting = next..=next + 9;
    insert(node1, waiting.clone()).await;
    next += 10;
    node1.kill_postgres().unwrap();
    let out = pgfleet(&fleet, &["failover"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let new = if one(node0, "select pg_is_in_recovery()").await == "f" { node0 } else { node2 };
    assert_eq!(one(new, "select pg_is_in_recovery()").await, "f");
    insert(new, next..=next + 9).await;
    let after = consume(new).await;
    assert_no_gap(&before, &after, &(*waiting.start()..next + 10).collect::<Vec<_>>());
}

/// Before 17 there are no failover slots: a switchover warns that the
/// primary's logical slots stay behind, and the new primary has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_17_a_switchover_says_logical_slots_stay_behind() {
    let major = Major::from_env().unwrap();
    if major.number() >= 17 {
        eprintln!("skipped: PostgreSQL {major} carries failover slots (the other test)");
        return;
    }
    let fleet = &logical_fleet().await;
    let (node0, node1) = (fleet.host(0), fleet.host(1));
    exec(node0, "select pg_create_logical_replication_slot('app', 'test_decoding')").await;
    insert(node0, 1..=5).await;
    let out = pgfleet(fleet, &["switchover", "--to", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("logical replication slots on node0 are not carried over by a promotion and will not exist on node1: app")
            || out.stderr.contains("logical replication slots on node0 are not carried over by a promotion and will not exist on node1: app"),
        "{out}"
    );
    assert_eq!(one(node1, "select count(*) from pg_replication_slots where slot_type = 'logical'").await, "0");
}
