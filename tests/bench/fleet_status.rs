//! Fleet-status client for the benchmark (not part of CI):
//! `bash tests/bench/fleet_status.sh` runs this against `pgfleet serve`.
//!
//! Calls the coordinator's GetFleetStatus over mutual TLS: once cold (the
//! coordinator opens its channels to every agent), a few times to warm up,
//! then `--calls` times one after the other, and reports p50, p99 and max.
//! Every answer is checked, so a fast wrong answer cannot pass for a fast
//! one: every agent reachable, the expected number of nodes, a primary in
//! every cluster and no warnings (each replica matched to its primary's
//! pg_stat_replication row).
//!
//! ```text
//! bench-fleet-status --coordinator https://127.0.0.1:PORT --ca ca.crt \
//!     --cert reader.crt --key reader.key --expect-nodes 1000 [--calls 50] [--warmup 3] \
//!     [--cpu-of coordinator=PID --cpu-of agents=PID --clock-ticks 100] [--json]
//! ```
//!
//! `--cpu-of` reports the CPU time (user + system, from /proc/PID/stat, in
//! `--clock-ticks` per second: `getconf CLK_TCK`) each named process spent
//! per timed call: on one machine the coordinator and the agents share the
//! cores, so wall time alone does not say what the coordinator costs.
//!
//! A person reads the default output; the script reads `--json` (durations
//! in milliseconds).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use pgfleet_proto::coordinator::v1::{FleetStatus, GetFleetStatusRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A call that takes longer has failed the benchmark anyway; the limit only
/// keeps a stuck coordinator from hanging the script.
const CALL_DEADLINE: Duration = Duration::from_secs(120);
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Answers for a thousand nodes run near a megabyte; tonic's default limit
/// is 4 MiB.
const MAX_ANSWER_BYTES: usize = 64 << 20;

#[derive(Debug)]
struct Args {
    coordinator: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    expect_nodes: usize,
    calls: usize,
    warmup: usize,
    /// Processes whose CPU time per call is reported: (name, pid).
    cpu_of: Vec<(String, u32)>,
    clock_ticks: u64,
    json: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    const USAGE: &str = "usage: bench-fleet-status --coordinator URL --ca CA --cert CERT --key KEY \
                         --expect-nodes N [--calls K] [--warmup W] [--cpu-of NAME=PID]... \
                         [--clock-ticks N] [--json]";
    let (mut coordinator, mut ca, mut cert, mut key, mut expect_nodes) =
        (None, None, None, None, None);
    let (mut calls, mut warmup, mut json) = (50, 3, false);
    let (mut cpu_of, mut clock_ticks) = (Vec::new(), 100);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            json = true;
            continue;
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        let number = |v: &str| v.parse::<usize>().with_context(|| format!("{flag} {v}"));
        match flag.as_str() {
            "--coordinator" => coordinator = Some(value),
            "--ca" => ca = Some(PathBuf::from(value)),
            "--cert" => cert = Some(PathBuf::from(value)),
            "--key" => key = Some(PathBuf::from(value)),
            "--expect-nodes" => expect_nodes = Some(number(&value)?),
            "--calls" => calls = number(&value)?,
            "--warmup" => warmup = number(&value)?,
            "--clock-ticks" => clock_ticks = number(&value)? as u64,
            "--cpu-of" => {
                let (name, pid) = value
                    .split_once('=')
                    .with_context(|| format!("--cpu-of {value}: expected NAME=PID"))?;
                cpu_of.push((
                    name.to_owned(),
                    pid.parse().with_context(|| format!("--cpu-of {value}"))?,
                ));
            }
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    let missing = |what: &str| format!("{what} is missing; {USAGE}");
    if calls == 0 || clock_ticks == 0 {
        bail!("--calls and --clock-ticks must be at least 1");
    }
    Ok(Args {
        coordinator: coordinator.with_context(|| missing("--coordinator"))?,
        ca: ca.with_context(|| missing("--ca"))?,
        cert: cert.with_context(|| missing("--cert"))?,
        key: key.with_context(|| missing("--key"))?,
        expect_nodes: expect_nodes.with_context(|| missing("--expect-nodes"))?,
        calls,
        warmup,
        cpu_of,
        clock_ticks,
        json,
    })
}

async fn connect(a: &Args) -> anyhow::Result<CoordinatorClient<Channel>> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&a.ca)?))
        .identity(Identity::from_pem(read(&a.cert)?, read(&a.key)?));
    let channel = Endpoint::from_shared(a.coordinator.clone())?
        .tls_config(tls)?
        .connect_timeout(CONNECT_DEADLINE)
        .timeout(CALL_DEADLINE)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", a.coordinator))?;
    Ok(CoordinatorClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES))
}

/// The answer is what a healthy simulated fleet must give.
fn check(status: &FleetStatus, expect_nodes: usize) -> anyhow::Result<()> {
    let nodes: usize = status.clusters.iter().map(|c| c.nodes.len()).sum();
    if nodes != expect_nodes {
        bail!("the answer has {nodes} nodes, expected {expect_nodes}");
    }
    if !status.all_reachable {
        let unreachable: Vec<String> = status
            .clusters
            .iter()
            .flat_map(|c| &c.nodes)
            .filter(|n| !n.reachable)
            .take(5)
            .map(|n| format!("{}: {}", n.name, n.error.as_deref().unwrap_or("?")))
            .collect();
        bail!(
            "all_reachable is false; first unreachable nodes:\n  {}",
            unreachable.join("\n  ")
        );
    }
    for c in &status.clusters {
        if c.primary.is_none() {
            bail!("cluster {} has no primary in the answer", c.name);
        }
        if let Some(w) = c.warnings.first() {
            bail!("cluster {} has a warning: {w}", c.name);
        }
    }
    Ok(())
}

async fn timed_call(
    client: &mut CoordinatorClient<Channel>,
    expect_nodes: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let status = client
        .get_fleet_status(GetFleetStatusRequest::default())
        .await
        .context("GetFleetStatus")?
        .into_inner();
    let took = t.elapsed();
    check(&status, expect_nodes)?;
    Ok(took)
}

/// User + system CPU time of a process and its finished threads, in clock
/// ticks (/proc/PID/stat fields 14 and 15, counted after the command name,
/// which may itself hold spaces).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no command name in /proc/PID/stat")?;
    // after_name starts at field 3 (state); utime is field 14.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .context("/proc/PID/stat too short")?
            .parse()
            .context("/proc/PID/stat")
    };
    Ok(field(14)? + field(15)?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let mut client = connect(&a).await?;
    let first = timed_call(&mut client, a.expect_nodes)
        .await
        .context("the first (cold) call")?;
    for _ in 0..a.warmup {
        timed_call(&mut client, a.expect_nodes)
            .await
            .context("a warm-up call")?;
    }
    let cpu_before: Vec<u64> = a
        .cpu_of
        .iter()
        .map(|(_, pid)| cpu_ticks(*pid))
        .collect::<anyhow::Result<_>>()?;
    let mut took = Vec::with_capacity(a.calls);
    for i in 0..a.calls {
        took.push(
            timed_call(&mut client, a.expect_nodes)
                .await
                .with_context(|| format!("call {}", i + 1))?,
        );
    }
    // CPU milliseconds per timed call, per named process.
    let mut cpu_ms = serde_json::Map::new();
    for ((name, pid), before) in a.cpu_of.iter().zip(cpu_before) {
        let ticks = cpu_ticks(*pid)?.saturating_sub(before);
        let per_call = ticks as f64 * 1000.0 / a.clock_ticks as f64 / a.calls as f64;
        cpu_ms.insert(name.clone(), per_call.into());
    }
    took.sort();
    let (p50, p99, max) = (
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took[took.len() - 1],
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "nodes": a.expect_nodes,
                "calls": a.calls,
                "first_ms": ms(first),
                "p50_ms": ms(p50),
                "p99_ms": ms(p99),
                "max_ms": ms(max),
                "cpu_ms_per_call": cpu_ms,
            })
        );
    } else {
        println!(
            "GetFleetStatus over {} nodes, {} calls after {} warm-up: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             (first call, opening the channels: {:.1} ms)",
            a.expect_nodes,
            a.calls,
            a.warmup,
            ms(p50),
            ms(p99),
            ms(max),
            ms(first)
        );
        for (name, per_call) in &cpu_ms {
            println!("CPU time of {name} per call: {per_call:.1} ms");
        }
    }
    Ok(())
}
