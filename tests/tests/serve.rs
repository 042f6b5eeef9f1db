//! `pgfleet serve`, end to end: every operation sent through the service by
//! the real CLI (`--coordinator`), watched from a second client, refused on
//! a locked cluster and for a reader; the coordinator SIGKILLed in the
//! middle of a rebuild, restarted, the operation listed as interrupted and
//! resumed to the end (DESIGN.md invariant 7).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::time::{Duration, Instant};

use common::{exec, json, one, start_agents, start_primary};
use pgfleet_tests::{CliOutput, Coordinator, TestFleet};
use serde_json::Value;

const CLI_WAIT: Duration = Duration::from_secs(120);

fn remote(fleet: &TestFleet, c: &Coordinator, args: &[&str]) -> CliOutput {
    let mut all = vec!["--coordinator", c.url.as_str()];
    all.extend_from_slice(args);
    let out = fleet.pgfleet(&all).unwrap();
    eprintln!("$ pgfleet --coordinator {} {}\n{out}", c.url, args.join(" "));
    out
}

/// Runs an operation through the service, then watches it again from a
/// second client: the same result and exit code.
fn remote_watched(fleet: &TestFleet, c: &Coordinator, args: &[&str]) -> CliOutput {
    let out = remote(fleet, c, args);
    let id = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("operation ").and_then(|r| r.split_whitespace().next()))
        .unwrap_or_else(|| panic!("no operation id: {out}"))
        .to_owned();
    let again = remote(fleet, c, &["ops", "watch", &id, "--no-progress-bar"]);
    assert_eq!(again.code(), out.code(), "{again}");
    assert_eq!(again.stdout, out.stdout, "the second client sees the same result");
    out
}

/// ~30 MB in the primary, sent at 80 Mbit/s: a copy of a few seconds.
async fn slow_primary(fleet: &TestFleet) {
    let p = fleet.host(0);
    exec(p, "create table filler as select g, repeat(md5(g::text), 30) as pad from generate_series(1, 30000) g").await;
    p.limit_egress("80mbit").unwrap();
}

/// The operations `ops list --json` shows, newest first.
fn ops(fleet: &TestFleet, c: &Coordinator) -> Vec<Value> {
    let out = remote(fleet, c, &["ops", "list", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    json(&out).as_array().unwrap().clone()
}

fn wait_for_op(fleet: &TestFleet, c: &Coordinator, kind: &str, state: &str) -> Value {
    let started = Instant::now();
    loop {
        if let Some(op) = ops(fleet, c).into_iter().find(|o| o["kind"] == kind && o["state"] == state) {
            return op;
        }
        assert!(started.elapsed() < CLI_WAIT, "no {state} {kind} operation");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_through_the_service_match_the_cli_and_are_watched_from_a_second_client() {
    let fleet = TestFleet::new(3).unwrap();
    start_primary(&fleet, 0);
    fleet.make_replica_with_pg_basebackup(1, 0, "node1").await.unwrap();
    start_agents(&fleet);
    slow_primary(&fleet).await;
    let c = fleet.start_coordinator().unwrap();

    // Status through the service is the in-process status.
    let local = fleet.pgfleet(&["status", "--json"]).unwrap();
    let served = remote(&fleet, &c, &["status", "--json"]);
    assert_eq!(served.code(), Some(0), "{served}");
    for key in ["primary", "warnings"] {
        assert_eq!(json(&served)["clusters"][0][key], json(&local)["clusters"][0][key], "{served}");
    }
    let table = remote(&fleet, &c, &["status"]);
    assert!(table.stdout.contains("node0") && table.stdout.contains("primary"), "{table}");
    // The views come back typed and the CLI renders them: the same tables
    // as in-process.
    // (A slot's restart_lsn moves while WAL is written: asked a few times
    // until two answers in a row are of the same moment.)
    for view in [&["slots"][..], &["sync", "show"]] {
        let mut tries = 0;
        loop {
            let local = fleet.pgfleet(view).unwrap();
            let served = remote(&fleet, &c, view);
            assert_eq!(served.code(), Some(0), "{served}");
            tries += 1;
            if served.stdout == local.stdout || tries == 5 {
                assert_eq!(served.stdout, local.stdout, "{view:?} through the service");
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let wal = remote(&fleet, &c, &["wal", "node0"]);
    assert!(wal.stdout.starts_with("node0 (primary)"), "{wal}");

    // A rebuild started by one client, watched by a second one.
    let mut args = vec!["--coordinator", c.url.as_str(), "rebuild", "node2", "--no-progress-bar"];
    let first = fleet.pgfleet_spawn(&args).unwrap();
    let op = wait_for_op(&fleet, &c, "rebuild", "running");
    let id = op["id"].as_str().unwrap().to_owned();
    assert!(op["caller"].as_str().unwrap().contains("test-admin"), "{op}");

    // One operation per cluster: a second one is refused while it runs.
    let busy = remote(&fleet, &c, &["sync", "set", "node1"]);
    assert_eq!(busy.code(), Some(1), "{busy}");
    assert!(busy.stderr.contains("another operation is running on cluster") && busy.stderr.contains(&id), "{busy}");

    args = vec!["--coordinator", c.url.as_str(), "ops", "watch", &id, "--no-progress-bar"];
    let second = fleet.pgfleet_spawn(&args).unwrap();
    let (first, second) = (first.wait(CLI_WAIT).unwrap(), second.wait(CLI_WAIT).unwrap());
    eprintln!("first client:\n{first}\nsecond client:\n{second}");
    assert_eq!(first.code(), Some(0));
    assert_eq!(second.code(), Some(0));
    assert!(first.stdout.starts_with("rebuilt node2 from node0"), "{first}");
    assert_eq!(first.stdout, second.stdout, "both clients print the same result");
    // Both saw the steps, from the first one on.
    for out in [&first, &second] {
        assert!(out.stderr.contains("[node0] admit") && out.stderr.contains("[node2] check-local:"), "{out}");
    }
    assert_eq!(one(fleet.host(2), "select pg_is_in_recovery()").await, "t");
    fleet.host(0).clear_egress_limit().unwrap();

    // Every other operation through the service.
    let out = remote_watched(&fleet, &c, &["sync", "set", "node1", "node2", "--num", "1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("synchronous_standby_names = 'FIRST 1 (\"node1\", \"node2\")'"), "{out}");
    let out = remote_watched(&fleet, &c, &["switchover", "--to", "node1", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.starts_with("plan (dry run, nothing changed): switch over"), "{out}");
    let out = remote_watched(&fleet, &c, &["switchover", "--to", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("node1 is the primary"), "{out}");
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "f");
    assert_eq!(one(fleet.host(0), "select pg_is_in_recovery()").await, "t");
    let out = remote_watched(&fleet, &c, &["rejoin", "node0"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("already-streaming") || out.stdout.contains("rejoined"), "{out}");
    let out = remote_watched(&fleet, &c, &["slots", "drop", "node1", "nosuchslot"]);
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("nosuchslot"), "{out}");
    // A refusal comes back as it would in-process.
    let out = remote_watched(&fleet, &c, &["failover", "--dry-run"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("use `pgfleet switchover` for a planned move"), "{out}");
    // The inventory may name the coordinator: the CLI then goes there.
    let inv = fleet.dir().join("inventory-remote.toml");
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    std::fs::write(&inv, format!("coordinator = \"{}\"\n{text}", c.url)).unwrap();
    // (A dry run checks the slot exists, as the drop would: refused.)
    let out = fleet.pgfleet_with_inventory(&inv, &["slots", "drop", "node1", "nosuchslot", "--dry-run"]).unwrap();
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no replication slot named nosuchslot"), "{out}");
    assert!(out.stderr.contains("operation dry-run-drop-slot"), "went through the service: {out}");
    let out = fleet.pgfleet_with_inventory(&inv, &["--coordinator", "local", "slots", "drop", "node1", "nosuchslot", "--dry-run"]).unwrap();
    assert!(!out.stderr.contains("operation "), "--coordinator local runs in-process: {out}");
    // Bad input: exit 2, as in-process.
    let out = fleet.pgfleet(&["--coordinator", "not-a-url", "status"]).unwrap();
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("give the service's URL"), "{out}");
    let out = remote(&fleet, &c, &["rebuild", "nosuchnode"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("nosuchnode"), "{out}");

    // A reader may look, not change.
    let pki = fleet.pki_dir();
    let (cert, key) = (pki.join("test-reader.crt"), pki.join("test-reader.key"));
    let reader = |args: &[&str]| {
        let mut all = vec![
            "--coordinator", c.url.as_str(), "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        fleet.pgfleet(&all).unwrap()
    };
    let out = reader(&["status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = reader(&["rebuild", "node2"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("test-reader") && out.stderr.contains("may not call Rebuild"), "{out}");

    // The journal and the audit log name every operation and its caller.
    let list = ops(&fleet, &c);
    for kind in ["rebuild", "sync", "switchover"] {
        assert!(list.iter().any(|o| o["kind"] == kind && o["state"] == "succeeded"), "{kind}: {list:?}");
    }
    let audit = std::fs::read_to_string(&c.audit_log).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"rpc\":\"Switchover\"") && l.contains("test-admin")), "{audit}");
    assert!(audit.lines().any(|l| l.contains("\"rpc\":\"Rebuild\"") && l.contains("PermissionDenied")), "{audit}");
    assert!(!audit.contains(&fleet.replication_password()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_rebuild_lists_it_interrupted_and_resume_finishes_it() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    slow_primary(&fleet).await;
    let mut c = fleet.start_coordinator().unwrap();

    let args = vec!["--coordinator", c.url.as_str(), "rebuild", "node1", "--json"];
    let mut cli = fleet.pgfleet_spawn(&args).unwrap();
    let line = cli
        .wait_for_line(CLI_WAIT, |l| l.contains("\"type\":\"progress\"") && !l.contains("\"done_bytes\":0"))
        .unwrap();
    eprintln!("killing the coordinator at {line}");
    c.kill();
    let out = cli.wait(CLI_WAIT).unwrap();
    assert_ne!(out.code(), Some(0), "{out}");

    c.start().unwrap();
    let op = wait_for_op(&fleet, &c, "rebuild", "interrupted");
    let id = op["id"].as_str().unwrap().to_owned();
    assert!(op["journal"].as_array().unwrap().iter().any(|e| e["step"] == "job"), "{op}");
    let shown = remote(&fleet, &c, &["ops", "show", &id]);
    assert!(shown.stdout.contains("interrupted"), "{shown}");

    fleet.host(0).clear_egress_limit().unwrap();
    let out = remote(&fleet, &c, &["ops", "resume", &id]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.starts_with("rebuilt node1 from node0"), "{out}");
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");
    assert_eq!(
        one(fleet.host(1), "select count(*) from filler").await,
        one(fleet.host(0), "select count(*) from filler").await
    );
    let op = ops(&fleet, &c).into_iter().find(|o| o["id"] == id.as_str()).unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
    // Resuming twice is refused: it is no longer interrupted.
    let again = remote(&fleet, &c, &["ops", "resume", &id]);
    assert_eq!(again.code(), Some(2), "{again}");
}

/// CancelOperation: accepted while a rebuild is still checking (here its
/// status gathering waits on an agent nobody answers at), and then nothing
/// changed; refused, with the reason, once the node's data directory moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_accepted_before_the_first_change_and_refused_during_the_copy() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    slow_primary(&fleet).await;
    // A third inventory node whose agent never answers: every status of the
    // cluster waits the connect deadline (3 s) for it.
    fleet.write_inventory_with(&[("ghost", &common::ghost_endpoint(&fleet))]).unwrap();
    let c = fleet.start_coordinator().unwrap();

    let args = ["--coordinator", c.url.as_str(), "rebuild", "node1", "--no-progress-bar"];
    let cli = fleet.pgfleet_spawn(&args).unwrap();
    let id = wait_for_op(&fleet, &c, "rebuild", "running")["id"].as_str().unwrap().to_owned();
    let out = remote(&fleet, &c, &["ops", "cancel", &id]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("cancel of") && out.stdout.contains("accepted"), "{out}");
    let out = cli.wait(CLI_WAIT).unwrap();
    eprintln!("{out}");
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("was cancelled"), "{out}");
    let op = ops(&fleet, &c).into_iter().find(|o| o["id"] == id.as_str()).unwrap();
    assert_eq!(op["state"], "cancelled", "{op}");
    // Nothing changed: node1 was never touched, no slot on the primary.
    assert!(!fleet.host(1).data_dir().exists());
    assert_eq!(one(fleet.host(0), "select count(*) from pg_replication_slots").await, "0");

    // During the copy a cancel is refused and says why.
    let cli = fleet.pgfleet_spawn(&["--coordinator", c.url.as_str(), "rebuild", "node1", "--json"]).unwrap();
    let mut cli = cli;
    cli.wait_for_line(CLI_WAIT, |l| l.contains("\"type\":\"progress\"")).unwrap();
    let id = wait_for_op(&fleet, &c, "rebuild", "running")["id"].as_str().unwrap().to_owned();
    let out = remote(&fleet, &c, &["ops", "cancel", &id]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("cannot cancel") && out.stderr.contains("data directory is being moved aside"), "{out}");
    fleet.host(0).clear_egress_limit().unwrap();
    let out = cli.wait(CLI_WAIT).unwrap();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");
}

/// WatchFleet: every node once ("initial"), then a change when it happens,
/// here a replica's server stopping (role replica -> down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_fleet_streams_the_fleet_then_its_changes() {
    use pgfleet_proto::coordinator::v1 as pb;
    use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;

    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    fleet.make_replica_with_pg_basebackup(1, 0, "r1").await.unwrap();
    start_agents(&fleet);
    let c = fleet.start_coordinator().unwrap();
    let ch = c.channel_as(&fleet.pki_dir(), "test-reader").await.unwrap();
    let mut stream = CoordinatorClient::new(ch)
        .watch_fleet(pb::WatchFleetRequest { cluster: String::new(), interval_ms: 200, lag_threshold_bytes: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), stream.message()).await.expect("no fleet change within 20s").unwrap().unwrap()
    };
    let mut initial = Vec::new();
    for _ in 0..2 {
        let ch = next().await;
        assert_eq!(ch.changes, ["initial"], "{ch:?}");
        let n = ch.node.unwrap();
        initial.push((n.name, n.role));
    }
    initial.sort();
    assert_eq!(initial, [("node0".to_owned(), "primary".to_owned()), ("node1".to_owned(), "replica".to_owned())]);

    fleet.host(1).stop_postgres().unwrap();
    let change = loop {
        let ch = next().await;
        if ch.node.as_ref().unwrap().name == "node1" && ch.changes.iter().any(|c| c.starts_with("role")) {
            break ch;
        }
    };
    assert!(change.changes.contains(&"role replica -> down".to_owned()), "{change:?}");
    assert!(change.node.unwrap().reachable, "the agent still answers");
}
