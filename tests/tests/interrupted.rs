//! DESIGN.md invariant 7, the crash half: a switchover interrupted between
//! fencing the old primary and promoting the new one (the coordinator died:
//! its journal stops at "catch-up", nobody holds the cluster lock) leaves a
//! cluster without a primary. `pgfleet ops abort` gives the old primary its
//! role back; `pgfleet ops resume` finishes the move. The interruption is
//! made real on the servers (the old primary fenced through its agent) and
//! in the journal (the lines a coordinator writes up to that point).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{exec, json, one, pgfleet, start_agents, start_primary};
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_tests::TestFleet;

const OP: &str = "switchover-20261129T070000Z-1-1";

/// node0 primary, node1 its synchronous standby; then node0 fenced and the
/// journal of a switchover to node1 cut off after the fence.
async fn interrupted_switchover() -> TestFleet {
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    for args in [&["rebuild", "node1"][..], &["sync", "set", "node1"]] {
        let out = pgfleet(&fleet, args);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    exec(fleet.host(0), "create table t (i int); insert into t values (1)").await;
    // The plan the coordinator journals first: exactly what the dry run
    // shows, read back by resume and abort to know what was done.
    let out = pgfleet(&fleet, &["switchover", "--to", "node1", "--dry-run", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let plan = json(&out);
    let index = |step: &str| {
        plan["steps"].as_array().unwrap().iter().position(|s| s["step"] == step).unwrap_or_else(|| panic!("no {step} in {plan}"))
    };
    let mut agent = AgentClient::new(fleet.host(0).agent_channel().await.unwrap());
    let fenced = agent
        .fence(pb::FenceRequest { operation_id: OP.into(), immediate: false })
        .await
        .unwrap()
        .into_inner();
    let checkpoint = fenced.checkpoint_lsn.unwrap();
    let line = |step: &str, event: &str, detail: &str| {
        serde_json::json!({
            "time": "2026-11-29T07:00:00.000Z", "op": OP, "kind": "switchover", "cluster": "main",
            "step": step, "event": event, "detail": detail, "index": index(step),
        })
        .to_string()
    };
    let planned = serde_json::json!({
        "time": "2026-11-29T07:00:00.000Z", "op": OP, "kind": "switchover", "cluster": "main",
        "step": "plan", "event": "planned", "detail": plan.to_string(),
    })
    .to_string();
    let begin = format!(
        r#"{{"time":"2026-11-29T07:00:00.000Z","op":"{OP}","kind":"switchover","cluster":"main","step":"begin","event":"started","detail":"to node1","caller":"crashed coordinator","request":{{"kind":"switchover","cluster":"main","to":"node1","dry_run":false}}}}"#
    );
    let journal = [
        begin,
        planned,
        line("sync-config", "start", "node1: FIRST 1 (\"node0\")"),
        line("sync-config", "done", "set"),
        line("fence", "start", "node0: fast shutdown, standby.signal"),
        line("fence", "done", &format!("stopped; shutdown checkpoint at {checkpoint}")),
        line("catch-up", "start", &format!("node1: replay past {checkpoint}")),
    ]
    .join("\n");
    let state = fleet.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let path = state.join("main.journal");
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, format!("{before}{journal}\n")).unwrap();

    let out = pgfleet(&fleet, &["ops", "list", "--json"]);
    let op = json(&out).as_array().unwrap().iter().find(|o| o["id"] == OP).cloned().unwrap();
    assert_eq!(op["state"], "interrupted", "{op}");
    let out = pgfleet(&fleet, &["status", "--json"]);
    assert!(json(&out)["clusters"][0]["primary"].is_null(), "no primary while interrupted: {out}");
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_a_switchover_interrupted_after_the_fence_restarts_the_old_primary() {
    let fleet = interrupted_switchover().await;
    let out = pgfleet(&fleet, &["ops", "abort", OP]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("node0 was started again as the primary"), "{out}");
    assert_eq!(one(fleet.host(0), "select pg_is_in_recovery()").await, "f");
    exec(fleet.host(0), "insert into t values (2)").await;
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");
    let out = pgfleet(&fleet, &["ops", "show", OP, "--json"]);
    assert_eq!(json(&out)["state"], "aborted", "{out}");
    // Ended: neither abort nor resume applies any more.
    let out = pgfleet(&fleet, &["ops", "resume", OP]);
    assert_eq!(out.code(), Some(2), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_of_a_switchover_interrupted_after_the_fence_finishes_the_move() {
    let fleet = interrupted_switchover().await;
    let out = pgfleet(&fleet, &["ops", "resume", OP]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("node1 is the primary of main"), "{out}");
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "f");
    // Nothing acknowledged was lost, and the old primary follows.
    assert_eq!(one(fleet.host(1), "select count(*) from t").await, "1");
    assert_eq!(one(fleet.host(0), "select pg_is_in_recovery()").await, "t");
    let out = pgfleet(&fleet, &["ops", "show", OP, "--json"]);
    assert_eq!(json(&out)["state"], "succeeded", "{out}");
}
