//! `pgfleet switchover`, `pgfleet failover` and `pgfleet rejoin`, end to
//! end: real PostgreSQL servers, real agents in their own network
//! namespaces and the real CLI, checked against what PostgreSQL itself
//! reports (pg_is_in_recovery(), pg_stat_replication, pg_replication_slots,
//! the rows a client committed) and what is on disk (standby.signal, the
//! journal). DESIGN.md, "Safety invariants" 5-7: no acknowledged commit
//! lost, never two writable primaries, one operation per cluster at a time,
//! every step journaled; and every refusal changes nothing.
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::writer::{Writer, assert_rows_present};
use common::{exec, json, one, pgfleet, rows, senders, wait_replayed};
use nix::fcntl::{Flock, FlockArg};
use pgfleet_proto::Lsn;
use pgfleet_tests::{AgentOptions, CliOutput, Host, Layout, TestFleet};
use serde_json::Value;

/// The five-switchover tests time the gap in a client's commits (under a
/// second) on a 2-core machine: they run alone in this binary, the other
/// tests of which (real servers, switchovers, rebuilds) would otherwise
/// take the CPU they are timed on. Every other test holds this shared.
static TIMED: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------
// Fleets and what PostgreSQL reports

/// Three hosts: node0 a fresh primary, node1 and node2 built from it by
/// `pgfleet rebuild` (application_name and slot = node name, a lasting
/// passfile), every agent running, and a table `acks` on the primary.
async fn primary_and_two_rebuilt_standbys() -> TestFleet {
    primary_and_rebuilt_standbys(3).await
}

/// Like [`primary_and_two_rebuilt_standbys`] with `hosts` hosts.
async fn primary_and_rebuilt_standbys(hosts: usize) -> TestFleet {
    primary_and_rebuilt_standbys_on(hosts, Layout::Initdb).await
}

/// Like [`primary_and_rebuilt_standbys`] on hosts laid out as `layout`. A
/// Debian host's cluster exists before its rebuild (its configuration
/// under /etc/postgresql is what a DBA's pg_createcluster left), as on a
/// real Debian machine.
async fn primary_and_rebuilt_standbys_on(hosts: usize, layout: Layout) -> TestFleet {
    let fleet = TestFleet::with_layout(hosts, layout).unwrap();
    if layout == Layout::Debian {
        for h in &fleet.hosts()[1..] {
            h.initdb().unwrap();
        }
    }
    common::start_primary(&fleet, 0);
    common::start_agents(&fleet);
    for h in &fleet.hosts()[1..] {
        let out = pgfleet(&fleet, &["rebuild", &h.node_name(), "--no-progress-bar"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    exec(fleet.host(0), "create table acks (id bigint primary key)").await;
    fleet
}

/// Stops `standby`'s WAL receiver (no primary_conninfo) and waits until
/// `primary` no longer lists it: from now on it falls behind.
async fn stop_receiving(primary: &Host, standby: &Host) {
    exec(standby, "alter system set primary_conninfo = ''").await;
    exec(standby, "select pg_reload_conf()").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while senders(primary)
        .await
        .iter()
        .any(|s| s.0 == standby.node_name())
    {
        assert!(
            Instant::now() < deadline,
            "{}'s WAL sender stays",
            standby.node_name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host named `node{i}`.
fn host<'a>(fleet: &'a TestFleet, name: &str) -> &'a Host {
    fleet
        .hosts()
        .iter()
        .find(|h| h.node_name() == name)
        .unwrap_or_else(|| panic!("no host {name}"))
}

/// Whether the postmaster named in `host`'s postmaster.pid runs (a stale
/// pid file after a SIGKILL does not count).
fn server_runs(host: &Host) -> bool {
    let Some(pid) = host.postmaster_pid().unwrap() else {
        return false;
    };
    host.processes().unwrap().iter().any(|(p, _)| *p == pid)
}

/// "primary", "standby" (pg_is_in_recovery()) or "down".
async fn role(host: &Host) -> &'static str {
    if !server_runs(host) {
        return "down";
    }
    match one(host, "select pg_is_in_recovery()").await.as_str() {
        "f" => "primary",
        "t" => "standby",
        other => panic!("pg_is_in_recovery() = {other:?}"),
    }
}

/// The nodes that run as primaries.
async fn primaries(fleet: &TestFleet) -> Vec<String> {
    let mut v = Vec::new();
    for h in fleet.hosts() {
        if role(h).await == "primary" {
            v.push(h.node_name());
        }
    }
    v
}

/// A primary's timeline, from the name of its current WAL file.
async fn timeline(primary: &Host) -> u64 {
    one(
        primary,
        "select ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8",
    )
    .await
    .parse()
    .unwrap()
}

/// Waits (up to 60 s) until `standby` streams from `primary`, seen from
/// both ends and steadily (three looks 200 ms apart): `primary`'s
/// pg_stat_replication lists it by node name as streaming, and its own
/// pg_stat_wal_receiver streams from `primary`'s address. (A standby whose
/// timeline forked off before its own WAL ends reconnects every 5 s and
/// shows as streaming for a moment each time; that must not count.)
async fn wait_streams_from(primary: &Host, standby: &Host) {
    let name = standby.node_name();
    let receiver_sql = "select status, sender_host from pg_stat_wal_receiver";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut steady = 0;
    loop {
        let sending = senders(primary).await;
        let receiving = rows(standby, receiver_sql).await;
        let ok = sending
            .iter()
            .any(|(n, s, _)| *n == name && s == "streaming")
            && receiving.iter().any(|r| {
                r[0].as_deref() == Some("streaming")
                    && r[1].as_deref() == Some(primary.addr().to_string().as_str())
            });
        steady = if ok { steady + 1 } else { 0 };
        if steady == 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} does not stream from {} within 60 s: its WAL senders {sending:?}, \
             {name}'s WAL receiver {receiving:?}",
            primary.node_name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts that each of `standbys` is in recovery and streams from
/// `primary` (see [`wait_streams_from`]).
async fn assert_streaming(primary: &Host, standbys: &[&Host]) {
    for s in standbys {
        assert_eq!(role(s).await, "standby", "{}", s.node_name());
        wait_streams_from(primary, s).await;
    }
}

/// Slots that are not in use, on every running server.
async fn inactive_slots(fleet: &TestFleet) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for h in fleet.hosts().iter().filter(|h| server_runs(h)) {
        for r in rows(
            h,
            "select slot_name from pg_replication_slots where not active",
        )
        .await
        {
            v.push((h.node_name(), r[0].clone().unwrap_or_default()));
        }
    }
    v
}

/// What a refused command must leave as it was: per node its role, what
/// it serves, its postgresql.auto.conf and standby.signal.
#[derive(Debug, PartialEq)]
struct NodeState {
    name: String,
    role: &'static str,
    primary: Option<PrimaryState>,
    auto_conf: String,
    standby_signal: bool,
}

#[derive(Debug, PartialEq)]
struct PrimaryState {
    timeline: u64,
    synchronous_standby_names: String,
    /// `(application_name, state, sync_state)`.
    senders: Vec<(String, String, String)>,
}

async fn snapshot(fleet: &TestFleet) -> Vec<NodeState> {
    let mut v = Vec::new();
    for h in fleet.hosts() {
        let role = role(h).await;
        let primary = if role == "primary" {
            Some(PrimaryState {
                timeline: timeline(h).await,
                synchronous_standby_names: one(h, "show synchronous_standby_names").await,
                senders: senders(h).await,
            })
        } else {
            None
        };
        v.push(NodeState {
            name: h.node_name(),
            role,
            primary,
            auto_conf: std::fs::read_to_string(h.data_dir().join("postgresql.auto.conf"))
                .unwrap_or_default(),
            standby_signal: h.data_dir().join("standby.signal").exists(),
        });
    }
    v
}

/// Runs `args`, expects exit `code` and stderr mentioning each of `says`,
/// and checks that the fleet is as it was before.
async fn refused(fleet: &TestFleet, args: &[&str], code: i32, says: &[&str]) -> CliOutput {
    let before = snapshot(fleet).await;
    let out = pgfleet(fleet, args);
    assert_eq!(out.code(), Some(code), "{args:?}:\n{out}");
    for s in says {
        assert!(
            out.stderr.contains(s),
            "{args:?} should mention {s:?}:\n{out}"
        );
    }
    assert_eq!(snapshot(fleet).await, before, "{args:?} changed the fleet");
    out
}

/// `(host, step)` of a `--dry-run --json` plan.
fn plan_steps(out: &CliOutput) -> Vec<(String, String)> {
    let v = json(out);
    assert_eq!(v["dry_run"], true, "{out}");
    v["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in {out}"))
        .iter()
        .map(|s| {
            (
                s["host"].as_str().unwrap().to_owned(),
                s["step"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The steps an operation ran, in order, as `(host, step)`: from its
/// result, and from its journal, whose lines name each step's index in the
/// journaled plan. Both must be the plan the dry run showed.
fn assert_ran_as_planned(fleet: &TestFleet, result: &serde_json::Value, planned: &[(String, String)]) {
    let ran: Vec<(String, String)> = result["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in {result:#}"))
        .iter()
        .map(|s| (s["host"].as_str().unwrap().to_owned(), s["step"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(ran, planned, "the steps executed are not the steps planned");
    let id = result["operation"].as_str().unwrap();
    let out = pgfleet(fleet, &["ops", "show", id, "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let journal = json(&out);
    let started: Vec<(String, String)> = journal["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "start" || e["event"] == "skipped")
        .filter_map(|e| {
            let i = e["index"].as_u64()? as usize;
            let (host, step) = planned.get(i).unwrap_or_else(|| panic!("index {i} beyond the plan: {e}"));
            assert_eq!(e["step"], step.as_str(), "journal line {e} is not step {i} of the plan");
            Some((host.clone(), step.clone()))
        })
        .collect();
    assert_eq!(started, planned, "the journal's steps are not the steps planned: {journal:#}");
    // For people, `ops show` lists the plan's steps under its title.
    let out = pgfleet(fleet, &["ops", "show", id]);
    assert_eq!(out.code(), Some(0), "{out}");
    for (host, step) in planned {
        assert!(out.stdout.contains(&format!("] {step}: ")) && out.stdout.contains(&format!("[{host}]")), "{out}");
    }
}

fn position(steps: &[(String, String)], host: &str, step: &str) -> usize {
    steps
        .iter()
        .position(|(h, s)| h == host && s == step)
        .unwrap_or_else(|| panic!("no step {step} on {host} in {steps:?}"))
}

/// The LSN up to which a standby received WAL.
async fn received(standby: &Host) -> Lsn {
    Lsn::parse(&one(standby, "select pg_last_wal_receive_lsn()").await).unwrap()
}

/// The journal lines of operation `op`.
fn journal(fleet: &TestFleet, op: &str) -> Vec<Value> {
    let path = fleet.state_dir().join("main.journal");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .filter(|v| v["op"] == op)
        .collect()
}

/// Takes the cluster's lock as a running pgfleet operation would (flock on
/// `<state_dir>/main.lock`, its description inside), until dropped.
fn hold_cluster_lock(fleet: &TestFleet) -> Flock<std::fs::File> {
    std::fs::create_dir_all(fleet.state_dir()).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(fleet.state_dir().join("main.lock"))
        .unwrap();
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    lock.set_len(0).unwrap();
    lock.write_all(b"test-operation (held by the test)\n")
        .unwrap();
    lock
}

// ---------------------------------------------------------------------------
// Switchover

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_back_repeatedly_loses_no_acknowledged_commit() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let writer = Writer::start(&fleet);
    writer.wait_for_more(20).await;

    // --dry-run: the plan, and nothing changes.
    let before = snapshot(&fleet).await;
    let out = pgfleet(&fleet, &["switchover", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let steps = plan_steps(&out);
    let fence = position(&steps, "node0", "fence");
    let catch_up = position(&steps, "node1", "catch-up");
    let promote = position(&steps, "node1", "promote");
    let follow_old = position(&steps, "node0", "follow");
    let follow_other = position(&steps, "node2", "follow");
    assert!(
        fence < catch_up && catch_up < promote && promote < follow_old && promote < follow_other,
        "{steps:?}"
    );
    let out = pgfleet(&fleet, &["switchover", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("dry run, nothing changed"), "{out}");
    for step in ["fence", "catch-up", "promote", "follow"] {
        assert!(
            out.stdout.contains(&format!("{step}:")),
            "no {step} in:\n{out}"
        );
    }
    writer.wait_for_more(5).await;
    let after = snapshot(&fleet).await;
    // The WAL senders' states stay; only rows were written meanwhile.
    assert_eq!(after, before, "a dry run changed the fleet");

    // Four switchovers, each to the synchronous standby: node1, back to
    // node0, node1, node0.
    let mut old = "node0";
    let mut tl = timeline(fleet.host(0)).await;
    for (i, new) in ["node1", "node0", "node1", "node0"].into_iter().enumerate() {
        let started = Instant::now();
        let out = pgfleet(&fleet, &["switchover", "--json"]);
        assert_eq!(out.code(), Some(0), "switchover {}:\n{out}", i + 1);
        eprintln!(
            "switchover {} took {:.2}s",
            i + 1,
            started.elapsed().as_secs_f64()
        );
        let r = json(&out);
        assert_eq!(r["old_primary"], old, "{r:#}");
        assert_eq!(r["new_primary"], new, "{r:#}");
        if i == 0 {
            assert_ran_as_planned(&fleet, &r, &steps);
        }
        let unavailable = r["write_unavailable_seconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("no write_unavailable_seconds in {r:#}"));
        assert!((0.0..30.0).contains(&unavailable), "{r:#}");
        tl += 1;
        assert_eq!(r["timeline"], tl, "{r:#}");

        assert_eq!(primaries(&fleet).await, [new]);
        let new_host = host(&fleet, new);
        assert_eq!(timeline(new_host).await, tl);
        let others: Vec<&Host> = fleet
            .hosts()
            .iter()
            .filter(|h| h.node_name() != new)
            .collect();
        assert_streaming(new_host, &others).await;
        // The old primary is the synchronous standby now (its place in the
        // list moved to it), so the next switchover goes back to it.
        let now = senders(new_host).await;
        assert!(
            now.contains(&(old.to_owned(), "streaming".into(), "sync".into())),
            "pg_stat_replication on {new}: {now:?}"
        );
        assert_eq!(
            one(new_host, "show synchronous_standby_names").await,
            format!(r#"FIRST 1 ("{old}", "node2")"#)
        );
        // The client writes to the new primary.
        writer.wait_for_more(10).await;

        if i == 0 {
            // Every step journaled, in order, under the operation's id.
            let op = r["operation"].as_str().unwrap();
            let lines = journal(&fleet, op);
            let steps: Vec<(String, String)> = lines
                .iter()
                .map(|l| {
                    (
                        l["step"].as_str().unwrap().to_owned(),
                        l["event"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            let at = |step: &str, event: &str| {
                steps
                    .iter()
                    .position(|(s, e)| s == step && e == event)
                    .unwrap_or_else(|| panic!("no {step} {event} for {op} in {steps:?}"))
            };
            assert_eq!(at("begin", "started"), 0, "{steps:?}");
            assert_eq!(at("end", "succeeded"), steps.len() - 1, "{steps:?}");
            let order = [
                at("fence", "start"),
                at("fence", "done"),
                at("catch-up", "start"),
                at("catch-up", "done"),
                at("promote", "start"),
                at("promote", "done"),
                at("follow", "start"),
                at("follow", "done"),
            ];
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
            assert!(
                lines
                    .iter()
                    .all(|l| l["kind"] == "switchover" && l["cluster"] == "main"),
                "{lines:?}"
            );
        }
        old = new;
    }
    writer.wait_for_more(20).await;
    let (acked, uncertain) = writer.finish().await;
    eprintln!(
        "{} acknowledged commits, {} uncertain",
        acked.len(),
        uncertain.len()
    );

    // Every acknowledged row is on the final primary, and on its standbys.
    let primary = fleet.host(0);
    assert_rows_present(primary, &acked, &uncertain).await;
    for standby in [fleet.host(1), fleet.host(2)] {
        wait_replayed(primary, standby).await;
        assert_rows_present(standby, &acked, &uncertain).await;
    }
    // No slot left behind to retain WAL.
    let left = inactive_slots(&fleet).await;
    assert!(left.is_empty(), "inactive slots (node, slot): {left:?}");
    let slots: Vec<String> = rows(
        primary,
        "select slot_name from pg_replication_slots order by 1",
    )
    .await
    .into_iter()
    .map(|r| r[0].clone().unwrap())
    .collect();
    assert_eq!(slots, ["node1", "node2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_refusals_change_nothing_and_rejoin_restarts_a_stopped_standby() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let (primary, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));

    refused(&fleet, &["switchover", "--to", "node9"], 2, &["node9"]).await;
    refused(
        &fleet,
        &["switchover", "--to", "node0"],
        1,
        &["already the primary"],
    )
    .await;

    // Another operation holds the cluster's lock.
    {
        let _lock = hold_cluster_lock(&fleet);
        let busy = ["another operation is running", "test-operation"];
        refused(&fleet, &["switchover"], 1, &busy).await;
        refused(&fleet, &["switchover", "--to", "node2"], 1, &busy).await;
        refused(&fleet, &["sync", "set", "node1"], 1, &busy).await;
    }

    // WAL replay paused on the candidate.
    exec(node1, "select pg_wal_replay_pause()").await;
    exec(primary, "create table nudge (x int)").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while one(node1, "select pg_get_wal_replay_pause_state()").await != "paused" {
        assert!(Instant::now() < deadline, "node1 never paused");
        // Replay pauses at the next record it reads.
        exec(primary, "insert into nudge values (1)").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refused(
        &fleet,
        &["switchover", "--to", "node1"],
        1,
        &["node1", "paused"],
    )
    .await;
    exec(node1, "select pg_wal_replay_resume()").await;

    // A follower with a lower max_connections than the candidate would not
    // start as its standby.
    exec(node1, "alter system set max_connections = 150").await;
    node1.stop_postgres().unwrap();
    node1.start_postgres().unwrap();
    fleet.wait_streaming(1, 0).await.unwrap();
    refused(
        &fleet,
        &["switchover", "--to", "node1"],
        1,
        &["max_connections", "node0", "150"],
    )
    .await;
    exec(node1, "alter system reset max_connections").await;
    node1.stop_postgres().unwrap();
    node1.start_postgres().unwrap();
    fleet.wait_streaming(1, 0).await.unwrap();

    // A candidate that does not stream.
    node2.stop_postgres().unwrap();
    refused(
        &fleet,
        &["switchover", "--to", "node2"],
        1,
        &["node2", "not streaming"],
    )
    .await;

    // Not while another operation runs.
    {
        let _lock = hold_cluster_lock(&fleet);
        refused(
            &fleet,
            &["rejoin", "node2"],
            1,
            &["another operation is running"],
        )
        .await;
    }

    // rejoin: a stopped standby on the primary's timeline is just started
    // again, pointed at the primary (no pg_rewind).
    let out = pgfleet(&fleet, &["rejoin", "node2", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    assert_eq!(r["method"], "restart", "{r:#}");
    assert_eq!(r["primary"], "node0", "{r:#}");
    assert_streaming(primary, &[node1, node2]).await;
    assert_eq!(primaries(&fleet).await, ["node0"]);
    // Already streaming: nothing to do.
    let out = pgfleet(&fleet, &["rejoin", "node2", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(json(&out)["method"], "already-streaming", "{out}");

    // The primary is not rejoined to anything; an unknown node is a usage error.
    refused(&fleet, &["rejoin", "node0"], 1, &["node0", "primary"]).await;
    refused(&fleet, &["rejoin", "node9"], 2, &["node9"]).await;
    // Nor is a running primary failed over.
    refused(&fleet, &["failover"], 1, &["switchover"]).await;
    refused(
        &fleet,
        &["failover", "--accept-data-loss"],
        1,
        &["switchover"],
    )
    .await;

    // After all that, a switchover works.
    let out = pgfleet(&fleet, &["switchover", "--to", "node2", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(primaries(&fleet).await, ["node2"]);
    assert_streaming(node2, &[primary, node1]).await;
}

// ---------------------------------------------------------------------------
// Failover

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_primary_sigkill_keeps_every_acknowledged_commit_then_rejoin_rewinds() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let writer = Writer::start(&fleet);
    writer.wait_for_more(20).await;

    // node2 stops receiving (its WAL receiver has nowhere to connect): it
    // falls behind while node1, the synchronous standby, confirms commits.
    stop_receiving(node0, node2).await;
    writer.wait_for_more(30).await;

    // The primary's host dies mid-write.
    node0.kill_postgres().unwrap();
    let (r1, r2) = (received(node1).await, received(node2).await);
    assert!(r2 < r1, "node2 received {r2}, node1 {r1}");

    // node2 lacks commits node1 confirmed: refused, and it says by how much.
    refused(
        &fleet,
        &["failover", "--to", "node2"],
        1,
        &["node1", "--accept-data-loss", "behind"],
    )
    .await;

    // --dry-run: fence node0, promote node1, re-point node2; nothing changes.
    let before = snapshot(&fleet).await;
    let out = pgfleet(&fleet, &["failover", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let steps = plan_steps(&out);
    assert!(
        position(&steps, "node0", "fence") < position(&steps, "node1", "promote")
            && position(&steps, "node1", "promote") < position(&steps, "node2", "follow"),
        "{steps:?}"
    );
    assert_eq!(snapshot(&fleet).await, before);

    let out = pgfleet(&fleet, &["failover", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    assert_eq!(r["old_primary"], "node0", "{r:#}");
    assert_eq!(r["new_primary"], "node1", "{r:#}");
    assert_eq!(r["timeline"], 2, "{r:#}");
    assert_ran_as_planned(&fleet, &r, &steps);
    assert_eq!(primaries(&fleet).await, ["node1"]);
    // The old primary is fenced: down, and a standby should anything start it.
    assert_eq!(role(node0).await, "down");
    assert!(node0.data_dir().join("standby.signal").exists());
    // node2 follows node1 and is its synchronous standby now.
    assert_streaming(node1, &[node2]).await;
    assert_eq!(
        one(node1, "show synchronous_standby_names").await,
        r#"FIRST 1 ("node2")"#
    );
    writer.wait_for_more(20).await;
    let (acked, uncertain) = writer.finish().await;
    eprintln!(
        "{} acknowledged commits, {} uncertain",
        acked.len(),
        uncertain.len()
    );
    assert_rows_present(node1, &acked, &uncertain).await;
    wait_replayed(node1, node2).await;
    assert_rows_present(node2, &acked, &uncertain).await;

    // A second failover has no lost primary to replace.
    refused(&fleet, &["failover"], 1, &["switchover"]).await;

    // rejoin --dry-run says it would rewind, and changes nothing.
    let before = snapshot(&fleet).await;
    let out = pgfleet(&fleet, &["rejoin", "node0", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("pg_rewind"), "{out}");
    let out = pgfleet(&fleet, &["rejoin", "node0", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let rejoin_plan = plan_steps(&out);
    assert!(
        position(&rejoin_plan, "node1", "admit") < position(&rejoin_plan, "node0", "fence")
            && position(&rejoin_plan, "node0", "fence") < position(&rejoin_plan, "node0", "rewind")
            && position(&rejoin_plan, "node0", "rewind") < position(&rejoin_plan, "node0", "follow"),
        "{rejoin_plan:?}"
    );
    assert_eq!(snapshot(&fleet).await, before);

    // rejoin: node0 crashed on timeline 1 and may hold WAL node1 never got;
    // pg_rewind (wal_log_hints is on) makes it a standby of node1.
    //
    // The CHECKPOINT works around a bug (see
    // rejoin_right_after_failover_rewinds_the_diverged_old_primary): until
    // the promoted node's first checkpoint, its pg_control still names
    // timeline 1 and pg_rewind rewinds nothing.
    exec(node1, "checkpoint").await;
    let out = pgfleet(&fleet, &["rejoin", "node0", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    assert_eq!(r["method"], "rewind", "{r:#}");
    assert_eq!(r["primary"], "node1", "{r:#}");
    assert_ran_as_planned(&fleet, &r, &rejoin_plan);
    assert_streaming(node1, &[node0, node2]).await;
    assert_eq!(primaries(&fleet).await, ["node1"]);
    wait_replayed(node1, node0).await;
    assert_rows_present(node0, &acked, &uncertain).await;
    let left = inactive_slots(&fleet).await;
    assert!(left.is_empty(), "inactive slots (node, slot): {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_right_after_failover_rewinds_the_diverged_old_primary() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_rebuilt_standbys(2).await;
    let (node0, node1) = (fleet.host(0), fleet.host(1));
    exec(node0, "insert into acks select generate_series(1, 10)").await;
    wait_replayed(node0, node1).await;
    // node0 goes on alone: rows 11-20 and their WAL exist only there.
    stop_receiving(node0, node1).await;
    exec(node0, "insert into acks select generate_series(11, 20)").await;
    node0.kill_postgres().unwrap();

    let out = pgfleet(&fleet, &["failover", "--accept-data-loss", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(json(&out)["new_primary"], "node1", "{out}");

    // At once, as an operator would. (The rejoin's own wait for streaming
    // is 60 s, as long as the harness gives a CLI run: wait longer here so
    // that its error is seen.)
    let out = fleet
        .pgfleet_spawn(&["rejoin", "node0", "--json"])
        .unwrap()
        .wait(Duration::from_secs(120))
        .unwrap();
    eprintln!("$ pgfleet rejoin node0 --json\n{out}");
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    assert_eq!(r["method"], "rewind", "{r:#}");
    assert!(
        !out.stderr.contains("no rewind required"),
        "node0 has WAL node1 never had, yet pg_rewind found nothing to do:\n{out}"
    );
    assert_streaming(node1, &[node0]).await;
    wait_replayed(node1, node0).await;
    // node0 took node1's history: rows 11-20 are gone from it.
    assert_eq!(one(node0, "select count(*) from acks").await, "10");
    assert_eq!(one(node0, "select max(id) from acks").await, "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_only_asynchronous_standbys_needs_accept_data_loss() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let node0 = fleet.host(0);
    exec(node0, "insert into acks select generate_series(1, 100)").await;
    wait_replayed(node0, fleet.host(1)).await;
    wait_replayed(node0, fleet.host(2)).await;

    node0.kill_postgres().unwrap();
    refused(&fleet, &["failover", "--to", "node9"], 2, &["node9"]).await;
    let out = refused(
        &fleet,
        &["failover"],
        1,
        &["acknowledged commit", "--accept-data-loss", "synchronous"],
    )
    .await;
    // ... and how many bytes would go.
    let says_bytes = out
        .stderr
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0].parse::<f64>().is_ok() && ["B", "KiB", "MiB", "GiB"].contains(&w[1]));
    assert!(says_bytes, "no byte count in:\n{out}");
    for h in [fleet.host(1), fleet.host(2)] {
        assert_eq!(role(h).await, "standby");
    }

    // The plan with --accept-data-loss changes nothing either.
    let before = snapshot(&fleet).await;
    let out = pgfleet(
        &fleet,
        &["failover", "--accept-data-loss", "--dry-run", "--json"],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let steps = plan_steps(&out);
    assert!(steps.iter().any(|s| s.1 == "promote"), "{steps:?}");
    assert_eq!(snapshot(&fleet).await, before);

    let out = pgfleet(&fleet, &["failover", "--accept-data-loss", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    let new = r["new_primary"].as_str().unwrap().to_owned();
    assert!(new == "node1" || new == "node2", "{r:#}");
    assert_eq!(primaries(&fleet).await, [new.as_str()]);
    assert!(
        r["warnings"].to_string().contains("accept-data-loss"),
        "{r:#}"
    );
    let other = if new == "node1" { "node2" } else { "node1" };
    assert_streaming(host(&fleet, &new), &[host(&fleet, other)]).await;
    assert_eq!(role(node0).await, "down");
    assert!(node0.data_dir().join("standby.signal").exists());
    // What both standbys had replayed is there.
    assert_eq!(
        one(host(&fleet, &new), "select count(*) from acks").await,
        "100"
    );
    // The journal says the loss was accepted.
    let op = r["operation"].as_str().unwrap();
    assert!(
        journal(&fleet, op)
            .iter()
            .any(|l| l["event"] == "data-loss-accepted"),
        "{:?}",
        journal(&fleet, op)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_old_primary_agent_unreachable_isolates_it() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    let out = pgfleet(
        &fleet,
        &["sync", "set", "--method", "any", "node1", "node2"],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;

    // The whole host is gone: agent and server.
    node0.kill_agent().unwrap();
    node0.kill_postgres().unwrap();
    let (r1, r2) = (received(node1).await, received(node2).await);

    // Nobody can fence node0 through its agent, so the plan isolates it:
    // the other quorum standby is re-pointed at the candidate before the
    // candidate is promoted (with ANY 1 and no standby left, node0 could
    // acknowledge nothing even if it ran). With --fenced, the operator's
    // word stands in for that.
    let out = pgfleet(&fleet, &["failover", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let steps = plan_steps(&out);
    let isolate = position(&steps, "node0", "isolate");
    assert!(steps.iter().all(|(_, s)| s != "fence"), "{steps:?}");
    let candidate = steps.iter().find(|(_, s)| s == "promote").map(|(n, _)| n.clone()).unwrap();
    assert!(isolate < position(&steps, &candidate, "promote"), "{steps:?}");
    let out = pgfleet(&fleet, &["failover", "--fenced", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("--fenced says the operator made sure it is down"), "{out}");

    let out = pgfleet(&fleet, &["failover", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    let new = r["new_primary"].as_str().unwrap().to_owned();
    assert_eq!(new, candidate, "{r:#}");
    let best = if r1 > r2 { "node1" } else { "node2" };
    if r1 != r2 {
        assert_eq!(new, best, "node1 received {r1}, node2 {r2}: {r:#}");
    }
    assert_eq!(primaries(&fleet).await, [new.as_str()]);
    let other = if new == "node1" { node2 } else { node1 };
    // The journal has the isolation done, with the re-pointed standby
    // streaming from the candidate, before the promotion.
    let op = r["operation"].as_str().unwrap();
    let lines = journal(&fleet, op);
    let at = |step: &str| lines.iter().position(|l| l["step"] == step && l["event"] == "done");
    let isolated = at("isolate").unwrap_or_else(|| panic!("{lines:?}"));
    assert!(isolated < at("promote").unwrap(), "{lines:?}");
    let said = lines[isolated]["detail"].as_str().unwrap();
    assert!(said.contains(&format!("{} streams from {new}", other.node_name())), "{said}");
    assert_streaming(host(&fleet, &new), &[other]).await;
    writer.wait_for_more(20).await;
    let (acked, uncertain) = writer.finish().await;
    let new_host = host(&fleet, &new);
    assert_rows_present(new_host, &acked, &uncertain).await;
    // Nobody could fence node0: its data directory is as the crash left it.
    assert_eq!(role(node0).await, "down");
    assert!(!node0.data_dir().join("standby.signal").exists());

    // The host comes back (its agent, not its server): rejoin fences it and
    // rewinds it into a standby of the new primary. (CHECKPOINT: see
    // rejoin_right_after_failover_rewinds_the_diverged_old_primary.)
    node0.start_agent().unwrap();
    exec(new_host, "checkpoint").await;
    let out = pgfleet(&fleet, &["rejoin", "node0", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(json(&out)["method"], "rewind", "{out}");
    assert_streaming(new_host, &[node0, other]).await;
    assert_eq!(primaries(&fleet).await, [new.as_str()]);
    wait_replayed(new_host, node0).await;
    assert_rows_present(node0, &acked, &uncertain).await;
}

/// An asynchronous cluster whose old primary's host is gone: cutting its
/// standbys off would not stop its commits, so pgfleet can neither fence
/// nor isolate it and refuses, naming --fenced; with the operator's word
/// (and the loss accepted) it fails over, journaling the fence as skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_of_an_asynchronous_cluster_whose_old_primary_is_gone_needs_fenced() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    exec(node0, "create table t (id int); insert into t select generate_series(1, 100)").await;
    wait_replayed(node0, node1).await;
    wait_replayed(node0, node2).await;
    node0.kill_agent().unwrap();
    node0.kill_postgres().unwrap();

    for args in [&["failover"][..], &["failover", "--accept-data-loss"]] {
        refused(&fleet, args, 1, &["--fenced", "synchronous replication"]).await;
    }

    let out = pgfleet(&fleet, &["failover", "--fenced", "--accept-data-loss", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    let new = r["new_primary"].as_str().unwrap().to_owned();
    assert_eq!(primaries(&fleet).await, [new.as_str()]);
    let op = r["operation"].as_str().unwrap();
    assert!(
        journal(&fleet, op)
            .iter()
            .any(|l| l["step"] == "fence" && l["event"] == "skipped"),
        "{:?}",
        journal(&fleet, op)
    );
    let other = if new == "node1" { node2 } else { node1 };
    assert_streaming(host(&fleet, &new), &[other]).await;
    assert_eq!(one(host(&fleet, &new), "select count(*) from t").await, "100");
    assert_eq!(role(node0).await, "down");
}

// ---------------------------------------------------------------------------
// A fleet as it really is (issue: switchover on an initdb'd primary whose
// standbys' pg_hba.conf never admitted anyone)

/// The lines of `host`'s pg_hba.conf as PostgreSQL parsed them.
async fn hba_rules(host: &Host) -> Vec<String> {
    rows(
        host,
        "select type || ' ' || array_to_string(database, ',') || ' ' || array_to_string(user_name, ',') \
         || ' ' || coalesce(address, '') || ' ' || auth_method from pg_hba_file_rules where error is null",
    )
    .await
    .into_iter()
    .map(|r| r[0].clone().unwrap_or_default())
    .collect()
}

/// Rebuild two replicas of an initdb'd primary, `sync set` one, then five
/// switchovers back and forth under a client committing every 10 ms: every
/// switchover exits 0, writes come back within a second each time, no
/// acknowledged row is lost, and every standby streams afterwards, from a
/// primary whose own pg_hba.conf admits each of them.
async fn five_switchovers_under_a_committing_client(layout: Layout) {
    let fleet = primary_and_rebuilt_standbys_on(3, layout).await;
    // Nothing admits replication but what pgfleet added: the test fleet is
    // not kind.
    for h in fleet.hosts() {
        let text = std::fs::read_to_string(h.hba_path()).unwrap();
        assert!(
            !text.lines().any(|l| l.starts_with("host") && l.contains("trust")),
            "{}: {text}",
            h.hba_path().display()
        );
    }
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let writer = Writer::start(&fleet);
    writer.wait_for_more(20).await;
    let mut primary = 0;
    for (round, to) in [1, 0, 1, 0, 1].into_iter().enumerate() {
        let started = Instant::now();
        let out = pgfleet(&fleet, &["switchover", "--to", &format!("node{to}"), "--json"]);
        assert_eq!(out.code(), Some(0), "switchover {} to node{to}: {out}", round + 1);
        writer.wait_for_more(20).await;
        let gap = writer.longest_gap_since(started);
        assert!(
            gap < Duration::from_secs(1),
            "switchover {}: no commit acknowledged for {gap:?}\n{out}",
            round + 1
        );
        let new = fleet.host(to);
        assert_eq!(one(new, "select pg_is_in_recovery()").await, "f");
        // Every other node streams from the new primary, which admits each
        // through a line of its own pg_hba.conf for that node's address.
        let rules = hba_rules(new).await;
        for (i, h) in fleet.hosts().iter().enumerate() {
            if i == to {
                continue;
            }
            assert_eq!(one(h, "select pg_is_in_recovery()").await, "t");
            // pg_hba_file_rules shows the address without its /32 mask.
            let line = format!("host replication pgfleet_replication {} scram-sha-256", h.addr());
            assert!(
                rules.contains(&line),
                "{} does not admit {} in its own pg_hba.conf: {rules:?}",
                new.node_name(),
                h.node_name()
            );
        }
        let streaming: Vec<String> = senders(new)
            .await
            .into_iter()
            .filter(|(_, state, _)| state == "streaming")
            .map(|(name, _, _)| name)
            .collect();
        assert_eq!(streaming.len(), 2, "{streaming:?} on {}", new.node_name());
        // No commit stuck waiting for synchronous replication. (Every
        // synchronous commit waits in SyncRep for a moment: only a wait
        // longer than a second would be a blocked write.)
        assert_eq!(
            one(
                new,
                "select count(*) from pg_stat_activity where wait_event = 'SyncRep' \
                 and now() - query_start > interval '1 second'"
            )
            .await,
            "0"
        );
        primary = to;
    }
    let (acked, uncertain) = writer.finish().await;
    assert_rows_present(fleet.host(primary), &acked, &uncertain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_five_times_on_an_initdb_fleet_blocks_no_writes() {
    let _alone = TIMED.write().await;
    five_switchovers_under_a_committing_client(Layout::Initdb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_five_times_on_debian_clusters_blocks_no_writes() {
    let _alone = TIMED.write().await;
    five_switchovers_under_a_committing_client(Layout::Debian).await;
}

/// Debian's layout end to end past the switchover: pg_hba.conf lives in
/// /etc/postgresql on every host and pg_basebackup never copies it, so
/// each new upstream admits its followers itself. Failover after a
/// postmaster SIGKILL (no acknowledged commit lost), rejoin of the old
/// primary with pg_rewind, then a rolling rebuild of every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_clusters_fail_over_rejoin_and_roll_without_losing_commits() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_rebuilt_standbys_on(3, Layout::Debian).await;
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let writer = Writer::start(&fleet);
    writer.wait_for_more(20).await;

    fleet.host(0).kill_postgres().unwrap();
    let out = pgfleet(&fleet, &["failover", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let new_name = json(&out)["new_primary"].as_str().unwrap().to_owned();
    let new = host(&fleet, &new_name);
    let other = fleet
        .hosts()
        .iter()
        .find(|h| h.index() != 0 && h.node_name() != new_name)
        .unwrap();
    assert_eq!(primaries(&fleet).await, std::slice::from_ref(&new_name));
    assert_streaming(new, &[other]).await;
    // The new primary's own file, under /etc, admits the other standby.
    let hba = std::fs::read_to_string(new.hba_path()).unwrap();
    assert!(new.hba_path().starts_with("/etc/postgresql"), "{}", new.hba_path().display());
    assert!(
        hba.contains(&format!("host replication pgfleet_replication {}/32 scram-sha-256", other.addr())),
        "{hba}"
    );
    writer.wait_for_more(20).await;

    exec(new, "checkpoint").await;
    let out = pgfleet(&fleet, &["rejoin", "node0", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(json(&out)["method"], "rewind", "{out}");
    assert_streaming(new, &[fleet.host(0), other]).await;

    // Two synchronous candidates, so either can be rebuilt in turn.
    let out = pgfleet(&fleet, &["sync", "set", "node0", &other.node_name()]);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = pgfleet(&fleet, &["rebuild", "--all-replicas", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_streaming(new, &[fleet.host(0), other]).await;
    writer.wait_for_more(20).await;

    let (acked, uncertain) = writer.finish().await;
    assert_rows_present(new, &acked, &uncertain).await;
    for h in [fleet.host(0), other] {
        wait_replayed(new, h).await;
        assert_rows_present(h, &acked, &uncertain).await;
    }
}

/// A bin_dir for an agent whose `postgres`, while `marker` exists, starts
/// with `primary_conninfo` pointing at `bad` (a port nobody listens on): a
/// standby that cannot come back, whose server log says why.
fn unreachable_upstream_bin_dir(host: &Host, dir: &Path, marker: &Path, bad: &str) {
    pgfleet_tests::host::wrapped_bin_dir(
        dir,
        host.pg_bin_dir(),
        &format!(
            "if [ -e {marker} ]; then exec \"$REAL\" \"$@\" -c \"primary_conninfo={bad}\"; fi\nexec \"$REAL\" \"$@\"",
            marker = marker.display()
        ),
    )
    .unwrap();
}

/// The policy when the only synchronous standby cannot come back: the old
/// primary cannot follow after a switchover. The switchover exits 1 within
/// its bound, naming that standby and its server log's line; pgfleet does
/// not lower synchronous replication, so commits wait (status says so);
/// once the standby can stream again (`pgfleet rejoin`), writes resume and
/// no acknowledged commit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_whose_old_primary_cannot_follow_says_why_and_keeps_commits_waiting() {
    let _shared = TIMED.read().await;
    let fleet = TestFleet::new(2).unwrap();
    let (node0, node1) = (fleet.host(0), fleet.host(1));
    let bin = node0.dir().join("bin");
    let marker = node0.dir().join("cannot-follow");
    let bad = format!("host={} port=5433 connect_timeout=2", node1.addr());
    unreachable_upstream_bin_dir(node0, &bin, &marker, &bad);
    common::start_primary(&fleet, 0);
    node0
        .start_agent_with(&AgentOptions { bin_dir: Some(bin), ..AgentOptions::default() })
        .unwrap();
    node1.start_agent().unwrap();
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    exec(node0, "create table acks (id bigint primary key)").await;
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let writer = Writer::start(&fleet);
    writer.wait_for_more(20).await;

    std::fs::write(&marker, "").unwrap();
    let started = Instant::now();
    let out = pgfleet(&fleet, &["switchover", "--to", "node1"]);
    let took = started.elapsed();
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(took < Duration::from_secs(45), "took {took:?}\n{out}");
    for needle in [
        "node0 does not stream",
        // 15: "FATAL: could not connect to the primary server: ...";
        // 18: "FATAL: streaming replication receiver "walreceiver" could
        // not connect to the primary server: ...".
        "its server log: FATAL: ",
        "could not connect to the primary server",
        "Connection refused",
        "never lowers synchronous replication",
    ] {
        assert!(out.stderr.contains(needle), "{needle:?} missing:\n{out}");
    }
    // node1 is the primary; its commits wait for node0, as the setting says.
    assert_eq!(primaries(&fleet).await, ["node1"]);
    assert_eq!(one(node1, "show synchronous_standby_names").await, r#"FIRST 1 ("node0")"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while one(node1, "select count(*) from pg_stat_activity where wait_event = 'SyncRep'").await == "0" {
        assert!(Instant::now() < deadline, "no commit waits on node1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    let n1 = common::status_node(&report, "node1");
    assert_eq!(n1["missing_synchronous_standbys"], serde_json::json!(["node0"]), "{n1:#}");
    assert!(n1["sync_rep_waiting"].as_u64().unwrap() >= 1, "{n1:#}");
    let warnings = report["clusters"][0]["warnings"].to_string();
    assert!(warnings.contains("writes are blocked on node1"), "{warnings}");
    assert!(warnings.contains("could not connect to the primary server"), "{warnings}");

    // The standby can come back: rejoin restarts it, and writes resume.
    std::fs::remove_file(&marker).unwrap();
    let out = pgfleet(&fleet, &["rejoin", "node0", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_streaming(node1, &[node0]).await;
    writer.wait_for_more(20).await;
    let (acked, uncertain) = writer.finish().await;
    assert_rows_present(node1, &acked, &uncertain).await;
}

/// A standby whose postmaster was SIGKILLed, then left behind by a
/// failover, is rejoined without pg_rewind: pg_rewind's single-user crash
/// recovery would end its recovery with a shutdown checkpoint of its own at
/// an LSN where the old primary had written other WAL, and it could never
/// stream again (found by the fault suite, seed 1000). Checked from
/// outside: it streams from the new primary, with every row, and its
/// journal says why no pg_rewind ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_of_a_crashed_standby_leaves_its_wal_to_its_own_recovery() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    exec(node0, "create table t (id int); insert into t select generate_series(1, 1000)").await;
    wait_replayed(node0, node2).await;
    node2.kill_postgres().unwrap();
    // node0 writes on (node1 has it all: synchronous), then dies.
    exec(node0, "insert into t select generate_series(1001, 5000)").await;
    exec(node0, "insert into t select generate_series(5001, 6000)").await;
    node0.kill_postgres().unwrap();
    let out = pgfleet(&fleet, &["failover"]);
    assert_eq!(out.code(), Some(0), "{out}");

    let out = pgfleet(&fleet, &["rejoin", "node2", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = json(&out);
    let shown = pgfleet(&fleet, &["ops", "show", r["operation"].as_str().unwrap(), "--json"]);
    let journal = json(&shown)["journal"].clone();
    let rewind = journal.as_array().unwrap().iter().find(|e| e["step"] == "rewind" && e["event"] == "done").cloned();
    assert!(
        rewind.as_ref().is_some_and(|e| e["detail"].as_str().unwrap_or_default().contains("crashed as a standby")),
        "{journal:#}"
    );
    assert_eq!(one(node2, "select sender_host from pg_stat_wal_receiver where status = 'streaming'").await, node1.addr().to_string());
    wait_replayed(node1, node2).await;
    assert_eq!(one(node2, "select count(*) from t").await, "6000");
}

/// A whole cluster crashed (every postmaster SIGKILLed, standbys first, as
/// in a power loss): failover has no standby to promote and rejoin no
/// primary to follow; `pgfleet restart node0` starts the crashed primary
/// again (not a standby: refused), then `pgfleet rejoin` brings the
/// standbys back. Checked from outside: node0 takes writes, node1 and node2
/// stream from it, every row is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_crashed_whole_comes_back_with_restart_then_rejoin() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_two_rebuilt_standbys().await;
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    exec(node0, "create table t (id int); insert into t select generate_series(1, 1000)").await;
    for h in [node1, node2, node0] {
        h.kill_postgres().unwrap();
    }
    let out = pgfleet(&fleet, &["failover"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no running standby"), "{out}");
    let out = pgfleet(&fleet, &["restart", "node1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("standby.signal"), "{out}");
    assert!(!server_runs(node1), "a refused restart started node1");

    let out = pgfleet(&fleet, &["restart", "node0"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(one(node0, "select pg_is_in_recovery()").await, "f");
    for n in ["node1", "node2"] {
        let out = pgfleet(&fleet, &["rejoin", n]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    for h in [node1, node2] {
        assert_eq!(one(h, "select sender_host from pg_stat_wal_receiver where status = 'streaming'").await, node0.addr().to_string());
        wait_replayed(node0, h).await;
        assert_eq!(one(h, "select count(*) from t").await, "1000");
    }
    exec(node0, "insert into t values (1001)").await;
}

/// `pgfleet restart` starts only the latest primary: node0 failed over
/// from with `--fenced` (its agent gone, so nothing fenced its files),
/// then node1, promoted in its place, crashed too. Both say they crashed
/// as a primary; node0 is on the older timeline and is refused, node1 is
/// started. Checked from outside: only node1 takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_refuses_a_primary_that_was_failed_over_from() {
    let _shared = TIMED.read().await;
    let fleet = primary_and_rebuilt_standbys(2).await;
    let (node0, node1) = (fleet.host(0), fleet.host(1));
    exec(node0, "create table t (id int); insert into t select generate_series(1, 100)").await;
    wait_replayed(node0, node1).await;
    node0.kill_agent().unwrap();
    node0.kill_postgres().unwrap();
    let out = pgfleet(&fleet, &["failover", "--fenced", "--accept-data-loss"]);
    assert_eq!(out.code(), Some(0), "{out}");
    node1.kill_postgres().unwrap();
    node0.start_agent().unwrap();
    assert!(!node0.data_dir().join("standby.signal").exists());

    let out = pgfleet(&fleet, &["restart", "node0"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("node1 reports timeline 2, later than node0's (1)"), "{out}");
    assert!(!server_runs(node0), "a refused restart started node0");
    let out = pgfleet(&fleet, &["restart", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(one(node1, "select pg_is_in_recovery()").await, "f");
    assert_eq!(one(node1, "select count(*) from t").await, "100");
}

