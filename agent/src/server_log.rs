//! The server log, read for one thing: why a standby's WAL receiver does
//! not stream. PostgreSQL says it only there (`could not connect to the
//! primary server: ... no pg_hba.conf entry for replication connection
//! ...`); pg_stat_wal_receiver is simply empty. Only the log's last 64 KiB
//! are read, and only when a standby is not streaming.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of the end of the log is searched.
const TAIL_BYTES: u64 = 64 * 1024;
/// A reported line is cut to this many characters.
const MAX_LINE: usize = 400;

/// Words of the errors a WAL receiver or the startup process logs when a
/// standby cannot stream.
const MARKS: [&str; 8] = [
    "could not connect to the primary server",
    "no pg_hba.conf entry",
    "password authentication failed",
    "replication slot",
    "requested starting point",
    "highest timeline",
    "could not receive data from WAL stream",
    "is not in the primary's history",
];

/// The last line of the log's tail that says why the standby cannot
/// stream, without its timestamp prefix; `None` when there is none or the
/// log cannot be read.
pub async fn last_replication_error(path: PathBuf) -> Option<String> {
    tokio::task::spawn_blocking(move || read_tail(&path).ok().and_then(|t| find(&t)))
        .await
        .ok()
        .flatten()
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn find(text: &str) -> Option<String> {
    let line = text.lines().rev().find(|l| {
        (l.contains("FATAL:") || l.contains("ERROR:")) && MARKS.iter().any(|m| l.contains(m))
    })?;
    // "2026-11-30 10:00:00.123 UTC [1234] FATAL:  could not ..." -> from the level on.
    let from = ["FATAL:", "ERROR:"]
        .iter()
        .filter_map(|lvl| line.find(lvl))
        .min()
        .unwrap_or(0);
    let msg: String = line[from..].split_whitespace().collect::<Vec<_>>().join(" ");
    Some(msg.chars().take(MAX_LINE).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_walreceiver_failure_is_found_without_its_prefix() {
        let log = "\
2026-11-30 10:00:00.000 UTC [10] LOG:  started streaming WAL from primary at 0/3000000 on timeline 1
2026-11-30 10:00:01.000 UTC [11] FATAL:  could not connect to the primary server: connection to server at \"198.18.3.3\", port 5432 failed: No route to host
2026-11-30 10:00:02.000 UTC [12] FATAL:  could not connect to the primary server: connection to server at \"198.18.3.3\", port 5432 failed: FATAL:  no pg_hba.conf entry for replication connection from host \"198.18.3.2\", user \"replicator\", no encryption
2026-11-30 10:00:02.500 UTC [13] LOG:  waiting for WAL to become available at 0/3000060
";
        let got = find(log).unwrap();
        assert!(got.starts_with("FATAL: could not connect to the primary server"), "{got}");
        assert!(got.contains("no pg_hba.conf entry"), "{got}");
        assert!(find("LOG: database system is ready\n").is_none());
    }

    #[test]
    fn postgres_18_names_the_walreceiver_in_the_same_message() {
        let log = "2026-12-01 04:30:00.000 UTC [11] FATAL:  streaming replication receiver \"walreceiver\" \
                   could not connect to the primary server: connection to server at \"198.18.3.3\", \
                   port 5433 failed: Connection refused\n";
        let got = find(log).unwrap();
        assert!(got.starts_with("FATAL: streaming replication receiver"), "{got}");
        assert!(got.contains("Connection refused"), "{got}");
    }

    #[test]
    fn a_long_line_is_cut() {
        let long = format!("FATAL:  could not connect to the primary server: {}", "x".repeat(2000));
        assert_eq!(find(&long).unwrap().chars().count(), MAX_LINE);
    }
}
