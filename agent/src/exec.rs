//! Runs every external program the agent uses; nothing else spawns processes.
//!
//! Always an argv with an explicit program path (never a shell), a cleared
//! environment plus the few variables the tool needs, a deadline, and the
//! child killed if the caller goes away. stdout and stderr are read
//! concurrently line by line (a child blocked on a full, unread pipe never
//! exits), each line relayed to tracing under a span named for the tool, and
//! a failure carries the exit status and the last stderr lines.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tracing::{Instrument, debug, info_span, warn};

/// How many stderr lines an error keeps.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {}; it was killed", humantime::format_duration(*after))]
    Timeout { program: PathBuf, after: Duration },
    #[error("{program} failed ({status}): {}", tail_text(stderr_tail))]
    Failed {
        program: PathBuf,
        status: ExitStatus,
        stderr_tail: Vec<String>,
    },
    #[error("reading the output of {program}: {source}")]
    Io {
        program: PathBuf,
        source: std::io::Error,
    },
}

fn tail_text(lines: &[String]) -> String {
    if lines.is_empty() {
        "no error output".into()
    } else {
        // A program's stderr is not ours: escape what could forge a log
        // line or redraw a terminal, cut what has no end.
        lines.iter().map(|l| pgfleet_proto::shown_max(l, 300)).collect::<Vec<_>>().join(" | ")
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A program to run: argv, environment, deadline.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
    timeout: Duration,
    die_with_agent: bool,
}

/// What a finished program left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr_tail: Vec<String>,
}

impl Output {
    /// The output when the exit status is 0, else `ExecError::Failed`.
    pub fn success(self, program: &std::path::Path) -> Result<Output, ExecError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(ExecError::Failed {
                program: program.to_owned(),
                status: self.status,
                stderr_tail: self.stderr_tail,
            })
        }
    }
}

impl Cmd {
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            timeout,
            die_with_agent: false,
        }
    }

    /// The child is killed if the agent dies (SIGKILL included), not only
    /// when its job is dropped: a pg_basebackup must not outlive an agent
    /// that can no longer report on it or clean up after it.
    pub fn die_with_agent(mut self) -> Self {
        self.die_with_agent = true;
        self
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Pass one environment variable; everything else is cleared.
    pub fn env(mut self, key: &'static str, value: impl Into<OsString>) -> Self {
        self.env.push((key, value.into()));
        self
    }

    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// The argv as it will run, program first. Secrets never travel in
    /// argv, so this is safe to show.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.to_string_lossy().into_owned())
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    /// The argv on one line, quoted the way a shell user would type it (for
    /// reading only: nothing ever runs it through a shell).
    pub fn display_argv(&self) -> String {
        pgfleet_proto::shell_words(&self.argv())
    }

    fn tool_name(&self) -> String {
        self.program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "program".into())
    }

    /// Run to completion, keeping stdout and the stderr tail.
    pub async fn run(self) -> Result<Output, ExecError> {
        self.run_with(|_, _| {}).await
    }

    /// Run to completion, handing every output line to `on_line` as it
    /// arrives (progress parsing, log files).
    pub async fn run_with(
        self,
        mut on_line: impl FnMut(Stream, &str) + Send,
    ) -> Result<Output, ExecError> {
        let tool = self.tool_name();
        let span = info_span!("exec", tool = %tool);
        async move {
            // Under the supervisor when the program may fork helpers that
            // must die with the agent (see supervise.rs).
            let supervisor = self.die_with_agent.then(supervisor_exe).flatten();
            let mut command = match &supervisor {
                Some(exe) => {
                    let mut c = Command::new(exe);
                    c.arg(crate::supervise::MODE)
                        .arg(std::process::id().to_string())
                        .arg("--")
                        .arg(&self.program);
                    c
                }
                None => Command::new(&self.program),
            };
            command
                .args(&self.args)
                .env_clear()
                // Untranslated messages: we parse some of them.
                .env("LANG", "C")
                .env("LC_ALL", "C")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            for (k, v) in &self.env {
                command.env(k, v);
            }
            if self.die_with_agent && supervisor.is_none() {
                set_parent_death_signal(&mut command);
            }
            debug!(argv = %self.display_argv(), "starting");
            let mut child = command.spawn().map_err(|source| ExecError::Spawn {
                program: self.program.clone(),
                source,
            })?;
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let child_pid = child.id();

            let mut out_text = String::new();
            let mut tail: VecDeque<String> = VecDeque::new();
            let program = self.program.clone();
            let io_err = |source| ExecError::Io {
                program: program.clone(),
                source,
            };
            let work = async {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<(Stream, String)>(64);
                let readers = async {
                    let a = read_lines(stdout, Stream::Stdout, tx.clone());
                    let b = read_lines(stderr, Stream::Stderr, tx);
                    tokio::try_join!(a, b)
                };
                let consume = async {
                    while let Some((stream, line)) = rx.recv().await {
                        match stream {
                            Stream::Stdout => {
                                debug!(target: "exec::stdout", "{line}");
                                out_text.push_str(&line);
                                out_text.push('\n');
                            }
                            Stream::Stderr => {
                                debug!(target: "exec::stderr", "{line}");
                                if tail.len() == STDERR_TAIL_LINES {
                                    tail.pop_front();
                                }
                                tail.push_back(line.clone());
                            }
                        }
                        on_line(stream, &line);
                    }
                };
                let (read_result, ()) = tokio::join!(readers, consume);
                read_result.map_err(io_err)?;
                child.wait().await.map_err(io_err)
            };
            let status = match tokio::time::timeout(self.timeout, work).await {
                Ok(status) => status?,
                Err(_) => {
                    // A supervisor takes its program's whole process group
                    // down on SIGTERM; kill_on_drop's SIGKILL would not.
                    if supervisor.is_some()
                        && let Some(pid) = child_pid
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    // kill_on_drop reaps it; say so loudly.
                    warn!(after = ?self.timeout, "timed out, killing");
                    return Err(ExecError::Timeout {
                        program: self.program.clone(),
                        after: self.timeout,
                    });
                }
            };
            debug!(%status, "exited");
            Ok(Output {
                status,
                stdout: out_text,
                stderr_tail: tail.into_iter().collect(),
            })
        }
        .instrument(span)
        .await
    }
}

/// The agent binary, when this process is it (unit tests run other
/// binaries, which cannot supervise).
fn supervisor_exe() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    (exe.file_name()? == "pgfleet-agent").then_some(exe)
}

#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl(2), which is async-signal-safe; it allocates nothing and
    // takes no lock. The signal fires when the thread that spawned the child
    // exits: tokio spawns from its worker threads, which live as long as the
    // runtime, i.e. the agent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

async fn read_lines(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: Stream,
    tx: tokio::sync::mpsc::Sender<(Stream, String)>,
) -> std::io::Result<()> {
    let Some(pipe) = pipe else { return Ok(()) };
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Split on \r too: pg_basebackup -P redraws its progress line with \r.
        let n = read_until_any(&mut reader, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            continue;
        }
        if tx.send((stream, line.to_owned())).await.is_err() {
            return Ok(());
        }
    }
}

/// Like `read_until(b'\n')`, but a `\r` also ends the line.
async fn read_until_any<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        if let Some(i) = available.iter().position(|&b| b == b'\n' || b == b'\r') {
            buf.extend_from_slice(&available[..=i]);
            r.consume(i + 1);
            return Ok(total + i + 1);
        }
        let n = available.len();
        buf.extend_from_slice(available);
        r.consume(n);
        total += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_stdout_and_stderr_tail() {
        let out = Cmd::new("/bin/sh", Duration::from_secs(5))
            .args(["-c", "echo out1; echo err1 >&2; printf 'a\\rb\\n'; exit 3"])
            .run()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, "out1\na\nb\n");
        assert_eq!(out.stderr_tail, vec!["err1"]);
        let e = out.success(Path::new("/bin/sh")).unwrap_err().to_string();
        assert!(e.contains("err1") && e.contains("exit status: 3"), "{e}");
    }

    #[tokio::test]
    async fn environment_is_cleared() {
        // SAFETY-free check: a variable of ours must not reach the child.
        let out = Cmd::new("/usr/bin/env", Duration::from_secs(5))
            .env("PGAPPNAME", "x")
            .run()
            .await
            .unwrap();
        let keys: Vec<&str> = out.stdout.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(keys.contains(&"PGAPPNAME") && keys.contains(&"LANG"));
        assert!(!keys.contains(&"HOME") && !keys.contains(&"CARGO"), "{keys:?}");
    }

    #[tokio::test]
    async fn deadline_kills_the_child() {
        let e = Cmd::new("/bin/sleep", Duration::from_millis(200))
            .arg("30")
            .run()
            .await
            .unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let e = Cmd::new("/nonexistent/pg_ctl", Duration::from_secs(1))
            .run()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot start /nonexistent/pg_ctl"), "{e}");
    }

    use std::path::Path;
}
