//! A 3-member etcd cluster on loopback (Debian's etcd-server), for
//! coordinators sharing state. Members are killed by PID when dropped, and
//! can be killed one by one.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::die_with_parent;

const ETCD: &str = "/usr/bin/etcd";

#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    /// How each member was started, to start it again after a kill (its
    /// data directory makes it rejoin as the same member).
    argv: Vec<Vec<std::ffi::OsString>>,
    /// http://127.0.0.1:PORT (https:// with TLS) of each member.
    pub client_urls: Vec<String>,
    dir: PathBuf,
    /// With TLS: the fleet CA's directory, holding the members' server
    /// certificate `etcd.crt`/`etcd.key` (clients must present one too).
    pki: Option<PathBuf>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdCluster {
    pub fn start(dir: &Path, members: usize) -> Result<EtcdCluster> {
        Self::start_with(dir, members, None, Ipv4Addr::LOCALHOST)
    }

    /// Members whose client URLs are on `ip`, e.g. a test fleet's bridge
    /// address (198.18.N.1): reachable from the root namespace and from the
    /// fleet's hosts, so a coordinator in a host's namespace can be cut off
    /// from them by taking its link down.
    pub fn start_on(dir: &Path, members: usize, ip: Ipv4Addr) -> Result<EtcdCluster> {
        Self::start_with(dir, members, None, ip)
    }

    /// Members that serve clients over TLS only, with the server
    /// certificate `etcd.crt` of the fleet CA in `pki` (made beforehand with
    /// `pgfleet certs issue --role agent etcd --san 127.0.0.1`), and that
    /// require a client certificate of that CA.
    pub fn start_tls(dir: &Path, members: usize, pki: &Path) -> Result<EtcdCluster> {
        Self::start_with(dir, members, Some(pki), Ipv4Addr::LOCALHOST)
    }

    fn start_with(dir: &Path, members: usize, pki: Option<&Path>, ip: Ipv4Addr) -> Result<EtcdCluster> {
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
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            argv: Vec::new(),
            client_urls: Vec::new(),
            dir: dir.to_owned(),
            pki: pki.map(Path::to_owned),
        };
        let scheme = if pki.is_some() { "https" } else { "http" };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.join(format!("m{i}"));
            std::fs::create_dir_all(&data)?;
            let client_url = format!("{scheme}://{ip}:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut argv: Vec<std::ffi::OsString> = Vec::new();
            for a in ["--name", &format!("m{i}"), "--data-dir"] {
                argv.push(a.into());
            }
            argv.push(data.into_os_string());
            for a in [
                "--listen-client-urls", &client_url, "--advertise-client-urls", &client_url,
                "--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url,
                "--initial-cluster", &initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", &token,
            ] {
                argv.push(a.into());
            }
            if let Some(pki) = pki {
                for (flag, file) in [("--cert-file", "etcd.crt"), ("--key-file", "etcd.key"), ("--trusted-ca-file", "ca.crt")] {
                    argv.push(flag.into());
                    argv.push(pki.join(file).into_os_string());
                }
                argv.push("--client-cert-auth".into());
            }
            cluster.argv.push(argv);
            cluster.members.push(None);
            cluster.client_urls.push(client_url);
            cluster.spawn(i)?;
        }
        let started = Instant::now();
        for (client, _) in &ports {
            let addr = SocketAddr::from((ip, *client));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if started.elapsed() > Duration::from_secs(20) {
                    bail!("etcd member on {addr} did not listen within 20s; logs in {}", cluster.dir.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// The inventory's `[etcd]` table for this cluster (with TLS: the
    /// fleet CA, and the test admin's certificate as the client's).
    pub fn inventory_toml(&self, lease_ttl: &str) -> String {
        let eps = self.client_urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
        let mut t = format!("[etcd]\nendpoints = [{eps}]\nprefix = \"/pgfleet-test\"\nlease_ttl = \"{lease_ttl}\"\n");
        if let Some(pki) = &self.pki {
            for (k, f) in [("ca", "ca.crt"), ("cert", "test-admin.crt"), ("key", "test-admin.key")] {
                t += &format!("{k} = \"{}\"\n", pki.join(f).display());
            }
        }
        t
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{i}.log")))?;
        let mut cmd = Command::new(ETCD);
        cmd.args(&self.argv[i]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        die_with_parent(&mut cmd);
        self.members[i] = Some(cmd.spawn().context("starting etcd")?);
        Ok(())
    }

    /// Starts a killed member again (it rejoins from its data directory)
    /// and waits until it listens.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        let addr: SocketAddr = self.client_urls[i]
            .split_once("://")
            .and_then(|(_, a)| a.parse().ok())
            .context("member address")?;
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("etcd member m{i} did not listen again within 20s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The index of the member that is raft leader now, asked of the live
    /// members through etcd's JSON gateway (`/v3/maintenance/status`).
    pub fn raft_leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for (i, url) in self.client_urls.iter().enumerate() {
            if self.members[i].is_none() {
                ids.push(None);
                continue;
            }
            let status = http_post_json(url, "/v3/maintenance/status", "{}").ok();
            let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
            ids.push(status.as_ref().and_then(|v| v.get("header").and_then(|h| field(h, "member_id"))));
            if leader.is_none() {
                leader = status.as_ref().and_then(|v| field(v, "leader"));
            }
        }
        let leader = leader?;
        ids.iter().position(|id| id.as_deref() == Some(leader.as_str()))
    }
}

/// A minimal HTTP/1.1 POST to a loopback etcd member, for its JSON gateway.
fn http_post_json(base: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    // The gateway may answer chunked: the JSON object is what lies between
    // the first '{' and the last '}'.
    let (start, end) = (json.find('{').context("no JSON")?, json.rfind('}').context("no JSON")?);
    Ok(serde_json::from_str(&json[start..=end])?)
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
