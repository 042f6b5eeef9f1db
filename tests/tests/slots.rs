//! `pgfleet slots` and `pgfleet slots drop`, and the agent's DropSlot RPC,
//! checked against what pg_replication_slots says on the primary.

mod common;

use common::*;
use pgfleet_proto::agent::v1::DropSlotRequest;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_tests::{Host, TestFleet};
use serde_json::Value;
use tonic::Code;

const SLOTS_SQL: &str = "select slot_name, slot_type, active, active_pid, restart_lsn \
                         from pg_replication_slots order by slot_name";

/// `(active, active_pid)` of slot `name` on `host`, `None` if it does not exist.
async fn slot_state(host: &Host, name: &str) -> Option<(bool, Option<String>)> {
    let sql = format!(
        "select active, active_pid from pg_replication_slots where slot_name = '{name}'"
    );
    rows(host, &sql)
        .await
        .into_iter()
        .next()
        .map(|r| (r[0].as_deref() == Some("t"), r[1].clone()))
}

/// The pid of the WAL sender streaming to `replica`, as pg_stat_replication
/// on `primary` shows it.
async fn walsender_pid(primary: &Host, replica: &Host) -> String {
    one(
        primary,
        &format!(
            "select pid from pg_stat_replication where client_addr = '{}'",
            replica.addr()
        ),
    )
    .await
}

/// The slot objects of node `node` in a `slots --json` report.
fn node_slots<'a>(report: &'a Value, node: &str) -> &'a Vec<Value> {
    report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("no node {node} in {report:#}"))["slots"]
        .as_array()
        .unwrap()
}

fn slot<'a>(slots: &'a [Value], name: &str) -> &'a Value {
    slots
        .iter()
        .find(|s| s["slot_name"] == name)
        .unwrap_or_else(|| panic!("no slot {name} in {slots:#?}"))
}

/// A single primary with its agent and an inactive physical slot `stale1`
/// that reserves WAL.
async fn primary_with_stale_slot() -> TestFleet {
    let fleet = TestFleet::new(1).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    exec(
        fleet.host(0),
        "select pg_create_physical_replication_slot('stale1', true)",
    )
    .await;
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_lists_active_and_flags_inactive_slots_holding_wal() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    exec(p, "select pg_create_physical_replication_slot('stale1', true)").await;
    exec(
        p,
        "create table t (id int, v text);
         insert into t select g, md5(g::text) from generate_series(1, 10000) g;
         select pg_switch_wal();",
    )
    .await;
    let sender = walsender_pid(p, r).await;
    let held_before: u64 = one(
        p,
        "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
         from pg_replication_slots where slot_name = 'stale1'",
    )
    .await
    .parse()
    .unwrap();
    assert!(held_before > 0);

    let out = pgfleet(&fleet, &["slots", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    assert_eq!(report["all_reachable"], true);
    let slots = node_slots(&report, "node0");
    assert_eq!(slots.len(), 2, "{slots:#?}");

    let r1 = slot(slots, "r1");
    assert_eq!(r1["slot_type"], "physical");
    assert_eq!(r1["active"], true, "{r1:#}");
    assert_eq!(r1["active_pid"].to_string(), sender, "{r1:#}");
    assert_eq!(r1["inactive_retaining_wal"], false, "{r1:#}");

    let stale = slot(slots, "stale1");
    let held_after: u64 = one(
        p,
        "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
         from pg_replication_slots where slot_name = 'stale1'",
    )
    .await
    .parse()
    .unwrap();
    assert_eq!(stale["slot_type"], "physical");
    assert_eq!(stale["active"], false, "{stale:#}");
    assert_eq!(stale["active_pid"], Value::Null, "{stale:#}");
    let restart = one(
        p,
        "select restart_lsn from pg_replication_slots where slot_name = 'stale1'",
    )
    .await;
    assert_eq!(stale["restart_lsn"], restart.as_str(), "{stale:#}");
    let retained = stale["retained_wal_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{stale:#}"));
    assert!(
        (held_before..=held_after).contains(&retained),
        "retained_wal_bytes {retained} not within what PostgreSQL showed before \
         ({held_before}) and after ({held_after})"
    );
    assert_eq!(stale["inactive_retaining_wal"], true, "{stale:#}");
    // The replica has no slots of its own.
    assert!(node_slots(&report, "node1").is_empty(), "{report:#}");

    let out = pgfleet(&fleet, &["slots", "--inactive", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    let names: Vec<&str> = node_slots(&report, "node0")
        .iter()
        .map(|s| s["slot_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["stale1"]);

    let out = pgfleet(&fleet, &["slots"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let lines = table_lines(&out.stdout, "node0");
    let stale_line = lines.iter().find(|l| l.contains("stale1")).unwrap();
    assert!(stale_line.contains("inactive, holding WAL back"), "{stale_line}");
    let r1_line = lines.iter().find(|l| l.contains(" r1 ")).unwrap();
    assert!(!r1_line.contains("holding WAL back"), "{r1_line}");
    assert!(r1_line.contains(&format!("yes (pid {sender})")), "{r1_line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_removes_inactive_slot() {
    let fleet = primary_with_stale_slot().await;
    let p = fleet.host(0);
    exec(p, "select pg_create_physical_replication_slot('keep1', true)").await;
    assert!(slot_state(p, "stale1").await.is_some());

    let out = pgfleet(&fleet, &["slots", "drop", "node0", "stale1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("dropped replication slot stale1 on node0"),
        "{out}"
    );
    assert!(!out.stdout.contains("terminated"), "{out}");
    assert_eq!(slot_state(p, "stale1").await, None);
    // Only that one.
    assert_eq!(slot_state(p, "keep1").await, Some((false, None)));

    // Gone now: a second drop fails and says so.
    let out = pgfleet(&fleet, &["slots", "drop", "node0", "stale1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("no replication slot named stale1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_refuses_active_slot_without_force() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    let sender = walsender_pid(p, r).await;

    let out = pgfleet(&fleet, &["slots", "drop", "node0", "r1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("active"), "{out}");
    assert!(out.stderr.contains("--force"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");

    // Untouched: same slot, same WAL sender, still streaming.
    assert_eq!(slot_state(p, "r1").await, Some((true, Some(sender.clone()))));
    assert_eq!(walsender_pid(p, r).await, sender);
    let state = one(
        p,
        &format!("select state from pg_stat_replication where pid = {sender}"),
    )
    .await;
    assert_eq!(state, "streaming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_force_cuts_off_the_standby() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    let sender = walsender_pid(p, r).await;

    let out = pgfleet(&fleet, &["slots", "drop", "node0", "r1", "--force"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("dropped replication slot r1 on node0"), "{out}");
    assert!(out.stdout.contains("its WAL sender was terminated"), "{out}");

    assert_eq!(slot_state(p, "r1").await, None);
    // The WAL sender that held it is gone.
    let alive = one(
        p,
        &format!("select count(*) from pg_stat_activity where pid = {sender}"),
    )
    .await;
    assert_eq!(alive, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_rejects_invalid_names_before_any_call() {
    let fleet = primary_with_stale_slot().await;
    let p = fleet.host(0);
    exec(
        p,
        "create table t (id int); insert into t values (1);
         select pg_create_physical_replication_slot('r1', true);",
    )
    .await;
    let before = rows(p, SLOTS_SQL).await;
    assert_eq!(before.len(), 2);

    let long = "a".repeat(64);
    let bad = ["x'); drop table t; --", "R1", "a-b", long.as_str(), ""];
    for name in bad {
        for extra in [&[][..], &["--force"][..], &["--dry-run"][..]] {
            let mut args = vec!["slots", "drop", "node0", name];
            args.extend_from_slice(extra);
            let out = pgfleet(&fleet, &args);
            assert_eq!(out.code(), Some(2), "{name:?} {extra:?}: {out}");
            assert!(out.stderr.contains("invalid slot name"), "{name:?}: {out}");
            assert!(out.stdout.is_empty(), "{name:?}: {out}");
        }
    }

    let out = pgfleet(&fleet, &["slots", "drop", "nodex", "r1"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("\"nodex\"") && out.stderr.contains("known: node0"),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "{out}");

    assert_eq!(rows(p, SLOTS_SQL).await, before, "slots changed");
    assert_eq!(one(p, "select count(*) from t").await, "1");

    // Refused before any call: the same answers with no agent to call.
    fleet.host(0).kill_agent().unwrap();
    let out = pgfleet(&fleet, &["slots", "drop", "node0", "R1", "--force"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("invalid slot name"), "{out}");
    let out = pgfleet(&fleet, &["slots", "drop", "nodex", "r1"]);
    assert_eq!(out.code(), Some(2), "{out}");
    // The agent really is gone: a valid request cannot be carried out.
    let out = pgfleet(&fleet, &["slots", "drop", "node0", "r1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("unreachable"), "{out}");
    assert_eq!(rows(p, SLOTS_SQL).await, before, "slots changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_dry_run_changes_nothing() {
    let fleet = primary_with_stale_slot().await;
    let p = fleet.host(0);
    let before = rows(p, SLOTS_SQL).await;

    let out = pgfleet(&fleet, &["slots", "drop", "node0", "stale1", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("dry run, nothing changed"), "{out}");
    assert!(
        out.stdout.contains("pg_drop_replication_slot('stale1')"),
        "{out}"
    );
    assert!(!out.stdout.contains("pg_terminate_backend"), "{out}");

    let out = pgfleet(
        &fleet,
        &["slots", "drop", "node0", "stale1", "--dry-run", "--force"],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("pg_terminate_backend"), "{out}");
    assert!(out.stdout.contains("pg_drop_replication_slot"), "{out}");

    let out = pgfleet(
        &fleet,
        &["slots", "drop", "node0", "stale1", "--dry-run", "--json"],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let plan = json(&out);
    assert_eq!(plan["dry_run"], true);
    let steps = plan["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s.as_str().unwrap().contains("pg_drop_replication_slot")),
        "{plan:#}"
    );

    assert_eq!(rows(p, SLOTS_SQL).await, before, "slots changed");
    assert_eq!(slot_state(p, "stale1").await, Some((false, None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_slot_rpc_answers_invalid_argument_not_found_and_failed_precondition() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    let sender = walsender_pid(p, r).await;
    let mut agent = AgentClient::connect(p.agent_endpoint()).await.unwrap();
    let drop = |name: &str, force: bool| DropSlotRequest {
        slot_name: name.to_owned(),
        force,
    };

    for name in ["x'); drop table t; --", "R1", "", "a-b"] {
        for force in [false, true] {
            let e = agent.drop_slot(drop(name, force)).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{name:?}: {e:?}");
            assert!(e.message().contains("invalid slot name"), "{e:?}");
        }
    }

    let e = agent.drop_slot(drop("nosuch", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("nosuch"), "{e:?}");
    let e = agent.drop_slot(drop("nosuch", true)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let e = agent.drop_slot(drop("r1", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("active"), "{e:?}");
    assert_eq!(slot_state(p, "r1").await, Some((true, Some(sender))));

    // And a forced drop answers what it did.
    let ok = agent.drop_slot(drop("r1", true)).await.unwrap().into_inner();
    assert_eq!(ok.slot_name, "r1");
    assert!(ok.terminated_sender);
    assert!(ok.released_wal_bytes.is_some());
    assert_eq!(slot_state(p, "r1").await, None);
}
