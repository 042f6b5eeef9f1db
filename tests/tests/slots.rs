//! `pgfleet slots` and `pgfleet slots drop`, and the agent's DropSlot RPC,
//! checked against what pg_replication_slots says on the primary.
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgfleet_proto::agent::v1::DropSlotRequest;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_tests::{Host, TestFleet};
use serde_json::Value;
use tonic::Code;

const SLOTS_SQL: &str = "select slot_name, slot_type, active, active_pid, restart_lsn \
                         from pg_replication_slots order by slot_name";

/// `(active, active_pid)` of slot `name` on `host`, `None` if it does not exist.
async fn slot_state(host: &Host, name: &str) -> Option<(bool, Option<String>)> {
    let sql =
        format!("select active, active_pid from pg_replication_slots where slot_name = '{name}'");
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

fn pid(s: &str) -> Pid {
    Pid::from_raw(s.parse().unwrap_or_else(|_| panic!("{s:?} is not a pid")))
}

/// Occurrences of `needle` in the log file at `path`.
fn log_count(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Waits (up to 30 s) until slot `name` on `host` is in use.
async fn wait_slot_active(host: &Host, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_state(host, name).await.map(|s| s.0) != Some(true) {
        assert!(
            Instant::now() < deadline,
            "slot {name} not in use within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pg_hba.conf line on `primary`, ahead of the others, that turns away
/// new replication connections from `replica`.
struct HbaReject {
    original: String,
}

impl HbaReject {
    async fn install(primary: &Host, replica: &Host) -> HbaReject {
        let path = primary.data_dir().join("pg_hba.conf");
        let original = std::fs::read_to_string(&path).unwrap();
        // Rewritten in place: the file keeps its owner (postgres) and mode.
        std::fs::write(
            &path,
            format!(
                "host replication all {}/32 reject\n{original}",
                replica.addr()
            ),
        )
        .unwrap();
        exec(primary, "select pg_reload_conf()").await;
        // The reload is asynchronous; a new connection sees it once done.
        tokio::time::sleep(Duration::from_millis(200)).await;
        HbaReject { original }
    }

    async fn remove(self, primary: &Host) {
        std::fs::write(primary.data_dir().join("pg_hba.conf"), &self.original).unwrap();
        exec(primary, "select pg_reload_conf()").await;
    }
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
    exec(
        p,
        "select pg_create_physical_replication_slot('stale1', true)",
    )
    .await;
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
    assert!(
        stale_line.contains("inactive, holding WAL back"),
        "{stale_line}"
    );
    let r1_line = lines.iter().find(|l| l.contains(" r1 ")).unwrap();
    assert!(!r1_line.contains("holding WAL back"), "{r1_line}");
    assert!(
        r1_line.contains(&format!("yes (pid {sender})")),
        "{r1_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_removes_inactive_slot() {
    let fleet = primary_with_stale_slot().await;
    let p = fleet.host(0);
    exec(
        p,
        "select pg_create_physical_replication_slot('keep1', true)",
    )
    .await;
    assert!(slot_state(p, "stale1").await.is_some());

    let out = pgfleet(&fleet, &["slots", "drop", "node0", "stale1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout
            .contains("dropped replication slot stale1 on node0"),
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
    assert_eq!(
        slot_state(p, "r1").await,
        Some((true, Some(sender.clone())))
    );
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
    // A standby whose WAL sender is terminated reconnects within some 25 ms
    // and takes its slot again; whether the agent's drop gets in first is a
    // race (see slots_drop_force_beats_a_standby_that_reconnects_at_once).
    // Here the primary turns the standby's new connections away, so the
    // outcome is deterministic; the connection it already has is untouched.
    let hba = HbaReject::install(p, r).await;
    // The standby retries every 5 s by default; sooner keeps the test short.
    exec(r, "alter system set wal_retrieve_retry_interval = '200ms'").await;
    exec(r, "select pg_reload_conf()").await;

    let out = pgfleet(&fleet, &["slots", "drop", "node0", "r1", "--force"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("dropped replication slot r1 on node0"),
        "{out}"
    );
    assert!(
        out.stdout.contains("its WAL sender was terminated"),
        "{out}"
    );

    assert_eq!(slot_state(p, "r1").await, None);
    // The WAL sender that held it is gone.
    let alive = one(
        p,
        &format!("select count(*) from pg_stat_activity where pid = {sender}"),
    )
    .await;
    assert_eq!(alive, "0");

    // Let the standby in again: without its slot it still cannot stream.
    hba.remove(p).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(r.postgres_log())
        .unwrap_or_default()
        .contains("replication slot \"r1\" does not exist")
    {
        assert!(
            Instant::now() < deadline,
            "the standby did not try (and fail) to stream through r1 within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And status says the primary no longer sees it, and why, from the
    // standby's own log. (Polled: each of the standby's reconnect attempts
    // briefly shows up in pg_stat_replication.)
    let want = "node1 is a replica but the primary node0 shows no replication connection from it; \
                its server log: FATAL: could not start WAL streaming: ERROR: replication slot \"r1\" does not exist";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = json(&pgfleet(&fleet, &["status", "--json"]));
        let warned = report["clusters"][0]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w == want);
        if warned && status_node(&report, "node1")["replication"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning {want:?} within 20 s: {report:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(slot_state(p, "r1").await, None);
    assert_eq!(one(r, "select pg_is_in_recovery()").await, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_force_beats_a_standby_that_reconnects_at_once() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    // Re-created slots are picked up quickly between rounds.
    exec(r, "alter system set wal_retrieve_retry_interval = '200ms'").await;
    exec(r, "select pg_reload_conf()").await;
    let in_use = "replication slot \"r1\" is active for PID";
    for round in 0..3 {
        if round > 0 {
            exec(p, "select pg_create_physical_replication_slot('r1', true)").await;
            wait_slot_active(p, "r1").await;
        }
        let sender = pid(&walsender_pid(p, r).await);
        let refusals_before = log_count(&p.postgres_log(), in_use);
        // The WAL sender is slow to exit (frozen until the agent has tried
        // its first drop); it then exits, and the standby reconnects at once,
        // as a standby that has been streaming for a while does.
        kill(sender, Signal::SIGSTOP).unwrap();
        let out = std::thread::scope(|s| {
            // --timeout: the agent's own answer, not the CLI's deadline
            // (see slots_drop_force_reports_a_slot_that_stays_in_use).
            let cli = s.spawn(|| {
                fleet.pgfleet(&[
                    "slots",
                    "drop",
                    "node0",
                    "r1",
                    "--force",
                    "--timeout",
                    "60s",
                ])
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            while log_count(&p.postgres_log(), in_use) == refusals_before {
                if Instant::now() >= deadline {
                    let _ = kill(sender, Signal::SIGCONT);
                    panic!("the agent never tried to drop r1 while its WAL sender was frozen");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            kill(sender, Signal::SIGCONT).unwrap();
            cli.join().unwrap().unwrap()
        });
        eprintln!("round {round}: {out}");
        assert_eq!(out.code(), Some(0), "round {round}: {out}");
        assert!(
            out.stdout.contains("its WAL sender was terminated"),
            "{out}"
        );
        assert_eq!(slot_state(p, "r1").await, None, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_drop_force_reports_a_slot_that_stays_in_use() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    // A WAL sender that does not exit when terminated (frozen here).
    let sender = pid(&walsender_pid(p, r).await);
    kill(sender, Signal::SIGSTOP).unwrap();
    let out = fleet.pgfleet(&["slots", "drop", "node0", "r1", "--force"]);
    let still_there = slot_state(p, "r1").await;
    kill(sender, Signal::SIGCONT).unwrap();
    let out = out.unwrap();
    eprintln!("{out}");
    assert_eq!(still_there.map(|s| s.0), Some(true));
    assert_eq!(out.code(), Some(1), "{out}");
    // The agent's own answer (the slot is still in use, what to do) reaches
    // the operator; the agent was reachable all along.
    assert!(
        out.stderr.contains("r1") && out.stderr.contains("answered FailedPrecondition"),
        "{out}"
    );
    assert!(!out.stderr.contains("unreachable"), "{out}");
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
    assert!(!out.success(), "{out}");
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
    assert_eq!(steps.len(), 1, "{plan:#}");
    assert_eq!(steps[0]["step"], "drop-slot", "{plan:#}");
    assert_eq!(steps[0]["host"], "node0", "{plan:#}");
    assert_eq!(steps[0]["slot"], "stale1", "{plan:#}");
    assert!(steps[0]["description"].as_str().unwrap().contains("pg_drop_replication_slot('stale1')"), "{plan:#}");

    assert_eq!(rows(p, SLOTS_SQL).await, before, "slots changed");
    assert_eq!(slot_state(p, "stale1").await, Some((false, None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_slot_rpc_answers_invalid_argument_not_found_and_failed_precondition() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    let sender = walsender_pid(p, r).await;
    let mut agent = AgentClient::new(p.agent_channel().await.unwrap());
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_on_a_stopped_server_says_so_and_does_not_claim_an_unreachable_agent() {
    let fleet = primary_and_replica().await;
    fleet.host(1).stop_postgres().unwrap();

    let out = pgfleet(&fleet, &["slots", "--json"]);
    let report = json(&out);
    // The rest of the fleet is listed; node1 says why it has no list.
    assert_eq!(
        slot(node_slots(&report, "node0"), "r1")["slot_type"],
        "physical"
    );
    let n1 = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "node1")
        .unwrap();
    assert_eq!(n1["reachable"], true, "{n1:#}");
    let error = n1["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("PostgreSQL is not accepting connections"),
        "{error:?}"
    );
    // Every agent answered: the report must not say otherwise, and exit code
    // 3 ("some agents could not be reached", README) does not apply.
    assert_eq!(report["all_reachable"], true, "{report:#}");
    assert_ne!(out.code(), Some(3), "{out}");
}
