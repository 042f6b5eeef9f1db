//! The agent's service backends run for real. Here the hosts are Debian
//! clusters (`Layout::Debian`: pg_createcluster, /etc/postgresql/15/NAME,
//! scram and per-host pg_hba lines like every test host) that the agent
//! stops and starts through `pg_ctlcluster`, as on a Debian host without
//! systemd.
//! The systemd backend is checked at the process boundary in
//! agent/src/service.rs (systemd is not PID 1 on the test machines).
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{json, pgfleet, status_node};
use pgfleet_tests::{Host, Layout, TestFleet};
use serde_json::Value;

/// `detail` of every finished step of a `--json` rebuild, by step name.
fn step_detail(stdout: &str, step: &str) -> Option<String> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .find(|v| v["type"] == "step_finished" && v["event"]["step"] == step)
        .map(|v| v["event"]["detail"].as_str().unwrap_or_default().to_owned())
}

fn moved_aside(host: &Host) -> Vec<PathBuf> {
    std::fs::read_dir(host.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("data.pgfleet-old-")
        })
        .collect()
}

/// Waits (up to 30 s) until `host`'s WAL receiver streams.
async fn wait_streaming(host: &Host) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = host
            .query_one_string("select coalesce((select status from pg_stat_wal_receiver), 'none')")
            .await
            .unwrap();
        if status == "streaming" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: WAL receiver {status:?}, not streaming",
            host.netns()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_through_pg_ctlcluster_backend() {
    let fleet = TestFleet::with_layout(2, Layout::Debian).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    // node1: a fresh cluster pg_createcluster made, not started.
    node.initdb().unwrap();
    primary.start_agent().unwrap();
    node.start_agent().unwrap();

    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    let n = status_node(&report, "node1");
    assert_eq!(n["service_backend"], "pg_ctlcluster", "{n:#}");
    assert_eq!(n["service_state"], "stopped", "{n:#}");

    // The fresh cluster is stopped: the rebuild starts it through
    // `pg_ctlcluster 15 NAME start`.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        step_detail(&out.stdout, "stop").as_deref(),
        Some("already stopped"),
        "{out}"
    );
    assert_eq!(moved_aside(node).len(), 1);
    assert!(moved_aside(node)[0].join("PG_VERSION").exists());
    assert_eq!(
        node.query_one_string("select pg_is_in_recovery()")
            .await
            .unwrap(),
        "t"
    );
    wait_streaming(node).await;

    // Again, now that it runs as a standby: `pg_ctlcluster 15 NAME stop -m
    // fast`, then start.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let stopped = step_detail(&out.stdout, "stop").unwrap_or_default();
    assert!(stopped.starts_with("stopped"), "{stopped:?}\n{out}");
    assert_eq!(moved_aside(node).len(), 2);
    assert_eq!(
        node.query_one_string("select pg_is_in_recovery()")
            .await
            .unwrap(),
        "t"
    );
    wait_streaming(node).await;
    assert_eq!(
        node.query_one_string("select system_identifier from pg_control_system()")
            .await
            .unwrap(),
        primary
            .query_one_string("select system_identifier from pg_control_system()")
            .await
            .unwrap()
    );
    // It is the Debian cluster that runs: its /etc configuration, its log.
    assert_eq!(
        node.query_one_string("show config_file").await.unwrap(),
        node.debian_etc_dir()
            .join("postgresql.conf")
            .display()
            .to_string()
    );
    assert_eq!(
        node.query_one_string("show cluster_name").await.unwrap(),
        format!("{}/{}", node.major(), node.debian_cluster())
    );

    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    let n = status_node(&report, "node1");
    assert_eq!(n["service_backend"], "pg_ctlcluster", "{n:#}");
    assert_eq!(n["service_state"], "running", "{n:#}");
    assert_eq!(n["role"], "replica", "{n:#}");
}
