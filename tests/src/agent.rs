//! A host's `pgfleet-agent`: its configuration, start, and kill.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::MutexGuard;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::host::{AGENT_PORT, Host, Layout, PG_PORT, tail, write_postgres_file};
use crate::process::kill_child;
use crate::{bin_path, toml_str};

/// How long the agent may take to start listening.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(20);

/// Changes to a host's default agent configuration
/// ([`Host::start_agent_with`]).
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// `postgres.data_dir` instead of [`Host::data_dir`] (the harness's own
    /// `start_postgres`/`stop_postgres` keep using `data_dir()`).
    pub data_dir: Option<PathBuf>,
    /// `postgres.bin_dir` instead of [`Host::pg_bin_dir`], e.g. a directory with
    /// a wrapped `postgres`.
    pub bin_dir: Option<PathBuf>,
    /// `rebuild.allowed_roots`.
    pub allowed_roots: Vec<PathBuf>,
    /// `rebuild.passfile`.
    pub passfile: Option<PathBuf>,
    /// Further lines of the `[rebuild]` section, as TOML, e.g.
    /// `free_space_margin_percent = 20` or `ready_timeout = "30s"`.
    pub rebuild_lines: Vec<String>,
    /// The body of the `[service]` table instead of the pg_ctl backend with
    /// [`Host::pg_ctl_options`], e.g. `backend = "pg_ctlcluster"` with its
    /// `version` and `cluster` lines.
    pub service_toml: Option<String>,
}

impl Host {
    /// The agent's gRPC address, `198.18.N.X:7420`.
    pub fn agent_addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr(), AGENT_PORT))
    }

    /// The agent's endpoint as the inventory names it: `https://198.18.N.X:7420`
    /// (mutual TLS with the fleet CA).
    pub fn agent_endpoint(&self) -> String {
        format!("https://{}", self.agent_addr())
    }

    /// The fleet CA's directory (the fleet creates it).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir().parent().map(|p| p.join("pki")).unwrap_or_default()
    }

    /// A TLS channel to this host's agent as the fleet's `test-admin`.
    pub async fn agent_channel(&self) -> Result<tonic::transport::Channel> {
        self.agent_channel_as("test-admin").await
    }

    /// A TLS channel to this host's agent with the fleet certificate `name`
    /// (`test-admin`, `test-reader`).
    pub async fn agent_channel_as(&self, name: &str) -> Result<tonic::transport::Channel> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let pki = self.pki_dir();
        let read = |f: String| std::fs::read(pki.join(&f)).with_context(|| format!("reading {f}"));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt".into())?))
            .identity(Identity::from_pem(read(format!("{name}.crt"))?, read(format!("{name}.key"))?));
        Ok(Endpoint::from_shared(self.agent_endpoint())?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// The agent configuration for this host: pg_ctl backend with the same
    /// server options the harness starts PostgreSQL with.
    pub fn agent_config(&self) -> String {
        self.agent_config_with(&AgentOptions::default())
    }

    /// [`agent_config`](Self::agent_config) with `options` applied.
    pub fn agent_config_with(&self, options: &AgentOptions) -> String {
        let path = |p: std::path::PathBuf| toml_str(&p.display().to_string());
        let pki = self.pki_dir();
        let mut text = format!(
            "listen = {listen}\n\
             audit_log = {audit}\n\
             [tls]\n\
             ca = {ca}\n\
             cert = {cert}\n\
             key = {key}\n\
             [postgres]\n\
             bin_dir = {bin}\n\
             data_dir = {data}\n\
             socket_dir = {sock}\n\
             port = {PG_PORT}\n\
             [service]\n\
             {service}",
            listen = toml_str(&self.agent_addr().to_string()),
            audit = path(self.dir().join("audit.jsonl")),
            ca = path(pki.join("ca.crt")),
            cert = path(pki.join(format!("{}.crt", self.node_name()))),
            key = path(pki.join(format!("{}.key", self.node_name()))),
            bin = options
                .bin_dir
                .clone()
                .map_or_else(|| path(self.pg_bin_dir().to_owned()), path),
            data = path(options.data_dir.clone().unwrap_or_else(|| self.data_dir())),
            sock = path(self.socket_dir()),
            service = options.service_toml.clone().unwrap_or_else(|| match self.layout() {
                Layout::Initdb => format!(
                    "backend = \"pg_ctl\"\nlog_file = {log}\noptions = {options}\n",
                    log = path(self.postgres_log()),
                    options = toml_str(&self.pg_ctl_options()),
                ),
                Layout::Debian => format!(
                    "backend = \"pg_ctlcluster\"\nversion = \"{major}\"\ncluster = {cluster}\n",
                    major = self.major(),
                    cluster = toml_str(&self.debian_cluster()),
                ),
            }),
        );
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let mut rebuild = Vec::new();
        if !options.allowed_roots.is_empty() {
            let roots: Vec<String> = options
                .allowed_roots
                .iter()
                .map(|r| toml_str(&r.display().to_string()))
                .collect();
            rebuild.push(format!("allowed_roots = [{}]", roots.join(", ")));
        }
        if let Some(p) = &options.passfile {
            rebuild.push(format!("passfile = {}", path(p.clone())));
        }
        rebuild.extend(options.rebuild_lines.iter().cloned());
        if !rebuild.is_empty() {
            text.push_str("[rebuild]\n");
            for line in rebuild {
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    }

    /// Writes agent.toml and starts `pgfleet-agent --config agent.toml` on
    /// this host as postgres (stdout and stderr appended to agent.log), then
    /// waits up to 20 s until its port accepts a TCP connection from the root
    /// namespace. Fails with the end of agent.log if the agent exits first.
    ///
    /// The agent dies with the thread that calls this (PR_SET_PDEATHSIG):
    /// call it from the thread that owns the fleet.
    pub fn start_agent(&self) -> Result<()> {
        self.start_agent_with(&AgentOptions::default())
    }

    /// [`start_agent`](Self::start_agent) with a configuration changed by
    /// `options` (a different data directory, `[rebuild]` settings).
    pub fn start_agent_with(&self, options: &AgentOptions) -> Result<()> {
        let mut slot = self.agent_slot();
        if let Some(child) = slot.as_mut()
            && child.try_wait()?.is_none()
        {
            bail!(
                "{}: the agent is already running (pid {})",
                self.netns(),
                child.id()
            );
        }
        // Otherwise the readiness check below could be answered by someone
        // else, e.g. an agent a test started by hand.
        if TcpStream::connect_timeout(&self.agent_addr(), Duration::from_millis(200)).is_ok() {
            bail!(
                "{}: something already listens on {}",
                self.netns(),
                self.agent_addr()
            );
        }
        let config = self.agent_config_path();
        write_postgres_file(&config, &self.agent_config_with(options))?;
        let log_path = self.agent_log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = self.command(bin_path("pgfleet-agent")?)?;
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating agent.log handle")?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting pgfleet-agent in {}", self.netns()))?;
        let child = slot.insert(child);
        if let Err(e) = wait_until_listening(child, self.agent_addr()) {
            // Not left half-started for the next call or for teardown.
            let _ = kill_child(child);
            *slot = None;
            bail!(
                "{}: {e:#}\n--- {} (end) ---\n{}",
                self.netns(),
                log_path.display(),
                tail(&log_path, 40)
            );
        }
        Ok(())
    }

    /// SIGKILLs the agent and waits for it. A no-op if none runs.
    pub fn kill_agent(&self) -> Result<()> {
        if let Some(mut child) = self.agent_slot().take() {
            kill_child(&mut child)
                .with_context(|| format!("killing the agent of {}", self.netns()))?;
        }
        Ok(())
    }

    /// The agent's pid, if the harness started one that was not killed.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent_slot().as_ref().map(Child::id)
    }

    fn agent_slot(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock leaves the Option intact.
        self.agent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn wait_until_listening(child: &mut Child, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + AGENT_START_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().context("checking on the agent")? {
            bail!("pgfleet-agent exited during start-up: {status}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            // Still ours: not an agent that answered and then died.
            if let Some(status) = child.try_wait().context("checking on the agent")? {
                bail!("pgfleet-agent exited during start-up: {status}");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("pgfleet-agent did not listen on {addr} within {AGENT_START_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}
