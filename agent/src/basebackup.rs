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
