//! Two coordinators on a 3-member etcd (issue #7): exactly one is elected
//! and acts, the other points callers at it; the leader SIGKILLed in the
//! middle of a rebuild, the other takes over within the lease TTL, lists the
//! operation as interrupted and resumes it to the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::time::{Duration, Instant};

use common::{exec, json, one, start_agents, start_primary};
use pgfleet_tests::{CliOutput, Coordinator, EtcdCluster, TestFleet};

const CLI_WAIT: Duration = Duration::from_secs(120);
const LEASE_TTL: Duration = Duration::from_secs(3);

fn remote(fleet: &TestFleet, url: &str, args: &[&str]) -> CliOutput {
    let mut all = vec!["--coordinator", url];
    all.extend_from_slice(args);
    let out = fleet.pgfleet(&all).unwrap();
    eprintln!("$ pgfleet --coordinator {url} {}\n{out}", args.join(" "));
    out
}

fn elected(c: &Coordinator) -> bool {
    c.log_text().contains("elected leader")
}

/// Waits until exactly one of `cs` says it leads; returns its index.
fn wait_for_leader(cs: &[&Coordinator], within: Duration) -> usize {
    let started = Instant::now();
    loop {
        let leaders: Vec<usize> = (0..cs.len()).filter(|&i| elected(cs[i])).collect();
        assert!(leaders.len() <= 1, "two coordinators elected at once");
        if let [i] = leaders[..] {
            return i;
        }
        assert!(started.elapsed() < within, "no leader within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn op_state(fleet: &TestFleet, url: &str, id: &str) -> Option<String> {
    let out = remote(fleet, url, &["ops", "list", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == id)
        .map(|o| o["state"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_etcd_one_acts_and_the_other_takes_over_and_resumes() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let p = fleet.host(0);
    exec(p, "create table filler as select g, repeat(md5(g::text), 30) as pad from generate_series(1, 30000) g").await;
    p.limit_egress("80mbit").unwrap();

    let etcd_dir = fleet.dir().join("etcd");
    let etcd = EtcdCluster::start(&etcd_dir, 3).unwrap();
    let inventory = fleet.inventory_toml("main", &[]).unwrap() + &etcd.inventory_toml(&format!("{}s", LEASE_TTL.as_secs()));
    std::fs::write(fleet.inventory_path(), inventory).unwrap();

    let a = fleet.start_coordinator_named("coordinator-a").unwrap();
    let b = fleet.start_coordinator_named("coordinator-b").unwrap();
    let first = wait_for_leader(&[&a, &b], Duration::from_secs(30));
    let (mut leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    // Still exactly one after a while.
    std::thread::sleep(Duration::from_secs(1));
    assert!(elected(&leader) && !elected(&follower));

    // The follower does not act: it names the leader, and the CLI goes there.
    let out = remote(&fleet, &follower.url, &["status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains(&format!("{} is a follower; the leader is {}", follower.url, leader.url)), "{out}");

    // A rebuild on the leader; the leader dies in the middle of the copy.
    let args = ["--coordinator", leader.url.as_str(), "rebuild", "node1", "--json"];
    let mut cli = fleet.pgfleet_spawn(&args).unwrap();
    let line = cli
        .wait_for_line(CLI_WAIT, |l| l.contains("\"type\":\"progress\"") && !l.contains("\"done_bytes\":0"))
        .unwrap();
    // The journal in etcd shows it running; the local CLI reads the same store.
    let local = fleet.pgfleet(&["ops", "list", "--json"]).unwrap();
    assert_eq!(local.code(), Some(0), "{local}");
    let op = json(&local).as_array().unwrap().iter().find(|o| o["kind"] == "rebuild").cloned().unwrap();
    assert_eq!(op["state"], "running", "{op}");
    let id = op["id"].as_str().unwrap().to_owned();
    eprintln!("killing leader {} at {line}", leader.url);
    leader.kill();
    let killed = Instant::now();
    let _ = cli.wait(CLI_WAIT).unwrap();

    // The follower is elected once the dead leader's lease expires.
    while !elected(&follower) {
        assert!(killed.elapsed() < LEASE_TTL + Duration::from_secs(10), "no takeover:\n{}", follower.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let takeover = killed.elapsed();
    eprintln!("takeover after {takeover:?} (lease TTL {LEASE_TTL:?})");
    assert!(takeover <= LEASE_TTL + Duration::from_secs(3), "takeover took {takeover:?}");

    assert_eq!(op_state(&fleet, &follower.url, &id).as_deref(), Some("interrupted"));
    p.clear_egress_limit().unwrap();
    let out = remote(&fleet, &follower.url, &["ops", "resume", &id]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.starts_with("rebuilt node1 from node0"), "{out}");
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");
    assert_eq!(op_state(&fleet, &follower.url, &id).as_deref(), Some("succeeded"));
}
