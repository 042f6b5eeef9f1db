//! One operation per cluster at a time, and a record of what each did
//! (DESIGN.md invariant 7): a lock per cluster, a journal of JSON lines
//! written before and after every step, and the cluster's last synchronous
//! configuration, which failover needs when the primary that held it is
//! gone.
//!
//! Two stores. Files in the inventory's state_dir (the default: one
//! coordinator needs nothing else): a lock file per cluster held with
//! flock(2), which the kernel releases if the process dies, and a journal
//! file per cluster. Or etcd (`[etcd]` in the inventory), shared by several
//! coordinators: the same lines and locks as keys (see `etcd.rs`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

use crate::etcd::{EtcdError, EtcdStore};

/// Where locks, journal and remembered settings live.
#[derive(Debug, Clone)]
pub enum Store {
    Files(PathBuf),
    Etcd(Arc<EtcdStore>),
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Files(d) => write!(f, "{}", d.display()),
            Store::Etcd(e) => write!(f, "etcd {} under {}", e.config.endpoints.join(","), e.config.prefix),
        }
    }
}

#[derive(Debug)]
enum Lock {
    File(Flock<File>),
    Etcd { store: Arc<EtcdStore>, holder: String },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{action} {path}: {source}; set state_dir in the inventory to a directory this user may write")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another operation is running on cluster {cluster}: {holder}; wait for it or check `pgfleet status`")]
    Busy { cluster: String, holder: String },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A stored value that does not read back.
    #[error("{what} in the store does not read: {reason}; fix or remove it")]
    Corrupt { what: String, reason: String },
}

impl JournalError {
    /// A held lock is ABORTED (try again later), an unreachable etcd
    /// UNAVAILABLE, a state directory that cannot be written INTERNAL.
    pub fn code(&self) -> tonic::Code {
        match self {
            JournalError::Io { .. } => tonic::Code::Internal,
            JournalError::Busy { .. } => tonic::Code::Aborted,
            JournalError::Etcd(_) => tonic::Code::Unavailable,
            JournalError::Corrupt { .. } => tonic::Code::Internal,
        }
    }
}

/// Held for the whole operation; dropping it releases the cluster.
#[derive(Debug)]
pub struct Operation {
    pub id: String,
    pub kind: &'static str,
    cluster: String,
    store: Store,
    lock: Lock,
    /// The next line's number (etcd keys keep the order).
    seq: AtomicU32,
    started: Instant,
    ended: bool,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_owned();
    move |source| JournalError::Io { action, path, source }
}

impl Operation {
    /// Takes the cluster's lock or says who holds it, and journals the
    /// request before anything acts on it.
    pub async fn begin(
        store: &Store,
        cluster: &str,
        kind: &'static str,
        what: &str,
        caller: &str,
        request: &serde_json::Value,
    ) -> Result<Self, JournalError> {
        let id = new_id(kind);
        let op = Self::lock(store, cluster, kind, &id, what).await?;
        op.write(json!({
            "step": "begin", "event": "started", "detail": what, "caller": caller, "request": request,
        }))
        .await?;
        Ok(op)
    }

    /// Takes the cluster's lock again for an interrupted operation (resume
    /// or abort): its further lines carry the same id.
    pub async fn reopen(store: &Store, cluster: &str, kind: &'static str, id: &str, action: &str, caller: &str) -> Result<Self, JournalError> {
        let op = Self::lock(store, cluster, kind, id, action).await?;
        if let Store::Etcd(e) = store {
            let n = e.count(&format!("journal/{cluster}/{id}/")).await?;
            op.seq.store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::SeqCst);
        }
        op.write(json!({ "step": action, "event": "start", "detail": format!("caller {caller}"), "caller": caller }))
            .await?;
        Ok(op)
    }

    async fn lock(store: &Store, cluster: &str, kind: &'static str, id: &str, what: &str) -> Result<Self, JournalError> {
        let op = |lock| Operation {
            id: id.to_owned(),
            kind,
            cluster: cluster.to_owned(),
            store: store.clone(),
            lock,
            seq: AtomicU32::new(0),
            started: Instant::now(),
            ended: false,
        };
        let state_dir = match store {
            Store::Files(d) => d,
            Store::Etcd(e) => {
                let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
                let holder = format!("{id} ({what}), pid {} on {host}", std::process::id());
                return match e.try_lock(cluster, &holder).await? {
                    Ok(()) => Ok(op(Lock::Etcd { store: e.clone(), holder })),
                    Err(holder) => Err(JournalError::Busy { cluster: cluster.to_owned(), holder }),
                };
            }
        };
        std::fs::create_dir_all(state_dir).map_err(io("creating", state_dir))?;
        let lock_path = state_dir.join(format!("{cluster}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        same_owner_as_dir(&lock_path, state_dir);
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut f, _)) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                return Err(JournalError::Busy {
                    cluster: cluster.to_owned(),
                    holder: if holder.trim().is_empty() { "unknown".into() } else { holder.trim().to_owned() },
                });
            }
        };
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = writeln!(lock, "{id} ({what}), pid {}", std::process::id());
        Ok(op(Lock::File(lock)))
    }

    /// Appends one journal line; written (and fsynced) before the step acts.
    pub async fn record(&self, step: &str, event: &str, detail: &str) -> Result<(), JournalError> {
        self.write(json!({ "step": step, "event": event, "detail": detail })).await
    }

    /// A line of a planned step: `index` is its place in the journaled plan,
    /// which is how `ops resume` knows which steps ran.
    pub async fn record_step(&self, index: usize, step: &str, event: &str, detail: &str) -> Result<(), JournalError> {
        self.write(json!({ "step": step, "event": event, "detail": detail, "index": index })).await
    }

    /// The line and, for etcd, its key: numbered in order.
    fn line(&self, fields: serde_json::Value) -> (String, String) {
        let mut line = json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "op": self.id,
            "kind": self.kind,
            "cluster": self.cluster,
        });
        if let (Some(l), serde_json::Value::Object(f)) = (line.as_object_mut(), fields) {
            l.extend(f);
        }
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        (format!("journal/{}/{}/{n:06}", self.cluster, self.id), line.to_string())
    }

    async fn write(&self, fields: serde_json::Value) -> Result<(), JournalError> {
        let (key, line) = self.line(fields);
        match &self.store {
            Store::Etcd(e) => Ok(e.put(&key, &line).await?),
            Store::Files(dir) => {
                // One fsync'd append: off the runtime's workers, which may
                // be serving other callers meanwhile.
                let (dir, cluster) = (dir.clone(), self.cluster.clone());
                tokio::task::spawn_blocking(move || append(&dir, &cluster, &line))
                    .await
                    .unwrap_or_else(|e| Err(JournalError::Io {
                        action: "writing",
                        path: PathBuf::new(),
                        source: std::io::Error::other(e),
                    }))
            }
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The last line: `outcome` is "succeeded", "failed", "cancelled",
    /// "aborted"; `detail` the error or what was left behind. An end that
    /// cannot be written (tried twice: the second attempt may reach another
    /// etcd member) is an error the caller must report: the journal will
    /// show the operation as interrupted.
    pub async fn end(mut self, outcome: &str, detail: &str) -> Result<(), JournalError> {
        self.ended = true;
        let written = match self.record("end", outcome, detail).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot journal the end of the operation; trying once more");
                self.record("end", outcome, detail).await
            }
        };
        match &mut self.lock {
            // The lock file names the running operation only while it runs.
            Lock::File(f) => {
                let _ = f.set_len(0);
            }
            Lock::Etcd { store, holder } => {
                if let Err(e) = store.unlock(&self.cluster, holder).await {
                    tracing::warn!(error = %e, cluster = %self.cluster, "cannot release the etcd lock; it expires with this process's lease");
                }
            }
        }
        written
    }
}

/// An operation dropped without `end` (a panic, or a caller that returned
/// early) still says so in its journal: a file store's line is written
/// here; an etcd store's is written by a task on the runtime, best effort
/// (a process about to exit may not run it: the lock then goes with its
/// lease and the operation reads as interrupted, which is what it is).
/// A crash writes nothing: its last line is a step start.
impl Drop for Operation {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (key, line) = self.line(json!({ "step": "end", "event": "failed", "detail": "" }));
        match (&self.store, &mut self.lock) {
            (Store::Files(dir), Lock::File(f)) => {
                if let Err(e) = append(dir, &self.cluster, &line) {
                    tracing::error!(error = %e, "cannot journal the end of a failed operation: it will read as interrupted");
                }
                let _ = f.set_len(0);
            }
            (Store::Etcd(e), Lock::Etcd { holder, .. }) => {
                let (e, holder, cluster) = (e.clone(), holder.clone(), self.cluster.clone());
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Err(err) = e.put(&key, &line).await {
                            tracing::error!(error = %err, "cannot journal the end of a failed operation: it will read as interrupted");
                        }
                        let _ = e.unlock(&cluster, &holder).await;
                    });
                }
            }
            _ => {}
        }
    }
}

/// Appends one line to the cluster's journal file and syncs it.
fn append(dir: &Path, cluster: &str, line: &str) -> Result<(), JournalError> {
    let journal = dir.join(format!("{cluster}.journal"));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal)
        .map_err(io("opening", &journal))?;
    same_owner_as_dir(&journal, dir);
    writeln!(f, "{line}").map_err(io("writing", &journal))?;
    f.sync_data().map_err(io("syncing", &journal))
}

/// Root running the CLI in-process on a host where `pgfleet serve` runs as
/// its own user (state_dir owned by that user) must not leave files the
/// service can no longer write: they get the directory's owner.
fn same_owner_as_dir(path: &Path, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::metadata(path)) else { return };
    if d.uid() != f.uid() || d.gid() != f.gid() {
        let _ = nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(d.uid())),
            Some(nix::unistd::Gid::from_raw(d.gid())),
        );
    }
}

/// `{kind}-{UTC time}-{pid}-{n}`: unique across this process's operations
/// and readable in a journal.
pub fn new_id(kind: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    format!(
        "{kind}-{}-{}-{}",
        humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replace(['-', ':'], ""),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The cluster's synchronous configuration as pgfleet last set or saw it.
pub async fn remember_sync(store: &Store, cluster: &str, value: &str) -> Result<(), JournalError> {
    put_value(store, "sync", cluster, value).await
}

pub async fn recall_sync(store: &Store, cluster: &str) -> Option<String> {
    get_value(store, "sync", cluster).await.ok().flatten()
}

/// Stores one small value of a cluster's: etcd key `KIND/CLUSTER`, or the
/// file `CLUSTER.KIND` in the state directory (written aside, renamed).
pub async fn put_value(store: &Store, kind: &str, cluster: &str, value: &str) -> Result<(), JournalError> {
    let state_dir = match store {
        Store::Files(d) => d,
        Store::Etcd(e) => return Ok(e.put(&format!("{kind}/{cluster}"), value).await?),
    };
    std::fs::create_dir_all(state_dir).map_err(io("creating", state_dir))?;
    let path = state_dir.join(format!("{cluster}.{kind}"));
    let tmp = state_dir.join(format!(".{cluster}.{kind}.tmp"));
    std::fs::write(&tmp, format!("{value}\n")).map_err(io("writing", &tmp))?;
    same_owner_as_dir(&tmp, state_dir);
    std::fs::rename(&tmp, &path).map_err(io("renaming", &path))
}

/// The value [`put_value`] stored, None when there is none.
pub async fn get_value(store: &Store, kind: &str, cluster: &str) -> Result<Option<String>, JournalError> {
    let state_dir = match store {
        Store::Files(d) => d,
        Store::Etcd(e) => return Ok(e.get(&format!("{kind}/{cluster}")).await?),
    };
    let path = state_dir.join(format!("{cluster}.{kind}"));
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim_end_matches('\n').to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::Io { action: "reading", path, source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_operation_on_a_cluster_is_refused_and_journal_records() {
        let dir = std::env::temp_dir().join(format!("pgfleet-journal-{}", std::process::id()));
        let store = Store::Files(dir.clone());
        let req = serde_json::json!({ "kind": "switchover" });
        let op = Operation::begin(&store, "main", "switchover", "to node1", "tester", &req).await.unwrap();
        let e = Operation::begin(&store, "main", "rebuild", "node2", "tester", &req).await.unwrap_err().to_string();
        assert!(e.contains("another operation is running on cluster main") && e.contains("switchover"), "{e}");
        // Another cluster is independent.
        let other = Operation::begin(&store, "other", "rebuild", "x", "tester", &req).await.unwrap();
        op.record("promote", "done", "timeline 2").await.unwrap();
        // While it holds the lock, the journal reads it as running.
        let ops = crate::ops::store::load(&store).await.unwrap();
        let me = ops.iter().find(|o| o.id == op.id).unwrap();
        assert_eq!(me.state, "running");
        assert_eq!(me.caller, "tester");
        assert_eq!(me.request.as_ref().unwrap()["kind"], "switchover");
        op.end("succeeded", "").await.unwrap();
        other.end("failed", "boom").await.unwrap();
        let again = Operation::begin(&store, "main", "rebuild", "node2", "tester", &req).await.unwrap();
        let id = again.id.clone();
        // A process that dies leaves no end line and no lock: interrupted.
        std::mem::forget(again);
        let text = std::fs::read_to_string(dir.join("main.journal")).unwrap();
        assert!(text.lines().count() >= 3 && text.contains("\"step\":\"promote\""), "{text}");
        let ops = crate::ops::store::load(&store).await.unwrap();
        let states: Vec<_> = ops.iter().map(|o| (o.cluster.as_str(), o.state)).collect();
        assert!(states.contains(&("main", "succeeded")) && states.contains(&("other", "failed")), "{states:?}");
        // Forgotten, its lock fd is still open in this process: running.
        assert_eq!(crate::ops::store::find(&store, &id).await.unwrap().unwrap().state, "running");
        remember_sync(&store, "main", "FIRST 1 (\"a\")").await.unwrap();
        assert_eq!(recall_sync(&store, "main").await.unwrap(), "FIRST 1 (\"a\")");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_operation_without_end_or_lock_is_interrupted() {
        let dir = std::env::temp_dir().join(format!("pgfleet-journal-int-{}", std::process::id()));
        let store = Store::Files(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("c.journal"),
            concat!(
                r#"{"time":"t1","op":"rebuild-1","kind":"rebuild","cluster":"c","step":"begin","event":"started","detail":"node2","caller":"x","request":{"kind":"rebuild"}}"#,
                "\n",
                r#"{"time":"t2","op":"rebuild-1","kind":"rebuild","cluster":"c","step":"job","event":"started","detail":"node2 j1"}"#,
                "\n",
                r#"{"time":"t3","op":"rebuild-1","kind":"rebui"#,
            ),
        )
        .unwrap();
        let ops = crate::ops::store::load(&store).await.unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].state, "interrupted");
        assert_eq!(ops[0].journal.len(), 2, "a torn last line is skipped");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn files_root_creates_take_the_state_dirs_owner() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("pgfleet-journal-own-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&dir, Some(nobody), Some(nix::unistd::Gid::from_raw(65534))).unwrap();
        let store = Store::Files(dir.clone());
        let op = Operation::begin(&store, "c", "rebuild", "n", "root", &serde_json::json!({})).await.unwrap();
        op.end("succeeded", "").await.unwrap();
        remember_sync(&store, "c", "FIRST 1 (a)").await.unwrap();
        for f in ["c.lock", "c.journal", "c.sync"] {
            assert_eq!(std::fs::metadata(dir.join(f)).unwrap().uid(), 65534, "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
