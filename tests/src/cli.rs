//! A `pgfleet` CLI run the test watches while it runs
//! ([`crate::TestFleet::pgfleet_spawn`]): stdout line by line as it comes
//! (`rebuild --json` events), then everything it printed once it exits.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::fleet::CliOutput;
use crate::process::{describe, kill_child};

/// A running `pgfleet`. Killed (SIGKILL) when dropped before it exited.
#[derive(Debug)]
pub struct CliChild {
    child: Child,
    command: String,
    /// stdout lines (without the newline), as they are printed.
    lines: Receiver<String>,
    /// Every stdout line handed out so far, for the final [`CliOutput`].
    seen: Vec<String>,
    stdout_closed: bool,
    stderr: Receiver<Vec<u8>>,
}

impl CliChild {
    pub(crate) fn spawn(mut cmd: Command) -> Result<CliChild> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = describe(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {command}"))?;
        let stdout = child.stdout.take().context("stdout was not piped")?;
        let stderr = child.stderr.take().context("stderr was not piped")?;
        let (line_tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (err_tx, stderr_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error ends the capture; what was read so far is kept.
            let _ = BufReader::new(stderr).read_to_end(&mut buf);
            let _ = err_tx.send(buf);
        });
        Ok(CliChild {
            child,
            command,
            lines,
            seen: Vec::new(),
            stdout_closed: false,
            stderr: stderr_rx,
        })
    }

    /// The CLI's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line; `Ok(None)` once stdout is closed (the CLI
    /// exited). Waiting longer than `timeout` is an error.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        if self.stdout_closed {
            return Ok(None);
        }
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_closed = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => bail!(
                "`{}` printed no stdout line within {timeout:?}; so far:\n{}",
                self.command,
                self.seen.join("\n")
            ),
        }
    }

    /// Reads stdout lines until one satisfies `wanted` and returns it;
    /// fails if the CLI ends first or `timeout` passes.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left)? {
                Some(line) if wanted(&line) => return Ok(line),
                Some(_) => {}
                None => bail!(
                    "`{}` ended before printing the line waited for; stdout:\n{}",
                    self.command,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// True once the CLI has exited.
    pub fn has_exited(&mut self) -> Result<bool> {
        Ok(self
            .child
            .try_wait()
            .context("checking on pgfleet")?
            .is_some())
    }

    /// Waits (up to `timeout`, then kills it and fails) for the CLI to exit
    /// and returns all it printed, including the stdout lines already read.
    pub fn wait(mut self, timeout: Duration) -> Result<CliOutput> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().context("waiting for pgfleet")? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = kill_child(&mut self.child);
                bail!(
                    "`{}` did not exit within {timeout:?} and was killed; stdout so far:\n{}",
                    self.command,
                    self.seen.join("\n")
                );
            }
            // Keep the pipe drained while waiting.
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            thread::sleep(Duration::from_millis(10));
        };
        // The rest of stdout (a grandchild holding the pipe open is given up
        // on after a few seconds).
        let grace = Instant::now() + Duration::from_secs(5);
        while !self.stdout_closed {
            let left = grace.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => self.stdout_closed = true,
            }
        }
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        let mut stdout = self.seen.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Ok(CliOutput {
            status,
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

impl Drop for CliChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill_child(&mut self.child);
        }
    }
}
