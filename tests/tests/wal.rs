//! `pgfleet wal NODE` on a primary and a replica, and the agent's standard
//! gRPC services (health, reflection).

mod common;

use common::*;
use pgfleet_tests::TestFleet;
use serde_json::Value;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// A WAL file name: 24 upper-case hexadecimal digits (timeline, log, segment).
fn assert_walfile(v: &Value) -> &str {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected a WAL file name, got {v}"));
    assert!(
        s.len() == 24
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
        "{s:?} is not a WAL file name"
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_view_on_primary_names_wal_files() {
    let fleet = TestFleet::new(1).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let p = fleet.host(0);
    const SQL: &str = "select pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()";
    // The server is idle, but WAL may still move (e.g. a running-xacts
    // record): what the CLI shows must lie between a look before and after.
    let before = rows(p, SQL).await.remove(0);
    let out = pgfleet(&fleet, &["wal", "node0", "--json"]);
    let after = rows(p, SQL).await.remove(0);
    assert_eq!(out.code(), Some(0), "{out}");
    let w = json(&out);

    assert_eq!(w["node"], "node0");
    assert_eq!(w["role"], "primary");
    let current = lsn(&w["current_lsn"]);
    let insert = lsn(&w["insert_lsn"]);
    lsn(&w["flush_lsn"]);
    let lsn_before = pgfleet_proto::Lsn::parse(before[1].as_deref().unwrap()).unwrap();
    let lsn_after = pgfleet_proto::Lsn::parse(after[1].as_deref().unwrap()).unwrap();
    assert!(
        (lsn_before..=lsn_after).contains(&current),
        "current_lsn {current} not within {lsn_before}..={lsn_after}"
    );
    assert!(insert >= current, "insert {insert} behind write {current}");
    for k in ["insert_walfile", "flush_walfile"] {
        assert_walfile(&w[k]);
    }
    let write = assert_walfile(&w["write_walfile"]);
    assert!(
        [before[0].as_deref(), after[0].as_deref()].contains(&Some(write)),
        "write_walfile {write} is neither {:?} nor {:?}",
        before[0],
        after[0]
    );
    // Timeline 1.
    assert!(write.starts_with("00000001"), "{write}");
    assert_eq!(w["received_lsn"], Value::Null);
    assert_eq!(w["replayed_lsn"], Value::Null);
    assert_eq!(w["archive_mode"], "off");
    assert_eq!(w["archiver"]["archived_count"], 0);
    assert_eq!(w["archiver"]["failed_count"], 0);
    assert_eq!(w["archiver"]["last_archived_wal"], Value::Null);
    assert_eq!(w["archiver"]["last_failed_wal"], Value::Null);

    let out = pgfleet(&fleet, &["wal", "node0"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.starts_with("node0 (primary)"), "{out}");
    assert!(out.stdout.contains("archive_mode  off"), "{out}");

    let out = pgfleet(&fleet, &["wal", "nodex"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("known: node0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_view_on_replica_reports_received_and_replayed() {
    let fleet = primary_and_replica().await;
    let (p, r) = (fleet.host(0), fleet.host(1));
    exec(
        p,
        "create table t (id int); insert into t select generate_series(1, 1000)",
    )
    .await;
    wait_replayed(p, r).await;
    let replayed_before = one(r, "select pg_last_wal_replay_lsn()").await;

    let out = pgfleet(&fleet, &["wal", "node1", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let w = json(&out);
    assert_eq!(w["node"], "node1");
    assert_eq!(w["role"], "replica");
    let received = lsn(&w["received_lsn"]);
    let replayed = lsn(&w["replayed_lsn"]);
    assert!(received >= replayed, "{w:#}");
    assert!(
        replayed >= pgfleet_proto::Lsn::parse(&replayed_before).unwrap(),
        "replayed_lsn {replayed} behind what the replica said before ({replayed_before})"
    );
    // PostgreSQL refuses pg_walfile_name() and the current_* functions
    // during recovery: a replica has none of them.
    for k in [
        "current_lsn",
        "insert_lsn",
        "flush_lsn",
        "insert_walfile",
        "write_walfile",
        "flush_walfile",
    ] {
        assert_eq!(w[k], Value::Null, "{k}: {w:#}");
    }

    let out = pgfleet(&fleet, &["wal", "node1"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.starts_with("node1 (replica)"), "{out}");
    assert!(out.stdout.contains("replayed LSN"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_health_and_reflection() {
    let fleet = TestFleet::new(1).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let channel = fleet.host(0).agent_channel().await.unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "pgfleet.agent.v1.Agent"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e:?}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    // A real health service, not a blanket "yes".
    let e = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let services: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["pgfleet.agent.v1.Agent", "grpc.health.v1.Health"] {
        assert!(services.contains(&want), "{want} not in {services:?}");
    }
}
