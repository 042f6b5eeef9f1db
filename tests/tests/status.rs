//! `pgfleet status` against real servers and agents: roles, replication,
//! lag, stopped servers, unreachable agents, warnings, and its JSON contract.

mod common;

use std::collections::BTreeSet;

use common::*;
use pgfleet_tests::TestFleet;
use serde_json::Value;

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected an object, got {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Every field of `NodeReport` (coordinator/src/fleet_status.rs).
const NODE_KEYS: &[&str] = &[
    "server_major",
    "data_major",
    "binaries_major",
    "name",
    "agent",
    "host",
    "port",
    "reachable",
    "error",
    "role",
    "server_up",
    "down_reason",
    "service_state",
    "service_detail",
    "service_backend",
    "timeline",
    "system_identifier",
    "cluster_state",
    "current_lsn",
    "received_lsn",
    "replayed_lsn",
    "lag_bytes",
    "replay_delay_seconds",
    "replication",
    "wal_receiver",
    "postgres_version",
    "agent_version",
    "hostname",
    "data_directory",
    "disk_free_bytes",
    "disk_total_bytes",
    "checkpoint_lsn",
    "configured_synchronous_standby_names",
    "synchronous_standby_names",
    "sync_rep_waiting",
    "sync_rep_oldest_wait_seconds",
    "missing_synchronous_standbys",
    "slow_change",
    "wal_receiver_error",
];

/// Every field of `UpstreamView`.
const REPLICATION_KEYS: &[&str] = &[
    "application_name",
    "client_addr",
    "state",
    "sync_state",
    "sync_priority",
    "sent_lsn",
    "flush_lsn",
    "replay_lsn",
    "replay_lag_bytes",
    "write_lag_seconds",
    "flush_lag_seconds",
    "replay_lag_seconds",
];

/// Every field of `WalReceiverView`.
const WAL_RECEIVER_KEYS: &[&str] = &["status", "sender_host", "sender_port", "slot_name"];

const SYSID_SQL: &str = "select system_identifier from pg_control_system()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_primary_and_streaming_replica_with_lag() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    exec(
        p,
        "create table t (id int primary key, v text);
         insert into t select g, md5(g::text) from generate_series(1, 5000) g",
    )
    .await;
    wait_replayed(p, r).await;
    // Hold replay back and write more, so the replica measurably lags.
    exec(r, "select pg_wal_replay_pause()").await;
    exec(
        p,
        "insert into t select g, md5(g::text) from generate_series(5001, 10000) g",
    )
    .await;
    let sysid = one(p, SYSID_SQL).await;

    let out = pgfleet(&fleet, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    assert_eq!(report["all_reachable"], true, "{report:#}");
    let cluster = &report["clusters"][0];
    assert_eq!(cluster["name"], "main");
    assert_eq!(cluster["primary"], "node0", "{report:#}");
    assert_eq!(cluster["warnings"], serde_json::json!([]), "{report:#}");

    let n0 = status_node(&report, "node0");
    assert_eq!(n0["reachable"], true);
    assert_eq!(n0["error"], Value::Null);
    assert_eq!(n0["role"], "primary");
    assert_eq!(n0["server_up"], true);
    assert_eq!(n0["service_state"], "running");
    assert_eq!(n0["timeline"], 1);
    assert_eq!(n0["system_identifier"], sysid.as_str());
    assert_eq!(n0["cluster_state"], "in production");
    let primary_lsn = lsn(&n0["current_lsn"]);
    assert_eq!(n0["replayed_lsn"], Value::Null);
    assert_eq!(n0["replication"], Value::Null);

    let n1 = status_node(&report, "node1");
    assert_eq!(n1["reachable"], true);
    assert_eq!(n1["role"], "replica");
    assert_eq!(n1["server_up"], true);
    assert_eq!(n1["timeline"], 1);
    assert_eq!(n1["system_identifier"], sysid.as_str());
    assert_eq!(n1["current_lsn"], Value::Null);
    let received = lsn(&n1["received_lsn"]);
    let replayed = lsn(&n1["replayed_lsn"]);
    assert!(received >= replayed, "{n1:#}");
    let repl = &n1["replication"];
    assert_eq!(repl["state"], "streaming", "{n1:#}");
    assert_eq!(repl["sync_state"], "async", "{n1:#}");
    assert_eq!(repl["client_addr"], r.addr().to_string().as_str(), "{n1:#}");
    assert_eq!(n1["wal_receiver"]["status"], "streaming", "{n1:#}");
    assert_eq!(n1["wal_receiver"]["slot_name"], "r1", "{n1:#}");
    assert_eq!(
        n1["wal_receiver"]["sender_host"],
        p.addr().to_string().as_str(),
        "{n1:#}"
    );
    // Lag: the primary's position minus the replica's replay, in bytes; the
    // second batch of rows is not replayed, so it is well above zero.
    let lag = n1["lag_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("lag_bytes is not a number: {n1:#}"));
    assert_eq!(lag, primary_lsn.bytes_since(replayed), "{report:#}");
    assert!(lag > 100_000, "5000 unreplayed rows but lag_bytes = {lag}");

    // The table: one line per node, roles and the replica's state.
    exec(r, "select pg_wal_replay_resume()").await;
    let out = pgfleet(&fleet, &["status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let l0 = table_line(&out.stdout, "node0");
    assert!(l0.contains("primary"), "{l0}");
    let l1 = table_line(&out.stdout, "node1");
    assert!(
        l1.contains("replica") && l1.contains("streaming") && l1.contains("async"),
        "{l1}"
    );
    assert!(!out.stdout.contains("warning"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_stopped_server_is_down_and_agent_still_answers() {
    let fleet = TestFleet::new(1).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let h = fleet.host(0);
    let sysid = one(h, SYSID_SQL).await;
    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    assert_eq!(
        status_node(&report, "node0")["system_identifier"],
        sysid.as_str()
    );

    h.stop_postgres().unwrap();
    let out = pgfleet(&fleet, &["status", "--json"]);
    // The agent was reached: a stopped server is a status, not a failure.
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    assert_eq!(report["all_reachable"], true);
    let n = status_node(&report, "node0");
    assert_eq!(n["reachable"], true, "{n:#}");
    assert_eq!(n["error"], Value::Null, "{n:#}");
    assert_eq!(n["role"], "down", "{n:#}");
    assert_eq!(n["server_up"], false, "{n:#}");
    assert!(
        n["down_reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{n:#}"
    );
    assert_eq!(n["service_state"], "stopped", "{n:#}");
    assert_eq!(n["service_backend"], "pg_ctl", "{n:#}");
    // From pg_controldata.
    assert_eq!(n["system_identifier"], sysid.as_str(), "{n:#}");
    assert_eq!(n["cluster_state"], "shut down", "{n:#}");
    assert_eq!(n["timeline"], 1, "{n:#}");
    assert_eq!(n["current_lsn"], Value::Null, "{n:#}");
    lsn(&n["checkpoint_lsn"]);
    assert_eq!(report["clusters"][0]["primary"], Value::Null);

    let out = pgfleet(&fleet, &["status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let line = table_line(&out.stdout, "node0");
    assert!(
        line.contains("down") && line.contains("shut down") && line.contains("stopped"),
        "{line}"
    );

    // The same agent sees the server again once it is back.
    h.start_postgres().unwrap();
    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    let n = status_node(&report, "node0");
    assert_eq!(n["role"], "primary", "{n:#}");
    assert_eq!(n["server_up"], true, "{n:#}");
    assert_eq!(n["service_state"], "running", "{n:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shape_is_stable() {
    // A primary, a replica and a node nobody answers for: every kind of
    // node object has the same keys.
    let fleet = primary_and_replica().await;
    fleet
        .write_inventory_with(&[("ghost", &ghost_endpoint(&fleet))])
        .unwrap();
    let out = pgfleet(&fleet, &["status", "--json"]);
    assert_eq!(out.code(), Some(3), "{out}");
    let report = json(&out);

    assert_eq!(keys(&report), set(&["clusters", "all_reachable"]));
    assert!(report["all_reachable"].is_boolean());
    let clusters = report["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1);
    let cluster = &clusters[0];
    assert_eq!(
        keys(cluster),
        set(&["name", "primary", "nodes", "warnings", "policy"])
    );
    assert!(cluster["warnings"].is_array());
    // Automatic failover as the inventory says (off), not paused.
    assert_eq!(
        cluster["policy"],
        serde_json::json!({ "auto_failover": false, "source": "inventory" }),
        "{cluster:#}"
    );
    let nodes = cluster["nodes"].as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node0", "node1", "ghost"], "inventory order");
    for n in nodes {
        assert_eq!(keys(n), set(NODE_KEYS), "node {}", n["name"]);
        assert!(n["port"].is_u64() && n["reachable"].is_boolean() && n["server_up"].is_boolean());
        assert!(n["role"].is_string() && n["agent"].is_string() && n["host"].is_string());
    }

    let n0 = status_node(&report, "node0");
    lsn(&n0["current_lsn"]);
    let sysid = n0["system_identifier"].as_str().unwrap();
    // A decimal string: a 64-bit identifier does not survive JSON numbers.
    assert!(
        !sysid.is_empty() && sysid.bytes().all(|b| b.is_ascii_digit()),
        "{sysid}"
    );
    assert!(n0["timeline"].is_u64());
    assert!(n0["disk_free_bytes"].is_u64() && n0["disk_total_bytes"].is_u64());
    for k in [
        "agent_version",
        "hostname",
        "data_directory",
        "postgres_version",
    ] {
        assert!(n0[k].is_string(), "{k}: {n0:#}");
    }

    let n1 = status_node(&report, "node1");
    lsn(&n1["received_lsn"]);
    lsn(&n1["replayed_lsn"]);
    assert!(n1["lag_bytes"].is_u64(), "{n1:#}");
    let repl = &n1["replication"];
    assert_eq!(keys(repl), set(REPLICATION_KEYS));
    for k in ["sent_lsn", "flush_lsn", "replay_lsn"] {
        lsn(&repl[k]);
    }
    assert!(repl["sync_priority"].is_i64());
    assert_eq!(keys(&n1["wal_receiver"]), set(WAL_RECEIVER_KEYS));
    assert!(n1["wal_receiver"]["sender_port"].is_u64());

    let ghost = status_node(&report, "ghost");
    assert_eq!(ghost["reachable"], false);
    assert_eq!(ghost["role"], "unknown");
    assert!(ghost["error"].is_string());
    for k in NODE_KEYS {
        if ![
            "name",
            "agent",
            "host",
            "port",
            "reachable",
            "error",
            "role",
            "server_up",
            "sync_rep_waiting",
            "missing_synchronous_standbys",
        ]
        .contains(k)
        {
            assert_eq!(ghost[k], Value::Null, "{k}: {ghost:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_unreachable_agent_and_exits_3() {
    let fleet = primary_and_replica().await;
    fleet.host(1).kill_agent().unwrap();
    let ghost = ghost_endpoint(&fleet);
    fleet.write_inventory_with(&[("ghost", &ghost)]).unwrap();

    let out = pgfleet(&fleet, &["status", "--json"]);
    assert_eq!(out.code(), Some(3), "{out}");
    let report = json(&out);
    assert_eq!(report["all_reachable"], false);

    let dead_agent = fleet.host(1).agent_endpoint();
    for (name, endpoint) in [("node1", dead_agent.as_str()), ("ghost", ghost.as_str())] {
        let n = status_node(&report, name);
        assert_eq!(n["reachable"], false, "{n:#}");
        assert_eq!(n["role"], "unknown", "{n:#}");
        assert_eq!(n["server_up"], false, "{n:#}");
        let error = n["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(endpoint),
            "{name}: error {error:?} does not name {endpoint}"
        );
        assert!(error.contains("unreachable"), "{name}: {error:?}");
    }
    // A closed port says so.
    let error = status_node(&report, "node1")["error"].as_str().unwrap();
    assert!(error.to_lowercase().contains("refused"), "{error}");

    // The rest of the fleet is still fully reported.
    let n0 = status_node(&report, "node0");
    assert_eq!(n0["reachable"], true, "{n0:#}");
    assert_eq!(n0["role"], "primary", "{n0:#}");
    assert_eq!(n0["server_up"], true, "{n0:#}");
    lsn(&n0["current_lsn"]);
    assert!(n0["system_identifier"].is_string(), "{n0:#}");
    assert_eq!(report["clusters"][0]["primary"], "node0");

    let out = pgfleet(&fleet, &["status"]);
    assert_eq!(out.code(), Some(3), "{out}");
    for name in ["node1", "ghost"] {
        let line = table_line(&out.stdout, name);
        assert!(
            line.contains("unreachable") && line.contains("unknown"),
            "{line}"
        );
    }
    assert!(table_line(&out.stdout, "node0").contains("primary"));
    assert!(
        out.stdout.contains("not every agent could be reached"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_flags_a_foreign_system_identifier() {
    // node0 primary, node1 its replica, node2 a server of its own (own
    // initdb) listed in the same cluster by mistake.
    let fleet = TestFleet::new(3).unwrap();
    start_primary(&fleet, 0);
    fleet
        .make_replica_with_pg_basebackup(1, 0, "r1")
        .await
        .unwrap();
    start_primary(&fleet, 2);
    start_agents(&fleet);
    let ours = one(fleet.host(0), SYSID_SQL).await;
    let foreign = one(fleet.host(2), SYSID_SQL).await;
    assert_ne!(ours, foreign);

    // Running, it is a second primary.
    let out = pgfleet(&fleet, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    let cluster = &report["clusters"][0];
    assert_eq!(status_node(&report, "node2")["role"], "primary");
    assert_eq!(
        status_node(&report, "node2")["system_identifier"],
        foreign.as_str()
    );
    assert_eq!(cluster["primary"], Value::Null, "{report:#}");
    let warnings: Vec<&str> = cluster["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("2 nodes report being primary")
                && w.contains("node0")
                && w.contains("node2")
                && !w.contains("node1")),
        "{warnings:?}"
    );
    let out = pgfleet(&fleet, &["status"]);
    assert!(
        out.stdout
            .contains("warning: main: 2 nodes report being primary"),
        "{out}"
    );

    // Stopped, it is no primary, but its control file still shows it is not
    // a copy of this cluster; the real replica is not flagged.
    fleet.host(2).stop_postgres().unwrap();
    let out = pgfleet(&fleet, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    let cluster = &report["clusters"][0];
    assert_eq!(cluster["primary"], "node0", "{report:#}");
    assert_eq!(status_node(&report, "node2")["role"], "down");
    let warnings: Vec<&str> = cluster["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0];
    assert!(
        w.contains("node2")
            && w.contains("system identifier")
            && w.contains(&foreign)
            && w.contains(&ours)
            && !w.contains("node1"),
        "{w}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_cluster_filter_and_unknown_cluster() {
    let fleet = TestFleet::new(1).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    // Cluster "other" has only a node nobody answers for: leaving it out
    // must make the run complete.
    let text = format!(
        "{}\n[[clusters]]\nname = \"main\"\n{}\n[[clusters]]\nname = \"other\"\n{}",
        fleet.inventory_tls_toml(),
        host_node_toml(fleet.host(0)),
        node_toml(
            "ghost",
            &ghost_endpoint(&fleet),
            &format!("198.18.{}.250", fleet.n())
        )
    );
    write_inventory_text(&fleet, &text);

    // (A short connect deadline: the ghost only ever times out.)
    let out = pgfleet(&fleet, &["status", "--json", "--connect-timeout", "1s"]);
    assert_eq!(out.code(), Some(3), "{out}");
    assert_eq!(json(&out)["clusters"].as_array().unwrap().len(), 2);

    let out = pgfleet(&fleet, &["status", "--cluster", "main", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let report = json(&out);
    let clusters = report["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1, "{report:#}");
    assert_eq!(clusters[0]["name"], "main");
    let nodes = clusters[0]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{report:#}");
    assert_eq!(nodes[0]["name"], "node0");
    assert_eq!(nodes[0]["role"], "primary");
    assert_eq!(report["all_reachable"], true);

    let out = pgfleet(&fleet, &["status", "--cluster", "main"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(table_lines(&out.stdout, "ghost").is_empty(), "{out}");
    table_line(&out.stdout, "node0");

    let out = pgfleet(
        &fleet,
        &[
            "status",
            "--cluster",
            "other",
            "--json",
            "--connect-timeout",
            "1s",
        ],
    );
    assert_eq!(out.code(), Some(3), "{out}");
    let report = json(&out);
    assert_eq!(report["clusters"][0]["name"], "other");
    assert_eq!(report["clusters"][0]["nodes"][0]["name"], "ghost");
    assert_eq!(report["clusters"][0]["nodes"].as_array().unwrap().len(), 1);

    for args in [
        &["status", "--cluster", "nope"][..],
        &["status", "--cluster", "nope", "--json"][..],
    ] {
        let out = pgfleet(&fleet, args);
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stdout.is_empty(), "{out}");
        assert!(out.stderr.contains("\"nope\""), "{out}");
        assert!(out.stderr.contains("known: main, other"), "{out}");
    }
}

/// GetStatus from the agent's snapshot: many concurrent callers cost one
/// read of the server (counted in the server's own statement log), every
/// answer says its age and none is older than the interval plus a read, a
/// `fresh` call sees a change made in PostgreSQL a moment before, and a
/// change the agent makes is never answered from an older snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_status_answers_from_a_snapshot_that_many_callers_share() {
    use pgfleet_proto::agent::v1 as pb;
    use pgfleet_proto::agent::v1::agent_client::AgentClient;
    use std::time::{Duration, Instant};

    let fleet = TestFleet::new(1).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let p = fleet.host(0);
    let channel = p.agent_channel().await.unwrap();
    // Every statement in the server log: the status read is the one that
    // asks pg_last_xact_replay_timestamp().
    exec(p, "alter system set log_statement = 'all'").await;
    exec(p, "select pg_reload_conf()").await;
    let reads = || {
        std::fs::read_to_string(p.postgres_log())
            .unwrap()
            .lines()
            .filter(|l| l.contains("pg_last_xact_replay_timestamp"))
            .count()
    };
    let calls = |n: usize, fresh: bool| {
        let channel = channel.clone();
        async move {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let mut c = AgentClient::new(channel.clone());
                set.spawn(async move { c.get_status(pb::GetStatusRequest { fresh }).await.unwrap().into_inner() });
            }
            set.join_all().await
        }
    };
    // Warm: one read made the snapshot.
    calls(1, true).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let before = reads();
    let started = Instant::now();
    let answers = calls(100, false).await;
    let took = started.elapsed();
    let after = reads();
    assert!(answers.iter().all(|a| a.server_up));
    // The snapshot was older than the interval: one read for 100 callers
    // (two if the calls straddled another interval).
    let allowed = 1 + usize::from(took > Duration::from_millis(500));
    assert!(after - before >= 1 && after - before <= allowed, "{} reads for 100 callers in {took:?}", after - before);
    // No answer older than the interval plus one read.
    let oldest = answers.iter().map(|a| a.snapshot_age_ms).max().unwrap();
    assert!(oldest <= 500 + 250, "oldest answer {oldest} ms");

    // A change made in PostgreSQL directly: a fresh call sees it at once.
    exec(p, "alter system set synchronous_standby_names = 'node9'").await;
    exec(p, "select pg_reload_conf()").await;
    let fresh = calls(1, true).await.remove(0);
    assert_eq!(fresh.synchronous_standby_names.as_deref(), Some("node9"));
    assert!(fresh.snapshot_age_ms < 250, "a fresh answer {} ms old", fresh.snapshot_age_ms);

    // A change the agent makes: the next default answer is after it.
    let out = pgfleet(&fleet, &["sync", "set", "--off"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let next = calls(1, false).await.remove(0);
    assert_eq!(next.synchronous_standby_names.as_deref(), Some(""), "answered from a snapshot older than the change");
}
