//! Service control: asks (and later tells) the service manager about the
//! PostgreSQL service. Three backends, chosen in the config: `systemd`
//! (systemctl on one unit), `pg_ctlcluster` (Debian without systemd) and
//! `pg_ctl` (any host; the test fleet).

use std::time::Duration;

use std::path::Path;

use crate::config::{AgentConfig, ServiceConfig};
use crate::exec::{Cmd, ExecError};

const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    Running,
    Stopped,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub state: ServiceState,
    /// The backend's own words.
    pub detail: String,
}

/// The status command of the configured backend.
pub fn status_command(config: &AgentConfig) -> Cmd {
    match &config.service {
        ServiceConfig::Systemd { unit, systemctl } => Cmd::new(systemctl, STATUS_TIMEOUT)
            .args(["is-active", "--", unit.as_str()]),
        ServiceConfig::PgCtlcluster {
            version,
            cluster,
            pg_ctlcluster,
        } => Cmd::new(pg_ctlcluster, STATUS_TIMEOUT).args([
            version.as_str(),
            cluster.as_str(),
            "status",
        ]),
        ServiceConfig::PgCtl { .. } => Cmd::new(config.pg_bin("pg_ctl"), STATUS_TIMEOUT)
            .arg("status")
            .arg("-D")
            .arg(&config.postgres.data_dir),
    }
}

/// What the service manager is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    /// Fast shutdown: open sessions are disconnected, then a shutdown
    /// checkpoint; no committed data is lost.
    Stop,
}

/// The command of the configured backend for `action`; `timeout` bounds
/// the wait of pg_ctl itself and of our exec deadline.
pub fn action_command(config: &AgentConfig, action: Action, timeout: Duration) -> Cmd {
    // Our deadline is a little longer than pg_ctl's own -t so that pg_ctl
    // reports its timeout before we kill it.
    let deadline = timeout + Duration::from_secs(10);
    match &config.service {
        ServiceConfig::Systemd { unit, systemctl } => {
            let verb = match action {
                Action::Start => "start",
                Action::Stop => "stop",
            };
            Cmd::new(systemctl, deadline).args([verb, "--", unit.as_str()])
        }
        ServiceConfig::PgCtlcluster {
            version,
            cluster,
            pg_ctlcluster,
        } => {
            let c = Cmd::new(pg_ctlcluster, deadline).args([version.as_str(), cluster.as_str()]);
            match action {
                Action::Start => c.arg("start"),
                Action::Stop => c.args(["stop", "-m", "fast"]),
            }
        }
        // pg_ctl's own wait polls ten times a second; -W and our 10 ms poll
        // of postmaster.pid (perform) shave most of that off a switchover's
        // write-unavailability window.
        ServiceConfig::PgCtl { log_file, options } => {
            let c = Cmd::new(config.pg_bin("pg_ctl"), deadline)
                .arg("-D")
                .arg(&config.postgres.data_dir)
                .arg("-W");
            match action {
                Action::Start => {
                    let c = c.arg("-l").arg(log_file);
                    let c = match options {
                        Some(o) => c.arg("-o").arg(o),
                        None => c,
                    };
                    c.arg("start")
                }
                Action::Stop => c.args(["-m", "fast", "stop"]),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Command(#[from] ExecError),
    #[error("PostgreSQL did not {action} within {}{}", humantime::format_duration(*waited), log_section(log_tail))]
    Timeout {
        action: &'static str,
        waited: Duration,
        log_tail: Vec<String>,
    },
    #[error("PostgreSQL exited while starting{}", log_section(log_tail))]
    StartFailed { log_tail: Vec<String> },
}

fn log_section(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; server log: {}", lines.join(" | "))
    }
}

const PID_POLL: Duration = Duration::from_millis(10);
/// How long a started server may go without a postmaster.pid before the
/// start counts as failed.
const START_GRACE: Duration = Duration::from_secs(10);

/// Runs `action` through the backend and returns once it took effect:
/// systemctl and pg_ctlcluster wait themselves; for pg_ctl we watch
/// postmaster.pid (gone after a stop; "ready" or "standby" in its status
/// line once the server accepts connections).
pub async fn perform(config: &AgentConfig, action: Action) -> Result<(), ServiceError> {
    let timeout = config.rebuild.service_timeout;
    let cmd = action_command(config, action, timeout);
    let program = cmd.program().to_owned();
    cmd.run().await?.success(&program)?;
    let ServiceConfig::PgCtl { log_file, .. } = &config.service else {
        return Ok(());
    };
    let pid_file = config.postgres.data_dir.join("postmaster.pid");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut missing_since: Option<tokio::time::Instant> = None;
    loop {
        let text = tokio::fs::read_to_string(&pid_file).await.ok();
        match action {
            Action::Stop if text.is_none() => return Ok(()),
            Action::Start => match text.as_deref().map(pm_status) {
                Some(Some("ready" | "standby")) => return Ok(()),
                Some(_) => {}
                // Not written yet, or gone: a slow start (crash recovery,
                // a busy host) writes it late; a failed one never. Only a
                // pid file missing for START_GRACE counts as a failed start.
                None => {
                    let since = *missing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= START_GRACE {
                        return Err(ServiceError::StartFailed {
                            log_tail: log_tail(log_file).await,
                        });
                    }
                }
            },
            Action::Stop => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ServiceError::Timeout {
                action: match action {
                    Action::Start => "start",
                    Action::Stop => "stop",
                },
                waited: timeout,
                log_tail: log_tail(log_file).await,
            });
        }
        tokio::time::sleep(PID_POLL).await;
    }
}

/// The postmaster status word of postmaster.pid's 8th line.
fn pm_status(text: &str) -> Option<&str> {
    text.lines().nth(7).map(str::trim)
}

async fn log_tail(path: &Path) -> Vec<String> {
    let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// The service state as status reports it, asked of the backend at most
/// every `MAX_AGE`: each answer costs a process (systemctl, pg_ctl), and a
/// dashboard polling status must not turn into a fork storm. Decisions
/// (stop, fence, rebuild) call `status` directly, never this.
#[derive(Debug, Default)]
pub struct StatusCache {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, ServiceStatus)>>,
}

impl StatusCache {
    const MAX_AGE: Duration = Duration::from_millis(500);

    /// `server_up`: whether PostgreSQL answered just now. A cached answer
    /// that disagrees (running but no server, stopped but a server) is
    /// stale: the state changed, so ask again.
    pub async fn get(&self, config: &AgentConfig, server_up: bool) -> ServiceStatus {
        // Held across the call on purpose: concurrent requests share one
        // backend invocation.
        let mut last = self.last.lock().await;
        if let Some((at, s)) = last.as_ref()
            && at.elapsed() < Self::MAX_AGE
            && (s.state == ServiceState::Running) == server_up
        {
            return s.clone();
        }
        let s = status(config).await;
        *last = Some((tokio::time::Instant::now(), s.clone()));
        s
    }
}

/// Asks the backend whether PostgreSQL runs. A backend that cannot answer is
/// `Unknown` with its error as detail, never an RPC failure: status must
/// work on a broken host.
pub async fn status(config: &AgentConfig) -> ServiceStatus {
    let cmd = status_command(config);
    match cmd.run().await {
        Ok(out) => interpret(&config.service, out.status.code(), &out.stdout, &out.stderr_tail),
        Err(e) => ServiceStatus {
            state: ServiceState::Unknown,
            detail: e.to_string(),
        },
    }
}

fn interpret(
    service: &ServiceConfig,
    code: Option<i32>,
    stdout: &str,
    stderr: &[String],
) -> ServiceStatus {
    let first_line = stdout
        .lines()
        .next()
        .map(str::to_owned)
        .or_else(|| stderr.last().cloned())
        .unwrap_or_default();
    let state = match service {
        // `systemctl is-active` prints one word; exit 0 only for "active".
        ServiceConfig::Systemd { .. } => match first_line.trim() {
            "active" | "reloading" | "deactivating" => ServiceState::Running,
            "inactive" | "failed" | "activating" => ServiceState::Stopped,
            _ => ServiceState::Unknown,
        },
        // pg_ctl status: 0 running, 3 not running, 4 no accessible data
        // directory (nothing can run from it: an empty node awaiting its
        // first rebuild). pg_ctlcluster passes pg_ctl's 0 and 3 through.
        ServiceConfig::PgCtl { .. } => match code {
            Some(0) => ServiceState::Running,
            Some(3) | Some(4) => ServiceState::Stopped,
            _ => ServiceState::Unknown,
        },
        ServiceConfig::PgCtlcluster { .. } => match code {
            Some(0) => ServiceState::Running,
            Some(3) => ServiceState::Stopped,
            _ => ServiceState::Unknown,
        },
    };
    ServiceStatus {
        state,
        detail: first_line,
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn pg_ctl() -> ServiceConfig {
        ServiceConfig::PgCtl {
            log_file: "/tmp/x.log".into(),
            options: None,
        }
    }

    #[test]
    fn pg_ctl_exit_codes() {
        let s = interpret(&pg_ctl(), Some(0), "pg_ctl: server is running (PID: 7)\n", &[]);
        assert_eq!(s.state, ServiceState::Running);
        assert!(s.detail.contains("PID: 7"));
        assert_eq!(interpret(&pg_ctl(), Some(3), "pg_ctl: no server running\n", &[]).state, ServiceState::Stopped);
        assert_eq!(interpret(&pg_ctl(), Some(4), "", &["no data".into()]).state, ServiceState::Stopped);
        assert_eq!(interpret(&pg_ctl(), Some(1), "", &[]).state, ServiceState::Unknown);
    }

    #[test]
    fn systemd_words() {
        let sd = ServiceConfig::Systemd {
            unit: "postgresql@15-main".into(),
            systemctl: "/usr/bin/systemctl".into(),
        };
        assert_eq!(interpret(&sd, Some(0), "active\n", &[]).state, ServiceState::Running);
        assert_eq!(interpret(&sd, Some(3), "inactive\n", &[]).state, ServiceState::Stopped);
        assert_eq!(interpret(&sd, Some(3), "failed\n", &[]).state, ServiceState::Stopped);
        assert_eq!(interpret(&sd, Some(1), "", &[]).state, ServiceState::Unknown);
    }

    /// systemd is not PID 1 on the test machines: check the backend at the
    /// process boundary with a stand-in systemctl that records its argv.
    #[tokio::test]
    async fn systemd_backend_runs_is_active_on_the_configured_unit() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pgfleet-systemctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let argv_file = dir.join("argv");
        let stub = dir.join("systemctl");
        std::fs::write(
            &stub,
            format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\necho inactive\nexit 3\n", argv_file.display()),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = crate::config::AgentConfig::parse(
            &format!(
                "listen = \"127.0.0.1:1\"\ninsecure = true\n[postgres]\nbin_dir = \"/usr/lib/postgresql/15/bin\"\n\
                 data_dir = \"/nonexistent\"\n[service]\nbackend = \"systemd\"\nunit = \"postgresql@15-main\"\n\
                 systemctl = \"{}\"\n",
                stub.display()
            ),
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let st = status(&cfg).await;
        assert_eq!(st.state, ServiceState::Stopped);
        assert_eq!(st.detail, "inactive");
        let argv = std::fs::read_to_string(&argv_file).unwrap();
        assert_eq!(argv, "is-active\n--\npostgresql@15-main\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn config(service: &str) -> AgentConfig {
        AgentConfig::parse(
            &format!(
                "listen = \"127.0.0.1:1\"\ninsecure = true\n[postgres]\nbin_dir = \"/usr/lib/postgresql/15/bin\"\n\
                 data_dir = \"/nonexistent\"\n[service]\n{service}"
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn systemd_backend_stops_and_starts_the_configured_unit() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pgfleet-systemctl-act-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let argv_file = dir.join("argv");
        let stub = dir.join("systemctl");
        std::fs::write(&stub, format!("#!/bin/sh\necho \"$*\" >> {}\nexit 0\n", argv_file.display())).unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = config(&format!(
            "backend = \"systemd\"\nunit = \"postgresql@15-main\"\nsystemctl = \"{}\"\n",
            stub.display()
        ));
        perform(&cfg, Action::Stop).await.unwrap();
        perform(&cfg, Action::Start).await.unwrap();
        let argv = std::fs::read_to_string(&argv_file).unwrap();
        assert_eq!(argv, "stop -- postgresql@15-main\nstart -- postgresql@15-main\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pg_ctlcluster_backend_stops_fast_and_starts_the_configured_cluster() {
        let cfg = config("backend = \"pg_ctlcluster\"\nversion = \"15\"\ncluster = \"main\"\n");
        let argv = |a| action_command(&cfg, a, Duration::from_secs(60)).argv();
        assert_eq!(argv(Action::Stop), ["/usr/bin/pg_ctlcluster", "15", "main", "stop", "-m", "fast"]);
        assert_eq!(argv(Action::Start), ["/usr/bin/pg_ctlcluster", "15", "main", "start"]);
    }
}
