//! Status benchmark (not part of CI): `bash tests/bench/status.sh`.
//!
//! On 127.0.0.1, one real PostgreSQL 15 and real `pgfleet-agent` processes:
//! - GetStatus latency p50/p99 and requests/s against one agent with 1, 16
//!   and 128 concurrent clients (each its own connection), next to the same
//!   status SQL sent straight to PostgreSQL by the same number of clients:
//!   the baseline, measured in the same run;
//! - `pgfleet status` wall time over 1, 10 and 100 agents, next to a shell
//!   loop of `psql -c` over the same servers (what a DBA runs by hand);
//! - the agent's idle RSS.
//!
//! All agents watch the same PostgreSQL: the point is the agent and the
//! coordinator, not the server. Run as root (servers and agents then run as
//! `postgres`) or as a normal user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgfleet_proto::agent::v1::GetStatusRequest;
use pgfleet_proto::agent::v1::agent_client::AgentClient;

const PG_PORT: u16 = 56432;
const AGENT_BASE_PORT: u16 = 17500;
const BIN: &str = "/usr/lib/postgresql/15/bin";
const REQUESTS_PER_LEVEL: usize = 12_800;
const CLI_RUNS: usize = 5;

struct Fleet {
    dir: PathBuf,
    agents: Vec<Child>,
    pg_started: bool,
    ids: Option<(u32, u32)>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        if self.pg_started {
            let _ = self
                .cmd(&format!("{BIN}/pg_ctl"))
                .args(["-D"])
                .arg(self.dir.join("data"))
                .args(["stop", "-m", "immediate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fleet {
    /// A command run as postgres when we are root.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        if let Some((uid, gid)) = self.ids {
            c.uid(uid).gid(gid);
        }
        c.env_clear().env("PATH", "/usr/bin:/bin").env("LANG", "C");
        c
    }

    fn run(&self, c: &mut Command) -> anyhow::Result<()> {
        let out = c.output().with_context(|| format!("{c:?}"))?;
        if !out.status.success() {
            bail!(
                "{c:?} failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe has no parent")?.to_owned();
    if !dir.join("pgfleet-agent").exists() {
        bail!("pgfleet-agent not next to {}: build with cargo build --release --workspace --bins", exe.display());
    }
    Ok(dir)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct LoadResult {
    p50: Duration,
    p99: Duration,
    rps: f64,
}

async fn load<F, Fut>(clients: usize, per_client: usize, make: F) -> anyhow::Result<LoadResult>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Box<dyn FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>> + Send>>>,
{
    let mut callers = Vec::new();
    for _ in 0..clients {
        callers.push(make().await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut call| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    call().await?;
                    lat.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = start.elapsed();
    all.sort();
    Ok(LoadResult {
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        rps: all.len() as f64 / wall.as_secs_f64(),
    })
}

const STATUS_SQL: &str = "SELECT pg_is_in_recovery(), current_setting('server_version'), \
     (SELECT system_identifier::text FROM pg_control_system()), pg_current_wal_lsn()::text";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let root = nix::unistd::geteuid().is_root();
    let ids = if root {
        let u = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
        Some((u.uid.as_raw(), u.gid.as_raw()))
    } else {
        None
    };
    let dir = PathBuf::from(format!("/tmp/pgfleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if let Some((uid, gid)) = ids {
        nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into()))?;
    }
    let mut fleet = Fleet {
        dir: dir.clone(),
        agents: Vec::new(),
        pg_started: false,
        ids,
    };
    let data = dir.join("data");
    let opts = format!(
        "-c listen_addresses=127.0.0.1 -c port={PG_PORT} -c unix_socket_directories={} -c max_connections=300",
        dir.display()
    );
    eprintln!("starting PostgreSQL on 127.0.0.1:{PG_PORT}");
    fleet.run(
        fleet
            .cmd(&format!("{BIN}/initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null()),
    )?;
    fleet.run(
        fleet
            .cmd(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("pg.log"))
            .args(["-o", &opts, "-w", "start"])
            .stdout(Stdio::null()),
    )?;
    fleet.pg_started = true;

    // 100 agents, each its own process and port, all on that server.
    const AGENTS: usize = 100;
    eprintln!("starting {AGENTS} agents");
    let mut inventory = String::new();
    for i in 0..AGENTS {
        let port = AGENT_BASE_PORT + i as u16;
        let cfg = dir.join(format!("agent{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\ninsecure = true\n[postgres]\nbin_dir = \"{BIN}\"\n\
                 data_dir = \"{}\"\nsocket_dir = \"{}\"\nport = {PG_PORT}\n[service]\nbackend = \"pg_ctl\"\n\
                 log_file = \"{}\"\n",
                data.display(),
                dir.display(),
                dir.join("pg.log").display()
            ),
        )?;
        inventory += &format!(
            "[[clusters]]\nname = \"c{i}\"\n[[clusters.nodes]]\nname = \"n{i}\"\n\
             agent = \"http://127.0.0.1:{port}\"\nhost = \"127.0.0.1\"\nport = {PG_PORT}\n"
        );
        let child = fleet
            .cmd(bins.join("pgfleet-agent").to_str().context("path")?)
            .arg("--config")
            .arg(&cfg)
            .env("PGFLEET_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        fleet.agents.push(child);
    }
    // Wait for every agent to answer (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..AGENTS {
        let url = format!("http://127.0.0.1:{}", AGENT_BASE_PORT + i as u16);
        loop {
            if let Ok(mut c) = AgentClient::connect(url.clone()).await
                && c.get_status(GetStatusRequest::default()).await.is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("agent {i} did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(fleet.agents[0].id())?;
    // Agent 99 was only asked once at start-up: closest to idle.
    let idle_rss_untouched = rss_kib(fleet.agents[AGENTS - 1].id())?;

    println!("\n## GetStatus against one agent ({REQUESTS_PER_LEVEL} requests per level)\n");
    println!(
        "Snapshot: the default answer (at most 500 ms old, the agent's snapshot interval); fresh read: `fresh: true`, a read of the server begun after the call \
         (shared by concurrent fresh callers); direct SQL: the status query \
         straight to PostgreSQL.\n"
    );
    println!("| clients | snapshot p50 | snapshot p99 | snapshot req/s | oldest answer | fresh p50 | fresh p99 | fresh req/s | direct SQL p50 | direct SQL req/s | snapshot/fresh req/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let url = format!("http://127.0.0.1:{AGENT_BASE_PORT}");
    for clients in [1usize, 16, 128] {
        let per = REQUESTS_PER_LEVEL / clients;
        let oldest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let agent_load = async |fresh: bool| {
            let u = url.clone();
            let oldest = oldest.clone();
            load(clients, per, move || {
                let u = u.clone();
                let oldest = oldest.clone();
                async move {
                    let c = AgentClient::connect(u).await?;
                    Ok(Box::new(move || {
                        let mut c = c.clone();
                        let oldest = oldest.clone();
                        Box::pin(async move {
                            let st = c.get_status(GetStatusRequest { fresh }).await?.into_inner();
                            oldest.fetch_max(st.snapshot_age_ms, std::sync::atomic::Ordering::Relaxed);
                            Ok(())
                        }) as std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>
                    }) as Box<dyn FnMut() -> _ + Send>)
                }
            })
            .await
        };
        let snapshot = agent_load(false).await?;
        let oldest_ms = oldest.load(std::sync::atomic::Ordering::Relaxed);
        let fresh = agent_load(true).await?;
        let direct = load(clients, per, || async {
            let (client, conn) = tokio_postgres::connect(
                &format!("host=127.0.0.1 port={PG_PORT} user=postgres dbname=postgres"),
                tokio_postgres::NoTls,
            )
            .await?;
            tokio::spawn(conn);
            let client = std::sync::Arc::new(client);
            Ok(Box::new(move || {
                let c = client.clone();
                Box::pin(async move {
                    c.query_one(STATUS_SQL, &[]).await?;
                    Ok(())
                }) as std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>
            }) as Box<dyn FnMut() -> _ + Send>)
        })
        .await?;
        println!(
            "| {clients} | {} | {} | {:.0} | {oldest_ms} ms | {} | {} | {:.0} | {} | {:.0} | {:.1}x |",
            ms(snapshot.p50),
            ms(snapshot.p99),
            snapshot.rps,
            ms(fresh.p50),
            ms(fresh.p99),
            fresh.rps,
            ms(direct.p50),
            direct.rps,
            snapshot.rps / fresh.rps
        );
    }
    let loaded_rss = rss_kib(fleet.agents[0].id())?;

    println!("\n## `pgfleet status` wall time (median of {CLI_RUNS})\n");
    println!("| agents | pgfleet status | psql loop (baseline) | ratio |");
    println!("|---|---|---|---|");
    for n in [1usize, 10, 100] {
        let inv_path = dir.join(format!("inventory{n}.toml"));
        let inv: String = inventory
            .split("[[clusters]]")
            .filter(|s| !s.is_empty())
            .take(n)
            .map(|s| format!("[[clusters]]{s}"))
            .collect();
        std::fs::write(&inv_path, inv)?;
        let ours = median_of(CLI_RUNS, || {
            let out = Command::new(bins.join("pgfleet"))
                .arg("--inventory")
                .arg(&inv_path)
                .args(["status", "--json"])
                .stdout(Stdio::null())
                .status()?;
            if !out.success() {
                bail!("pgfleet status failed: {out}");
            }
            Ok(())
        })?;
        let baseline = median_of(CLI_RUNS, || {
            for _ in 0..n {
                let out = Command::new("/usr/bin/psql")
                    .args(["-h", "127.0.0.1", "-p", &PG_PORT.to_string(), "-U", "postgres", "-Atc", STATUS_SQL])
                    .stdout(Stdio::null())
                    .status()?;
                if !out.success() {
                    bail!("psql failed");
                }
            }
            Ok(())
        })?;
        println!(
            "| {n} | {} | {} | {:.2}x |",
            ms(ours),
            ms(baseline),
            ours.as_secs_f64() / baseline.as_secs_f64()
        );
    }

    println!("\n## Agent memory\n");
    println!("| agent | RSS |");
    println!("|---|---|");
    println!("| idle, after one status call | {} KiB |", idle_rss_untouched);
    println!("| idle, after start-up checks | {} KiB |", idle_rss);
    println!("| after the load above | {} KiB |", loaded_rss);
    let _ = Path::new("");
    drop(fleet);
    Ok(())
}

fn median_of(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v[v.len() / 2])
}
