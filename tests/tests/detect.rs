//! Failure detection in `pgfleet serve` (issue #14) and, where the
//! inventory allows it, the automatic failover that follows: the
//! leader looks at every cluster twice a second; a primary the coordinator
//! cannot reach while its standbys still reach it is a partition, never a
//! failure; a primary whose postmaster died, or whose whole host is gone,
//! is declared failed once the cluster's failure_timeout has passed, not
//! before (also by a coordinator started while it is gone: it watches the
//! primary the last one recorded).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::writer::{Writer, assert_rows_present};
use common::{one, pgfleet, start_agents, start_primary};
use pgfleet_proto::coordinator::v1 as cpb;
use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use pgfleet_tests::{Coordinator, TestFleet};

/// An `unreachable` route to `addr` in the root namespace, where the test's
/// coordinator runs: it cannot reach that host, the other hosts still do.
/// Removed when dropped, even when the test fails.
struct CutFromRoot(Ipv4Addr);

impl CutFromRoot {
    fn new(addr: Ipv4Addr) -> CutFromRoot {
        pgfleet_tests::net::ip(&["route", "add", "unreachable", &format!("{addr}/32")]).unwrap();
        CutFromRoot(addr)
    }
}

impl Drop for CutFromRoot {
    fn drop(&mut self) {
        let _ = pgfleet_tests::net::ip(&["route", "del", "unreachable", &format!("{}/32", self.0)]);
    }
}

/// Waits until the coordinator's log has a line containing `needle`.
fn wait_for_log(c: &Coordinator, needle: &str, within: Duration) -> Duration {
    c.wait_for_log(needle, within).unwrap_or_else(|e| panic!("{e}"))
}

/// node0 primary (initdb, scram), node1 and node2 rebuilt from it by pgfleet.
fn primary_and_two_rebuilt_standbys() -> TestFleet {
    let fleet = TestFleet::new(3).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    for node in ["node1", "node2"] {
        let out = pgfleet(&fleet, &["rebuild", node, "--no-progress-bar"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_not_a_failure_and_a_dead_primary_is_declared_after_the_timeout() {
    let fleet = primary_and_two_rebuilt_standbys();
    let c = fleet.start_coordinator().unwrap();
    wait_for_log(&c, "watching: primary node0 answers", Duration::from_secs(10));

    // The coordinator cut from node0; node1 and node2 still stream from it.
    let p = fleet.host(0);
    {
        let _cut = CutFromRoot::new(p.addr());
        wait_for_log(&c, "a partition between this coordinator and node0, not a failure", Duration::from_secs(10));
        // Longer than the failure timeout (3 s): still no verdict of failure.
        std::thread::sleep(Duration::from_secs(5));
        for h in [fleet.host(1), fleet.host(2)] {
            assert_eq!(one(h, "select status from pg_stat_wal_receiver").await, "streaming");
        }
    }
    wait_for_log(&c, "primary node0 answers again", Duration::from_secs(10));
    assert!(!c.log_text().contains("failed"), "a partition was taken for a failure:\n{}", c.log_text());

    // node0's postmaster dies: its agent answers, the standbys' WAL
    // receivers stop and their probes are refused. Declared failed after
    // the timeout, not before.
    p.kill_postgres().unwrap();
    let killed = Instant::now();
    wait_for_log(&c, "primary node0 failed", Duration::from_secs(15));
    let after = killed.elapsed();
    eprintln!("postmaster killed: declared failed {after:?} after");
    assert!(after >= Duration::from_millis(2900), "declared failed after {after:?}, before the 3 s timeout");
    assert!(after <= Duration::from_secs(7), "declared failed only after {after:?}");
    assert!(c.log_text().contains("its agent answers, PostgreSQL does not"), "{}", c.log_text());
    for h in [fleet.host(1), fleet.host(2)] {
        assert_eq!(one(h, "select count(*) from pg_stat_wal_receiver where status = 'streaming'").await, "0");
    }

    // Back, then the whole host lost: agent and postmaster SIGKILLed, its
    // link down (no TCP reset reaches the standbys, whose WAL receivers go
    // on saying "streaming"). Their probes time out: failed.
    p.start_postgres().unwrap();
    wait_for_log(&c, "primary node0 answers again", Duration::from_secs(15));
    for h in [fleet.host(1), fleet.host(2)] {
        wait_streaming(h).await;
    }
    let lines_before = c.log_text().matches("primary node0 failed").count();
    p.kill_agent().unwrap();
    p.kill_postgres().unwrap();
    let lost = LinkDown::new(p);
    let killed = Instant::now();
    let started = Instant::now();
    while c.log_text().matches("primary node0 failed").count() == lines_before {
        assert!(started.elapsed() < Duration::from_secs(20), "host loss never declared:\n{}", c.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = killed.elapsed();
    eprintln!("host lost: declared failed {after:?} after");
    assert!(after >= Duration::from_millis(2900), "declared failed after {after:?}, before the 3 s timeout");
    assert!(after <= Duration::from_secs(8), "declared failed only after {after:?}");
    assert!(c.log_text().contains("its agent does not answer"), "{}", c.log_text());

    // A coordinator started while the primary is gone watches the primary
    // the last one recorded, and declares it failed too.
    let mut c = c;
    c.kill();
    let lines_before = c.log_text().matches("primary node0 failed").count();
    c.start().unwrap();
    let started = Instant::now();
    while c.log_text().matches("primary node0 failed").count() == lines_before {
        assert!(started.elapsed() < Duration::from_secs(20), "a restarted coordinator never declared node0 failed:\n{}", c.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(lost);
}

/// A host's link down until dropped, even when the test fails.
struct LinkDown<'a>(&'a pgfleet_tests::Host);

impl<'a> LinkDown<'a> {
    fn new(h: &'a pgfleet_tests::Host) -> LinkDown<'a> {
        h.link_down().unwrap();
        LinkDown(h)
    }
}

impl Drop for LinkDown<'_> {
    fn drop(&mut self) {
        let _ = self.0.link_up();
    }
}

/// node0 primary with table `acks`, node1 and node2 rebuilt from it,
/// `FIRST 1 (node1, node2)`.
async fn synchronous_fleet_with_acks() -> TestFleet {
    let fleet = primary_and_two_rebuilt_standbys();
    common::exec(fleet.host(0), "create table acks (id bigint primary key)").await;
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    fleet
}

/// The inventory with `auto_failover = true`, and its coordinator started,
/// watching node0.
fn start_with_auto_failover(fleet: &TestFleet) -> Coordinator {
    start_with_auto_failover_and(fleet, "")
}

/// The same with `extra` in the coordinator's configuration.
fn start_with_auto_failover_and(fleet: &TestFleet, extra: &str) -> Coordinator {
    start_with_cluster_settings(fleet, "auto_failover = true\n", extra)
}

/// The inventory with `settings` in the cluster's table, and its
/// coordinator started with `extra` in its configuration.
fn start_with_cluster_settings(fleet: &TestFleet, settings: &str, extra: &str) -> Coordinator {
    start_named_with_cluster_settings(fleet, "coordinator", settings, extra)
}

/// The same for a coordinator of its own name (its own directory and log).
fn start_named_with_cluster_settings(fleet: &TestFleet, name: &str, settings: &str, extra: &str) -> Coordinator {
    let inventory = fleet.inventory_toml("main", &[]).unwrap();
    assert!(inventory.contains("name = \"main\"\n"), "{inventory}");
    std::fs::write(fleet.inventory_path(), inventory.replacen("name = \"main\"\n", &format!("name = \"main\"\n{settings}"), 1)).unwrap();
    let c = fleet.start_coordinator_with(name, extra).unwrap();
    wait_for_log(&c, "watching: primary node0 answers", Duration::from_secs(10));
    c
}

/// The nodes that accept writes, asked of each node itself (a node whose
/// server cannot be reached accepts none from here).
async fn writable(fleet: &TestFleet) -> Vec<String> {
    let mut out = Vec::new();
    for h in fleet.hosts() {
        if h.query_one_string("select pg_is_in_recovery()").await.is_ok_and(|v| v == "f") {
            out.push(h.node_name());
        }
    }
    out
}

/// After node0's failover: the one standby that accepts writes (node1 or
/// node2, whichever had received more), and the other. Asked of every node
/// node0 excluded only when it cannot be reached.
async fn promoted(fleet: &TestFleet) -> (&pgfleet_tests::Host, &pgfleet_tests::Host) {
    let w = writable(fleet).await;
    assert!(w == ["node1"] || w == ["node2"], "not exactly one writable node, or node0 among them: {w:?}");
    if w[0] == "node1" { (fleet.host(1), fleet.host(2)) } else { (fleet.host(2), fleet.host(1)) }
}

/// The journal's latest automatic operation of this kind (`ops list` is
/// newest first), which must have succeeded; its steps' done lines, in
/// order.
fn automatic_op(fleet: &TestFleet, kind: &str) -> (serde_json::Value, Vec<String>) {
    let out = pgfleet(fleet, &["ops", "list", "--json"]);
    let ops = common::json(&out);
    let op = ops.as_array().unwrap().iter().find(|o| o["kind"] == kind).cloned().unwrap_or_else(|| panic!("no {kind} in {ops:#}"));
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["caller"], format!("pgfleet serve (automatic {kind})"), "{op}");
    let out = pgfleet(fleet, &["ops", "show", op["id"].as_str().unwrap(), "--json"]);
    let shown = common::json(&out);
    for e in shown["journal"].as_array().into_iter().flatten() {
        eprintln!("{} {} {} {}", e["time"], e["step"], e["event"], e["detail"]);
    }
    let done = shown["journal"]
        .as_array()
        .unwrap_or_else(|| panic!("{shown:#}"))
        .iter()
        .filter(|e| e["event"] == "done")
        .map(|e| e["step"].as_str().unwrap().to_owned())
        .collect();
    (op, done)
}

/// Waits until `h`'s WAL receiver streams again.
async fn wait_streaming(h: &pgfleet_tests::Host) {
    let started = Instant::now();
    while one(h, "select count(*) from pg_stat_wal_receiver where status = 'streaming'").await != "1" {
        assert!(started.elapsed() < Duration::from_secs(30), "{} does not stream again", h.node_name());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `auto_failover = true`: node0's postmaster SIGKILLed under a client
/// committing every 10 ms, with FIRST 1 (node1, node2). The leader declares
/// it failed, then runs the failover operation itself: fenced through its
/// agent, the synchronous standby with every acknowledged commit promoted,
/// the other re-pointed; node0 then made a standby of the new primary by
/// the leader's rejoin. Checked from outside: every acknowledged row is on
/// the new primary and on node0, exactly one node accepts writes (asked of
/// every node), and the journal holds the failover with its automatic
/// caller; every decision reached WatchFleet and the hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_failed_over_automatically_without_losing_commits() {
    let fleet = synchronous_fleet_with_acks().await;
    let p = fleet.host(0);
    // Every automatic decision goes to the hook and to WatchFleet.
    let hook_out = fleet.dir().join("hook.jsonl");
    let c = start_with_auto_failover_and(&fleet, &format!("[hook]\ncommand = [\"/usr/bin/tee\", \"-a\", {:?}]\n", hook_out.display().to_string()));
    let ch = c.channel_as(&fleet.pki_dir(), "test-reader").await.unwrap();
    let mut changes = CoordinatorClient::new(ch)
        .watch_fleet(cpb::WatchFleetRequest { cluster: "main".into(), interval_ms: 1000, lag_threshold_bytes: 0 })
        .await
        .unwrap()
        .into_inner();
    let watched = tokio::spawn(async move {
        let mut kinds = Vec::new();
        while let Ok(Some(change)) = changes.message().await {
            if let Some(d) = change.decision {
                kinds.push(d.kind.clone());
                if d.kind == "promoted" {
                    break;
                }
            }
        }
        kinds
    });

    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;
    p.kill_postgres().unwrap();
    let killed = Instant::now();
    wait_for_log(&c, "automatic failover done", Duration::from_secs(60));
    writer.wait_for_more(50).await;
    let gap = writer.longest_gap_since(killed);
    eprintln!("writes unavailable {gap:?} (postmaster SIGKILL to the first commit on the new primary; failure_timeout 3 s)");
    let (acked, uncertain) = writer.finish().await;

    // Exactly one node takes writes, asked of each node itself.
    let (new, _) = promoted(&fleet).await;
    assert_rows_present(new, &acked, &uncertain).await;
    // node0, fenced, comes back as a standby of the new primary by itself
    // (the leader's rejoin: pg_rewind, follow), with every row.
    wait_for_log(&c, "automatic rejoin done", Duration::from_secs(60));
    assert_eq!(one(p, "select pg_is_in_recovery()").await, "t");
    assert_eq!(one(p, "select sender_host from pg_stat_wal_receiver").await, new.addr().to_string());
    common::wait_replayed(new, p).await;
    assert_rows_present(p, &acked, &uncertain).await;
    assert_eq!(writable(&fleet).await, [new.node_name()]);

    let (op, _) = automatic_op(&fleet, "failover");

    // The decisions, in order, as WatchFleet streamed them and as the hook
    // was given them (one JSON line each on its stdin).
    let expected = ["detected", "started", "fenced", "promoted"];
    let streamed = tokio::time::timeout(Duration::from_secs(10), watched).await.expect("WatchFleet sent no promoted decision").unwrap();
    assert_eq!(streamed, expected);
    let started = Instant::now();
    let hooked = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&hook_out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["decision"] == "promoted") || started.elapsed() > Duration::from_secs(10) {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Hooks run beside each other: their lines may land out of order. The
    // failure's detection, then the failover's own decisions.
    assert!(
        hooked.iter().any(|l| l["decision"] == "detected" && l["detail"].as_str().unwrap().contains("primary node0 failed")),
        "{hooked:?}"
    );
    let mut kinds: Vec<&str> =
        hooked.iter().filter(|l| l["operation"] == op["id"]).map(|l| l["decision"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["fenced", "promoted", "started"], "{hooked:?}");
}

/// `auto_failover = true`, FIRST 1 (node1, node2): node0's whole host is
/// lost (agent and postmaster SIGKILLed, link down) under a client
/// committing every 10 ms. Nobody can fence it through its agent, so the
/// automatic failover isolates it: the other synchronous standby re-pointed
/// at the candidate and streaming from it before the candidate is
/// promoted. Every acknowledged row is on the new primary, exactly one node
/// accepts writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_host_is_failed_over_by_isolation() {
    let fleet = synchronous_fleet_with_acks().await;
    let p = fleet.host(0);
    let c = start_with_auto_failover(&fleet);

    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;
    p.kill_agent().unwrap();
    p.kill_postgres().unwrap();
    let lost = LinkDown::new(p);
    let killed = Instant::now();
    wait_for_log(&c, "automatic failover done", Duration::from_secs(60));
    writer.wait_for_more(50).await;
    let gap = writer.longest_gap_since(killed);
    eprintln!("host lost: writes unavailable {gap:?} (fault to the first commit on the new primary; failure_timeout 3 s)");
    let (acked, uncertain) = writer.finish().await;
    drop(lost);

    // The most advanced of the two synchronous standbys was promoted.
    let (new, other) = promoted(&fleet).await;
    assert_rows_present(new, &acked, &uncertain).await;
    assert_eq!(one(new, "select client_addr::text from pg_stat_replication").await, format!("{}/32", other.addr()));
    let (_, done) = automatic_op(&fleet, "failover");
    let at = |s: &str| done.iter().position(|d| d == s).unwrap_or_else(|| panic!("no {s} done in {done:?}"));
    assert!(at("isolate") < at("promote"), "{done:?}");
}

/// `auto_failover = true`, FIRST 1 (node1, node2): node0 is cut from
/// everything (its link down) while its agent and PostgreSQL run on. The
/// coordinator and the standbys lose it: failed over by isolation. Back on
/// the network, node0 still runs as a primary on its old timeline, and
/// acknowledges no commit (no standby streams from it); the leader makes it
/// a standby of the new primary (the journal shows pgfleet isolated it), with
/// pg_rewind. Every acknowledged row is on the new primary, and on node0
/// once it replays; only the new primary accepts writes, asked of every
/// node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_from_everything_acknowledges_nothing_and_comes_back_a_standby() {
    let fleet = synchronous_fleet_with_acks().await;
    let p = fleet.host(0);
    let c = start_with_auto_failover(&fleet);

    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;
    let cut = LinkDown::new(p);
    let at_cut = Instant::now();
    wait_for_log(&c, "automatic failover done", Duration::from_secs(60));
    writer.wait_for_more(50).await;
    eprintln!("cut from everything: writes unavailable {:?}", writer.longest_gap_since(at_cut));
    let (acked, uncertain) = writer.finish().await;
    let (new, _) = promoted(&fleet).await;

    // Back: a commit on node0 is never acknowledged (it waits for a
    // synchronous standby that no longer streams from it, or the server
    // is fenced under it).
    drop(cut);
    let node0 = p.addr().to_string();
    let conn = format!("host={node0} port=5432 user=postgres password={} dbname=postgres connect_timeout=3", p.superuser_password());
    let attempt = tokio::time::timeout(Duration::from_secs(5), async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.execute("insert into acks (id) values (-1)", &[]).await
    })
    .await;
    assert!(!matches!(attempt, Ok(Ok(_))), "node0 acknowledged a commit after it was failed over: {attempt:?}");

    wait_for_log(&c, "automatic rejoin done", Duration::from_secs(60));
    assert_eq!(writable(&fleet).await, [new.node_name()]);
    assert_eq!(one(p, "select sender_host from pg_stat_wal_receiver").await, new.addr().to_string());
    assert_rows_present(new, &acked, &uncertain).await;
    assert_eq!(one(new, "select count(*) from acks where id = -1").await, "0");
    common::wait_replayed(new, p).await;
    assert_rows_present(p, &acked, &uncertain).await;
    assert_eq!(one(p, "select count(*) from acks where id = -1").await, "0");
    let (_, done) = automatic_op(&fleet, "rejoin");
    assert!(done.iter().any(|d| d == "rewind"), "{done:?}");
}

/// Control: `failover-policy manual` and `pause` are shown by `status`
/// (both doors: the CLI's table and JSON, the service's ClusterStatus),
/// journaled as operations, and obeyed: node0's postmaster SIGKILLed while
/// the cluster is paused is declared failed and logged, and nothing is
/// done; `pgfleet resume` while it is still failed starts the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cluster_is_watched_and_not_failed_over_until_resumed() {
    let fleet = primary_and_two_rebuilt_standbys();
    let p = fleet.host(0);
    let out = pgfleet(&fleet, &["sync", "set", "node1", "node2"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let c = start_with_auto_failover(&fleet);
    let status_line = |fleet: &TestFleet| {
        let out = pgfleet(fleet, &["status"]);
        out.stdout.lines().find(|l| l.starts_with("main: ")).map(str::to_owned).unwrap_or_else(|| panic!("{out}"))
    };
    assert_eq!(status_line(&fleet), "main: automatic failover on (inventory)");

    let out = pgfleet(&fleet, &["failover-policy", "manual"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(status_line(&fleet), "main: automatic failover off (failover-policy)");
    let out = pgfleet(&fleet, &["failover-policy", "inventory", "main", "--json"]);
    assert_eq!(common::json(&out)["policy"]["auto_failover"], true, "{out}");

    // Paused through the service: the same operation, journaled.
    let out = pgfleet(&fleet, &["--coordinator", c.url.as_str(), "pause", "--reason", "kernel upgrade"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let line = status_line(&fleet);
    assert!(line.starts_with("main: paused since ") && line.contains("(kernel upgrade): no automatic action"), "{line}");
    let out = pgfleet(&fleet, &["--coordinator", c.url.as_str(), "status", "--json"]);
    let j = common::json(&out);
    assert_eq!(j["clusters"][0]["policy"]["paused"]["reason"], "kernel upgrade", "{j:#}");
    let out = pgfleet(&fleet, &["ops", "list", "--json"]);
    let kinds: Vec<String> = common::json(&out).as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "failover-policy").count(), 3, "{kinds:?}");

    p.kill_postgres().unwrap();
    wait_for_log(&c, "primary node0 failed", Duration::from_secs(15));
    assert!(c.log_text().contains("no automatic failover: paused since"), "{}", c.log_text());
    std::thread::sleep(Duration::from_secs(3));
    assert!(!c.log_text().contains("automatic failover started"), "{}", c.log_text());
    assert_eq!(writable(&fleet).await, Vec::<String>::new());

    let out = pgfleet(&fleet, &["resume"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(status_line(&fleet), "main: automatic failover on (inventory)");
    wait_for_log(&c, "automatic failover done", Duration::from_secs(30));
    promoted(&fleet).await;
}

/// `restart_in_place = true` (with auto_failover): node0's postmaster
/// SIGKILLed under a client committing every 10 ms is started again in
/// place at once (the agent answers; crash recovery, same timeline, no
/// failover in the journal, a `restart` operation by the leader); killed
/// again within the restart window, it is failed over (a postmaster that
/// keeps dying has a reason). No acknowledged row is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_postmaster_is_restarted_in_place_once_then_failed_over() {
    let fleet = synchronous_fleet_with_acks().await;
    let p = fleet.host(0);
    let c = start_with_cluster_settings(&fleet, "auto_failover = true\nrestart_in_place = true\n", "");
    wait_for_log(&c, "watching: primary node0 answers", Duration::from_secs(10));
    let timeline = one(p, "select timeline_id from pg_control_checkpoint()").await;

    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;
    p.kill_postgres().unwrap();
    let killed = Instant::now();
    wait_for_log(&c, "automatic restart done", Duration::from_secs(30));
    writer.wait_for_more(50).await;
    eprintln!("restarted in place: writes unavailable {:?}", writer.longest_gap_since(killed));
    assert_eq!(writable(&fleet).await, ["node0"]);
    assert_eq!(one(p, "select timeline_id from pg_control_checkpoint()").await, timeline);
    automatic_op(&fleet, "restart");
    let out = pgfleet(&fleet, &["ops", "list", "--json"]);
    assert!(!common::json(&out).as_array().unwrap().iter().any(|o| o["kind"] == "failover"), "{out}");
    for h in [fleet.host(1), fleet.host(2)] {
        wait_streaming(h).await;
    }

    // Again, within the window: failed over this time.
    wait_for_log(&c, "primary node0 answers again", Duration::from_secs(10));
    p.kill_postgres().unwrap();
    let killed = Instant::now();
    wait_for_log(&c, "automatic failover done", Duration::from_secs(60));
    writer.wait_for_more(50).await;
    eprintln!("killed again: failed over, writes unavailable {:?}", writer.longest_gap_since(killed));
    let (acked, uncertain) = writer.finish().await;
    let (new, _) = promoted(&fleet).await;
    assert_rows_present(new, &acked, &uncertain).await;
    assert!(p.data_dir().join("standby.signal").exists(), "node0 was not fenced");
    assert_eq!(c.log_text().matches("automatic restart done").count(), 1, "{}", c.log_text());
}

/// An asynchronous cluster (no synchronous standby) with auto_failover:
/// without `max_lag_on_failover` a dead postmaster is declared failed, the
/// automatic failover refused (no standby provably has every commit: the
/// decision says so and how far behind), nothing promoted and node0 left as
/// it crashed; with `max_lag_on_failover` the most advanced standby is
/// promoted when it is within that many bytes of node0's last position the
/// leader saw, the accepted loss journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_cluster_fails_over_only_within_max_lag_on_failover() {
    let fleet = primary_and_two_rebuilt_standbys();
    let p = fleet.host(0);
    common::exec(p, "create table acks (id bigint primary key)").await;
    let hook_out = fleet.dir().join("hook.jsonl");
    let hook = format!("[hook]\ncommand = [\"/usr/bin/tee\", \"-a\", {:?}]\n", hook_out.display().to_string());
    let c = start_with_auto_failover_and(&fleet, &hook);
    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;
    p.kill_postgres().unwrap();
    wait_for_log(&c, "automatic failover refused", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(writable(&fleet).await, Vec::<String>::new());
    assert!(!p.data_dir().join("standby.signal").exists(), "node0 was fenced although nothing was promoted");
    let refused = std::fs::read_to_string(&hook_out).unwrap_or_default();
    let refused: Vec<serde_json::Value> = refused.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|l: &serde_json::Value| l["decision"] == "refused").collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let why = refused[0]["detail"].as_str().unwrap();
    assert!(why.contains("synchronous") && why.contains("behind"), "{why}");
    drop(c);

    // The same with a bounded loss allowed: node0 back first (the leader
    // watches a primary it has seen).
    p.start_postgres().unwrap();
    for h in [fleet.host(1), fleet.host(2)] {
        wait_streaming(h).await;
    }
    writer.wait_for_more(50).await;
    // Another coordinator (its own log): it must see node0 answer first.
    let c = start_named_with_cluster_settings(&fleet, "coordinator-2", "auto_failover = true\nmax_lag_on_failover = 16777216\n", &hook);
    wait_for_log(&c, "watching: primary node0 answers", Duration::from_secs(10));
    p.kill_postgres().unwrap();
    wait_for_log(&c, "automatic failover done", Duration::from_secs(30));
    writer.wait_for_more(50).await;
    let (acked, _) = writer.finish().await;
    let (new, _) = promoted(&fleet).await;
    let (op, _) = automatic_op(&fleet, "failover");
    let out = pgfleet(&fleet, &["ops", "show", op["id"].as_str().unwrap(), "--json"]);
    let shown = common::json(&out);
    let accepted = shown["journal"].as_array().unwrap().iter().find(|e| e["event"] == "data-loss-accepted").cloned();
    let accepted = accepted.unwrap_or_else(|| panic!("{shown:#}"));
    assert!(accepted["detail"].as_str().unwrap().contains("within max_lag_on_failover (16.0 MiB)"), "{accepted}");
    let present = common::rows(new, "select count(*) from acks").await;
    eprintln!("asynchronous failover within max_lag_on_failover: {} acknowledged, {:?} on the new primary", acked.len(), present);
}

/// A second fault during an automatic failover: `FIRST 1 (node1)`, node2
/// cut from node1, node0's postmaster SIGKILLed. The failover promotes
/// node1 and waits for node2 to stream from it; node1's postmaster is
/// SIGKILLed in that wait. The first failover ends failed (node2 never
/// streamed); the second failure is declared, and the failover of node1
/// (the latest primary: the highest timeline of the two crashed ones) is
/// refused: nobody provably holds node1's commits (it ran without a
/// synchronous standby). Never more than one node takes writes, nothing is
/// promoted without proof, and every row acknowledged before node1 died is
/// still on its disk (checked once it is started again by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_fault_during_a_failover_promotes_nothing_without_proof() {
    let fleet = primary_and_two_rebuilt_standbys();
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    common::exec(node0, "create table acks (id bigint primary key)").await;
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let c = start_with_auto_failover(&fleet);
    node2.block_route_to(node1.addr()).unwrap();

    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;
    node0.kill_postgres().unwrap();
    let started = Instant::now();
    while !journal_has(&fleet, "failover", "verify", "start") {
        assert!(started.elapsed() < Duration::from_secs(30), "the failover never reached its verify step:\n{}", c.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(writable(&fleet).await, ["node1"]);
    writer.wait_for_more(20).await;
    node1.kill_postgres().unwrap();
    let (acked, uncertain) = writer.finish().await;

    wait_for_log(&c, "automatic failover did not complete", Duration::from_secs(40));
    wait_for_log(&c, "primary node1 failed", Duration::from_secs(30));
    wait_for_log(&c, "automatic failover refused", Duration::from_secs(30));
    let log = c.log_text();
    let refusal = log.lines().find(|l| l.contains("automatic failover refused")).unwrap();
    assert!(refusal.contains("no candidate is known to hold every acknowledged commit"), "{refusal}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(writable(&fleet).await, Vec::<String>::new());
    assert_eq!(one(node2, "select pg_is_in_recovery()").await, "t");
    node2.unblock_route_to(node1.addr()).unwrap();

    // What node1 acknowledged is on its disk: started by hand, it has it.
    node1.start_postgres().unwrap();
    assert_rows_present(node1, &acked, &uncertain).await;
}

/// Whether the journal's latest operation of `kind` has a `step` line with
/// `event`.
fn journal_has(fleet: &TestFleet, kind: &str, step: &str, event: &str) -> bool {
    let out = pgfleet(fleet, &["ops", "list", "--json"]);
    let ops = common::json(&out);
    let Some(op) = ops.as_array().and_then(|a| a.iter().find(|o| o["kind"] == kind).cloned()) else {
        return false;
    };
    let out = pgfleet(fleet, &["ops", "show", op["id"].as_str().unwrap_or_default(), "--json"]);
    common::json(&out)["journal"].as_array().is_some_and(|j| j.iter().any(|e| e["step"] == step && e["event"] == event))
}

/// The primary's lease (asynchronous cluster, `max_lag_on_failover`):
/// node0 cut from everything while a client inside its own host commits
/// through its Unix socket. PostgreSQL would take those commits forever
/// (nothing waits for a standby); its agent fences it once the leader's
/// renewals stop for `lease_ttl - 2s`, and the leader promotes another node
/// only after `lease_ttl`. Checked from outside: the local client's commits
/// went on after the cut (the test can fail), the last one returned before
/// the failover's promote step began (journal time against the client's
/// clock, the same machine's), node0's server is down with standby.signal,
/// its agent logged the expiry, and afterwards exactly one node, the new
/// primary, takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_primary_cut_from_everything_fences_itself_before_another_is_promoted() {
    let fleet = primary_and_two_rebuilt_standbys();
    let p = fleet.host(0);
    common::exec(p, "create table acks (id bigint primary key)").await;
    common::exec(p, "create table local_acks (id bigint primary key)").await;
    let settings = "auto_failover = true\nmax_lag_on_failover = 67108864\nlease_ttl = \"6s\"\n";
    let c = start_with_cluster_settings(&fleet, settings, "");
    wait_for_log(&c, "lease held on the primary", Duration::from_secs(10));
    let writer = Writer::start(&fleet);
    writer.wait_for_more(50).await;

    // The local client: psql over node0's socket, inside its namespace, as
    // an application on that host would.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sock = p.socket_dir().display().to_string();
    let mut cut = None;
    let (local_acked, at_cut) = std::thread::scope(|s| {
        let local = s.spawn(|| {
            let mut acked: Vec<std::time::SystemTime> = Vec::new();
            let mut id = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                id += 1;
                let sql = format!("insert into local_acks values ({id})");
                let out = p
                    .command("psql")
                    .unwrap()
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", &sock, "-U", "postgres", "-d", "postgres", "-c", &sql])
                    .output();
                if out.is_ok_and(|o| o.status.success()) {
                    acked.push(std::time::SystemTime::now());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            acked
        });
        std::thread::sleep(Duration::from_secs(1));
        cut = Some(LinkDown::new(p));
        let at_cut = std::time::SystemTime::now();
        let waited = c.wait_for_log("automatic failover done", Duration::from_secs(60));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked = local.join().unwrap();
        waited.unwrap_or_else(|e| panic!("{e}"));
        (acked, at_cut)
    });
    writer.wait_for_more(50).await;
    writer.finish().await;

    let after_cut = local_acked.iter().filter(|t| **t > at_cut).count();
    assert!(after_cut > 0, "node0 took no local commit after the cut: the test would prove nothing");
    let last = *local_acked.last().unwrap();
    let (op, done) = automatic_op(&fleet, "failover");
    let out = pgfleet(&fleet, &["ops", "show", op["id"].as_str().unwrap(), "--json"]);
    let shown = common::json(&out);
    let journal = shown["journal"].as_array().unwrap();
    let promote = journal.iter().find(|e| e["step"] == "promote" && e["event"] == "start").unwrap_or_else(|| panic!("{shown:#}"));
    let promote_at = rfc3339(promote["time"].as_str().unwrap());
    assert!(last < promote_at, "node0 acknowledged a local commit at {last:?}, after the promotion began at {promote_at:?}");
    eprintln!(
        "lease: {after_cut} local commits after the cut; the last {:?} after it, {:?} before the promotion",
        last.duration_since(at_cut).unwrap_or_default(),
        promote_at.duration_since(last).unwrap_or_default()
    );
    let fence = journal.iter().find(|e| e["step"] == "fence" && e["event"] == "skipped").unwrap_or_else(|| panic!("{shown:#}"));
    assert!(fence["detail"].as_str().unwrap().contains("lease ran out"), "{fence}");
    assert!(!done.iter().any(|d| d == "isolate"), "{done:?}");

    // node0 itself, from inside its host: down, and fenced for good.
    assert!(p.postmaster_pid().unwrap().is_none(), "node0's server still runs after its lease ran out");
    assert!(p.data_dir().join("standby.signal").exists());
    let agent_log = std::fs::read_to_string(p.agent_log()).unwrap();
    assert!(agent_log.contains("lease ran out"), "{agent_log}");
    // Back on the network it stays down (its failover accepted a loss, so
    // the leader leaves it to the operator); one standby took over.
    drop(cut);
    std::thread::sleep(Duration::from_secs(3));
    assert!(p.postmaster_pid().unwrap().is_none(), "node0 was started again after the cut healed");
    let mut w = Vec::new();
    for h in [fleet.host(1), fleet.host(2)] {
        if one(h, "select pg_is_in_recovery()").await == "f" {
            w.push(h.node_name());
        }
    }
    assert_eq!(w.len(), 1, "not exactly one writable standby: {w:?}");
}

/// An RFC 3339 UTC time as the journal writes it
/// ("2026-12-01T01:02:03.456Z").
fn rfc3339(s: &str) -> std::time::SystemTime {
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let millis = ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60_000 + n(17..19) * 1000 + n(20..23);
    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap())
}

/// The agent's side of the lease, through its RPC: a reader may not hold
/// it and a ttl out of range is refused, nothing written; a lease that
/// runs out on a standby fences nothing; a released one never fires; and a
/// primary's agent SIGKILLed and started again still fences its server on
/// the deadline the first process was given (the file beside the data
/// directory), audited. A coordinator stopped on purpose releases the
/// lease it held. Checked in PostgreSQL and on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fences_its_primary_on_the_lease_deadline_across_a_restart_and_never_a_standby() {
    use pgfleet_proto::agent::v1 as pb;
    use pgfleet_proto::agent::v1::agent_client::AgentClient;
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let (p, s) = (fleet.host(0), fleet.host(1));
    let lease_file = |h: &pgfleet_tests::Host| h.data_dir().with_file_name("data.pgfleet-lease");
    let hold = |ttl_ms: u32| pb::HoldLeaseRequest { ttl_ms };

    // A coordinator holding node0's lease and stopped on purpose (SIGTERM)
    // releases it: node0 does not fence itself for it.
    let mut c = start_with_cluster_settings(&fleet, "auto_failover = true\nmax_lag_on_failover = 1048576\nlease_ttl = \"5s\"\n", "");
    wait_for_log(&c, "lease held on the primary", Duration::from_secs(10));
    assert!(lease_file(p).exists());
    let pid = nix::unistd::Pid::from_raw(i32::try_from(c.pid().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for_log(&c, "pgfleet serve stopped", Duration::from_secs(10));
    assert!(!lease_file(p).exists(), "a coordinator stopped on purpose left its lease:\n{}", c.log_text());
    c.kill();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(one(p, "select pg_is_in_recovery()").await, "f");

    let mut reader = AgentClient::new(p.agent_channel_as("test-reader").await.unwrap());
    let e = reader.hold_lease(hold(5000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let mut agent = AgentClient::new(p.agent_channel().await.unwrap());
    for bad in [1000, 3999, 600_001] {
        let e = agent.hold_lease(hold(bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("ttl_ms"), "{e:?}");
    }
    assert!(!lease_file(p).exists());

    // A standby's lease runs out (2 s): nothing fenced, still streaming.
    let mut standby = AgentClient::new(s.agent_channel().await.unwrap());
    let r = standby.hold_lease(hold(4000)).await.unwrap().into_inner();
    assert!(r.taken && r.fence_in_ms == 2000, "{r:?}");
    assert!(lease_file(s).exists());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(one(s, "select status from pg_stat_wal_receiver").await, "streaming");
    assert!(!s.data_dir().join("standby.signal").exists() || one(s, "select pg_is_in_recovery()").await == "t");
    assert!(!lease_file(s).exists(), "a lease run out on a standby is released");

    // Released: never fires.
    agent.hold_lease(hold(4000)).await.unwrap();
    agent.hold_lease(hold(0)).await.unwrap();
    assert!(!lease_file(p).exists());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(one(p, "select pg_is_in_recovery()").await, "f");

    // Held (fenced 3 s from now without a renewal), the agent SIGKILLed and
    // started again: the new process fences on the same deadline.
    let held = Instant::now();
    let r = agent.hold_lease(hold(5000)).await.unwrap().into_inner();
    assert_eq!(r.fence_in_ms, 3000, "{r:?}");
    p.kill_agent().unwrap();
    p.start_agent().unwrap();
    while p.postmaster_pid().unwrap().is_some() {
        assert!(held.elapsed() < Duration::from_secs(6), "node0 still runs 6 s after a 3 s lease deadline:\n{}", fleet.dump_logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let fenced_after = held.elapsed();
    assert!(fenced_after >= Duration::from_millis(2900), "fenced {fenced_after:?} after the hold, before its deadline");
    assert!(p.data_dir().join("standby.signal").exists());
    // Released once the fence is done (pg_controldata read after the stop).
    let stopped = Instant::now();
    while lease_file(p).exists() {
        assert!(stopped.elapsed() < Duration::from_secs(10), "the lease file outlived the fence");
        std::thread::sleep(Duration::from_millis(50));
    }
    let audit = std::fs::read_to_string(p.dir().join("audit.jsonl")).unwrap();
    assert!(audit.lines().any(|l| l.contains("LeaseRunOut") && l.contains("\"ok\"")), "{audit}");
    assert!(audit.lines().any(|l| l.contains("HoldLease") && l.contains("take, ttl 5000 ms")), "{audit}");
    eprintln!("lease of 5 s: node0 fenced {fenced_after:?} after it was taken, its agent restarted in between");
}
