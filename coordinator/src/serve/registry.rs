//! Operations running in this process: their events, kept so any client can
//! watch from the first one, and their cancel state. What outlives the
//! process is the journal (ops::store).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pgfleet_proto::coordinator::v1 as pb;
use tokio::sync::watch;

use crate::ops::CancelState;

#[derive(Debug)]
pub struct Running {
    pub id: String,
    pub kind: String,
    pub cluster: String,
    pub summary: String,
    pub caller: String,
    pub started_at: String,
    pub dry_run: bool,
    pub cancel: Arc<CancelState>,
    events: Mutex<Vec<pb::OperationEvent>>,
    /// How many events there are; watchers wait on its changes.
    count: watch::Sender<usize>,
    finished: AtomicBool,
}

/// Collects an operation's events into its registry entry as they come.
pub fn collect(running: Arc<Running>, mut rx: tokio::sync::mpsc::UnboundedReceiver<pb::OperationEvent>) {
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            running.push(ev);
        }
    });
}

impl Running {
    pub fn new(id: String, kind: &str, cluster: String, summary: String, caller: String, dry_run: bool, cancel: Arc<CancelState>) -> Self {
        Running {
            id,
            kind: kind.to_owned(),
            cluster,
            summary,
            caller,
            started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            dry_run,
            cancel,
            events: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            finished: AtomicBool::new(false),
        }
    }

    pub fn push(&self, ev: pb::OperationEvent) {
        let fin = matches!(ev.event, Some(pb::operation_event::Event::Finished(_)));
        let n = {
            let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
            events.push(ev);
            events.len()
        };
        if fin {
            self.finished.store(true, Ordering::SeqCst);
        }
        self.count.send_replace(n);
    }

    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    pub fn events_from(&self, from: usize) -> Vec<pb::OperationEvent> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    pub fn last_finished(&self) -> Option<pb::OperationFinished> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.iter().rev().find_map(|e| match &e.event {
            Some(pb::operation_event::Event::Finished(f)) => Some(f.clone()),
            _ => None,
        })
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    ops: Mutex<HashMap<String, Arc<Running>>>,
}

impl Registry {
    pub fn insert(&self, r: Arc<Running>) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).insert(r.id.clone(), r);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Running>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// The operations not finished yet.
    pub fn unfinished(&self) -> Vec<Arc<Running>> {
        self.ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| !r.finished())
            .cloned()
            .collect()
    }
}
