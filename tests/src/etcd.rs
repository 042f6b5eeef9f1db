//! A 3-member etcd cluster on loopback (Debian's etcd-server), for
//! coordinators sharing state. Members are killed by PID when dropped, and
//! can be killed one by one.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::die_with_parent;

const ETCD: &str = "/usr/bin/etcd";

#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    /// http://127.0.0.1:PORT of each member.
    pub client_urls: Vec<String>,
    dir: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdCluster {
    pub fn start(dir: &Path, members: usize) -> Result<EtcdCluster> {
        if !Path::new(ETCD).exists() {
            bail!("{ETCD} is missing: run scripts/setup (installs etcd-server)");
        }
        let ports: Vec<(u16, u16)> = (0..members).map(|_| Ok((free_port()?, free_port()?))).collect::<Result<_>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("pgfleet-test-{}", std::process::id());
        let mut cluster = EtcdCluster { members: Vec::new(), client_urls: Vec::new(), dir: dir.to_owned() };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.join(format!("m{i}"));
            std::fs::create_dir_all(&data)?;
            let log = std::fs::File::create(dir.join(format!("m{i}.log")))?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(ETCD);
            cmd.args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(&data)
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            die_with_parent(&mut cmd);
            cluster.members.push(Some(cmd.spawn().context("starting etcd")?));
            cluster.client_urls.push(client_url);
        }
        let started = Instant::now();
        for (client, _) in &ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], *client));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if started.elapsed() > Duration::from_secs(20) {
                    bail!("etcd member on {addr} did not listen within 20s; logs in {}", cluster.dir.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// The inventory's `[etcd]` table for this cluster.
    pub fn inventory_toml(&self, lease_ttl: &str) -> String {
        let eps = self.client_urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
        format!("[etcd]\nendpoints = [{eps}]\nprefix = \"/pgfleet-test\"\nlease_ttl = \"{lease_ttl}\"\n")
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
