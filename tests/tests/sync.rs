//! `pgfleet sync set|show`, end to end: real PostgreSQL servers, real
//! agents and the real CLI, checked against what the primary itself reports
//! (`SHOW synchronous_standby_names`, `pg_stat_replication.sync_state`).
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{json, one, pgfleet, senders};
use pgfleet_tests::{Host, TestFleet};
use serde_json::Value;

/// Three hosts: node0 a fresh primary, node1 and node2 built from it by
/// `pgfleet rebuild` (application_name = node name, slot = node name),
/// every agent running.
async fn primary_and_two_rebuilt_standbys() -> TestFleet {
    let fleet = TestFleet::new(3).unwrap();
    common::start_primary(&fleet, 0);
    common::start_agents(&fleet);
    for node in ["node1", "node2"] {
        let out = pgfleet(&fleet, &["rebuild", node, "--no-progress-bar"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    fleet
}

fn streaming(rows: &[(&str, &str)]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(name, sync)| (name.to_string(), "streaming".to_owned(), sync.to_string()))
        .collect()
}

/// `(application_name, state, sync_state)` of the standbys in a `sync
/// show|set --json` report.
fn reported_states(report: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = report["standbys"]
        .as_array()
        .unwrap_or_else(|| panic!("no standbys in {report:#}"))
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            (f("application_name"), f("state"), f("sync_state"))
        })
        .collect();
    v.sort();
    v
}

/// What the primary reports: (synchronous_standby_names, WAL senders).
async fn primary_view(primary: &Host) -> (String, Vec<(String, String, String)>) {
    (
        one(primary, "show synchronous_standby_names").await,
        senders(primary).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_set_first_any_and_off_show_in_pg_stat_replication() {
    let fleet = primary_and_two_rebuilt_standbys().await;
    let primary = fleet.host(0);
    assert_eq!(
        primary_view(primary).await,
        (
            String::new(),
            streaming(&[("node1", "async"), ("node2", "async")])
        )
    );

    // --dry-run: the steps, and the primary's setting is untouched.
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let plan = json(&out);
    assert_eq!(plan["dry_run"], true, "{plan:#}");
    let steps: Vec<(String, String)> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["host"].as_str().unwrap().to_owned(), s["step"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        steps,
        [("node0".to_owned(), "sync-config".to_owned()), (String::new(), "remember-sync".to_owned())],
        "{plan:#}"
    );
    assert_eq!(plan["steps"][0]["value"], r#"FIRST 1 ("node1", "node2")"#, "{plan:#}");
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2", "--dry-run"]);
    assert!(out.stdout.starts_with("plan (dry run, nothing changed)"), "{out}");
    assert_eq!(one(primary, "show synchronous_standby_names").await, "");

    // FIRST 1: node1 confirms each commit, node2 takes over if it goes.
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let want = streaming(&[("node1", "sync"), ("node2", "potential")]);
    assert_eq!(
        primary_view(primary).await,
        (r#"FIRST 1 ("node1", "node2")"#.to_owned(), want.clone())
    );
    assert_eq!(reported_states(&json(&out)), want, "{out}");
    let out = pgfleet(&fleet, &["sync", "show", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let show = json(&out);
    assert_eq!(show["primary"], "node0", "{show:#}");
    assert_eq!(
        show["synchronous_standby_names"], r#"FIRST 1 ("node1", "node2")"#,
        "{show:#}"
    );
    assert_eq!(show["spec"]["method"], "first", "{show:#}");
    assert_eq!(show["spec"]["num_sync"], 1, "{show:#}");
    assert_eq!(
        show["spec"]["names"],
        serde_json::json!(["node1", "node2"]),
        "{show:#}"
    );
    assert_eq!(reported_states(&show), want, "{show:#}");
    // The table for people says the same.
    let out = pgfleet(&fleet, &["sync", "show"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains(r#"'FIRST 1 ("node1", "node2")'"#),
        "{out}"
    );
    for (name, state) in [("node1", "sync"), ("node2", "potential")] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"));
        assert!(line.split_whitespace().any(|w| w == state), "{line:?}");
    }

    // ANY 1: a quorum of one out of both.
    let out = pgfleet(
        &fleet,
        &["sync", "set", "--method", "any", "node1", "node2", "--json"],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let want = streaming(&[("node1", "quorum"), ("node2", "quorum")]);
    assert_eq!(
        primary_view(primary).await,
        (r#"ANY 1 ("node1", "node2")"#.to_owned(), want.clone())
    );
    let show = json(&pgfleet(&fleet, &["sync", "show", "--json"]));
    assert_eq!(show["spec"]["method"], "any", "{show:#}");
    assert_eq!(reported_states(&show), want, "{show:#}");

    // FIRST 2: both confirm.
    let out = pgfleet(&fleet, &["sync", "set", "--num", "2", "node2", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        primary_view(primary).await,
        (
            r#"FIRST 2 ("node2", "node1")"#.to_owned(),
            streaming(&[("node1", "sync"), ("node2", "sync")])
        )
    );

    // Invalid requests are refused before anything changes.
    let before = primary_view(primary).await;
    let auto_before =
        std::fs::read_to_string(primary.data_dir().join("postgresql.auto.conf")).unwrap();
    for (args, code, says) in [
        (&["sync", "set", "node1", "node9"][..], Some(2), "node9"),
        (
            &["sync", "set", "--num", "3", "node1", "node2"][..],
            Some(2),
            "3",
        ),
        (&["sync", "set", "--num", "0", "node1"][..], Some(2), "0"),
        (&["sync", "set", "node1", "node1"][..], Some(2), "twice"),
        (&["sync", "set"][..], Some(2), "--off"),
        (&["sync", "set", "node0", "node1"][..], None, "primary"),
    ] {
        let out = pgfleet(&fleet, args);
        match code {
            Some(c) => assert_eq!(out.code(), Some(c), "{out}"),
            None => assert!(!out.success(), "{out}"),
        }
        assert!(
            out.stderr.contains(says),
            "{args:?} should say {says:?}:\n{out}"
        );
        assert_eq!(primary_view(primary).await, before, "after {args:?}");
    }
    let auto_after =
        std::fs::read_to_string(primary.data_dir().join("postgresql.auto.conf")).unwrap();
    assert_eq!(auto_after, auto_before);

    // --off: asynchronous again, the setting empty.
    let out = pgfleet(&fleet, &["sync", "set", "--off", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let want = streaming(&[("node1", "async"), ("node2", "async")]);
    assert_eq!(primary_view(primary).await, (String::new(), want.clone()));
    let show = json(&pgfleet(&fleet, &["sync", "show", "--json"]));
    assert_eq!(show["synchronous_standby_names"], "", "{show:#}");
    assert_eq!(reported_states(&show), want, "{show:#}");
    // --off with names is a usage error.
    let out = pgfleet(&fleet, &["sync", "set", "--off", "node1"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert_eq!(primary_view(primary).await, (String::new(), want));
}

/// The operations in `<state_dir>/main.journal` that began but never
/// recorded an end, with their kind: to a reader (and to a resume after a
/// crash, DESIGN.md invariant 7) they look interrupted.
fn unended_operations(fleet: &TestFleet) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(fleet.state_dir().join("main.journal")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    lines
        .iter()
        .filter(|l| l["step"] == "begin")
        .filter(|b| {
            !lines
                .iter()
                .any(|l| l["op"] == b["op"] && l["step"] == "end")
        })
        .map(|b| {
            (
                b["op"].as_str().unwrap_or_default().to_owned(),
                b["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_journaled_operation_records_its_end() {
    let fleet = TestFleet::new(2).unwrap();
    common::start_primary(&fleet, 0);
    common::start_agents(&fleet);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    // Refused: node0 is the primary.
    let out = pgfleet(&fleet, &["sync", "set", "node0"]);
    assert!(!out.success(), "{out}");
    let unended = unended_operations(&fleet);
    assert!(
        unended.is_empty(),
        "operations journaled without an end (id, what): {unended:?}"
    );
}

/// Application names reach synchronous_standby_names and primary_conninfo:
/// anything but a node name of the inventory is refused before any agent
/// is called (here there is none to call).
#[test]
fn injection_in_standby_names_is_refused_before_any_call() {
    let dir = std::env::temp_dir().join(format!("pgfleet-sync-inj-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inv = dir.join("inventory.toml");
    std::fs::write(
        &inv,
        format!(
            "state_dir = \"{}\"\n[[clusters]]\nname = \"main\"\n[[clusters.nodes]]\nname = \"node0\"\n\
             agent = \"https://127.0.0.1:1\"\nhost = \"127.0.0.1\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    for bad in ["x\"); drop table t; --", "node0\", \"*", "Node0", "a b"] {
        let out = std::process::Command::new(pgfleet_tests::bin_path("pgfleet").unwrap())
            .args(["--inventory", inv.to_str().unwrap(), "sync", "set", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("invalid"), "{bad:?}: {stderr}");
        // Refused before the cluster lock was even taken.
        assert!(!dir.join("state").join("main.journal").exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
