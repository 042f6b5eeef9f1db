//! Failover benchmark (not part of CI): `bash tests/bench/failover.sh`.
//!
//! A test fleet of three hosts in network namespaces (as the end-to-end
//! tests build it: scram, per-host pg_hba lines), node1 and node2 rebuilt
//! by pgfleet, `FIRST 1 (node1, node2)`, a client committing every 10 ms.
//! Two faults on whichever node is the primary, RUNS times each (default
//! 10): its postmaster SIGKILLed (agent alive), and its whole host lost
//! (agent and postmaster SIGKILLed, link down: no TCP reset reaches
//! anyone). Measured: fault to the first commit acknowledged by another
//! node.
//!
//! The baseline, in the same run: the same faults with no detection at all,
//! `pgfleet failover` run by hand the moment the fault is made (what an
//! operator with a perfect pager would get). Then `pgfleet serve` with
//! `auto_failover = true` and the default settings (failure_timeout 3 s).
//! After each trial the old primary is brought back (`pgfleet rejoin` by
//! hand; with `pgfleet serve`, the leader's own rejoin) so that the next
//! fault hits the new primary. At the end every acknowledged
//! row is looked up on the final primary: lost rows fail the run.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgfleet_tests::{Coordinator, TestFleet};

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Postmaster,
    Host,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Postmaster => "postmaster SIGKILL",
            Fault::Host => "host lost",
        }
    }
}

/// Every acknowledged insert: its value, when it returned, on which host.
type Acks = Arc<Mutex<Vec<(i64, Instant, usize)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let fleet = TestFleet::new(3)?;
    let h0 = fleet.host(0);
    h0.initdb()?;
    h0.start_postgres()?;
    for h in fleet.hosts() {
        h.start_agent()?;
    }
    for node in ["node1", "node2"] {
        ok(&fleet, &["rebuild", node, "--no-progress-bar"])?;
    }
    ok(&fleet, &["sync", "set", "node1", "node2"])?;
    h0.connect().await?.batch_execute("CREATE TABLE bench_acks (v bigint PRIMARY KEY)").await?;

    let acked: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let conns: Vec<String> = fleet
        .hosts()
        .iter()
        .map(|h| {
            format!(
                "host={} port=5432 user=postgres password={} dbname=postgres target_session_attrs=read-write connect_timeout=1",
                h.addr(),
                h.superuser_password()
            )
        })
        .collect();
    let writer = tokio::spawn(write(conns, acked.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut rows = Vec::new();
    // The baseline: no detection, `pgfleet failover` at once.
    for fault in [Fault::Postmaster, Fault::Host] {
        let mut t = Vec::new();
        for i in 0..runs {
            let s = trial(&fleet, fault, None, &acked).await.with_context(|| format!("{} by hand, trial {}", fault.name(), i + 1))?;
            eprintln!("{} by hand {}: {s:.2} s", fault.name(), i + 1);
            t.push(s);
        }
        rows.push((fault, "`pgfleet failover` at once (baseline)", t));
    }
    // pgfleet serve with auto_failover = true and default settings.
    let inventory = fleet.inventory_toml("main", &[])?;
    std::fs::write(fleet.inventory_path(), inventory.replacen("name = \"main\"\n", "name = \"main\"\nauto_failover = true\n", 1))?;
    let c = fleet.start_coordinator()?;
    c.wait_for_log("watching: primary", Duration::from_secs(20))?;
    for fault in [Fault::Postmaster, Fault::Host] {
        let mut t = Vec::new();
        for i in 0..runs {
            let s = trial(&fleet, fault, Some(&c), &acked).await.with_context(|| format!("{} automatic, trial {}", fault.name(), i + 1))?;
            eprintln!("{} automatic {}: {s:.2} s", fault.name(), i + 1);
            t.push(s);
        }
        rows.push((fault, "`pgfleet serve`, auto_failover, defaults", t));
    }
    stop.store(true, Ordering::Relaxed);
    writer.await??;

    let p = primary(&fleet).await.context("no primary at the end")?;
    let present: HashSet<i64> =
        fleet.host(p).connect().await?.query("SELECT v FROM bench_acks", &[]).await?.iter().map(|r| r.get(0)).collect();
    let all = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let lost = all.iter().filter(|(v, _, _)| !present.contains(v)).count();

    println!();
    println!("| fault | failover | trials | fault to first commit, median | max | ratio to baseline (median) |");
    println!("|---|---|---|---|---|---|");
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (fault, how, t) in &rows {
        let base = rows.iter().find(|(f, h, _)| f == fault && h.contains("baseline")).map(|(_, _, b)| median(b)).unwrap_or(f64::NAN);
        println!(
            "| {} | {how} | {} | {:.2} s | {:.2} s | {:.2} |",
            fault.name(),
            t.len(),
            median(t),
            t.iter().copied().fold(0.0, f64::max),
            median(t) / base
        );
    }
    println!("\nacknowledged rows: {}, lost: {lost}", all.len());
    drop(c);
    if lost > 0 {
        bail!("{lost} acknowledged rows lost");
    }
    Ok(())
}

/// One fault on the current primary; the seconds from the fault to the
/// first commit another node acknowledged. Then the old primary is made a
/// standby again and the cluster settles.
async fn trial(fleet: &TestFleet, fault: Fault, c: Option<&Coordinator>, acked: &Acks) -> anyhow::Result<f64> {
    let old = primary(fleet).await.context("no primary before the fault")?;
    let h = fleet.host(old);
    let done_before = c.map(|c| c.log_text().matches("automatic failover done").count());
    let rejoined_before = c.map(|c| c.log_text().matches("automatic rejoin done").count());
    match fault {
        Fault::Postmaster => h.kill_postgres()?,
        Fault::Host => {
            h.kill_agent()?;
            h.kill_postgres()?;
            h.link_down()?;
        }
    }
    let at = Instant::now();
    if c.is_none() {
        ok(fleet, &["failover"])?;
    }
    let first = loop {
        if let Some(t) = acked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(_, t, host)| *t > at && *host != old)
            .map(|(_, t, _)| *t)
        {
            break t;
        }
        if at.elapsed() > Duration::from_secs(60) {
            bail!("no commit on another node within 60 s{}", c.map(|c| format!(":\n{}", c.log_text())).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if let (Some(c), Some(n)) = (c, done_before) {
        let since = Instant::now();
        while c.log_text().matches("automatic failover done").count() == n {
            if since.elapsed() > Duration::from_secs(60) {
                bail!("the automatic failover did not finish:\n{}", c.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Back as a standby of the new primary.
    if fault == Fault::Host {
        h.link_up()?;
        h.start_agent()?;
    }
    let new = primary(fleet).await.context("no primary after the failover")?;
    if c.is_none() {
        fleet.host(new).connect().await?.batch_execute("CHECKPOINT").await?;
        ok(fleet, &["rejoin", &h.node_name()])?;
    }
    // With pgfleet serve, the leader rejoins the old primary by itself once
    // its agent answers: waited for here (the cluster's lock is its until
    // then, and `sync set` below would be refused).
    if let (Some(c), Some(n)) = (c, rejoined_before) {
        let since = Instant::now();
        while c.log_text().matches("automatic rejoin done").count() == n {
            if since.elapsed() > Duration::from_secs(90) {
                bail!("the leader did not rejoin {}:\n{}", h.node_name(), c.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A failover drops the old primary from synchronous_standby_names:
    // both standbys are listed again, as at the start.
    let standbys: Vec<String> = fleet.hosts().iter().filter(|s| s.index() != new).map(|s| s.node_name()).collect();
    ok(fleet, &["sync", "set", &standbys[0], &standbys[1]])?;
    // Both standbys stream and synchronous replication is met before the
    // next fault.
    let settled = Instant::now();
    loop {
        let n = fleet
            .host(new)
            .query_one_string("select count(*) from pg_stat_replication where state = 'streaming' and sync_state in ('sync', 'potential', 'quorum')")
            .await?;
        if n == "2" {
            break;
        }
        if settled.elapsed() > Duration::from_secs(60) {
            bail!("the standbys of {} do not both stream", fleet.host(new).node_name());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((first - at).as_secs_f64())
}

/// The host whose PostgreSQL says it is not in recovery.
async fn primary(fleet: &TestFleet) -> Option<usize> {
    for (i, h) in fleet.hosts().iter().enumerate() {
        if h.query_one_string("select pg_is_in_recovery()").await.is_ok_and(|v| v == "f") {
            return Some(i);
        }
    }
    None
}

/// The client: an insert every 10 ms on whichever host accepts writes,
/// found by trying every host at once (`target_session_attrs=read-write`,
/// 1 s connect timeout), so that the figure is the cluster's and not a
/// client trying dead hosts in turn. An insert not answered within 1 s
/// drops the connection.
async fn write(conns: Vec<String>, acked: Acks, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut v: i64 = 0;
    let mut client: Option<(tokio_postgres::Client, usize)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = connect_any(&conns).await;
        }
        let Some((c, host)) = &client else { continue };
        v += 1;
        let r = tokio::time::timeout(Duration::from_secs(1), c.execute("INSERT INTO bench_acks (v) VALUES ($1)", &[&v])).await;
        match r {
            Ok(Ok(_)) => acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((v, Instant::now(), *host)),
            _ => client = None,
        }
    }
    Ok(())
}

async fn connect_any(conns: &[String]) -> Option<(tokio_postgres::Client, usize)> {
    let mut set = tokio::task::JoinSet::new();
    for (i, conn) in conns.iter().cloned().enumerate() {
        set.spawn(async move {
            let (c, k) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.ok()?;
            tokio::spawn(k);
            Some((c, i))
        });
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Some(found)) = r {
            return Some(found);
        }
    }
    None
}

fn ok(fleet: &TestFleet, args: &[&str]) -> anyhow::Result<()> {
    let out = fleet.pgfleet(args)?;
    if !out.success() {
        bail!("pgfleet {}: {out}", args.join(" "));
    }
    Ok(())
}

