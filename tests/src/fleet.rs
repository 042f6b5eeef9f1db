//! [`TestFleet`]: N hosts on one private /24, torn down on drop.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{DirBuilder, Permissions};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::cli::CliChild;
use crate::host::{Host, Layout, PG_PORT, tail};
use crate::net::{self, NetLease};
use crate::postgres::Major;
use crate::process::{self, describe, die_with_parent, failure_message, output_with_timeout};
use crate::{bin_path, toml_str};

/// How long one `pgfleet` CLI run may take before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fresh replica may take to report streaming.
const STREAMING_DEADLINE: Duration = Duration::from_secs(60);
/// Log lines per file in [`TestFleet::dump_logs`].
const LOG_TAIL_LINES: usize = 40;

/// A set of test hosts (see the crate docs). Everything it starts and
/// creates is removed when it is dropped, also when the test panics.
#[derive(Debug)]
pub struct TestFleet {
    hosts: Vec<Host>,
    dir: PathBuf,
    /// The cluster's replication password, also in
    /// [`replication_password_file`](Self::replication_password_file).
    replication_password: Mutex<String>,
    /// Dropped last, after `Drop::drop` removed everything: only then may
    /// another fleet take this network number.
    lease: NetLease,
}

/// What a `pgfleet` CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pgfleet {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

impl TestFleet {
    /// Claims a free network number N and creates `hosts` hosts: the bridge
    /// `pft{N}br` (198.18.N.1/24), per host a namespace `pft{N}h{i}` at
    /// 198.18.N.{i+2} and a directory under /tmp/pgfleet-test-N. Nothing runs
    /// yet. Needs root.
    /// Every host runs the suite's major ([`Major::from_env`]).
    pub fn new(hosts: usize) -> Result<TestFleet> {
        TestFleet::with_layout(hosts, Layout::Initdb)
    }

    /// Like [`new`](Self::new), every host laid out as `layout` (e.g.
    /// Debian clusters, whose configuration lives under /etc/postgresql).
    /// Debian clusters run Debian's own PostgreSQL 15 whatever the suite's
    /// major: it is the only one installed from Debian's packages here.
    pub fn with_layout(hosts: usize, layout: Layout) -> Result<TestFleet> {
        let major = match layout {
            Layout::Initdb => Major::from_env()?,
            Layout::Debian => Major::V15,
        };
        TestFleet::with_majors(layout, &vec![major; hosts])
    }

    /// A fleet whose host `i` runs PostgreSQL `majors[i]` (e.g. a cluster
    /// mixing majors, which pgfleet must refuse to rebuild or promote across).
    pub fn with_majors(layout: Layout, majors: &[Major]) -> Result<TestFleet> {
        let hosts = majors.len();
        for m in majors {
            m.check_installed()?;
            if layout == Layout::Debian && !m.has_debian_clusters() {
                bail!("PostgreSQL {m} is not installed from Debian's packages: no Debian clusters of it");
            }
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the test fleet needs root (network namespaces, running servers as postgres)");
        }
        process::pg_user()?;
        process::become_subreaper()?;
        let lease = NetLease::acquire()?;
        let n = lease.n();
        // Built up in place so that a failure half-way is cleaned up by Drop.
        let mut fleet = TestFleet {
            hosts: Vec::with_capacity(hosts),
            dir: net::fleet_dir(n),
            replication_password: Mutex::new(random_password()?),
            lease,
        };
        DirBuilder::new()
            .mode(0o755)
            .create(&fleet.dir)
            .with_context(|| format!("creating {}", fleet.dir.display()))?;
        // Whatever the umask: postgres must be able to reach its own h{i}.
        std::fs::set_permissions(&fleet.dir, Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", fleet.dir.display()))?;
        let password = fleet.replication_password();
        fleet.write_password_file(&password)?;
        net::create_bridge(n)?;
        // Hex only: it also travels in a connection string, unquoted.
        let superuser_password = random_password()?.replace([':', '\\', '\'', ' '], "");
        for (i, &major) in majors.iter().enumerate() {
            let host = Host::create(n, i, &fleet.dir, layout, major, &superuser_password)?;
            fleet.hosts.push(host);
        }
        fleet.create_pki()?;
        Ok(fleet)
    }

    /// The fleet's CA and certificates, made by the real `pgfleet certs`:
    /// `node{i}` (agent, with the host's address), `test-admin` and
    /// `test-reader`, in [`pki_dir`](Self::pki_dir). Agents' keys belong to
    /// postgres.
    fn create_pki(&self) -> Result<()> {
        let pki = self.pki_dir();
        let certs = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new(bin_path("pgfleet")?)
                .arg("certs")
                .args(args)
                .output()
                .context("running pgfleet certs")?;
            if !out.status.success() {
                bail!("pgfleet certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let dir = pki.to_str().context("pki path")?;
        certs(&["init", dir])?;
        certs(&["issue", "--dir", dir, "--role", "admin", "test-admin"])?;
        certs(&["issue", "--dir", dir, "--role", "reader", "test-reader"])?;
        let pg = process::pg_user()?;
        for h in &self.hosts {
            let name = h.node_name();
            certs(&["issue", "--dir", dir, "--role", "agent", &name, "--san", &h.addr().to_string()])?;
            for f in [format!("{name}.crt"), format!("{name}.key")] {
                nix::unistd::chown(&pki.join(f), Some(pg.uid), Some(pg.gid))?;
            }
        }
        Ok(())
    }

    /// The fleet CA's directory: `<fleet dir>/pki`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// The inventory's `[tls]` table: the fleet CA and the test admin.
    pub fn inventory_tls_toml(&self) -> String {
        let pki = self.pki_dir();
        format!(
            "[tls]\nca = {}\ncert = {}\nkey = {}\n",
            toml_str(&pki.join("ca.crt").display().to_string()),
            toml_str(&pki.join("test-admin.crt").display().to_string()),
            toml_str(&pki.join("test-admin.key").display().to_string()),
        )
    }

    /// The network number N: the fleet lives in 198.18.N.0/24.
    pub fn n(&self) -> u8 {
        self.lease.n()
    }

    /// The fleet directory, /tmp/pgfleet-test-N.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The address of the root namespace on the fleet's bridge, 198.18.N.1:
    /// the source address of connections from the test and the CLI.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        net::bridge_addr(self.n())
    }

    /// Host `i`.
    ///
    /// # Panics
    /// If the fleet has no host `i` (a bug in the test).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn get(&self, i: usize) -> Result<&Host> {
        self.hosts
            .get(i)
            .ok_or_else(|| anyhow!("the fleet has {} hosts, no host {i}", self.hosts.len()))
    }

    /// Makes host `replica` a streaming replica of host `primary` the way a
    /// DBA does by hand: a `host replication postgres REPLICA/32
    /// scram-sha-256` line in the primary's pg_hba.conf and a reload, then
    /// plain `pg_basebackup -R -C -S slot` as the superuser with its
    /// password, run on the replica (so the primary sees the replica's own
    /// address); starts it, and waits until the replica is in recovery and
    /// the primary lists it as streaming. On a Debian host the cluster must
    /// exist (its configuration under /etc): its data directory is replaced.
    pub async fn make_replica_with_pg_basebackup(
        &self,
        replica: usize,
        primary: usize,
        slot: &str,
    ) -> Result<()> {
        let (r, p) = (self.get(replica)?, self.get(primary)?);
        let hba = p.hba_path();
        let mut text = std::fs::read_to_string(&hba)
            .with_context(|| format!("reading {}", hba.display()))?;
        text.push_str(&format!(
            "# a replica made by hand\nhost replication postgres {}/32 scram-sha-256\n",
            r.addr()
        ));
        std::fs::write(&hba, text).with_context(|| format!("writing {}", hba.display()))?;
        p.query_one_string("select pg_reload_conf()").await?;
        let data = r.data_dir();
        if r.layout() == Layout::Debian && data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
        // The password in the connection string, so -R writes it into
        // primary_conninfo as a hand-made replica often has it.
        let conninfo = format!(
            "host={} port={PG_PORT} user=postgres password={}",
            p.addr(),
            p.superuser_password()
        );
        let argv: Vec<&OsStr> = vec![
            "pg_basebackup".as_ref(),
            "-d".as_ref(),
            conninfo.as_ref(),
            "-D".as_ref(),
            data.as_ref(),
            "-R".as_ref(),
            "-C".as_ref(),
            "-S".as_ref(),
            slot.as_ref(),
            "-X".as_ref(),
            "stream".as_ref(),
            "-c".as_ref(),
            "fast".as_ref(),
        ];
        r.run(&argv)?;
        r.start_postgres()?;
        self.wait_streaming(replica, primary).await
    }

    /// Waits (up to 60 s) until host `replica` is in recovery and host
    /// `primary`'s pg_stat_replication shows it streaming from its address.
    pub async fn wait_streaming(&self, replica: usize, primary: usize) -> Result<()> {
        let (r, p) = (self.get(replica)?, self.get(primary)?);
        let sql = format!(
            "select count(*) from pg_stat_replication \
             where client_addr = '{}' and state = 'streaming'",
            r.addr()
        );
        let deadline = Instant::now() + STREAMING_DEADLINE;
        loop {
            let in_recovery = r.query_one_string("select pg_is_in_recovery()").await;
            let streaming = p.query_one_string(&sql).await;
            let state = match (&in_recovery, &streaming) {
                (Ok(rec), Ok(count)) if rec == "t" && count != "0" => return Ok(()),
                (Ok(rec), Ok(count)) => {
                    format!("pg_is_in_recovery() = {rec}, streaming walsenders for it = {count}")
                }
                (Err(e), _) | (_, Err(e)) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} did not start streaming from {} within {STREAMING_DEADLINE:?}; last seen: {state}",
                    r.netns(),
                    p.netns()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the generated inventory is written.
    pub fn inventory_path(&self) -> PathBuf {
        self.dir.join("inventory.toml")
    }

    /// Writes the inventory: one cluster "main" with every host as
    /// `node{i}`.
    pub fn write_inventory(&self) -> Result<PathBuf> {
        self.write_inventory_with(&[])
    }

    /// Like [`write_inventory`](Self::write_inventory), plus `(name, agent
    /// endpoint)` nodes that are not hosts of this fleet, e.g. an agent
    /// nobody answers at.
    pub fn write_inventory_with(&self, extra_nodes: &[(&str, &str)]) -> Result<PathBuf> {
        let text = self.inventory_toml("main", extra_nodes)?;
        let path = self.inventory_path();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The inventory text: the fleet's [`state_dir`](Self::state_dir), and
    /// cluster `cluster` with the fleet's
    /// [`replication_password_file`](Self::replication_password_file) and
    /// every host as `node{i}`, then `extra_nodes` (name, agent endpoint;
    /// `host` taken from the URL).
    pub fn inventory_toml(&self, cluster: &str, extra_nodes: &[(&str, &str)]) -> Result<String> {
        let mut nodes: Vec<(String, String, String)> = self
            .hosts
            .iter()
            .map(|h| (h.node_name(), h.agent_endpoint(), h.addr().to_string()))
            .collect();
        for (name, agent) in extra_nodes {
            nodes.push((
                name.to_string(),
                agent.to_string(),
                url_host(agent)?.to_owned(),
            ));
        }
        let mut text = format!(
            "state_dir = {}\n\n{}\n[[clusters]]\nname = {}\nreplication_password_file = {}\n",
            toml_str(&self.state_dir().display().to_string()),
            self.inventory_tls_toml(),
            toml_str(cluster),
            toml_str(&self.replication_password_file().display().to_string()),
        );
        for (name, agent, host) in nodes {
            text.push_str(&format!(
                "\n[[clusters.nodes]]\nname = {}\nagent = {}\nhost = {}\nport = {PG_PORT}\n",
                toml_str(&name),
                toml_str(&agent),
                toml_str(&host)
            ));
        }
        Ok(text)
    }

    /// The coordinator's state directory in generated inventories (cluster
    /// locks, journal): `<fleet dir>/state`, so that fleets running at once
    /// never share a cluster lock.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The cluster's replication password: random per fleet, with `:`, `\`,
    /// `'` and a space between its random parts (the characters a passfile
    /// or a connection string must escape). The random parts, e.g. from
    /// [`replication_password_parts`](Self::replication_password_parts),
    /// are what to look for when checking that it leaks nowhere.
    pub fn replication_password(&self) -> String {
        self.password_lock().clone()
    }

    /// The random runs of [`replication_password`](Self::replication_password)
    /// (each at least 12 characters): one of them showing up anywhere means
    /// the password leaked, whatever escaping was applied to the rest.
    pub fn replication_password_parts(&self) -> Vec<String> {
        self.replication_password()
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|p| p.len() >= 12)
            .map(str::to_owned)
            .collect()
    }

    /// The 0600 file (owned by root, like the CLI) holding the replication
    /// password, named by generated inventories as
    /// `replication_password_file`.
    pub fn replication_password_file(&self) -> PathBuf {
        self.dir.join("replication.password")
    }

    /// Replaces the replication password (and the file's content).
    pub fn set_replication_password(&self, password: &str) -> Result<()> {
        if password.is_empty() || password.contains(['\n', '\r', '\0']) {
            bail!("a replication password is one non-empty line");
        }
        self.write_password_file(password)?;
        *self.password_lock() = password.to_owned();
        Ok(())
    }

    fn password_lock(&self) -> std::sync::MutexGuard<'_, String> {
        self.replication_password
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_password_file(&self, password: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.replication_password_file();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{password}").with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Runs `pgfleet --inventory <fleet inventory> ARGS` in the root
    /// namespace as root (writing the default inventory first if none was
    /// written). A non-zero exit is returned, not an error; running past 60 s
    /// is an error (the CLI is killed).
    pub fn pgfleet<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<CliOutput> {
        let mut cmd = self.pgfleet_command(args)?;
        run_cli(&mut cmd)
    }

    /// Starts `pgfleet --inventory <fleet inventory> ARGS` like
    /// [`pgfleet`](Self::pgfleet), but returns at once: the test reads its
    /// stdout line by line while it runs (e.g. `rebuild --json` events) and
    /// collects the rest with [`CliChild::wait`]. Killed when dropped, and
    /// when the calling thread exits.
    pub fn pgfleet_spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<CliChild> {
        let cmd = self.pgfleet_command(args)?;
        CliChild::spawn(cmd)
    }

    /// The `pgfleet` command line `pgfleet` and `pgfleet_spawn` run: the
    /// fleet's inventory (written first if there is none), the developer's
    /// `PGFLEET_*` variables removed except `PGFLEET_LOG`. Tests may add
    /// variables (e.g. `PGFLEET_REPLICATION_PASSWORD`) before running it.
    pub fn pgfleet_command<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Command> {
        let inventory = self.inventory_path();
        if !inventory.exists() {
            self.write_inventory()?;
        }
        self.pgfleet_command_with_inventory(&inventory, args)
    }

    /// Runs `pgfleet --inventory INVENTORY ARGS` like
    /// [`pgfleet`](Self::pgfleet), with another inventory than the fleet's
    /// (e.g. one with its own `state_dir`: a second coordinator).
    pub fn pgfleet_with_inventory<S: AsRef<OsStr>>(
        &self,
        inventory: &Path,
        args: &[S],
    ) -> Result<CliOutput> {
        let mut cmd = self.pgfleet_command_with_inventory(inventory, args)?;
        run_cli(&mut cmd)
    }

    fn pgfleet_command_with_inventory<S: AsRef<OsStr>>(
        &self,
        inventory: &Path,
        args: &[S],
    ) -> Result<Command> {
        let mut cmd = Command::new(bin_path("pgfleet")?);
        cmd.arg("--inventory").arg(inventory).args(args);
        // The developer's PGFLEET_TIMEOUT etc. must not change what a test
        // sees; only the log filter passes.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PGFLEET_") && var != "PGFLEET_LOG" {
                cmd.env_remove(var);
            }
        }
        die_with_parent(&mut cmd);
        Ok(cmd)
    }

    /// The last lines of every host's postgres.log and agent.log, for
    /// failure reports.
    pub fn dump_logs(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            for log in [h.postgres_log(), h.agent_log()] {
                if log.exists() {
                    out.push_str(&format!(
                        "===== {} {} (last {LOG_TAIL_LINES} lines) =====\n{}\n",
                        h.node_name(),
                        log.display(),
                        tail(&log, LOG_TAIL_LINES)
                    ));
                }
            }
        }
        out
    }

    /// Stops everything and removes namespaces, links and the directory;
    /// reports problems but always gets to the end.
    fn teardown(&mut self) {
        for h in &self.hosts {
            if let Err(e) = h.kill_agent() {
                eprintln!("pgfleet-tests teardown: {e:#}");
            }
        }
        for h in &self.hosts {
            if let Err(e) = h.stop_postgres_immediate() {
                eprintln!(
                    "pgfleet-tests teardown: stopping PostgreSQL of {}: {e:#}",
                    h.netns()
                );
            }
        }
        for h in &self.hosts {
            if h.layout() == Layout::Debian
                && let Err(e) = h.drop_debian_cluster()
            {
                eprintln!("pgfleet-tests teardown: {e:#}");
            }
        }
        for h in &self.hosts {
            if let Err(e) = h.unmount_all() {
                eprintln!("pgfleet-tests teardown: {e:#}");
            }
        }
        // Kills whatever is still running in the namespaces, then deletes them.
        if let Err(e) = net::purge(self.n()) {
            eprintln!("pgfleet-tests teardown of network {}: {e:#}", self.n());
        }
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump_logs());
        }
        self.teardown();
    }
}

/// Runs a `pgfleet` command line to its end (killed after 60 s).
fn run_cli(cmd: &mut Command) -> Result<CliOutput> {
    let finished = output_with_timeout(cmd, CLI_TIMEOUT)?;
    if finished.timed_out {
        bail!(
            "{}",
            failure_message(&format!("`{}`", describe(cmd)), &finished)
        );
    }
    let out = finished.output;
    Ok(CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A fresh replication password: five random 12-digit hex runs joined by
/// `:`, `\`, `'` and a space.
fn random_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 30];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}:{}\\{}'{} {}",
        &hex[0..12],
        &hex[12..24],
        &hex[24..36],
        &hex[36..48],
        &hex[48..60]
    ))
}

/// The host part of an endpoint URL such as `http://198.18.3.9:7420`.
fn url_host(url: &str) -> Result<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest.split([':', '/']).next().unwrap_or_default();
    if host.is_empty() {
        bail!("no host in endpoint {url:?}");
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_host_takes_the_address_between_scheme_and_port() {
        assert_eq!(url_host("http://198.18.3.9:7420").unwrap(), "198.18.3.9");
        assert_eq!(url_host("https://db1.example/x").unwrap(), "db1.example");
        assert!(url_host("http://:7420").is_err());
    }
}
