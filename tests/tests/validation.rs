//! Hostile and malformed values through both doors: the agents' RPCs and
//! `pgfleet serve` refuse them with INVALID_ARGUMENT, name what is wrong,
//! echo at most 80 escaped characters, and change nothing (checked in
//! PostgreSQL, pg_hba.conf and the agent's log and audit lines).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{error_of, exec, one, pgfleet, start_agents, start_primary};
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_proto::coordinator::v1 as cpb;
use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use pgfleet_tests::TestFleet;
use tonic::Code;

fn prepare(role: &str, address: &str) -> pb::PrepareUpstreamRequest {
    pb::PrepareUpstreamRequest {
        replication_role: role.into(),
        replication_password: "irrelevant".into(),
        replica_address: address.into(),
        slot_name: "node1".into(),
        dry_run: false,
        operation_id: "validation-test".into(),
        for_rewind: false,
        replica_name: "node1".into(),
        replica_streams_through_slot: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_malformed_calls_and_changes_nothing() {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let p = fleet.host(0);
    let mut agent = AgentClient::new(p.agent_channel().await.unwrap());
    exec(p, "create role sneaky superuser login password 'before'").await;
    let sneaky_before = one(p, "select rolpassword from pg_authid where rolname = 'sneaky'").await;
    let hba_before = std::fs::read_to_string(p.hba_path()).unwrap();
    exec(p, "alter system set synchronous_standby_names = 'ANY 1 (node1)'").await;
    exec(p, "select pg_reload_conf()").await;

    // Probe: one host's address and a TCP port, or INVALID_ARGUMENT; a
    // reader may not make the agent connect out.
    for (address, port) in [("0.0.0.0", 5432), ("255.255.255.255", 5432), ("node0", 5432), ("127.0.0.1", 0), ("127.0.0.1", 70000)] {
        let e = agent.probe(pb::ProbeRequest { address: address.into(), port }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{address}:{port}: {e:?}");
    }
    let probed = agent.probe(pb::ProbeRequest { address: p.addr().to_string(), port: 5432 }).await.unwrap().into_inner();
    assert!(probed.reachable, "{probed:?}");
    let mut reader = AgentClient::new(p.agent_channel_as("test-reader").await.unwrap());
    let e = reader.probe(pb::ProbeRequest { address: p.addr().to_string(), port: 5432 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A SetSynchronousStandbys without its config is malformed, not "off".
    let e = agent
        .set_synchronous_standbys(pb::SetSynchronousStandbysRequest { config: None, operation_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("config"), "{e:?}");
    let many = pb::SyncConfig { method: "first".into(), num_sync: 1, names: (0..1000).map(|i| format!("n{i}")).collect() };
    let e = agent
        .set_synchronous_standbys(pb::SetSynchronousStandbysRequest { config: Some(many), operation_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(one(p, "show synchronous_standby_names").await, "ANY 1 (node1)");

    // Never the superuser, a predefined role or a role that is a superuser;
    // an address is one host.
    for (role, address) in [
        ("postgres", "198.18.0.3"),
        ("pg_monitor", "198.18.0.3"),
        ("sneaky", "198.18.0.3"),
        ("pgfleet_replication", "0.0.0.0"),
        ("pgfleet_replication", "255.255.255.255"),
        ("pgfleet_replication", "::ffff:0.0.0.0"),
        ("pgfleet_replication", "::"),
        ("pgfleet_replication", "224.0.0.1"),
    ] {
        let e = agent.prepare_upstream(prepare(role, address)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{role} {address}: {e:?}");
    }
    assert_eq!(std::fs::read_to_string(p.hba_path()).unwrap(), hba_before);
    assert_eq!(one(p, "select rolpassword from pg_authid where rolname = 'sneaky'").await, sneaky_before);
    assert_eq!(one(p, "select count(*) from pg_roles where rolname = 'pgfleet_replication'").await, "0");

    // An operation id is checked before anything: no forged log line.
    let e = agent
        .create_slot(pb::CreateSlotRequest { slot_name: "forged".into(), operation_id: "op\nFORGED LINE".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(one(p, "select count(*) from pg_replication_slots").await, "0");
    let log = std::fs::read_to_string(p.agent_log()).unwrap();
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");

    // A 3 MB slot name is INVALID_ARGUMENT with a short message, and a short
    // audit line.
    let huge = "x".repeat(3 * 1024 * 1024);
    let e = agent
        .drop_slot(pb::DropSlotRequest { slot_name: huge.clone(), force: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 400, "{} bytes of message", e.message().len());
    let audit = std::fs::read_to_string(p.dir().join("audit.jsonl")).unwrap();
    let last = audit.lines().last().unwrap();
    assert!(last.len() < 1000, "an audit line of {} bytes", last.len());
    // Unfence of a node that was never fenced: refused, audited as refused,
    // the server untouched.
    let started = one(p, "select pg_postmaster_start_time()::text").await;
    let e = agent.unfence(pb::UnfenceRequest { operation_id: "never-fenced".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no fence to undo"), "{e:?}");
    let audit = std::fs::read_to_string(p.dir().join("audit.jsonl")).unwrap();
    let last = audit.lines().last().unwrap();
    assert!(last.contains("Unfence") && !last.contains("\"ok\""), "{last}");
    assert_eq!(one(p, "select pg_postmaster_start_time()::text").await, started);
    exec(p, "alter system reset synchronous_standby_names").await;
    exec(p, "select pg_reload_conf()").await;

    // The CLI's smaller refusals: exit 2 (bad input) or 1 (refused), nothing made.
    let out = pgfleet(&fleet, &["--timeout", "0s", "status"]);
    assert_eq!(out.code(), Some(2), "{out}");
    let pki = fleet.pki_dir().display().to_string();
    let out = pgfleet(&fleet, &["certs", "issue", "--dir", &pki, "--role", "agent", "odd", "--san", "x,IP:0.0.0.0"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(!fleet.pki_dir().join("odd.crt").exists());
    let out = pgfleet(&fleet, &["rebuild", "node1", "--tablespace-mapping", "/a=/b\nEVIL", "--dry-run"]);
    assert_eq!(out.code(), Some(2), "{out}");
    // Another node's slot is refused by name: its holder may share the
    // rebuilt node's address.
    let out = pgfleet(&fleet, &["rebuild", "node1", "--slot", "node0", "--dry-run"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("it is node0's slot"), "{out}");
    let out = pgfleet(&fleet, &["slots", "drop", "node0", "nosuchslot", "--dry-run"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no replication slot named nosuchslot"), "{out}");

    // StartCrashed (restart in place) starts only a primary that crashed:
    // not a running server, not one stopped on purpose, not a fenced one;
    // a bad operation id or a reader is refused before anything.
    let crashed = |id: &str| pb::StartCrashedRequest { operation_id: id.into() };
    let e = agent.start_crashed(crashed("op\nFORGED")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = reader.start_crashed(crashed("restart-test")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = agent.start_crashed(crashed("restart-test")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("PostgreSQL runs"), "{e:?}");
    p.stop_postgres().unwrap();
    let e = agent.start_crashed(crashed("restart-test")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"shut down\""), "{e:?}");
    std::fs::write(p.data_dir().join("standby.signal"), "").unwrap();
    let e = agent.start_crashed(crashed("restart-test")).await.unwrap_err();
    assert!(e.message().contains("standby.signal"), "{e:?}");
    std::fs::remove_file(p.data_dir().join("standby.signal")).unwrap();
    assert!(p.postmaster_pid().unwrap().is_none(), "a refused StartCrashed started the server");
    // What it is for: a primary whose postmaster died.
    p.start_postgres().unwrap();
    p.kill_postgres().unwrap();
    agent.start_crashed(crashed("restart-test")).await.unwrap();
    assert_eq!(one(p, "select pg_is_in_recovery()").await, "f");
}

/// node0 primary, node1 rebuilt from it by pgfleet, `pgfleet serve` up.
fn primary_replica_and_service() -> (TestFleet, pgfleet_tests::Coordinator) {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let out = pgfleet(&fleet, &["rebuild", "node1", "--no-progress-bar"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let c = fleet.start_coordinator().unwrap();
    (fleet, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_refuses_what_the_cli_refuses() {
    let (fleet, c) = primary_replica_and_service();
    let primary = fleet.host(0);

    // The CLI's refusal, in-process and through the service: exit 2 both.
    let local = pgfleet(&fleet, &["sync", "set", "--num", "0", "node1"]);
    assert_eq!(local.code(), Some(2), "{local}");
    let remote = pgfleet(&fleet, &["--coordinator", c.url.as_str(), "sync", "set", "--num", "0", "node1"]);
    assert_eq!(remote.code(), Some(2), "{remote}");
    assert_eq!(one(primary, "show synchronous_standby_names").await, "");

    let mut api = CoordinatorClient::new(c.channel_as(&fleet.pki_dir(), "test-admin").await.unwrap());
    let sync = |standbys: &[&str], method: i32, num_sync: u32, off: bool| cpb::SetSyncRequest {
        cluster: String::new(),
        standbys: standbys.iter().map(|s| s.to_string()).collect(),
        method,
        num_sync,
        off,
        dry_run: false,
    };
    for (what, req) in [
        ("num_sync 0", sync(&["node1"], 1, 0, false)),
        ("method 99", sync(&["node1"], 99, 1, false)),
        ("off with standbys", sync(&["node1"], 0, 0, true)),
    ] {
        let e = api.set_sync(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    assert_eq!(one(primary, "show synchronous_standby_names").await, "");

    let before = one(fleet.host(1), "select pg_postmaster_start_time()::text").await;
    let e = api
        .rebuild(cpb::RebuildRequest { node: "node1".into(), all_replicas_of: "main".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(one(fleet.host(1), "select pg_postmaster_start_time()::text").await, before);

    // Issue #12 item 5, the agent's side: node1 streams through slot node1.
    // Another instance on node1's address (Debian runs several clusters on
    // one host) is not its holder: the slot is refused, not planned for a
    // drop. Only the node streaming under its own name is.
    let mut agent = AgentClient::new(primary.agent_channel().await.unwrap());
    let claim = |name: &str| pb::PrepareUpstreamRequest {
        replica_address: fleet.host(1).addr().to_string(),
        replica_name: name.into(),
        dry_run: true,
        ..prepare("pgfleet_replication", "0.0.0.0")
    };
    for name in ["node2", ""] {
        let e = agent.prepare_upstream(claim(name)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{name:?}: {e:?}");
        assert!(e.message().contains("application_name \"node1\""), "{e:?}");
    }
    let own = agent.prepare_upstream(claim("node1")).await.unwrap().into_inner();
    assert!(own.slot_held_by_replica, "{own:?}");
    assert_eq!(one(primary, "select count(*) from pg_replication_slots where slot_name = 'node1' and active").await, "1");

    // An operation id that is not one is refused, not echoed raw (a newline
    // in a status or a log line forges a line): through the API and the CLI.
    let forged = "sync-1\nFORGED";
    let e = api.get_operation(cpb::GetOperationRequest { operation_id: forged.into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!e.message().contains('\n'), "{e:?}");
    let e = api.cancel_operation(cpb::CancelOperationRequest { operation_id: forged.into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for args in [["ops", "show", forged], ["ops", "abort", forged]] {
        let out = pgfleet(&fleet, &args);
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(!out.stderr.contains("\nFORGED"), "{out}");
    }

    // --all-replicas without --cluster through the service: the only cluster.
    let out = pgfleet(&fleet, &["--coordinator", c.url.as_str(), "rebuild", "--all-replicas", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out}");

    // Watching a finished operation from past its end ends at once.
    let out = pgfleet(&fleet, &["--coordinator", c.url.as_str(), "sync", "set", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let list = api.list_operations(cpb::ListOperationsRequest::default()).await.unwrap().into_inner();
    let id = list.operations.first().unwrap().id.clone();
    // Its answer is typed: the API gives the value, the CLI renders text.
    let mut events = api
        .watch_operation(cpb::WatchOperationRequest { operation_id: id.clone(), from_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut answer = None;
    while let Some(ev) = events.message().await.unwrap() {
        if let Some(cpb::operation_event::Event::Finished(f)) = ev.event {
            answer = Some(serde_json::from_str::<serde_json::Value>(&f.json).unwrap());
        }
    }
    let answer = answer.expect("no Finished event");
    assert_eq!(answer["answer"], "sync", "{answer:#}");
    assert_eq!(answer["primary"], "node0", "{answer:#}");
    assert_eq!(answer["synchronous_standby_names"], r#"FIRST 1 ("node1")"#, "{answer:#}");
    let watch = async {
        let mut s = api
            .watch_operation(cpb::WatchOperationRequest { operation_id: id, from_seq: 1000 })
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
    };
    tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("WatchOperation from past the end of a finished operation never ended");
}

/// Both doors, one check: every bad-input refusal the suite makes of an
/// operation command, run in-process and through `pgfleet serve` (the CLI
/// with --coordinator sends the API message, which the service validates):
/// the same exit code 2 and the same message, and nothing changed. Then the
/// refusals the fleet's state causes (a primary to rebuild, a failover of a
/// live primary, an active slot): the same code and message both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cli_refusal_is_the_same_through_the_service() {
    let (fleet, c) = primary_replica_and_service();
    let (primary, standby) = (fleet.host(0), fleet.host(1));
    let before = (
        one(primary, "show synchronous_standby_names").await,
        one(standby, "select pg_postmaster_start_time()::text").await,
        one(primary, "select string_agg(slot_name, ',' order by slot_name) from pg_replication_slots").await,
    );
    let long = "a".repeat(64);
    let refusals: Vec<Vec<&str>> = vec![
        vec!["switchover", "--to", "node9"],
        vec!["switchover", "--cluster", "Main"],
        vec!["failover", "--to", "node9"],
        vec!["rejoin", "node9"],
        vec!["rejoin", "Node1"],
        vec!["restart", "node9"],
        vec!["restart", "Node0", "--dry-run"],
        vec!["sync", "set", "node1", "node9"],
        vec!["sync", "set", "--num", "3", "node1"],
        vec!["sync", "set", "--num", "0", "node1"],
        vec!["sync", "set", "node1", "node1"],
        vec!["sync", "set"],
        vec!["sync", "set", "--off", "node1"],
        vec!["sync", "set", "x\"); drop table t; --"],
        vec!["sync", "set", "Node0"],
        vec!["rebuild", "nosuchnode"],
        vec!["rebuild", "node1", "--slot", "x'); drop table t; --"],
        vec!["rebuild", "node1", "--slot", "R1"],
        vec!["rebuild", "node1", "--slot", "node0", "--dry-run"],
        vec!["rebuild", "node1", "--tablespace-mapping", "relative=/x"],
        vec!["rebuild", "node1", "--tablespace-mapping", "/a=/b=/c"],
        vec!["rebuild", "node1", "--tablespace-mapping", "/a/../etc=/x"],
        vec!["rebuild", "node1", "--tablespace-mapping", "/a=/b\nEVIL", "--dry-run"],
        vec!["rebuild", "node1", "--from", "node1"],
        vec!["rebuild", "node1", "--from", "nosuch"],
        vec!["slots", "drop", "node0", "R1"],
        vec!["slots", "drop", "node0", "a-b", "--force"],
        vec!["slots", "drop", "node0", &long, "--dry-run"],
        vec!["slots", "drop", "node0", ""],
        vec!["slots", "drop", "nodex", "r1"],
        vec!["pause", "--reason", "upgrade\nEVIL"],
        vec!["pause", "Main"],
        vec!["pause", "nosuchcluster"],
        vec!["resume", "nosuchcluster", "--dry-run"],
        vec!["failover-policy", "manual", "nosuchcluster"],
    ];
    for args in &refusals {
        let local = pgfleet(&fleet, args);
        let mut through = vec!["--coordinator", c.url.as_str()];
        through.extend_from_slice(args);
        let remote = pgfleet(&fleet, &through);
        assert_eq!(local.code(), Some(2), "in-process {args:?}: {local}");
        assert_eq!(remote.code(), Some(2), "through the service {args:?}: {remote}");
        assert_eq!(error_of(&remote), error_of(&local), "{args:?} is refused differently through the service");
    }
    // Refusals of well-formed requests the fleet's state forbids (exit 1):
    // the service checks them in the same place, with the same words.
    let preconditions: Vec<Vec<&str>> = vec![
        vec!["rebuild", "node0"],
        vec!["rebuild", "node0", "--dry-run"],
        vec!["switchover", "--to", "node0"],
        vec!["failover"],
        vec!["failover", "--dry-run"],
        vec!["restart", "node1"],
        vec!["restart", "node0", "--dry-run"],
        vec!["slots", "drop", "node0", "nosuchslot", "--dry-run"],
        vec!["slots", "drop", "node0", "node1"],
        vec!["sync", "set", "node0"],
    ];
    for args in &preconditions {
        let local = pgfleet(&fleet, args);
        let mut through = vec!["--coordinator", c.url.as_str()];
        through.extend_from_slice(args);
        let remote = pgfleet(&fleet, &through);
        assert!(matches!(local.code(), Some(1 | 2)), "in-process {args:?}: {local}");
        assert_eq!(remote.code(), local.code(), "through the service {args:?}: {remote}");
        assert_eq!(error_of(&remote), error_of(&local), "{args:?} is refused differently through the service");
    }
    let after = (
        one(primary, "show synchronous_standby_names").await,
        one(standby, "select pg_postmaster_start_time()::text").await,
        one(primary, "select string_agg(slot_name, ',' order by slot_name) from pg_replication_slots").await,
    );
    assert_eq!(after, before, "a refused request changed the fleet");
}
