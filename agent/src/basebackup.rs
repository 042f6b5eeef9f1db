//! pg_basebackup: the argv of a replica copy, and its output read as a
//! stream: progress lines become byte counts, the rest log lines, and all of
//! it lands in the rebuild's log file.

use std::path::{Path, PathBuf};

use pgfleet_proto::{NodeName, RoleName, SlotName};

use crate::config::AgentConfig;
use crate::exec::Cmd;

#[derive(Debug, Clone)]
pub struct Copy {
    pub upstream_host: String,
    pub upstream_port: u16,
    pub role: RoleName,
    pub slot: SlotName,
    pub application_name: NodeName,
    /// (old, new) absolute directories.
    pub tablespace_mappings: Vec<(PathBuf, PathBuf)>,
    pub fast_checkpoint: bool,
}

/// The pg_basebackup command (DESIGN.md step 3). The password reaches it
/// only through the passfile; `-R` writes primary_conninfo (with
/// application_name and passfile) and primary_slot_name.
pub fn command(config: &AgentConfig, copy: &Copy, passfile: &Path) -> Cmd {
    let mut c = Cmd::new(config.pg_bin("pg_basebackup"), config.rebuild.basebackup_timeout)
        .arg("-h")
        .arg(&copy.upstream_host)
        .arg("-p")
        .arg(copy.upstream_port.to_string())
        .arg("-U")
        .arg(copy.role.as_str())
        // Only application_name travels in -d: the standby's name in
        // pg_stat_replication and synchronous_standby_names.
        .arg("-d")
        .arg(format!("application_name={}", copy.application_name))
        .arg("-D")
        .arg(&config.postgres.data_dir)
        .args(["-R", "-C", "-S", copy.slot.as_str(), "-X", "stream", "-P", "-v", "-w"])
        .arg(if copy.fast_checkpoint {
            "--checkpoint=fast"
        } else {
            "--checkpoint=spread"
        });
    for (old, new) in &copy.tablespace_mappings {
        c = c.arg(format!("--tablespace-mapping={}={}", old.display(), new.display()));
    }
    c.env("PGPASSFILE", passfile)
        .env("PGCONNECT_TIMEOUT", "15")
        .die_with_agent()
}

/// Kills pg_basebackup processes left writing into this node's data
/// directory by an agent that died (SIGKILL, OOM): `-X stream` forks a WAL
/// streaming child the parent-death signal does not reach, and it would
/// hold the upstream slot and keep writing into the old copy. Only our own
/// user's processes whose argv names our data directory are touched.
/// Returns the PIDs killed.
pub fn kill_orphans(config: &AgentConfig) -> Vec<i32> {
    let data = config.postgres.data_dir.as_os_str().as_encoded_bytes().to_vec();
    let me = std::process::id() as i32;
    let uid = nix::unistd::getuid();
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        use std::os::unix::fs::MetadataExt;
        if e.metadata().map(|m| m.uid()).ok() != Some(uid.as_raw()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_basebackup = argv
            .first()
            .is_some_and(|a| a.ends_with(b"pg_basebackup"));
        let ours = argv.windows(2).any(|w| w[0] == b"-D" && w[1] == data.as_slice());
        if is_basebackup && ours {
            let p = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL).is_ok() {
                killed.push(pid);
            }
        }
    }
    killed
}

/// `"  1234/56789 kB (2%), 0/1 tablespace ..."` → (done, total) in bytes.
pub fn parse_progress(line: &str) -> Option<(u64, u64)> {
    let line = line.trim_start();
    let (counts, rest) = line.split_once(' ')?;
    if !rest.starts_with("kB") {
        return None;
    }
    let (done, total) = counts.split_once('/')?;
    Some((done.parse::<u64>().ok()? * 1024, total.parse::<u64>().ok()? * 1024))
}

/// pg_basebackup's `-v` lines that say something happened.
pub fn is_error_line(line: &str) -> bool {
    line.contains("error:") || line.contains("FATAL:") || line.contains("ERROR:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            parse_progress("  1234/56789 kB (2%), 0/1 tablespace (...data/base/1/1249)"),
            Some((1234 * 1024, 56789 * 1024))
        );
        assert_eq!(parse_progress("22962/22962 kB (100%), 1/1 tablespace"), Some((22962 * 1024, 22962 * 1024)));
        assert_eq!(parse_progress("pg_basebackup: checkpoint completed"), None);
        assert_eq!(parse_progress("write-ahead log start point: 0/2000028 on timeline 1"), None);
    }
}
