//! A client committing rows through whichever node is writable, and the
//! check that every acknowledged row survived: what the failover and
//! automatic-failover tests measure data loss and write gaps with.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgfleet_tests::{Host, TestFleet};

use super::rows;

/// A client inserting a row every 10 ms through a multi-host connection
/// string that finds whichever node is writable
/// (`target_session_attrs=read-write`), reconnecting after every error. It
/// remembers the ids whose INSERT returned (acknowledged) and those whose
/// INSERT failed or timed out (perhaps committed, perhaps not).
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    /// When each acknowledged INSERT returned, in order.
    acked_at: Arc<Mutex<Vec<Instant>>>,
    uncertain: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(fleet: &TestFleet) -> Writer {
        let hosts: Vec<String> = fleet.hosts().iter().map(|h| h.addr().to_string()).collect();
        let ports = vec!["5432"; hosts.len()].join(",");
        let conn = format!(
            "host={} port={ports} user=postgres password={} dbname=postgres \
             target_session_attrs=read-write connect_timeout=2",
            hosts.join(","),
            fleet.host(0).superuser_password()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
        let acked_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let uncertain: Arc<Mutex<Vec<i64>>> = Arc::default();
        let task = {
            let (stop, acked, acked_at, uncertain) =
                (stop.clone(), acked.clone(), acked_at.clone(), uncertain.clone());
            tokio::spawn(async move {
                let mut id: i64 = 0;
                let mut client: Option<tokio_postgres::Client> = None;
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        let attempt = tokio::time::timeout(
                            Duration::from_secs(10),
                            tokio_postgres::connect(&conn, tokio_postgres::NoTls),
                        )
                        .await;
                        client = match attempt {
                            Ok(Ok((c, connection))) => {
                                tokio::spawn(async move {
                                    let _ = connection.await;
                                });
                                Some(c)
                            }
                            _ => None,
                        };
                    }
                    let Some(c) = &client else { continue };
                    id += 1;
                    let insert = tokio::time::timeout(
                        Duration::from_secs(5),
                        c.execute("insert into acks (id) values ($1)", &[&id]),
                    )
                    .await;
                    if let Ok(Ok(1)) = insert {
                        acked.lock().unwrap().push(id);
                        acked_at.lock().unwrap().push(Instant::now());
                    } else {
                        uncertain.lock().unwrap().push(id);
                        client = None;
                    }
                }
            })
        };
        Writer {
            stop,
            acked,
            acked_at,
            uncertain,
            task,
        }
    }

    /// The longest time without an acknowledged commit since `since`
    /// (up to now): how long writes were unavailable.
    pub fn longest_gap_since(&self, since: Instant) -> Duration {
        let times = self.acked_at.lock().unwrap();
        let mut prev = since;
        let mut longest = Duration::ZERO;
        for &t in times.iter().filter(|&&t| t > since).chain(std::iter::once(&Instant::now())) {
            longest = longest.max(t - prev);
            prev = t;
        }
        longest
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits (up to 60 s) until `n` more inserts were acknowledged.
    pub async fn wait_for_more(&self, n: usize) {
        let target = self.acked_count() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked_count() < target {
            assert!(
                Instant::now() < deadline,
                "the client got no {n} more commits acknowledged within 60 s ({} so far)",
                self.acked_count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the client; returns (acknowledged ids, uncertain ids).
    pub async fn finish(self) -> (BTreeSet<i64>, BTreeSet<i64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().iter().copied().collect();
        let uncertain = self.uncertain.lock().unwrap().iter().copied().collect();
        (acked, uncertain)
    }
}

/// Every acknowledged id is in `acks` on `host`, and every other row there
/// is one whose INSERT's outcome the client did not learn.
pub async fn assert_rows_present(host: &Host, acked: &BTreeSet<i64>, uncertain: &BTreeSet<i64>) {
    let present: BTreeSet<i64> = rows(host, "select id from acks")
        .await
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect();
    let lost: Vec<&i64> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged rows are missing on {}: {:?}",
        lost.len(),
        acked.len(),
        host.node_name(),
        &lost[..lost.len().min(20)]
    );
    let unexplained: Vec<&i64> = present
        .difference(acked)
        .filter(|id| !uncertain.contains(id))
        .collect();
    assert!(
        unexplained.is_empty(),
        "rows on {} nobody inserted: {unexplained:?}",
        host.node_name()
    );
    assert!(
        present.len() >= acked.len() && present.len() <= acked.len() + uncertain.len(),
        "{} rows on {}, {} acknowledged, {} uncertain",
        present.len(),
        host.node_name(),
        acked.len(),
        uncertain.len()
    );
}
