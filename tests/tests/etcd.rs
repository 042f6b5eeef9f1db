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
