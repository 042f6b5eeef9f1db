//! Helpers shared by the end-to-end test files: fleet set-ups that several
//! tests start from, direct SQL, and reading the CLI's JSON and tables.
// Not every test file uses every helper. Helpers may unwrap like the tests
// they serve (clippy.toml allows it only inside test functions).
#![allow(dead_code, clippy::unwrap_used)]

pub mod writer;

use std::time::{Duration, Instant};

use pgfleet_proto::Lsn;
use pgfleet_tests::{CliOutput, Host, TestFleet};
use serde_json::Value;

/// Host `i` as a fresh primary: initdb and start.
pub fn start_primary(fleet: &TestFleet, i: usize) {
    let h = fleet.host(i);
    h.initdb().unwrap();
    h.start_postgres().unwrap();
}

/// Starts the agent of every host.
pub fn start_agents(fleet: &TestFleet) {
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
}

/// A two-host fleet: node0 primary, node1 streaming from it through slot
/// `r1` (plain pg_basebackup), both agents running.
pub async fn primary_and_replica() -> TestFleet {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    fleet
        .make_replica_with_pg_basebackup(1, 0, "r1")
        .await
        .unwrap();
    start_agents(&fleet);
    fleet
}

/// What the command said was wrong: stderr from its `error:` line on.
pub fn error_of(out: &CliOutput) -> String {
    match out.stderr.find("error:") {
        Some(i) => out.stderr[i..].trim_end().to_owned(),
        None => panic!("no error line in:\n{out}"),
    }
}

/// An agent endpoint in the fleet's subnet that no host has: nobody answers.
pub fn ghost_endpoint(fleet: &TestFleet) -> String {
    format!("https://198.18.{}.250:7420", fleet.n())
}

/// Writes `text` as the fleet's inventory (what `fleet.pgfleet` uses).
pub fn write_inventory_text(fleet: &TestFleet, text: &str) {
    std::fs::write(fleet.inventory_path(), text).unwrap();
}

/// One `[[clusters.nodes]]` table.
pub fn node_toml(name: &str, agent: &str, host: &str) -> String {
    format!(
        "\n[[clusters.nodes]]\nname = \"{name}\"\nagent = \"{agent}\"\nhost = \"{host}\"\nport = 5432\n"
    )
}

/// The inventory entry of a fleet host.
pub fn host_node_toml(h: &Host) -> String {
    node_toml(&h.node_name(), &h.agent_endpoint(), &h.addr().to_string())
}

/// Runs the CLI; panics (with its output and the fleet's logs printed by the
/// fleet's drop) if it could not be run at all.
pub fn pgfleet(fleet: &TestFleet, args: &[&str]) -> CliOutput {
    let out = fleet.pgfleet(args).unwrap();
    eprintln!("$ pgfleet {}\n{out}", args.join(" "));
    out
}

/// stdout of a `--json` run, parsed.
pub fn json(out: &CliOutput) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{out}"))
}

/// The node object named `name` in a `status --json` report.
pub fn status_node<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["nodes"].as_array().unwrap())
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {report:#}"))
}

/// The table line of node `name` (second column), for CLI tables whose first
/// two columns are CLUSTER and NODE.
pub fn table_lines<'a>(stdout: &'a str, node: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(node))
        .collect()
}

/// The one table line of node `name`.
pub fn table_line<'a>(stdout: &'a str, node: &str) -> &'a str {
    match table_lines(stdout, node).as_slice() {
        [line] => line,
        other => panic!("expected one line for {node}, found {other:?} in:\n{stdout}"),
    }
}

/// An LSN string as PostgreSQL writes it ("0/3000060"), parsed.
pub fn lsn(v: &Value) -> Lsn {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected an LSN string, got {v}"));
    assert!(
        s.split_once('/').is_some_and(|(hi, lo)| {
            [hi, lo].iter().all(|h| {
                !h.is_empty()
                    && h.len() <= 8
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            })
        }),
        "{s:?} is not an LSN like 0/3000060"
    );
    Lsn::parse(s).unwrap()
}

/// The rows of `sql` on `host`, every value in PostgreSQL's text form.
pub async fn rows(host: &Host, sql: &str) -> Vec<Vec<Option<String>>> {
    let client = host.connect().await.unwrap();
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql:?} on {}: {e}", host.netns()))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Runs statements on `host`.
pub async fn exec(host: &Host, sql: &str) {
    let client = host.connect().await.unwrap();
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql:?} on {}: {e}", host.netns()));
}

/// One value.
pub async fn one(host: &Host, sql: &str) -> String {
    host.query_one_string(sql).await.unwrap()
}

/// Waits (up to 30 s) until the replica `replica` has replayed everything the
/// primary `primary` had written when this was called.
pub async fn wait_replayed(primary: &Host, replica: &Host) {
    let target = one(primary, "select pg_current_wal_lsn()").await;
    let sql = format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while one(replica, &sql).await != "t" {
        assert!(
            Instant::now() < deadline,
            "{} did not replay up to {target} within 30 s",
            replica.netns()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(application_name, state, sync_state)` of every WAL sender on `host`.
pub async fn senders(host: &Host) -> Vec<(String, String, String)> {
    rows(
        host,
        "select application_name, state, sync_state from pg_stat_replication \
         order by application_name",
    )
    .await
    .into_iter()
    .map(|r| {
        let v = |i: usize| r[i].clone().unwrap_or_default();
        (v(0), v(1), v(2))
    })
    .collect()
}
