//! `pgfleet serve` for a test fleet: a coordinator process in the root
//! namespace on 127.0.0.1 (or on a test host, in its namespace and on its
//! address, to be cut off with the host's link), serving mutual TLS with a
//! certificate from the fleet's CA, acting on the fleet's inventory (and so
//! its state_dir). It can be killed (SIGKILL, as a crash) and started again
//! on the same address.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{die_with_parent, enter_netns};
use crate::{Host, TestFleet, bin_path};

/// Where a placed coordinator listens inside its host's namespace.
const PLACED_PORT: u16 = 7430;

const READY_WITHIN: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct Coordinator {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    /// The namespace it runs in (None: the root namespace).
    netns: Option<String>,
    /// `https://127.0.0.1:PORT`, or `https://HOST_ADDR:7430` when placed.
    pub url: String,
    pub audit_log: PathBuf,
}

fn toml_str(s: &std::path::Path) -> String {
    format!("{:?}", s.display().to_string())
}

impl TestFleet {
    /// Issues the coordinator's certificate, writes its coordinator.toml
    /// (the fleet's inventory, written first if needed) and starts it.
    pub fn start_coordinator(&self) -> Result<Coordinator> {
        self.start_coordinator_named("coordinator")
    }

    /// Another coordinator with its own directory, port and log (several
    /// share one etcd store).
    pub fn start_coordinator_named(&self, name: &str) -> Result<Coordinator> {
        self.start_coordinator_with(name, "")
    }

    /// [`start_coordinator_named`](Self::start_coordinator_named) with
    /// `extra` appended to its coordinator.toml (e.g. a `[hook]` table).
    pub fn start_coordinator_with(&self, name: &str, extra: &str) -> Result<Coordinator> {
        self.issue_coordinator_cert("coordinator", "127.0.0.1")?;
        // A port the kernel just handed out and took back: free for us.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        self.coordinator_at(name, "coordinator", addr, None, extra)
    }

    /// A coordinator on test host `host` (in its namespace, as root, on its
    /// address): `host.link_down()` cuts it from etcd, the agents and its
    /// callers at once. The host needs no PostgreSQL or agent.
    pub fn start_coordinator_on(&self, name: &str, host: &Host) -> Result<Coordinator> {
        let cert = format!("coordinator-{}", host.node_name());
        self.issue_coordinator_cert(&cert, &host.addr().to_string())?;
        let addr = SocketAddr::from((host.addr(), PLACED_PORT));
        self.coordinator_at(name, &cert, addr, Some(host.netns().to_owned()), "")
    }

    fn issue_coordinator_cert(&self, cert: &str, san: &str) -> Result<()> {
        if !self.inventory_path().exists() {
            self.write_inventory()?;
        }
        let pki = self.pki_dir();
        if !pki.join(format!("{cert}.crt")).exists() {
            let out = Command::new(bin_path("pgfleet")?)
                .args(["certs", "issue", "--dir"])
                .arg(&pki)
                .args(["--role", "agent", cert, "--san", san])
                .output()
                .context("running pgfleet certs issue")?;
            if !out.status.success() {
                bail!("pgfleet certs issue: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    fn coordinator_at(&self, name: &str, cert: &str, addr: SocketAddr, netns: Option<String>, extra: &str) -> Result<Coordinator> {
        let pki = self.pki_dir();
        let dir = self.dir().join(name);
        fs::create_dir_all(&dir)?;
        let audit_log = dir.join("audit.jsonl");
        let config = dir.join("coordinator.toml");
        fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ninventory = {}\naudit_log = {}\n[tls]\nca = {}\ncert = {}\nkey = {}\n{extra}",
                toml_str(&self.inventory_path()),
                toml_str(&audit_log),
                toml_str(&pki.join("ca.crt")),
                toml_str(&pki.join(format!("{cert}.crt"))),
                toml_str(&pki.join(format!("{cert}.key"))),
            ),
        )?;
        let mut c = Coordinator {
            child: None,
            config,
            log: dir.join("serve.log"),
            addr,
            netns,
            url: format!("https://{addr}"),
            audit_log,
        };
        c.start()?;
        Ok(c)
    }
}

impl Coordinator {
    /// Starts `pgfleet serve` and waits until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(bin_path("pgfleet")?);
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .env("PGFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match &self.netns {
            Some(ns) => enter_netns(&mut cmd, ns)?,
            None => die_with_parent(&mut cmd),
        }
        let mut child = cmd.spawn().context("starting pgfleet serve")?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("pgfleet serve exited ({status}):\n{}", self.log_text());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if started.elapsed() > READY_WITHIN {
                let _ = child.kill();
                let _ = child.wait();
                bail!("pgfleet serve did not listen on {} within {READY_WITHIN:?}:\n{}", self.addr, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: a crash, nothing written on the way out.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A gRPC channel to this coordinator with the fleet certificate
    /// `name` (`test-admin`, `test-reader`).
    pub async fn channel_as(&self, pki: &std::path::Path, name: &str) -> Result<tonic::transport::Channel> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let read = |f: String| fs::read(pki.join(&f)).with_context(|| format!("reading {f}"));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt".into())?))
            .identity(Identity::from_pem(read(format!("{name}.crt"))?, read(format!("{name}.key"))?));
        Ok(Endpoint::from_shared(self.url.clone())?
            .connect_timeout(Duration::from_secs(3))
            .tls_config(tls)?
            .connect()
            .await?)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs (it was not killed and did not exit).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`; how long that
    /// took, or an error quoting the whole log.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        while !self.log_text().contains(needle) {
            if started.elapsed() > within {
                bail!("no {needle:?} in the coordinator's log within {within:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(started.elapsed())
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}
