//! One test host: a network namespace with its own address, directory and
//! PostgreSQL server (15 or 18, [`Major`]), everything run as the
//! `postgres` OS user.
//!
//! Hosts are shaped like production ones (DESIGN.md, "Test fleet"): the
//! server is made by `initdb` with peer authentication on its socket and
//! scram-sha-256 for host connections, the superuser has a password, and
//! pg_hba.conf admits only the fleet's client address (the test and the
//! coordinator, 198.18.N.1) for normal connections: no subnet-wide trust,
//! no replication line but those pgfleet adds. [`Layout::Debian`] hosts
//! are Debian clusters (`pg_createcluster`, configuration under
//! /etc/postgresql/15/NAME, `pg_ctlcluster`), whose pg_hba.conf is outside
//! the data directory and never copied by pg_basebackup.

use std::ffi::OsStr;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, chown};

use crate::net;
use crate::postgres::Major;
use crate::process::{
    self, Finished, children_of, describe, failure_message, kill_and_reap, output_with_timeout,
    pg_user, reap,
};

/// Every host's PostgreSQL listens on this port of its own address.
pub const PG_PORT: u16 = 5432;
/// Every host's agent listens on this port of its own address.
pub const AGENT_PORT: u16 = 7420;

/// How long a command run on a host (initdb, pg_ctl, pg_basebackup) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `connect` keeps retrying.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// Variables passed through from the test's environment to host processes,
/// which otherwise get a clean one.
const PASSED_ENV: &[&str] = &["RUST_BACKTRACE", "PGFLEET_LOG"];

/// A test host. Created by [`crate::TestFleet::new`]; the fleet's `Drop` stops
/// everything the host runs and deletes its namespace and directory.
#[derive(Debug)]
pub struct Host {
    index: usize,
    n: u8,
    netns: String,
    addr: Ipv4Addr,
    dir: PathBuf,
    pub(crate) agent: Mutex<Option<Child>>,
    /// tmpfs mounts made by [`Host::mount_tmpfs`], unmounted at teardown.
    mounts: Mutex<Vec<PathBuf>>,
    layout: Layout,
    major: Major,
    /// The `postgres` superuser's password (scram): what the test and a
    /// DBA's tools connect with over TCP.
    superuser_password: String,
}

/// Which packets [`Host::drop_traffic`] drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// What the host sends.
    Outgoing,
    /// What is sent to the host.
    Incoming,
}

/// How a host's PostgreSQL is laid out and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `initdb` into the host directory, every file in the data directory,
    /// started and stopped with `pg_ctl` (the agent's `pg_ctl` backend).
    Initdb,
    /// A Debian cluster `15/pft<N>h<i>` made by `pg_createcluster`: data
    /// in the host directory, configuration (pg_hba.conf included) under
    /// /etc/postgresql/15/NAME, the log under /var/log/postgresql, run with
    /// `pg_ctlcluster` (the agent's `pg_ctlcluster` backend).
    Debian,
}

impl Host {
    /// Creates host `index` of network `n`: its namespace and veth, and its
    /// directory under `fleet_dir`, owned by postgres, mode 0700.
    pub(crate) fn create(
        n: u8,
        index: usize,
        fleet_dir: &Path,
        layout: Layout,
        major: Major,
        superuser_password: &str,
    ) -> Result<Host> {
        let user = pg_user()?;
        net::create_host(n, index)?;
        let dir = fleet_dir.join(format!("h{index}"));
        for d in [dir.clone(), dir.join("sock")] {
            DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .with_context(|| format!("creating {}", d.display()))?;
            chown(&d, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown postgres {}", d.display()))?;
        }
        let host = Host {
            index,
            n,
            netns: net::netns_name(n, index),
            addr: net::host_addr(n, index)?,
            dir,
            agent: Mutex::new(None),
            mounts: Mutex::new(Vec::new()),
            layout,
            major,
            superuser_password: superuser_password.to_owned(),
        };
        if layout == Layout::Debian && host.debian_etc_dir().exists() {
            // Left by a killed run that had the same network number.
            host.drop_debian_cluster()?;
        }
        Ok(host)
    }

    /// How this host's PostgreSQL is laid out.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The PostgreSQL major this host runs.
    pub fn major(&self) -> Major {
        self.major
    }

    /// Where this host's PostgreSQL programs are (an agent's `bin_dir`).
    pub fn pg_bin_dir(&self) -> &'static Path {
        self.major.bin_dir()
    }

    /// The superuser's password (scram over TCP).
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// The Debian cluster's name, `pft<N>h<i>` (only meaningful for
    /// [`Layout::Debian`]).
    pub fn debian_cluster(&self) -> String {
        format!("pft{}h{}", self.n, self.index)
    }

    /// /etc/postgresql/15/NAME of a Debian host.
    pub fn debian_etc_dir(&self) -> PathBuf {
        PathBuf::from(format!("/etc/postgresql/{}/{}", self.major, self.debian_cluster()))
    }

    /// Where this host's pg_hba.conf is: in the data directory, or under
    /// /etc/postgresql on a Debian host.
    pub fn hba_path(&self) -> PathBuf {
        match self.layout {
            Layout::Initdb => self.data_dir().join("pg_hba.conf"),
            Layout::Debian => self.debian_etc_dir().join("pg_hba.conf"),
        }
    }

    /// Position in the fleet (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Name of this host in generated inventories: `node{index}`.
    pub fn node_name(&self) -> String {
        format!("node{}", self.index)
    }

    /// The network namespace's name, e.g. `pft7h0`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's address, `198.18.N.{index+2}`.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's directory, `/tmp/pgfleet-test-N/h{index}`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The server's log: `postgres.log` in the host directory, or Debian's
    /// /var/log/postgresql/postgresql-15-NAME.log.
    pub fn postgres_log(&self) -> PathBuf {
        match self.layout {
            Layout::Initdb => self.dir.join("postgres.log"),
            Layout::Debian => PathBuf::from(format!(
                "/var/log/postgresql/postgresql-{}-{}.log",
                self.major,
                self.debian_cluster()
            )),
        }
    }

    pub fn agent_config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// A command that runs `program` inside this host's namespace as the
    /// postgres user, in the host directory, with a clean environment
    /// (`PATH` with the PostgreSQL programs first, `LANG=C`, `NO_COLOR=1`,
    /// `HOME` = the host directory). A bare program name is looked up in
    /// the host's [`pg_bin_dir`](Self::pg_bin_dir) first.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let program = program.as_ref();
        let pg_bin = self.pg_bin_dir();
        let in_pg_bin = pg_bin.join(program);
        let mut cmd = if !program.as_encoded_bytes().contains(&b'/') && in_pg_bin.exists() {
            Command::new(in_pg_bin)
        } else {
            Command::new(program)
        };
        cmd.env_clear()
            .env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", pg_bin.display()),
            )
            .env("LANG", "C")
            // Plain agent logs (tracing colours its output even into a file).
            .env("NO_COLOR", "1")
            .env("HOME", &self.dir)
            .current_dir(&self.dir);
        for var in PASSED_ENV {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        // Panics keep their backtraces, but anyhow errors (an agent's fatal
        // start-up error) stay one readable paragraph in agent.log.
        cmd.env("RUST_LIB_BACKTRACE", "0");
        process::enter_netns_as(&mut cmd, &self.netns, pg_user()?)?;
        Ok(cmd)
    }

    /// Runs `argv` on this host as postgres and returns its output; fails
    /// (with the command, status, stdout and stderr) unless it exits 0 within
    /// two minutes.
    pub fn run<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Output> {
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let mut cmd = self.command(program)?;
        cmd.args(args);
        let finished = output_with_timeout(&mut cmd, RUN_TIMEOUT)?;
        self.checked(&cmd, finished)
    }

    fn checked(&self, cmd: &Command, finished: Finished) -> Result<Output> {
        if finished.timed_out || !finished.output.status.success() {
            let what = format!("`{}` in {} as postgres", describe(cmd), self.netns);
            bail!("{}", failure_message(&what, &finished));
        }
        Ok(finished.output)
    }

    /// Starts `argv` on this host as postgres and returns the child (stdio
    /// inherited). It is SIGKILLed if the spawning thread exits, so spawn from
    /// the thread that owns the fleet, not from a tokio task.
    pub fn spawn<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Child> {
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let mut cmd = self.command(program)?;
        cmd.args(args);
        cmd.spawn()
            .with_context(|| format!("starting `{}` in {}", describe(&cmd), self.netns))
    }

    /// Makes this host's PostgreSQL as a DBA would, not started: `initdb`
    /// (or `pg_createcluster` on a Debian host) with peer authentication
    /// for local connections, scram-sha-256 for host connections and the
    /// superuser's password; then one pg_hba line admitting the fleet's
    /// client address (198.18.N.1: the test and the coordinator) to every
    /// database but replication with scram, and `wal_log_hints = on` (for
    /// pg_rewind) in the configuration.
    pub fn initdb(&self) -> Result<()> {
        let data = self.data_dir();
        if data.exists() {
            bail!(
                "{} already exists; initdb wants a fresh directory",
                data.display()
            );
        }
        let pwfile = self.dir.join("initdb.pwfile");
        write_postgres_file(&pwfile, &format!("{}\n", self.superuser_password))?;
        let made = match self.layout {
            Layout::Initdb => {
                let mut argv: Vec<&OsStr> = vec!["initdb".as_ref(), "-D".as_ref(), data.as_ref()];
                argv.extend(INITDB_AUTH.iter().map(OsStr::new));
                argv.extend(["--pwfile".as_ref(), pwfile.as_os_str()]);
                self.run(&argv).map(drop)
            }
            Layout::Debian => self.create_debian_cluster(&pwfile),
        };
        let _ = std::fs::remove_file(&pwfile);
        made?;
        let client = net::bridge_addr(self.n);
        let hba = self.hba_path();
        let mut f = OpenOptions::new()
            .append(true)
            .open(&hba)
            .with_context(|| format!("opening {}", hba.display()))?;
        writeln!(
            f,
            "# the DBA's and the coordinator's host\nhost all all {client}/32 scram-sha-256"
        )
        .with_context(|| format!("writing {}", hba.display()))?;
        if self.layout == Layout::Initdb {
            // In the file, not only on the pg_ctl command line: pg_rewind runs
            // single-user crash recovery without our -o options, which would
            // record wal_log_hints = off in pg_control and then refuse to rewind.
            let conf = data.join("postgresql.conf");
            let mut f = OpenOptions::new()
                .append(true)
                .open(&conf)
                .with_context(|| format!("opening {}", conf.display()))?;
            writeln!(f, "wal_log_hints = on")
                .with_context(|| format!("writing {}", conf.display()))?;
        }
        Ok(())
    }

    /// `pg_createcluster 15 NAME` as root (as a DBA does on Debian), with
    /// its data directory in the host directory and this host's address,
    /// port and socket directory in conf.d, so the same settings hold for a
    /// copy pg_basebackup makes into the data directory.
    fn create_debian_cluster(&self, pwfile: &Path) -> Result<()> {
        let data = self.data_dir();
        let name = self.debian_cluster();
        let major = self.major.to_string();
        let sock = self.socket_dir();
        let mut argv: Vec<&OsStr> = vec![
            "pg_createcluster".as_ref(),
            major.as_ref(),
            name.as_ref(),
            "-d".as_ref(),
            data.as_ref(),
            "-p".as_ref(),
            "5432".as_ref(),
            "-s".as_ref(),
            sock.as_ref(),
            "--".as_ref(),
        ];
        argv.extend(INITDB_AUTH.iter().map(OsStr::new));
        argv.extend(["--pwfile".as_ref(), pwfile.as_os_str()]);
        run_root(&argv)?;
        let conf = self.debian_etc_dir().join("conf.d/pgfleet-test.conf");
        write_postgres_file(
            &conf,
            &format!(
                "listen_addresses = '{addr}'\n\
                 ssl = off\n\
                 wal_level = replica\n\
                 max_wal_senders = 10\n\
                 max_replication_slots = 10\n\
                 hot_standby = on\n\
                 wal_log_hints = on\n\
                 fsync = off\n\
                 shared_buffers = 16MB\n",
                addr = self.addr
            ),
        )?;
        std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .with_context(|| format!("chmod {}", conf.display()))?;
        Ok(())
    }

    /// `pg_dropcluster --stop` and the cluster's /etc directory (our conf.d
    /// file is not pg_dropcluster's to remove).
    pub(crate) fn drop_debian_cluster(&self) -> Result<()> {
        let name = self.debian_cluster();
        let major = self.major.to_string();
        let etc = self.debian_etc_dir();
        if !etc.exists() {
            return Ok(());
        }
        let result = run_root(&[
            "pg_dropcluster".as_ref(),
            "--stop".as_ref(),
            major.as_ref(),
            name.as_ref(),
        ]);
        let _ = std::fs::remove_dir_all(&etc);
        let _ = std::fs::remove_file(self.postgres_log());
        result.map(drop)
    }

    /// The server options this host's PostgreSQL is started with (`pg_ctl
    /// -o`). Host-specific settings live here rather than in the data
    /// directory, so a copy made by pg_basebackup from another host still
    /// listens on this host's own address and socket. wal_level is left to
    /// the configuration files (replica by default), so a test can make it
    /// logical with ALTER SYSTEM.
    pub fn pg_ctl_options(&self) -> String {
        format!(
            "-c listen_addresses={addr} -c port={PG_PORT} -c unix_socket_directories={sock} \
             -c max_wal_senders=10 -c max_replication_slots=10 \
             -c hot_standby=on -c wal_log_hints=on -c fsync=off -c shared_buffers=16MB",
            addr = self.addr,
            sock = self.socket_dir().display(),
        )
    }

    /// `pg_ctl start` (`pg_ctlcluster 15 NAME start` on a Debian host),
    /// waiting (up to 60 s) until the server accepts connections. On failure
    /// the error carries the end of the server log.
    pub fn start_postgres(&self) -> Result<()> {
        let data = self.data_dir();
        let log = self.postgres_log();
        let options = self.pg_ctl_options();
        let name = self.debian_cluster();
        let major = self.major.to_string();
        let argv: Vec<&OsStr> = match self.layout {
            Layout::Initdb => vec![
                "pg_ctl".as_ref(),
                "-D".as_ref(),
                data.as_ref(),
                "-l".as_ref(),
                log.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
            Layout::Debian => vec![
                "/usr/bin/pg_ctlcluster".as_ref(),
                major.as_ref(),
                name.as_ref(),
                "start".as_ref(),
            ],
        };
        self.run(&argv)
            .map(drop)
            .map_err(|e| anyhow!("{e:#}\n--- {} (end) ---\n{}", log.display(), tail(&log, 30)))
    }

    /// `pg_ctl stop -m fast`, waiting until the server is down.
    pub fn stop_postgres(&self) -> Result<()> {
        self.pg_ctl_stop("fast", 60)
    }

    fn pg_ctl_stop(&self, mode: &str, timeout_secs: u32) -> Result<()> {
        let pid = self.postmaster_pid()?;
        let data = self.data_dir();
        let timeout = timeout_secs.to_string();
        let name = self.debian_cluster();
        let major = self.major.to_string();
        let argv: Vec<&OsStr> = match self.layout {
            Layout::Initdb => vec![
                "pg_ctl".as_ref(),
                "-D".as_ref(),
                data.as_ref(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                timeout.as_ref(),
                "stop".as_ref(),
            ],
            Layout::Debian => vec![
                "/usr/bin/pg_ctlcluster".as_ref(),
                major.as_ref(),
                name.as_ref(),
                "stop".as_ref(),
                "-m".as_ref(),
                mode.as_ref(),
                "-t".as_ref(),
                timeout.as_ref(),
            ],
        };
        self.run(&argv)?;
        // The postmaster was orphaned by `pg_ctl start`; reap it (see
        // process::become_subreaper).
        if let Some(pid) = pid {
            reap(&[pid], Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Stops the server for teardown if it is (or may be) running.
    pub(crate) fn stop_postgres_immediate(&self) -> Result<()> {
        if self.data_dir().join("postmaster.pid").exists() {
            self.pg_ctl_stop("immediate", 30)?;
        }
        Ok(())
    }

    /// Simulates the server's host dying: SIGKILL to the postmaster and to
    /// each of its processes, leaving a crashed data directory behind. The
    /// postmaster is frozen first so it can start no new child while they are
    /// collected; children are killed too so the server can be started again
    /// at once (PostgreSQL refuses while old backends still hold its memory).
    pub fn kill_postgres(&self) -> Result<()> {
        let pid = self.postmaster_pid()?.ok_or_else(|| {
            anyhow!(
                "{}: PostgreSQL is not running (no postmaster.pid)",
                self.netns
            )
        })?;
        // Never signal a process outside this host: postmaster.pid may be stale.
        if !net::netns_pids(&self.netns)?.contains(&pid) {
            bail!(
                "postmaster.pid of {} names pid {pid}, which is not running in that namespace",
                self.netns
            );
        }
        kill(pid, Signal::SIGSTOP).with_context(|| format!("SIGSTOP postmaster {pid}"))?;
        let mut pids = vec![pid];
        pids.extend(children_of(pid));
        kill_and_reap(&pids, Duration::from_secs(10))
    }

    /// The postmaster's pid from `data/postmaster.pid`, if that file exists.
    pub fn postmaster_pid(&self) -> Result<Option<Pid>> {
        let path = self.data_dir().join("postmaster.pid");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let first = text.lines().next().unwrap_or_default().trim();
        let pid = first
            .parse()
            .with_context(|| format!("{}: first line {first:?} is not a pid", path.display()))?;
        Ok(Some(Pid::from_raw(pid)))
    }

    /// Connects from the test (root namespace) to this host's PostgreSQL as
    /// `postgres` with its password (scram), retrying for up to 30 s while the server comes up. The
    /// connection is driven by a tokio task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.addr.to_string())
            .port(PG_PORT)
            .user("postgres")
            .password(&self.superuser_password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(3));
        let deadline = Instant::now() + CONNECT_DEADLINE;
        loop {
            match config.connect(tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(async move {
                        // Ends with an error when the server goes away; the
                        // client's next query reports that.
                        let _ = connection.await;
                    });
                    return Ok(client);
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "connecting to {}:{PG_PORT} for {CONNECT_DEADLINE:?}",
                            self.addr
                        )
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Runs `sql` on a fresh connection and returns the single value of its
    /// single row in PostgreSQL's text form (`t`/`f` for booleans).
    pub async fn query_one_string(&self, sql: &str) -> Result<String> {
        let client = self.connect().await?;
        query_one_string(&client, sql)
            .await
            .with_context(|| format!("on {} ({})", self.netns, self.addr))
    }
}

/// Filesystems and network conditions of a host.
impl Host {
    /// Mounts a tmpfs of `size_mib` MiB at `dir` (created if missing, inside
    /// the host directory), owned by postgres, mode 0700: a small filesystem
    /// for running out of space. Unmounted when the fleet is torn down, also
    /// after a failed test.
    pub fn mount_tmpfs(&self, dir: &Path, size_mib: u32) -> Result<()> {
        if !dir.starts_with(&self.dir) {
            bail!("{} is outside {}", dir.display(), self.dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let options = format!("size={size_mib}m,mode=0700");
        let argv = [
            "mount".as_ref(),
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            "tmpfs".as_ref(),
            dir.as_os_str(),
        ];
        run_root(&argv)?;
        self.mounts_lock().push(dir.to_owned());
        let user = pg_user()?;
        chown(dir, Some(user.uid), Some(user.gid))
            .with_context(|| format!("chown postgres {}", dir.display()))?;
        Ok(())
    }

    /// Unmounts (lazily: whatever still has a file open there keeps it
    /// until it closes it) every tmpfs this host mounted.
    pub(crate) fn unmount_all(&self) -> Result<()> {
        let mut mounts = self.mounts_lock();
        let mut errors = Vec::new();
        while let Some(dir) = mounts.pop() {
            if let Err(e) = run_root(&["umount".as_ref(), "-l".as_ref(), dir.as_os_str()]) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("\n"))
        }
    }

    fn mounts_lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.mounts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Limits what this host sends to `rate` (tc syntax, e.g. "80mbit")
    /// with a token bucket on its eth0: a copy from this host then takes a
    /// predictable while. Replaces an earlier limit.
    pub fn limit_egress(&self, rate: &str) -> Result<()> {
        net::ip(&[
            "netns",
            "exec",
            &self.netns,
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "64kb",
            "latency",
            "200ms",
        ])?;
        Ok(())
    }

    /// Removes the limit of [`limit_egress`](Self::limit_egress).
    pub fn clear_egress_limit(&self) -> Result<()> {
        net::ip(&[
            "netns",
            "exec",
            &self.netns,
            "tc",
            "qdisc",
            "del",
            "dev",
            "eth0",
            "root",
        ])?;
        Ok(())
    }

    /// A one-way black hole: every packet this host sends
    /// ([`Direction::Outgoing`]: a token bucket on its eth0 smaller than any
    /// packet) or every packet sent to it ([`Direction::Incoming`]: the same
    /// on the bridge's end of its veth) is dropped. Nothing is refused:
    /// connections time out, as across a broken switch or firewall, while
    /// the other direction still carries. (This kernel has no netem, and no
    /// tc actions; a tbf is what drops.) Replaces an egress limit.
    pub fn drop_traffic(&self, direction: Direction) -> Result<()> {
        let tbf = ["root", "tbf", "rate", "1kbit", "burst", "10", "limit", "10"];
        match direction {
            Direction::Outgoing => {
                let mut argv = vec!["netns", "exec", &self.netns, "tc", "qdisc", "replace", "dev", "eth0"];
                argv.extend(tbf);
                net::ip(&argv)?;
            }
            Direction::Incoming => {
                let veth = net::veth_name(self.n, self.index);
                let mut argv = vec!["qdisc", "replace", "dev", veth.as_str()];
                argv.extend(tbf);
                net::tc(&argv)?;
            }
        }
        Ok(())
    }

    /// Undoes [`drop_traffic`](Self::drop_traffic) (Outgoing also removes
    /// an egress limit).
    pub fn clear_drop(&self, direction: Direction) -> Result<()> {
        match direction {
            Direction::Outgoing => self.clear_egress_limit(),
            Direction::Incoming => {
                net::tc(&["qdisc", "del", "dev", &net::veth_name(self.n, self.index), "root"])?;
                Ok(())
            }
        }
    }

    /// Cuts this host off the network: its veth's outer end goes down, so
    /// nothing reaches it and it reaches nothing but itself (a pulled
    /// cable, or a switch port down). Established connections stall rather
    /// than fail, as with a real cut.
    pub fn link_down(&self) -> Result<()> {
        net::ip(&["link", "set", &net::veth_name(self.n, self.index), "down"])?;
        Ok(())
    }

    /// Undoes [`link_down`](Self::link_down).
    pub fn link_up(&self) -> Result<()> {
        net::ip(&["link", "set", &net::veth_name(self.n, self.index), "up"])?;
        Ok(())
    }

    /// Makes `addr` unreachable from this host (an `unreachable` route:
    /// connections fail at once with "No route to host"); other hosts and
    /// the root namespace still reach this host and each other.
    pub fn block_route_to(&self, addr: Ipv4Addr) -> Result<()> {
        net::ip(&[
            "-n",
            &self.netns,
            "route",
            "add",
            "unreachable",
            &format!("{addr}/32"),
        ])?;
        Ok(())
    }

    /// Undoes [`block_route_to`](Self::block_route_to).
    pub fn unblock_route_to(&self, addr: Ipv4Addr) -> Result<()> {
        net::ip(&[
            "-n",
            &self.netns,
            "route",
            "del",
            "unreachable",
            &format!("{addr}/32"),
        ])?;
        Ok(())
    }

    /// The live (not zombie) processes running in this host's namespace,
    /// with their argv.
    pub fn processes(&self) -> Result<Vec<(Pid, Vec<String>)>> {
        Ok(net::netns_pids(&self.netns)?
            .into_iter()
            .filter_map(|pid| {
                if process::proc_stat(pid)?.state == 'Z' {
                    return None;
                }
                Some((pid, process::cmdline(pid)?))
            })
            .collect())
    }
}

/// What `initdb` is told about authentication: Debian's own defaults, and
/// what a DBA who did not pass `-A trust` gets.
const INITDB_AUTH: [&str; 3] = [
    "--auth-local=peer",
    "--auth-host=scram-sha-256",
    "--no-sync",
];

/// A bin_dir for an agent (`AgentOptions::bin_dir`) whose `postgres` is
/// a shell wrapper: the real programs of `real` (a host's
/// [`pg_bin_dir`](Host::pg_bin_dir)) as symlinks, except
/// pg_ctl (a copy: it looks for `postgres` next to its own resolved path)
/// and postgres, a script that runs `wrapper` (sh code; `$REAL` is the real
/// postgres) unless asked for its version, which pg_ctl checks first.
pub fn wrapped_bin_dir(dir: &Path, real: &Path, wrapper: &str) -> Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(real).with_context(|| format!("listing {}", real.display()))? {
        let name = entry?.file_name();
        let to = dir.join(&name);
        if name == "pg_ctl" {
            std::fs::copy(real.join(&name), &to)?;
        } else if name == "postgres" {
            std::fs::write(
                &to,
                format!(
                    "#!/bin/sh\nREAL={real}/postgres\n\
                     case \"$1\" in -V|--version) exec \"$REAL\" \"$@\";; esac\n{wrapper}\n",
                    real = real.display()
                ),
            )?;
        } else {
            symlink(real.join(&name), &to)?;
            continue;
        }
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Runs a command as root in the root namespace; fails with its output
/// unless it exits 0 within the run timeout.
fn run_root(argv: &[&OsStr]) -> Result<Output> {
    let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let finished = output_with_timeout(&mut cmd, RUN_TIMEOUT)?;
    if finished.timed_out || !finished.output.status.success() {
        bail!(
            "{}",
            failure_message(&format!("`{}` as root", describe(&cmd)), &finished)
        );
    }
    Ok(finished.output)
}

/// The single text value of the single row `sql` returns.
pub async fn query_one_string(client: &tokio_postgres::Client, sql: &str) -> Result<String> {
    let rows: Vec<_> = client
        .simple_query(sql)
        .await
        .with_context(|| format!("query {sql:?}"))?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let [row] = rows.as_slice() else {
        bail!("query {sql:?} returned {} rows, expected 1", rows.len());
    };
    row.get(0)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("query {sql:?} returned NULL"))
}

/// The last `lines` lines of a log file (or why it could not be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Writes `contents` to `path`, owned by postgres, mode 0600.
pub(crate) fn write_postgres_file(path: &Path, contents: &str) -> Result<()> {
    let user = pg_user()?;
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    Ok(())
}
