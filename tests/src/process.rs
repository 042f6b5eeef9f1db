//! Starting, waiting for and killing processes: the only module with `unsafe`.
//!
//! `Command::pre_exec` is unsafe because the closure runs in the forked child
//! of a multi-threaded process, where only async-signal-safe calls are allowed.
//! Everything that allocates or reads files (the user lookup, opening the
//! namespace file) therefore happens before `spawn`, and the closure only makes
//! raw system calls: setns, setgroups, setgid, setuid, prctl, getppid.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::prctl;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid, User, getgrouplist, getpid, getppid, setgid, setgroups, setuid};

/// The OS user that runs every PostgreSQL server and agent: PostgreSQL
/// refuses to run as root.
pub const PG_OS_USER: &str = "postgres";

/// Ids of [`PG_OS_USER`], looked up once (NSS lookups are not allowed after
/// fork, so the child gets them ready-made).
#[derive(Debug, Clone)]
pub struct PgUser {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

/// The ids of the `postgres` OS user.
pub fn pg_user() -> Result<&'static PgUser> {
    static USER: OnceLock<PgUser> = OnceLock::new();
    if let Some(u) = USER.get() {
        return Ok(u);
    }
    let user = User::from_name(PG_OS_USER)
        .with_context(|| format!("looking up OS user {PG_OS_USER:?}"))?
        .ok_or_else(|| anyhow!("OS user {PG_OS_USER:?} does not exist; install PostgreSQL 15"))?;
    let cname = CString::new(PG_OS_USER).context("user name contains NUL")?;
    let groups = getgrouplist(&cname, user.gid)
        .with_context(|| format!("reading the groups of {PG_OS_USER:?}"))?;
    Ok(USER.get_or_init(|| PgUser {
        uid: user.uid,
        gid: user.gid,
        groups,
    }))
}

/// Makes `cmd`'s child enter the network namespace `netns` (a name under
/// /run/netns), become `user`, and die with SIGKILL when the thread that
/// spawned it exits.
///
/// Privileges are dropped inside `pre_exec` rather than through
/// `Command::uid`/`gid`, because std applies those *before* `pre_exec` runs and
/// `setns` needs root. The parent-death signal is set last because the kernel
/// clears it whenever the effective uid or gid changes.
pub fn enter_netns_as(cmd: &mut Command, netns: &str, user: &PgUser) -> Result<()> {
    let path = format!("/run/netns/{netns}");
    // Opened here (O_CLOEXEC, so the program never inherits it); the child
    // gets its own copy of the descriptor at fork.
    let ns = File::open(&path).with_context(|| format!("opening network namespace {path}"))?;
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    let parent = getpid();
    // SAFETY: the closure only calls async-signal-safe system calls (setns,
    // setgroups, setgid, setuid, prctl, getppid) on data prepared before the
    // fork, does not allocate (Errno -> io::Error is a plain OS error code),
    // and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)?;
            setgroups(&groups)?;
            setgid(gid)?;
            setuid(uid)?;
            die_with(parent)
        });
    }
    Ok(())
}

/// Makes `cmd`'s child enter the network namespace `netns` as it is (root:
/// a coordinator placed on a test host) and die with SIGKILL when the
/// thread that spawned it exits.
pub fn enter_netns(cmd: &mut Command, netns: &str) -> Result<()> {
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).with_context(|| format!("opening network namespace {path}"))?;
    let parent = getpid();
    // SAFETY: setns, prctl and getppid are async-signal-safe system calls on
    // data prepared before the fork; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)?;
            die_with(parent)
        });
    }
    Ok(())
}

/// Makes `cmd`'s child die with SIGKILL when the thread that spawned it exits,
/// without changing namespace or user (the CLI runs as root in the root
/// namespace).
pub fn die_with_parent(cmd: &mut Command) {
    let parent = getpid();
    // SAFETY: prctl and getppid are async-signal-safe system calls; nothing
    // is allocated.
    unsafe {
        cmd.pre_exec(move || die_with(parent));
    }
}

/// PR_SET_PDEATHSIG, then a check that the parent did not already exit
/// before the signal was armed (in which case nothing would ever fire).
fn die_with(parent: Pid) -> std::io::Result<()> {
    prctl::set_pdeathsig(Signal::SIGKILL)?;
    if getppid() != parent {
        return Err(Errno::ESRCH.into());
    }
    Ok(())
}

/// Makes this process the reaper of its orphaned descendants.
///
/// `pg_ctl start` exits once the server is up, orphaning the postmaster. On
/// these machines PID 1 (a VM init) reaps orphans only every second or two,
/// so a SIGKILLed postmaster stays a zombie for a while; PostgreSQL's
/// `kill(pid, 0)` check then takes the stale `postmaster.pid` for a live
/// server and refuses to start again. As subreaper the test process inherits
/// those orphans and [`kill_and_reap`] reaps them at once.
pub fn become_subreaper() -> Result<()> {
    prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")
}

/// SIGKILLs `pids` and waits (up to `timeout`) until each is reaped, or, for
/// a process that is not our child, until it is gone or a zombie. Errors are
/// collected rather than returned early so every pid gets its signal.
pub fn kill_and_reap(pids: &[Pid], timeout: Duration) -> Result<()> {
    for &pid in pids {
        match kill(pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => bail!("kill -9 {pid}: {e}"),
        }
    }
    reap(pids, timeout)
}

/// Waits until each of `pids` has exited (reaping those that are our
/// children), up to `timeout`.
pub fn reap(pids: &[Pid], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut left: Vec<Pid> = pids.to_vec();
    loop {
        left.retain(|&pid| !has_exited(pid));
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes {left:?} still exist {timeout:?} after SIGKILL");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// True once `pid` is reaped (by us), gone, or a zombie someone else owns.
fn has_exited(pid: Pid) -> bool {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        // Not our child: look at it from the outside.
        Err(_) => match proc_stat(pid) {
            None => true,
            Some(stat) => stat.state == 'Z',
        },
    }
}

/// The fields of /proc/PID/stat the harness needs.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
}

/// Reads /proc/PID/stat; `None` if the process does not exist.
pub fn proc_stat(pid: Pid) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ..."; COMM may contain spaces and parentheses,
    // so split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid })
}

/// The argv of `pid` from /proc/PID/cmdline; `None` if it is gone (a
/// zombie or kernel thread has an empty one).
pub fn cmdline(pid: Pid) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Every process on the machine (live, not zombie) whose argv satisfies
/// `matches`, with that argv.
pub fn processes_where(mut matches: impl FnMut(&[String]) -> bool) -> Vec<(Pid, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|&pid| proc_stat(pid).is_some_and(|s| s.state != 'Z'))
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .filter(|(_, argv)| matches(argv))
        .collect()
}

/// The live children of `parent`, found by scanning /proc.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|&pid| proc_stat(pid).is_some_and(|s| s.ppid == parent.as_raw() && s.state != 'Z'))
        .collect()
}

/// `cmd` as a readable command line for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The outcome of [`output_with_timeout`].
#[derive(Debug)]
pub struct Finished {
    pub output: Output,
    /// The command ran past its timeout and was killed.
    pub timed_out: bool,
}

/// Like `Command::output`, but kills the child after `timeout`.
///
/// Output is read on helper threads so a chatty child cannot block on a full
/// pipe. If a daemonized grandchild keeps the pipes open, reading gives up a
/// few seconds after the child itself exited.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break kill_child(&mut child)?;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let grace = Duration::from_secs(5);
    Ok(Finished {
        output: Output {
            status,
            stdout: stdout.recv_timeout(grace).unwrap_or_default(),
            stderr: stderr.recv_timeout(grace).unwrap_or_default(),
        },
        timed_out,
    })
}

/// SIGKILLs a child we spawned and waits for it.
pub fn kill_child(child: &mut Child) -> Result<std::process::ExitStatus> {
    // kill() fails only if the child was already reaped, which wait() reports.
    let _ = child.kill();
    child.wait().context("waiting for killed child")
}

fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            // A read error ends the capture; what was read so far is kept.
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// A failed command as a message: the command line, where it ran, its exit
/// status, stdout and stderr.
pub fn failure_message(what: &str, finished: &Finished) -> String {
    let out = &finished.output;
    let status = if finished.timed_out {
        format!("timed out and was killed ({})", out.status)
    } else {
        out.status.to_string()
    };
    format!(
        "{what}: {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}
