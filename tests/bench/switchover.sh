#!/usr/bin/env bash
# Switchover benchmark (not part of CI): 1 primary + 2 standbys, one
# synchronous (FIRST 1), a client inserting every 10 ms through a multi-host
# connection string, RUNS switchovers (default 10). Release build, demo
# fleet on 127.0.0.1 ports 57432-57434 / agents 18431-18433, removed after.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PGFLEET_DEMO_DIR=/tmp/pgfleet-bench-switchover PGFLEET_DEMO_PG_PORT=57432 PGFLEET_DEMO_AGENT_PORT=18431
export PGFLEET_DEMO_SCALE=${SCALE:-1} PGFLEET_DEMO_QUIET=1 PGFLEET_DEMO_PROFILE=release
trap 'bash scripts/demo stop >/dev/null 2>&1 || true' EXIT
bash scripts/demo >/dev/null
export PGFLEET_INVENTORY=$PGFLEET_DEMO_DIR/inventory.toml
"$PGFLEET_DEMO_DIR/bin/pgfleet" rebuild node1 --no-progress-bar >/dev/null 2>&1
"$PGFLEET_DEMO_DIR/bin/pgfleet" rebuild node2 --no-progress-bar >/dev/null 2>&1
"$PGFLEET_DEMO_DIR/bin/pgfleet" sync set node1 node2 --num 1 >/dev/null
cargo build --release --locked -p pgfleet-tests --bin bench-switchover
./target/release/bench-switchover
