//! `pgfleet rebuild NODE`, end to end: real PostgreSQL servers, real agents
//! in their own network namespaces and the real CLI, checked against what
//! PostgreSQL itself reports (pg_is_in_recovery(), pg_stat_replication,
//! pg_replication_slots, pg_hba.conf, the rows a client committed) and what
//! is on disk (moved-aside directories, the pg_basebackup log, the
//! passfile). DESIGN.md, "Safety invariants" 1-4, 8 and 9.
// Helpers may unwrap like the tests they serve (clippy.toml allows it only
// inside test functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::rows;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use pgfleet_tests::process::{pg_user, processes_where};
use pgfleet_tests::{AgentOptions, CliOutput, Host, TestFleet};
use serde_json::Value;

const ROLE: &str = "pgfleet_replication";
/// How long a spawned CLI may take to print what the test waits for.
const CLI_WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// SQL and the CLI

/// Runs the CLI; panics (the fleet's drop prints the logs) if it could not
/// be run at all.
fn pgfleet(fleet: &TestFleet, args: &[&str]) -> CliOutput {
    let out = fleet.pgfleet(args).unwrap();
    eprintln!("$ pgfleet {}\n{out}", args.join(" "));
    out
}

async fn exec(host: &Host, sql: &str) {
    let client = host.connect().await.unwrap();
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql:?} on {}: {e}", host.netns()));
}

async fn one(host: &Host, sql: &str) -> String {
    host.query_one_string(sql).await.unwrap()
}

/// `(slot_name, active)` of every slot on `host`, by name.
async fn slots(host: &Host) -> Vec<(String, bool)> {
    rows(
        host,
        "select slot_name, active from pg_replication_slots order by slot_name",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].as_deref() == Some("t")))
    .collect()
}

/// `(application_name, client address, state)` of every WAL sender on
/// `host`.
async fn walsenders(host: &Host) -> Vec<(String, String, String)> {
    rows(
        host,
        "select application_name, host(client_addr), state from pg_stat_replication \
         order by application_name",
    )
    .await
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap_or_default(),
            r[1].clone().unwrap_or_default(),
            r[2].clone().unwrap_or_default(),
        )
    })
    .collect()
}

async fn role_exists(host: &Host) -> bool {
    one(
        host,
        &format!("select count(*) from pg_roles where rolname = '{ROLE}'"),
    )
    .await
        != "0"
}

/// Waits (up to 60 s) until `replica` has replayed everything `primary` had
/// written when this was called.
async fn wait_replayed(primary: &Host, replica: &Host) {
    let target = one(primary, "select pg_current_wal_lsn()").await;
    let sql = format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while one(replica, &sql).await != "t" {
        assert!(
            Instant::now() < deadline,
            "{} did not replay up to {target} within 60 s",
            replica.netns()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON values a `--json` run printed: note lines, event lines, and the
/// (pretty-printed) result, in order.
fn json_values(stdout: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("stdout is not a JSON stream ({e}):\n{stdout}")))
        .collect()
}

/// The job events (objects with a `type`) of a `--json` run.
fn events(stdout: &str) -> Vec<Value> {
    json_values(stdout)
        .into_iter()
        .filter(|v| v.get("type").is_some())
        .collect()
}

/// The `result` object of a successful `--json` run.
fn result(out: &CliOutput) -> Value {
    json_values(&out.stdout)
        .into_iter()
        .find_map(|v| v.get("result").cloned())
        .unwrap_or_else(|| panic!("no result object in:\n{out}"))
}

/// The `finished` event of a `--json` run.
fn finished(out: &CliOutput) -> Value {
    events(&out.stdout)
        .into_iter()
        .find(|e| e["type"] == "finished")
        .map(|e| e["event"].clone())
        .unwrap_or_else(|| panic!("no finished event in:\n{out}"))
}

/// Names of the steps that finished, in order.
fn finished_steps(stdout: &str) -> Vec<String> {
    events(stdout)
        .iter()
        .filter(|e| e["type"] == "step_finished")
        .map(|e| e["event"]["step"].as_str().unwrap().to_owned())
        .collect()
}

fn is_progress_under_way(line: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return false;
    };
    let (done, total) = (
        v["event"]["done_bytes"].as_u64(),
        v["event"]["total_bytes"].as_u64(),
    );
    v["type"] == "progress" && matches!((done, total), (Some(d), Some(t)) if d < t)
}

fn is_step_started(line: &str, step: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|v| v["type"] == "step_started" && v["event"]["step"] == step)
}

// ---------------------------------------------------------------------------
// Fleets and files

/// A fleet of `hosts` hosts: host0 a fresh primary, every agent running.
fn primary_and_agents(hosts: usize) -> TestFleet {
    let fleet = TestFleet::new(hosts).unwrap();
    let primary = fleet.host(0);
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
    fleet
}

/// Adds a table `filler` of about `mib` MiB to `host` (rows of ~500 bytes,
/// too short to be compressed): something for a copy to take time over.
async fn add_filler(host: &Host, mib: u32) {
    let rows = mib * 2048;
    exec(
        host,
        &format!(
            "create table filler as select g as id, repeat(md5(g::text), 14) as pad \
             from generate_series(1, {rows}) g"
        ),
    )
    .await;
    exec(host, "checkpoint").await;
}

fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}

/// Writes `old-marker` (random bytes, owned by postgres) into `dir` and
/// returns its content.
fn write_marker(dir: &Path) -> Vec<u8> {
    let content = random_bytes(64);
    let path = dir.join("old-marker");
    std::fs::write(&path, &content).unwrap();
    let user = pg_user().unwrap();
    nix::unistd::chown(&path, Some(user.uid), Some(user.gid)).unwrap();
    content
}

/// Gives `host` a data directory of its own (initdb, a table `old_t` with
/// three rows, stopped again) and an `old-marker` file in it; returns the
/// marker's content.
async fn old_cluster(host: &Host) -> Vec<u8> {
    host.initdb().unwrap();
    host.start_postgres().unwrap();
    exec(
        host,
        "create table old_t(x int); insert into old_t values (1), (2), (3)",
    )
    .await;
    host.stop_postgres().unwrap();
    write_marker(&host.data_dir())
}

/// Makes `dir` (creating it) owned by postgres, mode 0700.
fn postgres_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let user = pg_user().unwrap();
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// One entry of a directory tree, for comparing trees exactly.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
}

/// Every file (with its content), directory and symlink under `root`, by
/// path relative to it.
fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let t = e.file_type().unwrap();
            if t.is_symlink() {
                out.insert(rel, Entry::Symlink(std::fs::read_link(&path).unwrap()));
            } else if t.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else {
                out.insert(rel, Entry::File(std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Asserts two trees are the same, naming the paths that differ.
fn assert_same_tree(
    before: &BTreeMap<PathBuf, Entry>,
    after: &BTreeMap<PathBuf, Entry>,
    what: &str,
) {
    let differ: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: {} paths differ, e.g. {:?}",
        differ.len(),
        &differ[..differ.len().min(10)]
    );
}

/// Names in `dir` (not recursive), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The moved-aside copies of `host`'s data directory.
fn moved_aside(host: &Host) -> Vec<PathBuf> {
    names(host.dir())
        .into_iter()
        .filter(|n| n.starts_with("data.pgfleet-old-"))
        .map(|n| host.dir().join(n))
        .collect()
}

/// The rebuild logs next to `host`'s data directory.
fn rebuild_logs(host: &Host) -> Vec<PathBuf> {
    names(host.dir())
        .into_iter()
        .filter(|n| n.starts_with("data.pgfleet-rebuild-") && n.ends_with(".log"))
        .map(|n| host.dir().join(n))
        .collect()
}

/// `<stamp>` of `<prefix><stamp><suffix>`, checked to be a UTC stamp like
/// 20261129T031849Z.
fn stamp_of(path: &str, prefix: &str, suffix: &str) -> String {
    let name = Path::new(path).file_name().unwrap().to_str().unwrap();
    let stamp = name
        .strip_prefix(prefix)
        .and_then(|s| s.strip_suffix(suffix))
        .unwrap_or_else(|| panic!("{name:?} is not {prefix}<stamp>{suffix}"));
    let b = stamp.as_bytes();
    assert!(
        b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit),
        "{stamp:?} is not a UTC stamp like 20261129T031849Z"
    );
    stamp.to_owned()
}

/// The postmaster named in `host`'s postmaster.pid, if it runs.
fn postmaster_alive(host: &Host) -> Option<Pid> {
    // (A postmaster.pid being written may not name its pid yet.)
    let pid = host.postmaster_pid().ok().flatten()?;
    pgfleet_tests::process::proc_stat(pid)
        .filter(|s| s.state != 'Z')
        .map(|_| pid)
}

/// The value of `name = '...'` in a postgresql.auto.conf text, unquoted.
fn auto_conf_value(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        if k.trim() != name {
            return None;
        }
        let v = v.trim();
        let v = v.strip_prefix('\'')?.strip_suffix('\'')?;
        Some(v.replace("''", "'"))
    })
}

/// The value of `key` in a libpq connection string (quoted or not).
fn conninfo_value(conninfo: &str, key: &str) -> Option<String> {
    let at = conninfo.find(&format!("{key}="))? + key.len() + 1;
    let rest = &conninfo[at..];
    if let Some(quoted) = rest.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '\'' => return Some(out),
                c => out.push(c),
            }
        }
        None
    } else {
        Some(
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

/// pg_basebackup processes anywhere on the machine writing into `data`.
fn basebackups_into(data: &Path) -> Vec<(Pid, Vec<String>)> {
    let data = data.display().to_string();
    processes_where(|argv| {
        argv.first().is_some_and(|p| p.ends_with("pg_basebackup")) && argv.contains(&data)
    })
}

/// What a refused rebuild must leave as it was, on the node and on its
/// upstream.
#[derive(Debug, PartialEq, Eq)]
struct Untouched {
    /// Names in the node's host directory: no moved-aside copy, no rebuild
    /// log, no passfile appears.
    node_dir: Vec<String>,
    /// The node's data directory's own entries.
    data_dir: Vec<String>,
    marker: Option<Vec<u8>>,
    postmaster: Option<Pid>,
    /// Slot names only: whether a slot is in use comes and goes with
    /// reconnects.
    upstream_slots: Vec<String>,
    upstream_hba: Vec<u8>,
}

impl Untouched {
    /// The same without the upstream's pg_hba.conf, which the upstream
    /// step of a rebuild changes before the node's agent checks anything.
    fn on_node(self) -> Untouched {
        Untouched {
            upstream_hba: Vec::new(),
            ..self
        }
    }
}

async fn untouched(node: &Host, upstream: &Host) -> Untouched {
    let data = node.data_dir();
    Untouched {
        node_dir: names(node.dir()),
        data_dir: if data.exists() {
            names(&data)
        } else {
            Vec::new()
        },
        marker: std::fs::read(data.join("old-marker")).ok(),
        postmaster: postmaster_alive(node),
        upstream_slots: slots(upstream)
            .await
            .into_iter()
            .map(|(name, _)| name)
            .collect(),
        upstream_hba: std::fs::read(upstream.data_dir().join("pg_hba.conf")).unwrap(),
    }
}

// ---------------------------------------------------------------------------
// 1. An empty node becomes a streaming replica, and stays one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_of_an_empty_node_streams() {
    let fleet = primary_and_agents(2);
    let (primary, node) = (fleet.host(0), fleet.host(1));
    assert!(!node.data_dir().exists());

    // The dry run's typed plan is what runs: its steps, by index, in the
    // journal.
    let dry = pgfleet(&fleet, &["rebuild", "node1", "--dry-run", "--json"]);
    assert_eq!(dry.code(), Some(0), "{dry}");
    let planned: Vec<String> = json_values(&dry.stdout)[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s["host"].as_str().unwrap(), s["step"].as_str().unwrap()))
        .collect();
    assert_eq!(planned, ["node0 admit", "node1 rebuild", "node0 confirm"]);

    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("rebuilt node1 from node0"), "{out}");
    let ops = pgfleet(&fleet, &["ops", "list", "--json"]);
    let id = json_values(&ops.stdout)[0].as_array().unwrap()[0]["id"].as_str().unwrap().to_owned();
    let shown = pgfleet(&fleet, &["ops", "show", &id, "--json"]);
    let journal = json_values(&shown.stdout)[0]["journal"].as_array().unwrap().clone();
    let started: Vec<(u64, String)> = journal
        .iter()
        .filter(|e| e["event"] == "start")
        .filter_map(|e| Some((e["index"].as_u64()?, e["step"].as_str()?.to_owned())))
        .collect();
    assert_eq!(
        started,
        [(0, "admit".to_owned()), (1, "rebuild".to_owned()), (2, "confirm".to_owned())],
        "the journal's steps are not the plan's: {shown}"
    );
    assert!(journal.iter().any(|e| e["step"] == "job" && e["event"] == "started"), "{shown}");

    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(one(primary, "select pg_is_in_recovery()").await, "f");
    let senders = walsenders(primary).await;
    assert!(
        senders.contains(&("node1".into(), node.addr().to_string(), "streaming".into())),
        "pg_stat_replication on the primary: {senders:?}"
    );
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);

    // pg_hba.conf: the one line for this replica, the old file kept.
    let hba = std::fs::read_to_string(primary.data_dir().join("pg_hba.conf")).unwrap();
    let line = format!("host replication {ROLE} {}/32 scram-sha-256", node.addr());
    assert!(
        hba.lines().any(|l| l.trim() == line),
        "{line:?} not in:\n{hba}"
    );
    let backups: Vec<String> = names(&primary.data_dir())
        .into_iter()
        .filter(|n| n.starts_with("pg_hba.conf.pgfleet-"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let backup = std::fs::read_to_string(primary.data_dir().join(&backups[0])).unwrap();
    assert!(
        !backup.contains(&line),
        "the backup is the file before the change"
    );
    assert_eq!(
        one(
            primary,
            &format!(
                "select rolreplication and rolcanlogin from pg_roles where rolname = '{ROLE}'"
            )
        )
        .await,
        "t"
    );

    // primary_conninfo names the standby and a lasting passfile.
    let auto = std::fs::read_to_string(node.data_dir().join("postgresql.auto.conf")).unwrap();
    let conninfo = auto_conf_value(&auto, "primary_conninfo")
        .unwrap_or_else(|| panic!("no primary_conninfo in:\n{auto}"));
    assert_eq!(
        conninfo_value(&conninfo, "application_name").as_deref(),
        Some("node1"),
        "{conninfo}"
    );
    assert_eq!(
        conninfo_value(&conninfo, "user").as_deref(),
        Some(ROLE),
        "{conninfo}"
    );
    assert!(!conninfo.contains("password="), "{conninfo}");
    assert_eq!(
        auto_conf_value(&auto, "primary_slot_name").as_deref(),
        Some("node1")
    );
    let passfile = PathBuf::from(
        conninfo_value(&conninfo, "passfile")
            .unwrap_or_else(|| panic!("no passfile in {conninfo}")),
    );
    let meta = std::fs::metadata(&passfile).unwrap_or_else(|e| {
        panic!(
            "passfile {} named in primary_conninfo: {e}",
            passfile.display()
        )
    });
    assert_eq!(
        meta.uid(),
        pg_user().unwrap().uid.as_raw(),
        "owner of {}",
        passfile.display()
    );
    assert_eq!(meta.mode() & 0o777, 0o600, "mode of {}", passfile.display());
    assert!(
        !passfile.starts_with(node.data_dir()),
        "inside the data directory it would be copied along"
    );
    let pass_text = std::fs::read_to_string(&passfile).unwrap();
    for part in fleet.replication_password_parts() {
        assert!(pass_text.contains(&part), "the passfile holds the password");
    }

    // The standby reconnects after a restart with that passfile alone
    // (DESIGN.md invariant 9): pg_hba.conf demands scram-sha-256 from it.
    node.stop_postgres().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while walsenders(primary).await.iter().any(|w| w.0 == "node1") {
        assert!(
            Instant::now() < deadline,
            "node1's WAL sender outlived its server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots(primary).await, [("node1".to_owned(), false)]);
    node.start_postgres().unwrap();
    fleet.wait_streaming(1, 0).await.unwrap();
    let senders = walsenders(primary).await;
    assert!(
        senders.contains(&("node1".into(), node.addr().to_string(), "streaming".into())),
        "after the restart: {senders:?}"
    );
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);
}

// ---------------------------------------------------------------------------
// 2. The old data directory is moved aside, never deleted (invariant 1).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_moves_old_data_directory_aside_intact() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    let marker = old_cluster(node).await;
    let before = tree(&node.data_dir());
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }

    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = result(&out);
    let first = r["moved_aside_to"]
        .as_str()
        .unwrap_or_else(|| panic!("{r:#}"))
        .to_owned();
    let stamp = stamp_of(&first, "data.pgfleet-old-", "");
    assert_eq!(Path::new(&first).parent(), Some(node.dir()));
    assert_eq!(
        std::fs::read(Path::new(&first).join("old-marker")).unwrap(),
        marker
    );
    assert_same_tree(&before, &tree(Path::new(&first)), "the moved-aside copy");

    // The new data directory is a copy of the primary, in recovery.
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(one(node, "select to_regclass('old_t') is null").await, "t");
    assert!(!node.data_dir().join("old-marker").exists());
    assert_eq!(
        one(node, "select system_identifier from pg_control_system()").await,
        one(primary, "select system_identifier from pg_control_system()").await
    );

    // pg_basebackup's output is kept next to it, same stamp.
    let log = r["log_file"].as_str().unwrap_or_else(|| panic!("{r:#}"));
    assert_eq!(stamp_of(log, "data.pgfleet-rebuild-", ".log"), stamp);
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("base backup completed"), "{log}:\n{text}");
    assert!(
        text.contains("created replication slot \"node1\""),
        "{log}:\n{text}"
    );

    // Again, now that node1 streams and holds its own slot: released after
    // the stop, a second moved-aside copy, the first one untouched.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let steps = finished_steps(&out.stdout);
    assert!(steps.contains(&"release-slot".to_owned()), "{steps:?}");
    let second = result(&out)["moved_aside_to"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    let mut copies = moved_aside(node);
    copies.sort();
    let mut expected = vec![PathBuf::from(&first), PathBuf::from(&second)];
    expected.sort();
    assert_eq!(copies, expected);
    assert!(
        Path::new(&second).join("standby.signal").exists(),
        "the second copy was the replica"
    );
    assert_same_tree(
        &before,
        &tree(Path::new(&first)),
        "the first copy after the second rebuild",
    );
    assert_eq!(rebuild_logs(node).len(), 2);
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);
}

// ---------------------------------------------------------------------------
// 3. Writes during the rebuild all reach the new replica.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_with_writes_running_keeps_data() {
    let fleet = primary_and_agents(2);
    let (primary, node) = (fleet.host(0), fleet.host(1));
    add_filler(primary, 16).await;
    exec(
        primary,
        "create table w(id bigserial primary key, at timestamptz default now())",
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let client = primary.connect().await.unwrap();
    let writer = {
        let (stop, committed) = (stop.clone(), committed.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                client
                    .execute("insert into w default values", &[])
                    .await
                    .map_err(|e| format!("insert: {e}"))?;
                committed.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, String>(())
        })
    };
    while committed.load(Ordering::SeqCst) < 100 {
        assert!(!writer.is_finished(), "the writer stopped early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let before = committed.load(Ordering::SeqCst);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    let during = committed.load(Ordering::SeqCst) - before;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(during > 0, "no row was committed while the rebuild ran");
    // A little more streaming onto the new replica, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap().unwrap();
    let acknowledged = committed.load(Ordering::SeqCst);

    wait_replayed(primary, node).await;
    let on_primary = one(primary, "select count(*) from w").await;
    assert_eq!(
        on_primary,
        acknowledged.to_string(),
        "every acknowledged insert is on the primary"
    );
    assert_eq!(one(node, "select count(*) from w").await, on_primary);
    assert_eq!(
        one(node, "select max(id) from w").await,
        one(primary, "select max(id) from w").await
    );
    assert_eq!(
        one(node, "select count(*) from filler").await,
        one(primary, "select count(*) from filler").await
    );
    eprintln!("{during} rows committed while the rebuild ran, {acknowledged} in all");
}

// ---------------------------------------------------------------------------
// 4. Tablespaces: refused where the agent may not write, relocated with
//    --tablespace-mapping into an allowed root.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_with_tablespace_mapping() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    let ts_primary = primary.dir().join("ts");
    postgres_dir(&ts_primary);
    // CREATE TABLESPACE refuses to run inside a (multi-statement) transaction.
    exec(
        primary,
        &format!("create tablespace ts1 location '{}'", ts_primary.display()),
    )
    .await;
    exec(
        primary,
        "create table in_ts(id int, v text) tablespace ts1; \
         insert into in_ts select g, 'row ' || g from generate_series(1, 1000) g",
    )
    .await;
    // Outside host1's own directory: writable only when allowed.
    let root = fleet.dir().join("h1-tablespaces");
    postgres_dir(&root);
    let ts_node = root.join("ts");
    let marker = old_cluster(node).await;
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }

    let before = untouched(node, primary).await.on_node();
    // No mapping: the tablespace would land at host0's path.
    let out = pgfleet(&fleet, &["rebuild", "node1"]);
    assert!(matches!(out.code(), Some(1 | 2)), "{out}");
    assert!(
        out.stderr.contains(&ts_primary.display().to_string())
            && out
                .stderr
                .contains("outside the directories this agent may write"),
        "{out}"
    );
    // Mapped, but outside the agent's data parent and allowed_roots.
    let mapping = format!("{}={}", ts_primary.display(), ts_node.display());
    let out = pgfleet(
        &fleet,
        &["rebuild", "node1", "--tablespace-mapping", &mapping],
    );
    assert!(matches!(out.code(), Some(1 | 2)), "{out}");
    assert!(
        out.stderr.contains(&ts_node.display().to_string())
            && out
                .stderr
                .contains("outside the directories this agent may write"),
        "{out}"
    );
    assert_eq!(untouched(node, primary).await.on_node(), before);
    assert!(!ts_node.exists());
    assert_eq!(
        std::fs::read(node.data_dir().join("old-marker")).unwrap(),
        marker
    );

    // With that root allowed, the copy goes there.
    node.kill_agent().unwrap();
    node.start_agent_with(&AgentOptions {
        allowed_roots: vec![root.clone()],
        ..AgentOptions::default()
    })
    .unwrap();
    let out = pgfleet(
        &fleet,
        &["rebuild", "node1", "--tablespace-mapping", &mapping],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(one(node, "select count(*) from in_ts").await, "1000");
    assert_eq!(one(node, "select v from in_ts where id = 7").await, "row 7");
    let oid = one(
        primary,
        "select oid from pg_tablespace where spcname = 'ts1'",
    )
    .await;
    let link = std::fs::read_link(node.data_dir().join("pg_tblspc").join(&oid)).unwrap();
    assert_eq!(link, ts_node);
    assert_eq!(
        one(
            node,
            "select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'"
        )
        .await,
        ts_node.display().to_string()
    );
    assert!(
        names(&ts_node).iter().any(|n| n.starts_with(&format!("PG_{}_", node.major()))),
        "{:?}",
        names(&ts_node)
    );
    // The primary's tablespace directory was only read.
    assert_eq!(one(primary, "select count(*) from in_ts").await, "1000");
}

// ---------------------------------------------------------------------------
// 5. Refusals that change nothing.

/// The running primary, an unreachable upstream and invalid arguments:
/// refused, nothing changed on either host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_refuses_running_primary_bad_arguments_and_unreachable_upstream() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    fleet
        .make_replica_with_pg_basebackup(1, 0, "r1")
        .await
        .unwrap();
    write_marker(&node.data_dir());
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
    let before = untouched(node, primary).await;
    assert!(before.postmaster.is_some());
    let primary_pid = postmaster_alive(primary).unwrap();

    // The running primary is never the target (invariant 2).
    let out = pgfleet(&fleet, &["rebuild", "node0"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("node0 is the running primary"), "{out}");
    assert_eq!(one(primary, "select pg_is_in_recovery()").await, "f");
    assert_eq!(postmaster_alive(primary), Some(primary_pid));
    assert!(!role_exists(primary).await);
    assert!(moved_aside(primary).is_empty() && rebuild_logs(primary).is_empty());
    assert_eq!(untouched(node, primary).await, before);

    // Invalid names and mappings are refused before any call: even with the
    // upstream's agent gone, the error is about the argument (exit 2).
    primary.kill_agent().unwrap();
    for (args, says) in [
        (&["--slot", "x'); drop table t; --"][..], "slot"),
        (&["--slot", "R1"][..], "slot"),
        (&["--tablespace-mapping", "relative=/x"][..], "absolute"),
        (&["--tablespace-mapping", "/a=/b=/c"][..], "'='"),
        (&["--tablespace-mapping", "/a/../etc=/x"][..], "'..'"),
        (&["--from", "node1"][..], "itself"),
        (&["--from", "nosuch"][..], "nosuch"),
    ] {
        let mut argv = vec!["rebuild", "node1"];
        argv.extend_from_slice(args);
        let out = pgfleet(&fleet, &argv);
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stderr.contains(says), "expected {says:?} in:\n{out}");
        assert!(!out.stderr.contains("cannot reach"), "{out}");
    }

    // The upstream's agent is gone.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--from", "node0"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("cannot reach the agent of upstream node0"),
        "{out}"
    );
    let out = pgfleet(&fleet, &["rebuild", "node1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no running primary"), "{out}");
    assert_eq!(untouched(node, primary).await, before);

    // The upstream's server is down, its agent up.
    primary.start_agent().unwrap();
    primary.stop_postgres().unwrap();
    let out = pgfleet(&fleet, &["rebuild", "node1", "--from", "node0"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("cannot reach PostgreSQL on upstream node0"),
        "{out}"
    );
    let out = pgfleet(&fleet, &["rebuild", "node1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no running primary"), "{out}");
    primary.start_postgres().unwrap();
    assert_eq!(untouched(node, primary).await, before);
    assert!(!role_exists(primary).await);

    // The fleet reaches both, but node1 cannot reach node0: its agent's
    // upstream check fails before anything on node1 changes (invariant 3).
    node.block_route_to(primary.addr()).unwrap();
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    node.unblock_route_to(primary.addr()).unwrap();
    assert_eq!(out.code(), Some(1), "{out}");
    let f = finished(&out);
    assert_eq!(f["failed_step"], "check-upstream", "{f:#}");
    assert_eq!(f["node_changed"], false, "{f:#}");
    assert!(
        out.stderr
            .contains("does not answer a replication connection"),
        "{out}"
    );
    let after = untouched(node, primary).await;
    assert_eq!(after.node_dir, before.node_dir);
    assert_eq!(after.data_dir, before.data_dir);
    assert_eq!(after.marker, before.marker);
    assert_eq!(
        after.postmaster, before.postmaster,
        "node1's server kept running"
    );
    assert_eq!(
        after.upstream_slots, before.upstream_slots,
        "no slot was created"
    );
    assert_eq!(after.upstream_slots, ["r1"]);
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
}

/// The upstream refuses the replication role: refused at check-upstream,
/// classified as an authentication problem, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_refuses_when_replication_auth_fails() {
    let fleet = primary_and_agents(2);
    let (primary, node) = (fleet.host(0), fleet.host(1));
    let out = pgfleet(&fleet, &["rebuild", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    write_marker(&node.data_dir());
    let before = untouched(node, primary).await;
    assert_eq!(before.upstream_slots, ["node1"]);
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);

    // An expired password: PrepareUpstream sets the password again but not
    // VALID UNTIL, so the server turns the role away (SCRAM fails).
    exec(
        primary,
        &format!("alter role {ROLE} valid until '2000-01-01'"),
    )
    .await;
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let f = finished(&out);
    assert_eq!(f["failed_step"], "check-upstream", "{f:#}");
    assert_eq!(f["node_changed"], false, "{f:#}");
    assert!(
        out.stderr
            .contains(&format!("refuses replication connections as {ROLE}"))
            && out.stderr.contains("password authentication failed"),
        "{out}"
    );
    assert_eq!(untouched(node, primary).await, before);
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    exec(
        primary,
        &format!("alter role {ROLE} valid until 'infinity'"),
    )
    .await;

    // A DBA's `reject` line for this replica above pgfleet's own line.
    let hba_path = primary.data_dir().join("pg_hba.conf");
    let hba = std::fs::read_to_string(&hba_path).unwrap();
    let reject = format!("host replication {ROLE} {}/32 reject\n", node.addr());
    std::fs::write(&hba_path, format!("{reject}{hba}")).unwrap();
    exec(primary, "select pg_reload_conf()").await;
    let before = untouched(node, primary).await;
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let f = finished(&out);
    assert_eq!(f["failed_step"], "check-upstream", "{f:#}");
    assert_eq!(f["node_changed"], false, "{f:#}");
    assert!(
        out.stderr
            .contains("pg_hba.conf rejects replication connection"),
        "{out}"
    );
    assert_eq!(untouched(node, primary).await, before);
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    // The server answered and turned the role away: an authentication
    // refusal ("check the role's password and the pg_hba.conf line"), not
    // an unreachable upstream.
    assert!(
        out.stderr
            .contains(&format!("refuses replication connections as {ROLE}")),
        "a pg_hba.conf `reject` is reported as an unreachable upstream:\n{out}"
    );
}

/// An upstream that is not a copy of the cluster: refused on the system
/// identifier, whether the inventory pins it or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_refuses_upstream_with_another_system_identifier() {
    let fleet = TestFleet::new(3).unwrap();
    let (primary, node, stranger) = (fleet.host(0), fleet.host(1), fleet.host(2));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    fleet
        .make_replica_with_pg_basebackup(1, 0, "node1")
        .await
        .unwrap();
    write_marker(&node.data_dir());
    stranger.initdb().unwrap();
    stranger.start_postgres().unwrap();
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
    let ours = one(primary, "select system_identifier from pg_control_system()").await;
    let foreign = one(
        stranger,
        "select system_identifier from pg_control_system()",
    )
    .await;
    assert_ne!(ours, foreign);
    let before = untouched(node, primary).await;
    let stranger_hba = std::fs::read(stranger.data_dir().join("pg_hba.conf")).unwrap();

    let refused = |out: &CliOutput| {
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(
            out.stderr.contains("system identifier") && out.stderr.contains(&foreign),
            "{out}"
        );
    };
    // The inventory pins the cluster's identity.
    let text = fleet.inventory_toml("main", &[]).unwrap().replacen(
        "replication_password_file",
        &format!("system_identifier = \"{ours}\"\nreplication_password_file"),
        1,
    );
    std::fs::write(fleet.inventory_path(), text).unwrap();
    refused(&pgfleet(&fleet, &["rebuild", "node1", "--from", "node2"]));
    assert_eq!(untouched(node, primary).await, before);
    assert!(!role_exists(stranger).await);

    // Not pinned: node0 and node1 share the cluster's identity, node2 does
    // not (and also claims to be a primary).
    fleet.write_inventory().unwrap();
    let out = pgfleet(&fleet, &["rebuild", "node1", "--from", "node2"]);
    let after = untouched(node, primary).await;
    let stranger_changed = role_exists(stranger).await
        || std::fs::read(stranger.data_dir().join("pg_hba.conf")).unwrap() != stranger_hba;
    refused(&out);
    assert_eq!(after, before);
    assert!(
        !stranger_changed,
        "the foreign server was prepared as an upstream"
    );
}

/// Too little space for the copy: refused at check-space, naming the bytes
/// needed and free; nothing moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_refuses_when_space_is_short() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    add_filler(primary, 100).await;
    primary.start_agent().unwrap();
    // A 160 MiB filesystem holding node1's old data directory (~40 MiB):
    // room for an empty cluster's copy, not for this one.
    let small = node.dir().join("small");
    node.mount_tmpfs(&small, 160).unwrap();
    let data = small.join("data");
    let argv: Vec<&std::ffi::OsStr> = vec![
        "initdb".as_ref(),
        "-D".as_ref(),
        data.as_os_str(),
        "-A".as_ref(),
        "trust".as_ref(),
        "-U".as_ref(),
        "postgres".as_ref(),
        "--no-sync".as_ref(),
    ];
    node.run(&argv).unwrap();
    let marker = write_marker(&data);
    let old = tree(&data);
    node.start_agent_with(&AgentOptions {
        data_dir: Some(data.clone()),
        ..AgentOptions::default()
    })
    .unwrap();
    let small_before = names(&small);
    let node_dir_before = names(node.dir());
    let slots_before = slots(primary).await;

    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let f = finished(&out);
    assert_eq!(f["failed_step"], "check-space", "{f:#}");
    assert_eq!(f["node_changed"], false, "{f:#}");
    // "... the copy needs N bytes (10% margin included) and M are free ..."
    let msg = f["error"].as_str().unwrap();
    let number_after = |word: &str| -> u64 {
        let at = msg
            .find(word)
            .unwrap_or_else(|| panic!("{word:?} not in {msg:?}"))
            + word.len();
        msg[at..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {word:?} in {msg:?}"))
    };
    let (needed, free) = (
        number_after("the copy needs"),
        number_after("included) and"),
    );
    let size: u64 = one(
        primary,
        "select sum(pg_database_size(oid)) from pg_database",
    )
    .await
    .parse()
    .unwrap();
    assert!(needed > free, "{msg}");
    assert!(
        needed >= size,
        "needs {needed} for a {size} byte upstream: {msg}"
    );
    assert!(
        free <= 160 * 1024 * 1024,
        "free {free} is more than the tmpfs holds: {msg}"
    );
    assert!(out.stderr.contains("not enough space"), "{out}");

    assert_eq!(names(&small), small_before);
    assert_eq!(names(node.dir()), node_dir_before);
    assert_eq!(std::fs::read(data.join("old-marker")).unwrap(), marker);
    assert_same_tree(&old, &tree(&data), "node1's data directory");
    assert_eq!(slots(primary).await, slots_before);
}

// ---------------------------------------------------------------------------
// 6. and 7. Interrupted copies.

/// host0 with ~30 MiB of data sending at 80 Mbit/s: the copy takes a few
/// seconds, long enough to act in the middle of it.
async fn slow_copy_fleet() -> TestFleet {
    let fleet = TestFleet::new(2).unwrap();
    let primary = fleet.host(0);
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    add_filler(primary, 30).await;
    primary.limit_egress("80mbit").unwrap();
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_survives_agent_sigkill_mid_copy_then_succeeds() {
    let fleet = slow_copy_fleet().await;
    let (primary, node) = (fleet.host(0), fleet.host(1));
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }

    let mut cli = fleet
        .pgfleet_spawn(&["rebuild", "node1", "--json"])
        .unwrap();
    let line = cli.wait_for_line(CLI_WAIT, is_progress_under_way).unwrap();
    assert!(
        !basebackups_into(&node.data_dir()).is_empty(),
        "no pg_basebackup at {line}"
    );
    node.kill_agent().unwrap();

    // pg_basebackup dies with its agent (PR_SET_PDEATHSIG), and so does the
    // WAL streamer it forked (-X stream): left alive, that one keeps slot
    // node1 in use and writes into the abandoned copy.
    let killed = Instant::now();
    let survivors = loop {
        let left = basebackups_into(&node.data_dir());
        if left.is_empty() || killed.elapsed() > Duration::from_secs(5) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        survivors.is_empty(),
        "pg_basebackup processes outlived their agent by {:?}: {}",
        killed.elapsed(),
        survivors
            .iter()
            .map(|(pid, argv)| format!(
                "pid {pid} (parent {:?}; this test, the subreaper, is {}): {}",
                pgfleet_tests::process::proc_stat(*pid).map(|s| s.ppid),
                std::process::id(),
                argv.join(" ")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let ns_left: Vec<_> = node
        .processes()
        .unwrap()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a.contains("pg_basebackup")))
        .collect();
    assert!(ns_left.is_empty(), "{ns_left:?}");

    // The CLI says the job's stream ended and how to re-attach.
    let out = cli.wait(CLI_WAIT).unwrap();
    eprintln!("{out}");
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("--attach"), "{out}");

    primary.clear_egress_limit().unwrap();
    node.start_agent().unwrap();
    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    // The partial copy was moved aside, not deleted.
    assert!(result(&out)["moved_aside_to"].is_string(), "{out}");
    assert_eq!(moved_aside(node).len(), 1);
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(
        one(node, "select count(*) from filler").await,
        one(primary, "select count(*) from filler").await
    );
    // No orphan: the slot of the killed copy was replaced by this one.
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);
    let senders = walsenders(primary).await;
    assert_eq!(
        senders,
        [("node1".into(), node.addr().to_string(), "streaming".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_fails_cleanly_when_primary_stops_mid_copy() {
    let fleet = slow_copy_fleet().await;
    let (primary, node) = (fleet.host(0), fleet.host(1));
    let marker = old_cluster(node).await;
    let old = tree(&node.data_dir());
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }

    let mut cli = fleet
        .pgfleet_spawn(&["rebuild", "node1", "--json"])
        .unwrap();
    cli.wait_for_line(CLI_WAIT, is_progress_under_way).unwrap();
    primary.stop_postgres().unwrap();
    let out = cli.wait(CLI_WAIT).unwrap();
    eprintln!("{out}");
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("failed at step basebackup"), "{out}");
    let f = finished(&out);
    assert_eq!(f["failed_step"], "basebackup", "{f:#}");
    assert!(!f["stderr_tail"].as_array().unwrap().is_empty(), "{f:#}");

    // The old data directory: moved aside, intact (invariant 4).
    let moved = f["moved_aside_to"]
        .as_str()
        .unwrap_or_else(|| panic!("{f:#}"));
    assert!(
        out.stderr.contains(moved),
        "the error says where the old directory is:\n{out}"
    );
    assert_eq!(
        std::fs::read(Path::new(moved).join("old-marker")).unwrap(),
        marker
    );
    assert_same_tree(&old, &tree(Path::new(moved)), "the moved-aside copy");
    // The full pg_basebackup log, with its error.
    let log = f["log_file"].as_str().unwrap_or_else(|| panic!("{f:#}"));
    assert!(out.stderr.contains(log), "{out}");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("pg_basebackup: error:"), "{log}:\n{text}");
    assert!(text.contains("# exit:"), "{log}:\n{text}");
    for line in f["stderr_tail"].as_array().unwrap() {
        assert!(text.contains(line.as_str().unwrap()), "{line} not in {log}");
    }
    // pg_basebackup removed its partial copy itself.
    assert!(text.contains("removing data directory"), "{log}:\n{text}");
    assert!(!node.data_dir().exists());
    // The slot could not be dropped on a stopped server: the error says so
    // and how.
    assert!(
        out.stderr.contains("pgfleet slots drop node0 node1"),
        "{out}"
    );

    primary.clear_egress_limit().unwrap();
    primary.start_postgres().unwrap();
    let out = pgfleet(&fleet, &["rebuild", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);
    assert_eq!(moved_aside(node), [PathBuf::from(moved)]);
    assert_same_tree(&old, &tree(Path::new(moved)), "the first moved-aside copy");
}

// ---------------------------------------------------------------------------
// A server that takes a moment to start.

/// A copy of the PostgreSQL bin directory in `dir` whose `postgres` waits
/// `delay` before starting the server (as a loaded machine or slow storage
/// would): symlinks to every program, except pg_ctl (a copy: it looks for
/// `postgres` next to its own resolved path) and postgres (a wrapper).
fn slow_postgres_bin_dir(host: &Host, dir: &Path, delay: &str) {
    pgfleet_tests::host::wrapped_bin_dir(dir, host.pg_bin_dir(), &format!("sleep {delay}\nexec \"$REAL\" \"$@\"")).unwrap();
}

/// `pg_ctl -W start` returns as soon as it has forked the server, before
/// the server writes postmaster.pid: a server that takes longer than the
/// agent's first look must not count as one that exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_waits_for_a_slow_starting_server() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    primary.start_agent().unwrap();
    let bin = node.dir().join("slow-bin");
    slow_postgres_bin_dir(node, &bin, "0.5");
    node.start_agent_with(&AgentOptions {
        bin_dir: Some(bin),
        ..AgentOptions::default()
    })
    .unwrap();

    let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
    if out.code() != Some(0) {
        // Did the server really exit? Give it the moment it needs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while postmaster_alive(node).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let up = postmaster_alive(node).is_some()
            && one(node, "select pg_is_in_recovery()").await == "t";
        panic!(
            "the rebuild failed; {}:\n{out}",
            if up {
                "yet the server it called exited came up as a standby moments later"
            } else {
                "the server did not come up either"
            }
        );
    }
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);
}

// ---------------------------------------------------------------------------
// 8. --dry-run

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_dry_run_changes_nothing() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    // node1 already streams through slot node1 (so the plan releases it).
    fleet
        .make_replica_with_pg_basebackup(1, 0, "node1")
        .await
        .unwrap();
    write_marker(&node.data_dir());
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
    let before = untouched(node, primary).await;

    let out = pgfleet(&fleet, &["rebuild", "node1", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let plan = json_values(&out.stdout);
    assert_eq!(plan.len(), 1, "{out}");
    assert_eq!(plan[0]["dry_run"], true);
    // The typed plan: the upstream admits node1, its agent rebuilds it,
    // the upstream confirms it streams.
    let typed: Vec<(&str, &str)> = plan[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["host"].as_str().unwrap(), s["step"].as_str().unwrap()))
        .collect();
    assert_eq!(typed, [("node0", "admit"), ("node1", "rebuild"), ("node0", "confirm")], "{out}");
    // Under it, what each agent will do, from their own dry runs.
    let steps = plan[0]["agent_steps"].as_array().unwrap();
    let on = |host: &str| -> Vec<&str> {
        steps
            .iter()
            .filter(|s| s["host"] == host)
            .map(|s| s["step"].as_str().unwrap())
            .collect()
    };
    assert_eq!(
        on("node0"),
        ["replication-role", "hba", "stale-slot", "confirm"]
    );
    assert_eq!(
        on("node1"),
        [
            "check-local",
            "check-upstream",
            "check-space",
            "stop",
            "release-slot",
            "move-aside",
            "passfile",
            "basebackup",
            "start",
            "wait-streaming"
        ]
    );
    let basebackup = steps.iter().find(|s| s["step"] == "basebackup").unwrap();
    let argv: Vec<&str> = basebackup["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(argv[0].ends_with("/pg_basebackup"), "{argv:?}");
    for w in [
        ["-X", "stream"],
        ["-S", "node1"],
        ["-U", ROLE],
        ["-D", &node.data_dir().display().to_string()],
    ] {
        assert!(argv.windows(2).any(|p| p == w), "{w:?} not in {argv:?}");
    }
    let host = primary.addr().to_string();
    assert!(
        argv.windows(2).any(|p| p == ["-h", host.as_str()]),
        "{argv:?}"
    );
    for flag in ["-C", "-R"] {
        assert!(argv.contains(&flag), "{flag} not in {argv:?}");
    }
    assert!(!argv.iter().any(|a| a.contains("password")), "{argv:?}");
    let role_sql = steps[0]["sql"].as_str().unwrap();
    assert!(role_sql.contains("[SECRET]"), "{role_sql}");
    assert!(argv.contains(&"--checkpoint=fast"), "{argv:?}");
    let out = pgfleet(
        &fleet,
        &[
            "rebuild",
            "node1",
            "--dry-run",
            "--json",
            "--checkpoint",
            "spread",
        ],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let plan = json_values(&out.stdout);
    let spread = plan[0]["agent_steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "basebackup")
        .unwrap()["argv"]
        .clone();
    assert!(
        spread
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--checkpoint=spread"),
        "{spread}"
    );

    // The same plan for people.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout
            .contains("plan (dry run, nothing changed): rebuild node1 from node0"),
        "{out}"
    );
    assert!(
        out.stdout.lines().any(|l| l.trim_start().starts_with("$ ")
            && l.contains("pg_basebackup")
            && l.contains("-X stream")),
        "{out}"
    );
    for part in fleet.replication_password_parts() {
        assert!(
            !out.stdout.contains(&part) && !out.stderr.contains(&part),
            "{out}"
        );
    }

    // Nothing changed: no role, same pg_hba.conf and slots, node1 as it was.
    assert!(!role_exists(primary).await);
    assert_eq!(untouched(node, primary).await, before);
    assert!(
        !names(&primary.data_dir())
            .iter()
            .any(|n| n.starts_with("pg_hba.conf.pgfleet-")),
        "no pg_hba.conf backup"
    );
    assert!(
        !fleet.state_dir().join("main.journal").exists(),
        "a dry run is not journaled"
    );
    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
}

// ---------------------------------------------------------------------------
// 9. The password appears nowhere but in the passfile (invariant 9).

/// Every process's argv and environment, every 20 ms, until stopped:
/// returns what was seen carrying one of `needles`, and the sample count.
fn watch_processes(
    needles: Vec<String>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, u64)> {
    std::thread::spawn(move || {
        let mut hits = Vec::new();
        let mut samples = 0u64;
        while !stop.load(Ordering::SeqCst) {
            samples += 1;
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                for what in ["cmdline", "environ"] {
                    let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{what}")) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&bytes);
                    if needles.iter().any(|n| text.contains(n.as_str())) {
                        hits.push(format!("/proc/{pid}/{what}: {}", text.replace('\0', " ")));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (hits, samples)
    })
}

/// Files under `dir` holding one of `needles`, except `allowed`.
fn files_containing(dir: &Path, needles: &[String], allowed: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(path);
            } else if t.is_file() && !allowed.contains(&path) {
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&bytes);
                if needles.iter().any(|n| text.contains(n.as_str())) {
                    found.push(path);
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_password_never_leaks() {
    let fleet = TestFleet::new(2).unwrap();
    let (primary, node) = (fleet.host(0), fleet.host(1));
    primary.initdb().unwrap();
    primary.start_postgres().unwrap();
    // Every statement and connection in the primary's log.
    // (ALTER SYSTEM refuses to run inside a multi-statement transaction.)
    exec(primary, "alter system set log_statement = 'all'").await;
    exec(primary, "alter system set log_connections = on").await;
    exec(primary, "select pg_reload_conf()").await;
    old_cluster(node).await;
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }
    let needles = fleet.replication_password_parts();
    assert_eq!(needles.len(), 5);

    // Twice: the second run moves aside a replica whose
    // postgresql.auto.conf has a primary_conninfo.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_processes(needles.clone(), stop.clone());
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let out = pgfleet(&fleet, &["rebuild", "node1", "--json"]);
        assert_eq!(out.code(), Some(0), "{out}");
        outputs.push(out);
    }
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    outputs.push(out);
    stop.store(true, Ordering::SeqCst);
    let (hits, samples) = watcher.join().unwrap();
    assert!(samples >= 20, "only {samples} samples of the process table");
    assert!(
        hits.is_empty(),
        "the password in a process listing: {hits:#?}"
    );

    for out in &outputs {
        for n in &needles {
            assert!(
                !out.stdout.contains(n) && !out.stderr.contains(n),
                "the password in the CLI's output:\n{out}"
            );
        }
    }
    // The files the brief names, by name first (clearer failures) ...
    let mut named = vec![
        primary.agent_log(),
        node.agent_log(),
        primary.postgres_log(),
        node.postgres_log(),
        primary.data_dir().join("pg_hba.conf"),
        node.data_dir().join("postgresql.auto.conf"),
    ];
    named.extend(rebuild_logs(node));
    named.extend(
        moved_aside(node)
            .iter()
            .map(|d| d.join("postgresql.auto.conf")),
    );
    assert_eq!(rebuild_logs(node).len(), 3);
    assert_eq!(moved_aside(node).len(), 3);
    for path in &named {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
        for n in &needles {
            assert!(
                !text.contains(n.as_str()),
                "the password in {}",
                path.display()
            );
        }
    }
    let second_copy_conf = std::fs::read_to_string(
        moved_aside(node)
            .iter()
            .max()
            .unwrap()
            .join("postgresql.auto.conf"),
    )
    .unwrap();
    assert!(second_copy_conf.contains("passfile="), "{second_copy_conf}");
    // ... then every file of the fleet: only the passfile and the
    // inventory's password file hold it.
    let passfile = node.dir().join("pgfleet-replication.pgpass");
    let allowed = [passfile.clone(), fleet.replication_password_file()];
    let leaked = files_containing(fleet.dir(), &needles, &allowed);
    assert!(leaked.is_empty(), "the password in {leaked:?}");
    // The agents' temporary passfiles for the upstream check (in their
    // $TMPDIR, /tmp) are gone.
    let leftovers: Vec<String> = names(Path::new("/tmp"))
        .into_iter()
        .filter(|n| n.starts_with("pgfleet-check-"))
        .filter(|n| {
            let text = String::from_utf8_lossy(
                &std::fs::read(Path::new("/tmp").join(n)).unwrap_or_default(),
            )
            .into_owned();
            needles.iter().any(|p| text.contains(p.as_str()))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary passfiles left behind: {leftovers:?}"
    );
    let pass_text = std::fs::read_to_string(&passfile).unwrap();
    assert!(needles.iter().all(|n| pass_text.contains(n.as_str())));

    // The server keeps a SCRAM verifier, not the password.
    let stored = one(
        primary,
        &format!("select rolpassword from pg_authid where rolname = '{ROLE}'"),
    )
    .await;
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    assert!(needles.iter().all(|n| !stored.contains(n.as_str())));
}

// ---------------------------------------------------------------------------
// 10. Jobs: re-attach, one at a time.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_attach_replays_the_job() {
    let fleet = slow_copy_fleet().await;
    let (primary, node) = (fleet.host(0), fleet.host(1));
    for h in fleet.hosts() {
        h.start_agent().unwrap();
    }

    let mut cli = fleet
        .pgfleet_spawn(&["rebuild", "node1", "--json"])
        .unwrap();
    let note = cli
        .wait_for_line(CLI_WAIT, |l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["note"].as_str().is_some_and(|n| n.starts_with("job ")))
        })
        .unwrap();
    let note: Value = serde_json::from_str(&note).unwrap();
    assert_eq!(note["node"], "node1");
    let job = note["note"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(job.starts_with("rebuild-"), "{note}");
    cli.wait_for_line(CLI_WAIT, |l| is_step_started(l, "basebackup"))
        .unwrap();

    // While it copies: the same coordinator refuses a second operation on
    // the cluster ...
    let out = pgfleet(&fleet, &["rebuild", "node1"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("another operation is running on cluster main"),
        "{out}"
    );
    // ... and a second coordinator (its own state_dir) is refused by the
    // agent, which runs one rebuild at a time.
    let other = fleet.dir().join("other-inventory.toml");
    let text = fleet.inventory_toml("main", &[]).unwrap().replacen(
        &fleet.state_dir().display().to_string(),
        &fleet.dir().join("other-state").display().to_string(),
        1,
    );
    std::fs::write(&other, text).unwrap();
    let out = fleet
        .pgfleet_with_inventory(&other, &["rebuild", "node1"])
        .unwrap();
    eprintln!(
        "$ pgfleet --inventory {} rebuild node1\n{out}",
        other.display()
    );
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("already running") && out.stderr.contains(&job),
        "{out}"
    );
    assert!(
        !cli.has_exited().unwrap(),
        "the first rebuild is still running"
    );

    let first = cli.wait(CLI_WAIT).unwrap();
    eprintln!("{first}");
    assert_eq!(first.code(), Some(0), "{first}");
    assert_eq!(result(&first)["job_id"], job.as_str());
    let first_events = events(&first.stdout);
    assert!(first_events.iter().any(|e| e["type"] == "progress"));

    // Attached afterwards: the same events, from the first, then the result.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--attach", &job, "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(events(&out.stdout), first_events);
    assert_eq!(result(&out)["job_id"], job.as_str());
    assert_eq!(result(&out)["state"], "streaming");

    // An unknown job is a clear error.
    let out = pgfleet(
        &fleet,
        &["rebuild", "node1", "--attach", "rebuild-nosuch", "--json"],
    );
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("no job rebuild-nosuch"), "{out}");

    assert_eq!(one(node, "select pg_is_in_recovery()").await, "t");
    assert_eq!(slots(primary).await, [("node1".to_owned(), true)]);
}
