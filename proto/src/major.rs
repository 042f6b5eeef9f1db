//! What differs between PostgreSQL major versions, in one place: how a
//! major is read (a running server's `server_version_num`, a data
//! directory's `PG_VERSION`, a binary's `--version`), which majors pgfleet is
//! tested on, and the capabilities that depend on the major. Code elsewhere
//! asks a [`Major`] what it can do rather than comparing numbers.

use std::fmt;

/// A PostgreSQL major version: 15, 16, 17, 18, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Major(u32);

/// The majors pgfleet's end-to-end tests run on (README, "Supported
/// PostgreSQL versions").
pub const TESTED: [Major; 2] = [Major(15), Major(18)];

impl Major {
    /// Physical replication as pgfleet drives it (`primary_conninfo` in
    /// postgresql.auto.conf, standby.signal, `pg_promote()`) came in 12.
    pub const OLDEST_SUPPORTED: Major = Major(12);

    /// From `server_version_num` (150018 → 15; 2-part numbering since 10).
    pub fn from_version_num(num: u32) -> Major {
        Major(num / 10_000)
    }

    /// From the contents of a data directory's `PG_VERSION` ("15\n").
    pub fn from_pg_version_file(text: &str) -> Option<Major> {
        text.trim().parse().ok().filter(|&m| m >= 10).map(Major)
    }

    /// From a PostgreSQL program's `--version` line, e.g. `postgres
    /// (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)` or `postgres
    /// (PostgreSQL) 18.6`.
    pub fn from_version_output(text: &str) -> Option<Major> {
        let rest = text.split_once("(PostgreSQL) ")?.1;
        let major = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        major.parse().ok().filter(|&m| m >= 10).map(Major)
    }

    pub fn number(self) -> u32 {
        self.0
    }

    /// Whether pgfleet's tests run this major.
    pub fn is_tested(self) -> bool {
        TESTED.contains(&self)
    }

    /// Logical slots created with `failover = true` can be synchronized to
    /// physical standbys (`sync_replication_slots`, `synchronized_standby_slots`,
    /// pg_replication_slots `failover` and `synced`): 17 and later.
    pub fn has_slot_failover(self) -> bool {
        self.0 >= 17
    }
}

/// Logical slots with `failover = true`, and whether each is usable after a
/// promotion of this node: synchronized from the primary (`synced`),
/// persisted (a newly synced slot stays temporary until the primary's slot
/// has moved past what this standby holds), not invalidated. Columns of 17
/// and later: run only where [`Major::has_slot_failover`].
pub const FAILOVER_SLOTS_SQL: &str = "
SELECT slot_name::text, synced,
       synced AND NOT temporary AND invalidation_reason IS NULL
FROM pg_replication_slots
WHERE slot_type = 'logical' AND failover
ORDER BY slot_name";

/// The settings a standby needs to synchronize failover slots (17+), besides
/// `primary_slot_name` (pgfleet always sets it) and a `dbname` in
/// `primary_conninfo`. hot_standby_feedback keeps the catalog rows the
/// slots' decoding needs from being vacuumed on the primary.
pub const SLOT_SYNC_STANDBY_SETTINGS: [(&str, &str); 2] =
    [("sync_replication_slots", "on"), ("hot_standby_feedback", "on")];

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<Major> for u32 {
    fn from(m: Major) -> u32 {
        m.0
    }
}

impl From<u32> for Major {
    fn from(n: u32) -> Major {
        Major(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_major_from_every_source() {
        assert_eq!(Major::from_version_num(150_018), Major(15));
        assert_eq!(Major::from_version_num(180_006), Major(18));
        assert_eq!(Major::from_pg_version_file("18\n"), Some(Major(18)));
        assert_eq!(Major::from_pg_version_file("9.6\n"), None);
        assert_eq!(Major::from_pg_version_file(""), None);
        assert_eq!(
            Major::from_version_output("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n"),
            Some(Major(15))
        );
        assert_eq!(Major::from_version_output("postgres (PostgreSQL) 18.6\n"), Some(Major(18)));
        assert_eq!(Major::from_version_output("postgres (PostgreSQL) 19devel"), Some(Major(19)));
        assert_eq!(Major::from_version_output("something else"), None);
    }

    #[test]
    fn slot_failover_is_17_and_later() {
        assert!(!Major(15).has_slot_failover());
        assert!(!Major(16).has_slot_failover());
        assert!(Major(17).has_slot_failover());
        assert!(Major(18).has_slot_failover());
    }
}
