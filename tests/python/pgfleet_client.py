#!/usr/bin/env python3
"""A client of `pgfleet serve` written as another system would write one.

It uses nothing but grpcio and the stubs generated from pgfleet's proto/
(`python -m grpc_tools.protoc -I proto/proto --python_out=DIR --grpc_python_out=DIR
pgfleet/agent/v1/agent.proto pgfleet/coordinator/v1/coordinator.proto`, run in
the repository), 
over mutual TLS with a certificate from the fleet CA:

1. GetFleetStatus: the cluster holding --rebuild has --primary as its primary;
2. WatchFleet: the first message of every node says "initial"; then cancelled;
3. with --reader-cert/--reader-key: a reader may read the status but gets
   PERMISSION_DENIED on Rebuild;
4. Rebuild(node=--rebuild) returns an operation id at once;
5. WatchOperation follows its events, printed, until `finished`, which must
   say SUCCEEDED;
6. GetOperation says SUCCEEDED and ListOperations lists it.

Exits 0 when every expectation held, 1 with a message naming the one that
did not. The end-to-end test tests/tests/python_client.rs runs it.
"""

import argparse
import importlib
import json
import sys

import grpc

# Deadlines for one call; a watch's deadline covers the whole stream.
CALL_TIMEOUT = 30
WATCH_FLEET_TIMEOUT = 60
REBUILD_TIMEOUT = 300


class ExpectationFailed(Exception):
    """An answer that is not what a client of the API may rely on."""


def expect(condition, message):
    if not condition:
        raise ExpectationFailed(message)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the coordinator as host:port, e.g. 127.0.0.1:7430")
    p.add_argument("--ca", required=True, help="the fleet CA certificate (PEM)")
    p.add_argument("--cert", required=True, help="an admin client certificate (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--stubs", required=True, help="directory of the stubs generated from proto/")
    p.add_argument("--primary", required=True, help="the node expected to be the primary")
    p.add_argument("--rebuild", required=True, help="the node to rebuild")
    p.add_argument("--reader-cert", help="a reader certificate: checks that it may not call Rebuild")
    p.add_argument("--reader-key", help="the reader certificate's private key")
    p.add_argument(
        "--server-name",
        help="name to verify the coordinator's certificate against, when not the host of --url",
    )
    args = p.parse_args()
    if (args.reader_cert is None) != (args.reader_key is None):
        p.error("--reader-cert and --reader-key go together")
    return args


def read(path):
    with open(path, "rb") as f:
        return f.read()


def channel(args, cert, key):
    """A mutual-TLS channel to the coordinator with the given client identity."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca), private_key=read(key), certificate_chain=read(cert)
    )
    # The coordinator is on this machine: never through an HTTP proxy that
    # the environment may name.
    options = [("grpc.enable_http_proxy", 0)]
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(args.url, credentials, options=options)


def state_name(pb, state):
    return pb.OperationState.Name(state)


def check_fleet_status(pb, stub, args):
    """The cluster of --rebuild, as GetFleetStatus reports it."""
    status = stub.GetFleetStatus(pb.GetFleetStatusRequest(), timeout=CALL_TIMEOUT)
    print("GetFleetStatus:")
    for c in status.clusters:
        primary = c.primary if c.HasField("primary") else "-"
        print(f"  cluster {c.name}: primary {primary}, {len(c.nodes)} nodes")
        for n in c.nodes:
            reach = "reachable" if n.reachable else f"unreachable ({n.error})"
            print(f"    {n.name:8} {n.role:8} agent {n.agent_endpoint} {reach}")
        for w in c.warnings:
            print(f"    warning: {w}")
    # The JSON document is the CLI's `status --json`: a program may parse it.
    document = json.loads(status.json)
    expect("clusters" in document, f"FleetStatus.json has no clusters: {status.json[:200]}")

    clusters = [c for c in status.clusters if any(n.name == args.rebuild for n in c.nodes)]
    expect(len(clusters) == 1, f"expected one cluster with node {args.rebuild}, found {len(clusters)}")
    cluster = clusters[0]
    expect(
        cluster.HasField("primary") and cluster.primary == args.primary,
        f"cluster {cluster.name}: expected primary {args.primary}, "
        f"got {cluster.primary if cluster.HasField('primary') else 'none'}",
    )
    names = [n.name for n in cluster.nodes]
    expect(args.primary in names, f"cluster {cluster.name} has no node {args.primary}: {names}")
    unreachable = [n.name for n in cluster.nodes if not n.reachable]
    expect(not unreachable, f"agents did not answer: {unreachable}")
    expect(status.all_reachable, "FleetStatus.all_reachable is false although every node answered")
    primary = next(n for n in cluster.nodes if n.name == args.primary)
    expect(primary.role == "primary", f"{args.primary} has role {primary.role!r}, expected 'primary'")
    return cluster


def check_watch_fleet(pb, stub, cluster):
    """WatchFleet's first messages: each node once, as "initial"; then cancelled."""
    call = stub.WatchFleet(pb.WatchFleetRequest(cluster=cluster.name), timeout=WATCH_FLEET_TIMEOUT)
    expected = sorted(n.name for n in cluster.nodes)
    seen = []
    try:
        for change in call:
            print(f"WatchFleet: {change.time} {change.cluster}/{change.node.name} "
                  f"{change.node.role}: {list(change.changes)}")
            expect(change.cluster == cluster.name, f"WatchFleet sent cluster {change.cluster!r}")
            expect(
                list(change.changes) == ["initial"],
                f"first message of {change.node.name} has changes {list(change.changes)}, expected ['initial']",
            )
            seen.append(change.node.name)
            if len(seen) == len(expected):
                break
    finally:
        call.cancel()
    expect(sorted(seen) == expected, f"WatchFleet's first messages named {sorted(seen)}, expected {expected}")
    print("WatchFleet: cancelled after the first message of every node")


def check_reader_may_not_rebuild(pb, rpc, args):
    """A reader certificate may look at the fleet, not change it."""
    with channel(args, args.reader_cert, args.reader_key) as ch:
        stub = rpc.CoordinatorStub(ch)
        stub.GetFleetStatus(pb.GetFleetStatusRequest(), timeout=CALL_TIMEOUT)
        try:
            ref = stub.Rebuild(pb.RebuildRequest(node=args.rebuild), timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            expect(
                e.code() == grpc.StatusCode.PERMISSION_DENIED,
                f"a reader's Rebuild failed with {e.code().name} ({e.details()}), expected PERMISSION_DENIED",
            )
            print(f"reader: GetFleetStatus allowed; Rebuild refused: {e.code().name}: {e.details()}")
            return
        raise ExpectationFailed(f"a reader certificate started a rebuild: operation {ref.operation_id}")


def describe_event(pb, ev):
    """One operation event as a line for people; None for progress counters."""
    kind = ev.WhichOneof("event")
    if kind == "step":
        s = ev.step
        took = f" ({s.seconds:.1f} s)" if s.phase == "done" else ""
        return f"step [{s.host}] {s.step}: {s.phase}{took} {s.detail}".rstrip()
    if kind == "note":
        warning = "warning: " if ev.note.warning else ""
        return f"note [{ev.note.host}] {warning}{ev.note.text}"
    if kind == "job":
        job = ev.job.event
        what = job.WhichOneof("event")
        if what == "step_started":
            return f"job [{ev.job.node}] {job.step_started.step}: started {job.step_started.description}"
        if what == "step_finished":
            f = job.step_finished
            return f"job [{ev.job.node}] {f.step}: finished ({f.seconds:.1f} s) {f.detail}".rstrip()
        if what == "log":
            return f"job [{ev.job.node}] {job.log.source}: {job.log.line}"
        if what == "finished":
            return f"job [{ev.job.node}] finished: success={job.finished.success}"
        return None
    if kind == "finished":
        return f"finished: {state_name(pb, ev.finished.state)} (exit code {ev.finished.exit_code})"
    return f"unknown event {kind}"


def rebuild_and_watch(pb, stub, args):
    """Starts the rebuild, follows it to the end; returns its id."""
    ref = stub.Rebuild(pb.RebuildRequest(node=args.rebuild), timeout=CALL_TIMEOUT)
    op_id = ref.operation_id
    expect(op_id, "Rebuild returned an empty operation_id")
    print(f"Rebuild: operation {op_id}")

    finished = None
    # A rebuild's steps run on the node's agent: they arrive as the job's
    # step events; other operations send the coordinator's own Step events.
    steps = []
    progress = 0
    next_seq = 0
    events = stub.WatchOperation(pb.WatchOperationRequest(operation_id=op_id), timeout=REBUILD_TIMEOUT)
    for ev in events:
        expect(ev.seq == next_seq, f"WatchOperation sent seq {ev.seq}, expected {next_seq}")
        next_seq += 1
        kind = ev.WhichOneof("event")
        job_event = ev.job.event.WhichOneof("event") if kind == "job" else None
        if kind == "step" and ev.step.phase == "done":
            steps.append(ev.step.step)
        if job_event == "step_finished":
            steps.append(ev.job.event.step_finished.step)
        if job_event == "progress":
            progress += 1
        line = describe_event(pb, ev)
        if line:
            print(f"  {ev.seq:3} {line}")
        if kind == "finished":
            finished = ev.finished
            break
    events.cancel()

    expect(finished is not None, f"WatchOperation ended without a `finished` event after {next_seq} events")
    print(f"WatchOperation: {next_seq} events, {progress} progress updates, steps done: {', '.join(steps)}")
    error = finished.error if finished.HasField("error") else ""
    expect(
        finished.state == pb.OPERATION_STATE_SUCCEEDED,
        f"rebuild of {args.rebuild} ended {state_name(pb, finished.state)}: {error}",
    )
    expect(finished.exit_code == 0, f"a succeeded rebuild has exit code {finished.exit_code}")
    # The answer is a typed value, not text to scrape.
    answer = json.loads(finished.json)
    expect(answer.get("answer") == "rebuilt", f"the rebuild's answer is not typed 'rebuilt': {finished.json}")
    print(f"answer: {answer['node']} rebuilt from {answer['upstream']}, {answer['state']} ({answer['sync_state']})")
    expect(steps, "WatchOperation sent no finished step, neither the coordinator's nor the agent job's")
    return op_id


def check_operation_recorded(pb, stub, op_id):
    op = stub.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=CALL_TIMEOUT)
    print(f"GetOperation: {op.id} {op.kind} {state_name(pb, op.state)} by {op.caller}: {op.summary}")
    expect(op.id == op_id, f"GetOperation({op_id}) returned operation {op.id}")
    expect(op.kind == "rebuild", f"operation {op_id} has kind {op.kind!r}, expected 'rebuild'")
    expect(
        op.state == pb.OPERATION_STATE_SUCCEEDED,
        f"GetOperation says {state_name(pb, op.state)}, expected OPERATION_STATE_SUCCEEDED",
    )

    listed = stub.ListOperations(pb.ListOperationsRequest(), timeout=CALL_TIMEOUT).operations
    ours = [o for o in listed if o.id == op_id]
    expect(ours, f"ListOperations does not list {op_id}: {[o.id for o in listed]}")
    expect(
        ours[0].state == pb.OPERATION_STATE_SUCCEEDED,
        f"ListOperations shows {op_id} as {state_name(pb, ours[0].state)}",
    )
    print(f"ListOperations: {len(listed)} operations, {op_id} among them")


def main():
    args = parse_args()
    # The stubs import each other as `pgfleet.<service>.v1`: DIR is their root.
    sys.path.insert(0, args.stubs)
    pb = importlib.import_module("pgfleet.coordinator.v1.coordinator_pb2")
    rpc = importlib.import_module("pgfleet.coordinator.v1.coordinator_pb2_grpc")
    stage = "connecting"
    try:
        with channel(args, args.cert, args.key) as ch:
            stub = rpc.CoordinatorStub(ch)
            stage = "fleet status"
            cluster = check_fleet_status(pb, stub, args)
            stage = "watching the fleet"
            check_watch_fleet(pb, stub, cluster)
            if args.reader_cert:
                stage = "calls with the reader certificate"
                check_reader_may_not_rebuild(pb, rpc, args)
            stage = "rebuild"
            op_id = rebuild_and_watch(pb, stub, args)
            stage = "the operation's record"
            check_operation_recorded(pb, stub, op_id)
    except ExpectationFailed as e:
        print(f"FAILED ({stage}): {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"FAILED ({stage}): a call returned {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print("OK: status, watch, rebuild and its record as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
