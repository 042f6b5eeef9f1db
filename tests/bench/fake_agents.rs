//! Simulated agents for the fleet-status benchmark (not part of CI):
//! `bash tests/bench/fleet_status.sh` starts this.
//!
//! One process serves the real agent API (`pgfleet.agent.v1`, mutual TLS,
//! the caller's certificate checked and authorized as a real agent does) on
//! N loopback listeners, one per simulated node, so a coordinator can be
//! pointed at a thousand agents on a two-core machine without a thousand
//! PostgreSQL servers. One tonic server takes the connections of all
//! listeners; the port a connection arrived on says which node answers.
//!
//! The fleet these nodes form, shared with the script that writes the
//! inventory: node `i` is `n{i}` in cluster `c{i / 3}`; the first node of
//! each cluster is the primary, the other two stream from it through slots
//! named after them. GetStatus and GetReplication answer what a healthy
//! PostgreSQL 15 cluster would report (built once at start-up, so the
//! answers cost nothing: the benchmark measures the coordinator); every
//! other RPC is UNIMPLEMENTED.
//!
//! ```text
//! bench-fake-agents --agents 1000 --ca ca.crt --cert fake.crt --key fake.key --ports-file ports [--tcp-nodelay]
//! ```
//!
//! `--tcp-nodelay` sets TCP_NODELAY on accepted connections, as the real
//! agent does (agent/src/server.rs); without it, each answer waits for the
//! client's delayed ACK, which is what the flag's absence measures.
//!
//! Once every listener is bound, the ports file gets one port per line, in
//! node order (written aside and renamed, so a reader never sees half of
//! it). SIGTERM or SIGINT stops the process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::{Context, bail};
use pgfleet_proto::Lsn;
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::agent_server::{Agent, AgentServer};
use pgfleet_proto::auth;
use pgfleet_proto::identity::agent_method_access;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Nodes per cluster: one primary, two replicas.
const CLUSTER_SIZE: usize = 3;
/// Where every simulated cluster's WAL starts (a few segments in).
const BASE_LSN: u64 = 0x3_0000_0000;
/// Connections accepted but not yet taken by the server.
const ACCEPT_QUEUE: usize = 1024;

#[derive(Debug)]
struct Args {
    agents: usize,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ports_file: PathBuf,
    tcp_nodelay: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    const USAGE: &str = "usage: bench-fake-agents --agents N --ca CA --cert CERT --key KEY --ports-file PATH [--tcp-nodelay]";
    let mut agents = None;
    let (mut ca, mut cert, mut key, mut ports_file) = (None, None, None, None);
    let mut tcp_nodelay = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--tcp-nodelay" {
            tcp_nodelay = true;
            continue;
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--agents" => {
                agents = Some(value.parse().with_context(|| format!("--agents {value}"))?)
            }
            "--ca" => ca = Some(PathBuf::from(value)),
            "--cert" => cert = Some(PathBuf::from(value)),
            "--key" => key = Some(PathBuf::from(value)),
            "--ports-file" => ports_file = Some(PathBuf::from(value)),
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    let missing = |what: &str| format!("{what} is missing; {USAGE}");
    let args = Args {
        agents: agents.with_context(|| missing("--agents"))?,
        ca: ca.with_context(|| missing("--ca"))?,
        cert: cert.with_context(|| missing("--cert"))?,
        key: key.with_context(|| missing("--key"))?,
        ports_file: ports_file.with_context(|| missing("--ports-file"))?,
        tcp_nodelay,
    };
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    Ok(args)
}

/// What one simulated node answers.
#[derive(Debug)]
struct Node {
    status: pb::NodeStatus,
    replication: pb::ReplicationInfo,
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// The WAL sender pid a primary shows for replica `j`.
fn sender_pid(j: usize) -> i32 {
    i32::try_from(100_000 + j).unwrap_or(i32::MAX)
}

/// Node `i` of a fleet of `n`: a primary or one of its two replicas.
fn simulated_node(i: usize, n: usize) -> Node {
    let cluster = i / CLUSTER_SIZE;
    let primary = cluster * CLUSTER_SIZE;
    // Each cluster a little further along, each replica a little behind.
    let primary_lsn = Lsn(BASE_LSN + cluster as u64 * 0x10_0000 + 0x148);
    let replayed_lsn = |j: usize| Lsn(primary_lsn.0 - (j - primary) as u64 * 0x200);
    let mut status = pb::NodeStatus {
        server_up: true,
        service_detail: format!("pg_ctl: server is running (PID: {})", 20_000 + i),
        service_backend: "pg_ctl".into(),
        timeline: Some(1),
        // Decimal, as pg_control_system() reports it; one per cluster.
        system_identifier: Some((7_300_000_000_000_000_000u64 + cluster as u64).to_string()),
        postgres_version: Some("15.18 (Debian 15.18-0+deb12u1)".into()),
        postgres_version_num: Some(150_018),
        data_directory: "/var/lib/postgresql/15/main".into(),
        disk_free_bytes: Some(40 << 30),
        disk_total_bytes: Some(100 << 30),
        agent_version: format!("{} (simulated)", env!("CARGO_PKG_VERSION")),
        hostname: format!("fake-{}", node_name(i)),
        ..Default::default()
    };
    status.set_service_state(pb::ServiceState::Running);
    let replicas: Vec<usize> = (primary + 1..primary + CLUSTER_SIZE)
        .filter(|&j| j < n)
        .collect();
    if i == primary {
        status.set_role(pb::Role::Primary);
        status.current_lsn = Some(primary_lsn.to_string());
        status.cluster_state = Some("in production".into());
        let standbys = replicas
            .iter()
            .map(|&j| {
                let replay = replayed_lsn(j);
                pb::StandbyConnection {
                    pid: sender_pid(j),
                    application_name: node_name(j),
                    client_addr: Some("127.0.0.1".into()),
                    usename: "pgfleet_replication".into(),
                    state: "streaming".into(),
                    sent_lsn: Some(primary_lsn.to_string()),
                    write_lsn: Some(primary_lsn.to_string()),
                    flush_lsn: Some(primary_lsn.to_string()),
                    replay_lsn: Some(replay.to_string()),
                    replay_lag_bytes: Some(primary_lsn.bytes_since(replay)),
                    total_lag_bytes: Some(primary_lsn.bytes_since(replay)),
                    write_lag_seconds: Some(0.000_4),
                    flush_lag_seconds: Some(0.000_9),
                    replay_lag_seconds: Some(0.001_2),
                    sync_state: "async".into(),
                    sync_priority: 0,
                }
            })
            .collect();
        let slots = replicas
            .iter()
            .map(|&j| pb::ReplicationSlot {
                slot_name: node_name(j),
                slot_type: "physical".into(),
                active: true,
                active_pid: Some(sender_pid(j)),
                restart_lsn: Some(replayed_lsn(j).to_string()),
                retained_wal_bytes: Some(primary_lsn.bytes_since(replayed_lsn(j))),
                wal_status: Some("reserved".into()),
                ..Default::default()
            })
            .collect();
        Node {
            status,
            replication: pb::ReplicationInfo {
                in_recovery: false,
                standbys,
                slots,
            },
        }
    } else {
        status.set_role(pb::Role::Replica);
        status.received_lsn = Some(primary_lsn.to_string());
        status.replayed_lsn = Some(replayed_lsn(i).to_string());
        status.replay_delay_seconds = Some(0.05);
        status.cluster_state = Some("in archive recovery".into());
        status.wal_receiver = Some(pb::WalReceiver {
            status: "streaming".into(),
            sender_host: Some("127.0.0.1".into()),
            sender_port: Some(5432),
            slot_name: Some(node_name(i)),
            received_timeline: Some(1),
        });
        Node {
            status,
            replication: pb::ReplicationInfo {
                in_recovery: true,
                standbys: Vec::new(),
                slots: Vec::new(),
            },
        }
    }
}

#[derive(Debug)]
struct FakeAgents {
    /// Listening port → the node it serves.
    by_port: HashMap<u16, usize>,
    nodes: Vec<Node>,
}

impl FakeAgents {
    /// Authorizes the caller as a real agent does (the verified client
    /// certificate's role) and finds the node the connection came in for.
    fn node<T>(&self, req: &Request<T>, method: &'static str) -> Result<&Node, Status> {
        let caller = auth::caller_of(req, true)?;
        auth::authorize(&caller, method, agent_method_access(method))?;
        let port = req
            .local_addr()
            .ok_or_else(|| Status::internal("no local address on this connection"))?
            .port();
        self.by_port
            .get(&port)
            .map(|&i| &self.nodes[i])
            .ok_or_else(|| Status::internal(format!("no simulated node on port {port}")))
    }
}

fn simulated<T>(method: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{method}: this is a simulated agent for the fleet-status benchmark"
    )))
}

type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for FakeAgents {
    type WatchJobStream = WatchJobStream;

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.node(&req, "GetStatus")?.status.clone()))
    }

    async fn get_replication(
        &self,
        req: Request<pb::GetReplicationRequest>,
    ) -> Result<Response<pb::ReplicationInfo>, Status> {
        Ok(Response::new(
            self.node(&req, "GetReplication")?.replication.clone(),
        ))
    }

    async fn get_wal(
        &self,
        _: Request<pb::GetWalRequest>,
    ) -> Result<Response<pb::WalInfo>, Status> {
        simulated("GetWal")
    }

    async fn drop_slot(
        &self,
        _: Request<pb::DropSlotRequest>,
    ) -> Result<Response<pb::DropSlotResponse>, Status> {
        simulated("DropSlot")
    }

    async fn prepare_upstream(
        &self,
        _: Request<pb::PrepareUpstreamRequest>,
    ) -> Result<Response<pb::PrepareUpstreamResponse>, Status> {
        simulated("PrepareUpstream")
    }

    async fn start_rebuild(
        &self,
        _: Request<pb::StartRebuildRequest>,
    ) -> Result<Response<pb::StartRebuildResponse>, Status> {
        simulated("StartRebuild")
    }

    async fn watch_job(
        &self,
        _: Request<pb::WatchJobRequest>,
    ) -> Result<Response<WatchJobStream>, Status> {
        simulated("WatchJob")
    }

    async fn get_settings(
        &self,
        _: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::Settings>, Status> {
        simulated("GetSettings")
    }

    async fn set_synchronous_standbys(
        &self,
        _: Request<pb::SetSynchronousStandbysRequest>,
    ) -> Result<Response<pb::SetSynchronousStandbysResponse>, Status> {
        simulated("SetSynchronousStandbys")
    }

    async fn configure_standby(
        &self,
        _: Request<pb::ConfigureStandbyRequest>,
    ) -> Result<Response<pb::ConfigureStandbyResponse>, Status> {
        simulated("ConfigureStandby")
    }

    async fn fence(
        &self,
        _: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        simulated("Fence")
    }

    async fn unfence(
        &self,
        _: Request<pb::UnfenceRequest>,
    ) -> Result<Response<pb::UnfenceResponse>, Status> {
        simulated("Unfence")
    }

    async fn promote(
        &self,
        _: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        simulated("Promote")
    }

    async fn create_slot(
        &self,
        _: Request<pb::CreateSlotRequest>,
    ) -> Result<Response<pb::CreateSlotResponse>, Status> {
        simulated("CreateSlot")
    }

    async fn rewind(
        &self,
        _: Request<pb::RewindRequest>,
    ) -> Result<Response<pb::RewindResponse>, Status> {
        simulated("Rewind")
    }

    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        simulated("Probe")
    }

    async fn start_crashed(
        &self,
        _: Request<pb::StartCrashedRequest>,
    ) -> Result<Response<pb::StartCrashedResponse>, Status> {
        simulated("StartCrashed")
    }

    async fn hold_lease(
        &self,
        _: Request<pb::HoldLeaseRequest>,
    ) -> Result<Response<pb::HoldLeaseResponse>, Status> {
        simulated("HoldLease")
    }

    async fn enable_slot_sync(
        &self,
        _: Request<pb::EnableSlotSyncRequest>,
    ) -> Result<Response<pb::EnableSlotSyncResponse>, Status> {
        simulated("EnableSlotSync")
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let tls = pgfleet_proto::tls::server_tls(&pgfleet_proto::tls::ServerTlsFiles {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    })?;

    let mut listeners = Vec::with_capacity(args.agents);
    let mut by_port = HashMap::with_capacity(args.agents);
    for i in 0..args.agents {
        let l = TcpListener::bind("127.0.0.1:0").await.with_context(|| {
            format!("binding listener {i} of {} (raise ulimit -n?)", args.agents)
        })?;
        by_port.insert(l.local_addr()?.port(), i);
        listeners.push(l);
    }
    let agents = FakeAgents {
        by_port,
        nodes: (0..args.agents)
            .map(|i| simulated_node(i, args.agents))
            .collect(),
    };

    // Every listener feeds one queue; the one server reads it.
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_QUEUE);
    let mut ports = String::new();
    for l in listeners {
        ports += &format!("{}\n", l.local_addr()?.port());
        let tx = tx.clone();
        let nodelay = args.tcp_nodelay;
        tokio::spawn(async move {
            loop {
                let stream = match l.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, most likely: say so, keep serving.
                        eprintln!("accept on {:?}: {e}", l.local_addr());
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if nodelay && let Err(e) = stream.set_nodelay(true) {
                    eprintln!("TCP_NODELAY on {:?}: {e}", stream.local_addr());
                }
                if tx.send(Ok::<_, std::io::Error>(stream)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let aside = args.ports_file.with_extension("partial");
    std::fs::write(&aside, ports).with_context(|| format!("writing {}", aside.display()))?;
    std::fs::rename(&aside, &args.ports_file).with_context(|| {
        format!(
            "renaming {} to {}",
            aside.display(),
            args.ports_file.display()
        )
    })?;
    eprintln!(
        "bench-fake-agents: {} simulated agents listening",
        args.agents
    );

    tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(AgentServer::new(agents))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), async {
            if let Err(e) = stop_signal().await {
                eprintln!("cannot wait for signals: {e}");
                std::future::pending::<()>().await;
            }
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_lists_a_standby_and_slot_for_each_replica() {
        let primary = simulated_node(3, 1000);
        assert_eq!(primary.status.role(), pb::Role::Primary);
        let names: Vec<_> = primary
            .replication
            .standbys
            .iter()
            .map(|s| s.application_name.as_str())
            .collect();
        assert_eq!(names, ["n4", "n5"]);
        let replica = simulated_node(5, 1000);
        assert_eq!(replica.status.role(), pb::Role::Replica);
        let slot = &primary.replication.slots[1];
        assert_eq!(
            Some(slot.slot_name.as_str()),
            replica
                .status
                .wal_receiver
                .as_ref()
                .and_then(|w| w.slot_name.as_deref())
        );
        assert_eq!(slot.active_pid, Some(primary.replication.standbys[1].pid));
        assert_eq!(
            replica.status.system_identifier,
            primary.status.system_identifier
        );
        // A last cluster of one node: a primary with no standbys.
        assert!(simulated_node(999, 1000).replication.standbys.is_empty());
    }
}
