//! Reading the journal back: every operation of every cluster with its
//! steps and outcome, and whether one without an end is still running (its
//! cluster lock is held under its id) or was interrupted (the process that
//! ran it is gone; the kernel released its lock).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::OperationState;
use serde::Serialize;

use crate::journal::{JournalError, Store};
use crate::ops::plan::{Plan, Step};

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub time: String,
    pub step: String,
    pub event: String,
    pub detail: String,
    /// The step's place in the journaled plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// One operation as its journal lines tell it.
#[derive(Debug, Clone, Serialize)]
pub struct OpRecord {
    pub id: String,
    pub kind: String,
    pub cluster: String,
    pub summary: String,
    pub caller: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    /// The end line's event: succeeded, failed, cancelled, aborted.
    pub outcome: Option<String>,
    pub detail: Option<String>,
    pub request: Option<serde_json::Value>,
    pub journal: Vec<Entry>,
    pub state: &'static str,
}

/// How far an operation got through its plan, as its journal says.
#[derive(Debug, Clone)]
pub struct Progress {
    pub plan: Plan,
    /// Per step: its start (or skip) was journaled.
    pub started: Vec<bool>,
    /// Per step: its end was journaled.
    pub done: Vec<bool>,
}

impl Progress {
    /// Whether a step matching `f` started (it may have acted).
    pub fn started(&self, f: impl Fn(&Step) -> bool) -> bool {
        self.plan.steps.iter().zip(&self.started).any(|(s, st)| *st && f(s))
    }

    pub fn done(&self, f: impl Fn(&Step) -> bool) -> bool {
        self.plan.steps.iter().zip(&self.done).any(|(s, d)| *d && f(s))
    }
}

impl OpRecord {
    /// The operation's first plan (a resume may journal more) and which of
    /// its steps ran; None for an operation that made no plan, or whose
    /// plan line does not read back.
    pub fn progress(&self) -> Option<Progress> {
        let at = self.journal.iter().position(|e| e.step == "plan" && e.event == "planned")?;
        let plan: Plan = serde_json::from_str(&self.journal[at].detail).ok()?;
        let n = plan.steps.len();
        let (mut started, mut done) = (vec![false; n], vec![false; n]);
        for e in self.journal[at + 1..].iter().take_while(|e| e.step != "plan") {
            let Some(i) = e.index.filter(|i| *i < n) else { continue };
            match e.event.as_str() {
                "start" => started[i] = true,
                // The operator did it (e.g. --fenced).
                "skipped" | "done" => (started[i], done[i]) = (true, true),
                _ => {}
            }
        }
        Some(Progress { plan, started, done })
    }

    /// The nodes whose rebuild was confirmed streaming, under any of the
    /// operation's plans (a resumed rolling rebuild journals one more).
    pub fn confirmed_rebuilds(&self) -> Vec<String> {
        self.done_steps()
            .into_iter()
            .filter_map(|s| match s {
                Step::Confirm { node, .. } => Some(node.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Every step that ended done, under any of the operation's plans.
    pub fn done_steps(&self) -> Vec<Step> {
        let mut plan: Option<Plan> = None;
        let mut out = Vec::new();
        for e in &self.journal {
            if e.step == "plan" && e.event == "planned" {
                plan = serde_json::from_str(&e.detail).ok();
                continue;
            }
            if e.event == "done"
                && let Some(step) = e.index.zip(plan.as_ref()).and_then(|(i, p)| p.steps.get(i))
            {
                out.push(step.clone());
            }
        }
        out
    }

    pub fn state(&self) -> OperationState {
        match self.state {
            "running" => OperationState::Running,
            "succeeded" => OperationState::Succeeded,
            "cancelled" => OperationState::Cancelled,
            "interrupted" => OperationState::Interrupted,
            "aborted" => OperationState::Aborted,
            _ => OperationState::Failed,
        }
    }

    pub fn to_proto(&self) -> pb::Operation {
        pb::Operation {
            id: self.id.clone(),
            kind: self.kind.clone(),
            cluster: self.cluster.clone(),
            summary: self.summary.clone(),
            state: self.state() as i32,
            caller: self.caller.clone(),
            started_at: self.started_at.clone(),
            ended_at: self.ended_at.clone(),
            detail: self.detail.clone().filter(|d| !d.is_empty()),
            journal: self
                .journal
                .iter()
                .map(|e| pb::JournalEntry {
                    time: e.time.clone(),
                    step: e.step.clone(),
                    event: e.event.clone(),
                    detail: e.detail.clone(),
                })
                .collect(),
            request_json: self.request.as_ref().map(|r| r.to_string()).unwrap_or_default(),
            dry_run: false,
        }
    }
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_owned()
}

/// Every journal line of every cluster, each cluster's in order.
async fn lines(store: &Store) -> Result<Vec<String>, JournalError> {
    let state_dir = match store {
        Store::Files(d) => d,
        Store::Etcd(e) => return Ok(e.list("journal/").await?),
    };
    let mut out = Vec::new();
    let dir = match std::fs::read_dir(state_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(JournalError::Io {
                action: "reading",
                path: state_dir.to_owned(),
                source,
            });
        }
    };
    let mut files: Vec<_> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "journal"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| JournalError::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        out.extend(text.lines().map(str::to_owned));
    }
    Ok(out)
}

/// Every journaled operation, oldest first.
pub async fn load(store: &Store) -> Result<Vec<OpRecord>, JournalError> {
    let mut ops: Vec<OpRecord> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    {
        // A line cut short by a crash is skipped, not fatal.
        for v in lines(store).await?.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            let id = s(&v, "op");
            let i = *index.entry(id.clone()).or_insert_with(|| {
                ops.push(OpRecord {
                    id: id.clone(),
                    kind: s(&v, "kind"),
                    cluster: s(&v, "cluster"),
                    summary: String::new(),
                    caller: String::new(),
                    started_at: s(&v, "time"),
                    ended_at: None,
                    outcome: None,
                    detail: None,
                    request: None,
                    journal: Vec::new(),
                    state: "running",
                });
                ops.len() - 1
            });
            let op = &mut ops[i];
            let (step, event) = (s(&v, "step"), s(&v, "event"));
            if step == "begin" {
                op.summary = s(&v, "detail");
                op.caller = s(&v, "caller");
                op.request = v.get("request").cloned();
            }
            if step == "end" {
                op.ended_at = Some(s(&v, "time"));
                op.outcome = Some(event.clone());
                op.detail = Some(s(&v, "detail"));
            } else if step == "resume" || step == "abort" {
                // A resumed operation runs (or ran) again.
                op.ended_at = None;
                op.outcome = None;
            }
            op.journal.push(Entry {
                time: s(&v, "time"),
                step,
                event,
                detail: s(&v, "detail"),
                index: v.get("index").and_then(|i| i.as_u64()).and_then(|i| usize::try_from(i).ok()),
            });
        }
    }
    // Who holds each cluster's lock, asked once per cluster.
    let mut holders: HashMap<String, Option<String>> = HashMap::new();
    for op in &mut ops {
        if !holders.contains_key(&op.cluster) {
            holders.insert(op.cluster.clone(), lock_holder(store, &op.cluster).await);
        }
        let holder = &holders[&op.cluster];
        op.state = match op.outcome.as_deref() {
            Some("succeeded") => "succeeded",
            Some("cancelled") => "cancelled",
            Some("aborted") => "aborted",
            Some(_) => "failed",
            None if holder.as_deref().is_some_and(|h| h.starts_with(&format!("{} ", op.id))) => {
                "running"
            }
            None => "interrupted",
        };
    }
    // RFC 3339 UTC times sort as text.
    ops.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(ops)
}

/// How the cluster's latest failover went, as far as one former primary
/// and its successor are concerned.
#[derive(Debug, Clone)]
pub struct FailedOver {
    pub id: String,
    /// It fenced the node by isolation (its agent did not answer).
    pub isolated: bool,
    /// It promoted without proof, accepting a loss: the former primary's
    /// divergent WAL may hold acknowledged commits nobody else has.
    pub loss_accepted: bool,
}

/// The cluster's latest failover, if it fenced `node` (through its agent
/// or by isolation) and promoted `promoted`.
pub async fn failed_over_from(store: &Store, cluster: &str, node: &str, promoted: &str) -> Result<Option<FailedOver>, JournalError> {
    let ops = load(store).await?;
    let Some(last) = ops.iter().rev().find(|o| o.cluster == cluster && o.kind == "failover") else {
        return Ok(None);
    };
    let done = last.done_steps();
    let fenced = |s: &Step| matches!(s, Step::Fence { node: n, .. } | Step::Isolate { node: n, .. } if n.as_str() == node);
    let isolated = done.iter().any(|s| matches!(s, Step::Isolate { node: n, upstream, .. } if n.as_str() == node && upstream.as_str() == promoted));
    let promoted_it = done.iter().any(|s| matches!(s, Step::Promote { node: n } if n.as_str() == promoted));
    if !(promoted_it && done.iter().any(fenced)) {
        return Ok(None);
    }
    Ok(Some(FailedOver {
        id: last.id.clone(),
        isolated,
        loss_accepted: last.journal.iter().any(|e| e.event == "data-loss-accepted"),
    }))
}

/// The cluster's latest failover, if it fenced `node` by isolation and
/// promoted `promoted`: then `node`, back as a primary on an older
/// timeline, could acknowledge no commit after that failover began
/// (DESIGN.md invariant 14), and making it a standby loses nothing that was
/// acknowledged. Its id.
pub async fn isolated_by(store: &Store, cluster: &str, node: &str, promoted: &str) -> Result<Option<String>, JournalError> {
    Ok(failed_over_from(store, cluster, node, promoted).await?.filter(|f| f.isolated).map(|f| f.id))
}

pub async fn find(store: &Store, id: &str) -> Result<Option<OpRecord>, JournalError> {
    Ok(load(store).await?.into_iter().find(|o| o.id == id))
}

/// What the cluster's lock file says while a live process holds the lock.
/// Read from /proc/locks rather than by trying the lock, which would make a
/// concurrent `begin` fail for nothing.
pub async fn lock_holder(store: &Store, cluster: &str) -> Option<String> {
    let state_dir = match store {
        Store::Files(d) => d,
        Store::Etcd(e) => return e.lock_holder(cluster).await.ok().flatten(),
    };
    let path = state_dir.join(format!("{cluster}.lock"));
    let meta = std::fs::metadata(&path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let ino = format!(":{} ", meta.ino());
    let held = locks
        .lines()
        .any(|l| l.contains("FLOCK") && format!("{l} ").contains(&ino));
    if !held {
        return None;
    }
    std::fs::read_to_string(&path).ok().map(|s| s.trim().to_owned())
}


