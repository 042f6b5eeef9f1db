//! Every automatic decision of the leader (issue #14): a failure detected,
//! an automatic operation started, the old primary fenced, a standby
//! promoted, a former primary rejoined, an action refused or not taken (and
//! why). Each one is logged, sent to WatchFleet's subscribers, and given to
//! the hook command of coordinator.toml, if there is one:
//!
//! ```toml
//! [hook]
//! command = ["/usr/local/bin/pgfleet-page", "--team", "dba"]
//! timeout = "10s"
//! ```
//!
//! The command runs with an argv (no shell), the decision as one JSON line
//! on its stdin and in `PGFLEET_DECISION`, `PGFLEET_CLUSTER`, for at most
//! `timeout` (then killed); its exit status and stderr are logged. It
//! cannot delay or stop what it is told about: it runs beside the action.

use std::process::Stdio;
use std::time::Duration;

use pgfleet_proto::coordinator::v1 as pb;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;
use tracing::{info, warn};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// argv: the program, then its arguments.
    pub command: Vec<String>,
    #[serde(default = "default_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `timeout = "10s"`, as the inventory's durations are written.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        let shown = pgfleet_proto::shown(&s);
        let t = humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("[hook] timeout {shown}: {e}; e.g. \"10s\"")))?;
        if t.is_zero() || t > Duration::from_secs(300) {
            return Err(serde::de::Error::custom(format!("[hook] timeout {shown} is outside 1ms..5m")));
        }
        Ok(t)
    }
}

impl HookConfig {
    pub fn check(&self) -> Result<(), String> {
        match self.command.first() {
            None => Err("[hook] command is empty: give the program and its arguments, e.g. [\"/usr/local/bin/page\"]".into()),
            Some(p) if !p.starts_with('/') => Err(format!("[hook] command {p:?} must be an absolute path")),
            Some(_) => Ok(()),
        }
    }
}

/// Where decisions go.
#[derive(Debug)]
pub struct Decisions {
    tx: broadcast::Sender<pb::AutomaticDecision>,
    hook: Option<HookConfig>,
}

impl Decisions {
    pub fn new(hook: Option<HookConfig>) -> Self {
        Decisions { tx: broadcast::channel(256).0, hook }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::AutomaticDecision> {
        self.tx.subscribe()
    }

    /// Records one decision. `kind`: detected, started, fenced, isolated,
    /// promoted, rejoined, refused, failed, not-acting.
    pub fn decide(&self, cluster: &str, kind: &str, detail: &str, operation: Option<&str>) {
        let d = pb::AutomaticDecision {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            cluster: cluster.to_owned(),
            kind: kind.to_owned(),
            detail: pgfleet_proto::one_line(detail, 2000),
            operation: operation.unwrap_or_default().to_owned(),
        };
        info!(cluster, decision = kind, operation = operation.unwrap_or(""), "automatic decision: {}", d.detail);
        // No subscriber is not an error.
        let _ = self.tx.send(d.clone());
        if let Some(h) = &self.hook {
            tokio::spawn(run_hook(h.clone(), d));
        }
    }
}

async fn run_hook(h: HookConfig, d: pb::AutomaticDecision) {
    let line = serde_json::json!({
        "time": d.time, "cluster": d.cluster, "decision": d.kind, "detail": d.detail, "operation": d.operation,
    })
    .to_string();
    let Some((program, args)) = h.command.split_first() else { return };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("PGFLEET_DECISION", &d.kind)
        .env("PGFLEET_CLUSTER", &d.cluster)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(hook = %program, decision = %d.kind, "hook did not start: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{line}\n").as_bytes()).await;
    }
    match tokio::time::timeout(h.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => info!(hook = %program, decision = %d.kind, "hook exited 0"),
        Ok(Ok(out)) => warn!(
            hook = %program, decision = %d.kind,
            "hook exited {}: {}", out.status, pgfleet_proto::one_line(&String::from_utf8_lossy(&out.stderr), 500)
        ),
        Ok(Err(e)) => warn!(hook = %program, decision = %d.kind, "hook failed: {e}"),
        Err(_) => warn!(hook = %program, decision = %d.kind, "hook killed after {:?}", h.timeout),
    }
}
