//! A child that must not outlive the agent, even a SIGKILLed one.
//!
//! The parent-death signal reaches only the direct child, and is cleared in
//! whatever that child forks: `pg_basebackup -X stream` forks a WAL
//! streaming process that would survive the agent, keep the upstream slot
//! in use and write into an abandoned copy. So such a command runs under
//! this small supervisor (the agent binary itself, `pgfleet-agent
//! __supervise AGENT_PID -- PROGRAM ARGS...`): it gets SIGTERM when the
//! agent dies (parent-death signal), starts the program in its own process
//! group, is the subreaper of whatever the program forks, and on SIGTERM or
//! SIGINT kills the whole group before exiting.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};

use nix::sys::prctl;
use nix::sys::signal::{Signal, SigSet, killpg};
use nix::unistd::{Pid, getppid};

/// The first argument that selects supervisor mode.
pub const MODE: &str = "__supervise";

/// Runs the supervisor when the process was started as one; returns its
/// exit code, or `None` for a normal agent start.
pub fn run_if_requested() -> Option<i32> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a == MODE) != Some(true) {
        return None;
    }
    Some(run(&args[2..]))
}

fn run(args: &[std::ffi::OsString]) -> i32 {
    let (Some(parent), Some(sep)) = (args.first(), args.get(1)) else {
        eprintln!("usage: pgfleet-agent {MODE} AGENT_PID -- PROGRAM ARGS...");
        return 2;
    };
    let Some(parent) = parent.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        eprintln!("{MODE}: bad agent pid");
        return 2;
    };
    if sep != "--" || args.len() < 3 {
        eprintln!("usage: pgfleet-agent {MODE} AGENT_PID -- PROGRAM ARGS...");
        return 2;
    }
    let signals = {
        let mut s = SigSet::empty();
        s.add(Signal::SIGTERM);
        s.add(Signal::SIGINT);
        s.add(Signal::SIGHUP);
        s
    };
    // Blocked here (inherited by the waiter thread), received with sigwait.
    if signals.thread_block().is_err()
        || prctl::set_pdeathsig(Signal::SIGTERM).is_err()
        || prctl::set_child_subreaper(true).is_err()
    {
        eprintln!("{MODE}: cannot set up signal handling");
        return 2;
    }
    // The agent may have died before the line above: then nobody waits.
    if getppid() != Pid::from_raw(parent) {
        return 137;
    }
    let mut cmd = Command::new(&args[2]);
    cmd.args(&args[3..])
        .stdin(Stdio::null())
        .process_group(0);
    // The program must not inherit our blocked signals.
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{MODE}: cannot start {}: {e}", args[2].to_string_lossy());
            return 127;
        }
    };
    let group = Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            let _ = killpg(group, Signal::SIGKILL);
            std::process::exit(137);
        }
    });
    let status = wait(child);
    // Anything of the group still alive (a forked child whose parent
    // exited early) goes too.
    let _ = killpg(group, Signal::SIGKILL);
    exit_code(status)
}

fn wait(mut child: std::process::Child) -> std::io::Result<ExitStatus> {
    child.wait()
}

fn exit_code(status: std::io::Result<ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
        Err(_) => 1,
    }
}
