//! What a running operation writes to: its journal (before each step acts)
//! and its event stream (what the CLI shows, in-process or through `pgfleet
//! serve`), and whether it may still be cancelled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use pgfleet_proto::agent::v1 as apb;
use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::operation_event::Event;
use tokio::sync::mpsc::UnboundedSender;

use crate::journal::{JournalError, Operation};
use crate::ops::plan::{Plan, Step};

/// Returned at a cancel point once CancelOperation was accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("operation {id} was cancelled before it changed anything that cannot be left as it is")]
pub struct Cancelled {
    pub id: String,
}

/// Cancellation: requested by CancelOperation, refused once the operation
/// passed its point of no return.
#[derive(Debug, Default)]
pub struct CancelState {
    requested: AtomicBool,
    no_return: Mutex<Option<String>>,
}

impl CancelState {
    /// Accepts a cancel request, or says why stopping now is unsafe.
    pub fn request(&self) -> Result<(), String> {
        let nr = self.no_return.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = nr.as_ref() {
            return Err(why.clone());
        }
        self.requested.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// A running operation's context, passed to every step.
#[derive(Debug)]
pub struct OpCtx {
    id: String,
    journal: Option<Operation>,
    tx: Option<UnboundedSender<pb::OperationEvent>>,
    seq: AtomicU64,
    cancel: Arc<CancelState>,
    /// Who asked, as the journal names them.
    caller: String,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl OpCtx {
    /// Names who asked for the operation.
    pub fn by(mut self, caller: &str) -> Self {
        caller.clone_into(&mut self.caller);
        self
    }

    pub fn caller(&self) -> &str {
        &self.caller
    }

    /// `journal` is None for a dry run (nothing to record: nothing changes).
    pub fn new(
        id: String,
        journal: Option<Operation>,
        tx: Option<UnboundedSender<pb::OperationEvent>>,
        cancel: Arc<CancelState>,
    ) -> Self {
        OpCtx {
            id,
            journal,
            tx,
            seq: AtomicU64::new(0),
            caller: String::new(),
            cancel,
        }
    }

    /// The id agents see in their logs and audit lines.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn journal(&self) -> Option<&Operation> {
        self.journal.as_ref()
    }

    pub fn take_journal(&mut self) -> Option<Operation> {
        self.journal.take()
    }

    pub fn emit(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let seq = self.seq.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(pb::OperationEvent {
                seq,
                time: now(),
                event: Some(event),
            });
        }
    }

    /// Journals a line (no event).
    pub async fn record(&self, step: &str, event: &str, detail: &str) -> Result<(), JournalError> {
        match &self.journal {
            Some(j) => j.record(step, event, detail).await,
            None => Ok(()),
        }
    }

    fn step_event(&self, host: &str, step: &str, phase: &str, detail: &str, seconds: f64) {
        self.emit(Event::Step(pb::Step {
            host: host.to_owned(),
            step: step.to_owned(),
            phase: phase.to_owned(),
            detail: detail.to_owned(),
            seconds,
        }));
    }

    /// Journals, then shows, a step about to act.
    pub async fn start(&self, host: &str, step: &str, what: &str) -> Result<Instant, JournalError> {
        self.record(step, "start", &format!("{host}: {what}")).await?;
        self.step_event(host, step, "start", what, 0.0);
        Ok(Instant::now())
    }

    /// A step that ended; returns its duration in seconds.
    pub async fn done(&self, host: &str, step: &str, t: Instant, detail: &str) -> Result<f64, JournalError> {
        let seconds = t.elapsed().as_secs_f64();
        self.record(step, "done", detail).await?;
        self.step_event(host, step, "done", detail, seconds);
        Ok(seconds)
    }

    async fn record_step(&self, index: usize, step: &str, event: &str, detail: &str) -> Result<(), JournalError> {
        match &self.journal {
            Some(j) => j.record_step(index, step, event, detail).await,
            None => Ok(()),
        }
    }

    /// Journals the plan, as one line, before its first step acts.
    pub async fn planned(&self, plan: &Plan) -> Result<(), JournalError> {
        self.record("plan", "planned", &serde_json::to_string(plan).unwrap_or_default()).await
    }

    /// Journals (with its index in the plan), then shows, a planned step
    /// about to act.
    pub async fn start_step(&self, index: usize, step: &Step) -> Result<Instant, JournalError> {
        let what = step.describe();
        self.record_step(index, step.name(), "start", &format!("{}: {what}", step.host())).await?;
        self.step_event(step.host(), step.name(), "start", &what, 0.0);
        Ok(Instant::now())
    }

    pub async fn done_step(&self, index: usize, step: &Step, t: Instant, detail: &str) -> Result<f64, JournalError> {
        let seconds = t.elapsed().as_secs_f64();
        self.record_step(index, step.name(), "done", detail).await?;
        self.step_event(step.host(), step.name(), "done", detail, seconds);
        Ok(seconds)
    }

    pub async fn skipped_step(&self, index: usize, step: &Step, detail: &str) -> Result<(), JournalError> {
        self.record_step(index, step.name(), "skipped", detail).await?;
        self.step_event(step.host(), step.name(), "skipped", detail, 0.0);
        Ok(())
    }

    pub async fn failed_step(&self, index: usize, step: &Step, detail: &str) {
        let _ = self.record_step(index, step.name(), "failed", detail).await;
        self.step_event(step.host(), step.name(), "failed", detail, 0.0);
    }

    pub async fn skipped(&self, host: &str, step: &str, detail: &str) -> Result<(), JournalError> {
        self.record(step, "skipped", detail).await?;
        self.step_event(host, step, "skipped", detail, 0.0);
        Ok(())
    }

    pub fn note(&self, host: &str, text: &str) {
        self.emit(Event::Note(pb::Note {
            host: host.to_owned(),
            text: text.to_owned(),
            warning: false,
        }));
    }

    pub fn warning(&self, text: &str) {
        self.emit(Event::Note(pb::Note {
            host: String::new(),
            text: text.to_owned(),
            warning: true,
        }));
    }

    pub fn job_event(&self, node: &str, ev: apb::JobEvent) {
        self.emit(Event::Job(pb::NodeJobEvent {
            node: node.to_owned(),
            event: Some(ev),
        }));
    }

    /// A cancel point: stops here if CancelOperation was accepted.
    pub fn checkpoint(&self) -> Result<(), Cancelled> {
        if self.cancel.requested() {
            return Err(Cancelled { id: self.id.clone() });
        }
        Ok(())
    }

    /// From here on the operation runs to its end: a cancel request is
    /// refused with `why`. Stops here instead if one was already accepted.
    pub fn point_of_no_return(&self, why: &str) -> Result<(), Cancelled> {
        let mut nr = self.cancel.no_return.lock().unwrap_or_else(|p| p.into_inner());
        if self.cancel.requested() {
            return Err(Cancelled { id: self.id.clone() });
        }
        if nr.is_none() {
            *nr = Some(why.to_owned());
        }
        Ok(())
    }
}
