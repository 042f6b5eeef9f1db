//! GetStatus from a snapshot: the node's status is read at most once per
//! [`INTERVAL`] whatever the number of callers (a dashboard, a scraper and
//! the coordinator polling together share one read), and every answer
//! says how old its snapshot is. A caller that must see the server as it is
//! now (an operation deciding something) asks for a fresh read; concurrent
//! fresh callers share one read too. Nobody asking costs nothing: there is
//! no background loop. What the agent changes itself (every changing RPC,
//! a running job) is never answered from an older snapshot: the change
//! drops it, and while a job runs every answer is a read.
//!
//! How old an answer can be: a caller that finds the snapshot older than
//! the interval starts a read and waits for it; callers arriving while that
//! read runs get the previous snapshot. So an answer is never older than
//! the interval plus one read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::AgentState;
use crate::status::{self, NodeStatus};

/// How long a snapshot answers without a new read.
pub const INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct Snapshots {
    latest: Mutex<Option<Snapshot>>,
    /// Held by the one read in progress.
    reading: tokio::sync::Mutex<()>,
    /// Bumped by every change: a read that began before one is not kept.
    generation: AtomicU64,
}

#[derive(Debug, Clone)]
struct Snapshot {
    /// When the read that made it began.
    read_at: Instant,
    status: Arc<NodeStatus>,
}

impl Snapshots {
    /// The status and how old it is.
    pub async fn get(&self, state: &AgentState, fresh: bool) -> (Arc<NodeStatus>, Duration) {
        let asked = Instant::now();
        let fresh = fresh || state.jobs.busy();
        if !fresh {
            if let Some(s) = self.current().filter(|s| s.read_at.elapsed() <= INTERVAL) {
                return answer(s);
            }
            // Another caller is reading: its result is at most one read
            // newer than what there is; answer with what there is.
            if let Err(_busy) = self.reading.try_lock()
                && let Some(s) = self.current()
            {
                return answer(s);
            }
        }
        let _reading = self.reading.lock().await;
        // A read that began after this call was made, done while we waited
        // for the lock, is as fresh as one of our own.
        if let Some(s) = self.current() {
            let good = if fresh { s.read_at >= asked } else { s.read_at.elapsed() <= INTERVAL };
            if good {
                return answer(s);
            }
        }
        let read_at = Instant::now();
        let generation = self.generation.load(Ordering::SeqCst);
        let st = status::gather(&state.config, &state.pg, &state.service_status).await;
        let s = Snapshot { read_at, status: Arc::new(st) };
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if self.generation.load(Ordering::SeqCst) == generation {
            *latest = Some(s.clone());
        }
        answer(s)
    }

    /// Drops the snapshot: this agent just changed the node.
    pub fn invalidate(&self) {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::SeqCst);
        *latest = None;
    }

    fn current(&self) -> Option<Snapshot> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn answer(s: Snapshot) -> (Arc<NodeStatus>, Duration) {
    (s.status, s.read_at.elapsed())
}
