//! Switchover benchmark (not part of CI): `bash tests/bench/switchover.sh`.
//!
//! A demo fleet (1 primary + 2 standbys, FIRST 1 synchronous) on 127.0.0.1,
//! a client inserting a row every 10 ms through a multi-host connection
//! string (`target_session_attrs=read-write`), and N switchovers. Prints per
//! switchover the write-unavailability window the client saw (the longest
//! gap between two acknowledged inserts around it) and the command's wall
//! time; then the median and max, and the acknowledged rows lost (must be 0:
//! every row whose INSERT returned is looked up on the final primary).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Mutex;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::var("PGFLEET_DEMO_DIR").context("run through tests/bench/switchover.sh")?;
    let base: u16 = std::env::var("PGFLEET_DEMO_PG_PORT")?.parse()?;
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let pgfleet = format!("{dir}/bin/pgfleet");
    let conn = format!(
        "host=127.0.0.1,127.0.0.1,127.0.0.1 port={},{},{} user=postgres dbname=postgres \
         target_session_attrs=read-write connect_timeout=2",
        base,
        base + 1,
        base + 2
    );
    {
        let (c, k) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(k);
        c.batch_execute("CREATE TABLE IF NOT EXISTS bench_acks (v bigint PRIMARY KEY, at timestamptz DEFAULT now())")
            .await?;
    }

    // The writer: one insert every 10 ms; reconnects (any host, read-write)
    // after an error. Records the time of every acknowledged insert.
    let acked: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, conn) = (acked.clone(), stop.clone(), conn.clone());
        tokio::spawn(async move {
            let mut v: i64 = 0;
            let mut client: Option<tokio_postgres::Client> = None;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                        Ok((c, k)) => {
                            tokio::spawn(k);
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                let Some(c) = &client else { continue };
                v += 1;
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.execute("INSERT INTO bench_acks (v) VALUES ($1)", &[&v]),
                )
                .await;
                match r {
                    Ok(Ok(_)) => acked.lock().await.push((v, Instant::now())),
                    _ => client = None,
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut windows = Vec::new();
    let mut walls = Vec::new();
    let mut reported = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        let out = Command::new(&pgfleet).args(["switchover", "--json"]).output()?;
        let wall = t0.elapsed();
        if !out.status.success() {
            bail!("switchover {i} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        reported.push(j["write_unavailable_seconds"].as_f64().unwrap_or(f64::NAN));
        // Let the writer settle, then measure the largest gap between two
        // acknowledgements inside [t0 - 0.1 s, end + 1 s].
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let a = acked.lock().await;
        let from = t0 - Duration::from_millis(100);
        let until = t0 + wall + Duration::from_secs(1);
        let times: Vec<Instant> = a.iter().map(|(_, t)| *t).filter(|t| *t >= from && *t <= until).collect();
        let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        drop(a);
        eprintln!(
            "switchover {}: to {}, client saw writes stop for {:.3} s; command {:.3} s (reported window {:.3} s)",
            i + 1,
            j["new_primary"].as_str().unwrap_or("?"),
            gap.as_secs_f64(),
            wall.as_secs_f64(),
            reported[i]
        );
        windows.push(gap.as_secs_f64());
        walls.push(wall.as_secs_f64());
    }
    stop.store(true, Ordering::Relaxed);
    writer.await?;

    // Every acknowledged row must be on the final primary.
    let (c, k) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(k);
    let present: Vec<i64> = c
        .query("SELECT v FROM bench_acks", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let present: std::collections::HashSet<i64> = present.into_iter().collect();
    let a = acked.lock().await;
    let lost = a.iter().filter(|(v, _)| !present.contains(v)).count();

    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (mw, xw) = (med(&mut windows.clone()), max(&windows));
    let (mc, xc) = (med(&mut walls.clone()), max(&walls));
    println!();
    println!("| switchovers | write unavailability median | max | `pgfleet switchover` median | max | acknowledged rows | lost |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {runs} | {mw:.3} s | {xw:.3} s | {mc:.3} s | {xc:.3} s | {} | {lost} |",
        a.len()
    );
    if lost > 0 {
        bail!("{lost} acknowledged rows lost");
    }
    Ok(())
}
