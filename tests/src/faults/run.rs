//! Runs one schedule on a fresh three-host fleet shaped like production
//! (initdb'd primary, scram, per-host pg_hba lines, standbys rebuilt by
//! pgfleet, `FIRST 1 (node1, node2)`, `pgfleet serve` with automatic
//! failover), with a client per node committing every 20 ms; heals the
//! faults, brings the fleet back with pgfleet commands only, and checks.
//!
//! Drive it from the thread that owns the fleet (see the crate's
//! documentation): it spawns the CLI, agents and coordinator itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::check::{self, Ack, Kind, Violation};
use super::schedule::{Action, Fault, Op, Schedule};
use crate::host::Direction;
use crate::{CliChild, CliOutput, Coordinator, Host, TestFleet};

/// How long the fleet has, once every fault is healed, to be back to one
/// primary with every other node streaming from it.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(150);
/// An operation still running this long after the schedule's last event is
/// killed and reported.
const OP_LIMIT: Duration = Duration::from_secs(240);

#[derive(Debug, Default)]
pub struct Report {
    /// Operations by `kind exit-status`.
    pub ops: BTreeMap<String, usize>,
    pub faults: usize,
    pub acked: usize,
    pub violations: Vec<Violation>,
    pub converged_in: Option<Duration>,
    /// Each agent's resident memory (KiB) at the start and at the end.
    pub agent_rss_kib: Vec<(String, u64, u64)>,
}

/// Runs `schedule` on a new fleet and checks it.
pub async fn run(schedule: &Schedule) -> Result<Report> {
    let fleet = TestFleet::new(schedule.hosts)?;
    let result = run_on(&fleet, schedule).await;
    if result.as_ref().map_or(true, |r| !r.violations.is_empty()) {
        eprintln!("{schedule}");
        eprintln!("{}", fleet.dump_logs());
    }
    result
}

async fn run_on(fleet: &TestFleet, schedule: &Schedule) -> Result<Report> {
    let mut report = Report::default();
    let mut coordinator = set_up(fleet).await?;
    let rss_before: Vec<u64> = fleet.hosts().iter().map(agent_rss).collect();
    let clients = Clients::start(fleet);
    clients.wait_for_more(20, Duration::from_secs(30)).await.context("no commit before the schedule")?;

    // The schedule: each event at its time; faults healed after their
    // duration; operations run as CLI children through the coordinator.
    let start = Instant::now();
    let mut heals: Vec<(Instant, Heal)> = Vec::new();
    let mut running: Vec<(String, CliChild)> = Vec::new();
    for e in &schedule.events {
        let at = start + Duration::from_millis(e.at_ms);
        while Instant::now() < at {
            tick(fleet, &mut coordinator, &mut heals, &mut running, &mut report, false);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match &e.action {
            Action::Op(op) => match fleet.pgfleet_spawn(&op_args(op, &coordinator.url)) {
                Ok(child) => running.push((op_kind(op).to_owned(), child)),
                Err(e) => bail!("cannot start pgfleet {op}: {e:#}"),
            },
            Action::Fault(f) => {
                report.faults += 1;
                inject(fleet, &mut coordinator, f, &mut heals);
            }
        }
    }
    // Every fault healed, every operation ended.
    let end = Instant::now();
    while !heals.is_empty() || !running.is_empty() {
        let overdue = end.elapsed() > OP_LIMIT;
        tick(fleet, &mut coordinator, &mut heals, &mut running, &mut report, overdue);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every agent runs again (a start that failed while its host was cut
    // off is retried, as systemd's Restart= would).
    for h in fleet.hosts() {
        if h.agent_pid().is_none()
            && let Err(e) = h.start_agent()
        {
            eprintln!("heal: {e:#}");
        }
    }

    // Back to one primary, with pgfleet commands only.
    let converging = Instant::now();
    report.converged_in = converge(fleet, &coordinator, &mut report).await;
    if report.converged_in.is_some()
        && let Err(e) = clients.wait_for_more(20, Duration::from_secs(30)).await
    {
        report.violations.push(Violation { kind: Kind::NoConvergence, detail: format!("converged, but {e:#}") });
    }
    let (acks, _uncertain) = clients.finish().await;
    report.acked = acks.len();

    // From outside pgfleet: the final primary's rows, the clients' history.
    if let Some(primary) = primary(fleet).await {
        let present = ids(primary).await?;
        report.violations.extend(check::lost_commits(&acks, &present));
    } else if report.converged_in.is_some() {
        bail!("converged without a primary");
    }
    report.violations.extend(check::split_brain(&acks));
    report.violations.extend(operations_left(fleet));
    for h in fleet.hosts() {
        if !h.data_dir().join("PG_VERSION").exists() {
            report.violations.push(Violation { kind: Kind::DataDirectory, detail: format!("{}: {} is gone", h.node_name(), h.data_dir().display()) });
        }
    }
    if report.converged_in.is_some() {
        report.violations.extend(orphan_slots(fleet).await);
    }
    report.violations.extend(leftover_processes(fleet));
    report.agent_rss_kib = fleet
        .hosts()
        .iter()
        .zip(rss_before)
        .map(|(h, before)| (h.node_name(), before, agent_rss(h)))
        .collect();
    drop(coordinator);
    eprintln!("fault schedule {} took {:?} (converged in {:?})", schedule.seed, start.elapsed(), converging.elapsed());
    Ok(report)
}

/// node0 initdb'd, node1 and node2 rebuilt by pgfleet, `FIRST 1 (node1,
/// node2)`, table `acks`, and `pgfleet serve` with automatic failover
/// watching node0.
async fn set_up(fleet: &TestFleet) -> Result<Coordinator> {
    let p = fleet.host(0);
    p.initdb()?;
    p.start_postgres()?;
    for h in fleet.hosts() {
        h.start_agent()?;
    }
    for h in &fleet.hosts()[1..] {
        cli_ok(fleet, &["rebuild", &h.node_name(), "--no-progress-bar"])?;
    }
    p.connect().await?.batch_execute("create table acks (id bigint primary key)").await?;
    let standbys: Vec<String> = fleet.hosts()[1..].iter().map(Host::node_name).collect();
    let mut args = vec!["sync", "set"];
    args.extend(standbys.iter().map(String::as_str));
    cli_ok(fleet, &args)?;
    let inventory = fleet.inventory_toml("main", &[])?;
    std::fs::write(fleet.inventory_path(), inventory.replacen("name = \"main\"\n", "name = \"main\"\nauto_failover = true\n", 1))?;
    let c = fleet.start_coordinator_with("coordinator", "")?;
    c.wait_for_log("watching: primary node0 answers", Duration::from_secs(15))?;
    Ok(c)
}

fn cli_ok(fleet: &TestFleet, args: &[&str]) -> Result<()> {
    let out = fleet.pgfleet(args)?;
    if !out.success() {
        bail!("pgfleet {}: {out}", args.join(" "));
    }
    Ok(())
}

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::Switchover(_) => "switchover",
        Op::Failover => "failover",
        Op::Rejoin(_) => "rejoin",
        Op::Rebuild(_) => "rebuild",
        Op::SyncSet(_) => "sync-set",
        Op::RollingRebuild => "rolling-rebuild",
    }
}

fn op_args(op: &Op, url: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["--coordinator".into(), url.into()];
    let node = |n: &usize| format!("node{n}");
    match op {
        Op::Switchover(to) => {
            a.push("switchover".into());
            if let Some(n) = to {
                a.extend(["--to".into(), node(n)]);
            }
        }
        Op::Failover => a.push("failover".into()),
        Op::Rejoin(n) => a.extend(["rejoin".into(), node(n)]),
        Op::Rebuild(n) => a.extend(["rebuild".into(), node(n), "--no-progress-bar".into()]),
        Op::SyncSet(nodes) => {
            a.extend(["sync".into(), "set".into()]);
            a.extend(nodes.iter().map(node));
        }
        Op::RollingRebuild => a.extend(["rebuild".into(), "--all-replicas".into(), "--no-progress-bar".into()]),
    }
    a
}

#[derive(Debug)]
enum Heal {
    StartAgent(usize),
    StartCoordinator,
    LinkUp(usize),
    /// The host's own end: dropped outgoing packets or a slow link.
    ClearOutgoing(usize),
    ClearIncoming(usize),
    Route { from: usize, to: usize },
}

impl Heal {
    /// Whether, until this heal, host `n` cannot be reached from the root
    /// namespace (where the harness waits for an agent it starts).
    fn cuts_off(&self, n: usize) -> bool {
        matches!(self, Heal::LinkUp(m) | Heal::ClearOutgoing(m) | Heal::ClearIncoming(m) if *m == n)
    }
}

fn inject(fleet: &TestFleet, coordinator: &mut Coordinator, f: &Fault, heals: &mut Vec<(Instant, Heal)>) {
    let now = Instant::now();
    let after = |ms: &u64| now + Duration::from_millis(*ms);
    // A fault on something already down is a no-op, and its heal comes
    // at the later of the two times.
    match f {
        Fault::KillPostmaster(n) => {
            let _ = fleet.host(*n).kill_postgres();
        }
        Fault::KillAgent { node, ms } => {
            let _ = fleet.host(*node).kill_agent();
            heals.push((after(ms), Heal::StartAgent(*node)));
        }
        Fault::KillCoordinator { ms } => {
            coordinator.kill();
            heals.push((after(ms), Heal::StartCoordinator));
        }
        Fault::LinkDown { node, ms } => {
            let _ = fleet.host(*node).link_down();
            heals.push((after(ms), Heal::LinkUp(*node)));
        }
        Fault::DropOutgoing { node, ms } => {
            let _ = fleet.host(*node).drop_traffic(Direction::Outgoing);
            heals.push((after(ms), Heal::ClearOutgoing(*node)));
        }
        Fault::DropIncoming { node, ms } => {
            let _ = fleet.host(*node).drop_traffic(Direction::Incoming);
            heals.push((after(ms), Heal::ClearIncoming(*node)));
        }
        Fault::NoRoute { from, to, ms } => {
            // Already blocked: the route exists, and the later heal wins.
            let _ = fleet.host(*from).block_route_to(fleet.host(*to).addr());
            heals.push((after(ms), Heal::Route { from: *from, to: *to }));
        }
        Fault::SlowLink { node, ms } => {
            let _ = fleet.host(*node).limit_egress("1mbit");
            heals.push((after(ms), Heal::ClearOutgoing(*node)));
        }
    }
    eprintln!("fault: {f}");
}

/// Heals what is due (the latest heal of each thing wins), collects ended
/// operations; with `kill_overdue`, kills the operations still running.
fn tick(
    fleet: &TestFleet,
    coordinator: &mut Coordinator,
    heals: &mut Vec<(Instant, Heal)>,
    running: &mut Vec<(String, CliChild)>,
    report: &mut Report,
    kill_overdue: bool,
) {
    let now = Instant::now();
    let (mut due, later): (Vec<_>, Vec<_>) = std::mem::take(heals).into_iter().partition(|(t, _)| *t <= now);
    *heals = later;
    // The network first: an agent on that host is started after.
    due.sort_by_key(|(_, h)| matches!(h, Heal::StartAgent(_) | Heal::StartCoordinator));
    for (t, h) in due {
        let still_down = heals.iter().any(|(_, o)| same_target(o, &h));
        if still_down {
            continue;
        }
        // The harness waits for an agent it starts to listen, from the root
        // namespace: not while its host's link is down. Started once the
        // link is up.
        if let Heal::StartAgent(n) = h
            && let Some(up) = heals.iter().filter(|(_, o)| o.cuts_off(n)).map(|(t, _)| *t).max()
        {
            heals.push((up.max(t), h));
            continue;
        }
        let r = match h {
            Heal::StartAgent(n) => fleet.host(n).start_agent(),
            Heal::StartCoordinator => coordinator.start(),
            Heal::LinkUp(n) => fleet.host(n).link_up(),
            Heal::ClearOutgoing(n) => fleet.host(n).clear_drop(Direction::Outgoing),
            Heal::ClearIncoming(n) => fleet.host(n).clear_drop(Direction::Incoming),
            Heal::Route { from, to } => fleet.host(from).unblock_route_to(fleet.host(to).addr()),
        };
        if let Err(e) = r {
            eprintln!("heal: {e:#}");
        }
    }
    let mut i = 0;
    while i < running.len() {
        let exited = running[i].1.has_exited().unwrap_or(true);
        if exited || kill_overdue {
            let (kind, child) = running.swap_remove(i);
            let outcome = match child.wait(Duration::from_secs(if exited { 5 } else { 0 })) {
                Ok(out) => {
                    eprintln!("pgfleet {kind}: exit {:?}\n{}", out.code(), out.stderr.lines().last().unwrap_or_default());
                    format!("{kind} exit {}", out.code().map_or("signal".into(), |c| c.to_string()))
                }
                Err(e) => {
                    report.violations.push(Violation { kind: Kind::Operation, detail: format!("pgfleet {kind} hung: {e:#}") });
                    format!("{kind} hung")
                }
            };
            *report.ops.entry(outcome).or_default() += 1;
        } else {
            i += 1;
        }
    }
}

fn same_target(a: &Heal, b: &Heal) -> bool {
    match (a, b) {
        (Heal::StartAgent(x), Heal::StartAgent(y))
        | (Heal::LinkUp(x), Heal::LinkUp(y))
        | (Heal::ClearOutgoing(x), Heal::ClearOutgoing(y))
        | (Heal::ClearIncoming(x), Heal::ClearIncoming(y)) => x == y,
        (Heal::Route { from: a, to: b }, Heal::Route { from: c, to: d }) => a == c && b == d,
        (Heal::StartCoordinator, Heal::StartCoordinator) => true,
        _ => false,
    }
}

/// Until one node takes writes and every other streams from it: resumes
/// interrupted operations, fails over when nobody is primary (after
/// giving the leader's automatic failover its chance), rejoins the rest.
/// Only pgfleet commands act; psql only looks.
async fn converge(fleet: &TestFleet, coordinator: &Coordinator, report: &mut Report) -> Option<Duration> {
    let started = Instant::now();
    let mut rejoins: BTreeMap<usize, u32> = BTreeMap::new();
    loop {
        let last = match converged(fleet).await {
            Ok(()) => return Some(started.elapsed()),
            Err(why) => why,
        };
        if started.elapsed() > CONVERGE_WITHIN {
            let status = fleet.pgfleet(&["status"]).map(|o| o.stdout).unwrap_or_default();
            report.violations.push(Violation {
                kind: Kind::NoConvergence,
                detail: format!("not back within {CONVERGE_WITHIN:?}: {last}\n{status}\n{}", tail_lines(&coordinator.log_text(), 30)),
            });
            return None;
        }
        let ops = list_ops(fleet);
        if ops.iter().any(|o| o.1 == "running") {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        for (id, state) in &ops {
            if state == "interrupted" {
                let out = fleet.pgfleet(&["ops", "resume", id]);
                eprintln!("converge: ops resume {id}: {}", said(&out));
            }
        }
        let primaries = writable(&roles(fleet).await);
        if primaries.is_empty() {
            // The leader fails over by itself within seconds; then we do.
            // With no standby running either (all crashed), the latest
            // primary is started again: `pgfleet restart` refuses the rest.
            if started.elapsed() > Duration::from_secs(15) {
                let out = fleet.pgfleet(&["failover"]);
                eprintln!("converge: failover: {}", said(&out));
                if !out.as_ref().is_ok_and(CliOutput::success) {
                    for h in fleet.hosts() {
                        let out = fleet.pgfleet(&["restart", &h.node_name()]);
                        eprintln!("converge: restart {}: {}", h.node_name(), said(&out));
                    }
                }
            }
        } else if primaries.len() == 1 {
            for (i, h) in fleet.hosts().iter().enumerate() {
                if i != primaries[0] && !streams_from(h, fleet.host(primaries[0])).await {
                    // A node rejoin does not bring back is rebuilt, as a DBA
                    // would.
                    let tries = rejoins.entry(i).or_insert(0);
                    *tries += 1;
                    let out = if *tries > 2 {
                        fleet.pgfleet(&["rebuild", &h.node_name(), "--no-progress-bar"])
                    } else {
                        fleet.pgfleet(&["rejoin", &h.node_name(), "--rebuild-if-needed"])
                    };
                    eprintln!("converge: {} {}: {}", if *tries > 2 { "rebuild" } else { "rejoin" }, h.node_name(), said(&out));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}


/// A convergence command's exit status and the last line it printed on
/// stderr (its error, when it failed).
fn said(out: &Result<CliOutput>) -> String {
    match out {
        Ok(o) => format!("exit {:?} {}", o.code(), o.stderr.lines().last().unwrap_or_default()),
        Err(e) => format!("{e:#}"),
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `(id, state)` of every journaled operation.
fn list_ops(fleet: &TestFleet) -> Vec<(String, String)> {
    let Ok(out) = fleet.pgfleet(&["ops", "list", "--json"]) else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .map(|o| (o["id"].as_str().unwrap_or_default().to_owned(), o["state"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn operations_left(fleet: &TestFleet) -> Vec<Violation> {
    list_ops(fleet)
        .into_iter()
        .filter(|(_, s)| s == "running" || s == "interrupted")
        .map(|(id, s)| Violation { kind: Kind::Operation, detail: format!("{id} is still {s} after convergence") })
        .collect()
}

/// Each node's `pg_is_in_recovery()` ("t"/"f"), None when it does not
/// answer within 3 s.
async fn roles(fleet: &TestFleet) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for h in fleet.hosts() {
        out.push(ask(h, "select case when pg_is_in_recovery() then 't' else 'f' end").await);
    }
    out
}

async fn ask(h: &Host, sql: &str) -> Option<String> {
    let conn = format!(
        "host={} port=5432 user=postgres password={} dbname=postgres connect_timeout=2",
        h.addr(),
        h.superuser_password()
    );
    tokio::time::timeout(Duration::from_secs(3), async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(connection);
        let row = client.query_opt(sql, &[]).await.ok()??;
        row.try_get::<_, Option<String>>(0).ok()?
    })
    .await
    .ok()
    .flatten()
}

async fn streams_from(h: &Host, primary: &Host) -> bool {
    let sql = "select sender_host from pg_stat_wal_receiver where status = 'streaming'";
    ask(h, sql).await.is_some_and(|s| s == primary.addr().to_string())
}

async fn converged(fleet: &TestFleet) -> std::result::Result<(), String> {
    let roles = roles(fleet).await;
    let primaries = writable(&roles);
    let [p] = primaries[..] else {
        return Err(format!("{} nodes take writes ({roles:?})", primaries.len()));
    };
    for (i, h) in fleet.hosts().iter().enumerate() {
        if i != p && !streams_from(h, fleet.host(p)).await {
            return Err(format!("{} does not stream from node{p}", h.node_name()));
        }
    }
    Ok(())
}

/// The indices of the nodes whose role is "f" (not in recovery).
fn writable(roles: &[Option<String>]) -> Vec<usize> {
    roles.iter().enumerate().filter(|(_, r)| r.as_deref() == Some("f")).map(|(i, _)| i).collect()
}

async fn primary(fleet: &TestFleet) -> Option<&Host> {
    match writable(&roles(fleet).await)[..] {
        [p] => Some(fleet.host(p)),
        _ => None,
    }
}

async fn ids(h: &Host) -> Result<BTreeSet<i64>> {
    let rows = h.connect().await?.query("select id from acks", &[]).await?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
}

/// Inactive slots on a converged fleet, given 15 s for standbys that just
/// reconnected.
async fn orphan_slots(fleet: &TestFleet) -> Vec<Violation> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut found = Vec::new();
        for h in fleet.hosts() {
            let sql = "select coalesce(string_agg(slot_name, ', '), '') from pg_replication_slots where not active";
            if let Some(s) = ask(h, sql).await.filter(|s| !s.is_empty()) {
                found.push(format!("{}: {s}", h.node_name()));
            }
        }
        if found.is_empty() {
            return Vec::new();
        }
        if Instant::now() > deadline {
            return vec![Violation { kind: Kind::OrphanSlot, detail: format!("inactive slots on a converged fleet: {}", found.join("; ")) }];
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Processes in the hosts' namespaces other than PostgreSQL's and the
/// agents': a pg_basebackup, pg_rewind or psql pgfleet left behind.
fn leftover_processes(fleet: &TestFleet) -> Vec<Violation> {
    let mut out = Vec::new();
    for h in fleet.hosts() {
        let Ok(pids) = crate::net::netns_pids(h.netns()) else { continue };
        for pid in pids {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if !comm.is_empty() && comm != "postgres" && comm != "pgfleet-agent" {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                out.push(Violation { kind: Kind::LeftoverProcess, detail: format!("{}: pid {pid} {comm}: {cmdline}", h.node_name()) });
            }
        }
    }
    out
}

fn agent_rss(h: &Host) -> u64 {
    let Some(pid) = h.agent_pid() else { return 0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One client per node, each connected to that node only, inserting a row
/// every 20 ms when it takes writes; each acknowledged row with the node,
/// timeline, synchronous setting and server time that committed it.
struct Clients {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    uncertain: Arc<Mutex<Vec<i64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const INSERT: &str = "insert into acks (id) values ($1) returning substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
                      current_setting('synchronous_standby_names') <> '', \
                      (extract(epoch from clock_timestamp()) * 1000000)::bigint";

impl Clients {
    fn start(fleet: &TestFleet) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let uncertain: Arc<Mutex<Vec<i64>>> = Arc::default();
        let next = Arc::new(AtomicI64::new(1));
        let tasks = fleet
            .hosts()
            .iter()
            .map(|h| {
                let conn = format!(
                    "host={} port=5432 user=postgres password={} dbname=postgres connect_timeout=2",
                    h.addr(),
                    h.superuser_password()
                );
                let (node, stop, acks, uncertain, next) = (h.node_name(), stop.clone(), acks.clone(), uncertain.clone(), next.clone());
                tokio::spawn(async move {
                    let mut client: Option<tokio_postgres::Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                            client = match tokio::time::timeout(Duration::from_secs(3), tokio_postgres::connect(&conn, tokio_postgres::NoTls)).await {
                                Ok(Ok((c, connection))) => {
                                    tokio::spawn(connection);
                                    Some(c)
                                }
                                _ => {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                    continue;
                                }
                            };
                        }
                        let Some(c) = &client else { continue };
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        match tokio::time::timeout(Duration::from_secs(5), c.query_one(INSERT, &[&id])).await {
                            Ok(Ok(row)) => {
                                let tl: String = row.get(0);
                                acks.lock().unwrap_or_else(PoisonError::into_inner).push(Ack {
                                    id,
                                    node: node.clone(),
                                    timeline: u32::from_str_radix(&tl, 16).unwrap_or(0),
                                    synchronous: row.get(1),
                                    at_us: row.get(2),
                                });
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            // A standby: nothing was written.
                            Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            _ => {
                                uncertain.lock().unwrap_or_else(PoisonError::into_inner).push(id);
                                client = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Clients { stop, acks, uncertain, tasks }
    }

    fn count(&self) -> usize {
        self.acks.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    async fn wait_for_more(&self, n: usize, within: Duration) -> Result<()> {
        let target = self.count() + n;
        let deadline = Instant::now() + within;
        while self.count() < target {
            if Instant::now() > deadline {
                bail!("no {n} more commits acknowledged within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn finish(self) -> (Vec<Ack>, BTreeSet<i64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let acks = std::mem::take(&mut *self.acks.lock().unwrap_or_else(PoisonError::into_inner));
        let uncertain = self.uncertain.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
        (acks, uncertain)
    }
}
