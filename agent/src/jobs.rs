//! Jobs: long operations (rebuild) that run on the agent under an id, carry
//! on when the caller disconnects, and can be watched again from their first
//! event at any time.
//!
//! Each job keeps its whole event history (a rebuild has a few hundred
//! events: progress is throttled) and a watch channel with the event count;
//! a watcher replays the history, then waits for the count to grow. No
//! event can be missed or seen twice, and a slow watcher never holds the job
//! back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pgfleet_proto::agent::v1 as pb;
use tokio::sync::watch;

use crate::plan::rfc3339_now;

#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub kind: &'static str,
    events: Mutex<Vec<pb::JobEvent>>,
    count: watch::Sender<usize>,
}

impl Job {
    fn new(id: String, kind: &'static str) -> Self {
        let (count, _) = watch::channel(0);
        Job {
            id,
            kind,
            events: Mutex::new(Vec::new()),
            count,
        }
    }

    pub fn emit(&self, event: pb::job_event::Event) {
        let mut events = lock(&self.events);
        let seq = events.len() as u64;
        events.push(pb::JobEvent {
            seq,
            time: rfc3339_now(),
            event: Some(event),
        });
        let n = events.len();
        drop(events);
        self.count.send_replace(n);
    }

    pub fn is_finished(&self) -> bool {
        lock(&self.events)
            .last()
            .is_some_and(|e| matches!(e.event, Some(pb::job_event::Event::Finished(_))))
    }

    fn events_from(&self, from: usize) -> Vec<pb::JobEvent> {
        lock(&self.events).get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Every event from the first, then live ones, ending after `Finished`.
    pub fn watch(self: &Arc<Self>) -> impl futures::Stream<Item = pb::JobEvent> + use<> {
        let job = self.clone();
        let mut rx = job.count.subscribe();
        async_stream::stream! {
            let mut next = 0usize;
            loop {
                let batch = job.events_from(next);
                next += batch.len();
                let mut finished = false;
                for e in batch {
                    finished |= matches!(e.event, Some(pb::job_event::Event::Finished(_)));
                    yield e;
                }
                if finished {
                    break;
                }
                // Wait for more; the sender lives as long as the job.
                if rx.wait_for(|&n| n > next).await.is_err() {
                    break;
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the Vec half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// All jobs of this agent process, and the one rebuild that may run.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("a {kind} is already running on this node as job {id}; watch it with WatchJob or wait for it to end")]
    AlreadyRunning { kind: &'static str, id: String },
    #[error("no job {0} on this agent (jobs do not survive an agent restart)")]
    NotFound(String),
}

impl Jobs {
    /// Whether a job is running (it changes the node as it goes).
    pub fn busy(&self) -> bool {
        lock(&self.jobs).values().any(|j| !j.is_finished())
    }

    /// Registers a new job of `kind`, refusing while another of that kind runs.
    pub fn start(&self, kind: &'static str, id: String) -> Result<Arc<Job>, JobError> {
        let mut jobs = lock(&self.jobs);
        if let Some(running) = jobs.values().find(|j| j.kind == kind && !j.is_finished()) {
            return Err(JobError::AlreadyRunning {
                kind,
                id: running.id.clone(),
            });
        }
        let job = Arc::new(Job::new(id.clone(), kind));
        jobs.insert(id, job.clone());
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(pgfleet_proto::shown(id)))
    }
}

/// A job id: time-ordered and unique within this agent.
pub fn new_id(kind: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{kind}-{}-{}",
        crate::plan::file_stamp(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn log(line: &str) -> pb::job_event::Event {
        pb::job_event::Event::Log(pb::LogLine {
            source: "t".into(),
            line: line.into(),
        })
    }

    #[tokio::test]
    async fn late_watcher_sees_everything_once() {
        let jobs = Jobs::default();
        let job = jobs.start("rebuild", "j1".into()).unwrap();
        job.emit(log("a"));
        let early = job.watch();
        assert!(matches!(
            jobs.start("rebuild", "j2".into()),
            Err(JobError::AlreadyRunning { .. })
        ));
        let j = job.clone();
        let writer = tokio::spawn(async move {
            for i in 0..50 {
                j.emit(log(&format!("l{i}")));
                tokio::task::yield_now().await;
            }
            j.emit(pb::job_event::Event::Finished(pb::JobFinished {
                success: true,
                ..Default::default()
            }));
        });
        let seen: Vec<u64> = early.map(|e| e.seq).collect().await;
        writer.await.unwrap();
        assert_eq!(seen, (0..52).collect::<Vec<_>>());
        let late: Vec<u64> = job.watch().map(|e| e.seq).collect().await;
        assert_eq!(late.len(), 52);
        assert!(jobs.start("rebuild", "j3".into()).is_ok(), "finished job blocks a new one");
        assert!(matches!(jobs.get("nope"), Err(JobError::NotFound(_))));
    }
}
