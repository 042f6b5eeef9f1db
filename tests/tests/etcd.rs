//! Two coordinators on a 3-member etcd (issue #7): exactly one is elected
//! and acts, the other points callers at it; the leader SIGKILLed in the
//! middle of a rebuild, the other takes over within the lease TTL, lists the
//! operation as interrupted and resumes it to the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{exec, json, one, pgfleet, start_agents, start_primary};
use pgfleet_tests::{CliOutput, Coordinator, EtcdCluster, TestFleet};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const CLI_WAIT: Duration = Duration::from_secs(120);
const LEASE_TTL: Duration = Duration::from_secs(3);
/// The fault test's lease TTL. Killing etcd's raft leader stops lease
/// renewals until the others elect a new one (1-2 s on a loaded 2-core
/// machine); with a 3 s TTL the coordinator rightly steps down for that
/// moment. 6 s (the default is 10 s) rides through it, as it should.
const FAULT_LEASE_TTL: Duration = Duration::from_secs(6);

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
    let out = remote(&fleet, &follower.url, &["ops", "list"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains(&format!("{} is a follower; the leader is {}", follower.url, leader.url)), "{out}");
    // A view of the fleet needs no leader: the follower answers it itself.
    let out = remote(&fleet, &follower.url, &["status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!out.stderr.contains("is a follower"), "{out}");

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

/// Whether the coordinator behind `ch` says SERVING for the empty service
/// name (what a load balancer's probe asks); an unanswered probe is not.
async fn serving(ch: &tonic::transport::Channel) -> bool {
    let mut h = HealthClient::new(ch.clone());
    let asked = h.check(HealthCheckRequest { service: String::new() });
    matches!(
        tokio::time::timeout(Duration::from_millis(300), asked).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

/// Asks both coordinators every 100 ms, from now until stopped: each look
/// is (a serving, b serving).
struct Poller {
    stop: Arc<AtomicBool>,
    looks: Arc<Mutex<Vec<(bool, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    fn start(a: tonic::transport::Channel, b: tonic::transport::Channel) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let looks: Arc<Mutex<Vec<(bool, bool)>>> = Arc::default();
        let (s, l) = (stop.clone(), looks.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let (x, y) = tokio::join!(serving(&a), serving(&b));
                l.lock().unwrap().push((x, y));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Poller { stop, looks, task }
    }

    /// How many looks so far, and in how many both served.
    fn tally(&self) -> (usize, usize) {
        let looks = self.looks.lock().unwrap();
        (looks.len(), looks.iter().filter(|(x, y)| *x && *y).count())
    }

    /// Waits (up to `within`) until the last look shows exactly one serving.
    async fn wait_one_serving(&self, within: Duration) {
        let started = Instant::now();
        loop {
            if let Some((x, y)) = self.looks.lock().unwrap().last().copied()
                && x != y
            {
                return;
            }
            assert!(started.elapsed() < within, "no coordinator SERVING within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let tally = self.tally();
        self.task.await.unwrap();
        tally
    }
}

/// Two coordinators on a 3-member etcd ride through etcd's own faults:
/// each member killed in turn (the raft leader first) while operations run
/// through the coordinators, then two members down at once (no quorum) and
/// back; first, etcd's raft leader killed in the middle of a rebuild. Asked
/// every 100 ms, never two coordinators say SERVING; neither coordinator
/// exits; operations running or journaled during a one-member loss finish;
/// after quorum returns one coordinator leads again and acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_ride_through_etcd_faults_and_never_two_serve() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");

    let mut etcd = EtcdCluster::start(&fleet.dir().join("etcd"), 3).unwrap();
    let inventory = fleet.inventory_toml("main", &[]).unwrap() + &etcd.inventory_toml(&format!("{}s", FAULT_LEASE_TTL.as_secs()));
    std::fs::write(fleet.inventory_path(), inventory).unwrap();
    let mut a = fleet.start_coordinator_named("coordinator-a").unwrap();
    let mut b = fleet.start_coordinator_named("coordinator-b").unwrap();
    wait_for_leader(&[&a, &b], Duration::from_secs(30));
    let pki = fleet.pki_dir();
    let poller = Poller::start(
        a.channel_as(&pki, "test-reader").await.unwrap(),
        b.channel_as(&pki, "test-reader").await.unwrap(),
    );
    poller.wait_one_serving(Duration::from_secs(10)).await;
    // Both know who leads (the follower's redirect works) before the faults.
    for c in [&a, &b] {
        let out = remote(&fleet, &c.url, &["ops", "list"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }

    // An operation running at the instant a member dies: a rebuild slowed
    // by the primary's egress limit, etcd's raft leader killed mid-copy. It
    // finishes, its lines journaled through the remaining members.
    let p = fleet.host(0);
    exec(p, "create table filler as select g, repeat(md5(g::text), 30) as pad from generate_series(1, 30000) g").await;
    p.limit_egress("80mbit").unwrap();
    let running = fleet
        .pgfleet_spawn(&["--coordinator", a.url.as_str(), "rebuild", "node1", "--no-progress-bar"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let member = etcd.raft_leader().expect("no raft leader among the etcd members");
    eprintln!("killing etcd member m{member} during a rebuild");
    etcd.kill(member);
    let out = running.wait(CLI_WAIT).unwrap();
    eprintln!("$ pgfleet --coordinator {} rebuild node1 (etcd m{member} killed during it)\n{out}", a.url);
    assert_eq!(out.code(), Some(0), "the rebuild running when m{member} died: {out}");
    p.clear_egress_limit().unwrap();
    assert!(a.is_running() && b.is_running(), "a coordinator exited:\n{}\n{}", a.log_text(), b.log_text());
    etcd.restart(member).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let raft_leader = etcd.raft_leader().expect("no raft leader among the etcd members");
    let mut order = vec![raft_leader];
    order.extend((0..3).filter(|&i| i != raft_leader));
    for (round, member) in order.into_iter().enumerate() {
        eprintln!("killing etcd member m{member}");
        etcd.kill(member);
        // An operation through the coordinators while the member is gone
        // (the CLI follows a follower's redirect to the leader).
        let args: &[&str] = if round % 2 == 0 { &["sync", "set", "node1"] } else { &["sync", "set", "--off"] };
        let out = remote(&fleet, &a.url, args);
        assert_eq!(out.code(), Some(0), "with m{member} down: {out}");
        // Longer than a lease TTL: a coordinator that could not renew
        // would have stepped down or gone by now.
        tokio::time::sleep(FAULT_LEASE_TTL + Duration::from_secs(2)).await;
        assert!(a.is_running() && b.is_running(), "a coordinator exited:\n{}\n{}", a.log_text(), b.log_text());
        poller.wait_one_serving(Duration::from_secs(10)).await;
        etcd.restart(member).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Two members down: no quorum, no lease renewal. The leader stops
    // acting before its lease can expire; nobody exits.
    eprintln!("killing etcd members m0 and m1");
    etcd.kill(0);
    etcd.kill(1);
    tokio::time::sleep(FAULT_LEASE_TTL + Duration::from_secs(2)).await;
    let (looks, both) = poller.tally();
    let last = poller.looks.lock().unwrap().last().copied().unwrap();
    assert_eq!(last, (false, false), "a coordinator still serves without an etcd quorum ({looks} looks)");
    assert!(a.is_running() && b.is_running(), "a coordinator exited:\n{}\n{}", a.log_text(), b.log_text());
    assert_eq!(both, 0);
    // Neither starts anything: an operation is refused by both, and the
    // fleet is as it was; a view still answers.
    let setting = one(fleet.host(0), "show synchronous_standby_names").await;
    for c in [&a, &b] {
        let out = remote(&fleet, &c.url, &["sync", "set", "--off"]);
        assert_ne!(out.code(), Some(0), "{} acted without an etcd quorum: {out}", c.url);
        let out = remote(&fleet, &c.url, &["status"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    assert_eq!(one(fleet.host(0), "show synchronous_standby_names").await, setting);
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    poller.wait_one_serving(Duration::from_secs(30)).await;
    let out = remote(&fleet, &b.url, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "after quorum came back: {out}");

    let (looks, both) = poller.finish().await;
    eprintln!("{looks} looks at both coordinators, {both} with both SERVING");
    assert!(looks > 100, "only {looks} looks");
    assert_eq!(both, 0, "two coordinators said SERVING at the same look");
    assert!(a.is_running() && b.is_running());
    // Every operation's end is in the journal: none reads as interrupted.
    let out = remote(&fleet, &b.url, &["ops", "list", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let states: Vec<String> = json(&out).as_array().unwrap().iter().map(|o| o["state"].as_str().unwrap().to_owned()).collect();
    assert!(states.iter().all(|s| s == "succeeded"), "{states:?}");
}

/// TLS towards etcd (`[etcd] ca/cert/key`): an etcd that serves clients
/// over TLS only and checks their certificates holds the journal and the
/// lock of an operation run with the fleet CA and a client certificate;
/// without the client certificate etcd turns the coordinator away and the
/// operation changes nothing; an http:// endpoint next to a CA is a
/// configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_requires_client_certificates_is_reached_over_tls() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let pki = fleet.pki_dir();
    let pki_arg = pki.display().to_string();
    let out = pgfleet(&fleet, &["certs", "issue", "--dir", &pki_arg, "--role", "agent", "etcd", "--san", "127.0.0.1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let etcd = EtcdCluster::start_tls(&fleet.dir().join("etcd-tls"), 1, &pki).unwrap();
    assert!(etcd.client_urls[0].starts_with("https://"), "{:?}", etcd.client_urls);
    let table = etcd.inventory_toml("6s");
    let base = fleet.inventory_toml("main", &[]).unwrap();
    std::fs::write(fleet.inventory_path(), format!("{base}{table}")).unwrap();
    // The rebuild above was journaled in files; from here on, etcd.
    let file_journal = || std::fs::read_to_string(fleet.state_dir().join("main.journal")).unwrap_or_default();
    let files_before = file_journal();

    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(one(fleet.host(0), "show synchronous_standby_names").await, r#"FIRST 1 ("node1")"#);
    let out = pgfleet(&fleet, &["ops", "list", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let ops = json(&out);
    assert!(
        ops.as_array().unwrap().iter().any(|o| o["kind"] == "sync" && o["state"] == "succeeded"),
        "the operation is not in etcd's journal: {ops:#}"
    );
    assert_eq!(file_journal(), files_before, "journaled in files, not in etcd");

    // No client certificate: etcd refuses the connection, nothing changes.
    let no_cert: String = table.lines().filter(|l| !l.starts_with("cert") && !l.starts_with("key")).map(|l| format!("{l}\n")).collect();
    std::fs::write(fleet.inventory_path(), format!("{base}{no_cert}")).unwrap();
    let out = pgfleet(&fleet, &["sync", "set", "--off"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let error = out.stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(error.contains("set cert and key in [etcd]"), "{out}");
    assert_eq!(one(fleet.host(0), "show synchronous_standby_names").await, r#"FIRST 1 ("node1")"#);

    // A CA with an http:// endpoint: refused as it is read.
    let plain = table.replace("https://", "http://");
    std::fs::write(fleet.inventory_path(), format!("{base}{plain}")).unwrap();
    let out = pgfleet(&fleet, &["sync", "set", "--off"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("https://"), "{out}");
    assert_eq!(one(fleet.host(0), "show synchronous_standby_names").await, r#"FIRST 1 ("node1")"#);
}

/// The fleet's inventory without node `name` (a host that is no database
/// node: the machine a coordinator runs on).
fn inventory_without(fleet: &TestFleet, name: &str) -> String {
    let text = fleet.inventory_toml("main", &[]).unwrap();
    let mut parts = text.split("\n[[clusters.nodes]]\n");
    let head = parts.next().unwrap().to_owned();
    parts
        .filter(|n| !n.starts_with(&format!("name = \"{name}\"")))
        .fold(head, |acc, n| format!("{acc}\n[[clusters.nodes]]\n{n}"))
}

/// The timestamps (RFC 3339, UTC: they sort as text) of the coordinator's
/// log lines containing `needle`.
fn logged_at(c: &Coordinator, needle: &str) -> Vec<String> {
    c.log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// A coordinator cut off the network (its host's link down: etcd, the
/// agents and its callers gone at once), the leader, with a rebuild
/// running through it. Shorter than the lease TTL: it stays the leader and
/// acts afterwards. Longer: it stops acting before its lease can have
/// expired in etcd, and the other coordinator is elected only after that
/// (their own logs' clocks say so; asked every 100 ms, never both SERVING);
/// the cut-off leader neither exits nor acts again when its link returns;
/// the rebuild it was running finishes, or reads interrupted and is resumed
/// through the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_stops_acting_before_another_is_elected() {
    let fleet = TestFleet::new(3).unwrap();
    start_primary(&fleet, 0);
    for h in &fleet.hosts()[..2] {
        h.start_agent().unwrap();
    }
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    // Host 2 runs no PostgreSQL: it is the first coordinator's machine.
    let place = fleet.host(2);
    let etcd = EtcdCluster::start_on(&fleet.dir().join("etcd"), 3, pgfleet_tests::net::bridge_addr(fleet.n())).unwrap();
    let inventory = inventory_without(&fleet, "node2") + &etcd.inventory_toml(&format!("{}s", FAULT_LEASE_TTL.as_secs()));
    std::fs::write(fleet.inventory_path(), inventory).unwrap();
    let mut a = fleet.start_coordinator_on("coordinator-a", place).unwrap();
    wait_for_leader(&[&a], Duration::from_secs(30));
    let mut b = fleet.start_coordinator_named("coordinator-b").unwrap();
    let pki = fleet.pki_dir();
    let poller = Poller::start(
        a.channel_as(&pki, "test-reader").await.unwrap(),
        b.channel_as(&pki, "test-reader").await.unwrap(),
    );
    poller.wait_one_serving(Duration::from_secs(10)).await;
    let out = remote(&fleet, &b.url, &["ops", "list"]);
    assert_eq!(out.code(), Some(0), "the follower redirects to the leader: {out}");

    // Shorter than the TTL: a's keep-alive gets through again in time; it
    // never stopped acting, b never led, and a acts afterwards.
    place.link_down().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    place.link_up().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(logged_at(&a, "not sure to live").is_empty(), "a stepped down after a 2 s cut:\n{}", a.log_text());
    assert!(logged_at(&b, "elected leader").is_empty(), "b was elected after a 2 s cut:\n{}", b.log_text());
    let out = remote(&fleet, &a.url, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "a acts after a short cut: {out}");

    // Longer than the TTL, with a rebuild running through a (slowed by the
    // primary's egress limit, past its point of no return).
    let p = fleet.host(0);
    exec(p, "create table filler as select g, repeat(md5(g::text), 30) as pad from generate_series(1, 30000) g").await;
    let out = remote(&fleet, &a.url, &["sync", "set", "--off"]);
    assert_eq!(out.code(), Some(0), "{out}");
    p.limit_egress("40mbit").unwrap();
    let mut cli = fleet
        .pgfleet_spawn(&["--coordinator", a.url.as_str(), "rebuild", "node1", "--json"])
        .unwrap();
    cli.wait_for_line(CLI_WAIT, |l| l.contains("\"type\":\"progress\"") && !l.contains("\"done_bytes\":0"))
        .unwrap();
    eprintln!("cutting {}'s link", place.netns());
    place.link_down().unwrap();
    let cut = Instant::now();
    while logged_at(&b, "elected leader").is_empty() {
        assert!(cut.elapsed() < FAULT_LEASE_TTL + Duration::from_secs(15), "b never took over:\n{}", b.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("b elected {:?} after the cut", cut.elapsed());
    // b acts while a is still cut off.
    let out = remote(&fleet, &b.url, &["status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    place.link_up().unwrap();
    p.clear_egress_limit().unwrap();
    let _ = cli.wait(CLI_WAIT);

    let stopped = logged_at(&a, "not sure to live");
    let elected_b = logged_at(&b, "elected leader");
    eprintln!("a stopped acting at {stopped:?}; b elected at {elected_b:?}");
    assert!(
        !stopped.is_empty() && stopped[0] < elected_b[0],
        "b was elected before a stopped acting:\n--- a ---\n{}\n--- b ---\n{}",
        a.log_text(),
        b.log_text()
    );
    // a came back as a follower: it campaigns, it does not lead.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.is_running() && b.is_running(), "a coordinator exited:\n{}\n{}", a.log_text(), b.log_text());
    assert_eq!(logged_at(&a, "elected leader").len(), 1, "a led again:\n{}", a.log_text());
    poller.wait_one_serving(Duration::from_secs(10)).await;

    // The rebuild: finished by a once its link came back, or interrupted
    // (its lock went with a's lease) and resumed through b.
    let out = remote(&fleet, &b.url, &["ops", "list", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let ops = json(&out);
    let op = ops.as_array().unwrap().iter().find(|o| o["kind"] == "rebuild" && o["caller"] != "")
        .cloned()
        .unwrap_or_else(|| panic!("the rebuild is not in the journal: {ops:#}"));
    let id = op["id"].as_str().unwrap().to_owned();
    let mut state = op["state"].as_str().unwrap().to_owned();
    let settle = Instant::now();
    while state == "running" && settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        state = op_state(&fleet, &b.url, &id).unwrap();
    }
    eprintln!("the rebuild through a reads {state} after the cut");
    if state == "interrupted" {
        let out = remote(&fleet, &b.url, &["ops", "resume", &id]);
        assert_eq!(out.code(), Some(0), "{out}");
        state = op_state(&fleet, &b.url, &id).unwrap();
    }
    assert_eq!(state, "succeeded", "{id}");
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");
    let senders = one(p, "select string_agg(application_name || ' ' || state, ',') from pg_stat_replication").await;
    assert_eq!(senders, "node1 streaming");

    let (looks, both) = poller.finish().await;
    eprintln!("{looks} looks at both coordinators, {both} with both SERVING");
    assert_eq!(both, 0, "two coordinators said SERVING at the same look");
}

/// Every journal write is checked, under a real fault: etcd loses its
/// quorum in the middle of a rebuild run in-process. The copy goes on (the
/// node's agent runs it); the steps after it cannot be journaled, nor can
/// the operation's end: the CLI says so and exits 1, and once etcd is back
/// `ops list` shows the operation as what it is, interrupted, and `ops
/// resume` finishes it from the journal (re-attaching to the job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_whose_end_cannot_be_journaled_says_so_and_reads_interrupted() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let p = fleet.host(0);
    exec(p, "create table filler as select g, repeat(md5(g::text), 30) as pad from generate_series(1, 30000) g").await;
    let mut etcd = EtcdCluster::start(&fleet.dir().join("etcd"), 3).unwrap();
    let inventory = fleet.inventory_toml("main", &[]).unwrap() + &etcd.inventory_toml(&format!("{}s", FAULT_LEASE_TTL.as_secs()));
    std::fs::write(fleet.inventory_path(), inventory).unwrap();

    p.limit_egress("40mbit").unwrap();
    let mut cli = fleet.pgfleet_spawn(&["rebuild", "node1", "--json"]).unwrap();
    cli.wait_for_line(CLI_WAIT, |l| l.contains("\"type\":\"progress\"") && !l.contains("\"done_bytes\":0"))
        .unwrap();
    eprintln!("killing etcd members m0 and m1 during the copy");
    etcd.kill(0);
    etcd.kill(1);
    p.clear_egress_limit().unwrap();
    let out = cli.wait(CLI_WAIT).unwrap();
    eprintln!("$ pgfleet rebuild node1 --json (etcd without quorum)\n{out}");
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("its end could not be written to the journal"), "{out}");
    assert!(out.stderr.contains("interrupted"), "{out}");
    // The copy itself finished: node1 streams.
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");

    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    // Its lock went with the CLI's lease: interrupted, not failed nor
    // succeeded (neither was journaled).
    let started = Instant::now();
    let id = loop {
        let out = fleet.pgfleet(&["ops", "list", "--json"]).unwrap();
        if out.code() == Some(0) {
            let ops = json(&out);
            let op = ops.as_array().unwrap().iter().find(|o| o["kind"] == "rebuild").cloned().unwrap();
            if op["state"] == "interrupted" {
                break op["id"].as_str().unwrap().to_owned();
            }
            assert_eq!(op["state"], "running", "{op}");
        }
        assert!(started.elapsed() < FAULT_LEASE_TTL + Duration::from_secs(20), "never read interrupted: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let out = fleet.pgfleet(&["ops", "resume", &id]).unwrap();
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.starts_with("rebuilt node1 from node0"), "{out}");
    let out = fleet.pgfleet(&["ops", "list", "--json"]).unwrap();
    let ops = json(&out);
    let op = ops.as_array().unwrap().iter().find(|o| o["id"] == id.as_str()).cloned().unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
}

/// The leader killed in the middle of an automatic failover (issue #14):
/// node0's postmaster SIGKILLed with `FIRST 1 (node1)`, node2 unable to
/// reach node1, so the failover's last step (node2 streams from node1)
/// waits; the leader is SIGKILLed there, node2's route comes back. The
/// other coordinator, elected, finds the automatic failover interrupted in
/// the journal and finishes it: it ends succeeded, node1 is the one node
/// taking writes (asked of each), node2 streams from it, and no row a
/// client committing every 10 ms was told about is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_whose_leader_died_is_finished_by_the_next_leader() {
    let fleet = TestFleet::new(3).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let (node0, node1, node2) = (fleet.host(0), fleet.host(1), fleet.host(2));
    exec(node0, "create table acks (id bigint primary key)").await;
    let etcd = EtcdCluster::start(&fleet.dir().join("etcd"), 1).unwrap();
    let inventory = fleet.inventory_toml("main", &[]).unwrap().replacen("name = \"main\"\n", "name = \"main\"\nauto_failover = true\n", 1)
        + &etcd.inventory_toml(&format!("{}s", LEASE_TTL.as_secs()));
    std::fs::write(fleet.inventory_path(), inventory).unwrap();
    for node in ["node1", "node2"] {
        let out = pgfleet(&fleet, &["rebuild", node, "--no-progress-bar"]);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    // Only node1 is synchronous: it is the one candidate.
    let out = pgfleet(&fleet, &["sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");

    let a = fleet.start_coordinator_named("coordinator-a").unwrap();
    let b = fleet.start_coordinator_named("coordinator-b").unwrap();
    let first = wait_for_leader(&[&a, &b], Duration::from_secs(30));
    let (mut leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    leader.wait_for_log("watching: primary node0 answers", Duration::from_secs(15)).unwrap();

    node2.block_route_to(node1.addr()).unwrap();
    let writer = common::writer::Writer::start(&fleet);
    writer.wait_for_more(50).await;
    node0.kill_postgres().unwrap();

    // The journal (in etcd) shows the failover at its verify step.
    let started = Instant::now();
    let id = loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no failover reached its verify step:\n{}", leader.log_text());
        let out = pgfleet(&fleet, &["ops", "list", "--json"]);
        let running = json(&out).as_array().unwrap().iter().find(|o| o["kind"] == "failover" && o["state"] == "running").cloned();
        if let Some(op) = running {
            let id = op["id"].as_str().unwrap().to_owned();
            let shown = json(&pgfleet(&fleet, &["ops", "show", &id, "--json"]));
            if shown["journal"].as_array().unwrap().iter().any(|e| e["step"] == "verify" && e["event"] == "start") {
                break id;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    leader.kill();
    node2.unblock_route_to(node1.addr()).unwrap();

    // The next leader finishes it.
    follower.wait_for_log("automatic failover resumed and done", Duration::from_secs(60)).unwrap();
    let out = pgfleet(&fleet, &["ops", "show", &id, "--json"]);
    let shown = json(&out);
    assert_eq!(shown["state"], "succeeded", "{shown:#}");
    assert!(shown["journal"].as_array().unwrap().iter().any(|e| e["step"] == "resume"), "{shown:#}");

    writer.wait_for_more(20).await;
    let (acked, uncertain) = writer.finish().await;
    for (h, writable) in [(node1, "f"), (node2, "t")] {
        assert_eq!(one(h, "select pg_is_in_recovery()").await, writable, "{}", h.node_name());
    }
    // node0, fenced by the failover, is either still down or already made
    // a standby by the new leader's automatic rejoin: never writable.
    assert!(
        !node0.query_one_string("select pg_is_in_recovery()").await.is_ok_and(|v| v == "f"),
        "node0 takes writes again"
    );
    // node2 streams from node1 (and node0 too, once the leader rejoined it).
    let senders = one(node1, "select string_agg(client_addr::text, ',') from pg_stat_replication").await;
    assert!(senders.split(',').any(|a| a == format!("{}/32", node2.addr())), "{senders}");
    common::writer::assert_rows_present(node1, &acked, &uncertain).await;
}
