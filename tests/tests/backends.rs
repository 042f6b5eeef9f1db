//! The agent's service backends run for real. The fleet's hosts run
//! PostgreSQL through pg_ctl; here one host's server is a Debian cluster
//! (pg_createcluster, /etc/postgresql/15/NAME) that the agent stops and
//! starts through `pg_ctlcluster`, as on a Debian host without systemd.
//! The systemd backend is checked at the process boundary in
//! agent/src/service.rs (systemd is not PID 1 on the test machines).
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{json, pgfleet, status_node};
use pgfleet_tests::host::tail;
use pgfleet_tests::{AgentOptions, Host, TestFleet, net};
use serde_json::Value;

const PG_VERSION: &str = "15";

/// A Debian cluster `15/NAME` made by pg_createcluster; dropped (stopped
/// first) with its /etc/postgresql directory when this goes out of scope,
/// also after a failed test. Declared after the fleet, so dropped before it.
struct DebianCluster {
    name: String,
    data_dir: PathBuf,
}

impl DebianCluster {
    /// `pg_createcluster 15 pft<N>r` (as root, in the root namespace) with
    /// its data directory in `host`'s directory and its socket in the
    /// host's socket directory; the server listens on the host's address
    /// and trusts the fleet's subnet. Not started.
    fn create(fleet: &TestFleet, host: &Host) -> DebianCluster {
        let name = format!("pft{}r", fleet.n());
        let data_dir = host.dir().join("cluster-data");
        // A cluster of that name left by a killed run of the same network.
        if Path::new(&format!("/etc/postgresql/{PG_VERSION}/{name}")).exists() {
            drop_cluster(&name);
        }
        let cluster = DebianCluster { name, data_dir };
        root(&[
            "pg_createcluster",
            PG_VERSION,
            &cluster.name,
            "-d",
            &cluster.data_dir.display().to_string(),
            "-p",
            "5432",
            "-s",
            &host.socket_dir().display().to_string(),
            "--",
            "-A",
            "trust",
            "--no-sync",
        ]);
        let etc = cluster.etc_dir();
        std::fs::write(
            etc.join("conf.d/pgfleet-test.conf"),
            format!(
                "listen_addresses = '{addr}'\n\
                 ssl = off\n\
                 wal_level = replica\n\
                 hot_standby = on\n\
                 max_wal_senders = 10\n\
                 max_replication_slots = 10\n\
                 fsync = off\n\
                 shared_buffers = 16MB\n",
                addr = host.addr()
            ),
        )
        .unwrap();
        let subnet = net::subnet(fleet.n());
        let hba = etc.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str(&format!(
            "host all all {subnet} trust\nhost replication all {subnet} trust\n"
        ));
        std::fs::write(&hba, text).unwrap();
        cluster
    }

    fn etc_dir(&self) -> PathBuf {
        PathBuf::from(format!("/etc/postgresql/{PG_VERSION}/{}", self.name))
    }

    fn log_file(&self) -> PathBuf {
        PathBuf::from(format!(
            "/var/log/postgresql/postgresql-{PG_VERSION}-{}.log",
            self.name
        ))
    }

    /// The agent's `[service]` table for this cluster.
    fn service_toml(&self) -> String {
        format!(
            "backend = \"pg_ctlcluster\"\nversion = \"{PG_VERSION}\"\ncluster = \"{}\"\n",
            self.name
        )
    }
}

impl Drop for DebianCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} (end) ---\n{}",
                self.log_file().display(),
                tail(&self.log_file(), 40)
            );
        }
        drop_cluster(&self.name);
    }
}

fn drop_cluster(name: &str) {
    let out = Command::new("pg_dropcluster")
        .args(["--stop", PG_VERSION, name])
        .output();
    match out {
        Ok(o) if !o.status.success() => eprintln!(
            "pg_dropcluster {name}: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("pg_dropcluster {name}: {e}"),
        Ok(_) => {}
    }
    // pg_dropcluster leaves files it did not create (our conf.d file).
    let _ = std::fs::remove_dir_all(format!("/etc/postgresql/{PG_VERSION}/{name}"));
}

/// Runs `argv` as root in the root namespace; panics with its output unless
/// it exits 0.
fn root(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "`{}`: {}\nstdout:\n{}\nstderr:\n{}",
        argv.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
                .starts_with("cluster-data.pgfleet-old-")
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
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    let cluster = DebianCluster::create(&fleet, node);
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    primary.start_agent().unwrap();
    node.start_agent_with(&AgentOptions {
        data_dir: Some(cluster.data_dir.clone()),
        service_toml: Some(cluster.service_toml()),
        ..AgentOptions::default()
    })
    .unwrap();

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
        cluster
            .etc_dir()
            .join("postgresql.conf")
            .display()
            .to_string()
    );
    assert_eq!(
        node.query_one_string("show cluster_name").await.unwrap(),
        format!("{PG_VERSION}/{}", cluster.name)
    );

    let report = json(&pgfleet(&fleet, &["status", "--json"]));
    let n = status_node(&report, "node1");
    assert_eq!(n["service_backend"], "pg_ctlcluster", "{n:#}");
    assert_eq!(n["service_state"], "running", "{n:#}");
    assert_eq!(n["role"], "replica", "{n:#}");
}
