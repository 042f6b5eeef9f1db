//! `pg_controldata`: what the control file says, readable while PostgreSQL
//! is down. The status of a stopped server still names its system
//! identifier, timeline and whether it was shut down cleanly.

use std::path::Path;
use std::time::Duration;

use pgfleet_proto::major::Major;
use tracing::warn;

use crate::config::AgentConfig;
use crate::exec::{Cmd, ExecError};

const PG_CONTROLDATA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: Option<String>,
    pub cluster_state: Option<String>,
    pub timeline: Option<u32>,
    /// "Latest checkpoint location": after a clean shutdown, the last
    /// record the server wrote is this shutdown checkpoint.
    pub checkpoint_lsn: Option<String>,
    /// "Data page checksum version" other than 0.
    pub data_checksums: Option<bool>,
    /// "wal_log_hints setting".
    pub wal_log_hints: Option<bool>,
}

pub async fn read(config: &AgentConfig) -> Result<ControlData, ExecError> {
    let program = config.pg_bin("pg_controldata");
    let out = Cmd::new(&program, PG_CONTROLDATA_TIMEOUT)
        .arg("-D")
        .arg(&config.postgres.data_dir)
        .run()
        .await?
        .success(&program)?;
    Ok(parse(&out.stdout))
}

/// The highest timeline with a history file in `DATA/pg_wal`: written by
/// the server that switched to it, and received by the standbys that
/// followed it.
pub fn latest_history(data_dir: &std::path::Path) -> Option<u32> {
    std::fs::read_dir(data_dir.join("pg_wal"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let tli = name.strip_suffix(".history")?;
            (tli.len() == 8).then(|| u32::from_str_radix(tli, 16).ok()).flatten()
        })
        .max()
}

/// Parses `pg_controldata` output ("Label:   value" lines, LANG=C).
pub fn parse(text: &str) -> ControlData {
    let mut cd = ControlData::default();
    for line in text.lines() {
        let Some((label, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match label.trim() {
            "Database system identifier" => cd.system_identifier = Some(value.to_owned()),
            "Database cluster state" => cd.cluster_state = Some(value.to_owned()),
            "Latest checkpoint's TimeLineID" => cd.timeline = value.parse().ok(),
            "Latest checkpoint location" => cd.checkpoint_lsn = Some(value.to_owned()),
            "Data page checksum version" => cd.data_checksums = Some(value != "0"),
            "wal_log_hints setting" => cd.wal_log_hints = Some(value == "on"),
            _ => {}
        }
    }
    cd
}

/// A setting as the server's configuration files give it (`postgres -C`),
/// for a server that is down.
pub async fn configured_setting(config: &AgentConfig, name: &str) -> Result<String, ExecError> {
    let program = config.pg_bin("postgres");
    let mut cmd = Cmd::new(&program, PG_CONTROLDATA_TIMEOUT)
        .arg("-D")
        .arg(&config.postgres.data_dir);
    // Debian's configuration is under /etc/postgresql.
    if let Some(conf) = config.server_config_file() {
        cmd = cmd.arg("-c").arg(format!("config_file={}", conf.display()));
    }
    let out = cmd
        .arg("-C")
        .arg(name)
        .run()
        .await?
        .success(&program)?;
    Ok(out.stdout.trim_end_matches('\n').to_owned())
}

/// The PostgreSQL major of the configured programs (`postgres --version`
/// in bin_dir), asked once: bin_dir only changes with the agent's
/// configuration, which is read at start-up.
pub async fn binaries_major(config: &AgentConfig) -> Option<Major> {
    static MAJOR: tokio::sync::OnceCell<Option<Major>> = tokio::sync::OnceCell::const_new();
    *MAJOR
        .get_or_init(|| async {
            let program = config.pg_bin("postgres");
            let out = Cmd::new(&program, PG_CONTROLDATA_TIMEOUT)
                .arg("--version")
                .run()
                .await
                .and_then(|o| o.success(&program));
            match out {
                Ok(o) => {
                    let major = Major::from_version_output(&o.stdout);
                    if major.is_none() {
                        warn!(program = %program.display(), output = %o.stdout.trim(), "no PostgreSQL major in --version");
                    }
                    major
                }
                Err(e) => {
                    warn!(error = %e, "cannot tell the major of the configured PostgreSQL programs");
                    None
                }
            }
        })
        .await
}

/// The major of the data directory, from its `PG_VERSION` file (`None`
/// without one: no data directory, or an unfinished copy).
pub fn data_major(data_dir: &Path) -> Option<Major> {
    let text = std::fs::read_to_string(data_dir.join("PG_VERSION")).ok()?;
    Major::from_pg_version_file(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_status_needs() {
        let text = "pg_control version number:            1300\n\
                    Catalog version number:               202209061\n\
                    Database system identifier:           7309377431396349458\n\
                    Database cluster state:               shut down in recovery\n\
                    Latest checkpoint location:           0/5000028\n\
                    Latest checkpoint's TimeLineID:       3\n\
                    Latest checkpoint's PrevTimeLineID:   2\n\
                    Data page checksum version:           0\n";
        assert_eq!(
            parse(text),
            ControlData {
                system_identifier: Some("7309377431396349458".into()),
                cluster_state: Some("shut down in recovery".into()),
                timeline: Some(3),
                checkpoint_lsn: Some("0/5000028".into()),
                data_checksums: Some(false),
                wal_log_hints: None,
            }
        );
        assert_eq!(parse(""), ControlData::default());
    }
}
