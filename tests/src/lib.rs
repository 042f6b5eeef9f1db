//! End-to-end test harness: [`TestFleet`] gives a test N "hosts", each a
//! Linux network namespace on a private bridge with its own address
//! (198.18.N.{i+2}), its own PostgreSQL server (15, or 18 with
//! `PGFLEET_TEST_PG_MAJOR=18`: [`Major`]) and optionally its own
//! `pgfleet-agent`, all run as the `postgres` OS user. Connections between
//! hosts carry the real source address, so pg_hba and pg_stat_replication
//! behave as on separate machines (DESIGN.md, "Test fleet").
//!
//! Needs root. The binaries under test come from the cargo target directory:
//! build them first with `cargo build --workspace --bins`.
//!
//! Processes on hosts die with the thread that spawned them
//! (PR_SET_PDEATHSIG), so a killed test takes its agents along. Drive the
//! fleet from the test's own thread (the body of `#[tokio::test]` runs on
//! it), never from a spawned tokio task.

pub mod agent;
pub mod cli;
pub mod coordinator;
pub mod etcd;
pub mod faults;
pub mod fleet;
pub mod host;
pub mod net;
pub mod postgres;
pub mod process;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

pub use agent::AgentOptions;
pub use cli::CliChild;
pub use coordinator::Coordinator;
pub use etcd::EtcdCluster;
pub use fleet::{CliOutput, TestFleet};
pub use host::{Host, Layout};
pub use postgres::Major;

/// Directory of the workspace's binaries: `$PGFLEET_BIN_DIR`, else the
/// profile directory of the target directory this test binary was built in
/// (test binaries live in `target/<profile>/deps/`, binaries one level up).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGFLEET_BIN_DIR") {
        return Ok(dir.into());
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps directory has no parent")?;
    }
    Ok(dir.to_owned())
}

/// Path of the workspace binary `name` (`pgfleet`, `pgfleet-agent`), one
/// every user can run: the agent runs as `postgres`. When the build tree is
/// not reachable by others (a checkout under /root, or in a 0700 `mktemp -d`
/// directory), a copy in a shared directory under /tmp, keyed by the
/// binary's size and modification time so parallel test processes share it
/// and a rebuild gets a new one.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let path = built_path(name)?;
    let reachable = path
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0));
    if reachable {
        return Ok(path);
    }
    let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    let dir = PathBuf::from("/tmp/pgfleet-test-bin").join(format!("{}-{}.{}", meta.len(), meta.mtime(), meta.mtime_nsec()));
    let copy = dir.join(name);
    if !copy.is_file() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for d in [dir.parent().unwrap_or(&dir), &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        // Written aside and renamed: a parallel test never runs half a copy.
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::copy(&path, &tmp).with_context(|| format!("copying {} to {}", path.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &copy)?;
    }
    Ok(copy)
}

fn built_path(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first \
             (or point PGFLEET_BIN_DIR at the binaries)",
            path.display()
        );
    }
    Ok(path)
}

/// `s` as a TOML basic string, quoted and escaped.
pub(crate) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
